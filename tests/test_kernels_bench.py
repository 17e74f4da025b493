"""The reporting half of ``benchmarks/bench_kernels.py``, fed synthetic numbers.

The GPU half of the script only runs on a CUDA machine, where a crash in its table code would
waste the (rationed) device time; these tests render and write a made-up GPU result and a CPU
result, and check that each run keeps the other's section.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kernels.py"


@pytest.fixture
def bench(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RESULTS_MD", tmp_path / "RESULTS.md")
    (tmp_path / "README.md").write_text("intro\n\n<!-- BEGIN results-gpu -->\nold\n<!-- END results-gpu -->\n\nend\n")
    monkeypatch.setattr(module, "README_MD", tmp_path / "README.md")
    return module


def _gpu_result():
    matmul = dict(shape="4096x4096", layer="q", fused_ms=0.004, dequant_matmul_ms=0.02, bf16_linear_ms=0.012,
                  fused_speedup_vs_bf16=3.0, fused_speedup_vs_dequant_matmul=5.0, fused_GBps=2200.0,
                  bf16_linear_GBps=2800.0, fused_TFLOPs=8.4, bf16_linear_TFLOPs=2.8, bwd_fused_ms=0.005,
                  bwd_bf16_ms=0.012, bwd_speedup_vs_bf16=2.4)
    return {
        "kind": "gpu", "date": "2026-01-01 00:00 UTC", "versions": {"torch": "x", "triton": "y"},
        "info": {"device": "NVIDIA H200", "sms": 132},
        "ceilings": {"copy_GBps": 4300.0, "bf16_matmul_TFLOPs": 790.0, "copy_bytes": 1, "matmul_size": 8192},
        "dequant": [dict(shape="4096x4096", layer="q", bytes=42, ours_ms=0.01, ours_GBps=3900.0, ours_pct_copy=90.0,
                         bnb_ms=None, bnb_GBps=None)],
        "matmuls": [dict(matmul, M=1), dict(matmul, M=4096, fused_ms=0.2, bf16_linear_ms=0.19, dequant_matmul_ms=0.21)],
        "correctness": [dict(kernel="forward", shape="3x5", dtype="bfloat16", double_quant=True, M=1,
                             max_abs_err=0.5, ok=False)],
        "seconds": 1.0,
    }


def test_gpu_report_renders_targets_and_failures(bench):
    text = bench.render(_gpu_result())
    assert "NVIDIA H200" in text and "| 4096x4096 | 1 | 0.0040 |" in text
    assert "91% of copy bandwidth (target >= 85%: met)" in text
    assert "bitsandbytes not measured" in text
    assert "3.00x faster than bf16 F.linear (target >= 2.5x: met)" in text
    assert "fused takes 1.05x bf16 F.linear's time" in text and "target <= 1.10x: met" in text
    assert "0/1 checks pass" in text and "FAIL forward 3x5 bfloat16" in text


def test_sections_are_kept_apart(bench, tmp_path):
    gpu = _gpu_result()
    bench.write_reports(gpu, tmp_path / "out", write_docs=True)
    saved = json.loads((tmp_path / "out" / "kernels_gpu.json").read_text())
    assert saved["ceilings"]["copy_GBps"] == 4300.0
    assert (tmp_path / "out" / "kernels_gpu.csv").read_text().count("\n") == 3  # header + 2 rows
    cpu = {"kind": "cpu", "date": "2026-01-02", "versions": {}, "info": {"device": "EPYC", "threads": 1,
           "load_average": "0"}, "ceilings": {"copy_GBps": 30.0, "fp32_matmul_GFLOPs": 70.0},
           "dequant": [dict(shape="8x64", layer="x", reference_ms=1.0, reference_GBps=2.0, bnb_ms=None)],
           "matmuls": [dict(shape="8x64", layer="x", M=1, reference_ms=1.0, fp32_linear_ms=0.1,
                            slowdown_vs_fp32_linear=10.0)], "seconds": 1.0}
    bench.write_reports(cpu, None, write_docs=True)
    results = (tmp_path / "RESULTS.md").read_text()
    assert "NVIDIA H200" in results and "EPYC" in results  # the CPU run kept the GPU section
    assert bench.GPU_PENDING not in results
    readme = (tmp_path / "README.md").read_text()
    assert readme.startswith("intro") and readme.rstrip().endswith("<!-- END results-cpu -->")
    assert "old" not in readme and "NVIDIA H200" in readme


def test_cpu_only_run_says_gpu_is_pending(bench, tmp_path):
    cpu = {"kind": "cpu", "date": "d", "versions": {}, "info": {"device": "EPYC", "threads": 1, "load_average": "0"},
           "ceilings": {"copy_GBps": 30.0, "fp32_matmul_GFLOPs": 70.0}, "dequant": [], "matmuls": [], "seconds": 0}
    bench.write_reports(cpu, None, write_docs=True)
    assert bench.GPU_PENDING in (tmp_path / "RESULTS.md").read_text()
    assert bench.GPU_PENDING in (tmp_path / "README.md").read_text()
