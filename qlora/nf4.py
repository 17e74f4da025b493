"""NF4 (4-bit NormalFloat) quantization with double quantization, byte-for-byte with bitsandbytes.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314), section 3:

* NF4 data type: 16 values that are quantiles of N(0, 1), rescaled to [-1, 1], with an exact zero.
  :data:`NF4_CODE_VALUES` is the table bitsandbytes ships; :func:`derive_nf4_code` recomputes it.
* Blockwise absmax quantization: the tensor is flattened row-major and cut into blocks of
  ``blocksize`` consecutive elements (blocks may straddle rows; the last may be partial). Each block
  is scaled by the reciprocal of its absmax and each value takes the nearest NF4 code.
* Double quantization: the fp32 absmax values are centred by their mean and quantized again with the
  signed 8-bit dynamic map in blocks of 256 (:mod:`optim.blockwise8`).

What "byte-for-byte" covers, checked against bitsandbytes 0.50.2 on CPU (``tests/test_nf4.py``): packed
bytes, absmax, 8-bit absmax codes, nested absmax, offset and both maps, for float32 / bfloat16 / float16
input, blocksizes 32..4096 and any element count. The rules we replicate (bitsandbytes
``backends/default/ops.py``, ``quantize_4bit``; ``functional.py``, ``quantize_4bit``):

* full blocks are scaled by ``x * (1 / max(absmax, 1e-38))``; the last partial block by
  ``x / max(absmax, 1e-38)`` (a division, which can round differently by one ulp), and that clamped
  absmax is what is stored for it (an all-zero partial last block stores 1e-38, not 0);
* scaled values are clamped to [-1, 1] and bucketized on the fp32 midpoints of the table: a value
  exactly on a midpoint takes the lower code;
* two codes per byte, flat element 2i in the high nibble, 2i+1 in the low one; an odd count is padded
  with the code of 0.0 (7); packed shape ``((n + 1) // 2, 1)`` uint8;
* ``offset = absmax.mean()`` is computed with PyTorch's own fp32 mean, as bitsandbytes does, so the
  summation order is PyTorch's. Bit equality of the offset therefore assumes the same PyTorch build
  and, for very large tensors (whose reduction PyTorch may split over threads), the same thread count;
* the 8-bit step follows bitsandbytes' CPU lookup-table rule, not nearest rounding (see
  :mod:`optim.blockwise8`). bitsandbytes' CUDA kernel is not reproduced.

Dequantization computes ``quant_map[code] * absmax`` in fp32 and casts once to the output dtype, with
``absmax = nested_quant_map[q] * nested_absmax + offset`` (two fp32 roundings) under double
quantization, exactly as bitsandbytes' pure-PyTorch path. It lives beside the Triton kernels that must equal
it: ``kernels/reference.py``, ``dequantize_nf4(packed, state, dtype=None)``. (bitsandbytes' native CPU
dequantize is wrong for some shapes; see ``tests/test_nf4.py::test_bnb_native_cpu_dequantize_bug_is_documented``.)

Blocks whose absmax is below 1e-38 lose most of their values under bitsandbytes' rule (down to all zeros
below ~4e-40); ``quantize_nf4(..., scale_floor=None)`` is exact for them (see its docstring).

Bad input: NaN/inf anywhere raise ValueError (we refuse rather than let one value poison its block);
fp64, integer, fp8 and uint8 (already packed) inputs raise TypeError; all-zero blocks dequantize to
exact zeros; non-contiguous views quantize like their contiguous copies; inputs are never modified.
"""

from __future__ import annotations

from typing import Optional

import torch

from finetune_ref.optim.blockwise8 import check_float_input, create_dynamic_map, quantize_blockwise
from finetune_ref.qlora.quant_state import NESTED_BLOCKSIZE, NF4QuantState, check_blocksize

# The NF4 table as stored by bitsandbytes (functional.get_4bit_type("nf4")); index = 4-bit code.
NF4_CODE_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# Probability of the outermost quantile, 1 - (1/(2*15) + 1/(2*16)) / 2 = 0.96770833...: stopping short of
# p = 1 keeps the outermost quantiles finite (QLoRA, section 3). bitsandbytes' create_normal_map writes it
# rounded to 7 digits; that literal reproduces the stored table exactly.
NF4_QUANTILE_OFFSET = 0.9677083
ZERO_CODE = 7  # NF4_CODE_VALUES[7] == 0.0
_SCALE_FLOOR = 1e-38  # bitsandbytes clamps absmax to this before scaling


