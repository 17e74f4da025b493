"""The LoRA branch of one decoder layer, forward + backward: ``lora.branch`` (gradients as wide products) against
autograd through PEFT's ops (``lora.functional``), at SmolLM2-135M's shapes.

Per projection group of a layer (q/k/v, o, gate/up, down) it times, in turns, median of ``--repeats``:

- "PEFT ops": each layer's adapter as PEFT computes it (x cast to the adapter dtype, ``F.linear`` with A, with B,
  the scaling, the sum in the base dtype), through autograd;
- "PEFT ops, A's stacked": the same with the group's A's as one matmul (what the fused projections ran before
  ``lora.branch``);
- "lora.branch": ``lora.branch.lora_branch``;
- "lora.branch, two-step sum": the same with each update summed into the base output as PEFT's two steps (the
  (N, out) product, then ``add_update``) instead of one ``addmm_`` (``lora.branch._add_up``): its forward before.

Usage:
    OMP_NUM_THREADS=2 python benchmarks/bench_lora_branch.py --threads 2 --dtype bf16
    OMP_NUM_THREADS=2 python benchmarks/bench_lora_branch.py --threads 2 --dtype fp32
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from finetune_ref.lora import branch
from finetune_ref.lora.branch import lora_branch
from finetune_ref.lora.functional import add_update, lora_forward, lora_up

# SmolLM2-135M: hidden 576, intermediate 1536, 9 query heads and 3 k/v heads of 64
GROUPS = {"q/k/v": (576, [576, 192, 192]), "o": (576, [576]), "gate/up": (576, [1536, 1536]), "down": (1536, [576])}


def peft_ops(x, results, lora_As, lora_Bs, scalings, dtypes):
    return [add_update(r, lora_forward(x.to(A.dtype), A, B, s), d)
            for r, A, B, s, d in zip(results, lora_As, lora_Bs, scalings, dtypes)]


def peft_ops_stacked(x, results, lora_As, lora_Bs, scalings, dtypes):
    mids = F.linear(x.to(lora_As[0].dtype), torch.cat(lora_As)).split([a.shape[0] for a in lora_As], dim=-1)
    return [add_update(r, lora_up(m, B, s), d) for r, m, B, s, d in zip(results, mids, lora_Bs, scalings, dtypes)]


def branch_two_step_sum(*args):
    """``lora_branch`` with ``_add_up`` patched to the two steps for this forward (backward does not use it)."""
    one_addmm, branch._add_up = branch._add_up, branch.add_up_two_steps
    try:
        return lora_branch(*args)
    finally:
        branch._add_up = one_addmm


IMPLEMENTATIONS = {"PEFT ops": peft_ops, "PEFT ops, A's stacked": peft_ops_stacked, "lora.branch": lora_branch,
                   "lora.branch, two-step sum": branch_two_step_sum}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="base (activation) dtype")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1024, help="rows N (batch x sequence)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    g = torch.Generator().manual_seed(0)
    print(f"LoRA branch forward + backward, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}; base/activations {args.dtype}, fp32 "
          f"adapters r={args.rank}, scaling 2, N={args.tokens}; median ms of {args.repeats}, in turns\n")
    print("| group | " + " | ".join(IMPLEMENTATIONS) + " | PEFT ops / lora.branch | two-step sum / lora.branch |")
    print("|---|" + "---:|" * (len(IMPLEMENTATIONS) + 2))
    for name, (in_features, outs) in GROUPS.items():
        x = torch.randn(args.tokens, in_features, generator=g).to(dtype).requires_grad_()
        results = [torch.randn(args.tokens, o, generator=g).to(dtype).requires_grad_() for o in outs]
        lora_As = [(torch.randn(args.rank, in_features, generator=g) * 0.05).requires_grad_() for _ in outs]
        lora_Bs = [(torch.randn(o, args.rank, generator=g) * 0.05).requires_grad_() for o in outs]
        grads = [torch.randn(args.tokens, o, generator=g).to(dtype) for o in outs]
        scalings, dtypes = [2.0] * len(outs), [dtype] * len(outs)

        def run(fn):
            outputs = fn(x, results, lora_As, lora_Bs, scalings, dtypes)
            torch.autograd.backward(outputs, grads)

        times = {k: [] for k in IMPLEMENTATIONS}
        for k, fn in IMPLEMENTATIONS.items():
            run(fn)  # warm-up
        for _ in range(args.repeats):
            for k, fn in IMPLEMENTATIONS.items():
                start = time.perf_counter()
                run(fn)
                times[k].append((time.perf_counter() - start) * 1e3)
        medians = {k: statistics.median(v) for k, v in times.items()}
        cells = " | ".join(f"{medians[k]:.2f}" for k in IMPLEMENTATIONS)
        print(f"| {name} | {cells} | {medians['PEFT ops'] / medians['lora.branch']:.2f}x | "
              f"{medians['lora.branch, two-step sum'] / medians['lora.branch']:.2f}x |")


if __name__ == "__main__":
    main()
