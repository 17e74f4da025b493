"""benchmarks/bench_training.py's own logic: the variance check that refuses noisy speed ratios, the matmul
FLOP count behind the "fraction of F.linear" column, the switches of our variants, and the loss path's peak.
(The timings themselves are the benchmark's business, not a test's.)"""

import importlib.util
from pathlib import Path

import pytest
import torch

from finetune_ref.train.memory_tracker import TensorMemoryTracker
from finetune_ref.models.config import LlamaConfig
from finetune_ref.models.llama import LlamaForCausalLM

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_training.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_training", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.usefixtures("one_thread")


def test_variance_check_flags_rows_that_varied_more_than_2x(bench):
    times = {"ours": [1.0, 1.1, 0.95], "transformers": [0.5, 1.4], "one": [3.0]}
    flagged = bench.check_variance(times)
    assert len(flagged) == 1 and flagged[0].startswith("transformers") and "2.8x" in flagged[0]
    assert bench.check_variance({"a": [1.0, 2.0]}) == []  # exactly 2x passes


def test_step_matmul_flops(bench):
    config = LlamaConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)
    shapes = bench.step_matmuls(config, "lora", tokens=40, seq_len=20)
    linear = 2 * 40 * (8 * 8 + 2 * 8 * 4 + 8 * 8 + 3 * 8 * 16)  # one layer's forward: q, k, v, o, gate, up, down
    head = 2 * 40 * 8 * 100
    attention = 2 * 2 * 20 * 4 * 10 * 2 * 2  # QK^T and PV, causal half, 2 heads x 2 sequences
    # LoRA: forward + input gradient (x2); attention forward + backward (x3)
    assert bench.matmul_flops(shapes) == 2 * (2 * linear + head) + 3 * 2 * attention
    full = bench.step_matmuls(config, "full", tokens=40, seq_len=20)
    assert bench.matmul_flops(full) == 3 * (2 * linear + head) + 3 * 2 * attention


def test_variants_switch_the_models_flags(bench):
    from finetune_ref.recipes.lora import LoraRecipe

    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    default = LoraRecipe().selective_recompute
    bench.configure(model, bench.VARIANTS[bench.RECOMPUTE_ROW])
    assert model.chunked_loss and model.model.selective_recompute is not default
    bench.configure(model, bench.VARIANTS["ours --no-chunked-loss"])
    assert not model.chunked_loss and model.model.selective_recompute is default
    bench.configure(model, {})
    assert model.chunked_loss and model.model.selective_recompute is default  # the recipes' defaults


def test_recompute_cost_is_the_median_of_paired_ratios(bench):
    with_it, without = [1.1, 2.2, 1.05, 3.3], [1.0, 2.0, 1.0, 3.0]  # the load changed between rounds, not within
    rows = {"ours": with_it, bench.RECOMPUTE_ROW: without} if bench.DEFAULTS["selective_recompute"] else \
        {"ours": without, bench.RECOMPUTE_ROW: with_it}
    assert bench.recompute_cost(rows) == pytest.approx(0.1)


def test_chunked_loss_lowers_the_peak():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=16)
    model = LlamaForCausalLM(config).train()
    ids = torch.randint(0, 4096, (2, 600))
    peaks = {}
    for chunked in (False, True):
        model.chunked_loss = chunked
        with TensorMemoryTracker() as tracker:
            tracker.track(model, ids)
            model(input_ids=ids, labels=ids).loss.backward()
        peaks[chunked] = tracker.peak
        model.zero_grad(set_to_none=True)
    # 1198 x 4096 fp32 logits: ~20 MB per copy, and the loss chain keeps 4 of them at once; chunks of 256
    # tokens keep ~8 MB.
    assert peaks[True] < 0.5 * peaks[False]


