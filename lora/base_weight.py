"""The base layer's weight as a dense tensor, for merging LoRA into it (Hu et al. 2021, section 4.2).

Merging needs W as a dense floating (out_features, in_features) tensor, read before and written after; this file
is the one place that knows how to reach it (``dense_weight`` reads, ``write_dense_weight`` stores). A base whose
weight is not a dense floating tensor (e.g. qlora.nf4_linear.NF4Linear: packed 4-bit codes) takes part in
merging through two methods of its own, duck-typed so that merging works whatever was imported first:

    base.dequantize() -> a new dense floating (out_features, in_features) tensor
    base.requantize_(weight)   stores a dense (out, in) weight back (re-quantizing it: lossy)

as PEFT's bnb.Linear4bit.merge dequantizes, adds the delta and builds a new 4-bit weight (peft/tuners/lora/bnb.py).

Re-quantizing is lossy in two ways that PEFT reports in neither case. (1) Merging: the base sits exactly on its
4-bit grid, so an update smaller than half a grid step rounds back to the old codes and the fine-tune is lost;
``write_dense_weight`` measures how much of the update the stored weight kept (``requantization_drift``) and the
callers warn with it (``RequantizationWarning``; ``finetune merge`` prints the same numbers). (2) Unmerging: the
dequantize-subtract-re-quantize round trip changes about half the codes and the absmax; instead the layer keeps
the base's stored tensors from before its first merge (``quantized_snapshot``: the packed bytes and scales, 0.5
byte per weight for NF4) and unmerging puts them back bit for bit (``restore_snapshot``).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Optional

import torch
from torch import nn


def dense_weight(base_layer: nn.Module) -> torch.Tensor:
    """The base layer's weight as a dense floating (out_features, in_features) tensor, for merge/unmerge.

    This is the single place that knows how to reach a base layer's weight: ``base.dequantize()`` for a
    quantized base (a new tensor, written back by ``write_dense_weight``), else its dense ``weight``.

    Raises:
        TypeError: the base has neither ``dequantize()`` nor a dense floating ``weight`` of shape
            (out_features, in_features).
    """
    if callable(getattr(base_layer, "dequantize", None)):
        return base_layer.dequantize()
    weight = getattr(base_layer, "weight", None)
    expected = (base_layer.out_features, base_layer.in_features)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or tuple(weight.shape) != expected:
        found = "none" if not isinstance(weight, torch.Tensor) else f"{weight.dtype} {tuple(weight.shape)}"
        raise TypeError(f"cannot merge LoRA into a {type(base_layer).__name__}: merging needs a dense floating "
                        f"weight of shape {expected}, found {found}. Merge into a model whose base layers are "
                        f"plain nn.Linear (e.g. dequantize the base first), or give the base layer dequantize() "
                        f"and requantize_(weight) methods")
    return weight


def is_quantized(base_layer: nn.Module) -> bool:
    """A base that stores its weight in another form than a dense tensor (it has ``dequantize()``)."""
    return callable(getattr(base_layer, "dequantize", None))


def write_dense_weight(base_layer: nn.Module, weight: torch.Tensor) -> Optional["RequantizationDrift"]:
    """Store a merged dense weight into the base: in place for a dense base (the Parameter object survives),
    through ``base.requantize_(weight)`` for a quantized one.

    Returns:
        None for a dense base; for a quantized one, how far the stored weight is from ``weight``, measured against
        the update ``weight - W_before`` (``requantization_drift``).

    Raises:
        TypeError: a base with ``dequantize()`` but no ``requantize_`` (it can be read, not written).
    """
    if not is_quantized(base_layer):
        dense_weight(base_layer).copy_(weight)
        return None
    requantize = getattr(base_layer, "requantize_", None)
    if not callable(requantize):
        raise TypeError(f"cannot merge LoRA into a {type(base_layer).__name__}: it has dequantize() but no "
                        "requantize_(weight) to store the merged weight")
    delta = weight.float() - base_layer.dequantize().float()  # (out, in): the update as the base sees it
    requantize(weight)
    return requantization_drift(weight, base_layer.dequantize(), delta)


def quantized_snapshot(base_layer: nn.Module) -> Optional[dict[str, torch.Tensor]]:
    """A copy of a quantized base's stored tensors (its ``state_dict``: packed codes, scales, bias), so that
    ``restore_snapshot`` can undo merges exactly; None for a dense base (unmerging subtracts there)."""
    if not is_quantized(base_layer):
        return None
    return {k: v.detach().clone() for k, v in base_layer.state_dict().items()}


def restore_snapshot(base_layer: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    """Put back the stored tensors of ``quantized_snapshot``: the same bytes as before the first merge."""
    base_layer.load_state_dict(snapshot, strict=True)


# ---- how much of a merged update survives re-quantization ----

class RequantizationWarning(UserWarning):
    """Merging re-quantized a base and the stored weight lost part of the update; ``.drift`` holds the numbers."""

    def __init__(self, message: str, drift: "RequantizationDrift"):
        super().__init__(message)
        self.drift = drift


@dataclasses.dataclass(frozen=True)
class RequantizationDrift:
    """Sums over the re-quantized layers (so that layers combine with ``+``); the ratios are properties.

    With dW the merged update, W' = W + dW the intended weight and Q the stored (re-quantized) one:
    ``kept`` = <Q - W, dW> / |dW|^2 (1: the update survived, 0: it was rounded away) and
    ``relative_error`` = |Q - W'| / |dW| (Frobenius norms).
    """

    layers: int
    update_sq: float  # sum of |dW|^2
    kept_dot: float  # sum of <Q - W, dW>
    error_sq: float  # sum of |Q - W'|^2
    max_abs_error: float  # max |Q - W'| over all weights

    def __add__(self, other: "RequantizationDrift") -> "RequantizationDrift":
        return RequantizationDrift(self.layers + other.layers, self.update_sq + other.update_sq,
                                   self.kept_dot + other.kept_dot, self.error_sq + other.error_sq,
                                   max(self.max_abs_error, other.max_abs_error))

    @property
    def kept(self) -> float:
        return self.kept_dot / self.update_sq if self.update_sq > 0 else 1.0

    @property
    def relative_error(self) -> float:
        return (self.error_sq / self.update_sq) ** 0.5 if self.update_sq > 0 else 0.0

    def describe(self) -> str:
        """One line with the numbers, shared by the library warning and ``finetune merge``'s report."""
        return (f"re-quantizing {self.layers} merged layer(s) kept {self.kept:.1%} of the LoRA update "
                f"(error |Q - (W + dW)| = {self.relative_error:.3g} x |dW|, max abs weight error "
                f"{self.max_abs_error:.3g})")


