"""LoRA and QLoRA sharded with FSDP2 (train/fsdp.py) on 2 and 3 CPU processes with gloo, against one process
with the same global batch; the NF4 storage gathered back bitwise; adapter checkpoints across world sizes
(1 -> 2, 2 -> 1, 2 -> 2); a rank killed mid-run and the job resumed from the last checkpoint.

The tiny model has hidden size 40 and intermediate 60, so every NF4 tensor's element count (800, 1600, 2400)
is a multiple of neither the block size (64) nor, in packed bytes or blocks, the world size (2 or 3), and the
nested absmax has one element (rank 1 of 2 holds an empty shard). One spawn per world size (starting processes
costs seconds on a loaded machine); the ranks write safetensors/JSON and the test process compares.
fp32 throughout; tolerance as tests/test_distributed.py: losses rel 1e-5, parameters atol 2e-6 rtol 1e-5
(summation order of the reduce-scatter and of the per-rank loss).
"""

import json
import os
import time

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from test_distributed import _free_port

from finetune_ref.lora import LoraConfig, inject_lora, save_adapter
from finetune_ref.lora.peft_format import read_adapter_weights
from finetune_ref.models.config import LlamaConfig
from finetune_ref.models.llama import LlamaForCausalLM
from finetune_ref.qlora.model import quantize_model
from finetune_ref.qlora.nf4_linear import NF4Linear
from finetune_ref.train.checkpointing import Checkpointer
from finetune_ref.train.config import TrainConfig
from finetune_ref.train.data import BatchIterator, pack_documents
from finetune_ref.train.distributed import DistInfo, ShardedBatches, destroy_distributed, init_distributed
from finetune_ref.train.fsdp import NF4_SHARDED, gather_full, gathered_trainable, shard_model

VOCAB, STEPS, GLOBAL_BATCH = 64, 4, 6  # 6 rows split over 1, 2 or 3 ranks


def tiny_model(method):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=40, intermediate_size=60, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    for p in model.parameters():
        p.requires_grad_(False)
    if method.startswith("qlora"):
        quantize_model(model, blocksize=64, double_quant=method == "qlora", compute_dtype=torch.float32)
    inject_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    return model


def batches(info):
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(3, VOCAB, (int(torch.randint(3, 25, (1,), generator=g)),), generator=g).tolist()
            for _ in range(60)]
    it = BatchIterator(pack_documents(docs, 16, eos_token_id=2), GLOBAL_BATCH, pad_token_id=0, seed=5, drop_last=True)
    return ShardedBatches(it, info)


def config():
    return TrainConfig(steps=STEPS, lr=3e-3, warmup_steps=1, grad_accum=2, max_grad_norm=0.5, weight_decay=0.01,
                       progress=False, precision="fp32", optimizer="adamw")


def nf4_storage(model):
    """Every NF4 tensor by name (packed bytes, absmax, nested state), whole, on CPU."""
    out = {}
    for name, layer in model.named_modules():
        if isinstance(layer, NF4Linear):
            out.update({f"{name}.{k}": v for k, v in layer.quant_state.tensors().items()})
            out[f"{name}.weight"] = layer.weight
    return {k: v.detach().cpu().clone() for k, v in out.items()}