def test_timed_step_counts_the_page_faults_of_fresh_memory(bench):
    import mmap

    size = 8 * 2 ** 20

    def touch_fresh_pages():  # an anonymous mapping of its own: its pages are new to the process (malloc's
        with mmap.mmap(-1, size) as m:  # heap could hand back memory it already holds, without faults)
            if hasattr(mmap, "MADV_NOHUGEPAGE"):
                m.madvise(mmap.MADV_NOHUGEPAGE)  # 4 KiB pages even where transparent huge pages are "always"
            for offset in range(0, size, 4096):
                m[offset] = 1

    wall, faults, system = bench.timed_step(touch_fresh_pages)
    assert wall > 0 and system >= 0 and faults >= size // 4096 // 2  # at least half its 4 KiB pages


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_freed_memory_stops_the_page_faults_of_large_temporaries():
    # In a fresh interpreter (mallopt changes the whole process): a 64 MiB temporary is above glibc's largest mmap
    # threshold (32 MiB), so by default each one is a fresh mapping whose pages fault in again (16,384 4 KiB pages,
    # or 32 huge ones); kept, the second one reuses the heap pages of the first.
    import subprocess
    import sys

    script = f"""
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("bench_training", {str(BENCH)!r})
bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench)
if sys.argv[1] == "kept":
    bench.keep_freed_memory()
def temporary():
    torch.ones(16 * 2 ** 20)  # 64 MiB fp32, written whole, then freed
temporary()
print(min(bench.timed_step(temporary)[1] for _ in range(3)))
"""
    faults = {mode: int(subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True,
                                       check=True).stdout.split()[-1]) for mode in ("default", "kept")}
    assert faults["default"] >= 16 and faults["kept"] < 8, faults


