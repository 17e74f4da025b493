"""Next-token cross-entropy: the plain loss on materialised logits, and the same loss computed from the hidden
states in chunks of tokens, never holding the (B, T, vocab) logits or their fp32 copies.

The plain path (``causal_lm_loss``) is transformers' ``ForCausalLMLoss`` (``transformers/loss/loss_utils.py``):
logits (B, T, V) in the model dtype, an fp32 copy of the shifted ones, log-softmax saved for backward; in
backward an fp32 (N, V) gradient from nll_loss and one from log_softmax. For SmolLM2-135M (V = 49,152) at
4 x 256 tokens that is ~1 GB, more than the saved activations of all 30 layers of a LoRA step.

The chunked path (``chunked_causal_lm_loss``) is the fused linear cross-entropy of Liger-Kernel (Hsu et al.
2024, "Liger Kernel", section 3.3, ``liger_kernel/ops/fused_linear_cross_entropy.py``): for each chunk of C
tokens the logits h_c W^T are made, their log-softmax gives the loss, and at once the gradient
d(loss)/d(logits) = (softmax - onehot) / num_items, from which d(loss)/dh = g W and d(loss)/dW = g^T h are
accumulated. Backward only scales what the forward kept by the incoming gradient. No extra matmul; the extra
memory is a few (C, V) fp32 tensors, d(loss)/dh (N, H) and, when the head trains, an fp32 d(loss)/dW (V, H).

Exactness (tests/test_loss.py): the per-token gradient is autograd's formula for the plain loss (log_softmax's
backward of nll_loss's), but its exp and the matmuls run as separate kernels on chunks, so results differ in
the last bits: the loss (a sum in chunks) and d(loss)/dh within 1e-6 relative in fp32; d(loss)/dW (summed over
chunks in fp32, where the plain path sums all tokens in one matmul in the model dtype) within 1e-5 in fp32, and
for bf16 the chunked dW is the more accurate one (fp32 accumulation, one rounding at the end).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_TOKENS = 256  # (256, 49152) fp32 = 50 MB per temporary for SmolLM2; matmuls stay large enough


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor,
                   num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy in fp32. logits (B, T, V), labels (B, T) with -100 ignored.

    Sum over label tokens divided by ``num_items_in_batch`` if given, else by this batch's label-token count.
    """
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # (B*(T-1), V)
    shift_labels = labels[:, 1:].reshape(-1)  # (B*(T-1),)
    total = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
    if num_items_in_batch is None:
        num_items_in_batch = (shift_labels != -100).sum().clamp(min=1)
    return total / num_items_in_batch


class LinearCrossEntropy(torch.autograd.Function):
    """sum over tokens of -log softmax(h W^T)[label] / num_items, in chunks of tokens (see the module docstring).

    forward(h (N, H), weight (V, H), labels (N,) int64 with -100 ignored, num_items (fp32 scalar tensor),
    chunk (tokens), grad_enabled): returns the fp32 scalar loss.
    """

    @staticmethod
    def forward(ctx, h, weight, labels, num_items, chunk, grad_enabled):
        # Grad mode is always off inside forward: the caller says whether a backward will follow.
        need_h = grad_enabled and ctx.needs_input_grad[0]
        need_w = grad_enabled and ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        scale = 1.0 / num_items.float()  # d(loss)/d(nll sum), as autograd's DivBackward makes it
        for start in range(0, h.shape[0], chunk):
            h_c, lab = h[start:start + chunk], labels[start:start + chunk]  # (C, H), (C,)
            log_probs = torch.log_softmax(F.linear(h_c, weight).float(), dim=-1)  # (C, V) fp32
            valid = lab != -100
            rows, cols = valid.nonzero().squeeze(1), lab[valid]
            total -= log_probs[rows, cols].sum()
            if need_h or need_w:
                # What autograd computes for causal_lm_loss, row by row: log_softmax's backward of nll_loss's
                # gradient (-scale at the label): g = exp(log_probs) * scale - onehot * scale, 0 on ignored rows.
                g = log_probs.exp_().mul_(scale)  # in place: log_probs is not needed any more
                g[rows, cols] -= scale
                g[~valid] = 0.0
                g = g.to(h.dtype)  # ToCopyBackward of the .float() in the plain path
                if need_h:
                    grad_h[start:start + chunk] = g @ weight.to(h.dtype)  # (C, V) @ (V, H)
                if need_w:
                    grad_w += (g.t() @ h_c).float()  # (V, C) @ (C, H)
                del g
            del log_probs  # before the next chunk's logits: one chunk's temporaries live at a time
        ctx.save_for_backward(*(t for t in (grad_h, grad_w) if t is not None))
        ctx.need = (need_h, need_w)
        ctx.weight_dtype = weight.dtype
        return total / num_items.float()

    @staticmethod
    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensors)
        unit = bool(grad_out == 1)  # the usual loss.backward(): hand over the gradients without a copy
        grad_h = grad_w = None
        if ctx.need[0]:
            grad_h = saved.pop(0)
            grad_h = grad_h if unit else grad_h * grad_out.to(grad_h.dtype)
        if ctx.need[1]:
            grad_w = saved.pop(0)
            grad_w = (grad_w if unit else grad_w * grad_out.float()).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None


def chunked_causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                           num_items_in_batch: int | torch.Tensor | None = None,
                           chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """``causal_lm_loss(F.linear(hidden, weight), labels, num_items_in_batch)`` without the logits.

    Args:
        hidden: (B, T, H) final hidden states (after the last RMSNorm).
        weight: (V, H) the output head's weight (``lm_head.weight``).
        labels: int64 (B, T), -100 where no loss is taken; shifted here (h at t predicts labels[t+1]).
        num_items_in_batch: the loss's denominator (see ``causal_lm_loss``).
        chunk_tokens: tokens per chunk; the (chunk, V) fp32 temporaries bound the extra memory.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B*(T-1), H)
    shift_labels = labels[:, 1:].reshape(-1)  # (B*(T-1),)
    if num_items_in_batch is None:
        num_items_in_batch = (shift_labels != -100).sum().clamp(min=1)
    num_items = torch.as_tensor(num_items_in_batch, device=h.device)
    return LinearCrossEntropy.apply(h, weight, shift_labels, num_items, chunk_tokens, torch.is_grad_enabled())
