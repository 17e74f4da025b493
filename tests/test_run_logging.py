"""What a run leaves to look at: metrics.jsonl, TensorBoard events read back by TensorBoard's own reader, an
offline W&B run, train_config.yaml that repeats the run, and the plots (``train --plot``, ``finetune plot``); and
the one-line errors when an optional package is missing. Short runs of a tiny model (seconds each)."""

import json
import sys

import pytest

from finetune_ref.cli.main import build_parser, main
from finetune_ref.cli.train import run_config, train_arguments
from finetune_ref.cli.train_config import resolve_config

pytestmark = pytest.mark.usefixtures("one_thread")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_model_dir import make_model_dir

    return make_model_dir(tmp_path_factory.mktemp("tiny"))


def train_argv(tiny, out, *extra):
    model_dir, corpus = tiny
    return ["train", "--config", "lora", "--model", str(model_dir), "--data", str(corpus), "--out", str(out),
            "--steps", "6", "--warmup", "2", "--seq-len", "64", "--eval-every", "2", "--no-progress", *extra]


@pytest.fixture(scope="module")
def logged_run(tiny, tmp_path_factory):
    """One run with both loggers and --plot; W&B offline in a home of its own (no login, no network)."""
    out = tmp_path_factory.mktemp("runs") / "lora-a"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(out.parent))
        for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_PROJECT"):
            mp.delenv(name, raising=False)
        mp.setenv("WANDB_SILENT", "true")
        argv = train_argv(tiny, out, "--log", "tensorboard,wandb", "--plot")
        assert main(argv) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, argv, records


def test_metrics_jsonl_has_every_update_and_evaluation(logged_run):
    _, _, records = logged_run
    train = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    # the evaluation before training is update 0
    assert [r["update"] for r in train] == [1, 2, 3, 4, 5, 6] and [r["update"] for r in evals] == [0, 2, 4, 6]
    for r in train:
        assert {"loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_mib"} <= set(r) and r["peak_memory_mib"] > 0
    for r in evals:
        assert r["perplexity"] == pytest.approx(2.718281828 ** r["loss"]) and r["peak_memory_mib"] > 0


def test_tensorboard_events_read_back_with_the_logged_values(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, records = logged_run
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/peak_memory_mib",
            "eval/loss", "eval/perplexity", "eval/peak_memory_mib"} <= tags
    for kind, key in [("train", "loss"), ("train", "lr"), ("train", "grad_norm"), ("train", "tokens_per_s"),
                      ("eval", "loss"), ("eval", "perplexity")]:
        logged = [(r["update"], r[key]) for r in records if r["type"] == kind]
        read = [(e.step, e.value) for e in events.Scalars(f"{kind}/{key}")]
        assert [s for s, _ in read] == [u for u, _ in logged]
        # TensorBoard stores scalars as float32
        assert [v for _, v in read] == pytest.approx([v for _, v in logged], rel=1e-6), f"{kind}/{key}"


