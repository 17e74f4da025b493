"""Per-rank peak host memory of loading a QLoRA base under FSDP2 (train/fsdp.py), CPU processes with gloo.

Rows (each a fresh set of processes, so each ``ru_maxrss`` is its own):

* ``1 rank``: ``load_quantized`` in one process (the whole NF4 model plus one decoder layer as stored);
* ``N ranks, whole then shard``: every rank loads and quantizes all of it, then ``shard_nf4_layers`` keeps its share;
* ``N ranks, shard while loading``: the same loader with ``on_layer=shard_nf4_layers`` (what ``finetune train
  --method qlora --parallel fsdp`` does): each decoder layer is sharded as soon as it is quantized, so a rank holds
  its share of the layers loaded so far plus one layer.

Every rank still reads and quantizes every layer (the double-quantization offset is a mean over the whole tensor,
so a rank cannot quantize its slice alone); what it keeps is its share. Printed per rank: peak RSS (VmHWM) above the RSS
just before loading (torch imported, process group up), resident after, and the ratio to the 1-rank row.
Also per rank: the peak and final bytes of live tensors (``train/memory_tracker.TensorMemoryTracker``, exact and
free of the allocator's retention, which dominates RSS at this size).
The model: a Llama of random weights (hidden 1024, intermediate 2816, 16 layers, vocab 8192) saved in bf16.

    python benchmarks/bench_fsdp_load_memory.py --world-size 2     # about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def peak_rss_mb() -> float:
    """This process's peak RSS (``VmHWM``). Not ``ru_maxrss``: a child started by a process that once held more
    reports its parent's peak there (seen here: every row read the 1.6 GB of the parent that built the model)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1e3


def make_model(path: str) -> dict:
    import torch

    from finetune_ref.models.checkpoint import save_model
    from finetune_ref.models.config import LlamaConfig
    from finetune_ref.models.llama import LlamaForCausalLM

    config = LlamaConfig(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    save_model(model, path, dtype="bf16")
    return {"params": sum(p.numel() for p in model.parameters())}


def row(mode: str, path: str) -> None:
    """One rank of one row (run under torchrun-style environment variables); prints a JSON line."""
    import torch

    from finetune_ref.qlora.model import load_quantized
    from finetune_ref.train.distributed import destroy_distributed, init_distributed
    from finetune_ref.train.fsdp import shard_nf4_layers
    from finetune_ref.train.memory_tracker import TensorMemoryTracker

    torch.set_num_threads(1)
    info = init_distributed("gloo")
    base = rss_mb()
    on_layer = (lambda layer: shard_nf4_layers(layer, info)) if mode == "shard-while-loading" else None
    with TensorMemoryTracker() as tracker:
        model = load_quantized(path, compute_dtype="bf16", on_layer=on_layer)
        if mode == "whole-then-shard":
            shard_nf4_layers(model, info)
    peak = peak_rss_mb() - base
    print(json.dumps({"rank": info.rank, "peak_mb": peak, "after_mb": rss_mb() - base,
                      "tensor_peak_mb": tracker.peak / 1e6, "tensor_after_mb": tracker.current / 1e6}), flush=True)
    destroy_distributed(info)


def launch(mode: str, world: int, path: str) -> list[dict]:
    results = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072",
           "MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": str(world)}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        env["MASTER_PORT"] = str(s.getsockname()[1])
    procs = [subprocess.Popen([sys.executable, __file__, "--row", mode, "--path", path],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE, text=True)
             for r in range(world)]
    for p in procs:
        out, _ = p.communicate(timeout=900)
        if p.returncode:
            raise SystemExit(f"rank failed in row {mode} (exit {p.returncode})")
        results += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return sorted(results, key=lambda r: r["rank"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        return row(args.row, args.path)
    with tempfile.TemporaryDirectory() as tmp:
        facts = make_model(tmp)
        nbytes = os.path.getsize(os.path.join(tmp, "model.safetensors")) / 1e6
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load "
              f"{os.getloadavg()[0]:.1f}; torch CPU, gloo; model {facts['params'] / 1e6:.0f} M parameters, "
              f"{nbytes:.0f} MB bf16 on disk, NF4 blocksize 64 with double quantization")
        print(f"{'row':<34} {'rank':>4} {'RSS peak':>9} {'RSS after':>9} {'tensors peak':>13} "
              f"{'tensors after':>14} {'tensor peak / 1 rank':>21}   (MB)")
        base = None
        for mode, world in (("whole", 1), ("whole-then-shard", args.world_size),
                            ("shard-while-loading", args.world_size)):
            for r in launch(mode, world, tmp):
                base = base or r["tensor_peak_mb"]
                print(f"{f'{world} rank(s), {mode}':<34} {r['rank']:>4} {r['peak_mb']:>9.0f} {r['after_mb']:>9.0f} "
                      f"{r['tensor_peak_mb']:>13.0f} {r['tensor_after_mb']:>14.0f} {r['tensor_peak_mb'] / base:>21.2f}")


if __name__ == "__main__":
    main()
