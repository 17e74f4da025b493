"""Nothing a user made is lost, nothing wrong passes silently: the output-directory guard
(models/output_dir.py) of every command that writes, and the run record (recipes/run_record.py) that a resumed
training run is checked against. A tiny Llama (tests/tiny_model_dir.py), runs of a few updates, in-process."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune_ref.cli.main import main
from finetune_ref.train import trainer

pytestmark = pytest.mark.usefixtures("one_thread")


class SimulatedKill(Exception):
    """Stands for kill -9: the process stops between two updates, after the metrics line, without cleaning up."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_model_dir import make_model_dir

    return make_model_dir(tmp_path_factory.mktemp("tiny"))


def train_args(tiny, out=None, *extra, steps=6):
    model, corpus = tiny
    return ["train", "--model", str(model), "--data", str(corpus), "--seq-len", "32", "--batch-size", "2",
            "--eval-fraction", "0.2", "--steps", str(steps), "--warmup", "1", "--dropout", "0.1", "--no-progress",
            *(["--out", str(out)] if out is not None else []), *extra]


def crash_at(monkeypatch, update):
    """Make the next run stop like a killed process right after ``update`` (its checkpoints already written)."""
    original = trainer._checkpoint_if_due

    def checkpoint_then_die(checkpointer, state, *args):
        original(checkpointer, state, *args)
        if state.update == update:
            raise SimulatedKill

    monkeypatch.setattr(trainer, "_checkpoint_if_due", checkpoint_then_die)


def crashed_run(tiny, run, monkeypatch, at=3):
    """A run of 6 updates with checkpoints every 2, killed after update ``at``."""
    crash_at(monkeypatch, at)
    with pytest.raises(SimulatedKill):
        main(train_args(tiny, run, "--save-every", "2", "--keep-last", "0"))
    monkeypatch.undo()
    return run


def train_updates(run):
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["update"] for r in lines if r["type"] == "train"], [r for r in lines if r["type"] == "resume"]


def same_adapter(a, b):
    ta, tb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.fixture(scope="module")