def nf4_code(device: Optional[torch.device | str] = None) -> torch.Tensor:
    """The 16 NF4 values as an fp32 tensor of shape (16,), ascending, from -1.0 to 1.0."""
    return torch.tensor(NF4_CODE_VALUES, dtype=torch.float32, device=device)


def derive_nf4_code(offset: float = NF4_QUANTILE_OFFSET) -> torch.Tensor:
    """Recompute the NF4 table from quantiles of N(0, 1) (QLoRA, section 3).

    An exact zero is kept by quantizing the two halves separately: 8 positive values are the normal
    quantiles at probabilities ``linspace(offset, 0.5, 9)[:-1]`` and 7 negative values the mirrored
    quantiles at ``linspace(offset, 0.5, 8)[:-1]``; with 0 that makes 16, normalised by the largest
    so the range is [-1, 1]. Probabilities are fp32 (as in bitsandbytes' ``create_normal_map``), the
    quantile function is evaluated in float64, and the result is rounded to fp32 before normalising.
    With the default offset this reproduces :data:`NF4_CODE_VALUES` exactly; with the unrounded
    offset 0.96770833... it agrees to within 3e-7 (a few fp32 ulps).

    Args:
        offset: probability of the outermost quantile, in (0.5, 1).

    Returns:
        fp32 tensor of shape (16,), ascending.

    Raises:
        ValueError: ``offset`` outside (0.5, 1).
    """
    if not 0.5 < offset < 1.0:
        raise ValueError(f"derive_nf4_code: offset must be in (0.5, 1), got {offset}")
    p_pos = torch.linspace(offset, 0.5, 9, dtype=torch.float32)  # (9,), last is the median (0)
    p_neg = torch.linspace(offset, 0.5, 8, dtype=torch.float32)  # (8,)
    positive = torch.special.ndtri(p_pos.double())[:-1]  # 8 values > 0
    negative = -torch.special.ndtri(p_neg.double())[:-1]  # 7 values < 0
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).float().sort().values
    return values / values.max()


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes two per byte, high nibble first.

    Args:
        codes: uint8 (n,) values in 0..15; an odd count is padded with :data:`ZERO_CODE`.

    Returns:
        uint8 ``((n + 1) // 2, 1)``: byte i = codes[2i] << 4 | codes[2i + 1].
    """
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), ZERO_CODE)])
    return ((codes[0::2] << 4) | codes[1::2]).view(-1, 1)  # (n/2, 1)


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: uint8 (n,) codes from packed bytes (any shape, row-major)."""
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 0xF], dim=1).view(-1)[:n]  # (2m,) -> (n,)


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True,
                 scale_floor: Optional[float] = _SCALE_FLOOR) -> tuple[torch.Tensor, NF4QuantState]:
    """Quantize a tensor to NF4, as ``bitsandbytes.functional.quantize_4bit(w, blocksize, compress_statistics=
    double_quant, quant_type="nf4")`` does, byte for byte.

    Subnormal blocks: bitsandbytes scales a block by ``1 / max(absmax, 1e-38)``, so a block whose absmax is below
    1e-38 (fp32 subnormals and the smallest normals) is scaled by 1e38 instead of ``1 / absmax``: its values
    land on the small codes and come back too small (measured: the largest element returns 48% too small at
    absmax 5e-39, 91% at 1e-39), and below about 4e-40 every code is 0 and the block dequantizes to zeros.
    The default keeps this rule, for byte equality with bitsandbytes; real weights are never that small.
    ``scale_floor=None`` is the exact mode: such blocks are scaled by ``1 / absmax`` computed as a division (an
    all-zero block stays zero), so the largest element of every block is reproduced exactly (with
    ``double_quant=False``; double quantization stores the absmax itself in 8 bits). Other blocks get the same
    bytes in both modes.

    Args:
        w: float32 / bfloat16 / float16 tensor, any shape, at least one element, finite. Never modified.
        blocksize: elements per absmax block: 32, 64, 128, 256, 512, 1024, 2048 or 4096 (an int).
        double_quant: also quantize the absmax values (8-bit, blocks of 256; QLoRA section 3).
        scale_floor: 1e-38 (default, bitsandbytes' clamp) or None (exact for blocks with absmax < 1e-38).

    Returns:
        ``(packed, state)``: uint8 packed codes of shape ``((numel + 1) // 2, 1)`` and the
        :class:`NF4QuantState` (original shape and dtype, absmax, maps, offset).

    Raises:
        TypeError: ``w`` is not a tensor, or its dtype is not float32/bfloat16/float16 (fp64, ints,
            fp8, or uint8 data that is probably already packed).
        ValueError: empty tensor, NaN/inf values, unsupported blocksize, or absmax values so large
            that their mean overflows fp32 (use ``double_quant=False``).
    """
    check_blocksize(blocksize, "quantize_nf4")
    if scale_floor is not None and scale_floor != _SCALE_FLOOR:
        raise ValueError(f"quantize_nf4: scale_floor must be {_SCALE_FLOOR} (bitsandbytes' rule, the default) or None "
                         f"(exact for tiny blocks), got {scale_floor!r}")
    flat, n = check_float_input(w, "quantize_nf4")
    code = nf4_code(flat.device)

    absmax, scaled = _block_absmax_and_scale(flat, blocksize, exact_tiny=scale_floor is None)
    if n % 2:
        scaled = torch.cat([scaled, scaled.new_zeros(1)])  # pads with code 7 (0.0)
    midpoints = (code[:-1] + code[1:]) / 2  # (15,) fp32
    codes = torch.bucketize(scaled, midpoints, out_int32=True, right=False).to(torch.uint8)  # ties -> lower code
    packed = pack_nibbles(codes)

    if not double_quant:
        state = NF4QuantState(shape=w.shape, dtype=w.dtype, blocksize=blocksize, absmax=absmax, quant_map=code)
        return packed, state
    offset = absmax.mean()  # 0-dim fp32, PyTorch's reduction (as bitsandbytes)
    if not bool(torch.isfinite(offset)):
        raise ValueError("quantize_nf4: the mean of the block absmax values overflows fp32 "
                         "(values near the fp32 limit); quantize with double_quant=False")
    nested_map = create_dynamic_map(signed=True).to(flat.device)
    q_absmax, nested_absmax = quantize_blockwise(absmax - offset, nested_map, NESTED_BLOCKSIZE, rounding="lut")
    state = NF4QuantState(shape=w.shape, dtype=w.dtype, blocksize=blocksize, absmax=q_absmax, quant_map=code,
                          offset=offset, nested_absmax=nested_absmax, nested_quant_map=nested_map)
    return packed, state


