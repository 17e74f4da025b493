"""The chunked cross-entropy (models/loss.py) against the plain loss on materialised logits.

Tolerances: the loss is a sum in chunks instead of one sum (fp32: 1e-6 relative); d(loss)/dh is computed row by
row as autograd does (fp32: 1e-6 relative, bf16: bitwise on these shapes is not promised, 1 bf16 ulp = 2^-8);
d(loss)/dW sums over chunks in fp32 where the plain path sums in one matmul in the model dtype (fp32: 1e-5
relative; bf16: 2^-7 relative, the plain path's own rounding), or, for a 16-bit head and few enough tokens
(``keeps_gradients``), is the plain path's one matmul over the kept gradient of the logits (bf16: the same 2^-7,
the gradients of the logits being computed in chunks).
"""

import contextlib

import pytest
import torch

from finetune_ref.models.config import LlamaConfig
from finetune_ref.models.llama import LlamaForCausalLM
from finetune_ref.models.loss import causal_lm_loss, chunked_causal_lm_loss, keeps_gradients

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = {torch.float32: dict(loss=1e-6, dh=1e-6, dw=1e-5), torch.bfloat16: dict(loss=1e-3, dh=2 ** -8, dw=2 ** -7)}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_loss_and_gradients_match_the_plain_loss(dtype, chunk):
    torch.manual_seed(0)
    B, T, H, V = 3, 21, 32, 300
    h = torch.randn(B, T, H, dtype=dtype)
    w = (torch.randn(V, H) * 0.2).to(dtype)
    labels = torch.randint(0, V, (B, T))
    labels[0, 3:9] = -100  # ignored tokens, and a row whose shifted labels are partly ignored
    results = []
    for chunked in (False, True):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        if chunked:
            loss = chunked_causal_lm_loss(hh, ww, labels, chunk_tokens=chunk)
        else:
            loss = causal_lm_loss(hh @ ww.t(), labels)
        (loss * 0.5).backward()  # a grad_out other than 1 exercises the scaling in backward
        results.append((loss.detach(), hh.grad, ww.grad))
    (l0, dh0, dw0), (l1, dh1, dw1) = results
    assert l1.dtype == torch.float32 and dh1.dtype == dtype and dw1.dtype == dtype
    tol = TOL[dtype]
    assert rel_err(l1, l0) <= tol["loss"]
    assert rel_err(dh1, dh0) <= tol["dh"]
    assert rel_err(dw1, dw0) <= tol["dw"]


def previous_chunked_loss(h, w, labels, chunk):
    """The chunked loss as first written: every chunk's logits, fp32 copy, log-softmax and gradient in new
    tensors, F.linear and ``@`` for the matmuls (returns loss, d(loss)/dh, d(loss)/dW summed in fp32 and
    d(loss)/dW from the chunks' gradients of the logits kept, one matmul in the model dtype)."""
    h = h[:, :-1].reshape(-1, h.shape[-1])  # (N, H)
    labels = labels[:, 1:].reshape(-1)  # (N,)
    num_items = (labels != -100).sum().clamp(min=1).float()
    scale = 1.0 / num_items
    total, grad_h, grad_w = torch.zeros(()), torch.empty_like(h), torch.zeros_like(w, dtype=torch.float32)
    kept = []
    for start in range(0, h.shape[0], chunk):
        h_c, lab = h[start:start + chunk], labels[start:start + chunk]
        log_probs = torch.log_softmax(torch.nn.functional.linear(h_c, w).float(), dim=-1)
        valid = lab != -100
        rows, cols = valid.nonzero().squeeze(1), lab[valid]
        total -= log_probs[rows, cols].sum()
        g = log_probs.exp_().mul_(scale)
        g[rows, cols] -= scale
        g[~valid] = 0.0
        g = g.to(h.dtype)
        grad_h[start:start + chunk] = g @ w.to(h.dtype)
        grad_w += (g.t() @ h_c).float()
        kept.append(g)
    return total / num_items, grad_h, grad_w, torch.cat(kept).t() @ h  # (V, N) @ (N, H)


