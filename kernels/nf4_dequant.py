"""NF4 dequantization: the pure-PyTorch reference, the Triton kernel, and the tile helper the
fused matmul kernels share.

Three layers, top to bottom:

- ``dequantize_nf4_reference(weight, dtype)``: plain tensor ops, the definition every kernel
  must equal. It follows bitsandbytes' pure-torch path
  (``bitsandbytes/backends/default/ops.py``: ``_dequantize_4bit_compute``; the double-quant
  absmax as in ``bitsandbytes/functional.py``: ``dequantize_4bit``).
- ``dequantize_nf4_triton(weight, dtype, out=None)``: checks, allocates, launches
  ``_nf4_dequant_kernel``, one program per ``BLOCK_BYTES`` packed bytes.
- ``dequantize_nf4(weight, dtype, out=None)``: picks one of the two at call time
  (``kernels/backend.py``).

The Triton functions are built on first use by ``_build()``, which imports Triton and binds
``triton``/``tl`` as module globals before the ``@triton.jit`` decorators run: this module
imports without Triton, and Triton's interpreter (which looks ``tl`` up in the kernel's
globals) works. Set ``TRITON_INTERPRET=1`` before the first call to run on CPU tensors. The
kernels use Triton builtins only, never the ``@triton.jit`` helpers of ``triton.language``
(``tl.cdiv``, ``tl.zeros``, ``tl.sum``...), whose mode is fixed when Triton is first imported
(see ``kernels/nf4_matmul_forward.py``).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from finetune_ref.kernels.backend import import_triton, resolve_backend
from finetune_ref.kernels.nf4_layout import NF4Weight

OUTPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Bound by _build() on first use; None until then so the module imports without Triton.
triton: Any = None
tl: Any = None
dequantize_nf4_tile: Any = None
load_absmax: Any = None
_nf4_dequant_kernel: Any = None


def check_dtype(dtype: Any, what: str) -> None:
    """Raise TypeError unless ``dtype`` is fp32, fp16 or bf16."""
    if dtype not in OUTPUT_DTYPES:
        raise TypeError(f"{what} must be one of {OUTPUT_DTYPES}, got {dtype}")


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------
def dequantize_absmax_reference(weight: NF4Weight) -> torch.Tensor:
    """The fp32 absmax per block, shape (n_blocks,), undoing double quantization if present.

    absmax[b] = nested_quant_map[code[b]] * nested_absmax[b // nested_blocksize] + offset,
    computed in fp32 in that order (QLoRA section 3, "Double Quantization").
    """
    if not weight.double_quant:
        return weight.absmax
    nested = weight.nested_absmax.repeat_interleave(weight.nested_blocksize)[: weight.n_blocks]  # (n_blocks,)
    return weight.nested_quant_map[weight.absmax.long()] * nested + weight.offset


def dequantize_nf4_reference(weight: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize an NF4 weight with plain PyTorch ops.

    Args:
        weight: the NF4 tensors (any device).
        dtype: output dtype, fp32 / fp16 / bf16. Values are computed in fp32 and cast once.

    Returns:
        Tensor of shape ``weight.shape`` and dtype ``dtype`` on ``weight.device``.

    Raises:
        TypeError: unsupported dtype or weight not an NF4Weight.
    """
    if not isinstance(weight, NF4Weight):
        raise TypeError(f"weight must be an NF4Weight, got {type(weight).__name__}")
    check_dtype(dtype, "dtype")
    n = weight.numel
    packed = weight.packed.reshape(-1)  # (n_bytes,)
    # Byte i holds flat element 2i in the high nibble and 2i+1 in the low one.
    codes = torch.stack((packed >> 4, packed & 0x0F), dim=1).reshape(-1)[:n]  # (n_bytes, 2) -> (n,)
    values = weight.quant_map[codes.long()]  # (n,) fp32
    absmax = dequantize_absmax_reference(weight).repeat_interleave(weight.blocksize)[:n]  # (n,)
    return (values * absmax).to(dtype).reshape(weight.shape)  # (n,) -> shape


# --------------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------------
@functools.cache
def _build() -> Any:
    """Import Triton and define the jit functions of this module (once per process)."""
    global triton, tl, dequantize_nf4_tile, load_absmax, _nf4_dequant_kernel
    triton, tl = import_triton()

    @triton.jit
    def load_absmax(
        block,
        mask,
        absmax_ptr,
        nested_absmax_ptr,
        nested_quant_map_ptr,
        offset_ptr,
        NESTED_BLOCKSIZE: tl.constexpr,
        DOUBLE_QUANT: tl.constexpr,
    ):
        """fp32 absmax of the blocks ``block`` (int64 tile, any shape); 0 where ~mask."""
        if DOUBLE_QUANT:
            # The second level is reconstructed in registers: absmax never exists in memory.
            code = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)  # uint8 code
            nested = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
            scale = tl.load(nested_quant_map_ptr + code) * nested + tl.load(offset_ptr)
            return tl.where(mask, scale, 0.0)
        else:
            return tl.load(absmax_ptr + block, mask=mask, other=0.0)

    @triton.jit
    def dequantize_nf4_tile(
        flat,
        mask,
        packed_ptr,
        absmax_ptr,
        quant_map_ptr,
        nested_absmax_ptr,
        nested_quant_map_ptr,
        offset_ptr,
        BLOCKSIZE: tl.constexpr,
        NESTED_BLOCKSIZE: tl.constexpr,
        DOUBLE_QUANT: tl.constexpr,
    ):
        """fp32 weight values at the int64 flat indices ``flat`` (any tile shape); 0 where ~mask.

        This is where a fused kernel dequantizes: a tile of W goes from 4-bit codes in global
        memory to fp32 values in registers, and is never written back.
        """
        byte = tl.load(packed_ptr + (flat >> 1), mask=mask, other=0).to(tl.int32)
        shift = (1 - (flat & 1).to(tl.int32)) * 4  # even flat index -> high nibble
        code = (byte >> shift) & 0x0F
        value = tl.load(quant_map_ptr + code)  # 16-entry table, stays in L1
        scale = load_absmax(
            flat // BLOCKSIZE, mask, absmax_ptr, nested_absmax_ptr, nested_quant_map_ptr, offset_ptr,
            NESTED_BLOCKSIZE, DOUBLE_QUANT,
        )
        return value * scale

    @triton.jit
    def _nf4_dequant_kernel(
        # pointers
        packed_ptr,
        absmax_ptr,
        quant_map_ptr,
        nested_absmax_ptr,
        nested_quant_map_ptr,
        offset_ptr,
        out_ptr,
        # sizes
        n_elements,
        # meta
        BLOCKSIZE: tl.constexpr,
        NESTED_BLOCKSIZE: tl.constexpr,
        DOUBLE_QUANT: tl.constexpr,
        BLOCK_BYTES: tl.constexpr,
    ):
        pid = tl.program_id(0)
        # int64 before multiplying: pid * BLOCK_BYTES passes 2^31 on 4-billion-element weights.
        offs_byte = pid.to(tl.int64) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)  # (BLOCK_BYTES,)
        mask_byte = offs_byte < (n_elements + 1) // 2
        # Each byte is read once and gives two outputs; blocksize is even, so both share a scale.
        byte = tl.load(packed_ptr + offs_byte, mask=mask_byte, other=0).to(tl.int32)
        scale = load_absmax(
            (offs_byte * 2) // BLOCKSIZE, mask_byte, absmax_ptr, nested_absmax_ptr, nested_quant_map_ptr,
            offset_ptr, NESTED_BLOCKSIZE, DOUBLE_QUANT,
        )
        high = tl.load(quant_map_ptr + (byte >> 4)) * scale  # flat element 2i
        low = tl.load(quant_map_ptr + (byte & 0x0F)) * scale  # flat element 2i + 1
        # (BLOCK_BYTES, 2) -> (2 * BLOCK_BYTES,): row-major reshape interleaves high, low.
        values = tl.reshape(tl.join(high, low), (2 * BLOCK_BYTES,))
        offs_out = pid.to(tl.int64) * (2 * BLOCK_BYTES) + tl.arange(0, 2 * BLOCK_BYTES)
        tl.store(out_ptr + offs_out, values.to(out_ptr.dtype.element_ty), mask=offs_out < n_elements)

    return _nf4_dequant_kernel


