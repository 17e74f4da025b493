"""Where one training step of the model ``finetune train`` runs spends its CPU time: torch.profiler's ops by self
CPU time, split into forward, backward and the optimizer update (with clipping and zero_grad), and the share of
matmuls (aten::mm/addmm/bmm/linear/matmul and SDPA's) against the rest.

The model is built by the recipe itself (``LoraRecipe`` / ``QLoraRecipe(...).build``, then
``RunConfig.configure_model``), the optimizer by ``train.step.optimizer_for``, the step is the loop's: loss,
backward, ``clip_grad_norm_``, ``optimizer.step()``, ``zero_grad(set_to_none=True)``.

Usage:
    python benchmarks/profile_step.py --method lora --precision bf16 --batch-size 4 --seq-len 256 --threads 1
    python benchmarks/profile_step.py --method qlora --precision bf16 --top 25
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

REPO = Path(__file__).resolve().parents[1]
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
              "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def build(method: str, precision: str, model_dir: Path):
    from finetune_ref.recipes.lora import LoraRecipe
    from finetune_ref.recipes.qlora import QLoraRecipe
    from finetune_ref.train.distributed import DistInfo
    from finetune_ref.train.step import optimizer_for

    recipe_cls = LoraRecipe if method == "lora" else QLoraRecipe
    cfg = recipe_cls(model=str(model_dir), precision=precision)
    model = cfg.build(model_dir, DistInfo()).model
    cfg.configure_model(model)
    model.train()
    return cfg, model, optimizer_for(model, cfg)


def text_batch(model_dir: Path, batch: int, seq: int) -> torch.Tensor:
    sys.path.append(str(REPO / "benchmarks"))
    from bench_training import text_batch as batch_of
    from finetune_ref.models.tokenizer import Tokenizer

    return batch_of(Tokenizer.from_dir(model_dir), batch, seq)


def step(model, ids, optimizer, max_norm):
    from finetune_ref.train.step import clip_grad_norm_

    params = [p for p in model.parameters() if p.requires_grad]
    with record_function("## forward"):
        loss = model(input_ids=ids, labels=ids).loss
    with record_function("## backward"):
        loss.backward()
    with record_function("## optimizer"):
        clip_grad_norm_(params, max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def table(prof, top: int) -> tuple[str, dict]:
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    phases = {e.key: e.cpu_time_total for e in events if e.key.startswith("## ")}
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
    rows = sorted((e for e in events if not e.key.startswith("## ")), key=lambda e: -e.self_cpu_time_total)[:top]
    lines = ["| op | self CPU ms | share | calls |", "|---|---:|---:|---:|"]
    for e in rows:
        lines.append(f"| `{e.key}` | {e.self_cpu_time_total / 1e3:.1f} | {e.self_cpu_time_total / total:.1%} | "
                     f"{e.count} |")
    summary = {"total_ms": total / 1e3, "matmul_ms": matmul / 1e3,
               **{k[3:]: v / 1e3 for k, v in phases.items()}}
    return "\n".join(lines), summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=("lora", "qlora"), default="lora")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--by-shape", action="store_true", help="also list the top ops by (op, input shapes)")
    args = parser.parse_args()
    from finetune_ref.models.default_model import default_model_dir

    args.model_dir = default_model_dir()
    torch.set_num_threads(args.threads)
    cfg, model, optimizer = build(args.method, args.precision, args.model_dir)
    ids = text_batch(args.model_dir, args.batch_size, args.seq_len)
    for _ in range(args.warmup):
        step(model, ids, optimizer, cfg.max_grad_norm)
    start = time.perf_counter()
    step(model, ids, optimizer, cfg.max_grad_norm)
    plain = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.by_shape) as prof:
        step(model, ids, optimizer, cfg.max_grad_norm)
    text, summary = table(prof, args.top)
    print(f"## {args.method} {args.precision}, {args.batch_size} x {args.seq_len}, threads {args.threads}, "
          f"{platform.processor() or platform.machine()}, load {os.getloadavg()[0]:.2f}")
    print(f"unprofiled step {plain:.2f} s; profiled: " + ", ".join(f"{k} {v:.0f} ms" for k, v in summary.items())
          + f"; matmul share {summary['matmul_ms'] / summary['total_ms']:.1%}")
    print(text)
    if args.by_shape:
        rows = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
        print("\n| op | input shapes | self CPU ms | calls |\n|---|---|---:|---:|")
        for e in [e for e in rows if not e.key.startswith("## ")][:args.top]:
            print(f"| `{e.key}` | {str(e.input_shapes)[:90]} | {e.self_cpu_time_total / 1e3:.1f} | {e.count} |")


if __name__ == "__main__":
    main()
