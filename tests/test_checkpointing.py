"""Training checkpoints: bitwise resume (6 updates == 3 + resume + 3), Ctrl-C, atomicity, corrupt and
mismatched checkpoints, early stopping and best-model tracking. Tiny random models; fp32 unless stated."""

import json
import os
import signal

import pytest
import torch

from finetune_ref.models.checkpoint import read_safetensors
from finetune_ref.train import checkpointing
from finetune_ref.train.checkpointing import Checkpointer
from finetune_ref.train.checkpoint_files import read_checkpoint_record, resolve_checkpoint
from finetune_ref.train.data import BatchIterator, pack_documents
from finetune_ref.train.config import TrainConfig
from finetune_ref.train.bookkeeping import TrainingInterrupted
from finetune_ref.train.trainer import train
from finetune_ref.full import prepare_full_finetuning
from finetune_ref.lora import LoraConfig, inject_lora
from finetune_ref.models.config import LlamaConfig
from finetune_ref.models.llama import LlamaForCausalLM

VOCAB = 64


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed=0, tied=True):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied))


def examples(n_docs=24, seq_len=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(3, VOCAB, (int(torch.randint(4, 30, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n_docs)]
    return pack_documents(docs, seq_len, eos_token_id=2)


def setup(method, seed=0):
    """(model, metadata) for 'full', 'full-bf16' or 'lora' (LoRA with dropout, so RNG state matters)."""
    model = tiny_model(seed)
    if method == "full":
        prepare_full_finetuning(model, torch.float32)
    elif method == "full-bf16":
        prepare_full_finetuning(model, torch.bfloat16)
    else:
        inject_lora(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules="all-linear"))
    return model, {"method": method}


def config(steps=6, **kw):
    base = dict(steps=steps, lr=5e-3, warmup_steps=2, grad_accum=2, progress=False, weight_decay=0.01,
                eval_every=2, precision="bf16" if kw.pop("bf16", False) else "fp32", optimizer="adamw")
    base.update(kw)
    return TrainConfig(**base)


def run(method, tmp, steps=6, resume=None, on_update=None, save_every=3, **kw):
    model, meta = setup(method)
    data = BatchIterator(examples(), batch_size=2, pad_token_id=0, seed=3)
    held = [next(BatchIterator(examples(seed=9), batch_size=4, pad_token_id=0))]
    from finetune_ref.train.evaluation import evaluate

    ckpt = Checkpointer(tmp, save_every=save_every, keep_last=0, metadata=meta)
    result = train(model, data, config(steps, bf16=method == "full-bf16", **kw),
                   eval_fn=lambda: evaluate(model, held), checkpointer=ckpt, resume_from=resume, on_update=on_update)
    return model, result


def assert_same_parameters(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs"


@pytest.mark.parametrize("method", ["full", "full-bf16", "lora"])
def test_resume_is_bitwise_identical(tmp_path, method):
    straight, r1 = run(method, tmp_path / "a")
    resumed, r2 = run(method, tmp_path / "b", resume=tmp_path / "a" / "checkpoint-000003")
    assert_same_parameters(straight, resumed)
    assert r2["loss"] == r1["loss"] and r2["eval"] == r1["eval"]
    assert (r2["best_update"], r2["best_loss"]) == (r1["best_update"], r1["best_loss"])
    if method == "full-bf16":
        assert straight.lm_head.weight is straight.model.embed_tokens.weight  # still tied after training
    # The resumed run's final checkpoint equals the straight run's, file for file (optimizer state included).
    for name in ("model.safetensors", "optimizer.safetensors"):
        a = read_safetensors(tmp_path / "a" / "checkpoint-000006" / name)
        b = read_safetensors(tmp_path / "b" / "checkpoint-000006" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_ctrl_c_writes_a_checkpoint_then_resume_matches(tmp_path):
    def interrupt_at_4(update, metrics):
        if update == 4:
            # raise_signal: to this thread, handler run before it returns (os.kill may reach an OpenMP thread and
            # the handler then runs a few bytecodes later, after the loop has checked for a stop)
            signal.raise_signal(signal.SIGINT)

    handler = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN when started in the background
    with pytest.raises(TrainingInterrupted) as info:
        run("lora", tmp_path / "a", save_every=0, on_update=interrupt_at_4)
    assert info.value.update == 4 and info.value.checkpoint.name == "checkpoint-000004"
    assert resolve_checkpoint(tmp_path / "a") == info.value.checkpoint  # "latest" points at it
    assert signal.getsignal(signal.SIGINT) is handler  # handler restored
    resumed, _ = run("lora", tmp_path / "a", save_every=0, resume=tmp_path / "a")
    straight, _ = run("lora", tmp_path / "b", save_every=0)
    assert_same_parameters(straight, resumed)


def test_checkpoint_contents_and_keep_last(tmp_path):
    model, meta = setup("full")
    data = BatchIterator(examples(), batch_size=2, pad_token_id=0, seed=3)
    ckpt = Checkpointer(tmp_path, save_every=1, keep_last=2, metadata=meta)
    train(model, data, config(steps=4, eval_every=0), checkpointer=ckpt)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-000003", "checkpoint-000004"]
    assert not list(tmp_path.glob(".tmp-*"))
    record = read_checkpoint_record(tmp_path)
    assert record["update"] == 4 and record["data"]["index"] == data.state_dict()["index"]
    assert record["scheduler"]["update"] == 4 and record["optimizer"]["class"] == "AdamW"
    # Tied embedding stored once, under its first name; no lm_head.weight key.
    tensors = read_safetensors(tmp_path / "checkpoint-000004" / "model.safetensors")
    assert "model.embed_tokens.weight" in tensors and "lm_head.weight" not in tensors
    assert torch.equal(tensors["model.embed_tokens.weight"], model.model.embed_tokens.weight)


def test_crash_while_saving_leaves_previous_checkpoint(tmp_path, monkeypatch):
    model, meta = setup("full")
    data = BatchIterator(examples(), batch_size=2, pad_token_id=0, seed=3)
    ckpt = Checkpointer(tmp_path, save_every=1, keep_last=0, metadata=meta)
    real_save = checkpointing.save_file
    calls = {"n": 0}

    def failing_save(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 5:  # second checkpoint, second file
            raise OSError("disk full")
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpointing, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        train(model, data, config(steps=3, eval_every=0), checkpointer=ckpt)
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-000001"]
    assert not list(tmp_path.glob(".tmp-*"))
    assert resolve_checkpoint(tmp_path).name == "checkpoint-000001"
    read_checkpoint_record(tmp_path)  # intact


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    run("lora", root, steps=4, save_every=2)
    return root


def copy_checkpoint(saved, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(saved / "checkpoint-000002", dst)
    return dst


@pytest.mark.parametrize("damage, match", [
    ("flip", "SHA-256"), ("truncate", "bytes"), ("delete", "missing"), ("json", "not valid JSON"),
    ("edit-state", "trainer_state.json does not match"),  # a hand-edited value of trainer_state.json itself
])
def test_corrupt_checkpoint_is_a_clear_error(saved, tmp_path, damage, match):
    ckpt = copy_checkpoint(saved, tmp_path)
    target = ckpt / "optimizer.safetensors"
    if damage == "flip":
        raw = bytearray(target.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        target.write_bytes(bytes(raw))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-10])
    elif damage == "delete":
        target.unlink()
    elif damage == "edit-state":
        state = ckpt / "trainer_state.json"
        state.write_text(state.read_text().replace('"peak_lr": 0.005', '"peak_lr": 0.006'))
    else:
        (ckpt / "trainer_state.json").write_text("{not json")
    with pytest.raises(ValueError, match=match):
        run("lora", tmp_path / "out", resume=ckpt)


def test_missing_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    with pytest.raises(FileNotFoundError, match="no training checkpoint"):
        run("lora", tmp_path / "out", resume=tmp_path / "nothing-here")


@pytest.mark.parametrize("change, match", [
    ("method", "different setup"),          # checkpoint of LoRA, resumed as full fine-tuning
    ("steps", "LR schedule differs"),
    ("batch", "batch_size"),
    ("rank", "does not match the model"),
])
def test_mismatched_checkpoint_is_a_clear_error(saved, tmp_path, change, match):
    ckpt = saved / "checkpoint-000002"
    if change == "method":
        with pytest.raises(ValueError, match=match):
            run("full", tmp_path, resume=ckpt)
    elif change == "steps":
        with pytest.raises(ValueError, match=match):
            run("lora", tmp_path, steps=8, resume=ckpt)
    elif change == "batch":
        model, meta = setup("lora")
        data = BatchIterator(examples(), batch_size=3, pad_token_id=0, seed=3)
        with pytest.raises(ValueError, match=match):
            train(model, data, config(4), checkpointer=Checkpointer(tmp_path, metadata=meta), resume_from=ckpt)
    else:
        model = tiny_model()
        inject_lora(model, LoraConfig(r=2, lora_alpha=8, target_modules="all-linear"))
        data = BatchIterator(examples(), batch_size=2, pad_token_id=0, seed=3)
        with pytest.raises(ValueError, match=match):
            train(model, data, config(4), checkpointer=Checkpointer(tmp_path, metadata={"method": "lora"}),
                  resume_from=ckpt)


def test_early_stopping_and_best_tracking(tmp_path):
    model, meta = setup("lora")
    data = BatchIterator(examples(), batch_size=2, pad_token_id=0, seed=3)
    losses = iter([3.0, 2.0, 2.5, 2.1, 1.0])  # best at update 2 (eval 2); evals 3 and 4 do not improve
    ckpt = Checkpointer(tmp_path, save_every=0, metadata=meta)
    result = train(model, data, config(steps=10, eval_every=1, early_stopping_patience=2),
                   eval_fn=lambda: {"loss": next(losses), "perplexity": 0.0, "tokens": 1}, checkpointer=ckpt)
    assert result["stopped_early"] and result["update"] == 4
    assert (result["best_update"], result["best_loss"]) == (2, 2.0)
    best = json.loads((tmp_path / "best" / "best.json").read_text())
    assert best == {"update": 2, "eval_loss": 2.0}
    assert (tmp_path / "best" / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="eval_every"):
        config(early_stopping_patience=2, eval_every=0)


def test_cli_ctrl_c_then_resume_equals_uninterrupted_run(tmp_path):
    """``finetune train`` end to end: SIGINT mid-run exits 130 after writing a checkpoint; ``--resume`` finishes
    the run with bitwise the adapter of an uninterrupted run (LoRA dropout on: RNG state restored)."""
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    from tiny_model_dir import make_model_dir

    model_dir, corpus = make_model_dir(tmp_path, hidden=64, layers=4)
    args = [sys.executable, "-m", "finetune_ref", "train", "--method", "lora", "--dropout", "0.1", "--model",
            str(model_dir), "--data", str(corpus), "--seq-len", "64", "--batch-size", "4", "--steps", "40",
            "--lr", "3e-3", "--warmup", "2", "--no-progress", "--eval-fraction", "0.05"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_a = tmp_path / "a"
    proc = subprocess.Popen([*args, "--out", str(run_a)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        metrics = run_a / "metrics.jsonl"
        if metrics.is_file() and '"train"' in metrics.read_text():
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.02)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted after update" in err and "--resume" in err
    stopped_at = read_checkpoint_record(run_a)["update"]
    assert 1 <= stopped_at < 40
    # The rest in this process (no interpreter start-up); the one_thread fixture matches OMP_NUM_THREADS=1.
    from finetune_ref.cli.main import main

    train_args = args[3:]  # drop "python -m finetune_ref"
    assert main([*train_args, "--out", str(run_a), "--resume", str(run_a)]) == 0
    assert main([*train_args, "--out", str(tmp_path / "b")]) == 0
    a = load_file(str(run_a / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Starting over in a directory that holds checkpoints needs --resume (no silent restart / overwrite).
    assert main([*train_args, "--out", str(run_a)]) == 2
