"""Full fine-tuning: MasterWeightAdamW against torch.optim.AdamW (bitwise), the fp32 master keeping small
updates that pure bf16 loses, tied weights updated once, the 16 bytes/parameter accounting measured, export,
and (real model) a few bf16 full-fine-tuning updates of SmolLM2-135M lowering the loss."""

import pytest
import torch

from finetune_ref.train.data import BatchIterator, pack_documents
from finetune_ref.train.config import TrainConfig
from finetune_ref.train.step import optimizer_for
from finetune_ref.train.evaluation import evaluate
from finetune_ref.train.trainer import train
from finetune_ref.full import export_full_model, memory_breakdown, prepare_full_finetuning
from finetune_ref.optim import MasterWeightAdamW
from finetune_ref.models.loader import load_model
from finetune_ref.models.config import LlamaConfig
from finetune_ref.models.llama import LlamaForCausalLM

VOCAB = 64


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(tied=True, seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied))


def data(seed=1):
    """Learnable documents (runs of +1 or +2 steps modulo the vocabulary), so held-out loss can drop."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(12):
        start, step = int(torch.randint(0, VOCAB - 3, (1,), generator=g)), int(torch.randint(1, 3, (1,), generator=g))
        docs.append([3 + (start + i * step) % (VOCAB - 3) for i in range(20)])
    return BatchIterator(pack_documents(docs, 16, eos_token_id=2), 4, pad_token_id=0, seed=seed)


def random_grads(params, steps, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=g).to(dtype) for p in params] for _ in range(steps)]


def test_fp32_parameters_are_exactly_torch_adamw():
    torch.manual_seed(0)
    init = [torch.randn(6, 5), torch.randn(5)]
    ours = [p.clone().requires_grad_() for p in init]
    ref = [p.clone().requires_grad_() for p in init]
    opt = MasterWeightAdamW([{"params": ours[:1], "weight_decay": 0.1}, {"params": ours[1:], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.8, 0.99), eps=1e-6)
    opt_ref = torch.optim.AdamW([{"params": ref[:1], "weight_decay": 0.1}, {"params": ref[1:], "weight_decay": 0.0}],
                                lr=1e-2, betas=(0.8, 0.99), eps=1e-6)
    for grads in random_grads(init, 5, torch.float32):
        for p, q, g in zip(ours, ref, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        opt_ref.step()
    for p, q in zip(ours, ref):
        assert torch.equal(p, q)
    assert all("master" not in s for s in opt.state.values())  # an fp32 parameter is its own master


def test_bf16_update_goes_to_the_fp32_master_then_rounds():
    torch.manual_seed(0)
    weights = [torch.randn(8, 4).to(torch.bfloat16).requires_grad_(), torch.randn(4).to(torch.bfloat16).requires_grad_()]
    opt = MasterWeightAdamW(weights, lr=1e-2, weight_decay=0.05)
    reference = [w.detach().float().clone().requires_grad_() for w in weights]  # fp32 AdamW on the same values
    opt_ref = torch.optim.AdamW(reference, lr=1e-2, weight_decay=0.05)
    for grads in random_grads(weights, 4, torch.bfloat16):
        for w, r, g in zip(weights, reference, grads):
            w.grad, r.grad = g.clone(), g.float()
        opt.step()
        opt_ref.step()
    for w, r in zip(weights, reference):
        state = opt.state[w]
        assert w.dtype == torch.bfloat16 and state["master"].dtype == state["exp_avg"].dtype == torch.float32
        assert torch.equal(state["master"], r.detach())            # the update is fp32 AdamW, bitwise
        assert torch.equal(w.detach(), state["master"].to(torch.bfloat16))  # weight = master rounded


def test_master_copy_keeps_updates_smaller_than_bf16_resolution():
    # |w| = 1: the bf16 spacing is 2^-7 = 0.0078, and an Adam step of lr = 1e-3 is below half of it.
    pure = torch.ones(16, dtype=torch.bfloat16, requires_grad=True)
    mixed = torch.ones(16, dtype=torch.bfloat16, requires_grad=True)
    opt_pure = torch.optim.AdamW([pure], lr=1e-3, weight_decay=0.0)
    opt_mixed = MasterWeightAdamW([mixed], lr=1e-3)
    for _ in range(10):
        pure.grad = torch.ones_like(pure)
        mixed.grad = torch.ones_like(mixed)
        opt_pure.step()
        opt_mixed.step()
    assert torch.equal(pure.detach(), torch.ones_like(pure))  # pure bf16: ten updates rounded away
    torch.testing.assert_close(opt_mixed.state[mixed]["master"], torch.full((16,), 0.99), atol=1e-6, rtol=0)
    assert torch.equal(mixed.detach(), torch.full((16,), 0.99).to(torch.bfloat16))  # moved by 0.0078


def test_tied_embedding_gets_both_gradients_and_one_update():
    tied = tiny_model(tied=True)
    untied = tiny_model(tied=False)
    untied.load_state_dict({**tied.state_dict(), "lm_head.weight": tied.lm_head.weight.detach().clone()})
    batch = next(data())
    tied(**batch).loss.backward()
    untied(**batch).loss.backward()
    both = untied.model.embed_tokens.weight.grad + untied.lm_head.weight.grad
    torch.testing.assert_close(tied.model.embed_tokens.weight.grad, both, atol=1e-6, rtol=1e-5)

    prepare_full_finetuning(tied, torch.bfloat16)
    opt = optimizer_for(tied, TrainConfig(lr=1e-2, precision="fp32", optimizer="adamw"))
    params = [p for g in opt.param_groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == len(list(tied.parameters()))  # the tie appears once
    before = tied.model.embed_tokens.weight.detach().float().clone()
    tied(**batch).loss.backward()
    grad = tied.model.embed_tokens.weight.grad.float()
    opt.step()
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    # One AdamW step from zero state moves each element by lr * g / (|g| + eps) ~= lr * sign(g), not 2 * lr.
    step = opt.state[tied.model.embed_tokens.weight]["master"] - before
    expected = -1e-2 * grad / (grad.abs() + 1e-8)
    torch.testing.assert_close(step, expected, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("dtype, expected", [(torch.bfloat16, (2, 2, 8, 4)), (torch.float32, (4, 4, 8, 0))])
def test_memory_is_16_bytes_per_parameter(dtype, expected):
    model = prepare_full_finetuning(tiny_model(), dtype)
    opt = optimizer_for(model, TrainConfig(lr=2e-4, precision="fp32", optimizer="adamw"))
    model(**next(data())).loss.backward()
    opt.step()
    mem = memory_breakdown(model, opt)
    n = mem["parameters"]
    assert (mem["weights"] / n, mem["grads"] / n, mem["optimizer"] / n, mem["master"] / n) == expected
    assert mem["total"] == 16 * n


def test_prepare_full_finetuning_and_errors():
    model = tiny_model()
    for p in model.parameters():
        p.requires_grad_(False)
    prepare_full_finetuning(model, torch.bfloat16)
    assert all(p.requires_grad and p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(TypeError, match="loss scaling"):
        prepare_full_finetuning(tiny_model(), torch.float16)
    with pytest.raises(ValueError, match="precision 'fp32'"):
        train(model, data(), TrainConfig(steps=1, lr=2e-4, warmup_steps=0, progress=False, precision="fp32",
                                         optimizer="adamw"))
    with pytest.raises(ValueError, match="lr"):
        MasterWeightAdamW(model.parameters(), lr=-1.0)


def test_optimizer_state_dict_round_trip_keeps_fp32():
    model = prepare_full_finetuning(tiny_model(), torch.bfloat16)
    opt = optimizer_for(model, TrainConfig(lr=2e-4, precision="fp32", optimizer="adamw"))
    model(**next(data())).loss.backward()
    opt.step()
    fresh = optimizer_for(model, TrainConfig(lr=2e-4, precision="fp32", optimizer="adamw"))
    fresh.load_state_dict(opt.state_dict())
    for p in model.parameters():
        for key in ("master", "exp_avg", "exp_avg_sq"):
            assert fresh.state[p][key].dtype == torch.float32 and torch.equal(fresh.state[p][key], opt.state[p][key])
    bad = opt.state_dict()
    first = next(iter(bad["state"]))
    bad["state"][first]["exp_avg"] = torch.zeros(3)
    with pytest.raises(ValueError, match="shape"):
        fresh.load_state_dict(bad)


@pytest.mark.parametrize("precision", ["bf16", "bf16-autocast", "fp32"])
def test_full_training_lowers_loss_and_exports(tmp_path, precision):
    model = prepare_full_finetuning(tiny_model(), torch.bfloat16 if precision == "bf16" else torch.float32)
    held = [next(data(seed=4))]
    before = evaluate(model, held, precision=precision)["loss"]
    result = train(model, data(), TrainConfig(steps=8, lr=1e-2, warmup_steps=1, progress=False, precision=precision,
                                              optimizer="adamw"),
                   eval_fn=lambda: evaluate(model, held, precision=precision))
    assert result["eval"]["loss"] < before
    out = export_full_model(model, tmp_path / "model", model.config)
    loaded = load_model(out, dtype=next(model.parameters()).dtype)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


@pytest.mark.real_model
def test_real_model_bf16_full_finetuning_step(smollm2_dir, pydoc_text_window):
    """SmolLM2-135M in bf16 + fp32 master: three updates on one 128-token window lower its loss; the tie and
    the 16 bytes/parameter (2.15 GB for 134.5M parameters) hold on the real model."""
    model = prepare_full_finetuning(load_model(smollm2_dir, dtype=torch.bfloat16), torch.bfloat16)
    ids = pydoc_text_window[:, :128]
    batch = {"input_ids": ids, "labels": ids}
    before = evaluate(model, [batch])["loss"]
    cfg = TrainConfig(steps=3, lr=1e-4, warmup_steps=0, progress=False, precision="bf16", optimizer="adamw")
    opt = optimizer_for(model, cfg)
    train(model, iter(lambda: batch, None), cfg, optimizer=opt)
    after = evaluate(model, [batch])["loss"]
    assert after < before - 0.05, (before, after)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    model(**batch).loss.backward()  # gradients present, as during an update
    mem = memory_breakdown(model, opt)
    assert mem["parameters"] == 134_515_008 and mem["total"] == 16 * mem["parameters"]


def test_fused_adamw_matches_the_single_tensor_update():
    """build_optimizer("adamw", fused=True): torch's fused kernel, the same update as the default path up to
    the last ulps of fp32 (it evaluates the same formula in one pass, in another order)."""
    from finetune_ref.optim import build_optimizer

    torch.manual_seed(0)
    init = [torch.randn(40, 30), torch.randn(30)]
    fused = [p.clone().requires_grad_() for p in init]
    plain = [p.clone().requires_grad_() for p in init]
    opt_fused = build_optimizer("adamw", fused, lr=1e-2, weight_decay=0.1, fused=True)
    opt_plain = build_optimizer("adamw", plain, lr=1e-2, weight_decay=0.1)
    assert opt_fused.defaults["fused"] and not opt_plain.defaults["fused"]
    for grads in random_grads(init, 5, torch.float32):
        for p, q, g in zip(fused, plain, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt_fused.step()
        opt_plain.step()
    for p, q in zip(fused, plain):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    # 16-bit parameters keep MasterWeightAdamW (already one tensor at a time); the flag is accepted
    assert type(build_optimizer("adamw", [torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)],
                                lr=1e-3, fused=True)).__name__ == "MasterWeightAdamW"
