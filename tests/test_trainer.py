"""The loop's invariants: token-normalised accumulation, the schedule (warmup 0, once per update, dry-run table,
resume checks), clipping (global norm, logged), weight decay groups, frozen parameters, non-finite gradients,
updates without label tokens, evaluation, config errors."""

import json
import math

import pytest
import torch

from finetune_ref.train.schedule import WarmupCosine, lr_at
from finetune_ref.train.config import TrainConfig
from finetune_ref.train.data import count_label_tokens
from finetune_ref.train.evaluation import evaluate
from finetune_ref.train.step import param_groups
from finetune_ref.train.trainer import train
from finetune_ref.models.config import LlamaConfig
from finetune_ref.models.llama import LlamaForCausalLM


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))


def padded_batch(seqs, pad=0):
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad)
    labels = torch.full((len(seqs), T), -100)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        labels[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def grads_after(model, micro_batches):
    n = sum(count_label_tokens(b) for b in micro_batches)
    total = 0.0
    for b in micro_batches:
        out = model(**b, num_items_in_batch=n)
        out.loss.backward()
        total += out.loss.item()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return total, grads


def test_accumulation_is_normalised_by_label_tokens():
    model = tiny_model()
    seqs = [[3, 4, 5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19]]
    loss_one, grads_one = grads_after(model, [padded_batch(seqs)])
    loss_k, grads_k = grads_after(model, [padded_batch([s]) for s in seqs])
    assert loss_one == pytest.approx(loss_k, rel=1e-6)
    for name in grads_one:
        torch.testing.assert_close(grads_k[name], grads_one[name], atol=1e-6, rtol=1e-5)
    # The mean of per-micro-batch means is a different number: the test above would catch that bug.
    means = [model(**padded_batch([s])).loss.item() for s in seqs]
    assert abs(sum(means) / 3 - loss_one) > 1e-3


def test_all_masked_micro_batch_adds_nothing():
    model = tiny_model()
    empty = padded_batch([[1, 2, 3]])
    empty["labels"][:] = -100
    assert count_label_tokens(empty) == 0
    out = model(**empty)
    assert out.loss.item() == 0.0 and torch.isfinite(out.loss)
    loss_a, grads_a = grads_after(model, [padded_batch([[5, 6, 7, 8]])])
    loss_b, grads_b = grads_after(model, [padded_batch([[5, 6, 7, 8]]), empty])
    assert loss_a == pytest.approx(loss_b)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name])


def test_schedule_warmup_cosine():
    assert lr_at(0, 10, 1.0, warmup=4) == pytest.approx(0.25)  # the first update already moves
    assert lr_at(3, 10, 1.0, warmup=4) == pytest.approx(1.0)
    # Decay from the peak at update 3 to the minimum at update 9: update 6 is half-way.
    assert lr_at(6, 10, 1.0, warmup=4, min_lr=0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(0, 5, 1.0, warmup=0) == pytest.approx(1.0)
    lrs = [lr for _, lr in WarmupCosine(torch.optim.SGD([torch.zeros(1, requires_grad=True)]), 10, 1.0, 2).table()]
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))  # non-increasing after warmup
    with pytest.raises(ValueError, match="warmup"):
        lr_at(0, 3, 1.0, warmup=4)


@pytest.mark.parametrize("total, warmup", [(30, 4), (10, 1), (10, 0), (5, 2), (2, 1), (1, 0), (4, 4)])
def test_schedule_peaks_at_end_of_warmup_and_reaches_min_at_last_update(total, warmup):
    peak, low = 1e-3, 1e-4
    lrs = [lr_at(i, total, peak, warmup, low) for i in range(total)]
    assert lrs[0] > 0  # the first update moves
    peak_update = max(warmup - 1, 0)
    assert lrs[peak_update] == peak and lrs.count(peak) == 1  # the peak, at the end of warmup, held once
    assert all(a < b for a, b in zip(lrs[:peak_update], lrs[1:peak_update + 1]))  # rising during warmup
    if total - 1 > peak_update:
        assert lrs[-1] == low  # exactly the stated minimum, on the last update
        assert all(a > b for a, b in zip(lrs[peak_update:], lrs[peak_update + 1:]))  # strictly falling after
    else:
        assert lrs[-1] == peak  # warmup covers every update: no decay
    assert min(lrs) >= low


