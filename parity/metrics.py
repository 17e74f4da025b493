"""How far apart two tensors are: max abs, max relative (normwise), max ulps, bitwise.

Units in the last place (Goldberg 1991, "What Every Computer Scientist Should Know About Floating-Point
Arithmetic", section 1.2): the number of representable values of the dtype between two numbers. IEEE-754
floats are sign-magnitude; viewing the bits as an integer and mapping negatives to ``-(bits without sign)``
gives integers that are ordered as the floats are and step by one per representable value, so the ulp
distance is the difference of those integers (+0 and -0 map to the same 0). This is the ordering
``std::nextafter`` walks and the one numpy's ``testing.assert_array_max_ulp`` uses.

The relative error is normwise, ``max|ours - theirs| / max|theirs|`` over the whole tensor, so that elements
near zero (where a one-ulp difference is a huge elementwise relative error) do not dominate it; max ulps is
elementwise and shows those.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# dtype -> (integer view of the same width, 2 ** (bits - 1): the sign bit as an unsigned value)
_INT_VIEW = {
    torch.float32: (torch.int32, 2 ** 31),
    torch.bfloat16: (torch.int16, 2 ** 15),
    torch.float16: (torch.int16, 2 ** 15),
}
ULP_DTYPES = tuple(_INT_VIEW)
SHORT_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.uint8: "uint8"}


def dtype_name(dtype: torch.dtype) -> str:
    """The short name the report and the command use: torch.bfloat16 -> "bf16"."""
    return SHORT_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def ordered_bits(x: torch.Tensor) -> torch.Tensor:
    """int64 integers ordered as the floats of ``x`` (fp32, bf16 or fp16), one step per representable value."""
    if x.dtype not in _INT_VIEW:
        raise TypeError(f"ulps are defined here for {ULP_DTYPES}, got {x.dtype}")
    int_dtype, sign = _INT_VIEW[x.dtype]
    bits = x.contiguous().view(int_dtype).to(torch.int64)
    # Negative floats have the sign bit set: as a signed integer bits = -sign + magnitude, so the
    # magnitude is bits + sign and its ordered value is -(bits + sign).
    return torch.where(bits < 0, -(bits + sign), bits)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise ulp distance (int64) between same-dtype tensors; a NaN on either side gives -1."""
    if a.dtype != b.dtype or a.shape != b.shape:
        raise ValueError(f"ulp_distance needs equal dtypes and shapes, got {a.dtype}{tuple(a.shape)} and "
                         f"{b.dtype}{tuple(b.shape)}")
    d = (ordered_bits(a) - ordered_bits(b)).abs()
    return torch.where(torch.isnan(a) | torch.isnan(b), torch.full_like(d, -1), d)


@dataclass(frozen=True)
class Divergence:
    """Summary of ``ours`` against ``theirs``. ``max_ulps`` is None for integer tensors (packed codes), and
    inf when a NaN appears on one side only."""

    max_abs: float
    max_rel: float
    max_ulps: float | None
    bitwise: bool
    mismatched: int  # elements not bitwise equal
    numel: int

    def as_dict(self) -> dict:
        return {"max_abs": self.max_abs, "max_rel": self.max_rel, "max_ulps": self.max_ulps,
                "bitwise": self.bitwise, "mismatched": self.mismatched, "numel": self.numel}


def divergence(ours: torch.Tensor, theirs: torch.Tensor) -> Divergence:
    """Compare two tensors of the same shape. Floats are compared in ``theirs``' dtype (ours is cast if it
    differs, which then cannot be bitwise); integer tensors by value (max_ulps None)."""
    ours, theirs = ours.detach().cpu(), theirs.detach().cpu()
    if ours.shape != theirs.shape:
        raise ValueError(f"shapes differ: ours {tuple(ours.shape)}, theirs {tuple(theirs.shape)}")
    same_dtype = ours.dtype == theirs.dtype
    if theirs.is_floating_point() and not same_dtype:
        ours = ours.to(theirs.dtype)
    equal = ours == theirs if not theirs.is_floating_point() else (ours == theirs) | (ours.isnan() & theirs.isnan())
    if theirs.is_floating_point() and same_dtype:
        equal &= torch.signbit(ours) == torch.signbit(theirs)  # -0.0 and +0.0 are not the same bits
    mismatched = int((~equal).sum())
    a, b = ours.double(), theirs.double()
    finite = torch.isfinite(a) & torch.isfinite(b)
    diff = (a - b).abs()
    max_abs = float(diff[finite].max()) if bool(finite.any()) else 0.0
    if bool((~finite & ~equal).any()):
        max_abs = math.inf
    scale = float(b[torch.isfinite(b)].abs().max()) if bool(torch.isfinite(b).any()) else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    max_ulps = None
    if theirs.dtype in _INT_VIEW and theirs.numel():
        one_nan = ours.isnan() ^ theirs.isnan()
        max_ulps = math.inf if bool(one_nan.any()) else float(ulp_distance(ours, theirs).clamp(min=0).max())
    return Divergence(max_abs=max_abs, max_rel=max_rel, max_ulps=max_ulps,
                      bitwise=mismatched == 0 and same_dtype, mismatched=mismatched, numel=theirs.numel())
