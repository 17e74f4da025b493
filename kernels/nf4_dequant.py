"""NF4 dequantization in Triton: the tile helpers the fused matmul kernels share, and a standalone
dequantize kernel with its wrapper.

- ``load_absmax`` / ``dequantize_nf4_tile``: ``@triton.jit`` helpers. They turn a tile of int64 flat
  indices of W into fp32 values in registers (the double-quant absmax is rebuilt there too), which
  is how ``kernels/nf4_matmul.py`` multiplies by W without writing it to memory.
- ``nf4_dequant_kernel`` / ``dequantize_nf4_triton``: W to global memory, one program per
  ``BLOCK_BYTES`` packed bytes. It must equal ``kernels/reference.py``: ``dequantize_nf4``.

The layout is written out in ``kernels/reference.py``. This module imports Triton at its top, so it
is imported only when the backend resolves to "triton" (``kernels/nf4_autograd.py``); set
``TRITON_INTERPRET=1`` before its first import to run the kernels on CPU tensors. The kernels use
Triton *builtins* only, never the ``@triton.jit`` helpers of ``triton.language`` (``tl.cdiv``,
``tl.zeros``, ``tl.sum``...): those are compiled-or-interpreted once, when Triton is first imported,
and bitsandbytes imports Triton at its own import, possibly before a test sets ``TRITON_INTERPRET``.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from finetune_ref.kernels.backend import interpreter_enabled
from finetune_ref.kernels.reference import check_dtype, check_packed


@triton.jit
def load_absmax(
    block,
    mask,
    # pointers
    absmax_ptr,
    nested_absmax_ptr,
    nested_quant_map_ptr,
    offset_ptr,
    # meta-parameters
    NESTED_BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
):
    """fp32 absmax of the blocks ``block`` (int64 tile, any shape); 0 where ~mask."""
    if DOUBLE_QUANT:
        # The second level is rebuilt in registers: the fp32 absmax never exists in memory.
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
    # pointers
    packed_ptr,
    absmax_ptr,
    quant_map_ptr,
    nested_absmax_ptr,
    nested_quant_map_ptr,
    offset_ptr,
    # meta-parameters
    BLOCKSIZE: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
):
    """fp32 weight values at the int64 flat indices ``flat`` (any tile shape); 0 where ~mask.

    This is where a fused kernel dequantizes: a tile of W goes from 4-bit codes in global memory
    to fp32 values in registers, and is never written back.
    """
    byte = tl.load(packed_ptr + (flat >> 1), mask=mask, other=0).to(tl.int32)
    shift = (1 - (flat & 1).to(tl.int32)) * 4  # even flat index -> high nibble
    code = (byte >> shift) & 0x0F
    value = tl.load(quant_map_ptr + code)  # 16-entry table, stays in L1
    scale = load_absmax(flat // BLOCKSIZE, mask, absmax_ptr, nested_absmax_ptr, nested_quant_map_ptr, offset_ptr,
                        NESTED_BLOCKSIZE, DOUBLE_QUANT)
    return value * scale


@triton.jit
def nf4_dequant_kernel(
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
    # meta-parameters
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
    scale = load_absmax((offs_byte * 2) // BLOCKSIZE, mask_byte, absmax_ptr, nested_absmax_ptr,
                        nested_quant_map_ptr, offset_ptr, NESTED_BLOCKSIZE, DOUBLE_QUANT)
    high = tl.load(quant_map_ptr + (byte >> 4)) * scale  # flat element 2i
    low = tl.load(quant_map_ptr + (byte & 0x0F)) * scale  # flat element 2i + 1
    # (BLOCK_BYTES, 2) -> (2 * BLOCK_BYTES,): a row-major reshape interleaves high, low.
    values = tl.reshape(tl.join(high, low), (2 * BLOCK_BYTES,))
    offs_out = pid.to(tl.int64) * (2 * BLOCK_BYTES) + tl.arange(0, 2 * BLOCK_BYTES)
    out_ptrs = out_ptr + offs_out
    tl.store(out_ptrs, values.to(out_ptr.dtype.element_ty), mask=offs_out < n_elements)


def nf4_pointer_args(packed: torch.Tensor, state: Any) -> tuple[torch.Tensor, ...]:
    """The six pointer arguments every NF4 kernel takes, in order, after checking that the kernels
    can index them as flat arrays (``packed`` itself is checked by ``kernels.reference.check_packed``).
    Without double quantization the nested pointers are never read; ``absmax`` stands in for them
    (a launch needs tensors).

    state: an NF4QuantState (finetune_ref.qlora.quant_state).

    Raises:
        ValueError: a tensor is not contiguous, or an odd blocksize (the kernels let both nibbles of a
            byte share one absmax).
    """
    if state.blocksize % 2:
        raise ValueError(f"blocksize must be even (both nibbles of a byte share one absmax), got {state.blocksize}")
    if state.nested:
        args = (packed, state.absmax, state.quant_map, state.nested_absmax, state.nested_quant_map, state.offset)
    else:
        args = (packed, state.absmax, state.quant_map, state.absmax, state.absmax, state.absmax)
    names = ("packed", "absmax", "quant_map", "nested_absmax", "nested_quant_map", "offset")
    for name, t in zip(names, args):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (the kernels index it as a flat array); "
                             f"call .contiguous() on it first")
    return args


def default_block_bytes(interpret: bool) -> int:
    """Packed bytes per program: 1024 on a GPU (2048 outputs, 8 per thread at 4 warps);
    16384 in the interpreter, whose cost grows with the number of programs."""
    return 16384 if interpret else 1024


def dequantize_nf4_triton(
    packed: torch.Tensor,
    state: Any,
    dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    block_bytes: int | None = None,
) -> torch.Tensor:
    """Dequantize with the Triton kernel.

    Args:
        packed: uint8 packed codes, on CUDA (or CPU with ``TRITON_INTERPRET=1``).
        state: an NF4QuantState (finetune_ref.qlora.quant_state), on packed's device.
        dtype: output dtype, fp32 / fp16 / bf16; default ``state.dtype``.
        out: optional output, contiguous, shape ``state.shape``, dtype ``dtype``, same device;
            nothing outside it is written.
        block_bytes: packed bytes per program, a power of two up to 2^19 (Triton's tile limit is
            2^20 elements); default ``default_block_bytes``.

    Returns:
        ``out`` (or a new tensor) of ``state.shape``, equal to ``kernels.reference.dequantize_nf4``
        (bitwise in fp32/fp16 except for a possible fused multiply-add in the double-quant absmax
        on GPU, 1 ulp).

    Raises:
        TypeError / ValueError: bad packed data, dtype, ``out`` or ``block_bytes``.
    """
    # check constraints
    dtype = state.dtype if dtype is None else dtype
    check_dtype(dtype, "dtype")
    check_packed(packed, state)
    pointers = nf4_pointer_args(packed, state)
    if block_bytes is None:
        block_bytes = default_block_bytes(interpreter_enabled())
    if not isinstance(block_bytes, int) or block_bytes < 1 or block_bytes & (block_bytes - 1) or block_bytes > 2**19:
        # Triton caps a tile at 2^20 elements; a program holds 2 * block_bytes outputs.
        raise ValueError(f"block_bytes must be a power of two from 1 to 2^19, got {block_bytes!r}")
    shape = tuple(state.shape)
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        if out.dtype != dtype or tuple(out.shape) != shape or out.device != packed.device:
            raise ValueError(f"out must be {dtype} of shape {shape} on {packed.device}, got {out.dtype} of "
                             f"shape {tuple(out.shape)} on {out.device}")
        if not out.is_contiguous():
            raise ValueError("out must be contiguous (the kernel writes it as a flat array)")
    # allocate output
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=packed.device)
    # launch: one program per block_bytes packed bytes
    grid = (triton.cdiv((state.numel + 1) // 2, block_bytes),)
    nf4_dequant_kernel[grid](
        *pointers, out,
        state.numel,
        BLOCKSIZE=state.blocksize, NESTED_BLOCKSIZE=state.nested_blocksize, DOUBLE_QUANT=state.nested,
        BLOCK_BYTES=block_bytes,
        num_warps=4,
    )
    return out
