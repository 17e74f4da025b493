"""RMSNorm (Zhang & Sennrich 2019) as Llama uses it, with an option to save only its input for backward.

Autograd on ``rms_norm`` saves, per token row: the fp32 copy of the input (pow and mul need it; in an fp32 model
the input itself), 1/rms, and, when the weight trains, the normalised input in the model dtype (weight * y
needs y for the weight's gradient). With ``recompute`` (selective recomputation, Korthikanti et al. 2022,
section 5; models/recompute.py) the fp32 copy and the normalised input are made again in backward from the
input (kept in its own dtype: 2 bytes an element instead of 4 + 2 in bf16) and 1/rms (N floats, saved anyway),
by the same ops on the same values: gradients are bitwise those without it.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .recompute import recompute_saved


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, recompute: bool = False) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight, normalised in fp32 and cast back before the weight (as HF does:
    transformers models/llama/modeling_llama.py ``LlamaRMSNorm``). ``recompute``: see the module docstring."""
    if recompute and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _rms_norm_saving_input(x, weight, eps)
    input_dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(input_dtype)


def _rms_norm_saving_input(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``rms_norm``'s ops, with the fp32 copy of ``x`` and the normalised ``y`` stored as recipes."""
    input_dtype, kept = x.dtype, x.detach()
    x = x.float()  # x itself when it is fp32: then it is the kept input, nothing to recompute
    as_copy = recompute_saved(x, lambda: kept.float()) if x.dtype != input_dtype else contextlib.nullcontext()
    with as_copy:
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        y = (x * rstd).to(input_dtype)
    rstd_kept = rstd.detach()
    with recompute_saved(y, lambda: (kept.float() * rstd_kept).to(input_dtype)):
        return weight * y


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019); weight initialised to ones."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, recompute: bool = False) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, recompute)
