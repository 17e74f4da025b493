"""The NF4 weight layout the kernels read: bitsandbytes' storage, bundled and checked.

A weight W of shape (out_features, in_features) is stored the way bitsandbytes stores it
(``bitsandbytes/functional.py``: ``quantize_4bit``; QLoRA paper, Dettmers et al. 2023, section 3):

- W is flattened row-major (n = out_features * in_features elements) and cut into blocks of
  ``blocksize`` consecutive flat elements. The last block may be partial and blocks may
  straddle rows: element (r, c) lives in block ``(r * in_features + c) // blocksize``.
- ``absmax[b]`` = max |W| over block b (fp32, one per block).
- Each element is the index (0..15) of the nearest value of ``quant_map`` (the 16 NF4 values,
  quantiles of N(0, 1) normalised to [-1, 1]) to ``W / absmax``.
- Two 4-bit codes per byte: flat element 2i in the HIGH nibble of byte i, 2i+1 in the low one;
  ``packed`` is uint8 of shape ((n + 1) // 2, 1).
- Dequantize: ``quant_map[code] * absmax[block]`` in fp32, then one cast to the output dtype.

Double quantization (QLoRA section 3, "Double Quantization") stores the absmax themselves in
8 bits: ``offset = mean(absmax)``; ``absmax - offset`` is quantized blockwise (256 per block)
with bitsandbytes' signed dynamic 8-bit map. Then ``absmax`` holds uint8 codes and

    absmax[b] = nested_quant_map[absmax_code[b]] * nested_absmax[b // nested_blocksize] + offset

(fp32, in that order, as ``bitsandbytes.functional.dequantize_4bit`` computes it).
Bits per weight: 4 + 32/64 = 4.5 without it, 4 + 8/64 + 32/(64*256) = 4.127 with it.

``NF4Weight`` bundles those tensors under bitsandbytes/HF state-dict names and checks them once,
so every kernel, wrapper and reference takes the same object. It matches bitsandbytes
byte for byte (not torchao's NF4Tensor, which rounds the table and scales differently).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

# The 16 NF4 values, index = 4-bit code (bitsandbytes ``get_4bit_type("nf4")``; QLoRA sec. 3).
NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


def nf4_quant_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """The NF4 table as an fp32 tensor of shape (16,) on ``device``."""
    return torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)


def _check_tensor(name: str, t: Any, dtype: torch.dtype, numel: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"NF4Weight.{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"NF4Weight.{name} must be {dtype}, got {t.dtype}")
    if t.numel() != numel:
        raise ValueError(
            f"NF4Weight.{name} must have {numel} elements for this shape/blocksize, got {t.numel()} "
            f"(shape {tuple(t.shape)})"
        )
    if not t.is_contiguous():
        # The kernels index these buffers as flat arrays.
        raise ValueError(f"NF4Weight.{name} must be contiguous; call .contiguous() on it first")


@dataclasses.dataclass(frozen=True)
class NF4Weight:
    """The tensors of one NF4-quantized weight, in bitsandbytes' layout (see module docstring).

    Attributes:
        packed: uint8, ``(n + 1) // 2`` elements (bitsandbytes keeps shape ((n+1)//2, 1)),
            n = prod(shape). Two codes per byte, the even flat element in the high nibble.
        absmax: one scale per block, ``ceil(n / blocksize)`` elements: fp32 without double
            quantization, uint8 codes with it.
        shape: the dequantized shape, ``(out_features, in_features)`` for a linear weight.
        blocksize: elements per absmax block; a positive even number (bitsandbytes uses a
            power of two from 32 to 4096; 64 is QLoRA's choice). Even, so both nibbles of a
            byte always share one absmax.
        quant_map: fp32 (16,), the NF4 table (``quant_state.code`` in bitsandbytes).
        nested_absmax: fp32, ``ceil(n_blocks / nested_blocksize)`` elements, or None.
        nested_quant_map: fp32 (256,), the signed dynamic 8-bit map, or None.
        offset: fp32 scalar tensor (one element), the mean absmax subtracted before the
            second quantization, or None.
        nested_blocksize: absmax values per nested block (bitsandbytes: 256).

    Double quantization is on when ``nested_absmax`` is given; then ``nested_quant_map`` and
    ``offset`` are required too.

    Raises (on construction):
        TypeError: a field has the wrong type or dtype.
        ValueError: a size, shape, device or contiguity does not fit the layout.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, ...]
    blocksize: int = 64
    quant_map: torch.Tensor | None = None
    nested_absmax: torch.Tensor | None = None
    nested_quant_map: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    nested_blocksize: int = 256

    def __post_init__(self) -> None:
        shape = tuple(self.shape) if isinstance(self.shape, (tuple, list, torch.Size)) else None
        if not shape or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
            raise ValueError(f"NF4Weight.shape must be a non-empty tuple of positive ints, got {self.shape!r}")
        object.__setattr__(self, "shape", shape)
        for name in ("blocksize", "nested_blocksize"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"NF4Weight.{name} must be a positive int, got {value!r}")
        if self.blocksize % 2:
            raise ValueError(
                f"NF4Weight.blocksize must be even (both nibbles of a byte share one absmax), "
                f"got {self.blocksize}"
            )
        n = self.numel
        _check_tensor("packed", self.packed, torch.uint8, (n + 1) // 2)
        if self.quant_map is None:
            object.__setattr__(self, "quant_map", nf4_quant_map(self.packed.device))
        _check_tensor("quant_map", self.quant_map, torch.float32, 16)
        if self.double_quant:
            _check_tensor("absmax", self.absmax, torch.uint8, self.n_blocks)
            n_nested = math.ceil(self.n_blocks / self.nested_blocksize)
            _check_tensor("nested_absmax", self.nested_absmax, torch.float32, n_nested)
            if self.nested_quant_map is None or self.offset is None:
                raise ValueError(
                    "NF4Weight: double quantization (nested_absmax given) also needs nested_quant_map "
                    "and offset"
                )
            _check_tensor("nested_quant_map", self.nested_quant_map, torch.float32, 256)
            _check_tensor("offset", self.offset, torch.float32, 1)
        else:
            if self.nested_quant_map is not None or self.offset is not None:
                raise ValueError(
                    "NF4Weight: nested_quant_map/offset given without nested_absmax; pass all three "
                    "for double quantization or none of them"
                )
            _check_tensor("absmax", self.absmax, torch.float32, self.n_blocks)
        devices = {t.device for t in self.tensors()}
        if len(devices) != 1:
            raise ValueError(f"NF4Weight tensors must all be on one device, got {sorted(map(str, devices))}")

    # -- derived sizes -------------------------------------------------------------------------
    @property
    def numel(self) -> int:
        """n, the number of weight elements."""
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        """Number of absmax blocks, ceil(n / blocksize)."""
        return math.ceil(self.numel / self.blocksize)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor held (None fields skipped)."""
        fields = (self.packed, self.absmax, self.quant_map, self.nested_absmax, self.nested_quant_map, self.offset)
        return [t for t in fields if t is not None]

    def nbytes(self) -> int:
        """Bytes of storage for the whole quantized weight (what a kernel reads at least once)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def to(self, device: torch.device | str) -> NF4Weight:
        """A copy with every tensor on ``device``."""
        moved = {
            f.name: (v.to(device) if isinstance(v, torch.Tensor) else v)
            for f in dataclasses.fields(self)
            for v in [getattr(self, f.name)]
        }
        return NF4Weight(**moved)

    @classmethod
    def from_quant_state(cls, packed: torch.Tensor, quant_state: Any) -> NF4Weight:
        """Build from a packed tensor and a quant state.

        Accepts a ``bitsandbytes.functional.QuantState`` (fields ``absmax``, ``shape``, ``code``,
        ``blocksize``, ``quant_type``, ``offset``, ``state2``) or any object with HF state-dict
        names (``absmax``, ``shape``, ``blocksize``, ``quant_map``, and for double quantization
        ``nested_absmax``, ``nested_quant_map``, ``offset``, ``nested_blocksize``).

        Raises:
            ValueError: the quant state is not NF4 (e.g. bitsandbytes' FP4) or is inconsistent.
            TypeError: packed is not uint8 (bitsandbytes' ``quant_storage`` other than uint8:
                pass ``packed.view(torch.uint8)``).
        """
        quant_type = getattr(quant_state, "quant_type", "nf4")
        if quant_type != "nf4":
            raise ValueError(f"NF4Weight.from_quant_state: quant_type must be 'nf4', got {quant_type!r}")
        if hasattr(quant_state, "state2"):  # bitsandbytes QuantState
            nested = quant_state.state2 if getattr(quant_state, "nested", False) else None
            offset = quant_state.offset if nested is not None else None
            if offset is not None and not isinstance(offset, torch.Tensor):
                offset = torch.tensor([float(offset)], dtype=torch.float32, device=packed.device)
            return cls(
                packed=packed,
                absmax=quant_state.absmax,
                shape=tuple(quant_state.shape),
                blocksize=int(quant_state.blocksize),
                quant_map=quant_state.code,
                nested_absmax=None if nested is None else nested.absmax,
                nested_quant_map=None if nested is None else nested.code,
                offset=offset,
                nested_blocksize=256 if nested is None else int(nested.blocksize),
            )
        return cls(
            packed=packed,
            absmax=quant_state.absmax,
            shape=tuple(quant_state.shape),
            blocksize=int(quant_state.blocksize),
            quant_map=getattr(quant_state, "quant_map", None),
            nested_absmax=getattr(quant_state, "nested_absmax", None),
            nested_quant_map=getattr(quant_state, "nested_quant_map", None),
            offset=getattr(quant_state, "offset", None),
            nested_blocksize=int(getattr(quant_state, "nested_blocksize", 256)),
        )
