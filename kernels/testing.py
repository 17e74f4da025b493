"""Helpers shared by the kernel tests and ``benchmarks/bench_kernels.py`` (not used in training).

- ``make_nf4_weight``: NF4 test data from the project's quantizer (``qlora/nf4.py``, byte for
  byte bitsandbytes'; its own tests hold it to that), falling back to bitsandbytes. Kernel tests
  use it, so they also run on a GPU machine that has no bitsandbytes.
- ``quantize_with_bnb``: NF4 data made by bitsandbytes itself (the oracle for the layout), as
  an ``NF4Weight``. bitsandbytes is imported inside the function, never at module import.
- ``guarded_empty`` / ``assert_guards_intact``: an output view inside a sentinel-filled buffer,
  to prove a kernel writes nothing outside its output.
- ``TOLERANCES``: the per-dtype tolerances a kernel is held to against the fp32-computed
  PyTorch reference, with the reason for each.
"""

from __future__ import annotations

import torch

from finetune_ref.kernels.nf4_layout import NF4Weight

# Kernel vs reference, per output dtype. The kernels accumulate in fp32 like the reference, but
# in another order (tiles), so fp32 sums differ by about K * 2^-24 * (sum of |terms|): with unit
# normal x and W at K = 300 the outputs are ~20 and an error of 1.3e-5 was seen, hence atol 1e-4.
# 16-bit outputs may round the other way once (1 ulp: 2^-10 for fp16, 2^-7 for bf16, relative).
TOLERANCES = {
    torch.float32: dict(atol=1e-4, rtol=1e-5),
    torch.float16: dict(atol=1e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
}

SENTINEL = -777.0  # exact in fp32, fp16 and bf16 (no rounding makes it ambiguous)


def quantize_with_bnb(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize ``w`` (any float dtype and shape, CPU or CUDA) with
    ``bitsandbytes.functional.quantize_4bit(quant_type="nf4")`` and wrap the result.

    Raises:
        ImportError: bitsandbytes is not installed.
    """
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(
        w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant
    )
    return NF4Weight.from_quant_state(packed, state)


def make_nf4_weight(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize ``w`` to NF4 (+ double quantization) with ``qlora.nf4.quantize_nf4`` if present,
    else with bitsandbytes.

    Raises:
        ImportError: neither ``qlora.nf4`` nor bitsandbytes can be imported.
    """
    try:
        from finetune_ref.qlora.nf4 import quantize_nf4
    except ImportError:
        return quantize_with_bnb(w, blocksize, double_quant)
    packed, state = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    return NF4Weight.from_quant_state(packed, state)


def nf4_row_slice(weight: NF4Weight, start: int, stop: int) -> NF4Weight:
    """The NF4 weight of rows ``[start, stop)`` of a 2-D ``weight``, sharing its storage.

    Used to check a huge weight piece by piece against the reference. The slice must start on
    an absmax block boundary (and, with double quantization, on a nested block boundary), and
    row ``start`` must begin on a byte boundary.

    Raises:
        ValueError: misaligned or out-of-range rows.
    """
    rows, cols = weight.shape
    if not 0 <= start < stop <= rows:
        raise ValueError(f"rows [{start}, {stop}) are not inside [0, {rows})")
    first = start * cols  # flat index of W[start, 0]
    block_elems = weight.blocksize * (weight.nested_blocksize if weight.double_quant else 1)
    if first % block_elems:
        raise ValueError(f"row {start} starts at flat index {first}, not a multiple of {block_elems}")
    n = (stop - start) * cols
    n_blocks = -(-n // weight.blocksize)
    block0 = first // weight.blocksize
    packed = weight.packed.reshape(-1)[first // 2 : first // 2 + (n + 1) // 2]  # (bytes,)
    if weight.double_quant:
        nested0 = block0 // weight.nested_blocksize
        return NF4Weight(
            packed=packed,
            absmax=weight.absmax[block0 : block0 + n_blocks],
            shape=(stop - start, cols),
            blocksize=weight.blocksize,
            quant_map=weight.quant_map,
            nested_absmax=weight.nested_absmax[nested0 : nested0 - (-n_blocks // weight.nested_blocksize)],
            nested_quant_map=weight.nested_quant_map,
            offset=weight.offset,
            nested_blocksize=weight.nested_blocksize,
        )
    return NF4Weight(packed=packed, absmax=weight.absmax[block0 : block0 + n_blocks], shape=(stop - start, cols),
                     blocksize=weight.blocksize, quant_map=weight.quant_map)


def random_nf4_weight(
    shape: tuple[int, int], double_quant: bool, device: torch.device | str = "cpu", seed: int = 0
) -> NF4Weight:
    """An NF4 weight of random bytes and scales (no quantizer needed; for huge shapes).

    The nested map is bitsandbytes-like (256 sorted values in [-1, 1]); values are not those of
    any real weight but the layout is exact, which is what index arithmetic tests need.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    rows, cols = shape
    n = rows * cols
    n_blocks = -(-n // 64)
    packed = torch.randint(0, 256, ((n + 1) // 2, 1), dtype=torch.uint8, device=device, generator=g)
    if not double_quant:
        absmax = torch.rand(n_blocks, device=device, generator=g) + 0.5
        return NF4Weight(packed=packed, absmax=absmax, shape=shape, blocksize=64)
    return NF4Weight(
        packed=packed,
        absmax=torch.randint(0, 256, (n_blocks,), dtype=torch.uint8, device=device, generator=g),
        shape=shape,
        blocksize=64,
        nested_absmax=torch.rand(-(-n_blocks // 256), device=device, generator=g) + 0.5,
        nested_quant_map=torch.linspace(-1, 1, 256, device=device),
        offset=torch.tensor(0.75, device=device),
    )


def guarded_empty(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    guard: int = 7,
    contiguous: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``SENTINEL``-filled buffer and a view of ``shape`` inside it with ``guard`` elements of
    sentinel on every side.

    With ``contiguous=True`` the view is a contiguous run in a flat buffer (for outputs that
    must be contiguous); otherwise a 2-D view with padded rows (row stride = cols + 2*guard),
    which also exercises an output's strides.

    Returns:
        (buffer, view). Check with ``assert_guards_intact(buffer, view)``.
    """
    if contiguous:
        numel = 1
        for s in shape:
            numel *= s
        buffer = torch.full((numel + 2 * guard,), SENTINEL, dtype=dtype, device=device)
        view = buffer[guard : guard + numel].view(shape)  # (numel,) -> shape
        return buffer, view
    if len(shape) != 2:
        raise ValueError(f"guarded_empty(contiguous=False) needs a 2-D shape, got {shape}")
    rows, cols = shape
    buffer = torch.full((rows + 2 * guard, cols + 2 * guard), SENTINEL, dtype=dtype, device=device)
    return buffer, buffer[guard : guard + rows, guard : guard + cols]


def assert_guards_intact(buffer: torch.Tensor, view: torch.Tensor) -> None:
    """Raise AssertionError if any element of ``buffer`` outside ``view`` is not ``SENTINEL``."""
    outside = torch.ones_like(buffer, dtype=torch.bool)
    # Mark the view's elements through the same strides: the view of the mask is the region.
    region = outside.as_strided(view.shape, view.stride(), view.storage_offset() - buffer.storage_offset())
    region.fill_(False)
    bad = (buffer[outside] != SENTINEL).sum().item()
    if bad:
        raise AssertionError(f"{bad} element(s) outside the output were written")
