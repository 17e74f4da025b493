"""What ``finetune`` does with bad input: one line naming the flag or the file, exit status 2, no traceback.

Everything runs in-process (``finetune_ref.cli.main.main``) on tiny random models (``tiny_model_dir``): seconds.
"""

import json

import pytest

from finetune_ref.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")


def fails(argv, capsys) -> str:
    """The one-line error of a command that must exit with status 2 (from argparse or from the command)."""
    try:
        status = main(argv)
    except SystemExit as exc:
        status = exc.code
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


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