def weight_kernel_args(weight: NF4Weight) -> tuple[torch.Tensor, ...]:
    """The six pointer arguments every NF4 kernel takes, in order. Without double quantization
    the nested pointers are never read; ``absmax`` stands in for them (a launch needs tensors)."""
    if weight.double_quant:
        return (weight.packed, weight.absmax, weight.quant_map, weight.nested_absmax,
                weight.nested_quant_map, weight.offset)
    return (weight.packed, weight.absmax, weight.quant_map, weight.absmax, weight.absmax, weight.absmax)


def default_block_bytes(interpret: bool) -> int:
    """Packed bytes per program: 1024 on a GPU (2048 outputs, 8 per thread at 4 warps);
    16384 in the interpreter, whose cost grows with the number of programs."""
    return 16384 if interpret else 1024


def dequantize_nf4_triton(
    weight: NF4Weight,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
    block_bytes: int | None = None,
) -> torch.Tensor:
    """Dequantize with the Triton kernel.

    Args:
        weight: the NF4 tensors, on CUDA (or CPU with ``TRITON_INTERPRET=1``).
        dtype: output dtype, fp32 / fp16 / bf16.
        out: optional output, contiguous, shape ``weight.shape``, dtype ``dtype``, same device;
            nothing outside it is written.
        block_bytes: packed bytes per program, a power of two up to 2^19 (Triton's tile limit is
            2^20 elements); default ``default_block_bytes``.

    Returns:
        ``out`` (or a new tensor) of shape ``weight.shape``, equal to
        ``dequantize_nf4_reference(weight, dtype)`` (bitwise in fp32/fp16 except for a possible
        fused multiply-add in the double-quant absmax on GPU, 1 ulp).

    Raises:
        TypeError / ValueError: bad dtype, bad ``out``, bad ``block_bytes``.
        ImportError: Triton is not installed.
    """
    if not isinstance(weight, NF4Weight):
        raise TypeError(f"weight must be an NF4Weight, got {type(weight).__name__}")
    check_dtype(dtype, "dtype")
    from finetune_ref.kernels.backend import interpreter_enabled

    if block_bytes is None:
        block_bytes = default_block_bytes(interpreter_enabled())
    if not isinstance(block_bytes, int) or block_bytes < 1 or block_bytes & (block_bytes - 1) or block_bytes > 2**19:
        # Triton caps a tile at 2^20 elements; a program holds 2 * block_bytes outputs.
        raise ValueError(f"block_bytes must be a power of two from 1 to 2^19, got {block_bytes!r}")
    if out is None:
        out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    else:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        if out.dtype != dtype or tuple(out.shape) != weight.shape or out.device != weight.device:
            raise ValueError(
                f"out must be {dtype} of shape {weight.shape} on {weight.device}, got {out.dtype} of "
                f"shape {tuple(out.shape)} on {out.device}"
            )
        if not out.is_contiguous():
            raise ValueError("out must be contiguous (the kernel writes it as a flat array)")
    kernel = _build()
    n_bytes = (weight.numel + 1) // 2
    grid = (triton.cdiv(n_bytes, block_bytes),)
    kernel[grid](
        *weight_kernel_args(weight),
        out,
        weight.numel,
        BLOCKSIZE=weight.blocksize,
        NESTED_BLOCKSIZE=weight.nested_blocksize,
        DOUBLE_QUANT=weight.double_quant,
        BLOCK_BYTES=block_bytes,
        num_warps=4,
    )
    return out


def dequantize_nf4(
    weight: NF4Weight, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Dequantize with the backend chosen now (``kernels.backend.resolve_backend``): the Triton
    kernel on CUDA, the PyTorch reference on CPU, unless forced. Same arguments and errors as
    ``dequantize_nf4_triton``."""
    if not isinstance(weight, NF4Weight):
        raise TypeError(f"weight must be an NF4Weight, got {type(weight).__name__}")
    if resolve_backend(weight.packed) == "triton":
        return dequantize_nf4_triton(weight, dtype, out=out)
    result = dequantize_nf4_reference(weight, dtype)
    if out is None:
        return result
    if not isinstance(out, torch.Tensor) or out.dtype != dtype or tuple(out.shape) != weight.shape:
        raise ValueError(f"out must be a {dtype} tensor of shape {weight.shape}")
    return out.copy_(result)