def run(method, info, out_dir, tag, ckpt=None, save_every=0, resume=None, kill_at=None):
    """Train ``method`` (sharded when ``info`` has several ranks), save losses and the adapter under ``tag``."""
    model = tiny_model(method)
    before = nf4_storage(model)
    if info.enabled:
        shard_model(model, info)
    losses = []

    def on_update(update, metrics):
        losses.append(metrics["loss"])
        if update == kill_at and info.rank == 1:
            os._exit(3)  # a dead rank: no cleanup, no checkpoint, its peers' next collective fails

    checkpointer = Checkpointer(ckpt, save_every=save_every, info=info, metadata={"method": method}) if ckpt else None
    from finetune_ref.train.trainer import train

    train(model, batches(info), config(), info=info, checkpointer=checkpointer, resume_from=resume,
          on_update=on_update)
    with gathered_trainable(model):
        if info.is_main:
            save_adapter(model, os.path.join(out_dir, tag))
    if info.enabled and before:  # the NF4 storage gathered after training must be the bytes quantized before
        gathered = gather_full(model, {n for n in before if n.rpartition(".")[2] in NF4_SHARDED})
        for layer_name, layer in model.named_modules():
            if isinstance(layer, NF4Linear):
                for k in ("offset", "quant_map", "nested_quant_map"):
                    if getattr(layer, k) is not None:
                        gathered[f"{layer_name}.{k}"] = getattr(layer, k).detach().clone()
        if info.is_main:
            save_file(gathered, os.path.join(out_dir, f"{tag}-nf4-after.safetensors"))
    if info.is_main:
        if before:
            save_file(before, os.path.join(out_dir, f"{tag}-nf4-before.safetensors"))
        with open(os.path.join(out_dir, f"{tag}.json"), "w") as f:
            json.dump({"losses": losses}, f)


def _worker(rank, world, port, out_dir, plan):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    info = init_distributed("gloo", timeout_s=60)
    finished = False
    try:
        for kwargs in plan:
            run(info=info, out_dir=out_dir, **kwargs)
        finished = True
    finally:
        destroy_distributed(info, synchronize=finished)


def spawn(world, out_dir, plan, timeout=400):
    """Run ``plan`` (a list of ``run`` keyword dicts) on ``world`` processes; True if every process exited 0."""
    context = mp.start_processes(_worker, args=(world, _free_port(), str(out_dir), plan), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                for p in context.processes:
                    p.kill()
                pytest.fail(f"{world} workers did not finish within {timeout} s (deadlock?)")
    except mp.ProcessExitedException:  # a rank died: join() has killed the others, as torchrun does
        return False
    return True


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    one = DistInfo()
    for method in ("lora", "qlora", "qlora-plain"):
        run(method, one, str(out), f"{method}-1", ckpt=str(out / f"{method}-1-ckpt"), save_every=2)
    assert spawn(2, out, [
        dict(method="lora", tag="lora-2", ckpt=str(out / "lora-2-ckpt"), save_every=2),
        dict(method="qlora", tag="qlora-2", ckpt=str(out / "qlora-2-ckpt"), save_every=2),
        # 2 -> 2 and 1 -> 2: resume from update 2 of the 2-process and of the 1-process run
        dict(method="qlora", tag="qlora-2-from-2", ckpt=str(out / "r22"), resume=str(out / "qlora-2-ckpt" / "checkpoint-000002")),
        dict(method="qlora", tag="qlora-2-from-1", ckpt=str(out / "r12"),
             resume=str(out / "qlora-1-ckpt" / "checkpoint-000002")),
    ])
    assert spawn(3, out, [dict(method="qlora-plain", tag="qlora-plain-3")])
    return out


pytestmark = pytest.mark.usefixtures("one_thread")


def adapter(out, tag):
    return read_adapter_weights(out / tag)


def assert_same_run(out, tag, reference, exact=False):
    got, ref = adapter(out, tag), adapter(out, reference)
    assert got.keys() == ref.keys() and got
    for k in ref:
        if exact:
            assert torch.equal(got[k], ref[k]), k
        else:
            torch.testing.assert_close(got[k], ref[k], atol=2e-6, rtol=1e-5, msg=lambda m: f"{k}: {m}")


def losses(out, tag):
    return json.loads((out / f"{tag}.json").read_text())["losses"]


@pytest.mark.parametrize("method,world", [("lora", 2), ("qlora", 2), ("qlora-plain", 3)])
def test_sharded_run_matches_one_process(outputs, method, world):
    assert losses(outputs, f"{method}-{world}") == pytest.approx(losses(outputs, f"{method}-1"), rel=1e-5)
    assert_same_run(outputs, f"{method}-{world}", f"{method}-1")


@pytest.mark.parametrize("tag", ["qlora-2", "qlora-plain-3"])
def test_nf4_storage_gathered_is_bitwise_the_quantized_one(outputs, tag):
    before = load_file(str(outputs / f"{tag}-nf4-before.safetensors"))
    after = load_file(str(outputs / f"{tag}-nf4-after.safetensors"))
    assert before.keys() == after.keys() and len(before) > 8
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k].reshape(-1).view(torch.uint8),
                                                             v.reshape(-1).view(torch.uint8)), k
    # the sizes that make uneven shards are really there
    assert before["model.layers.0.self_attn.k_proj.base_layer.weight"].shape == (400, 1)  # 800 / 2, 12.5 blocks
    assert before["model.layers.0.mlp.up_proj.base_layer.absmax"].numel() == 38


