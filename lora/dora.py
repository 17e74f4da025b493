"""DoRA's math as plain functions on tensors, and the magnitude vector it trains.

Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", section 4, eq. (5): the adapted weight is split
into a magnitude and a direction,

    W' = m * (W + s B A) / ||W + s B A||_c          W: (out_features, in_features),  m: (out_features,)

where ||.||_c is the norm of each *column* of the paper's (in, out) weight, i.e. of each row of PyTorch's
(out, in) weight: ``torch.linalg.norm(W + s B A, dim=1)`` (peft/tuners/lora/dora.py ``get_weight_norm``). m is
initialised to ||W + s B A||_c (= ||W||_c when B = 0), so that W' = W + s B A at the start. Section 4.3: the norm is treated as a constant (detached from the gradient graph), which saves
the memory of its backward and changes the gradient only slightly.

With the norm detached, and writing f = m / ||W + s B A||_c (out,), the layer's output is

    y = x W'^T + b = base(x) + (f - 1) * (x W^T) + f * s * B(A(x))

which is how PEFT computes it (peft/tuners/lora/dora.py ``DoraLinearLayer.forward``): the base layer runs as
usual and DoRA adds (f - 1) * (base(x) - b) + f * s * B(A(x)). With dropout active the dropped input also feeds
the direction term, so x W^T is recomputed from the dropped x instead of reusing base(x).

QDoRA: on a 4-bit base (qlora.nf4_linear.NF4Linear) W is the dequantized weight, as PEFT's
``dequantize_module_weight`` gives it; nothing else changes.

Merging (section 4.2 of Hu et al. 2021 applied to eq. (5)): W <- f * (W + s B A) with f computed from the
unmerged W; unmerging divides by the same f (kept from the merge) and subtracts s B A
(peft/tuners/lora/variants.py ``DoraLinearVariant.merge_safe`` / ``unmerge``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DoraMagnitude(nn.Module):
    """Holds DoRA's trainable magnitude m (out_features,) as ``weight``, so that its state-dict key is
    ``<module>.lora_magnitude_vector.<adapter>.weight`` as in PEFT (``DoraLinearLayer.weight``)."""

    def __init__(self, magnitude: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(magnitude, requires_grad=True)


def dora_lora_weight(lora_A: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
    """B @ A as (out_features, in_features), computed as PEFT's forward does it (B(A(I))^T), so that norms agree
    bitwise with ``DoraLinearLayer.get_lora_weight``."""
    eye = torch.eye(lora_A.shape[1], device=lora_A.device, dtype=lora_A.dtype)  # (in, in)
    return F.linear(F.linear(eye, lora_A), lora_B).T  # (in, r) -> (in, out) -> (out, in)


def dora_weight_norm(weight: torch.Tensor, lora_weight: torch.Tensor, scaling: float) -> torch.Tensor:
    """||W + scaling * lora_weight||_c: the L2 norm of each row of the (out, in) weight, shape (out_features,).

    The dtype is that of the sum (promoted from W's and lora_weight's), as in PEFT's ``get_weight_norm``.
    """
    weight = weight + scaling * lora_weight  # (out, in)
    return torch.linalg.norm(weight, dim=1).to(weight.dtype)


@torch.no_grad()
def dora_init_magnitude(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                        scaling: float) -> torch.Tensor:
    """m at initialisation: ||W + s B A||_c (so that W' = W + s B A), from the dense (dequantized) W.

    As PEFT's ``DoraLinearLayer.update_layer``: B @ A as a plain matmul in the adapter's dtype (fp16 adapters in
    fp32, as PEFT does for CPUs), W on the adapter's device.
    """
    if lora_A.dtype == torch.float16:
        lora_weight = (lora_B.float() @ lora_A.float()).half()
    else:
        lora_weight = lora_B @ lora_A  # (out, r) @ (r, in) -> (out, in)
    return dora_weight_norm(weight.to(lora_A.device), lora_weight, scaling)


def dora_forward(x: torch.Tensor, base_result: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
                 magnitude: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                 dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """DoRA's addition to the base layer's output: (f - 1) * (x W^T) + f * s * B(A(x)), f = m / ||W + s B A||_c.

    Args:
        x: (..., in_features) in the adapter's dtype.
        base_result: the base layer's output base(x) = x W^T + b (..., out_features); reused (minus the bias)
            as x W^T when no dropout is active. Ignored when dropout is active: then x W^T is recomputed from
            the dropped input.
        weight: the dense (dequantized) base weight (out, in); bias: the base's bias or None.
        magnitude: m (out,).  lora_A: (r, in).  lora_B: (out, r).

    Returns:
        (..., out_features), to be added to ``base_result``. Same operations in the same order as PEFT's
        ``DoraLinearVariant.forward`` / ``DoraLinearLayer.forward``, so fp32 results agree bitwise.
    """
    if dropout > 0.0 and training:
        x = F.dropout(x, p=dropout, training=True)
        base_result = None
    lora_weight = dora_lora_weight(lora_A, lora_B).to(x.dtype)  # (out, in)
    weight = weight.to(x.dtype)
    # Section 4.3: the norm is a constant for backpropagation.
    weight_norm = dora_weight_norm(weight, lora_weight.detach(), scaling).detach()  # (out,)
    mag_norm_scale = (magnitude / weight_norm).view(1, -1)  # (1, out), broadcasts over (..., out)
    lora_result = F.linear(F.linear(x, lora_A), lora_B)
    if base_result is not None:
        if bias is not None:
            base_result = base_result - bias
    else:
        base_result = F.linear(x, weight)
    return (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * scaling


def dora_merge_factor(unmerged_weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """f = m / ||W0 + delta||_c as an (out, 1) column, from the *unmerged* base W0 and delta = s B A (detached)."""
    weight_norm = dora_weight_norm(unmerged_weight, delta, 1.0).detach()  # (out,)
    return (magnitude.detach() / weight_norm).view(-1, 1)  # (out, 1)


def dora_merged(weight: torch.Tensor, delta: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """W <- f * (W + delta) (peft ``DoraLinearVariant.merge_safe``)."""
    return factor * (weight + delta)


def dora_unmerged(weight: torch.Tensor, delta: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """W <- W / f - delta, the inverse of ``dora_merged`` with the same f (peft ``DoraLinearVariant.unmerge``)."""
    return weight / factor - delta
