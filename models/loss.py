"""Next-token cross-entropy: the plain loss on materialised logits, and the same loss computed from the hidden
states in chunks of tokens, never holding the (B, T, vocab) logits or their fp32 copies.

The plain path (``causal_lm_loss``) is transformers' ``ForCausalLMLoss`` (``transformers/loss/loss_utils.py``):
logits (B, T, V) in the model dtype, an fp32 copy of the shifted ones, log-softmax saved for backward; in
backward an fp32 (N, V) gradient from nll_loss and one from log_softmax. For SmolLM2-135M (V = 49,152) at
4 x 256 tokens that is ~1 GB, more than the saved activations of all 30 layers of a LoRA step.

The chunked path (``chunked_causal_lm_loss``) is the fused linear cross-entropy of Liger-Kernel (Hsu et al.
2024, "Liger Kernel", section 3.3, ``liger_kernel/ops/fused_linear_cross_entropy.py``): for each chunk of C
tokens the logits h_c W^T are made, their log-softmax gives the loss, and at once the gradient
d(loss)/d(logits) = (softmax - onehot) / num_items, from which d(loss)/dh = g W is computed. Backward only
scales what the forward kept by the incoming gradient. No extra matmul; the extra memory is one (C, V)
workspace that every chunk reuses (``_Workspace``: fp32 log-softmax, and the logits in a 16-bit model dtype) and
d(loss)/dh (N, H). When the head trains, d(loss)/dW = g^T h is made in one of two ways (``keeps_gradients``):
- 16-bit weights and N <= 8 H / e + C tokens (e bytes per element; 4 H + C for bf16): every chunk's g,
  rounded to the model dtype as the plain path rounds it, is kept in an (N, V) tensor (the chunks' logits are
  made in its rows) and dW is one matmul over all tokens at the end, as the plain path computes it (one
  rounding). The kept g and that dW are then no more memory than the other way's three (V, H) tensors and its
  (C, V) logits, and it saves their passes: at 4 x 256 tokens of SmolLM2, 157 MB against 308 MB, and ~2 GB of
  memory traffic a step.
- otherwise dW is summed over chunks in fp32: each chunk's (V, H) product (in the model dtype and, for 16-bit,
  its fp32 copy) goes into tensors that every chunk reuses, and is added to an fp32 (V, H) sum.

Exactness (tests/test_loss.py): the per-token gradient is autograd's formula for the plain loss (log_softmax's
backward of nll_loss's), but its exp and the matmuls run as separate kernels on chunks, so results differ in
the last bits: the loss (a sum in chunks) and d(loss)/dh within 1e-6 relative in fp32; d(loss)/dW summed over
chunks in fp32 within 1e-5 in fp32 (the plain path sums all tokens in one matmul); the kept-gradient dW is the
plain path's single matmul over the same rounded g (whose matmul also runs over a zero row per sequence, its
last position's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_TOKENS = 256  # (256, 49152) fp32 = 50 MB per temporary for SmolLM2; matmuls stay large enough


def keeps_gradients(tokens: int, hidden_size: int, element_size: int, chunk: int) -> bool:
    """Whether a trained head's d(loss)/dW is one matmul over the kept (N, V) gradient of the logits rather than
    a sum over chunks in fp32: for 16-bit weights when that is no more memory, (N + H) e <= (4 + e + 4) H + C e
    (the kept gradient and dW, against the fp32 sum, the chunk's product and its fp32 copy, each (V, H), and
    the (C, V) logits). ``chunk``: C, the tokens of the first chunk. The memory estimate (train/memory.py)
    asks the same."""
    return element_size < 4 and tokens * element_size <= 8 * hidden_size + chunk * element_size


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
        scale = 1.0 / num_items.float()  # d(loss)/d(nll sum), as autograd's DivBackward makes it
        work = _Workspace(h, weight, min(chunk, h.shape[0]), need_w)
        sum_w = need_w and work.kept is None  # dW summed over chunks in fp32, else one matmul over work.kept
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if sum_w else None
        for start in range(0, h.shape[0], chunk):
            h_c, lab = h[start:start + chunk], labels[start:start + chunk]  # (C, H), (C,)
            log_probs = work.log_probs(h_c, weight, start)  # (C, V) fp32
            valid = lab != -100
            rows, cols = valid.nonzero().squeeze(1), lab[valid]
            total -= log_probs[rows, cols].sum()
            if need_h or need_w:
                # What autograd computes for causal_lm_loss, row by row: log_softmax's backward of nll_loss's
                # gradient (-scale at the label): g = exp(log_probs) * scale - onehot * scale, 0 on ignored rows.
                g = log_probs.exp_().mul_(scale)  # in place: log_probs is not needed any more
                g[rows, cols] -= scale
                if rows.shape[0] < lab.shape[0]:
                    g.index_fill_(0, (~valid).nonzero().squeeze(1), 0.0)  # ignored rows (masked_fill's values)
                g = work.to_model_dtype(g, start)  # ToCopyBackward of the .float() in the plain path
                if need_h:
                    work.input_grad(g, weight, grad_h[start:start + chunk])  # (C, V) @ (V, H)
                if sum_w:
                    grad_w += work.weight_grad(g, h_c)  # (V, C) @ (C, H), summed in fp32
                del g
            del log_probs
        if need_w and not sum_w:
            grad_w = torch.mm(work.kept.t(), h)  # (V, N) @ (N, H): the plain path's dW, in the model dtype
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
            # the fp32 scalar is not rounded to grad_h's dtype first (a CPU scalar is read in fp32 by the kernel)
            grad_h = grad_h if unit else grad_h * grad_out.float()
        if ctx.need[1]:
            grad_w = saved.pop(0)
            grad_w = (grad_w if unit else grad_w * grad_out.float()).to(ctx.weight_dtype)  # a kept dW has it already
        return grad_h, grad_w, None, None, None, None


class _Workspace:
    """The (C, V) tensors of one loss call, reused by every chunk: the logits in the model dtype and their fp32
    log-softmax (one tensor when the model is fp32), and the gradient cast back to the model dtype (in the
    logits' place). When a trained head's gradient is kept (``keeps_gradients``), the logits in the model
    dtype and then the chunk's rounded gradient are written into the chunk's rows of the kept (N, V) tensor
    instead. A fresh tensor this large (50 MB at C = 256, V = 49,152) is a fresh ``mmap`` on Linux
    (glibc serves blocks over 32 MB from the kernel), and the kernel zeroing its pages on first touch costs
    more than the arithmetic on them: on one loaded core, fp32 log_softmax of (256, 49152) into a new tensor
    took ~9x as long as into a reused one (benchmarks/PROFILE_BF16_STEP.md). The kernels and their order are
    the ones the per-chunk tensors ran, so the values are bitwise the same (tests/test_loss.py)."""

    def __init__(self, h: torch.Tensor, weight: torch.Tensor, chunk: int, need_w: bool):
        # Under autocast (or a head in another dtype) F.linear decides the logits' dtype, and a tensor subclass
        # (a DTensor) its own kernels: those keep the per-chunk tensors of the plain expressions.
        self.plain = (torch.is_autocast_enabled(h.device.type) or weight.dtype != h.dtype
                      or any(type(t) not in (torch.Tensor, torch.nn.Parameter) for t in (h, weight)))
        self.dtype = h.dtype
        shape = (chunk, weight.shape[0])
        keep = need_w and not self.plain and keeps_gradients(h.shape[0], h.shape[1], h.element_size(), chunk)
        self.kept = torch.empty((h.shape[0], weight.shape[0]), dtype=h.dtype, device=h.device) if keep else None
        self.logits = None if self.plain or keep else torch.empty(shape, dtype=h.dtype, device=h.device)  # (C, V)
        fp32 = not self.plain and h.dtype == torch.float32
        self.fp32 = self.logits if fp32 else torch.empty(shape, dtype=torch.float32, device=h.device)  # (C, V)
        self.weight_grad_work: tuple[torch.Tensor, torch.Tensor] | None = None  # (V, H) each, when dW is needed

    def _rows(self, start: int, count: int) -> torch.Tensor:
        """The model-dtype (count, V) rows of the chunk at ``start``: the kept gradient's, else the workspace's."""
        return self.kept[start:start + count] if self.kept is not None else self.logits[:count]

    def log_probs(self, h_c: torch.Tensor, weight: torch.Tensor, start: int) -> torch.Tensor:
        """log_softmax(h_c W^T) in fp32, (C, V), in the workspace (h_c: the chunk at token ``start``)."""
        out = self.fp32[:h_c.shape[0]]
        if self.plain:
            logits = F.linear(h_c, weight)
        else:
            logits = torch.mm(h_c, weight.t(), out=self._rows(start, h_c.shape[0]))  # F.linear's kernel
        if logits is not out:
            out.copy_(logits)  # the .float() of the plain path
        return torch.log_softmax(out, dim=-1, out=out)  # in place: each row is read whole before it is written

    def to_model_dtype(self, g: torch.Tensor, start: int) -> torch.Tensor:
        """g (fp32, the workspace's) rounded to the model dtype (nearest even, as ``Tensor.to``), in the rows of
        the chunk at token ``start``."""
        if self.plain:
            return g.to(self.dtype)
        return g if self.logits is self.fp32 else self._rows(start, g.shape[0]).copy_(g)

    def weight_grad(self, g: torch.Tensor, h_c: torch.Tensor) -> torch.Tensor:
        """g^T h_c, (V, C) @ (C, H), in the model dtype, then in fp32: to be added to the fp32 d(loss)/dW. The
        product and its fp32 copy go into two (V, H) tensors reused by every chunk: a new pair per chunk was fresh
        pages each time (for SmolLM2, ~180,000 of the ~290,000 page faults of a bf16 full fine-tuning step). The
        fp32 copy is kept because adding the bf16 product into the fp32 sum directly (``add_``) makes an fp32
        temporary of its own. The same kernels on the same values: bitwise the per-chunk tensors."""
        if self.plain:
            return (g.t() @ h_c).float()  # autocast (if on) picks the matmul's dtype, as before
        if self.weight_grad_work is None:
            shape, device = (g.shape[1], h_c.shape[1]), h_c.device  # (V, H)
            product = torch.empty(shape, dtype=self.dtype, device=device)
            fp32 = product if self.dtype == torch.float32 else torch.empty(shape, dtype=torch.float32, device=device)
            self.weight_grad_work = (product, fp32)
        product, fp32 = self.weight_grad_work
        torch.mm(g.t(), h_c, out=product)  # the kernel of ``@``, into reused memory
        return fp32 if fp32 is product else fp32.copy_(product)  # the ``.float()``

    def input_grad(self, g: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
        """out = g @ W, (C, V) @ (V, H), written in place."""
        if self.plain:
            out.copy_(g @ weight.to(self.dtype))  # autocast (if on) picks the matmul's dtype, as before
        else:
            torch.mm(g, weight, out=out)


def chunked_causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                           num_items_in_batch: int | torch.Tensor | None = None,
                           chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """``causal_lm_loss(F.linear(hidden, weight), labels, num_items_in_batch)`` without the logits.

    Args:
        hidden: (B, T, H) final hidden states (after the last RMSNorm).
        weight: (V, H) the output head's weight (``lm_head.weight``).
        labels: int64 (B, T), -100 where no loss is taken; shifted here (h at t predicts labels[t+1]).
        num_items_in_batch: the loss's denominator (see ``causal_lm_loss``).
        chunk_tokens: tokens per chunk; the (chunk, V) workspace bounds the extra memory.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B*(T-1), H)
    shift_labels = labels[:, 1:].reshape(-1)  # (B*(T-1),)
    if num_items_in_batch is None:
        num_items_in_batch = (shift_labels != -100).sum().clamp(min=1)
    num_items = torch.as_tensor(num_items_in_batch, device=h.device)
    return LinearCrossEntropy.apply(h, weight, shift_labels, num_items, chunk_tokens, torch.is_grad_enabled())
