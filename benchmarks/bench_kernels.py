"""Benchmark of the NF4 kernels against the roofline, and their bf16 correctness on a GPU.

One run measures, on a CUDA GPU (a few minutes on an H200):

- the ceilings: device copy bandwidth (bytes read + written) and the bf16 matmul rate;
- NF4 + double-quant dequantize to bf16 on Llama-7B layer shapes, ours and bitsandbytes'
  ``dequantize_4bit``, in GB/s and % of copy bandwidth, with bytes = packed + absmax codes +
  nested absmax read (0.516 B/weight) + 2 B/weight written;
- y = x @ W^T for M in {1, 16, 128, 4096} on 4096x4096, 11008x4096 and 4096x11008:
  our fused kernel, "dequantize + F.linear" and plain bf16 ``F.linear``; and dx = dy @ W,
  fused vs bf16;
- bf16 (and fp16/fp32) correctness of every kernel against an fp32 reference, on odd shapes and
  on a weight of more than 2^31 elements (int64 offsets).

It prints one table with ratios and the targets set for them, saves JSON and CSV, and writes the
results into ``benchmarks/RESULTS.md`` and the table in ``kernels/README.md`` (between
``<!-- BEGIN ... -->`` / ``<!-- END ... -->`` markers; the GPU and CPU sections are kept apart).

Without a GPU it runs the CPU part (ceilings, the PyTorch reference path against dense
``F.linear``, bitsandbytes' CPU dequantize) and says plainly that the GPU figures are pending.

Usage:
    python benchmarks/bench_kernels.py                      # measure, write everything
    python benchmarks/bench_kernels.py --out-dir $OUT       # also where JSON/CSV go (device runs)
    python benchmarks/bench_kernels.py --from-json FILE     # re-render RESULTS.md / README from a JSON
    python benchmarks/bench_kernels.py --dry-run            # the GPU code path on CPU, tiny shapes,
                                                            # Triton interpreter, writes nothing
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.metadata
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# The NF4 test data, tolerances and row slices are test helpers (tests/kernel_testing.py), not library code:
# import them from the tests folder. The project itself is imported as installed (finetune_ref).
sys.path.insert(0, str(REPO / "tests"))

LLAMA7B_SHAPES = ((4096, 4096, "q/k/v/o_proj"), (11008, 4096, "gate/up_proj"), (4096, 11008, "down_proj"))
GPU_MS = (1, 16, 128, 4096)
SMOLLM2_SHAPES = ((1536, 576, "gate/up_proj"), (576, 1536, "down_proj"))
CPU_MS = (1, 16, 128)
RESULTS_MD = REPO / "benchmarks" / "RESULTS.md"
README_MD = REPO / "kernels" / "README.md"

# The targets set for the kernels (kernels/README.md, section 5).
TARGET_DEQUANT_OF_COPY = 0.85
TARGET_DECODE_SPEEDUP = 2.5
TARGET_TRAIN_SLOWDOWN = 1.10


# ------------------------------------------------------------------------------------ timing
def bench_gpu(fn: Callable[[], Any]) -> float:
    """Median milliseconds of ``fn`` on the GPU (Triton's do_bench: CUDA events, L2 flushed
    before each call so a weight that fits in L2 is still read from HBM)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def bench_cpu(fn: Callable[[], Any], min_time: float = 0.3, min_reps: int = 5) -> float:
    """Fastest wall-clock milliseconds of ``fn`` on the CPU, after one warm-up call. The minimum,
    not the median: on a shared machine other processes only ever add time."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "triton", "bitsandbytes"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def nf4_read_bytes(weight: Any) -> int:
    """Bytes a kernel must read for an NF4 weight ``(packed, state)``: packed codes, absmax (codes),
    nested absmax."""
    packed, state = weight
    total = packed.numel() + state.absmax.numel() * state.absmax.element_size()
    if state.nested:
        total += state.nested_absmax.numel() * 4
    return total


def make_weight(shape: tuple[int, int], device: Any, double_quant: bool = True, seed: int = 0) -> Any:
    """A realistic NF4 weight ``(packed, state)``: N(0, 0.02) values quantized on the CPU by the
    project's quantizer (``qlora/nf4.py``, bitsandbytes' bytes), then moved to ``device``."""
    import torch
    from kernel_testing import make_nf4_weight

    g = torch.Generator(device="cpu").manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    return make_nf4_weight(w, 64, double_quant, device)


# ------------------------------------------------------------------------------------ GPU part
def gpu_ceilings(device: Any, dry_run: bool, bench: Callable) -> dict[str, float]:
    import torch

    n = (1 << 16) if dry_run else (1 << 29)  # 1 GiB of bf16 per buffer on a GPU
    src = torch.randn(n, device=device).to(torch.bfloat16)
    dst = torch.empty_like(src)
    copy_ms = bench(lambda: dst.copy_(src))
    s = 128 if dry_run else 8192
    a = torch.randn(s, s, device=device).to(torch.bfloat16)
    b = torch.randn(s, s, device=device).to(torch.bfloat16)
    mm_ms = bench(lambda: torch.mm(a, b))
    return {
        "copy_GBps": 2 * src.numel() * 2 / copy_ms / 1e6,  # read + written
        "bf16_matmul_TFLOPs": 2 * s**3 / mm_ms / 1e9,
        "copy_bytes": 2 * src.numel() * 2,
        "matmul_size": s,
    }


def gpu_dequant(shapes, device, bench, copy_gbps) -> list[dict[str, Any]]:
    import torch

    from finetune_ref.kernels.nf4_dequant import dequantize_nf4_triton

    rows = []
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        bnbf = None
    for N, K, name in shapes:
        nw = make_weight((N, K), device)
        out = torch.empty((N, K), dtype=torch.bfloat16, device=device)
        moved = nf4_read_bytes(nw) + 2 * N * K
        ours_ms = bench(lambda: dequantize_nf4_triton(*nw, torch.bfloat16, out=out))
        row = {"shape": f"{N}x{K}", "layer": name, "bytes": moved, "ours_ms": ours_ms,
               "ours_GBps": moved / ours_ms / 1e6, "bnb_ms": None, "bnb_GBps": None}
        row["ours_pct_copy"] = 100 * row["ours_GBps"] / copy_gbps
        if bnbf is not None and device.type == "cuda":
            w = (torch.randn((N, K), generator=torch.Generator().manual_seed(0)) * 0.02).to(device, torch.bfloat16)
            packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
            out_bnb = torch.empty_like(out)
            row["bnb_ms"] = bench(lambda: bnbf.dequantize_4bit(packed, state, out=out_bnb))
            row["bnb_GBps"] = moved / row["bnb_ms"] / 1e6
        rows.append(row)
    return rows


def gpu_matmuls(shapes, ms, device, bench) -> list[dict[str, Any]]:
    import torch
    import torch.nn.functional as F

    from finetune_ref.kernels.nf4_dequant import dequantize_nf4_triton
    from finetune_ref.kernels.nf4_matmul import nf4_matmul_input_grad_triton, nf4_matmul_triton

    rows = []
    for N, K, name in shapes:
        nw = make_weight((N, K), device)
        dense = dequantize_nf4_triton(*nw, torch.bfloat16)  # (N, K) bf16, same values as the NF4 weight
        w_bytes = nf4_read_bytes(nw)
        for M in ms:
            x = torch.randn(M, K, device=device).to(torch.bfloat16)
            dy = torch.randn(M, N, device=device).to(torch.bfloat16)
            fused = bench(lambda: nf4_matmul_triton(x, *nw))
            dq_mm = bench(lambda: F.linear(x, dequantize_nf4_triton(*nw, torch.bfloat16)))
            linear = bench(lambda: F.linear(x, dense))
            bwd_fused = bench(lambda: nf4_matmul_input_grad_triton(dy, *nw))
            bwd_dense = bench(lambda: dy @ dense)
            flops = 2 * M * N * K
            rows.append({
                "shape": f"{N}x{K}", "layer": name, "M": M,
                "fused_ms": fused, "dequant_matmul_ms": dq_mm, "bf16_linear_ms": linear,
                "fused_speedup_vs_bf16": linear / fused, "fused_speedup_vs_dequant_matmul": dq_mm / fused,
                "fused_GBps": (w_bytes + 2 * M * (N + K)) / fused / 1e6,
                "bf16_linear_GBps": (2 * N * K + 2 * M * (N + K)) / linear / 1e6,
                "fused_TFLOPs": flops / fused / 1e9, "bf16_linear_TFLOPs": flops / linear / 1e9,
                "bwd_fused_ms": bwd_fused, "bwd_bf16_ms": bwd_dense, "bwd_speedup_vs_bf16": bwd_dense / bwd_fused,
            })
    return rows


def gpu_correctness(device, dry_run: bool) -> list[dict[str, Any]]:
    """Every kernel against an fp32 reference, bf16/fp16/fp32, odd shapes and > 2^31 elements."""
    import torch

    from kernel_testing import TOLERANCES, nf4_row_slice, random_nf4_weight

    from finetune_ref.kernels.nf4_dequant import dequantize_nf4_triton
    from finetune_ref.kernels.nf4_matmul import nf4_matmul_input_grad_triton, nf4_matmul_triton
    from finetune_ref.kernels.reference import dequantize_nf4

    checks: list[dict[str, Any]] = []

    def record(kind, shape, dtype, dq, M, got, want, exact=False):
        got, want = got.float(), want.float()
        err = (got - want).abs().max().item() if got.numel() else 0.0
        if exact:
            ok = torch.equal(got, want)
        else:
            ok = torch.allclose(got, want, **TOLERANCES[dtype])
        checks.append({"kernel": kind, "shape": "x".join(map(str, shape)), "dtype": str(dtype).split(".")[-1],
                       "double_quant": dq, "M": M, "max_abs_err": err, "ok": bool(ok)})

    shapes = [(1, 1), (3, 5), (65, 67), (100, 300)] + ([] if dry_run else [(4096, 11008)])
    dtypes = (torch.float32, torch.float16) if dry_run else (torch.bfloat16, torch.float16, torch.float32)
    for shape in shapes:
        for dq in (False, True):
            nw = make_weight(shape, device, dq)
            for dtype in dtypes:
                w32 = dequantize_nf4(*nw, dtype).float()  # the weight as the kernels see it
                # Exact up to one fused multiply-add in the double-quant scale (GPU): compare as close.
                record("dequant", shape, dtype, dq, None, dequantize_nf4_triton(*nw, dtype),
                       dequantize_nf4(*nw, dtype), exact=dq is False)
                for M in (1, 3, 17, 64) + (() if dry_run else (4096,)):
                    g = torch.Generator().manual_seed(M)
                    x = torch.randn(M, shape[1], generator=g).to(device, dtype)
                    dy = torch.randn(M, shape[0], generator=g).to(device, dtype)
                    # fp32 references: products of the rounded inputs, summed in fp32 (fp64 on CPU).
                    ref_y = (x.double() @ w32.double().T).float()
                    ref_dx = (dy.double() @ w32.double()).float()
                    record("forward", shape, dtype, dq, M, nf4_matmul_triton(x, *nw), ref_y)
                    record("input_grad", shape, dtype, dq, M, nf4_matmul_input_grad_triton(dy, *nw), ref_dx)
    if not dry_run:
        # > 2^31 elements: rows from 65536 on start on a nested-block boundary (see nf4_row_slice).
        rows, cols = 65539, 32832
        for dq in (False, True):
            big = random_nf4_weight((rows, cols), dq, device)
            out = dequantize_nf4_triton(*big, torch.bfloat16)
            tail = nf4_row_slice(*big, 65536, rows)
            record("dequant>2^31", (rows, cols), torch.bfloat16, dq, None, out[65536:],
                   dequantize_nf4(*tail, torch.bfloat16), exact=not dq)
            del out
            x = torch.randn(2, cols, device=device).to(torch.bfloat16)
            y = nf4_matmul_triton(x, *big)
            w_tail = dequantize_nf4(*tail, torch.bfloat16).double()
            record("forward>2^31", (rows, cols), torch.bfloat16, dq, 2, y[:, 65536:],
                   (x.double() @ w_tail.T).float())
            dy = torch.randn(2, rows, device=device).to(torch.bfloat16)
            dx = nf4_matmul_input_grad_triton(dy, *big)
            ref = torch.zeros(2, cols, dtype=torch.float64, device=device)
            for start in range(0, rows, 4096):
                stop = min(rows, start + 4096)
                part = dequantize_nf4(*nf4_row_slice(*big, start, stop), torch.bfloat16).double()
                ref += dy[:, start:stop].double() @ part
            record("input_grad>2^31", (rows, cols), torch.bfloat16, dq, 2, dx, ref.float())
            del big
            torch.cuda.empty_cache()
    return checks


def gpu_part(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    dry = args.dry_run
    device = torch.device("cpu" if dry else "cuda")
    bench = (lambda fn: bench_cpu(fn, min_time=0.0, min_reps=1)) if dry else bench_gpu
    shapes = ((96, 64, "tiny"), (64, 160, "tiny-t")) if dry else LLAMA7B_SHAPES
    ms = (1, 16) if dry else GPU_MS
    info = {"device": "dry run (CPU, Triton interpreter)" if dry else torch.cuda.get_device_name(device)}
    if not dry:
        props = torch.cuda.get_device_properties(device)
        info.update(sms=props.multi_processor_count, memory_GiB=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
    t0 = time.time()
    ceilings = gpu_ceilings(device, dry, bench)
    dequant = gpu_dequant(shapes, device, bench, ceilings["copy_GBps"])
    matmuls = gpu_matmuls(shapes, ms, device, bench)
    checks = gpu_correctness(device, dry)
    return {"kind": "gpu", "info": info, "ceilings": ceilings, "dequant": dequant, "matmuls": matmuls,
            "correctness": checks, "seconds": round(time.time() - t0, 1)}


# ------------------------------------------------------------------------------------ CPU part
def cpu_part(threads: int) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    # One thread by default: on a shared machine a multi-threaded op waits for its slowest thread,
    # and a descheduled thread costs a whole scheduler slice (seen: 1 ms ops taking 100 ms).
    torch.set_num_threads(threads)
    from finetune_ref.kernels.reference import dequantize_nf4, nf4_matmul

    t0 = time.time()
    load_before = os.getloadavg()[0]
    src = torch.randn(1 << 26)  # 256 MiB fp32
    dst = torch.empty_like(src)
    copy_ms = bench_cpu(lambda: dst.copy_(src))
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    mm_ms = bench_cpu(lambda: a @ b)
    ceilings = {"copy_GBps": 2 * src.numel() * 4 / copy_ms / 1e6, "fp32_matmul_GFLOPs": 2 * 1024**3 / mm_ms / 1e6}
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        bnbf = None
    dequant, matmuls = [], []
    for N, K, name in SMOLLM2_SHAPES:
        nw = make_weight((N, K), "cpu")
        moved = nf4_read_bytes(nw) + 4 * N * K  # to fp32
        ref_ms = bench_cpu(lambda: dequantize_nf4(*nw, torch.float32))
        row = {"shape": f"{N}x{K}", "layer": name, "reference_ms": ref_ms, "reference_GBps": moved / ref_ms / 1e6,
               "bnb_ms": None}
        if bnbf is not None:
            w = torch.randn(N, K, generator=torch.Generator().manual_seed(0)) * 0.02
            packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
            row["bnb_ms"] = bench_cpu(lambda: bnbf.dequantize_4bit(packed, state))
        dequant.append(row)
        dense = dequantize_nf4(*nw, torch.float32)
        for M in CPU_MS:
            x = torch.randn(M, K)
            ref = bench_cpu(lambda: nf4_matmul(x, *nw))
            lin = bench_cpu(lambda: F.linear(x, dense))
            matmuls.append({"shape": f"{N}x{K}", "layer": name, "M": M, "reference_ms": ref, "fp32_linear_ms": lin,
                            "slowdown_vs_fp32_linear": ref / lin})
    load = f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    return {"kind": "cpu", "info": {"device": _cpu_name(), "threads": torch.get_num_threads(), "load_average": load},
            "ceilings": ceilings, "dequant": dequant, "matmuls": matmuls, "seconds": round(time.time() - t0, 1)}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# ------------------------------------------------------------------------------------ report
def _f(v: Any, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def render_gpu(r: dict[str, Any]) -> str:
    c = r["ceilings"]
    extra = ", ".join(f"{k} {v}" for k, v in r["info"].items() if k != "device")
    lines = [
        f"GPU: {r['info']['device']}" + (f" ({extra})" if extra else ""),
        "",
        f"Ceilings: copy {c['copy_GBps']:.0f} GB/s (read + write), bf16 matmul {c['bf16_matmul_TFLOPs']:.0f} TFLOP/s "
        f"({c['matmul_size']}^3).",
        "",
        "NF4 + double quant -> bf16 dequantize (bytes = 0.516 read + 2 written per weight):",
        "",
        "| shape | ours ms | ours GB/s | % of copy | bnb ms | bnb GB/s | bnb time / ours |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in r["dequant"]:
        vs = None if d["bnb_ms"] is None else d["bnb_ms"] / d["ours_ms"]
        lines.append(f"| {d['shape']} | {d['ours_ms']:.4f} | {d['ours_GBps']:.0f} | {d['ours_pct_copy']:.0f}% | "
                     f"{_f(d['bnb_ms'], '.4f')} | {_f(d['bnb_GBps'], '.0f')} | {_f(vs, '.2f')} |")
    lines += [
        "",
        "y = x @ W^T (bf16), and dx = dy @ W; speedup = bf16 F.linear time / ours (> 1: ours faster):",
        "",
        "| W (N x K) | M | fused ms | dequant+F.linear ms | bf16 F.linear ms | fused vs bf16 | fused vs dq+mm "
        "| fused GB/s | fused TFLOP/s | dx fused ms | dx bf16 ms | dx fused vs bf16 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in r["matmuls"]:
        cells = [m["shape"], m["M"], f"{m['fused_ms']:.4f}", f"{m['dequant_matmul_ms']:.4f}",
                 f"{m['bf16_linear_ms']:.4f}", f"{m['fused_speedup_vs_bf16']:.2f}x",
                 f"{m['fused_speedup_vs_dequant_matmul']:.2f}x", f"{m['fused_GBps']:.0f}", f"{m['fused_TFLOPs']:.1f}",
                 f"{m['bwd_fused_ms']:.4f}", f"{m['bwd_bf16_ms']:.4f}", f"{m['bwd_speedup_vs_bf16']:.2f}x"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += ["", "Targets:", ""] + [f"- {t}" for t in targets(r)]
    bad = [k for k in r["correctness"] if not k["ok"]]
    lines += ["", f"Correctness: {len(r['correctness']) - len(bad)}/{len(r['correctness'])} checks pass "
              "(kernels vs fp32 reference; bf16, fp16, fp32; odd shapes; > 2^31 elements)."]
    for k in bad:
        lines.append(f"- FAIL {k['kernel']} {k['shape']} {k['dtype']} dq={k['double_quant']} M={k['M']}: "
                     f"max abs err {k['max_abs_err']:.3g}")
    return "\n".join(lines)


def targets(r: dict[str, Any]) -> list[str]:
    out = []
    copy = r["ceilings"]["copy_GBps"]
    for d in r["dequant"]:
        pct = d["ours_GBps"] / copy
        gap = 100 * (TARGET_DEQUANT_OF_COPY - pct)
        verdict = "met" if gap <= 0 else f"missed by {gap:.0f} points"
        line = (f"dequant {d['shape']}: {100 * pct:.0f}% of copy bandwidth "
                f"(target >= {100 * TARGET_DEQUANT_OF_COPY:.0f}%: {verdict})")
        if d["bnb_ms"] is not None:
            line += f"; {d['bnb_ms'] / d['ours_ms']:.2f}x bitsandbytes' speed (target > 1)"
        else:
            line += "; bitsandbytes not measured (not installed)"
        out.append(line)
    for m in r["matmuls"]:
        if m["M"] == 1:
            s = m["fused_speedup_vs_bf16"]
            out.append(f"fused M=1 {m['shape']}: {s:.2f}x faster than bf16 F.linear "
                       f"(target >= {TARGET_DECODE_SPEEDUP}x: {'met' if s >= TARGET_DECODE_SPEEDUP else 'missed'})")
        if m["M"] == max(x["M"] for x in r["matmuls"]):
            slow = m["fused_ms"] / m["bf16_linear_ms"]
            alt = m["dequant_matmul_ms"] / m["bf16_linear_ms"]
            out.append(f"M={m['M']} {m['shape']}: fused takes {slow:.2f}x bf16 F.linear's time, dequant+F.linear "
                       f"{alt:.2f}x (target <= {TARGET_TRAIN_SLOWDOWN:.2f}x: "
                       f"{'met' if min(slow, alt) <= TARGET_TRAIN_SLOWDOWN else 'missed'})")
    return out


def render_cpu(r: dict[str, Any]) -> str:
    c = r["ceilings"]
    lines = [
        f"CPU: {r['info']['device']}, torch threads: {r['info']['threads']}, load average {r['info']['load_average']} "
        "(other processes share these cores; times are the fastest of several runs).",
        f"Ceilings: copy {c['copy_GBps']:.1f} GB/s (read + write), fp32 matmul {c['fp32_matmul_GFLOPs']:.0f} GFLOP/s.",
        "",
        "The CPU path is the PyTorch reference (no Triton). NF4 + double quant -> fp32 dequantize, and "
        "y = x @ W^T in fp32 (reference = dequantize, then F.linear) on SmolLM2-135M shapes:",
        "",
        "| W (N x K) | reference dequant ms | GB/s | bnb CPU dequant ms |",
        "|---|---|---|---|",
    ]
    for d in r["dequant"]:
        lines.append(f"| {d['shape']} | {d['reference_ms']:.3f} | {d['reference_GBps']:.2f} | {_f(d['bnb_ms'])} |")
    lines += ["", "| W (N x K) | M | reference matmul ms | fp32 F.linear ms (dense W) | reference / dense |",
              "|---|---|---|---|---|"]
    for m in r["matmuls"]:
        lines.append(f"| {m['shape']} | {m['M']} | {m['reference_ms']:.3f} | {m['fp32_linear_ms']:.3f} "
                     f"| {m['slowdown_vs_fp32_linear']:.1f}x |")
    return "\n".join(lines)


def render(r: dict[str, Any]) -> str:
    head = f"Measured {r['date']} with {', '.join(f'{k} {v}' for k, v in r['versions'].items())}."
    body = render_gpu(r) if r["kind"] == "gpu" else render_cpu(r)
    return head + "\n\n" + body


GPU_PENDING = ("GPU figures pending: no CUDA GPU was available when this file was last written. Run "
               "`python benchmarks/bench_kernels.py` on a CUDA machine (a few minutes) to fill this section.")


def replace_section(path: Path, tag: str, content: str, default_head: str) -> None:
    """Rewrite the text between ``<!-- BEGIN tag -->`` and ``<!-- END tag -->`` in ``path``
    (appending the section if missing), atomically."""
    begin, end = f"<!-- BEGIN {tag} -->", f"<!-- END {tag} -->"
    text = path.read_text() if path.exists() else default_head
    block = f"{begin}\n{content}\n{end}"
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        post = rest.split(end, 1)[1]
        text = pre + block + post
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    write_atomic(path, text)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


RESULTS_HEAD = """# Kernel benchmark results

