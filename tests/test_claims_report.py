"""benchmarks/claims_report.py and claims_text.py: docs/claims.md from a results file. A study that did not run
reads "not measured here"; a difference within the seed-to-seed spread is called within noise; a figure is
linked only when it was drawn. (The numbers below are made up for the test; the page's are measured.)"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
claims_report = pytest.importorskip("claims_report")


def _run(after, seed, **spec):
    base = {"method": "lora", "lr": 2e-4, "rank": 8, "alpha": 16.0, "targets": "all-linear", "dropout": 0.0,
            "seed": seed, "small": False}
    return {"spec": {**base, **spec}, "steps": 4, "before": 3.0, "after": after, "curve": [[0, 3.0], [4, after]],
            "regression_before": 3.1, "regression_after": 3.1, "tokens_per_s": 1.0, "trainable": 10, "total": 100}


def _results(runs):
    return {"mode": "quick", "budget": {"steps": 4, "batch_size": 2, "seq_len": 8, "warmup": 1, "eval_every": 2,
                                        "eval_tokens": 16, "seeds": [0, 1], "small_examples": 2, "small_epochs": 1,
                                        "calibration": 2, "timing_rounds": 1},
            "environment": {"cpus": 2, "machine": "x86_64", "torch": "t", "threads": 1, "python": "3"},
            "data": {"heldout_tokens": 16, "regression_tokens": 16, "regression_corpus": "c"},
            "studies": {"lr": {"date": "d", "seconds": 1.0, "load_start": 1.0, "load_end": 1.0}},
            "runs": {str(i): r for i, r in enumerate(runs)}}


def test_noise_rule():
    assert claims_report._cmp([2.0, 2.2], [2.1, 2.15])[2] == "within noise"
    assert claims_report._cmp([3.0, 3.01], [2.0, 2.02])[2] == "larger than the seed spread"
    assert claims_report._cmp([3.0], [2.0])[2] == "one seed: noise unknown"


def test_page_says_what_was_not_measured(tmp_path):
    runs = [_run(a, s, lr=lr) for lr, afters in {1e-5: (2.95, 2.96), 2e-5: (2.9, 2.91), 1e-4: (2.6, 2.62),
                                                  2e-4: (2.5, 2.55), 3e-4: (2.5, 2.52)}.items()
            for s, a in enumerate(afters)]
    page = claims_report.write(_results(runs), tmp_path).read_text()
    assert "LoRA at lr 1e-5/2e-5 underfits" in page and "**held**" in page
    # No memory, quality, merge or rank study in these results: each says so, and no made-up figure appears.
    assert page.count("not measured here") >= 5
    assert "full fine-tuning in bf16 with AdamW costs 16 bytes/parameter | ZeRO" in page
    assert (tmp_path / "claims" / "lr.png").is_file() and "claims/lr.png" in page
    assert not (tmp_path / "claims" / "memory.png").exists() and "claims/memory.png" not in page
