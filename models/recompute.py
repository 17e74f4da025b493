"""Selective activation recomputation (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models", section 5): instead of storing the outputs of cheap elementwise ops for backward,
recompute them there from tensors that are stored anyway.

Two tensors of a decoder layer qualify (models/llama.py ``DecoderLayer``):

* the RMSNorm outputs that feed q/k/v and gate/up. Their consumers (the LoRA A matmuls, or the weight gradients
  of full fine-tuning) save them, N x H each; with recomputation RMSNorm saves only its input
  (models/norm.py: not its fp32 copy in a 16-bit model, nor the normalised input), and the output is
  recomputed from that.
* the SwiGLU product fed to down_proj, N x I, recomputed from gate and up, which ``SwiGLU`` saves anyway.

and, of both, the copy an adapter of another dtype casts for itself (fp32 LoRA on a bf16 base: one per adapter).

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

    __slots__ = ("source", "shape", "stride", "dtype")

    def __init__(self, source: "_Source", shape: torch.Size, stride: tuple[int, ...],
                 dtype: torch.dtype | None = None):
        self.source, self.shape, self.stride, self.dtype = source, shape, stride, dtype  # dtype: cast to it


class _Source:
    """The function that makes the tensor again, run once for all its consumers: the result (and any cast of it
    that consumers saved, made once per dtype) is kept from the first consumer's backward until the last one
    (of ``pending``) has taken it (q, k, v share one norm, and fp32 adapters on a bf16 base one cast of it)."""

    def __init__(self, fn: Callable[[], torch.Tensor]):
        self.fn, self.pending, self.results = fn, 0, {}

    def take(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        if None not in self.results:
            with torch.no_grad():
                self.results[None] = self.fn()
        if dtype not in self.results:
            self.results[dtype] = self.results[None].to(dtype)
        result = self.results[dtype]
        self.pending -= 1
        if self.pending <= 0:  # (below 0 only when a retained graph is run backward again)
            self.results = {}
        return result


def shared_recipe(fn: Callable[[], torch.Tensor], takers: int) -> Callable[[], torch.Tensor]:
    """A recipe for ``takers`` recipes of one block's backward (models/norm.py: the normalised input and its fp32
    copy feed both the norm's own gradients and its recomputed output): run once on the first call, its result
    kept until the last of ``takers`` calls, then dropped (a further call runs it again). ``takers`` 0: no
    caching."""
    source = _Source(fn)
    source.pending = takers
    return source.take


# Autograd nodes of views that keep a contiguous tensor's layout (a matmul saves its input's (B*T, H) reshape).
_VIEW_NODES = frozenset({"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "AliasBackward0"})


def _is_cast_of(t: torch.Tensor, node) -> bool:
    """Is ``t`` (or a view of it) ``x.to(dtype)`` of the tensor whose autograd node is ``node``? Read from t's
    own autograd graph: past view nodes, a ``ToCopyBackward0`` whose input is ``node``."""
    fn = t.grad_fn
    while fn is not None and fn.name() in _VIEW_NODES:
        fn = fn.next_functions[0][0]
    return fn is not None and fn.name() == "ToCopyBackward0" and fn.next_functions[0][0] is node


class recompute_saved(torch.autograd.graph.saved_tensors_hooks):
    """Within this context, whenever autograd saves ``target`` or a view of all of it (a matmul saves its
    (B*T, H) reshape), store a recipe instead and run it (under no_grad) in backward, taking the same view.
    A cast of all of ``target`` to another dtype (``target.to(dtype)``: an adapter whose dtype differs, e.g.
    fp32 LoRA weights on a bf16 base, lora/layer.py) is stored as the recipe followed by the same cast, which
    is exact (the cast is deterministic).

    ``fn`` must return ``target``'s values, contiguous, from tensors that backward keeps alive anyway.
    """

    def __init__(self, target: torch.Tensor, fn: Callable[[], torch.Tensor]):
        if not target.is_contiguous():
            raise ValueError("recompute_saved needs a contiguous target")
        key = (target.data_ptr(), target.numel(), target.dtype)
        node = target.grad_fn  # held here, so that ``is`` compares with the same Python object
        source = _Source(fn)

        def pack(t: torch.Tensor):
            if t.numel() != key[1] or not t.is_contiguous():
                return t
            if (t.data_ptr(), t.dtype) == (key[0], key[2]):
                source.pending += 1
                return _Recompute(source, t.shape, t.stride())
            if node is not None and t.dtype != key[2] and _is_cast_of(t, node):
                source.pending += 1
                return _Recompute(source, t.shape, t.stride(), t.dtype)
            return t

        def unpack(saved):
            if isinstance(saved, _Recompute):
                return saved.source.take(saved.dtype).as_strided(saved.shape, saved.stride)
            return saved

        super().__init__(pack, unpack)
