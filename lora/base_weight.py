"""The base layer's weight as a dense tensor, for merging LoRA into it (Hu et al. 2021, section 4.2).

Merging needs W as a dense floating (out_features, in_features) tensor, read before and written after; this file
is the one place that knows how to reach it (``dense_weight`` reads, ``write_dense_weight`` stores). A base whose
weight is not a dense floating tensor (e.g. qlora.nf4_linear.NF4Linear: packed 4-bit codes) takes part in
merging through two methods of its own, duck-typed so that merging works whatever was imported first:

    base.dequantize() -> a new dense floating (out_features, in_features) tensor
    base.requantize_(weight)   stores a dense (out, in) weight back (re-quantizing it: lossy)

as PEFT's bnb.Linear4bit.merge dequantizes, adds the delta and builds a new 4-bit weight (peft/tuners/lora/bnb.py).
"""

from __future__ import annotations

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


def write_dense_weight(base_layer: nn.Module, weight: torch.Tensor) -> None:
    """Store a merged dense weight into the base: in place for a dense base (the Parameter object survives),
    through ``base.requantize_(weight)`` for a quantized one.

    Raises:
        TypeError: a base with ``dequantize()`` but no ``requantize_`` (it can be read, not written).
    """
    if callable(getattr(base_layer, "dequantize", None)):
        requantize = getattr(base_layer, "requantize_", None)
        if not callable(requantize):
            raise TypeError(f"cannot merge LoRA into a {type(base_layer).__name__}: it has dequantize() but no "
                            "requantize_(weight) to store the merged weight")
        requantize(weight)
    else:
        dense_weight(base_layer).copy_(weight)
