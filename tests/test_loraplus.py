"""LoRA+ (Hayou et al. 2024): the optimizer's parameter groups equal PEFT 0.22's ``create_loraplus_optimizer``
groups on the same tiny random model (same parameters in each group, same lr and weight decay), and the
learning-rate schedule keeps B's ratio through warmup and decay."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from finetune_ref import lora  # noqa: E402
from finetune_ref.lora.loraplus import loraplus_param_groups  # noqa: E402
from finetune_ref.train.config import TrainConfig  # noqa: E402
from finetune_ref.train.schedule import WarmupCosine  # noqa: E402
from finetune_ref.train.step import optimizer_for  # noqa: E402

PREFIX = "base_model.model."


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_loraplus_groups_equal_peft_create_loraplus_optimizer(use_dora, weight_decay):
    from peft.optimizers import create_loraplus_optimizer

    base = tiny_llama()
    kwargs = dict(r=4, lora_alpha=8, target_modules="all-linear", use_dora=use_dora)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    ours = copy.deepcopy(base)
    lora.inject_lora(ours, lora.LoraConfig(**kwargs))
    lr, ratio = 2e-4, 16.0
    ref = create_loraplus_optimizer(pm, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio,
                                    loraplus_weight_decay=weight_decay)
    peft_names = {id(p): n.removeprefix(PREFIX) for n, p in pm.named_parameters()}
    our_names = {id(p): n for n, p in ours.named_parameters()}
    expected = sorted((sorted(peft_names[id(p)] for p in g["params"]), g["lr"], g["weight_decay"])
                      for g in ref.param_groups if g["params"])
    cfg = TrainConfig(lr=lr, precision="fp32", optimizer="adamw", weight_decay=weight_decay,
                      loraplus_lr_ratio=ratio, steps=10, warmup_steps=0)
    optimizer = optimizer_for(ours, cfg)
    WarmupCosine(optimizer, total_updates=10, peak_lr=lr)  # sets each group's lr (scale included)
    got = sorted((sorted(our_names[id(p)] for p in g["params"]), g["lr"], g["weight_decay"])
                 for g in optimizer.param_groups)
    assert got == expected
    b_group = next(g for g in optimizer.param_groups if any(our_names[id(p)].endswith("lora_B.default.weight")
                                                            for p in g["params"]))
    assert b_group["lr"] == lr * ratio
    if use_dora:  # PEFT puts 1-dimensional parameters (DoRA's magnitude) with B
        assert any("lora_magnitude_vector" in our_names[id(p)] for p in b_group["params"])


def test_the_schedule_keeps_the_ratio_through_warmup_and_decay():
    model = tiny_llama()
    lora.inject_lora(model, lora.LoraConfig(r=2, target_modules=["q_proj"]))
    groups = loraplus_param_groups(model, 8.0)
    optimizer = torch.optim.AdamW(groups, lr=1.0)
    scheduler = WarmupCosine(optimizer, total_updates=6, peak_lr=1e-3, warmup=2, min_lr=1e-4)
    for _ in range(6):
        a, b = optimizer.param_groups[0]["lr"], optimizer.param_groups[1]["lr"]
        assert b == pytest.approx(8.0 * a, rel=1e-12) and a > 0
        scheduler.step()


def test_loraplus_needs_adapters_and_a_positive_ratio():
    model = tiny_llama()
    with pytest.raises(ValueError, match="no trainable lora_B"):
        loraplus_param_groups(model, 16)
    with pytest.raises(ValueError, match="loraplus_lr_ratio"):
        TrainConfig(lr=1e-3, precision="fp32", optimizer="adamw", loraplus_lr_ratio=0.0)


def test_cli_parses_loraplus_and_dora_into_the_recipe_and_refuses_them_for_full(capsys):
    from finetune_ref.cli.main import build_parser, main
    from finetune_ref.cli.train import run_config

    cfg, _, _ = run_config(build_parser().parse_args(["train", "--method", "qlora", "--dora", "--loraplus-lr-ratio",
                                                      "16"]))
    assert cfg.loraplus_lr_ratio == 16.0 and cfg.dora and cfg.lora_config().use_dora
    assert run_config(build_parser().parse_args(["train"]))[0].loraplus_lr_ratio is None
    assert main(["train", "--method", "full", "--loraplus-lr-ratio", "4", "--dry-run"]) == 2
    assert "--loraplus-lr-ratio" in capsys.readouterr().err