def test_qlora_vs_lora_line_uses_the_rows_taken_in_turns(bench):
    import argparse

    def row(step_s):
        median = sorted(step_s)[len(step_s) // 2]
        return {"tokens_per_s": 1024 / median, "median_step_s": median, "step_s": step_s,
                "peak_bytes": 1e8, "linear_fraction": 0.5, "page_faults": [10, 11, 12], "system_s": [0.01, 0.02, 0.03]}

    # The load changed from round to round: the medians pair our QLoRA's 2.2 s with the LoRA's 1.7 s from another
    # round (0.77x); within rounds QLoRA took 1.1x, 1.29x and 1.06x the LoRA's time (paired median 0.91x).
    result = {"method": "qlora", "rows": {"ours": row([2.64, 2.2, 1.8]), bench.LORA_REFERENCE_ROW: row([2.4, 1.7, 1.7]),
                                          "transformers": row([3.3, 2.75, 2.25])},
              "noisy": [], "first_loss": {}, "predicted_peak": {}, "linear_flops_per_s": 1e12, "step_flops": 1e11,
              "trainable": 1, "trainable_hf": 1}
    env = {"date": "d", "cpu": "c", "cores": 2, "threads": 2, "python": "3", "load_before": 0.0, "load_after": 0.0,
           "versions": {k: "v" for k in ("torch", "transformers", "peft", "bitsandbytes")}}
    args = argparse.Namespace(quick=False, batch_size=4, seq_len=256, dtype="bf16", warmup=1, steps=2,
                              memory_only=False, recompute_cost=False)
    text = bench.render(env, [result], args)
    assert "our QLoRA's speed vs our LoRA's: 0.91x" in text and "taken in turns" in text
    assert "tokens/s 0.77x as the ratio of the two medians" in text
    ours_line = next(line for line in text.splitlines() if line.startswith("| qlora | ours |"))
    assert "| 1.25x |" in ours_line  # transformers' step / ours: 1.25 in every round
    reference_line = next(line for line in text.splitlines() if bench.LORA_REFERENCE_ROW in line and "|" in line)
    assert "| 11 |" in reference_line and "| - | - |" in reference_line  # faults median; no ratio to transformers


def test_results_file_keeps_earlier_sections(bench, tmp_path):
    # A run adds its section at the top; the hand-kept history below it is never lost.
    path = tmp_path / "RESULTS_TRAINING.md"
    bench.write_results("first table", path, "2026-01-01 10:00 UTC", "bf16")
    bench.write_results("second table", path, "2026-01-02 10:00 UTC", "fp32")
    text = path.read_text()
    assert text.startswith(bench.RESULTS_HEADER)
    assert text.index("## Run of 2026-01-02 10:00 UTC (fp32)") < text.index("second table") \
        < text.index("## Run of 2026-01-01 10:00 UTC (bf16)") < text.index("first table")
    assert not (tmp_path / "RESULTS_TRAINING.md.tmp").exists()


def test_paired_ratio_refuses_rows_of_different_lengths(bench):
    assert bench.paired_ratio([2.0, 4.0, 3.0], [1.0, 2.0, 2.0]) == 2.0
    with pytest.raises(ValueError):
        bench.paired_ratio([1.0, 2.0, 3.0], [1.0])


@pytest.mark.parametrize("argv, message", [
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--from-json", "/nonexistent/run.json"], "--from-json /nonexistent/run.json: cannot read a saved run"),
    (["--from-json", "x.json", "--keep-freed-memory"], "--keep-freed-memory is a setting of a measurement"),
    (["--from-json", "{empty}"], "not a run saved by --json (KeyError"),
    (["--methods", "lora,lora"], "each once, got 'lora,lora'"),
    (["--json", "/nonexistent/run.json"], "--json /nonexistent/run.json: its folder does not exist"),
    (["--batch-size", "4096", "--seq-len", "4096", "--no-write"], "lower --batch-size/--seq-len"),  # the real text
])
def test_bad_arguments_are_one_line(bench, capsys, tmp_path, argv, message):
    empty = tmp_path / "empty.json"
    empty.write_text("{}")  # valid JSON, not a saved run
    argv = [a.format(empty=empty) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_allocator_settings_name_the_flag_and_the_environment(bench, monkeypatch):
    for key in bench.MALLOC_ENV:
        monkeypatch.delenv(key, raising=False)
    assert bench.allocator_settings(False) == ""
    assert "glibc's defaults" in bench.allocator_note("")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")
    assert bench.allocator_settings(False) == "LD_PRELOAD=/usr/lib/libjemalloc.so.2"
    kept = bench.allocator_settings(True)
    assert kept.startswith(bench.KEPT_FREED_MEMORY) and kept.endswith("LD_PRELOAD=/usr/lib/libjemalloc.so.2")
    assert "compare the computation" in bench.allocator_note(kept)
    assert bench.allocator_note(None) == ""  # a JSON from before the settings were recorded


def test_memory_only_table_has_no_nan(bench):
    import argparse

    row = {"tokens_per_s": float("nan"), "median_step_s": float("nan"), "step_s": [], "peak_bytes": 1e8,
           "linear_fraction": float("nan"), "page_faults": [], "system_s": []}
    result = {"method": "lora", "rows": {"ours": dict(row), "transformers": dict(row, peak_bytes=2e8)}, "noisy": [],
              "first_loss": {"ours": 2.5, "transformers": 2.5}, "predicted_peak": {},
              "linear_flops_per_s": float("nan"), "step_flops": 1e11, "trainable": 1, "trainable_hf": 1}
    env = {"date": "d", "cpu": "c", "cores": 2, "threads": 2, "python": "3", "load_before": 0.0, "load_after": 0.0,
           "versions": {k: "v" for k in ("torch", "transformers", "peft", "bitsandbytes")}, "allocator": ""}
    args = argparse.Namespace(quick=False, batch_size=4, seq_len=256, dtype="bf16", warmup=1, steps=3,
                              memory_only=True, recompute_cost=False)
    text = bench.render(env, [result], args)
    assert "nan" not in text and "timed steps each" not in text and "| 0.50x |" in text
