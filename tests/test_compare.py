"""``finetune compare`` (cli/compare.py) on a tiny random Llama: the table, the files, the errors.

The real SmolLM2 run is documented in docs/compare.md; here every method trains a few updates of a
2-layer model so the whole file takes seconds.
"""

import argparse
import json
import math
from pathlib import Path

import pytest
import torch

from finetune_ref.cli.compare_settings import METHODS, CompareSettings
from finetune_ref.cli.compare import add_compare_parser, cmd_compare, compare, compare_main, settings_from_args
from finetune_ref.cli.compare_report import format_table
from finetune_ref.cli.compare_settings import regression_documents


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer Llama (hidden 128) with a 350-token byte-level BPE, and a small text for the regression set."""
    from tiny_model_dir import make_model_dir

    root = tmp_path_factory.mktemp("tiny")
    make_model_dir(root, hidden=128, layers=2)
    (root / "other.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    return root


def settings(tiny, out, **kw):
    base = dict(model_dir=str(tiny / "model"), steps=3, batch_size=2, seq_len=32, warmup=1, eval_every=2,
                eval_tokens=128, rank=2, out=str(out), regression_data=str(tiny / "other.txt"), threads=1,
                isolate=False)
    return CompareSettings(**{**base, **kw})


@pytest.fixture(scope="module")
def report(tiny, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster than two fighting over two cores
    try:
        return compare(settings(tiny, tmp_path_factory.mktemp("out")))
    finally:
        torch.set_num_threads(threads)


def test_table_has_every_method_with_sensible_values(report):
    rows = {r["method"]: r for r in report["results"]}
    assert set(rows) == set(METHODS)
    assert rows["full"]["trainable_pct"] == 100 and rows["full"]["trainable_params"] == rows["full"]["total_params"]
    for m in ("lora", "qlora"):
        assert 0 < rows[m]["trainable_pct"] < 5
        assert rows[m]["trainable_params"] == rows["lora"]["trainable_params"]
        assert rows[m]["saved_bytes"] * 5 < rows["full"]["saved_bytes"]  # an adapter vs the whole model
    for r in rows.values():
        mem = r["memory"]
        parts = [mem[k] for k in ("weights", "gradients", "optimizer_states", "activations")]
        assert all(p >= 0 for p in parts) and sum(parts) <= mem["peak"] and mem["activations"] > 0
        assert abs(r["estimated_peak"] / mem["peak"] - 1) < 0.1  # the analytic estimator agrees
        assert mem["gradients_all"] >= mem["gradients"] and mem["gradients_all"] >= 2 * r["trainable_params"]
        assert r["max_rss"] > mem["peak"] and r["tokens_per_s"] > 0 and r["wall_s"] >= r["train_s"] > 0
        for when in ("before", "after"):
            for key in ("heldout", "regression"):
                assert math.isfinite(r[when][key]["loss"]) and r[when][key]["tokens"] > 0
        assert len(r["curve"]["train"]) == 3 and [u for u, _ in r["curve"]["heldout"]] == [0, 2, 3]
    # full and LoRA start from the same bf16 base; QLoRA from its NF4 version
    assert rows["full"]["before"]["heldout"]["loss"] == pytest.approx(rows["lora"]["before"]["heldout"]["loss"],
                                                             rel=1e-4)
    # NF4 weights + adapters take less memory than the bf16 weights; full keeps 12 B/param of optimizer state
    assert rows["qlora"]["memory"]["weights"] < rows["lora"]["memory"]["weights"]
    assert rows["full"]["memory"]["optimizer_states"] == pytest.approx(12 * rows["full"]["trainable_params"], rel=0.01)


def test_files_written(report):
    out = Path(report["results"][0]["saved_dir"]).parent
    saved = json.loads((out / "compare.json").read_text())
    assert [r["method"] for r in saved["results"]] == list(METHODS)
    table = (out / "compare.md").read_text()
    assert table == format_table(saved) + "\n"
    assert all(f"| {m} |" in table for m in METHODS)
    assert (out / "full" / "model.safetensors").is_file() and (out / "lora" / "adapter_config.json").is_file()
    if report["plot"]:
        assert (out / "compare.png").stat().st_size > 1000


def test_isolated_run_and_missing_matplotlib(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import fails: message, no plot
    rep = compare(settings(tiny, tmp_path, methods=("lora",), isolate=True, regression_data=None))
    assert rep["plot"] is None and "pip install matplotlib" in capsys.readouterr().out
    row = rep["results"][0]
    assert row["method"] == "lora" and row["max_rss"] > 0 and math.isfinite(row["after"]["heldout"]["loss"])
    assert ("regression" in row["after"]) == (row["regression_corpus"] is not None)


def parse(*argv):
    parser = argparse.ArgumentParser(prog="finetune")
    add_compare_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["compare", *argv])


@pytest.mark.parametrize("argv", [["--methods", "full,bogus"], ["--methods", "lora,lora"], ["--steps", "0"],
                                  ["--seq-len", "-3"], ["--lr-lora", "-1e-3"], ["--lr-full", "nan"],
                                  ["--precision", "fp16"], ["--eval-tokens", "x"]])
def test_bad_arguments_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(*argv)
    assert exit_.value.code == 2 and "error:" in capsys.readouterr().err


def test_defaults_quick_and_overrides():
    s = settings_from_args(parse())
    assert (s.methods, s.steps, s.seq_len, s.precision, s.isolate) == (METHODS, 40, 256, "bf16", True)
    q = settings_from_args(parse("--quick", "--methods", "qlora,lora", "--steps", "1", "--lr-qlora", "3e-4"))
    assert (q.methods, q.steps, q.warmup, q.seq_len, q.lr["qlora"]) == (("qlora", "lora"), 1, 1, 128, 3e-4)


def test_bad_settings_and_unwritable_out(tmp_path, capsys):
    for bad in (dict(methods=("bogus",)), dict(methods=()), dict(precision="fp16"), dict(steps=0),
                dict(warmup=50), dict(lr={"full": 0.0, "lora": 1e-3, "qlora": 1e-3}),
                dict(model_dir=str(tmp_path)), dict(regression_data=str(tmp_path / "missing.txt"))):
        with pytest.raises(ValueError):
            CompareSettings(**bad).validate()
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="cannot write there"):
        cmd_compare(parse("--out", str(blocker / "sub"), "--steps", "1"))
    assert compare_main(["--out", str(blocker / "sub")]) == 2
    assert capsys.readouterr().err.count("\n") == 1  # one line, no traceback


def test_default_regression_corpus_is_off_domain_english():
    name, docs = regression_documents()
    if name is None:
        pytest.skip("chatterbot-corpus is not installed (pip install -e '.[compare]')")
    text = "\n".join(docs)
    assert len(docs) >= 10 and len(text) > 40_000
    assert "Hello" in text and "Who wrote vineland" .lower() in text.lower()  # greetings, literature
    assert "What is a computer?" not in text and "My system is overheating." not in text  # no computing
