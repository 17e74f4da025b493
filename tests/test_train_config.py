"""``finetune train --config FILE.yaml``: the file goes through the flags' own parser, the resolved config gives the
same run back, bad files are one-line errors naming the line and key, and every shipped file dry-runs."""

import argparse
import dataclasses

import pytest

from finetune_ref.cli.main import build_parser, main
from finetune_ref.cli.train import run_config, train_arguments
from finetune_ref.cli.train_config import config_text, packaged_configs, read_config, resolve_config

pytestmark = pytest.mark.usefixtures("one_thread")

SHIPPED = {"lora", "qlora", "full", "qlora-llama-3.1-8b-24gb", "qlora-llama-3.1-70b-80gb", "qlora-llama-3.1-70b-fsdp"}


def resolve(*argv):
    """The RunConfig ``finetune train *argv`` would run."""
    return resolve_config(build_parser().parse_args(["train", *argv]), train_arguments(), run_config)[1][0]


@pytest.mark.parametrize("argv", [
    (),
    ("--method", "lora", "--rank", "16", "--alpha", "32", "--targets", "q_proj,v_proj", "--lr", "3e-4",
     "--grad-checkpointing", "--log", "tensorboard,wandb", "--plot", "--data", "my data: v1.jsonl", "--seed", "7"),
    ("--method", "lora", "--targets", r"re:.*\.(q|v)_proj", "--rslora", "--dropout", "0.05", "--no-progress"),
    ("--method", "lora", "--modules-to-save", "norm,lm_head", "--dora"),
    ("--method", "qlora", "--blocksize", "128", "--no-double-quant", "--compute-dtype", "fp32", "--lr", "2e-4",
     "--steps", "3", "--warmup", "2"),
    ("--method", "full", "--precision", "bf16", "--lr", "2e-5", "--min-lr-ratio", "0", "--weight-decay", "0.01",
     "--max-grad-norm", "0", "--eval-every", "5", "--early-stopping-patience", "2", "--out", "runs/x"),
])
def test_resolved_config_file_gives_the_same_run(argv, tmp_path):
    cfg = resolve(*argv)
    path = tmp_path / "train_config.yaml"
    path.write_text(config_text(cfg, train_arguments()))
    again = resolve("--config", str(path))
    assert again == cfg
    assert type(again) is type(cfg)
    # and the file written from it is the same text: nothing drifts on a second round
    assert config_text(again, train_arguments()) == path.read_text()


def test_command_line_overrides_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: qlora\nsteps: 50\nrank: 4\ngrad-checkpointing: true\n")
    cfg = resolve("--config", str(path), "--steps", "7", "--lr", "5e-4")
    assert (cfg.method, cfg.steps, cfg.lr, cfg.rank, cfg.grad_checkpointing) == ("qlora", 7, 5e-4, 4, True)
    assert cfg.optimizer == "paged_adamw"  # QLoRA's recipe default, not LoRA's
    assert dataclasses.replace(cfg, steps=50, lr=1e-3) == resolve("--config", str(path))


def test_values_are_parsed_by_the_flags_types(tmp_path):
    """YAML 1.1 reads 1e-3 as a string and 1.0e-3 as a float; the flag's own type reads both the same."""
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-3\nwarmup: 2\nmodel: null\ntargets: 're:.*proj'\nrslora: false\n")
    ns, origins = read_config(path, train_arguments())
    assert vars(ns) == {"lr": 1e-3, "warmup_steps": 2, "targets": ".*proj"}
    assert origins == {"lr": ("lr", 1), "warmup_steps": ("warmup", 2), "targets": ("targets", 4)}