def test_adapter_checkpoints_resume_across_world_sizes(outputs, tmp_path):
    # 2 -> 2: bitwise (same world size: same RNG streams and the same summation order)
    assert_same_run(outputs, "qlora-2-from-2", "qlora-2", exact=True)
    assert losses(outputs, "qlora-2-from-2") == losses(outputs, "qlora-2")[2:]
    # 1 -> 2, within tolerance of the uninterrupted single-process run
    assert_same_run(outputs, "qlora-2-from-1", "qlora-1")
    # 2 -> 1: this process continues the 2-process checkpoint of update 2
    with pytest.warns(UserWarning, match="2 process"):
        run("qlora", DistInfo(), str(tmp_path), "qlora-1-from-2", ckpt=str(tmp_path / "ckpt"),
            resume=str(outputs / "qlora-2-ckpt" / "checkpoint-000002"))
    assert losses(tmp_path, "qlora-1-from-2") == pytest.approx(losses(outputs, "qlora-1")[2:], rel=1e-5)
    got, ref = adapter(tmp_path, "qlora-1-from-2"), adapter(outputs, "qlora-1")
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=2e-6, rtol=1e-5)
    # the saved adapter is an ordinary PEFT adapter: a fresh model loads it
    config = json.loads((outputs / "qlora-2" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert all(k.startswith("base_model.model.") for k in ref)


def test_rank_killed_mid_run_resumes_from_last_checkpoint(outputs, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    assert not spawn(2, tmp_path, [dict(method="qlora", tag="killed", ckpt=ckpt, save_every=2, kill_at=3)])
    assert (tmp_path / "ckpt" / "latest").read_text().strip().endswith("checkpoint-000002")
    assert spawn(2, tmp_path, [dict(method="qlora", tag="resumed", ckpt=ckpt, save_every=2, resume=ckpt)])
    assert losses(tmp_path, "resumed") == losses(outputs, "qlora-2")[2:]
    got, ref = adapter(tmp_path, "resumed"), adapter(outputs, "qlora-2")
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def test_torchrun_qlora_cli_matches_one_process(tmp_path):
    """``finetune train --method qlora --parallel fsdp`` under torchrun (the NF4 storage sharded layer by layer
    while loading) against one process with the same global batch: the same PEFT adapter within fp32 tolerance."""
    import subprocess
    import sys

    from tiny_model_dir import make_model_dir

    from finetune_ref.cli.main import main

    model_dir, corpus = make_model_dir(tmp_path)
    common = ["train", "--method", "qlora", "--precision", "fp32", "--optimizer", "adamw", "--model", str(model_dir),
              "--data", str(corpus), "--seq-len", "32", "--grad-accum", "2", "--steps", "3", "--lr", "3e-3",
              "--warmup", "1", "--no-progress", "--seed", "3"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                "--rdzv-backend", "static", "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
                "--node-rank", "0"]
    two = subprocess.run([*launcher, "-m", "finetune_ref", *common, "--parallel", "fsdp", "--batch-size", "2",
                          "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=400,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    assert main([*common, "--batch-size", "4", "--out", str(tmp_path / "one")]) == 0
    a, b = read_adapter_weights(tmp_path / "two"), read_adapter_weights(tmp_path / "one")
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-6, rtol=1e-5, msg=lambda m: f"{k}: {m}")
    assert (tmp_path / "two" / "qlora_config.json").is_file()
