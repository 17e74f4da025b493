"""The pure-PyTorch definitions of the NF4 ops, which every Triton kernel must equal, and the checks of
their inputs.

The layout is bitsandbytes' (``bitsandbytes/functional.py``: ``quantize_4bit``; QLoRA paper, Dettmers
et al. 2023, section 3). A weight W of ``state.shape`` is flattened row-major (n elements) and cut into
blocks of ``state.blocksize`` consecutive flat elements (blocks may straddle rows; the last may be
partial). Each element is a 4-bit code, two per byte of ``packed`` (flat element 2i in the HIGH nibble
of byte i, 2i+1 in the low one; ``packed`` is uint8 ``((n + 1) // 2, 1)``), and

    W[f] = quant_map[code[f]] * absmax[f // blocksize]          (fp32, then one cast)

With double quantization (QLoRA section 3, "Double Quantization") ``absmax`` holds uint8 codes and

    absmax[b] = nested_quant_map[absmax_code[b]] * nested_absmax[b // nested_blocksize] + offset

(fp32, in that order, as ``bitsandbytes.functional.dequantize_4bit`` computes it).

Every function here takes ``(packed, state)``: state: an NF4QuantState (finetune_ref.qlora.quant_state),
used duck-typed through its attributes ``shape``, ``dtype``, ``blocksize``, ``absmax``, ``quant_map``,
``nested``, ``offset``, ``nested_absmax``, ``nested_quant_map``, ``nested_blocksize``, ``numel`` and
``num_blocks``. This room imports nothing of the project, so it never imports the class.

``dequantize_nf4`` is the one dequantize of the project (``qlora.nf4`` quantizes, this dequantizes): it
checks its inputs, then runs ``_dequantize``. The matmul references call ``_dequantize`` directly: they are
the CPU hot path of ``NF4Linear``, whose inputs were checked once when the layer was built, and of
``kernels.nf4_autograd.nf4_linear``, which checks them with ``check_matmul_inputs``. The ``check_*``
functions are also the "check constraints" step of the Triton wrappers.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

OUTPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------
def dequantize_absmax(state: Any) -> torch.Tensor:
    """The fp32 absmax per block, shape ``(num_blocks,)``: stored directly, or rebuilt from double
    quantization (``nested_quant_map[code] * nested_absmax[group] + offset``, two fp32 roundings)."""
    if not state.nested:
        return state.absmax
    nb, group = state.num_blocks, state.nested_blocksize
    groups = state.nested_absmax.numel()
    centred = torch.index_select(state.nested_quant_map, 0, state.absmax.reshape(-1).to(torch.int32))  # (nb,)
    if groups * group != nb:
        centred = F.pad(centred, (0, groups * group - nb))  # (groups * nested_blocksize,): the last group partial
    return (centred.view(groups, group) * state.nested_absmax.view(groups, 1)).view(-1)[:nb] + state.offset  # (nb,)


def dequantize_nf4(packed: torch.Tensor, state: Any, dtype: torch.dtype | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """W from its packed codes: ``quant_map[code] * absmax`` in fp32, cast once to ``dtype``.

    Equal bit for bit to bitsandbytes' pure-PyTorch path (``bitsandbytes/backends/default/ops.py``:
    ``_dequantize_4bit_compute``, the absmax rebuilt as in ``functional.dequantize_4bit``), and to its
    native CPU kernel on the shapes where that kernel is right (``tests/test_nf4.py``).

    Args:
        packed: uint8, ``(numel + 1) // 2`` bytes (any shape), on the state's device.
        state: an NF4QuantState (finetune_ref.qlora.quant_state), as ``qlora.nf4.quantize_nf4`` returns it.
        dtype: output dtype (float32, float16, bfloat16); default ``state.dtype``.
        out: optional tensor of ``state.shape`` to write W into, in its own dtype (e.g. rows of a workspace that
            stacks several layers' weights, models/fused.py); returned. ``dtype`` is then ignored.

    Returns:
        Tensor of ``state.shape`` and ``dtype`` on ``packed``'s device.

    Raises:
        TypeError: ``state`` is not an NF4 quantization state, ``packed`` is not uint8, unsupported dtype.
        ValueError: ``packed`` has the wrong number of bytes or is on another device than the state.
    """
    check_state(state)
    check_packed(packed, state, "dequantize_nf4: packed")
    if dtype is not None:
        check_dtype(dtype, "dequantize_nf4: dtype")
    if out is not None:
        check_dtype(out.dtype, "dequantize_nf4: out")
        if tuple(out.shape) != tuple(state.shape) or out.device != packed.device:
            raise ValueError(f"dequantize_nf4: out must be {tuple(state.shape)} on {packed.device}, got "
                             f"{tuple(out.shape)} on {out.device}")
    return _dequantize(packed, state, dtype, out)


# Byte b decodes to the fp32 pair (quant_map[b >> 4], quant_map[b & 15]): a (256, 2) table, viewed as 256 int64
# words so that one index_select moves a whole pair (~20x faster on CPU than advanced indexing; the bytes are only
# copied, so the values are unchanged). On the CPU the table is built once per distinct map, looked up by the
# map's 64 bytes on every call: a write to quant_map by any route (in place, through .data, numpy) gives another
# key, so a stale table cannot be used. Elsewhere (other devices, tensor subclasses) and while torch.compile
# traces, it is built on every call.
def pair_table(quant_map: torch.Tensor) -> torch.Tensor:
    """The (256,) int64 words whose fp32 halves are (quant_map[b >> 4], quant_map[b & 15]) for byte b."""
    if (quant_map.device.type != "cpu" or quant_map.dtype != torch.float32 or type(quant_map) is not torch.Tensor
            or torch.compiler.is_compiling()):  # (a tensor subclass, e.g. a DTensor, has no plain bytes to key on)
        return _build_pair_table(quant_map)
    return _cpu_pair_table(quant_map.detach().numpy().tobytes())


@functools.lru_cache(maxsize=16)
def _cpu_pair_table(quant_map_bytes: bytes) -> torch.Tensor:
    return _build_pair_table(torch.frombuffer(bytearray(quant_map_bytes), dtype=torch.float32))


def _build_pair_table(quant_map: torch.Tensor) -> torch.Tensor:
    # One copy kernel: (16, 16, 2) with [i, j] = (code[i], code[j]), i.e. byte 16 i + j -> (high, low).
    pairs = torch.stack(torch.broadcast_tensors(quant_map[:, None], quant_map[None, :]), dim=-1)  # (16, 16, 2)
    return pairs.view(256, 2).view(torch.int64).view(256)  # (256, 2) fp32 -> (256, 1) int64 -> (256,)


def _dequantize(packed: torch.Tensor, state: Any, dtype: torch.dtype | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """``dequantize_nf4`` without the checks (the hot path; see the module docstring)."""
    n, nb, bs = state.numel, state.num_blocks, state.blocksize
    absmax = dequantize_absmax(state)  # (nb,) fp32
    words = torch.index_select(pair_table(state.quant_map), 0, packed.reshape(-1).to(torch.int32))  # (m,) int64
    values = words.view(torch.float32)[:n]  # (2m,) -> (n,) fp32
    if nb * bs != n:
        values = F.pad(values, (0, nb * bs - n))  # (nb * bs,): the last block partial
    # fp32 product, rounded once; in place: the gathered values are a fresh tensor (4 B/element less at peak)
    w = values.view(nb, bs).mul_(absmax.view(nb, 1)).view(-1)[:n]  # (nb, bs) -> (n,)
    if out is not None:
        return out.copy_(w.view(state.shape))  # the same one rounding as .to(out.dtype)
    return w.to(state.dtype if dtype is None else dtype).view(state.shape)


def nf4_matmul(x: torch.Tensor, packed: torch.Tensor, state: Any, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ dequant(W)^T + bias: dequantize W to x's dtype, then ``F.linear`` on x's rows.

    Shapes: x (..., K), W (N, K), bias (N,) -> y (..., N), x's dtype. The bits of y depend on x's values only,
    not on its memory layout (``_canonical_rows``).
    """
    rows = _canonical_rows(x)  # (M, K)
    return F.linear(rows, _dequantize(packed, state, x.dtype), bias).view(*x.shape[:-1], -1)  # (M, N) -> (..., N)


def nf4_matmul_input_grad(grad_y: torch.Tensor, packed: torch.Tensor, state: Any) -> torch.Tensor:
    """dx = grad_y @ dequant(W), W dequantized to grad_y's dtype.

    Shapes: grad_y (..., N), W (N, K) -> dx (..., K), grad_y's dtype; independent of grad_y's layout, as above.
    """
    rows = _canonical_rows(grad_y)  # (M, N)
    return (rows @ _dequantize(packed, state, grad_y.dtype)).view(*grad_y.shape[:-1], -1)  # (M, K) -> (..., K)


# CPU BLAS (oneDNN/MKL) picks its blocking, vector path and, for bf16/fp16, its accumulation order from the
# operand's strides and alignment, so a transposed, strided or permuted activation (or a view at an odd offset)
# gives results 1-3 ulp away from its contiguous copy. A reference must not: every matmul gets its input as one
# contiguous (M, K) matrix at an aligned address, so the same values always take the same path.
_ALIGNMENT = 64  # bytes: a cache line, what PyTorch's CPU allocator guarantees for a fresh tensor


def _canonical_rows(x: torch.Tensor) -> torch.Tensor:
    """x (..., K) as a contiguous (M, K) matrix whose data starts at an aligned address (copied only if needed)."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()  # (M, K): a view when x is contiguous, else a fresh copy
    return rows.clone() if rows.data_ptr() % _ALIGNMENT else rows


# --------------------------------------------------------------------------------------------
# Input checks (where inputs enter, never on the hot path)
# --------------------------------------------------------------------------------------------
def check_dtype(dtype: Any, what: str) -> None:
    """Raise TypeError unless ``dtype`` is fp32, fp16 or bf16."""
    if dtype not in OUTPUT_DTYPES:
        raise TypeError(f"{what} must be one of {OUTPUT_DTYPES}, got {dtype}")


_STATE_FIELDS = ("shape", "dtype", "blocksize", "absmax", "quant_map", "nested", "numel", "num_blocks")


def check_state(state: Any) -> None:
    """Raise TypeError unless ``state`` has the fields of an NF4QuantState (this room never imports the class)."""
    missing = [f for f in _STATE_FIELDS if not hasattr(state, f)]
    if missing:
        raise TypeError(f"state must be an NF4QuantState (finetune_ref.qlora.quant_state), got a "
                        f"{type(state).__name__} without {missing}; a bitsandbytes QuantState converts with "
                        f"NF4QuantState.from_dict(quant_state.as_dict())")


def check_packed(packed: Any, state: Any, name: str = "packed weight") -> None:
    """Raise TypeError / ValueError unless ``packed`` is uint8, holds as many bytes as ``state.shape``
    packs into, and sits on the state's device."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError(f"{name} must be a uint8 tensor of packed NF4 codes, "
                        f"got {getattr(packed, 'dtype', type(packed))} "
                        f"(other bitsandbytes quant_storage dtypes are not supported)")
    n_bytes = (state.numel + 1) // 2
    if packed.numel() != n_bytes:
        raise ValueError(f"{name} has {packed.numel()} bytes but shape {tuple(state.shape)} packs into {n_bytes} "
                         f"(packed data and state do not belong together)")
    if packed.device != state.absmax.device:
        raise ValueError(f"{name} is on {packed.device} but the quantization state on {state.absmax.device}")


