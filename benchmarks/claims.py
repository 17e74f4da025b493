"""The field's quantitative claims about full fine-tuning, LoRA and QLoRA, measured with this project's code on the
embedded model (SmolLM2-135M-Instruct) and data (Python's reference docs): writes docs/claims.md and its plots.

Studies (``--only`` picks some; each is listed in docs/claims.md with its claim and source):

    memory      bytes/parameter of full fine-tuning, LoRA's trainable share, NF4 vs bf16, double quantization
    lr          LoRA at 1e-5, 2e-5, 1e-4, 2e-4, 3e-4
    rank        r = 4, 8, 16, 32, 64 (alpha = 2r), same budget
    adapters    alpha = r against 2r; all-linear r=8 against q_proj,v_proj at equal trainable parameters
    dropout     LoRA dropout 0.1 against 0 on a small dataset, several epochs
    quality     full fine-tuning, LoRA and QLoRA, with the forgetting score of ``finetune compare``
    merge       merged = unmerged (fp32); a QLoRA adapter merged and re-quantized (NF4, RTN, GPTQ)
    throughput  LoRA and QLoRA training steps taking turns on this machine

Budgets (``claims_runs.QUICK``, ``claims_runs.FULL``): ``--quick``, 8 updates of 2 x 64 tokens per run and 2 seeds
(minutes on a quiet 2-core machine); the default full mode, 32 updates of 4 x 256 tokens and 3 seeds (about an
hour on a quiet 2-core machine, from the ~2 s per update of 4 x 256 tokens measured there). Results
go to ``benchmarks/results/claims_{quick,full}.json`` after every run (a rerun skips runs already there), and
the page to ``docs/claims.md`` with PNGs in ``docs/claims/``.

Usage: ``python benchmarks/claims.py [--quick] [--only memory,lr,...] [--threads N]``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import claims_report  # noqa: E402
import claims_runs as runs  # noqa: E402

STUDIES = ("memory", "lr", "rank", "adapters", "dropout", "quality", "merge", "throughput")
LEARNING_RATES = (1e-5, 2e-5, 1e-4, 2e-4, 3e-4)
RANKS = (4, 8, 16, 32, 64)
# q_proj,v_proj at the rank whose trainable count equals all-linear r=8 on this model: r * (576 + 576) +
# r * (576 + 192) per layer against 8 * 10,176, so r = 42.4 -> 42 (the counts are printed in the table).
QV_RANK = 42


def specs_of(study: str, seeds: tuple[int, ...]) -> list[runs.RunSpec]:
    """The training runs a study needs (the baseline, LoRA r=8 alpha=16 lr 2e-4 all-linear, is shared)."""
    S = runs.RunSpec
    if study == "lr":
        return [S(lr=lr, seed=s) for lr in LEARNING_RATES for s in seeds]
    if study == "rank":
        return [S(rank=r, alpha=2 * r, seed=s) for r in RANKS for s in seeds]
    if study == "adapters":
        return [x for s in seeds for x in (S(seed=s), S(alpha=8, seed=s),
                                           S(rank=QV_RANK, alpha=2 * QV_RANK, targets="q_proj,v_proj", seed=s))]
    if study == "dropout":
        return [S(small=True, dropout=d, seed=s) for d in (0.0, 0.1) for s in seeds]
    if study == "quality":
        return [x for s in seeds for x in (S(seed=s), S(method="full", lr=2e-5, seed=s), S(method="qlora", seed=s))]
    return []


def run_key(spec: runs.RunSpec) -> str:
    return json.dumps(dataclasses.asdict(spec), sort_keys=True)


def load_average() -> float:
    return os.getloadavg()[0]


def save(results: dict, path: Path) -> None:
    """Write atomically: a reader never sees half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the small budget (minutes)")
    parser.add_argument("--only", default=",".join(STUDIES), help=f"comma-separated subset of {','.join(STUDIES)}")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="device of the throughput study (default cpu)")
    parser.add_argument("--results", type=Path, help="results JSON (default benchmarks/results/claims_MODE.json)")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs", help="where claims.md and claims/ go")
    parser.add_argument("--no-report", action="store_true", help="measure only; do not write the page")
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    if not only or any(s not in STUDIES for s in only):
        parser.error(f"--only: expected a comma-separated subset of {','.join(STUDIES)}, got {args.only!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    mode = "quick" if args.quick else "full"
    budget = runs.QUICK if args.quick else runs.FULL
    path = args.results or ROOT / "benchmarks" / "results" / f"claims_{mode}.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    if results.get("budget") != dataclasses.asdict(budget):  # another budget: start again
        results = {"mode": mode, "budget": dataclasses.asdict(budget), "runs": {}, "studies": {}}
    results["environment"] = {"machine": platform.machine(), "processor": platform.processor() or "unknown",
                              "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                              "python": platform.python_version()}
    say = lambda text: print(text, flush=True)  # noqa: E731
    data = runs.load_data(budget)
    results["data"] = {"train_examples": len(data.train), "heldout_tokens": sum(
        int((x["labels"][:, 1:] != -100).sum()) for x in data.heldout), "regression_corpus": data.regression_name,
        "regression_tokens": sum(int((x["labels"][:, 1:] != -100).sum()) for x in data.regression)}
    kept = {}  # the seed-0 QLoRA model, for the merge study
    for study in only:
        start, load_start = time.perf_counter(), load_average()
        say(f"{study} (load average {load_start:.1f})")
        for spec in specs_of(study, budget.seeds):
            key = run_key(spec)
            keep = spec.method == "qlora" and spec.seed == 0 and "merge" in only
            if key in results["runs"] and not keep:
                continue
            out = runs.train_run(spec, data, budget, keep=keep, say=say)
            if keep:
                kept["qlora"] = out.pop("model")
            results["runs"][key] = out
            save(results, path)
        if study == "memory":
            results["memory"] = {"full": runs.full_finetuning_bytes(data), "lora_share": runs.lora_parameter_share(data),
                                 "nf4": runs.nf4_sizes(data)}
        elif study == "merge":
            if "qlora" not in kept:
                kept["qlora"] = runs.train_run(runs.RunSpec(method="qlora"), data, budget, keep=True, say=say)["model"]
            results["merge"] = {"lora": runs.lora_merge_exactness(data),
                                "qlora": runs.qlora_merges(kept["qlora"], data, budget)}
        elif study == "throughput":
            results["throughput"] = {**runs.step_throughput(data, budget, args.device), "device": args.device}
        results["studies"][study] = {"seconds": time.perf_counter() - start, "load_start": load_start,
                                     "load_end": load_average(), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                      time.gmtime())}
        save(results, path)
        say(f"{study}: {time.perf_counter() - start:.0f} s (load average {load_start:.1f} -> {load_average():.1f})")
    if not args.no_report:
        page = claims_report.write(results, args.docs)
        say(f"wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