Written by `benchmarks/bench_kernels.py`. Shapes: Llama-7B layers 4096x4096 (q/k/v/o),
11008x4096 (gate/up), 4096x11008 (down) on a GPU; SmolLM2-135M layers on the CPU. GPU times are
medians from Triton's `do_bench` (L2 flushed before each call); CPU times are the fastest of
several runs.

## GPU

<!-- BEGIN gpu -->
<!-- END gpu -->

## CPU

<!-- BEGIN cpu -->
<!-- END cpu -->
"""


def write_reports(r: dict[str, Any], out_dir: Path | None, write_docs: bool) -> None:
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(out_dir / f"kernels_{r['kind']}.json", json.dumps(r, indent=1))
        fields = sorted({k for m in r["matmuls"] for k in m})
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".csv.")
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(r["matmuls"])
        os.replace(tmp, out_dir / f"kernels_{r['kind']}.csv")
    if write_docs:
        text = render(r)
        replace_section(RESULTS_MD, r["kind"], text, RESULTS_HEAD)
        replace_section(README_MD, f"results-{r['kind']}", text, "")
        if r["kind"] == "cpu" and "GPU: " not in _section(RESULTS_MD.read_text(), "gpu"):
            # Say plainly that GPU figures are missing (a GPU run's section is kept).
            replace_section(RESULTS_MD, "gpu", GPU_PENDING, RESULTS_HEAD)
            replace_section(README_MD, "results-gpu", GPU_PENDING, "")


def _section(text: str, tag: str) -> str:
    begin, end = f"<!-- BEGIN {tag} -->", f"<!-- END {tag} -->"
    if begin not in text or end not in text:
        return ""
    return text.split(begin, 1)[1].split(end, 1)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results",
                        help="where kernels_{gpu,cpu}.json/.csv go (default benchmarks/results)")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite RESULTS.md / kernels/README.md")
    parser.add_argument("--from-json", type=Path, help="render RESULTS.md / README from a saved JSON and exit")
    parser.add_argument("--dry-run", action="store_true",
                        help="run the GPU code path on the CPU (Triton interpreter, tiny shapes); writes nothing")
    parser.add_argument("--cpu", action="store_true", help="run the CPU part even if a GPU is present")
    parser.add_argument("--cpu-threads", type=int, default=1, help="torch threads for the CPU part (default 1)")
    args = parser.parse_args(argv)

    if args.from_json:
        r = json.loads(args.from_json.read_text())
        write_reports(r, None, write_docs=True)
        print(render(r))
        return 0
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before the first Triton kernel module is imported

    import torch

    use_gpu = args.dry_run or (torch.cuda.is_available() and not args.cpu)
    if use_gpu:
        r = gpu_part(args)
    else:
        print("No CUDA GPU: running the CPU part only. GPU figures are pending "
              "(run this script on a CUDA machine).", flush=True)
        r = cpu_part(args.cpu_threads)
    r["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    r["versions"] = versions()
    print(render(r))
    if args.dry_run:
        bad = [k for k in r["correctness"] if not k["ok"]]
        print(f"\ndry run: {len(r['correctness']) - len(bad)}/{len(r['correctness'])} correctness checks pass; "
              "nothing written")
        return 1 if bad else 0
    write_reports(r, args.out_dir, write_docs=not args.no_docs)
    if r["kind"] == "cpu":
        print("\nGPU figures pending: no CUDA GPU in this run.")
    return 0 if r["kind"] == "cpu" or all(k["ok"] for k in r["correctness"]) else 1


if __name__ == "__main__":
    sys.exit(main())
