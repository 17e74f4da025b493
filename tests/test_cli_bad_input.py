"""What ``finetune`` does with bad input: one line naming the flag or the file, exit status 2, no traceback.

Everything runs in-process (``finetune_ref.cli.main.main``) on tiny random models (``tiny_model_dir``): seconds.
"""

import json

import pytest

from finetune_ref.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")


def fails(argv, capsys, after_progress: bool = False) -> str:
    """The one-line error of a command that must exit with status 2 (from argparse or from the command);
    ``after_progress``: the error is the last line, after the run's progress report."""
    try:
        status = main(argv)
    except SystemExit as exc:
        status = exc.code
    err = capsys.readouterr().err
    assert status == 2, err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and (after_progress or len(lines) == 1), err
    assert lines[-1].startswith(f"finetune {argv[0]}: error: "), err
    return lines[-1]


# ---------------------------------------------------------------------------------------------------------
# Every numeric flag is checked at parse time, against a finite range, naming the flag.
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, flag", [
    (["train", "--weight-decay", "nan"], "--weight-decay"),
    (["train", "--lr", "1e300"], "--lr"),
    (["train", "--steps", "1" * 20], "--steps"),
    (["train", "--min-lr-ratio", "1.5"], "--min-lr-ratio"),
    (["train", "--max-grad-norm", "inf"], "--max-grad-norm"),
    (["train", "--seed", "-1"], "--seed"),
    (["train", "--seq-len", "1"], "--seq-len"),
    (["train", "--targets", "re:(q_proj"], "--targets"),
    (["generate", "--prompt", "x", "--top-p", "0"], "--top-p"),
    (["generate", "--prompt", "x", "--temperature", "nan"], "--temperature"),
    (["merge", "--adapter", "a", "--out", "b", "--group-size", "0"], "--group-size"),
    (["memory", "--rank", "0"], "--rank"),
])
def test_numeric_flags_are_checked_at_parse_time(argv, flag, capsys):
    err = fails([*argv, "--dry-run"] if argv[0] == "train" else argv, capsys)
    assert f"argument {flag}:" in err


def test_config_errors_name_the_flag_not_the_field(capsys):
    err = fails(["train", "--early-stopping-patience", "2", "--dry-run"], capsys)
    assert "--early-stopping-patience" in err and "--eval-every" in err and "eval_every" not in err


def test_name_flags_maps_fields_to_flags():
    from finetune_ref.cli.common import name_flags

    flags = {"min_lr_ratio": "--min-lr-ratio", "lr": "--lr", "data": "--data", "warmup_steps": "--warmup"}
    assert name_flags("min_lr_ratio must be in [0, 1]", flags) == "--min-lr-ratio must be in [0, 1]"
    assert name_flags("lr must be a positive number", flags) == "--lr must be a positive number"
    assert name_flags("data path x does not exist", flags) == "data path x does not exist"
    assert name_flags("warmup_steps must be in [0, steps=3]", flags) == "--warmup must be in [0, steps=3]"
    assert name_flags("pass overwrite=True", {"overwrite": "--overwrite"}) == "pass --overwrite"
    assert name_flags("unknown key 'min_lr_ratio'", flags) == "unknown key 'min_lr_ratio'"  # what the user wrote


def test_errors_from_below_the_cli_name_the_flag(tiny, tmp_path, capsys):
    run = tmp_path / "head"
    assert main(train_argv(tiny, run, "--targets", "lm_head")) == 0  # the head is tied to the input embedding
    capsys.readouterr()
    err = fails(["merge", "--model", str(tiny[0]), "--adapter", str(run), "--out", str(tmp_path / "merged"),
                 "--report-batches", "0", "--data", str(tiny[1]), "--seq-len", "32"], capsys)
    assert "Pass --untie to give" in err