def wandb_history(run_file):
    """The ``history`` records (one per ``run.log``) of an offline W&B run file: W&B writes its protobuf
    ``Record`` messages in LevelDB's log format (wandb/sdk/internal/datastore.py of wandb <= 0.18: a 7-byte
    ':W&B' header, 32 KiB blocks, each chunk (crc32, length, type) + bytes; type 1 full, 2 first, 3 middle, 4 last)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block, pos, record = run_file.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    history = []
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # the zero padding at the end of a block
            pos += left
            continue
        record = (b"" if kind in (1, 2) else record) + data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            message = wandb_internal_pb2.Record()
            message.ParseFromString(record)
            if message.WhichOneof("record_type") == "history":
                history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                for item in message.history.item})
    return history


def test_wandb_runs_offline_with_the_logged_values(logged_run):
    out, _, records = logged_run
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))  # offline: no login, nothing sent
    assert len(runs) == 1, sorted((out / "wandb").rglob("*"))[:20]
    history = {h["_step"]: h for h in wandb_history(runs[0])}
    assert sorted(history) == [0, 1, 2, 3, 4, 5, 6]
    for r in records:
        if r["type"] in ("train", "eval"):
            keys = ("loss", "lr", "grad_norm", "tokens_per_s") if r["type"] == "train" else ("loss", "perplexity")
            for key in keys:
                assert history[r["update"]][f"{r['type']}/{key}"] == pytest.approx(r[key], rel=1e-12), key


def test_train_config_yaml_repeats_the_run(logged_run):
    out, argv, _ = logged_run
    parse = build_parser().parse_args
    ran = resolve_config(parse(argv), train_arguments(), run_config)[1][0]  # run_config: (config, record, dir)
    again = resolve_config(parse(["train", "--config", str(out / "train_config.yaml")]), train_arguments(),
                           run_config)[1][0]
    assert again == ran and again.log == ("tensorboard", "wandb") and again.plot


def test_train_plot_and_finetune_plot_overlay(logged_run, tiny, tmp_path, capsys):
    out, _, _ = logged_run
    assert (out / "loss.png").read_bytes().startswith(PNG_SIGNATURE)
    other = tmp_path / "lora-b"
    assert main(train_argv(tiny, other, "--lr", "3e-3")) == 0
    plot = tmp_path / "plots" / "both.png"
    assert main(["plot", str(out), str(other), "--out", str(plot)]) == 0
    assert plot.read_bytes().startswith(PNG_SIGNATURE) and plot.stat().st_size > 20_000
    capsys.readouterr()
    assert main(["plot", str(out), "--out", str(plot)]) == 2  # nothing is overwritten unasked
    assert "--overwrite" in capsys.readouterr().err
    assert main(["plot", str(out), "--out", str(plot), "--overwrite"]) == 0
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_read_curves_keeps_the_last_record_of_an_update(tmp_path):
    from finetune_ref.train.plots import read_curves

    lines = [{"type": "train", "update": 1, "loss": 3.0, "lr": 1e-3, "tokens_per_s": 10.0},
             {"type": "train", "update": 2, "loss": 2.5, "lr": 1e-3, "tokens_per_s": 10.0},
             {"type": "resume", "update": 1, "checkpoint": "c"},
             {"type": "train", "update": 2, "loss": 2.4, "lr": 1e-3, "tokens_per_s": 11.0},
             {"type": "eval", "update": 2, "loss": 2.6, "perplexity": 13.5, "tokens": 9}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    curves = read_curves(tmp_path, name="r")
    assert curves.train_loss == [(1, 3.0), (2, 2.4)] and curves.heldout_loss == [(2, 2.6)]


@pytest.mark.parametrize("module, argv_extra, message", [
    ("wandb", ("--log", "wandb"), "--log wandb needs the wandb package: pip install 'finetune-ref[wandb]'"),
    ("tensorboard", ("--log", "tensorboard"),
     "--log tensorboard needs the tensorboard package: pip install 'finetune-ref[tensorboard]'"),
    ("matplotlib", ("--plot",), "plotting needs matplotlib: pip install 'finetune-ref[plot]'"),
])
def test_a_missing_optional_package_is_one_line_naming_the_extra(module, argv_extra, message, tiny, tmp_path,
                                                                  monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # import and find_spec see it missing
    out = tmp_path / "run"
    assert main(train_argv(tiny, out, *argv_extra)) == 2
    err = capsys.readouterr().err
    assert err == f"finetune train: error: {message}\n"
    assert not out.exists()  # refused before anything was written
    if module == "matplotlib":
        out.mkdir()
        (out / "metrics.jsonl").write_text("")
        assert main(["plot", str(out), "--out", str(tmp_path / "p.png")]) == 2
        assert capsys.readouterr().err == f"finetune plot: error: {message}\n"
