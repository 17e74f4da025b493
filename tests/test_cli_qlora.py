"""The QLoRA workflow through ``finetune``: train --method qlora (optimizers, resume), eval/generate on the NF4
base the adapter was trained on, merge with --requantize {nf4, rtn4, gptq4}, and the errors of bad settings.

A tiny random Llama (1 layer) with SmolLM2's tokenizer keeps every command to a second or two; the real model
runs in test_qlora_real_model.py. Tolerances: fp32 losses compared to 1e-5 (the same computation twice); a saved
GPTQ model vs the in-memory one to 1e-3 relative (the saved non-quantized tensors are fp16).
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from finetune_ref.cli.main import main
from finetune_ref.gptq.checkpoint import is_gptq_dir
from tiny_model_dir import make_hf_model_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_dir):
    """(model dir, corpus file): a tiny HF Llama with SmolLM2's tokenizer, and a few pydoc topics as text."""
    return make_hf_model_dir(tmp_path_factory.mktemp("tiny-qlora"), smollm2_dir)


def train_args(tiny, out, *extra):
    model, corpus = tiny
    return ["train", "--method", "qlora", "--model", str(model), "--data", str(corpus), "--seq-len", "32",
            "--batch-size", "2", "--steps", "4", "--warmup", "1", "--lr", "1e-2", "--eval-fraction", "0.3",
            "--no-progress", "--out", str(out), *extra]


