"""The memory-saving paths of models/llama.py against the plain computation they replace.

* attention with SDPA's ``enable_gqa`` against k and v repeated to all heads: the output bitwise (the same
  products in the same order); dq, dk, dv within 1e-6 relative in fp32 (dk, dv are summed over each group of
  query heads inside the kernel instead of by the repeat's backward: another summation order);
* ``SwiGLU`` (saves gate and up only) against ``F.silu(gate) * up`` under autograd: bitwise, fp32 and bf16.
"""

import pytest
import torch
import torch.nn.functional as F

from finetune_ref.models import llama
from finetune_ref.models.config import LlamaConfig
from finetune_ref.models.llama import LlamaForCausalLM, SwiGLU, repeat_kv

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                     num_attention_heads=6, num_key_value_heads=2)


@pytest.mark.skipif(not llama.SDPA_ENABLE_GQA, reason="this torch has no SDPA enable_gqa")
@pytest.mark.parametrize("masked", [False, True])
def test_enable_gqa_attention_matches_repeated_kv(monkeypatch, masked):
    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG)
    ids = torch.randint(0, 96, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0  # left padding: the boolean-mask path of SDPA
    kwargs = {"attention_mask": mask} if masked else {}
    results = []
    for gqa in (True, False):
        monkeypatch.setattr(llama, "SDPA_ENABLE_GQA", gqa)
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=ids, **kwargs)
        out.loss.backward()
        results.append((out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (logits_gqa, grads_gqa), (logits_rep, grads_rep) = results
    assert torch.equal(logits_gqa, logits_rep)
    for name, g in grads_rep.items():
        torch.testing.assert_close(grads_gqa[name], g, rtol=1e-6, atol=1e-7, msg=name)


def test_repeat_kv_layout():
    x = torch.arange(2 * 3 * 4 * 5.0).view(2, 3, 4, 5)  # (B, kv, T, d)
    rep = repeat_kv(x, 2)  # head j serves query heads 2j, 2j + 1
    assert rep.shape == (2, 6, 4, 5)
    assert torch.equal(rep[:, 2], x[:, 1]) and torch.equal(rep[:, 3], x[:, 1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_function_is_bitwise_autograd(dtype):
    torch.manual_seed(0)
    gate, up = torch.randn(7, 33, dtype=dtype), torch.randn(7, 33, dtype=dtype)
    grad = torch.randn(7, 33, dtype=dtype)
    a = [gate.clone().requires_grad_(), up.clone().requires_grad_()]
    b = [gate.clone().requires_grad_(), up.clone().requires_grad_()]
    out_a = SwiGLU.apply(*a)
    out_b = F.silu(b[0]) * b[1]
    out_a.backward(grad)
    out_b.backward(grad)
    assert torch.equal(out_a, out_b)
    assert torch.equal(a[0].grad, b[0].grad) and torch.equal(a[1].grad, b[1].grad)
    frozen_up = up.clone()  # only gate needs a gradient (frozen weights above it): no dup work, same dgate
    g = gate.clone().requires_grad_()
    SwiGLU.apply(g, frozen_up).backward(grad)
    assert torch.equal(g.grad, b[0].grad)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_selective_recompute_is_bitwise_and_saves_memory(method):
    """Recomputed RMSNorm outputs and SwiGLU products: the same gradients bit for bit, fewer saved bytes."""
    from finetune_ref.lora import LoraConfig, inject_lora
    from finetune_ref.train.memory_tracker import TensorMemoryTracker

    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG)
    if method == "lora":
        inject_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p)  # B = 0 would hide gradients flowing through the adapters
    ids = torch.randint(0, 96, (2, 16))
    grads, peaks = [], []
    for recompute in (False, True):
        model.model.selective_recompute = recompute
        model.zero_grad(set_to_none=True)
        with TensorMemoryTracker() as tracker:
            tracker.track(model, ids)
            loss = model(ids, labels=ids).loss
            saved_at_loss = tracker.current
            loss.backward()
        peaks.append(saved_at_loss)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name
    # per layer: two norm outputs (N x H) and the product (N x I) are no longer held
    n = 2 * 16
    saved = CONFIG.num_hidden_layers * n * (2 * CONFIG.hidden_size + CONFIG.intermediate_size) * 4
    assert peaks[0] - peaks[1] >= saved - n * CONFIG.hidden_size * 4  # the first layer's input needs no grad in LoRA


def test_recompute_saved_runs_once_for_all_consumers():
    from finetune_ref.models.recompute import recompute_saved

    torch.manual_seed(0)
    a = torch.randn(4, 6, requires_grad=True)
    w1, w2 = torch.randn(5, 6, requires_grad=True), torch.randn(3, 6, requires_grad=True)
    calls = []

    def remake():
        calls.append(1)
        return a.detach() * 2

    grads = []
    for recompute in (False, True):
        x = a * 2  # the tensor both matmuls save for their weight gradients
        if recompute:
            with recompute_saved(x, remake):
                y = F.linear(x, w1).sum() + F.linear(x, w2).square().sum()
        else:
            y = F.linear(x, w1).sum() + F.linear(x, w2).square().sum()
        grads.append(torch.autograd.grad(y, (a, w1, w2)))
    assert len(calls) == 1  # one recomputation shared by the two consumers
    for g0, g1 in zip(*grads):
        assert torch.equal(g0, g1)


@pytest.mark.skipif(not (__import__("shutil").which("g++") or __import__("shutil").which("c++")),
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_layers_train_as_eager_and_keep_names():
    """--compile (RunConfig.configure_model): each decoder layer compiled in place; ~30 s of compilation."""
    from finetune_ref.recipes.full import FullRecipe

    torch.manual_seed(0)
    eager = LlamaForCausalLM(CONFIG)
    compiled = LlamaForCausalLM(CONFIG)
    compiled.load_state_dict(eager.state_dict())
    FullRecipe(compile=True).configure_model(compiled)
    FullRecipe().configure_model(eager)
    ids = torch.randint(0, 96, (2, 16))
    losses = []
    for model in (eager, compiled):
        loss = model(ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)
    for (name, p), (name_c, q) in zip(eager.named_parameters(), compiled.named_parameters()):
        assert name == name_c  # files and adapters keep Hugging Face's names
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)
