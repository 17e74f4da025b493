"""``finetune advise`` (recipes/advice.py, cli/advise.py) on published model shapes: the method the field's rules
pick, settings that fit the GPU by the memory estimator, and the edges (nothing fits, no dataset size given)."""

import json

import pytest

from finetune_ref.cli.main import main
from finetune_ref.recipes.advice import (FULL_MIN_EXAMPLES, advise, learning_rate, lora_alpha, lora_dropout,
                                         lora_rank, needed_bytes, plan_method)
from finetune_ref.train.memory_shapes import preset_config

GB = 10**9


@pytest.mark.parametrize("preset, gpu_gb, gpus, examples, method", [
    ("llama-2-7b", 24, 1, None, "qlora"),          # the 13.5 GB bf16 base leaves no room on a 24 GB card
    ("llama-2-7b", 80, 1, None, "lora"),
    ("llama-2-70b", 80, 1, None, "qlora"),         # 138 GB in bf16; ~36 GB in NF4
    ("smollm2-135m", 8, 1, None, "lora"),
    ("smollm2-135m", 24, 1, None, "lora"),
    ("smollm2-135m", 80, 1, None, "lora"),
    ("smollm2-135m", 80, 1, 500, "lora"),          # full fits but the dataset is small
    ("llama-2-7b", 80, 8, 100_000, "full"),        # large data, and 16 B/param fits sharded across 8 GPUs
])
def test_published_shapes(preset, gpu_gb, gpus, examples, method):
    a = advise(preset_config(preset), gpu_gb * GB, gpus, examples)
    assert a.recommended == method, (a.reasons, a.why_not)
    plan = a.plans[method]
    assert plan.fits and plan.needed <= gpu_gb * GB and plan.needed == needed_bytes(plan.peak)
    s = a.settings
    assert s["effective_batch"] == s["micro_batch"] * s["grad_accum"] * gpus >= 16
    assert s["micro_batch"] * (s["grad_accum"] - 1) * gpus < 16  # no more accumulation than the target needs
    assert set(a.why_not) == {"full", "lora", "qlora"} - {method}  # a line for each method not chosen
    assert all(a.why_not.values()) and a.reasons


def test_full_is_never_chosen_without_a_dataset_size():
    """Even where full fine-tuning fits with room to spare (135M on 80 GB), no --examples means no full."""
    a = advise(preset_config("smollm2-135m"), 80 * GB)
    assert a.plans["full"].fits and a.recommended == "lora"
    assert "--examples" in a.why_not["full"]
    # Large data and room on one GPU: full, without sharding.
    b = advise(preset_config("smollm2-135m"), 80 * GB, examples=FULL_MIN_EXAMPLES)
    assert b.recommended == "full" and b.settings["parallel"] == "single" and b.settings["lr"] == 2e-5


def test_full_that_does_not_fit_says_how_many_gpus_would():
    a = advise(preset_config("llama-2-7b"), 24 * GB, 1, 100_000)
    assert a.recommended == "qlora" and not a.plans["full"].fits
    assert "GPUs of this size would fit it with FSDP" in a.why_not["full"]


def test_fits_nowhere_says_so_and_what_would():
    a = advise(preset_config("llama-2-70b"), 24 * GB)
    assert a.recommended is None and a.settings == {}
    assert not any(p.fits for p in a.plans.values())
    assert any("a GPU of at least" in w for w in a.would_fit)
    assert any("llama-2-13b" in w for w in a.would_fit)  # the largest preset that fits with QLoRA
    # The GPU size it names does fit.
    need = a.plans["qlora"].needed
    assert plan_method(preset_config("llama-2-70b"), "qlora", need, 1, 2048, 8).fits


def test_lora_with_checkpointing_when_qlora_would_need_it_too():
    """A 135M model on 2.5 GB: both need gradient checkpointing at 2048 tokens, so the 4-bit base buys nothing.
    (With the chunked loss, 4 GB holds LoRA without checkpointing, and 3 GB holds QLoRA without it.)"""
    a = advise(preset_config("smollm2-135m"), int(2.5 * GB))
    assert a.recommended == "lora" and a.settings["gradient_checkpointing"]


def test_rules():
    assert [lora_rank("general", None), lora_rank("general", 50_000), lora_rank("complex", None),
            lora_rank("complex", 50_000), lora_rank("style", 50_000)] == [8, 16, 16, 32, 4]
    assert lora_alpha(8) == 16
    assert learning_rate("lora", 7e9) == 2e-4 and learning_rate("qlora", 70e9) == 1e-4
    assert learning_rate("full", 7e9) == 2e-5 and learning_rate("full", 70e9) == 1e-5
    assert lora_dropout(500, 7e9) == 0.1 and lora_dropout(500, 70e9) == 0.05 and lora_dropout(5_000, 7e9) == 0.0
    with pytest.raises(ValueError, match="gpus"):
        advise(preset_config("llama-2-7b"), 24 * GB, gpus=0)
    with pytest.raises(ValueError, match="longer than the model's context"):
        advise(preset_config("llama-2-7b"), 24 * GB, seq_len=8192)


def test_cli_json_and_text(capsys):
    assert main(["advise", "--preset", "llama-2-7b", "--gpu-memory", "24GB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["recommended"] == "qlora" and out["settings"]["rank"] == 8 and out["settings"]["alpha"] == 16
    assert out["settings"]["targets"] == "all-linear" and out["command"].startswith("finetune train --method qlora")
    assert set(out["plans"]) == {"full", "lora", "qlora"} and out["plans"]["qlora"]["peak"] > 0
    assert main(["advise", "--preset", "llama-2-7b", "--gpu-memory", "80GB", "--gpus", "8", "--examples",
                 "100000"]) == 0
    text = capsys.readouterr().out
    assert "recommended: full fine-tuning" in text and "torchrun" in text and "--parallel fsdp" in text
    assert main(["advise", "--preset", "llama-2-70b", "--gpu-memory", "24GB"]) == 0
    assert "recommended: nothing fits" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--gpu-memory", "lots"], "--gpu-memory: expected a size like 24GB"),
    (["--gpu-memory", "0GB"], "--gpu-memory: expected a size"),
    (["--gpu-memory", "24GB", "--gpus", "0"], "--gpus: expected an integer in 1.."),
    (["--preset", "llama-2-7b", "--gpu-memory", "24GB", "--seq-len", "9000"], "--seq-len 9000 is longer than"),
])
def test_cli_bad_input_is_one_line(argv, message, capsys):
    try:
        code = main(["advise", *argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_model_config(tmp_path, capsys):
    """A config.json on disk (here SmolLM2's shape): no weights are read."""
    config = preset_config("smollm2-135m")
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    assert main(["advise", "--model", str(tmp_path), "--gpu-memory", "16GiB", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["recommended"] == "lora"
    assert main(["advise", "--model", str(tmp_path / "missing"), "--gpu-memory", "16GB"]) == 2
    assert "finetune advise: error:" in capsys.readouterr().err