def _check_weight(packed: Any, state: Any) -> None:
    check_packed(packed, state)
    if len(state.shape) != 2:
        raise ValueError(f"the weight must be 2-D (out_features, in_features), got shape {tuple(state.shape)}")


def check_matmul_inputs(x: Any, packed: Any, state: Any, bias: Any) -> None:
    """Raise TypeError / ValueError unless x (..., K) and bias (N,) fit the NF4 weight (N, K)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    check_dtype(x.dtype, "x.dtype")
    _check_weight(packed, state)
    N, K = state.shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x's last dimension must be in_features={K}, got x of shape {tuple(x.shape)}")
    if x.device != packed.device:
        raise ValueError(f"x is on {x.device} but the weight is on {packed.device}; move one of them")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (N,):
            raise ValueError(f"bias must be a tensor of shape ({N},), got {getattr(bias, 'shape', bias)}")
        if bias.dtype != x.dtype or bias.device != x.device:
            raise TypeError(f"bias must be {x.dtype} on {x.device} like x, got {bias.dtype} on {bias.device}")


def check_input_grad_inputs(grad_y: Any, packed: Any, state: Any) -> None:
    """Raise TypeError / ValueError unless grad_y (..., N) fits the NF4 weight (N, K)."""
    if not isinstance(grad_y, torch.Tensor):
        raise TypeError(f"grad_y must be a torch.Tensor, got {type(grad_y).__name__}")
    check_dtype(grad_y.dtype, "grad_y.dtype")
    _check_weight(packed, state)
    if grad_y.dim() < 1 or grad_y.shape[-1] != state.shape[0]:
        raise ValueError(f"grad_y's last dimension must be out_features={state.shape[0]}, "
                         f"got shape {tuple(grad_y.shape)}")
    if grad_y.device != packed.device:
        raise ValueError(f"grad_y is on {grad_y.device} but the weight is on {packed.device}")