def after_loss(stdout: str) -> float:
    return float(stdout.split("held-out after:  loss ")[1].split(",")[0])


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """A QLoRA run in fp32 (exact comparisons) with checkpoints every 2 updates: (out dir, stdout)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("run") / "qlora"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(train_args(tiny, out, "--precision", "fp32", "--save-every", "2", "--keep-last", "0")) == 0
    return out, buf.getvalue()


def test_qlora_training_saves_a_peft_adapter_with_its_quantization_record(trained):
    out, stdout = trained
    record = json.loads((out / "qlora_config.json").read_text())
    assert record == {"quant_type": "nf4", "blocksize": 64, "double_quant": True, "compute_dtype": "fp32",
                      "dtype": "fp32"}
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8
    assert all(k.startswith("base_model.model.") for k in load_file(str(out / "adapter_model.safetensors")))
    assert after_loss(stdout) < float(stdout.split("held-out before: loss ")[1].split(",")[0])


def test_eval_with_a_qlora_adapter_runs_on_the_nf4_base_it_was_trained_on(tiny, trained, capsys):
    out, stdout = trained
    model, corpus = tiny
    args = ["eval", "--model", str(model), "--data", str(corpus), "--seq-len", "32", "--batch-size", "2",
            "--eval-fraction", "0.3", "--json", "--adapter", str(out)]
    assert main(args) == 0
    # train prints the loss with 4 decimals: equal up to that rounding (half a unit of the last digit)
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(after_loss(stdout), abs=5e-5)
    assert main(["generate", "--model", str(model), "--adapter", str(out), "--prompt", "hi", "--max-new-tokens",
                 "3"]) == 0


def test_resume_of_a_qlora_run_with_the_paged_optimizer_is_bitwise(tiny, trained, tmp_path):
    out, _ = trained
    resumed = tmp_path / "resumed"
    assert main(train_args(tiny, resumed, "--precision", "fp32",
                           "--resume", str(out / "checkpoints" / "checkpoint-000002"))) == 0
    a = load_file(str(out / "adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit", "paged_adamw8bit"])
def test_every_optimizer_trains_qlora_in_bf16(tiny, tmp_path, optimizer, capsys):
    assert main(train_args(tiny, tmp_path / optimizer, "--optimizer", optimizer, "--steps", "2")) == 0
    stdout = capsys.readouterr().out
    assert torch.isfinite(torch.tensor(after_loss(stdout)))
    record = json.loads((tmp_path / optimizer / "qlora_config.json").read_text())
    assert record["compute_dtype"] == "bf16" and record["dtype"] == "bf16"  # QLoRA's default precision


def test_dry_run_shows_each_methods_defaults(capsys):
    assert main(["train", "--method", "qlora", "--dry-run", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "precision bf16, optimizer paged_adamw" in out and "peak lr 0.001," in out
    assert main(["train", "--method", "full", "--dry-run", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "precision fp32, optimizer adamw" in out and "peak lr 2e-05," in out


@pytest.mark.parametrize("requantize", ["rtn4", "gptq4", "nf4"])
def test_merge_and_requantize_writes_a_model_eval_loads(tiny, trained, tmp_path, requantize, capsys):
    out, _ = trained
    model, corpus = tiny
    data = ["--data", str(corpus), "--seq-len", "32", "--batch-size", "2", "--eval-fraction", "0.3"]
    merged = tmp_path / requantize
    assert main(["merge", "--model", str(model), "--adapter", str(out), "--out", str(merged), "--requantize",
                 requantize, "--group-size", "32", "--calibration-samples", "8", "--report-batches", "1000",
                 *data]) == 0
    text = capsys.readouterr().out
    assert "QLoRA adapter(s) into the nf4-dequant base" in text and f"re-quantized ({requantize})" in text
    reference = float(text.split("held-out loss ")[1].split(" ->")[0])
    merged_loss = float(text.split(" -> ")[1].split(" ")[0])
    assert is_gptq_dir(merged) == (requantize != "nf4")
    assert main(["eval", "--model", str(merged), *data, "--json"]) == 0
    loss = json.loads(capsys.readouterr().out)["loss"]
    assert loss == pytest.approx(merged_loss, rel=1e-3)  # what was saved is what was measured
    assert abs(loss - reference) < 0.5  # 4-bit re-quantization of a random 1-layer model: a loose sanity band
    # a GPTQ model is for serving: adapters go on the 16/32-bit or NF4 base
    if requantize != "nf4":
        assert main(["eval", "--model", str(merged), *data, "--adapter", str(out)]) == 2
        assert "GPTQ model" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["train", "--method", "lora", "--blocksize", "64"], "--method qlora"),
    (["train", "--method", "qlora", "--parallel", "fsdp"], "add --optimizer adamw"),  # paged_adamw: no DTensors
    (["merge", "--adapter", "x", "--out", "y", "--requantize", "rtn4", "--act-order"], "gptq4"),
    (["merge", "--adapter", "x", "--out", "y", "--calibration-data", "z"], "--requantize gptq4"),
])
def test_bad_combinations_are_one_line_errors(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("requantize", ["rtn4", "nf4"])
def test_a_plain_lora_adapter_merges_and_requantizes_too(tiny, tmp_path, requantize, capsys):
    model, corpus = tiny
    data = ["--data", str(corpus), "--seq-len", "32", "--batch-size", "2", "--eval-fraction", "0.3"]
    assert main(["train", "--method", "lora", "--model", str(model), *data, "--steps", "2", "--warmup", "1",
                 "--no-progress", "--out", str(tmp_path / "lora")]) == 0
    merged = tmp_path / requantize
    assert main(["merge", "--model", str(model), "--adapter", str(tmp_path / "lora"), "--out", str(merged),
                 "--requantize", requantize, "--group-size", "32", "--report-batches", "1000", *data]) == 0
    text = capsys.readouterr().out
    assert "LoRA adapter(s)" in text and f"re-quantized ({requantize})" in text
    merged_loss = float(text.split(" -> ")[1].split(" ")[0])
    assert main(["eval", "--model", str(merged), *data, "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"] == pytest.approx(merged_loss, rel=1e-3)


def test_nothing_a_user_made_is_overwritten(tiny, trained, tmp_path, capsys):
    out, _ = trained
    model, _ = tiny
    # a finished run's --out, even without checkpoints
    assert main(train_args(tiny, tmp_path / "once", "--steps", "1", "--warmup", "0")) == 0
    assert main(train_args(tiny, tmp_path / "once", "--steps", "1", "--warmup", "0")) == 2
    assert "holds a training run" in capsys.readouterr().err
    # --out that is one of the inputs
    assert main(["merge", "--model", str(model), "--adapter", str(out), "--out", str(model)]) == 2
    assert "is also an input" in capsys.readouterr().err
    assert main(["quantize", "--model", str(model), "--out", str(model)]) == 2
    assert "is also an input" in capsys.readouterr().err
    assert (model / "config.json").is_file() and "quantization_config" not in (model / "config.json").read_text()


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_generate_rejects_a_temperature_that_is_not_a_finite_number_ge_0(value, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--prompt", "hi", "--temperature", value])
    assert exc.value.code == 2 and "a number in [0, 100]" in capsys.readouterr().err or value == "-1"
