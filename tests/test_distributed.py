"""Two CPU processes with gloo (torch.multiprocessing spawn, env:// rendezvous on 127.0.0.1) against one process
with the same global batch: DDP for full fine-tuning and LoRA, FSDP2 for full fine-tuning, distributed
evaluation, and checkpoints that resume across world sizes (2 -> 1) and within one (2 -> 2, bitwise).

All scenarios run in one spawn (starting processes costs seconds); the ranks write their results with
safetensors/JSON and the test process compares them. fp32 throughout; tolerance: losses rel 1e-5, parameters
atol 2e-6 (AdamW normalises updates, so parameter differences stay at fp32 summation-order noise).
"""

import json
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from tiny_model_dir import make_model_dir

from finetune_ref.train.checkpointing import Checkpointer
from finetune_ref.train.data import BatchIterator, pack_documents
from finetune_ref.train.distributed import (DistInfo, ShardedBatches, destroy_distributed, init_distributed, shard_batch,
                                  unwrap_model, wrap_ddp)
from finetune_ref.train.fsdp import shard_model
from finetune_ref.train.config import TrainConfig
from finetune_ref.train.evaluation import evaluate
from finetune_ref.train.trainer import train
from finetune_ref.full import full_state_dict, prepare_full_finetuning
from finetune_ref.lora import LoraConfig, inject_lora
from finetune_ref.models.config import LlamaConfig
from finetune_ref.models.llama import LlamaForCausalLM

WORLD = 2
PER_RANK_BATCH = 2
VOCAB = 64
STEPS = 4


def tiny_model():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))


