"""Benchmark of the paged and 8-bit AdamW optimizers (optim/adamw.py): device memory, state bytes, step time.

On a CUDA GPU, one run (a few minutes on an H200) measures a training step of SmolLM2-135M's shape
(random weights: the figures do not depend on the values) with each optimizer and state home:

- QLoRA: NF4 + double-quant base, LoRA r=64 on all linear layers (bf16 adapters, as
  ``qlora.model.prepare_qlora_model``), batch 4 x 512 tokens;
- full fine-tuning in fp32 (135M trainable parameters, 1.08 GB of 32-bit AdamW states), batch 4 x 512,
  where paging has something to move;

and reports per configuration the peak device memory of a step (``torch.cuda.max_memory_allocated``),
the memory left allocated after it (weights + device-resident states), the state bytes by home, the
bytes paged per step, and the median time of the whole step and of ``optimizer.step()`` alone (the
cost of paging). Each optimizer runs with bitsandbytes' paging threshold (1e5 elements: note that no
LoRA matrix of SmolLM2 at r=64 reaches it, so nothing is paged) and with ``min_paged_size=0`` (every
state paged).

Without a GPU it runs the CPU part: ``optimizer.step()`` alone on the LoRA r=64 adapter shapes of
SmolLM2 (synthetic gradients), state bytes per parameter by home, bytes paged per step and step
time, where the "host" home copies CPU to CPU. It says plainly that the GPU figures are pending.

Usage:
    python benchmarks/bench_paged_optimizer.py                  # measure; JSON to benchmarks/results,
                                                                # section in benchmarks/RESULTS.md
    python benchmarks/bench_paged_optimizer.py --no-docs        # do not touch RESULTS.md
    python benchmarks/bench_paged_optimizer.py --out-dir $OUT   # where the JSON goes
    python benchmarks/bench_paged_optimizer.py --dry-run        # the GPU code path on the CPU with a
                                                                # tiny model; writes nothing
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run as a plain script from anywhere

RESULTS_MD = REPO / "benchmarks" / "RESULTS.md"
SECTION_TITLE = "## Paged and 8-bit optimizers"
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5,
               tie_word_embeddings=True, max_position_embeddings=8192)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True)
LORA_R = 64  # the QLoRA paper's rank (section 4, "we use r = 64")
LR = 1e-4

# (label, optimizer name, options). bitsandbytes' threshold first, then everything paged.
CONFIGS: list[tuple[str, str, dict[str, Any]]] = [
    ("adamw (device)", "adamw", {}),
    ("paged_adamw host, >=1e5", "paged_adamw", {"state_home": "host"}),
    ("paged_adamw host, all", "paged_adamw", {"state_home": "host", "min_paged_size": 0}),
    ("paged_adamw unified, all", "paged_adamw", {"state_home": "unified", "min_paged_size": 0}),
    ("adamw8bit (device)", "adamw8bit", {}),
    ("paged_adamw8bit host, all", "paged_adamw8bit", {"min_paged_size": 0}),
]


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "bitsandbytes"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


# ------------------------------------------------------------------------------------ models
def build_model(kind: str, shape: dict[str, Any]):
    """A randomly initialised Llama of ``shape``: "qlora" (NF4+DQ base, bf16 LoRA r=64 all-linear) or
    "full" (fp32, everything trainable). Built on the CPU."""
    import torch

    from finetune_ref.lora import LoraConfig, inject_lora
    from finetune_ref.models.config import LlamaConfig
    from finetune_ref.models.llama import LlamaForCausalLM
    from finetune_ref.qlora.model import quantize_model

    torch.manual_seed(0)
    if kind == "full":
        return LlamaForCausalLM(LlamaConfig(**shape))
    model = LlamaForCausalLM(LlamaConfig(**shape)).to(torch.bfloat16)
    quantize_model(model, compute_dtype=torch.bfloat16)
    inject_lora(model, LoraConfig(r=LORA_R, lora_alpha=16, target_modules="all-linear"),
                adapter_dtype=torch.bfloat16)
    return model


def lora_shapes(shape: dict[str, Any], r: int = LORA_R) -> list[tuple[int, int]]:
    """(rows, cols) of every LoRA A (r, in) and B (out, r) of an all-linear adapter on a Llama of ``shape``."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    kv = shape["num_key_value_heads"] * shape.get("head_dim", h // shape["num_attention_heads"])
    layer = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # (in, out) of q k v o gate up down
    return [s for _ in range(shape["num_hidden_layers"]) for (fan_in, fan_out) in layer
            for s in ((r, fan_in), (fan_out, r))]