def straight(tiny, tmp_path_factory):
    """The uninterrupted run every resumed one must equal bitwise."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert main(train_args(tiny, out)) == 0
    return out


# ---------------------------------------------------------------------------------------------------------
# Resume: where it writes, what it logs, what it checks.
# ---------------------------------------------------------------------------------------------------------
def test_resume_alone_writes_into_the_run_and_logs_each_update_once(tiny, straight, tmp_path, monkeypatch,
                                                                     capsys):
    run = crashed_run(tiny, tmp_path / "run", monkeypatch, at=3)  # checkpoint at 2, update 3 logged
    assert train_updates(run)[0] == [1, 2, 3]
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # --resume DIR alone: the recorded settings, from any directory
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    assert "trained updates 3-6 (4 in this session)" in capsys.readouterr().out
    assert not (elsewhere / "runs").exists()  # nothing written into runs/<method>
    assert same_adapter(run, straight)
    updates, resumes = train_updates(run)
    assert updates == [1, 2, 3, 4, 5, 6]  # update 3 once, though it was logged before the kill
    assert [(r["update"], r["dropped_lines"]) for r in resumes] == [(2, 1)]


def test_the_interrupt_message_command_works_as_printed(tiny, straight, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "finetune_ref", *train_args(tiny, out, steps=60)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").is_file() and '"train"' in (out / "metrics.jsonl").read_text():
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.02)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    command = err.split("continue with: ")[1].strip().split()
    assert command[:2] == ["finetune", "train"] and "--steps" not in command
    assert main(command[1:]) == 0
    assert train_updates(out)[0] == list(range(1, 61))


def test_resume_with_other_settings_is_refused_listing_every_difference(tiny, tmp_path, monkeypatch, capsys):
    model, corpus = tiny
    run = crashed_run(tiny, tmp_path / "run", monkeypatch, at=2)
    other_data = tmp_path / "other.txt"  # the same size, other text
    other_data.write_text(corpus.read_text().replace("the", "THE"))
    other_base = tmp_path / "base"  # the same config.json, other weights
    other_base.mkdir()
    for f in model.iterdir():
        other_base.joinpath(f.name).write_bytes(f.read_bytes())
    weights = load_file(str(model / "model.safetensors"))
    from safetensors.torch import save_file

    save_file({k: v * 1.01 for k, v in weights.items()}, str(other_base / "model.safetensors"),
              metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--data", str(other_data), "--model", str(other_base),
                 "--grad-accum", "2", "--max-grad-norm", "0.5", "--weight-decay", "0.1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "5 way(s)" in err
    for flag in ("--data", "--model", "--grad-accum: recorded 1, now 2", "--max-grad-norm: recorded 1.0, now 0.5",
                 "--weight-decay: recorded 0.0, now 0.1"):
        assert flag in err
    assert main(["train", "--resume", str(run), "--steps", "8"]) == 2
    assert "--extend" in capsys.readouterr().err
    assert train_updates(run)[0] == [1, 2]  # nothing was touched


def test_a_finished_run_says_so_and_extend_trains_it_further(tiny, straight, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(tiny, run, "--save-every", "3")) == 0  # a checkpoint at the end, to extend from
    assert same_adapter(run, straight)
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    assert "already finished at update 6" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before  # nothing retrained or rewritten
    assert main(["train", "--resume", str(run), "--steps", "8"]) == 0  # finished: says so again (no --extend)
    assert "already finished" in capsys.readouterr().out
    assert main(["train", "--resume", str(run), "--steps", "5", "--extend"]) == 2
    assert "--extend needs more than the recorded 6" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--steps", "8", "--extend", "--save-every", "2"]) == 0
    updates, resumes = train_updates(run)
    assert updates == list(range(1, 9)) and [r["update"] for r in resumes] == [6]
    record = json.loads((run / "run_config.json").read_text())
    assert record["config"]["steps"] == 8 and record["finished"]["update"] == 8
    assert record["extended"] == [{"steps": [6, 8], "at_update": 6}]
    assert not same_adapter(run, straight)


# ---------------------------------------------------------------------------------------------------------
# The output directory: not someone else's, one process, writable, written whole.
# ---------------------------------------------------------------------------------------------------------
def test_a_non_empty_out_is_refused_unless_overwrite(tiny, straight, tmp_path, capsys):
    model, _ = tiny
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    commands = {
        "train": train_args(tiny, mine, steps=1),
        "merge": ["merge", "--model", str(model), "--adapter", str(straight), "--out", str(mine),
                  "--report-batches", "0"],
        "quantize": ["quantize", "--model", str(model), "--out", str(mine)],
    }
    for name, argv in commands.items():
        capsys.readouterr()
        assert main(argv) == 2, name
        err = capsys.readouterr().err
        assert "is not empty (it holds notes.txt)" in err and "--overwrite" in err and err.count("\n") == 1
        assert (mine / "notes.txt").read_text() == "mine"
    for name, argv in commands.items():
        (mine / "notes.txt").write_text("mine")
        assert main([*argv, "--overwrite"]) == 0, name
        assert not (mine / "notes.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging dir or lock left
    # an --out inside an input
    assert main(["merge", "--model", str(model), "--adapter", str(straight), "--out", str(model / "merged")]) == 2
    assert "inside the input" in capsys.readouterr().err


def test_overwrite_keeps_the_old_run_until_the_new_one_writes(tiny, straight, tmp_path, capsys):
    """--overwrite with a flag found wrong only once the model is loaded (a modules_to_save name): the run that was
    there stays whole; a run that starts writing replaces it."""
    import shutil

    victim = tmp_path / "victim"
    shutil.copytree(straight, victim)
    before = sorted(p.relative_to(victim) for p in victim.rglob("*"))
    capsys.readouterr()
    assert main([*train_args(tiny, victim, steps=1), "--overwrite", "--modules-to-save", "layernorms"]) == 2
    err = capsys.readouterr().err
    assert "layernorms" in err and f"{victim} keeps its previous contents" in err
    assert sorted(p.relative_to(victim) for p in victim.rglob("*")) == before and same_adapter(victim, straight)
    assert main([*train_args(tiny, victim, steps=1), "--overwrite"]) == 0
    assert json.loads((victim / "run_config.json").read_text())["config"]["steps"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing set aside is left


def test_overwrite_where_nothing_can_be_set_aside_deletes_in_place(tmp_path, monkeypatch, capsys):
    """An --out that is a mount point (rename: EXDEV) cannot keep its old contents aside: they are deleted in place,
    as --overwrite asks, and nothing is left beside it."""
    import errno

    from finetune_ref.models import output_dir

    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "a.txt").write_text("old")
    (out / "sub" / "b.txt").write_text("old")
    rename, calls = output_dir.os.rename, []

    def cross_device(src, dst):  # the second move fails, as on a nested mount
        calls.append(src)
        if len(calls) == 2:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        rename(src, dst)

    monkeypatch.setattr(output_dir.os, "rename", cross_device)
    with output_dir.replaced_when_written(out):
        assert not any(out.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_second_process_on_the_same_out_fails_naming_the_holder(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from finetune_ref.models.output_dir import OutputLock\n"
         f"with OutputLock({str(out)!r}, command='finetune train --out held'):\n"
         "    print('locked', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        start = time.monotonic()
        assert main(train_args(tiny, out, steps=1)) == 2
        err = capsys.readouterr().err
        assert f"is in use by pid {holder.pid}" in err and "finetune train --out held" in err
        assert time.monotonic() - start < 5  # at once, not after loading
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding it: the lock file stays, the flock goes
        holder.wait()
    assert (tmp_path / ".run.lock").is_file()
    assert main(train_args(tiny, out, steps=1)) == 0
    assert "taking over the lock" in capsys.readouterr().err
    assert not (tmp_path / ".run.lock").exists()


@pytest.mark.parametrize("where", ["under-a-file", "read-only"])
def test_an_unwritable_out_is_found_before_anything_loads(tiny, tmp_path, monkeypatch, capsys, where):
    from finetune_ref.recipes import run as run_module

    if where == "read-only":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only directories")
        parent = tmp_path / "ro"
        parent.mkdir(mode=0o555)
        out = parent / "run"
    else:
        (tmp_path / "a-file").write_text("x")
        out = tmp_path / "a-file" / "run"

    def loaded(*args, **kwargs):
        raise AssertionError("loaded something before checking --out")

    monkeypatch.setattr(run_module.Tokenizer, "from_dir", loaded)
    assert main(train_args(tiny, out, steps=1)) == 2
    assert "cannot write there" in capsys.readouterr().err


def test_a_failed_final_write_keeps_a_checkpoint_and_says_how_to_export(tiny, straight, tmp_path, monkeypatch,
                                                                         capsys):
    from finetune_ref.recipes import run as run_module

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    run = tmp_path / "run"
    monkeypatch.setattr(run_module, "publish_files", disk_full)
    capsys.readouterr()
    assert main(train_args(tiny, run)) == 1  # no --save-every: the checkpoint is written because of the failure
    err = capsys.readouterr().err
    assert "No space left on device" in err and "checkpoint-000006" in err and err.count("error:") == 1
    assert not (run / "adapter_model.safetensors").exists() and not (run / ".result.tmp").exists()
    command = err.rsplit("with: ", 1)[1].split()
    assert command == ["finetune", "train", "--resume", str(run)]
    monkeypatch.undo()
    assert main(command[1:]) == 0
    assert same_adapter(run, straight)
    assert train_updates(run)[0] == [1, 2, 3, 4, 5, 6]

    # Where not even a checkpoint fits in --out, one goes to a temporary directory, with the run's record.
    from finetune_ref.train.checkpointing import Checkpointer

    run = tmp_path / "run2"
    monkeypatch.setattr(run_module, "publish_files", disk_full)
    monkeypatch.setattr(Checkpointer, "save", lambda *a: disk_full())
    assert main(train_args(tiny, run)) == 1
    command = capsys.readouterr().err.rsplit("with: ", 1)[1].split()
    monkeypatch.undo()
    assert command[-1] == "NEW_DIR" and "finetune-rescue-" in command[3]
    try:
        assert main([*command[1:-1], str(tmp_path / "exported")]) == 0
        assert same_adapter(tmp_path / "exported", straight)
    finally:
        shutil.rmtree(Path(command[3]).parents[1])


def test_every_run_ends_with_a_checkpoint_so_the_printed_extend_command_works(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(tiny, run)) == 0  # --save-every 0 (the default)
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    said = capsys.readouterr().out
    command = said.split("To train it further: ")[1].split(" (N >")[0].replace("N", "8").split()
    assert main(command[1:]) == 0
    assert train_updates(run)[0] == list(range(1, 9))


def test_resume_never_goes_back_past_a_finished_result(tiny, tmp_path, monkeypatch, capsys):
    run = crashed_run(tiny, tmp_path / "run", monkeypatch, at=3)  # checkpoint at update 2
    # A finished run whose newest checkpoint is older than its result (as runs finished before every run
    # ended with a checkpoint): simulated by dropping the final checkpoint.
    assert main(["train", "--resume", str(run)]) == 0
    ckpts = run / "checkpoints"
    shutil.rmtree(ckpts / "checkpoint-000006", ignore_errors=True)
    (ckpts / "latest").write_text("checkpoint-000002\n")
    adapter = (run / "adapter_model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--steps", "8", "--extend"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "update 2" in err and "updates 3-6" in err
    assert train_updates(run)[0] == [1, 2, 3, 4, 5, 6]  # nothing dropped
    assert (run / "adapter_model.safetensors").read_bytes() == adapter
    assert main(["train", "--resume", str(run)]) == 0
    assert "--extend" not in capsys.readouterr().out  # it cannot work here: not offered


def test_extending_a_run_that_saves_its_own_4bit_base_replaces_that_base(tiny, tmp_path):
    # QLoRA with --init olora saves the re-quantized base beside the adapter (OUT/olora_base); the extended run's
    # final write must replace that directory, not fail on it (a rename cannot replace a non-empty directory) and
    # leave a new adapter_config.json beside the old weights.
    run = tmp_path / "run"
    args = train_args(tiny, run, "--method", "qlora", "--init", "olora", "--save-every", "2", steps=2)
    assert main(args) == 0
    assert main(["train", "--resume", str(run), "--steps", "3", "--extend"]) == 0
    assert (run / "olora_base").is_dir() and not list(run.glob(".*replaced"))
    weights = load_file(str(run / "adapter_model.safetensors"))
    record = json.loads((run / "run_config.json").read_text())
    assert record["finished"]["update"] == 3 and weights
    assert main(["eval", "--model", str(run / "olora_base"), "--adapter", str(run), "--data", str(tiny[1]),
                 "--seq-len", "32", "--eval-fraction", "0.2"]) == 0