def examples(seed=1, n_docs=40):
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(3, VOCAB, (int(torch.randint(3, 25, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n_docs)]
    return pack_documents(docs, 16, eos_token_id=2)


def global_batches():
    # drop_last: every global batch splits evenly over the ranks
    return BatchIterator(examples(), PER_RANK_BATCH * WORLD, pad_token_id=0, seed=5, drop_last=True)


def eval_batches():
    it = BatchIterator(examples(seed=7, n_docs=20), 3, pad_token_id=0, seed=0, max_epochs=1)
    return list(it)  # an odd number of batches: one rank runs a padding forward


def config(steps=STEPS, **kw):
    # clipping active (small max norm) so the cross-rank norm matters
    return TrainConfig(steps=steps, lr=3e-3, warmup_steps=1, grad_accum=2, max_grad_norm=0.5, weight_decay=0.01,
                       progress=False, precision="fp32", optimizer="adamw", **kw)


def method(name):
    model = tiny_model()
    if name == "full":
        prepare_full_finetuning(model, torch.float32)
    else:
        inject_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    return model


def run_single(name, steps=STEPS, resume=None, ckpt_root=None):
    model = method(name)
    losses = []
    checkpointer = Checkpointer(ckpt_root, metadata={"method": name}) if ckpt_root else None
    train(model, global_batches(), config(steps), on_update=lambda u, m: losses.append(m["loss"]),
          checkpointer=checkpointer, resume_from=resume)
    return model, losses


# ---------------------------------------------------------------------------------------------------------
# What each rank runs.
# ---------------------------------------------------------------------------------------------------------
def _scenario(info, name, wrap, out_dir, steps=STEPS, ckpt_root=None, save_every=0, resume=None):
    model = method(name)
    model = wrap(model, info)
    losses = []
    checkpointer = Checkpointer(ckpt_root, save_every=save_every, info=info, metadata={"method": name}) \
        if ckpt_root else None
    train(model, ShardedBatches(global_batches(), info), config(steps), info=info, checkpointer=checkpointer,
          resume_from=resume, on_update=lambda u, m: losses.append(m["loss"]))
    ev = evaluate(model, eval_batches(), info)
    state = full_state_dict(model) if name == "full" else \
        {k: v for k, v in unwrap_model(model).state_dict().items() if "lora_" in k}
    if info.is_main:
        tag = f"{name}-{wrap.__name__}" + ("-resumed" if resume else "")
        save_file({k: v.contiguous() for k, v in state.items() if k != "lm_head.weight"},
                  os.path.join(out_dir, f"{tag}.safetensors"))
        with open(os.path.join(out_dir, f"{tag}.json"), "w") as f:
            json.dump({"losses": losses, "eval": ev}, f)


def _ddp(model, info):
    return wrap_ddp(model, info)


def _fsdp(model, info):
    return shard_model(model, info)


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    info = init_distributed("gloo", timeout_s=120)
    finished = False
    try:
        assert info == DistInfo(rank=rank, world_size=WORLD, local_rank=rank, backend="gloo")
        _scenario(info, "full", _ddp, out_dir)
        _scenario(info, "lora", _ddp, out_dir)
        ckpt = os.path.join(out_dir, "fsdp-ckpt")
        _scenario(info, "full", _fsdp, out_dir, ckpt_root=ckpt, save_every=2)
        # 2 -> 2: resume the FSDP run from its update-2 checkpoint; must equal the straight FSDP run bitwise.
        _scenario(info, "full", _fsdp, out_dir, ckpt_root=os.path.join(out_dir, "fsdp-ckpt-2"),
                  resume=os.path.join(ckpt, "checkpoint-000002"))
        finished = True
    finally:
        destroy_distributed(info, synchronize=finished)  # barrier (unless failed), gc, destroy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks_output(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    context = mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + 300
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail("distributed workers did not finish within 300 s (deadlock?)")
    return out


pytestmark = pytest.mark.usefixtures("one_thread")


def load_result(out, tag):
    return load_file(str(out / f"{tag}.safetensors")), json.loads((out / f"{tag}.json").read_text())


def assert_matches(single_model, losses, out, tag, keys=None):
    params, record = load_result(out, tag)
    assert record["losses"] == pytest.approx(losses, rel=1e-5)
    reference = {k: v for k, v in single_model.state_dict().items() if k in params}
    assert set(reference) == set(params) and params
    for k, v in reference.items():
        torch.testing.assert_close(params[k], v, atol=2e-6, rtol=1e-5, msg=lambda m: f"{k}: {m}")
    return record


def test_shard_batch_rows_and_uneven_batches_rejected():
    batch = {"input_ids": torch.arange(8).view(4, 2), "labels": torch.arange(8).view(4, 2)}
    part = shard_batch(batch, DistInfo(rank=1, world_size=2))
    assert torch.equal(part["input_ids"], torch.tensor([[4, 5], [6, 7]]))
    with pytest.raises(ValueError, match="evenly"):
        shard_batch({"input_ids": torch.zeros(3, 2)}, DistInfo(rank=0, world_size=2))


def test_init_distributed_without_torchrun_is_single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed() == DistInfo()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="RANK"):
        init_distributed()


def test_ddp_full_matches_single_process(ranks_output):
    model, losses = run_single("full")
    record = assert_matches(model, losses, ranks_output, "full-_ddp")
    assert record["eval"]["loss"] == pytest.approx(evaluate(model, eval_batches())["loss"], rel=1e-5)


def test_ddp_lora_matches_single_process(ranks_output):
    model, losses = run_single("lora")
    assert_matches(model, losses, ranks_output, "lora-_ddp")


def test_fsdp2_full_matches_single_process_and_evaluates_sharded(ranks_output):
    model, losses = run_single("full")
    record = assert_matches(model, losses, ranks_output, "full-_fsdp")
    # 3 eval batches over 2 ranks: rank 1 runs one padding forward that must not count.
    single = evaluate(model, eval_batches())
    assert record["eval"]["tokens"] == single["tokens"]
    assert record["eval"]["loss"] == pytest.approx(single["loss"], rel=1e-5)


def test_fsdp2_resume_same_world_size_is_bitwise(ranks_output):
    straight, rec_a = load_result(ranks_output, "full-_fsdp")
    resumed, rec_b = load_result(ranks_output, "full-_fsdp-resumed")
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    assert rec_b["losses"] == rec_a["losses"][2:]


def test_fsdp2_checkpoint_resumes_in_one_process(ranks_output, tmp_path):
    """Written by 2 FSDP2 ranks (unsharded on disk), continued by one process: equals the single-process run."""
    reference, ref_losses = run_single("full")
    with pytest.warns(UserWarning, match="2 process"):
        resumed, losses = run_single("full", resume=ranks_output / "fsdp-ckpt" / "checkpoint-000002",
                                     ckpt_root=tmp_path)
    assert losses == pytest.approx(ref_losses[2:], rel=1e-5)
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, atol=2e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# The CLI under torchrun: FSDP2 full fine-tuning on 2 processes, then resumed by 1 process.
# ---------------------------------------------------------------------------------------------------------
def test_torchrun_fsdp2_cli_and_resume_on_one_process(tmp_path):
    import subprocess
    import sys

    model_dir, corpus = make_model_dir(tmp_path)
    common = ["--method", "full", "--model", str(model_dir), "--data", str(corpus), "--seq-len", "32",
              "--grad-accum", "2", "--steps", "4", "--save-every", "2", "--lr", "3e-3", "--warmup", "1",
              "--no-progress", "--seed", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                "--rdzv-backend", "static", "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
                "--node-rank", "0"]
    two = subprocess.run([*launcher, "-m", "finetune_ref", "train", *common, "--parallel", "fsdp", "--batch-size", "2",
                          "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    before = float(two.stdout.split("held-out before: loss ")[1].split(",")[0])
    after = float(two.stdout.split("held-out after:  loss ")[1].split(",")[0])
    assert after < before
    # The same global batch (4) on one process (this one), continuing the 2-process checkpoint of update 2.
    from finetune_ref.cli.main import main

    with pytest.warns(UserWarning, match="2 process"):
        assert main(["train", *common, "--batch-size", "4", "--out", str(tmp_path / "one"),
                     "--resume", str(tmp_path / "two" / "checkpoints" / "checkpoint-000002")]) == 0
    a, b = load_file(str(tmp_path / "two" / "model.safetensors")), load_file(str(tmp_path / "one" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-6, rtol=1e-5)
    assert (tmp_path / "two" / "tokenizer.json").is_file()