def requantization_drift(intended: torch.Tensor, stored: torch.Tensor, delta: torch.Tensor) -> RequantizationDrift:
    """Drift of one layer: ``intended`` = W + dW (what the merge computed), ``stored`` = Q (what the re-quantized
    base dequantizes to), ``delta`` = dW; all (out, in), any floating dtype (measured in fp32)."""
    intended, stored, delta = intended.float(), stored.float(), delta.float()
    error = stored - intended  # (out, in)
    return RequantizationDrift(layers=1, update_sq=float(delta.square().sum()),
                               kept_dot=float(((error + delta) * delta).sum()),  # Q - W = error + dW
                               error_sq=float(error.square().sum()),
                               max_abs_error=float(error.abs().max()) if error.numel() else 0.0)


def warn_requantization(drift: RequantizationDrift, stacklevel: int = 3) -> None:
    """Warn that a merge re-quantized its base, with the measured drift and what to do instead.
    ``stacklevel`` counts from this function (3: the caller of the function that calls it)."""
    warnings.warn(RequantizationWarning(
        f"{drift.describe()}: merging into a quantized base rounds the merged weight back to its quantization grid, "
        "which can erase a fine-tune. For an exact result merge into a dense base (qlora.merge.merge_qlora with "
        "requantize='none'; finetune merge --requantize none); to deploy in 4 bits, quantize the original "
        "weights plus the update (base='original'; finetune merge --base original --original DIR) and check the "
        "held-out loss", drift), stacklevel=stacklevel)
