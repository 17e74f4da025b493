"""The memory-saving paths of models/llama.py against the plain computation they replace.

* attention with SDPA's ``enable_gqa`` against k and v repeated to all heads: the output bitwise (the same
  products in the same order); dq, dk, dv within 1e-6 relative in fp32 (dk, dv are summed over each group of
  query heads inside the kernel instead of by the repeat's backward: another summation order);
* ``SwiGLU`` (saves gate and up only) against ``F.silu(gate) * up`` under autograd: bitwise, fp32 and bf16;
* selective recomputation (models/recompute.py, models/norm.py) against storing: bitwise, fp32 and bf16.
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


def _saved_bytes_per_token(method: str, dtype: torch.dtype, first_layer: bool) -> int:
    """Bytes per token one decoder layer no longer holds with selective recomputation (models/norm.py,
    models/recompute.py): each norm's fp32 input copy becomes its input in its own dtype, the normalised input
    kept for the norm weight's gradient (full) goes, and every saved norm output and SwiGLU product goes: as
    the tensor itself (full, adapters of the model dtype) or as the fp32 adapters' casts of it (bf16 LoRA).
    A lower bound: more goes where each adapter casts its own copy."""
    H, I, e = CONFIG.hidden_size, CONFIG.intermediate_size, torch.finfo(dtype).bits // 8
    norm = 4 - e + (e if method == "full" else 0)  # per norm, per hidden element
    if method == "full" or e == 4:
        attn, mlp = norm * H + e * H, norm * H + e * H + e * I  # the norm output saved once, shared
    else:
        # at least one fp32 cast of each norm output (one per adapter, or one shared by the q/k/v and the
        # gate/up adapters) and of the product
        attn, mlp = norm * H + 4 * H, norm * H + 4 * H + 4 * I
    return mlp if first_layer and method == "lora" else attn + mlp  # LoRA: the first layer's input needs no grad


def _final_norm_saved_bytes_per_token(method: str, dtype: torch.dtype) -> int:
    e = torch.finfo(dtype).bits // 8
    return CONFIG.hidden_size * (4 - e + (e if method == "full" else 0))


@pytest.mark.parametrize("method,dtype", [("full", torch.float32), ("lora", torch.float32),
                                          ("full", torch.bfloat16), ("lora", torch.bfloat16)])
def test_selective_recompute_is_bitwise_and_saves_memory(method, dtype):
    """Recomputed RMSNorm internals and outputs, SwiGLU products and fp32 adapters' casts of them: the same loss
    and gradients bit for bit, and at least the bytes counted in ``_saved_bytes_per_token`` fewer held."""
    from finetune_ref.lora import LoraConfig, inject_lora
    from finetune_ref.train.memory_tracker import TensorMemoryTracker

    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG).to(dtype)
    if method == "lora":  # fp32 adapters, as PEFT's default (on a bf16 base: each casts its input)
        inject_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), adapter_dtype=torch.float32)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p)  # B = 0 would hide gradients flowing through the adapters
    ids = torch.randint(0, 96, (2, 16))
    grads, peaks, losses = [], [], []
    for recompute in (False, True):
        model.model.selective_recompute = recompute
        model.zero_grad(set_to_none=True)
        with TensorMemoryTracker() as tracker:
            tracker.track(model, ids)
            loss = model(ids, labels=ids).loss
            saved_at_loss = tracker.current
            loss.backward()
        peaks.append(saved_at_loss)
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert torch.equal(losses[0], losses[1])
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name
    n = 2 * 16
    saved = n * sum(_saved_bytes_per_token(method, dtype, i == 0) for i in range(CONFIG.num_hidden_layers))
    saved += n * _final_norm_saved_bytes_per_token(method, dtype)
    assert peaks[0] - peaks[1] >= saved, (peaks[0] - peaks[1], saved)


def test_recompute_saved_runs_once_for_all_consumers():
    """Two matmuls save the target, two more each their own cast of it (adapters of another dtype): one
    recomputation, one cast, bitwise the same gradients."""
    from finetune_ref.models.recompute import recompute_saved

    torch.manual_seed(0)
    a = torch.randn(4, 6, requires_grad=True)
    w1, w2 = torch.randn(5, 6, requires_grad=True), torch.randn(3, 6, requires_grad=True)
    w3, w4 = torch.randn(2, 6, dtype=torch.float64, requires_grad=True), torch.randn(3, 6, dtype=torch.float64,
                                                                                      requires_grad=True)
    calls = []

    def remake():
        calls.append(1)
        return a.detach() * 2

    def loss(x):
        return (F.linear(x, w1).sum() + F.linear(x, w2).square().sum() + F.linear(x.double(), w3).square().sum()
                + F.linear(x.double(), w4).sum())

    grads = []
    for recompute in (False, True):
        x = a * 2  # the tensor both matmuls save for their weight gradients
        if recompute:
            with recompute_saved(x, remake):
                y = loss(x)
        else:
            y = loss(x)
        grads.append(torch.autograd.grad(y, (a, w1, w2, w3, w4)))
    assert len(calls) == 1  # one recomputation shared by the four consumers
    for g0, g1 in zip(*grads):
        assert torch.equal(g0, g1)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_recomputed_norm_makes_its_fp32_input_once(method):
    """In backward a recomputed RMSNorm (models/norm.py) feeds three recipes from one fp32 copy of its input: its
    output for the projections, y for its weight's gradient (full) and the copy for its input's gradient. So
    recomputation adds one bf16 -> fp32 cast of an (N, H) input per norm to backward (it added three, the output
    being remade by the whole norm and y and the copy each from the input); gradients stay bitwise
    (test_selective_recompute_is_bitwise_and_saves_memory)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from finetune_ref.lora import LoraConfig, inject_lora

    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG).to(torch.bfloat16)
    if method == "lora":
        inject_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    ids = torch.randint(0, 96, (2, 16))
    N, H = 2 * 16, CONFIG.hidden_size

    class Casts(TorchDispatchMode):  # bf16 (N, H) -> fp32 casts of a norm's input
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if (func is torch.ops.aten._to_copy.default and args[0].dtype == torch.bfloat16
                    and kwargs.get("dtype") == torch.float32 and args[0].numel() == N * H):
                Casts.count += 1
            return func(*args, **kwargs)

    casts = {}
    for recompute in (False, True):
        model.model.selective_recompute = recompute
        loss = model(ids, labels=ids).loss
        Casts.count = 0
        with Casts():
            loss.backward()
        casts[recompute] = Casts.count
    # One per recomputed norm: both of each layer but LoRA's first (its input, frozen embeddings, needs no grad),
    # and the final norm (its input's fp32 copy only). LoRA's fp32 adapters also cast the remade bf16 output of
    # each decoder-layer norm to fp32 (the cast they saved in forward): one more each.
    decoder_norms = 2 * CONFIG.num_hidden_layers - (1 if method == "lora" else 0)
    expected = decoder_norms * (2 if method == "lora" else 1) + 1
    assert casts[True] - casts[False] == expected, casts  # before this change: 14 (full), 10 (LoRA)


