"""Helpers shared by the kernel tests and ``benchmarks/bench_kernels.py`` (not part of the library).

A weight is a pair ``(packed, state)``: the uint8 codes and its ``NF4QuantState``, as the kernels take it.

- ``make_nf4_weight``: NF4 test data from the project's quantizer (``qlora/nf4.py``, byte for byte
  bitsandbytes'; ``tests/test_nf4.py`` holds it to that). It needs no bitsandbytes, so the kernel tests
  also run on a GPU machine that has none.
- ``quantize_with_bnb``: NF4 data made by bitsandbytes itself (the oracle for the layout), read through
  its state dict format. bitsandbytes is imported inside the function, never at module import.
- ``nf4_row_slice`` / ``random_nf4_weight``: pieces of a huge weight, and huge weights without a quantizer.
- ``guarded_empty`` / ``assert_guards_intact``: an output view inside a sentinel-filled buffer,
  to prove a kernel writes nothing outside its output.
- ``TOLERANCES``: the per-dtype tolerances a kernel is held to against the fp32-computed
  PyTorch reference, with the reason for each.

Tests import this by module name (``from kernel_testing import ...``), as they do ``tiny_model_dir``;
the benchmark puts this folder on ``sys.path`` first.
"""

from __future__ import annotations

import torch

from finetune_ref.qlora.nf4 import nf4_code, quantize_nf4
from finetune_ref.qlora.quant_state import NF4QuantState

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


def quantize_with_bnb(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True
                      ) -> tuple[torch.Tensor, NF4QuantState]:
    """Quantize ``w`` (any float dtype and shape, CPU or CUDA) with
    ``bitsandbytes.functional.quantize_4bit(quant_type="nf4")``; its state is read through bitsandbytes'
    own state-dict format (``QuantState.as_dict(packed=True)``), tensors shared, not copied.

    Raises:
        ImportError: bitsandbytes is not installed.
    """
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)
    return packed, NF4QuantState.from_dict(state.as_dict(packed=True))


def make_nf4_weight(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True,
                    device: torch.device | str = "cpu") -> tuple[torch.Tensor, NF4QuantState]:
    """Quantize ``w`` to NF4 (+ double quantization) with ``qlora.nf4.quantize_nf4`` and move it to ``device``."""
    packed, state = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    return packed.to(device), state.to(device)


def nf4_tensors(packed: torch.Tensor, state: NF4QuantState) -> list[torch.Tensor]:
    """Every tensor of a weight: the packed codes, then the state's tensors."""
    return [packed, *state.tensors().values()]


def nf4_row_slice(packed: torch.Tensor, state: NF4QuantState, start: int, stop: int
                  ) -> tuple[torch.Tensor, NF4QuantState]:
    """The NF4 weight of rows ``[start, stop)`` of a 2-D weight, sharing its storage.

    Used to check a huge weight piece by piece against the reference. The slice must start on
    an absmax block boundary (and, with double quantization, on a nested block boundary), and
    row ``start`` must begin on a byte boundary.

    Raises:
        ValueError: misaligned or out-of-range rows.
    """
    rows, cols = state.shape
    if not 0 <= start < stop <= rows:
        raise ValueError(f"rows [{start}, {stop}) are not inside [0, {rows})")
    first = start * cols  # flat index of W[start, 0]
    block_elems = state.blocksize * (state.nested_blocksize if state.nested else 1)
    if first % block_elems:
        raise ValueError(f"row {start} starts at flat index {first}, not a multiple of {block_elems}")
    n = (stop - start) * cols
    n_blocks = -(-n // state.blocksize)
    block0 = first // state.blocksize
    part = packed.reshape(-1)[first // 2 : first // 2 + (n + 1) // 2]  # (bytes,)
    fields = dict(shape=(stop - start, cols), dtype=state.dtype, blocksize=state.blocksize,
                  absmax=state.absmax[block0 : block0 + n_blocks], quant_map=state.quant_map)
    if state.nested:
        nested0 = block0 // state.nested_blocksize
        fields.update(offset=state.offset, nested_quant_map=state.nested_quant_map,
                      nested_absmax=state.nested_absmax[nested0 : nested0 - (-n_blocks // state.nested_blocksize)])
    return part, NF4QuantState(**fields)


def random_nf4_weight(shape: tuple[int, int], double_quant: bool, device: torch.device | str = "cpu", seed: int = 0
                      ) -> tuple[torch.Tensor, NF4QuantState]:
    """An NF4 weight of random bytes and scales (no quantizer needed; for huge shapes).

    The nested map is bitsandbytes-like (256 sorted values in [-1, 1]); values are not those of
    any real weight but the layout is exact, which is what index arithmetic tests need.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    rows, cols = shape
    n = rows * cols
    n_blocks = -(-n // 64)
    packed = torch.randint(0, 256, ((n + 1) // 2, 1), dtype=torch.uint8, device=device, generator=g)
    fields = dict(shape=shape, dtype=torch.float32, blocksize=64, quant_map=nf4_code(device))
    if not double_quant:
        return packed, NF4QuantState(absmax=torch.rand(n_blocks, device=device, generator=g) + 0.5, **fields)
    return packed, NF4QuantState(
        absmax=torch.randint(0, 256, (n_blocks,), dtype=torch.uint8, device=device, generator=g),
        nested_absmax=torch.rand(-(-n_blocks // 256), device=device, generator=g) + 0.5,
        nested_quant_map=torch.linspace(-1, 1, 256, device=device),
        offset=torch.tensor(0.75, device=device),
        **fields,
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