# ------------------------------------------------------------------------------------ measuring
def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_training(kind: str, shape: dict[str, Any], device, batch: tuple[int, int], steps: int,
                     warmup: int) -> list[dict[str, Any]]:
    """One row per optimizer configuration: peak/resident device memory, state bytes, paging, times."""
    import torch

    from finetune_ref.optim import build_optimizer

    rows = []
    for label, name, options in CONFIGS:
        row: dict[str, Any] = {"model": kind, "config": label, "optimizer": name, **options}
        model = build_model(kind, shape).to(device)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        row["trainable"] = sum(p.numel() for p in params)
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, shape["vocab_size"], batch, generator=g).to(device)  # (B, T)
        try:
            opt = build_optimizer(name, params, lr=LR, weight_decay=0.0, **options)
            row.update(run_steps(model, opt, x, device, steps, warmup))
        except (ValueError, RuntimeError, ImportError) as e:  # unified memory unavailable, out of memory...
            row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            opt = None
        rows.append(row)
        del model, opt, params
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def run_steps(model, opt, x, device, steps: int, warmup: int) -> dict[str, Any]:
    """Time ``warmup + steps`` training steps; memory and paging figures cover the measured steps only."""
    import torch

    step_ms, opt_ms = [], []
    for i in range(warmup + steps):
        if i == warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if i == warmup and hasattr(opt, "paging_stats"):
            opt.paging_stats.reset()
        sync(device)
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        sync(device)
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        t2 = time.perf_counter()
        if i >= warmup:
            step_ms.append((t2 - t0) * 1e3)
            opt_ms.append((t2 - t1) * 1e3)
    out: dict[str, Any] = {"step_ms": statistics.median(step_ms), "optimizer_ms": statistics.median(opt_ms),
                           "loss": float(loss.detach()), **state_bytes(opt)}
    if hasattr(opt, "paging_stats"):
        out["paged_bytes_per_step"] = (opt.paging_stats.bytes_in + opt.paging_stats.bytes_out) / steps
    if device.type == "cuda":
        out["peak_device_bytes"] = torch.cuda.max_memory_allocated(device)
        out["resident_device_bytes"] = torch.cuda.memory_allocated(device)
    return out


def state_bytes(opt) -> dict[str, Any]:
    """State bytes by home (``optim.adamw.AdamW.state_bytes``; torch's AdamW: everything on the device)."""
    if hasattr(opt, "state_bytes"):
        homes = opt.state_bytes()
    else:
        homes = {"device": sum(t.nbytes for s in opt.state.values() for k, t in s.items() if k != "step"),
                 "host": 0, "unified": 0}
    return {f"state_bytes_{home}": n for home, n in homes.items()}


def measure_optimizer_only(device, steps: int) -> list[dict[str, Any]]:
    """``optimizer.step()`` alone on SmolLM2's LoRA r=64 adapter shapes (fp32, synthetic gradients)."""
    import torch

    from finetune_ref.optim import build_optimizer

    shapes = lora_shapes(SMOLLM2)
    rows = []
    for label, name, options in CONFIGS:
        if options.get("state_home") == "unified":
            continue  # on the CPU it is the "device" home
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(0.02 * torch.randn(s, generator=g)) for s in shapes]
        for p in params:
            p.grad = 1e-3 * torch.randn(p.shape, generator=g)
        opt = build_optimizer(name, params, lr=LR, weight_decay=0.0, **options)
        opt.step()  # warm-up, creates the states
        if hasattr(opt, "paging_stats"):
            opt.paging_stats.reset()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            opt.step()
            times.append((time.perf_counter() - t0) * 1e3)
        n = sum(p.numel() for p in params)
        row = {"model": "lora-r64 adapters", "config": label, "optimizer": name, **options, "trainable": n,
               "optimizer_ms": min(times), **state_bytes(opt)}
        if hasattr(opt, "paging_stats"):
            row["paged_bytes_per_step"] = (opt.paging_stats.bytes_in + opt.paging_stats.bytes_out) / steps
        row["state_bytes_per_param"] = sum(row[f"state_bytes_{h}"] for h in ("device", "host", "unified")) / n
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------ parts
def gpu_part(dry_run: bool) -> dict[str, Any]:
    import torch

    device = torch.device("cpu") if dry_run else torch.device("cuda")
    shape, batch = (TINY, (2, 16)) if dry_run else (SMOLLM2, (4, 512))
    steps, warmup = (1, 1) if dry_run else (10, 3)
    rows = measure_training("qlora", shape, device, batch, steps, warmup)
    rows += measure_training("full", shape, device, batch, steps, warmup)
    out = {"kind": "gpu", "dry_run": dry_run, "batch": list(batch), "steps": steps, "warmup": warmup, "rows": rows}
    if not dry_run:
        out["device"] = torch.cuda.get_device_name(device)
    return out