@pytest.mark.parametrize("text, message", [
    ("method: lora\nsteps: 0\n", "run.yaml, line 2: steps: expected an integer in 1..10000000, got 0"),
    ("lr: 1e-3\n\nmin_lr_ratio: 0.2\n", "run.yaml, line 3: unknown key 'min_lr_ratio'; did you mean 'min-lr-ratio'?"),
    ("precision: fp8\n", "run.yaml, line 1: precision: invalid choice: 'fp8'"),
    ("rank: [4, 8]\n", "run.yaml, line 1: rank: expected one value, got a list"),
    ("rank: {r: 4}\n", "run.yaml, line 1: rank: expected one value, got a mapping"),
    ("steps: many\n", "run.yaml, line 1: steps: expected an integer in 1..10000000, got 'many'"),
    ("lr: 1e-3\nrslora: 1\n", "run.yaml, line 2: rslora: expected true or false, got '1'"),
    ("lr: 1e-3\nseed: 1\nlr: 2e-3\n", "run.yaml, line 3: lr: given twice (first on line 1)"),
    ("# a comment\nmin-lr-ratio: 2\n", "run.yaml, line 2: min-lr-ratio: "),  # out of [0, 1]
    # a check across two keys names the line of the first key its message names
    ("steps: 3\nwarmup: 2\neval-every: 0\nearly-stopping-patience: 2\n",
     ("run.yaml, line 3: eval-every: ", "run.yaml, line 4: early-stopping-patience: ")),
    ("method: lora\nblocksize: 64\n", "run.yaml, line 2: blocksize: --blocksize, --no-double-quant and"),
    ("config: other.yaml\n", "run.yaml, line 1: config is not a key of a file: give --config on the command line"),
    ("steps: 3\noverwrite: true\n", "run.yaml, line 2: overwrite is not a key of a file: give --overwrite on the"),
    ("- lr: 1\n", "run.yaml, line 1: expected 'flag-name: value' lines"),
    ("lr: [1e-3\n", "run.yaml, line 2: not valid YAML"),
])
def test_bad_files_are_one_line_errors_naming_line_and_key(text, message, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    assert main(["train", "--config", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("finetune train: error: ") and err.count("\n") == 1, err
    assert any(m in err for m in ((message,) if isinstance(message, str) else message)), err


def test_a_missing_config_lists_the_shipped_ones(capsys):
    assert main(["train", "--config", "no-such-run", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "--config no-such-run: no such file" in err and "qlora-llama-3.1-8b-24gb" in err


def test_every_shipped_config_loads_and_dry_runs(capsys):
    """Each file of recipes/*.yaml (package data) parses into its recipe and dry-runs; the model-path ones name a
    directory the user supplies, which a dry run does not open."""
    shipped = packaged_configs()
    assert set(shipped) == SHIPPED
    for name, path in shipped.items():
        text = path.read_text()
        assert text.startswith("# "), f"{name}: the file starts with a comment saying what it is for"
        assert "Needs" in text.split("\n\n")[0] or "needs" in text.split("method:")[0].lower(), name
        cfg = resolve("--config", name)
        assert cfg.method == read_config(path, train_arguments())[0].method
        assert main(["train", "--config", name, "--dry-run"]) == 0, capsys.readouterr().err
        out = capsys.readouterr().out
        assert out.startswith(f"method {cfg.method}, precision {cfg.precision}, optimizer {cfg.optimizer}, "
                              f"{cfg.steps} updates"), out
    assert resolve("--config", "qlora-llama-3.1-8b-24gb").model == "Meta-Llama-3.1-8B"
    assert resolve("--config", "qlora-llama-3.1-70b-fsdp").parallel == "fsdp"


def test_print_config_prints_the_resolved_file_and_trains_nothing(tmp_path, capsys):
    assert main(["train", "--config", "qlora", "--rank", "4", "--out", str(tmp_path / "run"), "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# finetune train --config") and "\nrank: 4\n" in printed
    assert "method: qlora\n" in printed and "no-double-quant: false\n" in printed
    assert not (tmp_path / "run").exists()
    (tmp_path / "again.yaml").write_text(printed)
    assert resolve("--config", str(tmp_path / "again.yaml")) == resolve("--config", "qlora", "--rank", "4",
                                                                        "--out", str(tmp_path / "run"))


def test_file_keys_are_the_flags_of_train():
    """Every flag of ``finetune train`` is a key, spelled as the flag; but those about this invocation (--config,
    --print-config, --overwrite, --extend: each must be typed each time)."""
    from finetune_ref.cli.train_config import file_keys

    flags = {opt[2:] for a in train_arguments()._actions for opt in a.option_strings if opt.startswith("--")}
    assert set(file_keys(train_arguments())) == flags - {"config", "print-config", "overwrite", "extend"}
    assert {"min-lr-ratio", "warmup", "no-double-quant", "log", "plot"} <= flags
    assert isinstance(train_arguments(), argparse.ArgumentParser)


@pytest.mark.parametrize("value", ["re:.*norm", "all-linear"])
def test_modules_to_save_takes_names_not_a_regex(value, capsys):
    """PEFT's modules_to_save is a list of module names: a regex (which --targets takes) would have been matched
    as a literal name and chosen nothing or the wrong modules; it is refused naming the flag."""
    with pytest.raises(SystemExit) as e:
        main(["train", "--modules-to-save", value, "--print-config"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--modules-to-save" in err and "not " + repr(value) in err and "norm" in err
