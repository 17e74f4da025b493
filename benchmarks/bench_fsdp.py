"""FSDP2 scaling of LoRA / QLoRA / full fine-tuning (train/fsdp.py): per-rank peak GPU memory and tokens/s at
1, 2 and 4 ranks, with NCCL on one multi-GPU machine.

NOT YET RUN ON GPUs: written where no multi-GPU machine was available; it was only run with ``--backend gloo``
on 2 CPU processes and a tiny shape, to check that it works end to end. Results from a GPU machine belong in
benchmarks/RESULTS.md with the machine, driver, torch version and the exact command.

For each world size N the driver launches ``torchrun --standalone --nproc-per-node N`` on this file (1 rank runs
without FSDP: the one-process baseline). Each rank loads the same base (a Hugging Face directory given with
``--model``, or a random Llama of the shape given by ``--hidden/--intermediate/--layers/--vocab`` saved in bf16
once, on the first run), quantizes it while loading for QLoRA (each decoder layer sharded as soon as it is
quantized), injects LoRA (r 8, all linear layers), shards with ``train.fsdp.shard_model`` (bf16 compute,
fp32 master shards, fp32 gradient reduction), and trains ``--warmup`` + ``--steps`` updates of random tokens with
AdamW and gradient checkpointing. Printed per N: the global tokens/s over the timed updates (the global batch
grows with N: ``--batch-size`` is per rank), the speedup against 1 rank, each rank's peak
``torch.cuda.max_memory_allocated`` over the whole run (loading included; max RSS with gloo on CPU) and the ``finetune memory --parallel fsdp`` estimate for the same setup.

    python benchmarks/bench_fsdp.py --method qlora --ranks 1,2,4 --hidden 4096 --intermediate 11008 --layers 32
    python benchmarks/bench_fsdp.py --method qlora --backend gloo --ranks 1,2 --hidden 64 --layers 2   # CPU check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_model_dir(path: Path, args) -> None:
    import torch

    from finetune_ref.models.checkpoint import save_model
    from finetune_ref.models.config import LlamaConfig
    from finetune_ref.models.llama import LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 128),
                         num_key_value_heads=max(1, args.hidden // 128), tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    save_model(model.to(torch.bfloat16), path)


def worker(args) -> None:
    import torch

    from finetune_ref.lora import LoraConfig, inject_lora
    from finetune_ref.models.loader import load_model
    from finetune_ref.qlora.model import load_quantized
    from finetune_ref.train.config import TrainConfig
    from finetune_ref.train.distributed import ShardedBatches, destroy_distributed, device_for, init_distributed
    from finetune_ref.train.fsdp import shard_model, shard_nf4_layers
    from finetune_ref.train.trainer import train

    info = init_distributed(args.backend)
    device = device_for(info)
    sharded = info.enabled
    if args.method == "qlora":
        model = load_quantized(args.model, compute_dtype="bf16", dtype="bf16",
                               on_layer=(lambda layer: shard_nf4_layers(layer, info)) if sharded else None)
    else:
        model = load_model(args.model, dtype="fp32" if args.method == "full" else "bf16")
    if args.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        inject_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"), adapter_dtype=torch.float32)
    model.model.gradient_checkpointing = True
    if sharded:
        shard_model(model, info, torch.bfloat16)  # FSDP2 puts the shards on the mesh's device
    else:
        model.to(device)
    vocab, rows = model.config.vocab_size, args.batch_size * info.world_size

    def global_batches():
        g = torch.Generator().manual_seed(0)
        while True:
            ids = torch.randint(0, vocab, (rows, args.seq_len), generator=g)
            yield {"input_ids": ids.to(device), "labels": ids.to(device)}

    precision = "bf16" if (sharded or args.method != "full") else "fp32"
    def config(steps):
        return TrainConfig(steps=steps, lr=1e-4, warmup_steps=0, progress=False, precision=precision,
                           optimizer="adamw")

    clock = {}

    def on_update(update, metrics):  # the timed updates start after the warmup ones (optimizer states exist)
        if update == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            clock["start"] = time.perf_counter()

    train(model, ShardedBatches(global_batches(), info), config(args.warmup + args.steps), info=info,
          on_update=on_update)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - clock["start"]
    # the whole run, loading included; on CPU (the gloo check) the process's max RSS instead
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    record = {"rank": info.rank, "world": info.world_size, "peak_bytes": peak,
              "tokens_per_s": args.steps * rows * args.seq_len / elapsed}
    Path(args.results, f"rank{info.rank}.json").write_text(json.dumps(record))
    destroy_distributed(info)


def estimate(args, world: int) -> float:
    from finetune_ref.train.memory import estimate_memory
    from finetune_ref.train.memory_fsdp import estimate_memory_fsdp
    from finetune_ref.train.memory_settings import MemorySettings
    from finetune_ref.train.memory_shapes import load_config

    settings = MemorySettings(method=args.method, batch_size=args.batch_size, seq_len=args.seq_len,
                              gradient_checkpointing=True, attention_mask=False,
                              adapter_dtype="fp32" if args.method != "full" else None)
    config = load_config(args.model)
    est = estimate_memory_fsdp(config, settings, world) if world > 1 else estimate_memory(config, settings)
    return est.peak / 2**30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", choices=["lora", "qlora", "full"], default="qlora")
    p.add_argument("--ranks", default="1,2,4", help="comma-separated world sizes")
    p.add_argument("--backend", choices=["nccl", "gloo"], default="nccl")
    p.add_argument("--model", help="a Hugging Face model directory (default: a random Llama of the shape below)")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch-size", type=int, default=2, help="sequences per rank per update")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--results", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            args.model = str(Path(tmp, "model"))
            make_model_dir(Path(args.model), args)
        print(f"method {args.method}, model {args.model}, batch {args.batch_size} x {args.seq_len} tokens per rank, "
              f"backend {args.backend}, gradient checkpointing, bf16 compute, fp32 adapters/master shards")
        print(f"{'ranks':>5} {'tokens/s (global)':>18} {'speedup':>8} {'peak GiB per rank (measured)':>30} "
              f"{'estimated GiB':>14}")
        base = None
        for world in [int(x) for x in args.ranks.split(",")]:
            results = Path(tmp, f"results{world}")
            results.mkdir()
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
                   __file__, "--worker", "--results", str(results), "--method", args.method, "--backend",
                   args.backend, "--model", args.model, "--batch-size", str(args.batch_size), "--seq-len",
                   str(args.seq_len), "--warmup", str(args.warmup), "--steps", str(args.steps)]
            subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            records = [json.loads(f.read_text()) for f in sorted(results.glob("rank*.json"))]
            tps = records[0]["tokens_per_s"]
            base = base or tps
            peaks = " ".join(f"{r['peak_bytes'] / 2**30:.2f}" for r in records)
            print(f"{world:>5} {tps:>18.0f} {tps / base:>8.2f} {peaks:>30} {estimate(args, world):>14.2f}")


if __name__ == "__main__":
    main()
