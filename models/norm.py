"""RMSNorm (Zhang & Sennrich 2019) as Llama uses it, with an option to save only its input for backward.

Autograd on ``rms_norm`` saves, per token row: the fp32 copy of the input (pow and mul need it; in an fp32 model
the input itself), 1/rms, and, when the weight trains, the normalised input in the model dtype (weight * y
needs y for the weight's gradient). With ``recompute`` (selective recomputation, Korthikanti et al. 2022,
section 5; models/recompute.py) the fp32 copy and the normalised input are made again in backward from the
input (kept in its own dtype: 2 bytes an element instead of 4 + 2 in bf16) and 1/rms (N floats, saved anyway),
by the same ops on the same values: gradients are bitwise those without it. The fp32 copy is made once in
backward and feeds y, the norm's output remade for its consumers (``RMSNorm.forward_recomputable``, from y and
the weight: no second pass over x^2 and its mean), and the input's gradient.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from .recompute import recompute_saved, shared_recipe


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, recompute: bool = False) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight, normalised in fp32 and cast back before the weight (as HF does:
    transformers models/llama/modeling_llama.py ``LlamaRMSNorm``). ``recompute``: see the module docstring."""
    if recompute and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _rms_norm_saving_input(x, weight, eps)[0]
    input_dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(input_dtype)


def _rms_norm_saving_input(x: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, Callable[[], torch.Tensor]]:
    """``rms_norm``'s ops, with the fp32 copy of ``x`` and the normalised ``y`` stored as recipes; returns the
    output and a recipe that makes it again (for its consumers' backward) from the kept input and 1/rms. In
    backward the consumers come first, then the norm's weight gradient (which takes y), then its input gradient
    (which takes the fp32 copy): y and the fp32 copy are made once and handed on (``shared_recipe``)."""
    input_dtype, kept, weight_kept = x.dtype, x.detach(), weight.detach()
    x = x.float()  # x itself when it is fp32: then it is the kept input, nothing to recompute
    copied = x.dtype != input_dtype
    # takers of the fp32 copy: the normalised input's recipe, and the saved copy's (pow and mul save it) if x trains
    fp32 = shared_recipe(lambda: kept.float(), 2 if copied and x.requires_grad else 0)
    as_copy = recompute_saved(x, fp32) if copied else contextlib.nullcontext()
    with as_copy:
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        y = (x * rstd).to(input_dtype)
    rstd_kept = rstd.detach()
    # takers of y: the output's recipe, and the saved y's (the weight's gradient needs it) if the weight trains
    normalised = shared_recipe(lambda: (fp32() * rstd_kept).to(input_dtype), 2 if weight.requires_grad else 0)
    with recompute_saved(y, normalised):
        out = weight * y
    return out, lambda: weight_kept * normalised()  # the forward's ops on the same values: bitwise its output


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019); weight initialised to ones."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, recompute: bool = False) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, recompute)

    def forward_recomputable(self, x: torch.Tensor) -> tuple[torch.Tensor, Callable[[], torch.Tensor]]:
        """The output with selective recomputation (grad enabled, x requiring grad), and a recipe that makes it
        again in backward from what the norm keeps anyway (models/llama.py ``DecoderLayer``)."""
        return _rms_norm_saving_input(x, self.weight, self.eps)