@pytest.mark.parametrize("dtype,autocast", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)])
@pytest.mark.parametrize("chunk", [7, 64])
@pytest.mark.parametrize("T", [30, 80])  # bf16: 87 shifted tokens keep the logits' gradient, 237 do not (H = 32)
def test_reused_chunk_workspace_is_bitwise_the_previous_chunked_loss(dtype, autocast, chunk, T):
    """The (C, V) workspace reused across chunks (in-place log-softmax, matmuls into it) runs the same kernels
    in the same order as new tensors per chunk: loss and gradients bitwise equal (under bf16 autocast, where
    F.linear picks the logits' dtype, the per-chunk expressions themselves). A kept gradient of the logits gives
    d(loss)/dW as one matmul over the chunks' gradients, bitwise."""
    torch.manual_seed(2)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    B, H, V = 3, 32, 300
    kept = dtype == torch.bfloat16
    assert keeps_gradients(B * (T - 1), H, 2, chunk) == (T == 30) and not keeps_gradients(B * (T - 1), H, 4, chunk)
    h = torch.randn(B, T, H, dtype=dtype)
    w = (torch.randn(V, H) * 0.2).to(dtype)
    labels = torch.randint(0, V, (B, T))
    labels[1, 4:20] = -100  # whole ignored rows inside a chunk
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    with context:
        loss = chunked_causal_lm_loss(hh, ww, labels, chunk_tokens=chunk)
        ref_loss, ref_dh, ref_dw, ref_kept_dw = previous_chunked_loss(h, w, labels, chunk)
    loss.backward()
    assert torch.equal(loss.detach(), ref_loss)
    assert torch.equal(hh.grad.view(B, T, H)[:, :-1].reshape(-1, H), ref_dh)
    assert torch.equal(ww.grad, ref_kept_dw if kept and T == 30 else ref_dw.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_chunk_writes_its_weight_gradient_into_the_same_tensors(dtype):
    """A trained head's per-chunk (V, H) product (and its fp32 copy) goes into tensors made once per call, not new
    ones per chunk: at SmolLM2's size each new one was fresh pages from the kernel (bitwise: the test above)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    V, H = 300, 32

    class NewVHTensors(TorchDispatchMode):  # counts the (V, H) tensors ops make (not in place, not views)
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = [a for a in args if isinstance(a, torch.Tensor)]
            if (isinstance(out, torch.Tensor) and tuple(out.shape) == (V, H) and not func._schema.is_mutable
                    and all(out.untyped_storage().data_ptr() != a.untyped_storage().data_ptr() for a in inputs)):
                NewVHTensors.count += 1
            return out

    made = {}
    for T, chunk in ((150, 149), (150, 8), (20, 38), (20, 8)):  # 298 shifted tokens: 2 chunks, then 38; 38: 1, 5
        h = torch.randn(2, T, H, dtype=dtype, requires_grad=True)
        w = (torch.randn(V, H) * 0.2).to(dtype).requires_grad_()
        NewVHTensors.count = 0
        with NewVHTensors():
            chunked_causal_lm_loss(h, w, torch.randint(0, V, (2, T)), chunk_tokens=chunk)
        made[T, chunk] = NewVHTensors.count
    assert not keeps_gradients(298, H, 2, 149) and keeps_gradients(38, H, 2, 8)
    assert made[150, 8] == made[150, 149] <= 3, made  # fp32 dW; the product; its fp32 copy (16-bit weights)
    if dtype == torch.bfloat16:  # the gradient of the logits kept: one (V, H) matmul at the end, nothing per chunk
        assert made[20, 8] == made[20, 38] == 1, made


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_kept_gradient_is_kept_only_where_it_is_no_more_memory(dtype):
    """The loss's own peak (forward, where the chunked path does its backward work) with the gradient of the
    logits kept is at most the fp32 sum's at the break-even token count (N = 8 H / e + C), and above it the sum
    is the smaller, so ``keeps_gradients`` picks the smaller of the two ways on each side of the line."""
    from unittest import mock

    from finetune_ref.models import loss as loss_module
    from finetune_ref.train.memory_tracker import TensorMemoryTracker

    H, V, chunk = 32, 3000, 16
    line = 8 * H // 2 + chunk  # 144 tokens

    def peak(tokens, keep):
        h = torch.randn(1, tokens + 1, H, dtype=dtype, requires_grad=True)  # tokens + 1 positions: tokens shifted
        w = (torch.randn(V, H) * 0.2).to(dtype).requires_grad_()
        labels = torch.randint(0, V, (1, tokens + 1))
        with mock.patch.object(loss_module, "keeps_gradients", lambda *a: keep), TensorMemoryTracker() as tracker:
            tracker.track(h, w, labels)
            chunked_causal_lm_loss(h, w, labels, chunk_tokens=chunk)
        return tracker.peak

    assert keeps_gradients(line, H, 2, chunk) and not keeps_gradients(line + 1, H, 2, chunk)
    assert peak(line, True) <= peak(line, False)
    assert peak(line + 8, True) > peak(line + 8, False)


def test_an_incoming_gradient_other_than_1_scales_in_fp32():
    """loss * c: d(loss)/dh and a kept d(loss)/dW are the unit gradients times the fp32 c, rounded once (c was
    rounded to bf16 first for d/dh: with c = 0.3, d/dh came out 0.26% too large on average)."""
    torch.manual_seed(3)
    B, T, H, V = 2, 20, 32, 300
    h, w = torch.randn(B, T, H, dtype=torch.bfloat16), (torch.randn(V, H) * 0.2).to(torch.bfloat16)
    labels = torch.randint(0, V, (B, T))
    grads = []
    for c in (1.0, 0.3):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        (chunked_causal_lm_loss(hh, ww, labels, chunk_tokens=7) * c).backward()
        grads.append((hh.grad, ww.grad))
    (dh1, dw1), (dh3, dw3) = grads
    c = torch.tensor(0.3)  # the fp32 scalar the loss is multiplied by
    assert keeps_gradients(B * (T - 1), H, 2, 7)
    assert torch.equal(dh3, (dh1.float() * c).to(torch.bfloat16))
    assert torch.equal(dw3, (dw1.float() * c).to(torch.bfloat16))


def test_num_items_and_no_grad():
    torch.manual_seed(1)
    h, w = torch.randn(2, 9, 16), torch.randn(50, 16)
    labels = torch.randint(0, 50, (2, 9))
    plain = causal_lm_loss(h @ w.t(), labels, num_items_in_batch=40)
    with torch.no_grad():  # evaluation: no gradient work or buffers
        chunked = chunked_causal_lm_loss(h, w, labels, num_items_in_batch=40, chunk_tokens=5)
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=0)
    all_ignored = torch.full_like(labels, -100)
    assert float(chunked_causal_lm_loss(h, w, all_ignored)) == 0.0  # 0, not NaN, as the plain loss
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_causal_lm_loss(h, w, labels, chunk_tokens=0)


@pytest.mark.parametrize("tied", [True, False])
def test_model_with_chunked_loss_trains_as_the_plain_model(tied):
    """The model's chunked_loss switch: same loss and parameter gradients, no logits returned."""
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 128, (2, 12))
    grads = []
    for chunked in (False, True):
        model.chunked_loss, model.loss_chunk_tokens = chunked, 5
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=ids)
        assert (out.logits is None) == chunked
        out.loss.backward()
        grads.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = grads
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7, msg=name)
    model.chunked_loss = True
    assert model(ids).logits is not None  # no labels: logits as always


def test_recipes_train_with_the_chunked_loss_by_default():
    import dataclasses

    from finetune_ref.recipes.lora import LoraRecipe

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    LoraRecipe().configure_model(model)
    assert model.chunked_loss and model.model.selective_recompute and not model.model.gradient_checkpointing
    LoraRecipe(chunked_loss=False, selective_recompute=False).configure_model(model)  # --no-chunked-loss etc.
    assert not model.chunked_loss and not model.model.selective_recompute
    assert dataclasses.replace(LoraRecipe(), grad_checkpointing=True).grad_checkpointing


def test_a_wrapped_head_falls_back_to_the_plain_loss():
    """A head that is not a plain linear (an adapter or modules_to_save wrapper on lm_head) keeps the logits."""
    from finetune_ref.lora import LoraConfig, inject_lora

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    inject_lora(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "lm_head"]))
    model.chunked_loss = True
    ids = torch.randint(0, 64, (2, 8))
    out = model(ids, labels=ids)
    assert out.logits is not None
    torch.testing.assert_close(out.loss, causal_lm_loss(out.logits, ids), rtol=0, atol=0)