def _block_absmax_and_scale(flat: torch.Tensor, blocksize: int,
                            exact_tiny: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax (fp32, (num_blocks,)) and the values scaled into [-1, 1] ((n,)), bitsandbytes' way.

    ``exact_tiny``: blocks with absmax below the floor are divided by their own absmax (0 for an all-zero
    block: its values are zeros) instead of multiplied by 1 / floor; see ``quantize_nf4``.
    """
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    blocks = flat[:full].view(full // blocksize, blocksize)  # (n_full, blocksize)
    absmax = blocks.abs().amax(dim=1)  # (n_full,); stored unclamped
    scaled = (blocks * (1.0 / absmax.clamp(min=_SCALE_FLOOR)).view(-1, 1)).clamp(-1, 1)  # (n_full, blocksize)
    if exact_tiny:
        tiny = absmax < _SCALE_FLOOR  # (n_full,)
        if bool(tiny.any()):
            # 1 / absmax overflows fp32 below ~2.9e-39, so divide; a zero block divides by 1 (its values are 0).
            own = blocks / torch.where(absmax == 0, torch.ones_like(absmax), absmax).view(-1, 1)
            scaled = torch.where(tiny.view(-1, 1), own.clamp(-1, 1), scaled)
    scaled = scaled.view(-1)  # (full,)
    if rem:
        tail = flat[full:]  # (rem,)
        tail_absmax = tail.abs().amax()
        if not exact_tiny or tail_absmax >= _SCALE_FLOOR:
            tail_absmax = tail_absmax.clamp(min=_SCALE_FLOOR)  # stored clamped, as bitsandbytes
        divisor = tail_absmax if tail_absmax > 0 else torch.ones_like(tail_absmax)
        absmax = torch.cat([absmax, tail_absmax.view(1)])
        scaled = torch.cat([scaled, (tail / divisor).clamp(-1, 1)])  # division here, not reciprocal
    return absmax, scaled