# ---------------------------------------------------------------------------------------------------------
# A tiny model directory shared by the tests below.
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model dir, corpus .txt): a 2-layer Llama with its own 350-token tokenizer."""
    from tiny_model_dir import make_model_dir

    return make_model_dir(tmp_path_factory.mktemp("tiny"))


def copy_model(tiny, tmp_path, name="model"):
    import shutil

    return shutil.copytree(tiny[0], tmp_path / name)


def train_argv(tiny, out, *extra):
    model, corpus = tiny
    return ["train", "--model", str(model), "--data", str(corpus), "--out", str(out), "--seq-len", "32",
            "--batch-size", "2", "--steps", "2", "--warmup", "0", "--eval-fraction", "0.2", "--no-progress", *extra]


# ---------------------------------------------------------------------------------------------------------
# Numerics: NaN/inf in loaded weights is refused at load, naming the tensor; a non-finite loss stops training.
# ---------------------------------------------------------------------------------------------------------
def test_nan_in_weights_is_refused_at_load_naming_the_tensor(tiny, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    model = copy_model(tiny, tmp_path)
    tensors = load_file(model / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"][0, 3] = float("nan")
    save_file(tensors, model / "model.safetensors")
    err = fails(["eval", "--model", str(model), "--data", str(tiny[1]), "--seq-len", "32"], capsys)
    assert "model.layers.1.mlp.down_proj.weight" in err and "NaN" in err


def test_non_finite_loss_stops_training_naming_the_update(tiny, tmp_path, capsys, monkeypatch):
    import finetune_ref.train.trainer as trainer

    monkeypatch.setattr(trainer, "accumulate_gradients", lambda *a, **k: float("nan"))
    status = main(train_argv(tiny, tmp_path / "run"))
    err = capsys.readouterr().err
    assert status == 1 and "update 1: the loss is not finite" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


# ---------------------------------------------------------------------------------------------------------
# config.json: unsupported architecture fields and string-typed numbers are refused by name; missing fields take
# transformers' LlamaConfig defaults, said in one line.
# ---------------------------------------------------------------------------------------------------------
def edit_config(model, **changes):
    path = model / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("changes, field", [
    ({"use_sliding_window": True, "sliding_window": 16}, "sliding_window"),
    ({"num_experts": 4}, "num_experts"),
    ({"num_local_experts": 8}, "num_local_experts"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope_scaling"),
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps"),
    ({"hidden_size": "32"}, "hidden_size"),
])
def test_unsupported_or_mistyped_config_fields_are_named(tiny, tmp_path, capsys, changes, field):
    model = copy_model(tiny, tmp_path)
    edit_config(model, **changes)
    err = fails(["eval", "--model", str(model), "--data", str(tiny[1]), "--seq-len", "32"], capsys)
    assert f"'{field}'" in err


def test_missing_config_fields_are_reported_in_one_line(tiny, tmp_path, capsys):
    model = copy_model(tiny, tmp_path)
    edit_config(model, rope_theta=None, rope_parameters=None, attention_bias=None)
    assert main(["eval", "--model", str(model), "--data", str(tiny[1]), "--seq-len", "32"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "LlamaConfig defaults" in line]
    assert len(lines) == 1 and "rope_theta=10000.0" in lines[0] and "attention_bias=False" in lines[0]


# ---------------------------------------------------------------------------------------------------------
# A QLoRA adapter needs its quantization record, and a 4-bit base stored with the record's settings.
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qlora_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("qlora") / "run"
    assert main(train_argv(tiny, out, "--method", "qlora", "--precision", "fp32")) == 0
    return out


def test_qlora_adapter_without_its_record_is_refused(tiny, qlora_run, tmp_path, capsys):
    import shutil

    adapter = shutil.copytree(qlora_run, tmp_path / "adapter", ignore=shutil.ignore_patterns("checkpoints"))
    (adapter / "qlora_config.json").unlink()
    err = fails(["eval", "--model", str(tiny[0]), "--data", str(tiny[1]), "--seq-len", "32", "--adapter",
                 str(adapter)], capsys)
    assert "qlora_config.json is missing" in err


def test_qlora_adapter_on_a_4bit_base_with_another_blocksize_is_refused(tiny, qlora_run, tmp_path, capsys):
    assert main(["quantize", "--model", str(tiny[0]), "--out", str(tmp_path / "nf4"), "--blocksize", "128",
                 "--compute-dtype", "fp32"]) == 0
    capsys.readouterr()
    err = fails(["eval", "--model", str(tmp_path / "nf4"), "--data", str(tiny[1]), "--seq-len", "32", "--adapter",
                 str(qlora_run)], capsys)
    assert "'blocksize': 64" in err and "'blocksize': 128" in err


# ---------------------------------------------------------------------------------------------------------
# The model's context: --seq-len and generation beyond it are refused; truncated and empty chat records counted.
# ---------------------------------------------------------------------------------------------------------
def test_seq_len_and_generation_beyond_the_context_are_refused(tiny, tmp_path, capsys):
    model = copy_model(tiny, tmp_path)
    edit_config(model, max_position_embeddings=64)
    err = fails(train_argv((model, tiny[1]), tmp_path / "run", "--seq-len", "128"), capsys)
    assert "--seq-len=128 is beyond the model's context of 64 tokens" in err
    err = fails(["eval", "--model", str(model), "--data", str(tiny[1]), "--seq-len", "65"], capsys)
    assert "--seq-len=65" in err
    err = fails(["generate", "--model", str(model), "--prompt", "hello", "--max-new-tokens", "64"], capsys)
    assert "--max-new-tokens=64 is beyond the model's context of 64" in err


def test_truncated_and_empty_chat_records_are_counted(tiny, tmp_path):
    data = tmp_path / "chat.jsonl"
    records = [{"instruction": "Say it.", "output": "word " * 40}, {"instruction": "Nothing?", "output": ""},
               {"instruction": "Hi", "output": "Hello."}] * 4
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.warns(UserWarning) as record:
        assert main(["eval", "--model", str(tiny[0]), "--data", str(data), "--seq-len", "24", "--eval-fraction",
                     "0.5"]) == 0
    messages = [str(w.message) for w in record if "records" in str(w.message)]
    assert [m.split(":")[0] for m in messages] == ["of 6 training records", "of 6 held-out records"]
    assert all("truncated to seq_len=24" in m for m in messages)
    assert any("empty assistant reply" in m for m in messages)


def test_warnings_print_one_line_naming_flags():
    from finetune_ref.cli.main import warning_formatter

    line = warning_formatter("eval", {"seq_len": "--seq-len"})("3 truncated to seq_len=24", UserWarning, "x.py", 1)
    assert line == "finetune eval: warning: 3 truncated to --seq-len=24\n"


# ---------------------------------------------------------------------------------------------------------
# Errors: one line, status 2, saying what to do.
# ---------------------------------------------------------------------------------------------------------
def test_a_closed_stdout_is_no_traceback(monkeypatch, capsys):
    import io
    import sys

    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["train", "--dry-run", "--steps", "1000"]) == 141
    assert "Traceback" not in capsys.readouterr().err


def test_a_non_utf8_jsonl_line_is_named(tiny, tmp_path, capsys):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n')
    err = fails(["eval", "--model", str(tiny[0]), "--data", str(data), "--seq-len", "32"], capsys)
    assert f"{data}:2: not UTF-8" in err


@pytest.fixture(scope="module")
def lora_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    assert main(train_argv(tiny, out, "--save-every", "1", "--keep-last", "0")) == 0
    return out


def test_an_adapter_passed_as_model_suggests_adapter(tiny, lora_run, capsys):
    err = fails(["eval", "--model", str(lora_run), "--data", str(tiny[1])], capsys)
    assert f"pass it as --adapter {lora_run} with --model {tiny[0]}" in err


def test_an_adapter_on_another_base_names_its_base_in_one_short_line(tiny, lora_run, tmp_path, capsys):
    import torch

    from finetune_ref.models.checkpoint import save_model
    from finetune_ref.models.config import LlamaConfig
    from finetune_ref.models.llama import LlamaForCausalLM

    config = json.loads((tiny[0] / "config.json").read_text())
    other = copy_model(tiny, tmp_path, "one-layer")
    torch.manual_seed(0)
    save_model(LlamaForCausalLM(LlamaConfig.from_dict({**config, "num_hidden_layers": 1})), other)
    err = fails(["eval", "--model", str(other), "--data", str(tiny[1]), "--seq-len", "32", "--adapter",
                 str(lora_run)], capsys)
    assert f"It was trained on {tiny[0]}" in err and "unexpected" in err and len(err) < 500


def test_a_corrupt_latest_checkpoint_suggests_the_previous_one(tiny, lora_run, tmp_path, capsys):
    import shutil

    run = shutil.copytree(lora_run, tmp_path / "run")
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    with open(latest / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\0\0\0\0")
    err = fails(train_argv(tiny, run, "--steps", "3", "--save-every", "1", "--keep-last", "0", "--resume", str(run), "--extend"),
                capsys, after_progress=True)
    assert "corrupt checkpoint" in err and "--resume " + str(run / "checkpoints" / "checkpoint-000001") in err


# ---------------------------------------------------------------------------------------------------------
# --help: every flag of every command has a help text and shows its default; memory's defaults are train's.
# ---------------------------------------------------------------------------------------------------------
def commands():
    import argparse

    from finetune_ref.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_every_flag_has_a_help_text_and_shows_its_default():
    from finetune_ref.cli.common import HelpFormatter

    undocumented = []
    for name, parser in commands().items():
        formatter = HelpFormatter(prog=parser.prog)
        for action in parser._actions:
            if not action.option_strings or action.required or action.dest == "help":
                continue
            text = formatter._get_help_string(action)
            if not action.help or "default" not in text:
                undocumented.append(f"{name} {action.option_strings[-1]}: {text!r}")
    assert not undocumented, "\n".join(undocumented)


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_memory_defaults_are_trains(method, capsys):
    from finetune_ref.recipes import RECIPES

    assert main(["memory", "--method", method, "--json"]) == 0
    settings = json.loads(capsys.readouterr().out)["settings"]
    recipe = RECIPES[method]()
    assert (settings["optimizer"], settings["batch_size"], settings["seq_len"], settings["dtype"]) == \
        (recipe.optimizer, recipe.batch_size, recipe.seq_len, recipe.base_dtype())
    assert settings["adapter_dtype"] == {"full": None, "lora": "fp32", "qlora": "bf16"}[method]


@pytest.mark.parametrize("argv", [["--method", "lora", "--blocksize", "128"], ["--method", "qlora", "--blocksize", "48"],
                                  ["--method", "full", "--no-double-quant"],
                                  ["--method", "full", "--trainable-tokens", "3"],
                                  ["--trainable-tokens", "5,,6"],
                                  ["--modules-to-save", "re:norm"]])
def test_memory_refuses_what_train_refuses(argv, capsys):
    fails(["train", *argv, "--dry-run"], capsys)
    fails(["memory", *argv], capsys)


def test_memory_takes_train_s_trainable_token_ids(capsys):
    assert main(["memory", "--trainable-tokens", "0,5,17", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["trainable_tokens"] == 3
    assert "outside the vocabulary of 49152" in fails(["memory", "--trainable-tokens", "9999999"], capsys)
    assert "--ensure-weight-tying" in fails(["memory", "--targets", "all-linear,embed_tokens"], capsys)


# ---------------------------------------------------------------------------------------------------------
# Files we write read like any other: 0644 files and 0755 directories under the usual umask 022.
# ---------------------------------------------------------------------------------------------------------
def test_written_files_are_readable_by_others(tiny, tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        assert main(train_argv(tiny, tmp_path / "run", "--save-every", "1")) == 0
    finally:
        os.umask(old)
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "run").rglob("*")}
    wrong = {p: oct(m) for p, m in modes.items() if m != (0o755 if (tmp_path / p).is_dir() else 0o644)}
    assert len(modes) > 8 and not wrong, wrong


# ---------------------------------------------------------------------------------------------------------
# --no-progress prints plain lines (logs under nohup or CI show progress); --eval-tokens caps the held-out split.
# ---------------------------------------------------------------------------------------------------------
def test_no_progress_prints_a_line_per_evaluation_and_every_n_updates(tiny, tmp_path, capsys):
    assert main(train_argv(tiny, tmp_path / "run", "--steps", "5", "--log-every", "2", "--eval-every", "2")) == 0
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("update ") and "/5" in line] == \
        ["update 2/5", "update 4/5", "update 5/5"]
    assert [line.split(":")[0] for line in lines if "held-out loss" in line] == ["update 2", "update 4", "update 5"]


def test_eval_tokens_caps_the_held_out_split_deterministically(tiny, capsys):
    argv = ["eval", "--model", str(tiny[0]), "--data", str(tiny[1]), "--seq-len", "32", "--json"]
    assert main(argv) == 0
    full = json.loads(capsys.readouterr().out)
    with pytest.warns(UserWarning, match="capped at eval_tokens=320"):
        assert main([*argv, "--eval-tokens", "320"]) == 0
    capped = json.loads(capsys.readouterr().out)
    assert full["tokens"] > 320 >= capped["tokens"] > 200
    with pytest.warns(UserWarning, match="capped"):
        assert main([*argv, "--eval-tokens", "320"]) == 0
    assert json.loads(capsys.readouterr().out) == capped  # the same sequences every time


def test_log_every_may_change_on_resume(tiny, lora_run, tmp_path):
    import shutil

    run = shutil.copytree(lora_run, tmp_path / "run")
    assert main(train_argv(tiny, run, "--steps", "3", "--resume", str(run), "--extend", "--log-every", "1")) == 0


def test_a_rank_beyond_the_targeted_layers_or_a_target_matching_nothing_is_refused_before_loading(tiny, tmp_path,
                                                                                                  capsys, monkeypatch):
    from finetune_ref.recipes import lora

    def no_loading(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(lora, "load_model", no_loading)
    err = fails(train_argv(tiny, tmp_path / "run", "--rank", "17"), capsys)  # k_proj: 32 -> 16 features
    assert "--rank 17" in err and "k_proj" in err and "--rank 16 or less" in err
    err = fails(train_argv(tiny, tmp_path / "run", "--rank", "33", "--targets", "q_proj"), capsys)
    assert "--rank 32 or less" in err  # q_proj: 32 -> 32
    err = fails(train_argv(tiny, tmp_path / "run", "--targets", "re:.*nothing"), capsys)
    assert err.startswith("finetune train: error: --targets re:.*nothing: matches no layer") and "q_proj" in err
    assert "target_modules" not in err
    assert not (tmp_path / "run").exists()


def test_serve_on_a_taken_port_fails_before_loading(tiny, capsys, monkeypatch):
    import socket

    pytest.importorskip("uvicorn")
    from finetune_ref.recipes import inference

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(inference, "load_inference_model", no_loading)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        err = fails(["serve", "--model", str(tiny[0]), "--port", str(port)], capsys)
    assert f"--port {port}: cannot listen on 127.0.0.1:{port}" in err
    err = fails(["serve", "--model", str(tiny[0]), "--port", "99999"], capsys)
    assert "argument --port" in err


def test_a_value_starting_with_a_dash_is_told_to_use_the_equals_form(capsys):
    err = fails(["advise", "--gpu-memory", "-5GB"], capsys)
    assert "--gpu-memory=VALUE" in err
    err = fails(["advise", "--gpu-memory=-5GB"], capsys)
    assert "expected a size like 24GB" in err


def test_a_warmup_longer_than_the_run_is_refused_and_the_capped_default_is_said(capsys):
    err = fails(["train", "--warmup", "50", "--steps", "2", "--dry-run"], capsys)
    assert "--warmup 50" in err and "--steps 2" in err
    assert main(["train", "--steps", "2", "--dry-run"]) == 0
    assert "warmup 2 (the default 4, capped at --steps)" in capsys.readouterr().out.splitlines()[0]
    assert main(["train", "--steps", "2", "--warmup", "2", "--dry-run"]) == 0
    assert "capped" not in capsys.readouterr().out


def test_dry_run_makes_the_checks_that_need_no_weights(tiny, tmp_path, capsys):
    model, corpus = tiny
    dry = ["train", "--model", str(model), "--data", str(corpus), "--dry-run"]
    assert "--data" in fails([*dry, "--data", str(tmp_path / "missing.txt")], capsys)
    assert "--rank 17" in fails([*dry, "--rank", "17"], capsys)
    assert "--seq-len=4096" in fails([*dry, "--seq-len", "4096"], capsys)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("a user's file")
    assert "--out" in fails([*dry, "--out", str(tmp_path / "full")], capsys)
    assert main([*dry, "--out", str(tmp_path / "new")]) == 0
    assert not (tmp_path / "new").exists()  # a dry run writes nothing


@pytest.mark.parametrize("flags, named", [(["--rank", "4"], "--rank"), (["--trainable-tokens", "3"], "--trainable-tokens"),
                                          (["--init", "olora", "--dora"], "--init, --dora")])
def test_adapter_flags_with_full_fine_tuning_are_refused_not_ignored(flags, named, capsys):
    line = fails(["train", "--method", "full", "--dry-run", *flags], capsys)
    assert f"{named} do" in line and "not apply to --method full" in line


def test_a_batch_larger_than_the_training_set_names_the_flag(tiny, tmp_path, capsys):
    err = fails(train_argv(tiny, tmp_path / "run", "--batch-size", "5000"), capsys, after_progress=True)
    assert "make no full batch of 5000" in err and "--batch-size" in err
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("argv, message", [
    (["--modules-to-save", "layernorms"], "--modules-to-save layernorms names no module of the model"),
    (["--modules-to-save", "q_proj"], "in both --targets and --modules-to-save (first: model.layers.0.self_attn"),
    (["--rank", "600"], "--rank 600 is larger than k_proj allows"),
])
def test_dry_run_on_the_default_model_checks_what_a_run_would(argv, message, capsys):
    """No --model: the embedded default's cached conversion is read (config.json only), so the plan is refused
    for what the run would refuse, before any weight or data is read."""
    err = fails(["train", *argv, "--dry-run"], capsys)
    assert message in err


def test_modules_to_save_is_checked_before_the_data_and_weights(tiny, tmp_path, capsys):
    err = fails(train_argv(tiny, tmp_path / "run", "--modules-to-save", "layernorms"), capsys)
    assert "--modules-to-save layernorms names no module" in err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


@pytest.mark.parametrize("argv, message", [
    (["--modules-to-save", "lm_head"], "lm_head shares its weights with ['model.embed_tokens']"),
    (["--rank", "600"], "--rank 600 is larger than k_proj allows"),
    (["--seq-len", "100000"], "beyond the model's context of 8192 tokens"),
    (["--method", "full", "--dora"], "--dora does not apply to --method full"),
    (["--method", "full", "--targets", "q_proj"], "--targets does not apply to --method full"),
    (["--method", "full", "--adapter-dtype", "bf16"], "--adapter-dtype sets the dtype of LoRA's A and B"),
    (["--method", "full", "--modules-to-save", "norm"], "--modules-to-save does not apply to --method full"),
    (["--world-size", "4"], "--world-size 4 applies to --parallel fsdp"),
    (["--modules-to-save", "layers.0.input_layernorm"], "the layers' norms in every layer"),
])
def test_memory_refuses_what_train_refuses_of_the_model(argv, message, capsys):
    """The estimate is of a run train would make: what train refuses of the model's shapes (or of the method)
    is refused here too, in the same words, instead of estimating a run that cannot happen."""
    assert message in fails(["memory", *argv], capsys)


def test_memory_counts_modules_to_save_by_kind(capsys):
    runs = {}
    for names in ("norm", "model.norm", "input_layernorm,post_attention_layernorm,norm"):
        assert main(["memory", "--modules-to-save", names, "--json"]) == 0
        runs[names] = json.loads(capsys.readouterr().out)
    assert runs["norm"]["settings"]["modules_to_save"] == runs["model.norm"]["settings"]["modules_to_save"] == ["norm"]
    assert runs["norm"]["peak"] == runs["model.norm"]["peak"] < runs["input_layernorm,post_attention_layernorm,norm"]["peak"]


@pytest.mark.parametrize("argv, message", [
    (["eval", "--data", "/nonexistent/x.txt"], "argument --data: no such file or directory: /nonexistent/x.txt"),
    (["eval", "--adapter-scale", "nan"], "argument --adapter-scale: takes comma-separated finite numbers"),
    (["memory", "--model", "/nonexistent"], "--model /nonexistent: no config.json at /nonexistent"),
    (["train", "--eval-data", "/nonexistent/y.txt", "--dry-run"], "--eval-data /nonexistent/y.txt: no such file"),
])
def test_paths_and_numbers_are_named_by_their_flag(argv, message, capsys):
    assert message in fails(argv, capsys)


def test_a_bad_value_in_adapter_config_names_the_file(tiny, lora_run, tmp_path, capsys):
    import shutil

    adapter = shutil.copytree(lora_run, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "r": -3}))
    err = fails(["eval", "--model", str(tiny[0]), "--data", str(tiny[1]), "--adapter", str(adapter)], capsys)
    assert f"{adapter / 'adapter_config.json'}: " in err and "r must be >= 1, got -3" in err


def test_a_mistyped_flag_is_named_by_its_command_with_the_closest_flag(capsys):
    err = fails(["train", "--stepss", "3"], capsys)
    assert err.startswith("finetune train: error: unrecognized arguments: --stepss 3 (did you mean --steps?)")


def test_help_texts_show_no_docstring_markup(capsys):
    for command in ("memory", "advise", "compare", "parity", "eval"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "``" not in capsys.readouterr().out, command


@pytest.mark.parametrize("argv, line", [
    (["--bogus", "train"], "finetune: error: unrecognized arguments: --bogus (see finetune --help)"),
    (["train", "--steps", "3", "--", "foo"], "finetune train: error: unrecognized arguments: -- foo (see"),
])
def test_unknown_arguments_are_blamed_on_who_takes_them(argv, line, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and capsys.readouterr().err.strip().startswith(line)
