"""The ``finetune`` command end to end: on the real SmolLM2 model, and its one-line errors on bad input."""

import json
import subprocess
import sys

import pytest

from finetune_ref.cli.main import main

pytestmark = pytest.mark.real_model


def run_cli(*args, cwd=None):
    """Run ``python -m finetune_ref`` as a user would; returns the completed process."""
    return subprocess.run([sys.executable, "-m", "finetune_ref", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """A few real pydoc topics as a .txt file: small enough that a run takes seconds."""
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n\n".join(topics[k] for k in ("assert", "break", "continue", "pass", "del", "return",
                                                     "global", "if", "while", "for")))
    return path


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory, small_corpus, smollm2_dir):
    out = tmp_path_factory.mktemp("run")
    proc = run_cli("train", "--method", "lora", "--data", str(small_corpus), "--out", str(out), "--steps", "6",
                   "--seq-len", "64", "--batch-size", "4", "--lr", "3e-3", "--warmup", "1", "--no-progress",
                   "--eval-fraction", "0.2", "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout


def test_train_lowers_heldout_loss_and_saves_adapter(trained_adapter):
    out, stdout = trained_adapter
    before = float(stdout.split("held-out before: loss ")[1].split(",")[0])
    after = float(stdout.split("held-out after:  loss ")[1].split(",")[0])
    assert after < before, stdout
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["type"] == "train" for r in records) == 6


def test_eval_json_with_adapter_matches_training_report(trained_adapter, small_corpus):
    out, stdout = trained_adapter
    proc = run_cli("eval", "--data", str(small_corpus), "--seq-len", "64", "--eval-fraction", "0.2", "--json",
                   "--adapter", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert set(result) >= {"loss", "perplexity", "tokens"}
    after = float(stdout.split("held-out after:  loss ")[1].split(",")[0])
    assert result["loss"] == pytest.approx(after, abs=1e-4)


def test_generate_answers_a_chat_question(smollm2_dir):
    proc = run_cli("generate", "--prompt", "What is the capital of France?", "--max-new-tokens", "20")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_merge_writes_a_plain_model_equal_to_the_adapted_one(trained_adapter, tmp_path, small_corpus):
    out, stdout = trained_adapter
    merged = tmp_path / "merged"
    proc = run_cli("merge", "--adapter", str(out), "--out", str(merged))
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("eval", "--model", str(merged), "--data", str(small_corpus), "--seq-len", "64",
                   "--eval-fraction", "0.2", "--json")
    after = float(stdout.split("held-out after:  loss ")[1].split(",")[0])
    assert json.loads(proc.stdout)["loss"] == pytest.approx(after, abs=1e-4)


@pytest.mark.parametrize("argv, message", [
    (["train", "--steps", "0"], "an integer in 1.."),
    (["train", "--lr", "abc"], "a number in (0, 10]"),
    (["train", "--dropout", "1.5"], "[0, 1)"),
    (["train", "--bogus"], "unrecognized arguments"),
    (["generate"], "--prompt"),
])
def test_bad_flags_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_runtime_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "hi", "output": "there"}\n{not json}\n')
    assert main(["eval", "--data", str(bad), "--model", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["eval", "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and "Traceback" not in err