@pytest.mark.skipif(not (__import__("shutil").which("g++") or __import__("shutil").which("c++")),
                    reason="torch.compile on CPU needs a C++ compiler")
@pytest.mark.parametrize("method", ["full", "lora"])
def test_compiled_layers_train_as_eager_and_keep_names(method):
    """--compile (RunConfig.configure_model): each decoder layer compiled in place (~20 s of compilation each);
    with LoRA over the fused projections and lora/branch.py, both kept."""
    import copy

    from finetune_ref.lora import LoraConfig, inject_lora
    from finetune_ref.recipes.full import FullRecipe
    from finetune_ref.recipes.lora import LoraRecipe

    torch.manual_seed(0)
    eager = LlamaForCausalLM(CONFIG)
    recipe = FullRecipe if method == "full" else LoraRecipe
    if method == "lora":
        inject_lora(eager, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    compiled = copy.deepcopy(eager)
    recipe(compile=True).configure_model(compiled)
    recipe().configure_model(eager)
    if method == "lora":
        attn = compiled.model.layers[0].self_attn
        assert attn.fused_projections is not None and attn.o_proj.branch_backward
    ids = torch.randint(0, 96, (2, 16))
    losses = []
    for model in (eager, compiled):
        loss = model(ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)
    for (name, p), (name_c, q) in zip(eager.named_parameters(), compiled.named_parameters()):
        assert name == name_c  # files and adapters keep Hugging Face's names
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)
