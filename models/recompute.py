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
cost is the elementwise ops run again once in backward (consumers of one tensor, e.g. the q, k and v
adapters, share the recomputed result, held from the first one's backward to the last one's).
"""

from __future__ import annotations

from typing import Callable

import torch


class _Recompute:
    """What is stored instead of a saved tensor: the shared recipe, and the view of its result to take."""

    __slots__ = ("source", "shape", "stride")

    def __init__(self, source: "_Source", shape: torch.Size, stride: tuple[int, ...]):
        self.source, self.shape, self.stride = source, shape, stride


class _Source:
    """The function that makes the tensor again, run once for all its consumers: the result is kept from the
    first consumer's backward until the last one (of ``pending``) has taken it (q, k, v share one norm)."""

    def __init__(self, fn: Callable[[], torch.Tensor]):
        self.fn, self.pending, self.result = fn, 0, None

    def take(self) -> torch.Tensor:
        result = self.result
        if result is None:
            with torch.no_grad():
                result = self.fn()
        self.pending -= 1
        self.result = result if self.pending > 0 else None
        return result


class recompute_saved(torch.autograd.graph.saved_tensors_hooks):
    """Within this context, whenever autograd saves ``target`` or a view of all of it (a matmul saves its
    (B*T, H) reshape), store a recipe instead and run it (under no_grad) in backward, taking the same view.

    ``fn`` must return ``target``'s values, contiguous, from tensors that backward keeps alive anyway.
    """

    def __init__(self, target: torch.Tensor, fn: Callable[[], torch.Tensor]):
        if not target.is_contiguous():
            raise ValueError("recompute_saved needs a contiguous target")
        key = (target.data_ptr(), target.numel(), target.dtype)
        source = _Source(fn)

        def pack(t: torch.Tensor):
            if (t.data_ptr(), t.numel(), t.dtype) == key and t.is_contiguous():
                source.pending += 1
                return _Recompute(source, t.shape, t.stride())
            return t

        def unpack(saved):
            if isinstance(saved, _Recompute):
                return saved.source.take().as_strided(saved.shape, saved.stride)
            return saved

        super().__init__(pack, unpack)