def cpu_part(threads: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    rows = measure_optimizer_only(torch.device("cpu"), steps=3)
    return {"kind": "cpu", "threads": threads, "rows": rows,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


# ------------------------------------------------------------------------------------ reports
def _mb(n: Any) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def render(r: dict[str, Any]) -> str:
    head = f"Measured {r['date']} with {', '.join(f'{k} {v}' for k, v in r['versions'].items())}."
    if r["kind"] == "cpu":
        lines = [head, "", f"CPU, torch threads {r['threads']}, load average {r.get('load_average')}. "
                 "`optimizer.step()` alone on SmolLM2-135M's LoRA r=64 all-linear adapter shapes "
                 f"({r['rows'][0]['trainable']:,} fp32 parameters, synthetic gradients); fastest of 3 steps. "
                 "The host home copies CPU to CPU here, so this is the bookkeeping cost of paging, not a "
                 "PCIe figure.", "",
                 "| optimizer | state MB on device | state MB on host | state bytes/param | paged MB/step | step ms |",
                 "|---|---|---|---|---|---|"]
        for row in r["rows"]:
            lines.append(f"| {row['config']} | {_mb(row['state_bytes_device'])} | {_mb(row['state_bytes_host'])} | "
                         f"{row['state_bytes_per_param']:.3f} | {_mb(row.get('paged_bytes_per_step', 0))} | "
                         f"{row['optimizer_ms']:.1f} |")
        return "\n".join(lines)
    lines = [head, "", f"GPU: {r.get('device', 'dry run on CPU')}; batch {r['batch'][0]} x {r['batch'][1]} tokens; "
             f"{'tiny' if r['dry_run'] else 'SmolLM2-135M'} shape, random weights; medians of {r['steps']} steps after "
             f"{r['warmup']} warm-up steps.", "",
             "| model | optimizer | trainable | peak device MB | resident MB after step | state MB device / host / "
             "unified | paged MB/step | step ms | optimizer.step ms |", "|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        if "error" in row:
            lines.append(f"| {row['model']} | {row['config']} | {row['trainable']:,} | not run: {row['error']} "
                         "| | | | | |")
            continue
        lines.append(f"| {row['model']} | {row['config']} | {row['trainable']:,} | {_mb(row.get('peak_device_bytes'))} "
                     f"| {_mb(row.get('resident_device_bytes'))} | {_mb(row['state_bytes_device'])} / "
                     f"{_mb(row['state_bytes_host'])} / {_mb(row['state_bytes_unified'])} | "
                     f"{_mb(row.get('paged_bytes_per_step', 0))} | {row['step_ms']:.1f} | {row['optimizer_ms']:.1f} |")
    return "\n".join(lines)


GPU_PENDING = ("GPU figures pending: no CUDA GPU was available when this section was last written. Run "
               "`python benchmarks/bench_paged_optimizer.py` on a CUDA machine (a few minutes) to fill it.")


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def replace_section(text: str, tag: str, content: str) -> str:
    """``text`` with the block between ``<!-- BEGIN tag -->`` and ``<!-- END tag -->`` replaced; the
    optimizer section (title + both blocks) is appended first if it is missing."""
    begin, end = f"<!-- BEGIN {tag} -->", f"<!-- END {tag} -->"
    if begin not in text:
        text = (text.rstrip("\n") + f"\n\n{SECTION_TITLE}\n\n### GPU\n\n<!-- BEGIN paged-optimizer-gpu -->\n"
                "<!-- END paged-optimizer-gpu -->\n\n### CPU\n\n<!-- BEGIN paged-optimizer-cpu -->\n"
                "<!-- END paged-optimizer-cpu -->\n")
    pre, rest = text.split(begin, 1)
    return pre + f"{begin}\n{content}\n{end}" + rest.split(end, 1)[1]


def write_reports(r: dict[str, Any], out_dir: Path, write_docs: bool) -> None:
    write_atomic(out_dir / f"paged_optimizer_{r['kind']}.json", json.dumps(r, indent=1))
    if write_docs:
        text = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# Benchmark results\n"
        text = replace_section(text, f"paged-optimizer-{r['kind']}", render(r))
        gpu_block = text.split("<!-- BEGIN paged-optimizer-gpu -->", 1)[1].split("<!-- END", 1)[0]
        if r["kind"] == "cpu" and "GPU: " not in gpu_block:
            text = replace_section(text, "paged-optimizer-gpu", GPU_PENDING)  # a GPU run's section is kept
        write_atomic(RESULTS_MD, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results",
                        help="where paged_optimizer_{gpu,cpu}.json goes (default benchmarks/results)")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite benchmarks/RESULTS.md")
    parser.add_argument("--dry-run", action="store_true",
                        help="run the GPU code path on the CPU with a tiny model; writes nothing")
    parser.add_argument("--cpu", action="store_true", help="run the CPU part even if a GPU is present")
    parser.add_argument("--cpu-threads", type=int, default=1, help="torch threads for the CPU part (default 1)")
    args = parser.parse_args(argv)

    import torch

    if args.dry_run or (torch.cuda.is_available() and not args.cpu):
        r = gpu_part(args.dry_run)
    else:
        print("No CUDA GPU: running the CPU part only. GPU figures (peak device memory with device vs host "
              "homes, step-time cost of paging) are pending: run this script on a CUDA machine.", flush=True)
        r = cpu_part(args.cpu_threads)
    r["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    r["versions"] = versions()
    print(render(r))
    if args.dry_run:
        print("\ndry run: nothing written")
        return 0
    write_reports(r, args.out_dir, write_docs=not args.no_docs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