def test_scheduler_advances_once_per_update(tmp_path):
    model = tiny_model()
    batch = padded_batch([[1, 2, 3, 4, 5, 6]])
    cfg = TrainConfig(steps=3, lr=1e-3, warmup_steps=3, grad_accum=4, progress=False,
                      metrics_path=tmp_path / "m.jsonl", precision="fp32", optimizer="adamw")
    train(model, iter(lambda: batch, None), cfg)
    records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3])
    assert all(r["label_tokens"] == 4 * 5 for r in records)


def test_frozen_parameters_untouched_and_excluded():
    model = tiny_model()
    for name, p in model.named_parameters():
        p.requires_grad = "mlp" in name
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "mlp" not in k}
    groups = param_groups(model, weight_decay=0.1)
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    batch = padded_batch([[1, 2, 3, 4, 5, 6]])
    before = evaluate(model, [batch])["loss"]
    train(model, iter(lambda: batch, None), TrainConfig(steps=5, lr=1e-2, progress=False, weight_decay=0.1,
                                                        precision="fp32", optimizer="adamw"))
    for k, v in frozen.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert evaluate(model, [batch])["loss"] < before


def test_clipping_bounds_the_update_norm():
    model = tiny_model()
    batch = padded_batch([[1, 2, 3, 4, 5, 6]])
    seen = []
    train(model, iter(lambda: batch, None), TrainConfig(steps=1, lr=1e-3, warmup_steps=0, max_grad_norm=1e-3,
                                                        progress=False, precision="fp32", optimizer="adamw"),
          on_update=lambda i, m: seen.append(m["grad_norm"]))
    assert seen[0] > 1e-3  # the logged norm is the one before clipping


def test_no_trainable_parameters_is_an_error():
    model = tiny_model()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(model, 0.0)


# ---------------------------------------------------------------------------------------------------------
# Added with full fine-tuning / checkpointing.
# ---------------------------------------------------------------------------------------------------------
from finetune_ref.train.schedule import format_lr_table  # noqa: E402
from finetune_ref.train.step import clip_grad_norm_, optimizer_for  # noqa: E402


def test_warmup_zero_first_update_uses_peak_lr_and_lr_table():
    model = tiny_model()
    batch = padded_batch([[1, 2, 3, 4, 5, 6]])
    seen = []
    train(model, iter(lambda: batch, None), TrainConfig(steps=4, lr=1e-3, warmup_steps=0, min_lr_ratio=0.1,
                                                        progress=False, precision="fp32", optimizer="adamw"),
          on_update=lambda i, m: seen.append(m["lr"]))
    assert seen[0] == pytest.approx(1e-3) and seen[-1] == pytest.approx(lr_at(3, 4, 1e-3, 0, 1e-4))
    table = format_lr_table(4, 1e-3, warmup=2, min_lr=1e-4).splitlines()
    assert table[0].split() == ["update", "lr"] and len(table) == 5
    assert [float(line.split()[1]) for line in table[1:]] == pytest.approx([lr_at(i, 4, 1e-3, 2, 1e-4) for i in range(4)])
    assert "..." in format_lr_table(100, 1e-3, max_rows=6)


def test_scheduler_resume_rejects_other_settings():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    saved = WarmupCosine(opt, 10, 1.0, 2).state_dict()
    WarmupCosine(opt, 10, 1.0, 2).load_state_dict(saved)
    with pytest.raises(ValueError, match="total_updates"):
        WarmupCosine(opt, 12, 1.0, 2).load_state_dict(saved)
    with pytest.raises(ValueError, match="update counter"):
        WarmupCosine(opt, 10, 1.0, 2).load_state_dict({**saved, "update": 11})


