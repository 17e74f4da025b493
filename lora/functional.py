"""LoRA's math as plain functions on tensors: scaling, the adapter's forward, the merged weight, the init.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", section 4.1: keep the pre-trained weight
W (out_features, in_features) frozen and learn a low-rank update dW = B A, with

    A: (r, in_features)    init kaiming-uniform(a=sqrt(5))   (or N(0, 1/r^2): PEFT's "gaussian")
    B: (out_features, r)   init zeros, so that dW = 0 and training starts from the pre-trained model
    h = x W^T + b + scaling * B(A(dropout(x)))          x: (..., in_features),  h: (..., out_features)
    scaling = lora_alpha / r   (section 4.1),   or lora_alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023)

Dropout is inverted dropout on the adapter's input only (PEFT's ``lora_dropout``); the base path is never
dropped. The adapter computes in its own dtype (e.g. bf16 adapters on an fp32 base, or fp32 adapters on a bf16
or 4-bit base as in QLoRA) and the sum is returned in the base output's dtype, as PEFT's ``lora.Linear.forward``
(peft/tuners/lora/layer.py) does.

Section 4.2 ("no additional inference latency"): for deployment W is replaced by W + scaling * B A ("merge"),
and subtracting the same product restores W ("unmerge"). Here the product and the sum are computed in fp32 and
rounded once to W's dtype; in fp32 unmerge restores W up to fp32 rounding, in bf16/fp16 up to one unit in the
last place of max(|W|, |W + dW|) (the sum W + dW was rounded once on the way in).

``lora.layer.LoRALinear`` is the thin module on top of these functions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from finetune_ref.lora.config import check_alpha, check_rank


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """scaling = lora_alpha / r (Hu et al. 2021, 4.1), or lora_alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023).

    Raises:
        TypeError / ValueError: r not an int >= 1, or lora_alpha not a finite number > 0.
    """
    check_rank(r)
    check_alpha(lora_alpha)
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def lora_forward(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                 dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """The adapter's contribution scaling * B(A(dropout(x))).

    Args:
        x: (..., in_features), already in the adapter's dtype.
        lora_A: (r, in_features).  lora_B: (out_features, r).  Same dtype as x.
        scaling: see ``lora_scaling``.
        dropout: probability of zeroing an input element when ``training`` (inverted dropout: kept elements
            are multiplied by 1 / (1 - dropout)); identity when not training.

    Returns:
        (..., out_features) in x's dtype. The order of operations (dropout, A, B, then * scaling) is PEFT's, so
        results are bitwise equal to ``peft.tuners.lora.Linear`` for the same inputs and RNG state.
    """
    if dropout > 0.0:
        x = F.dropout(x, p=dropout, training=training)
    return lora_up(F.linear(x, lora_A), lora_B, scaling)


def _exact_scale(scaling: float) -> bool:
    """A power of two >= 1: multiplying by it is exact in floating point (barring overflow)."""
    return scaling >= 1.0 and math.frexp(scaling)[0] == 0.5


def lora_up(mid: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """scaling * B(mid): (..., r) -> (..., out_features), bitwise PEFT's ``lora_B(...) * scaling``.

    PEFT multiplies the (..., out_features) output. When scaling is a power of two >= 1 (alpha = 2r, PEFT's
    and this project's default ratio, gives 2) the rank-r input is multiplied instead: every product and
    partial sum of the matmul (and of its backward) is then scaled by 2^k exactly, so each rounds to the same
    value times 2^k and the result is bitwise the same, for r / out_features of the elementwise work (and of
    its backward). Other scalings keep PEFT's order.
    """
    if scaling == 1.0:
        return F.linear(mid, lora_B)
    if _exact_scale(scaling):
        return F.linear(mid * scaling, lora_B)
    return F.linear(mid, lora_B) * scaling


class _AddInDtype(torch.autograd.Function):
    """(result + update).to(dtype) as one kernel: added in the promoted dtype, rounded once on the store."""

    @staticmethod
    def forward(ctx, result, update, dtype):
        ctx.dtypes = (result.dtype, update.dtype)
        out = torch.empty(torch.broadcast_shapes(result.shape, update.shape), dtype=dtype, device=result.device)
        return torch.add(result, update, out=out)

    @staticmethod
    def backward(ctx, grad):
        # As autograd through ``(result + update).to(dtype)``: the cast's backward casts grad to the promoted
        # dtype, the sum passes it to both, each then cast to its input's dtype (exact round trips).
        return grad.to(ctx.dtypes[0]), grad.to(ctx.dtypes[1]), None


def add_update(result: torch.Tensor, update: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(result + update).to(dtype), bitwise, as PEFT's ``lora.Linear.forward`` adds an fp32 update to a 16-bit
    base output and casts back, but in one pass instead of three (the fp32 sum is neither written nor read)."""
    if result.dtype == update.dtype == dtype or result.shape != update.shape:
        return (result + update).to(dtype)
    return _AddInDtype.apply(result, update, dtype)


def lora_delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """dW = scaling * B @ A in fp32 (Hu et al. 2021, 4.2), shape (out_features, in_features).

    fp32 whatever the adapter dtype, so that a merge into a 16-bit W rounds only once (see ``merged_weight``).
    """
    return (lora_B.float() @ lora_A.float()) * scaling  # (out, r) @ (r, in) -> (out, in)


def merged_weight(weight: torch.Tensor, deltas: list[torch.Tensor], sign: int = 1) -> torch.Tensor:
    """W +/- sum(deltas), accumulated in fp32 and rounded once to W's dtype. Returns a new tensor.

    The deltas are added one after the other (not summed first) so that, in fp32, the result is bitwise what
    PEFT's merge (``weight.data += delta`` per adapter) gives.
    """
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 (merge) or -1 (unmerge), got {sign}")
    acc = weight.detach().float()  # (out, in) fp32; the same tensor as W when W is fp32, so never in place
    for delta in deltas:
        acc = acc + delta if sign == 1 else acc - delta
    if not deltas:
        acc = acc.clone()  # always return a new tensor
    return acc.to(weight.dtype)


@torch.no_grad()
def init_lora_weights_(lora_A: torch.Tensor, lora_B: torch.Tensor, init_lora_weights: bool | str, r: int) -> None:
    """Initialise A and B in place, as PEFT's ``LoraLayer.reset_lora_parameters``.

    True: A kaiming-uniform(a=sqrt(5)) (nn.Linear's default; Hu et al. use a random Gaussian, the reference
    implementation microsoft/LoRA loralib/layers.py uses this), B = 0. "gaussian": A ~ N(0, std=1/r), B = 0.
    False: A and B both kaiming-uniform(a=sqrt(5)), so the adapter is NOT a no-op (useful in tests).
    """
    if init_lora_weights is True or init_lora_weights is False:
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
    elif init_lora_weights == "gaussian":
        nn.init.normal_(lora_A, std=1.0 / r)
    else:
        raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}")
    if init_lora_weights is False:
        nn.init.kaiming_uniform_(lora_B, a=math.sqrt(5))
    else:
        nn.init.zeros_(lora_B)
