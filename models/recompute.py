"""Selective activation recomputation (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models", section 5): instead of storing the outputs of cheap elementwise ops for backward,
recompute them there from tensors that are stored anyway.

Two tensors of a decoder layer qualify (models/llama.py ``DecoderLayer``):

* the RMSNorm outputs that feed q/k/v and gate/up. Their consumers (the LoRA A matmuls, or the weight gradients
  of full fine-tuning) save them, N x H each; in an fp32 model RMSNorm already saves its input (``x.float()``
  is ``x``), so the output is recomputed from it for free. (In a 16-bit model RMSNorm saves an fp32 copy
  instead, and holding the 16-bit input would cost what it saves: there it is left alone.)
* the SwiGLU product fed to down_proj, N x I, recomputed from gate and up, which ``SwiGLU`` saves anyway.

How: ``torch.autograd.graph.saved_tensors_hooks`` sees every tensor autograd saves while a block runs; the
one tensor we name is replaced by a recipe, run again when backward unpacks it (in no-grad mode, by the same
ops on the same inputs, so bitwise the same values). Gradients are therefore bitwise those without it; the
cost is the elementwise ops run again per consumer in backward.
"""

from __future__ import annotations

from typing import Callable

import torch


class _Recompute:
    """What is stored instead of a saved tensor: the function that makes it again, and the view to take."""

    __slots__ = ("fn", "shape", "stride")

    def __init__(self, fn: Callable[[], torch.Tensor], shape: torch.Size, stride: tuple[int, ...]):
        self.fn, self.shape, self.stride = fn, shape, stride


class recompute_saved(torch.autograd.graph.saved_tensors_hooks):
    """Within this context, whenever autograd saves ``target`` or a view of all of it (a matmul saves its
    (B*T, H) reshape), store ``fn`` instead and call it (under no_grad) in backward, taking the same view.

    ``fn`` must return ``target``'s values, contiguous, from tensors that backward keeps alive anyway.
    """

    def __init__(self, target: torch.Tensor, fn: Callable[[], torch.Tensor]):
        if not target.is_contiguous():
            raise ValueError("recompute_saved needs a contiguous target")
        key = (target.data_ptr(), target.numel(), target.dtype)

        def pack(t: torch.Tensor):
            if (t.data_ptr(), t.numel(), t.dtype) == key and t.is_contiguous():
                return _Recompute(fn, t.shape, t.stride())
            return t

        def unpack(saved):
            if isinstance(saved, _Recompute):
                with torch.no_grad():
                    return saved.fn().as_strided(saved.shape, saved.stride)
            return saved

        super().__init__(pack, unpack)