def test_no_weight_decay_on_biases_and_norms():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True))
    opt = optimizer_for(model, TrainConfig(weight_decay=0.1, lr=2e-4, precision="fp32", optimizer="adamw"))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert any(n.endswith("q_proj.bias") for n in plain) and any(n.endswith("norm.weight") for n in plain)
    assert all(n.endswith(".weight") and "norm" not in n for n in decayed) and "lm_head.weight" in decayed


def test_logged_grad_norm_is_torch_global_norm():
    model = tiny_model()
    model(**padded_batch([[1, 2, 3, 4, 5], [6, 7, 8]])).loss.backward()
    params = list(model.parameters())
    expected = torch.nn.utils.get_total_norm([p.grad for p in params])
    grads = [p.grad.clone() for p in params]
    norm = clip_grad_norm_(params, 0.1)
    assert norm == pytest.approx(float(expected), rel=1e-5)
    clipped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    assert float(clipped) == pytest.approx(0.1, rel=1e-4)
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad, g * (0.1 / (norm + 1e-6)))


def test_non_finite_gradient_stops_before_the_update():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.model.norm.weight.register_hook(lambda g: g * float("nan"))
    with pytest.raises(FloatingPointError, match="not applied"):
        train(model, iter(lambda: padded_batch([[1, 2, 3, 4]]), None),
              TrainConfig(steps=2, warmup_steps=0, progress=False, lr=2e-4, precision="fp32", optimizer="adamw"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_update_without_label_tokens_changes_nothing_and_logs_no_nan(tmp_path):
    model = tiny_model()
    empty = padded_batch([[1, 2, 3]])
    empty["labels"][:] = -100
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(model, iter(lambda: empty, None), TrainConfig(steps=2, warmup_steps=0, progress=False,
                                                                 weight_decay=0.1, metrics_path=tmp_path / "m.jsonl",
                                                                 lr=2e-4, precision="fp32", optimizer="adamw"))
    assert result["loss"] is None and result["label_tokens"] == 0 and result["grad_norm"] == 0.0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert "NaN" not in (tmp_path / "m.jsonl").read_text()


def test_evaluate_counts_label_tokens_only_and_rejects_empty():
    model = tiny_model()
    batch = padded_batch([[1, 2, 3, 4, 5, 6], [7, 8]])
    result = evaluate(model, [batch])
    assert result["tokens"] == 5 + 1
    out = model(**batch)
    assert result["loss"] == pytest.approx(out.loss.item(), rel=1e-6)
    empty = padded_batch([[1, 2]])
    empty["labels"][:] = -100
    with pytest.raises(ValueError, match="no label tokens"):
        evaluate(model, [empty])


@pytest.mark.parametrize("field, value, match", [
    ("precision", "fp16", "precision"), ("early_stopping_patience", 2, "eval_every"),
    ("max_grad_norm", float("inf"), "max_grad_norm"), ("grad_accum", 0, "grad_accum"),
])
def test_config_errors(field, value, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{"lr": 2e-4, "precision": "fp32", "optimizer": "adamw", field: value})


def test_cli_dry_run_prints_the_lr_table(capsys):
    from finetune_ref.cli.main import main

    assert main(["train", "--method", "full", "--dry-run", "--steps", "5", "--warmup", "2", "--lr", "1e-3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.strip() and line.split()[0].isdigit()]
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4, 5]
    assert [float(r[1]) for r in rows] == pytest.approx([lr_at(i, 5, 1e-3, 2, 1e-4) for i in range(5)])
    assert main(["train", "--method", "lora", "--parallel", "fsdp", "--dry-run"]) == 0  # FSDP shards LoRA too
