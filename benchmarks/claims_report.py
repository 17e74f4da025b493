"""docs/claims.md and its plots from the results of ``benchmarks/claims.py`` (a JSON file): the claim, its source,
what was measured, and whether it held. A study that was not run reads "not measured here"."""

from __future__ import annotations

import statistics
from pathlib import Path

from finetune_ref.cli.common import show_number

NOT_MEASURED = "not measured here"
# A difference between two settings counts only when it exceeds the seed-to-seed spread: the larger of the two
# settings' ranges (max - min over seeds) of the final held-out loss.
GAP_FEW_PERCENT = 5.0  # "within a few percent": at most this many percent of the held-out loss


def _runs(results: dict, **spec) -> list[dict]:
    base = {"method": "lora", "lr": 2e-4, "rank": 8, "alpha": 16.0, "targets": "all-linear", "dropout": 0.0,
            "small": False}
    want = {**base, **spec}
    return sorted((r for r in results.get("runs", {}).values()
                   if all(r["spec"][k] == v for k, v in want.items())), key=lambda r: r["spec"]["seed"])


def _final(rs: list[dict]) -> list[float]:
    return [r["after"] for r in rs]


def _mean(xs):
    return statistics.mean(xs) if xs else float("nan")


def _spread(xs):
    return max(xs) - min(xs) if len(xs) > 1 else 0.0


def _cmp(a: list[float], b: list[float]) -> tuple[float, float, str]:
    """(mean(a) - mean(b), noise, words) for two settings' final losses over the same seeds."""
    diff, noise = _mean(a) - _mean(b), max(_spread(a), _spread(b))
    if len(a) < 2 or len(b) < 2:
        return diff, noise, "one seed: noise unknown"
    return diff, noise, "within noise" if abs(diff) <= noise else "larger than the seed spread"


def _fmt(xs: list[float]) -> str:
    if not xs:
        return NOT_MEASURED
    return f"{_mean(xs):.4f}" + (f" [{min(xs):.4f}..{max(xs):.4f}]" if len(xs) > 1 else "")


# ---------------------------------------------------------------------------------------------------------
# Plots.
# ---------------------------------------------------------------------------------------------------------
def _plots(results: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    made = []
    lr_runs = {lr: _runs(results, lr=lr) for lr in (1e-5, 2e-5, 1e-4, 2e-4, 3e-4)}
    if any(lr_runs.values()):
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        for lr, rs in lr_runs.items():
            if rs:
                c = rs[0]["curve"]
                a.plot([p[0] for p in c], [p[1] for p in c], marker="o", label=f"lr {show_number(lr)}")
                b.scatter([lr] * len(rs), _final(rs), color="tab:blue")
        b.plot([lr for lr, rs in lr_runs.items() if rs], [_mean(_final(rs)) for rs in lr_runs.values() if rs],
               color="tab:blue")
        a.set(xlabel="update", ylabel="held-out loss (nats/token)", title="LoRA r=8, seed 0")
        b.set(xscale="log", xlabel="peak learning rate", ylabel="held-out loss after", title="each seed and the mean")
        a.legend()
        fig.tight_layout()
        fig.savefig(out / "lr.png", dpi=110)
        plt.close(fig)
        made.append("lr.png")
    panels = [("rank (alpha = 2r)", [(f"r={r}", _runs(results, rank=r, alpha=2.0 * r)) for r in (4, 8, 16, 32, 64)]),
              ("alpha (r = 8)", [("alpha=r=8", _runs(results, alpha=8.0)), ("alpha=2r=16", _runs(results))]),
              ("targets, equal trainable params", [("all-linear r=8", _runs(results)),
                                                   ("q,v r=42", _runs(results, rank=42, alpha=84.0,
                                                                      targets="q_proj,v_proj"))]),
              ("dropout, small dataset", [("0", _runs(results, small=True)),
                                          ("0.1", _runs(results, small=True, dropout=0.1))])]
    panels = [(t, [(n, rs) for n, rs in items if rs]) for t, items in panels]
    panels = [(t, items) for t, items in panels if len(items) > 1]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.8), squeeze=False)
        for ax, (title, items) in zip(axes[0], panels):
            for i, (name, rs) in enumerate(items):
                ax.scatter([i] * len(rs), _final(rs), color="tab:blue", zorder=3)
                ax.hlines(_mean(_final(rs)), i - 0.25, i + 0.25, color="black")
            ax.set_xticks(range(len(items)), [n for n, _ in items], rotation=20)
            ax.set(title=title, ylabel="held-out loss after (dots: seeds, bar: mean)")
            ax.margins(x=0.2)
        fig.tight_layout()
        fig.savefig(out / "adapters.png", dpi=110)
        plt.close(fig)
        made.append("adapters.png")
    methods = {"full (lr 2e-5)": _runs(results, method="full", lr=2e-5, rank=8),
               "LoRA (lr 2e-4)": _runs(results), "QLoRA (lr 2e-4)": _runs(results, method="qlora")}
    if _runs(results, method="full", lr=2e-5) and _runs(results, method="qlora"):
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        for i, (name, rs) in enumerate(methods.items()):
            c = rs[0]["curve"]
            a.plot([p[0] for p in c], [p[1] for p in c], marker="o", label=name)
            if rs[0]["regression_after"] is not None:
                b.bar([i - 0.2, i + 0.2], [_mean([r["regression_before"] for r in rs]),
                                           _mean([r["regression_after"] for r in rs])],
                      width=0.4, color=["lightgray", "tab:orange"])
        a.set(xlabel="update", ylabel="held-out loss (nats/token)", title="task: held-out pydoc topics, seed 0")
        a.legend()
        b.set_xticks(range(3), list(methods))
        b.set(ylabel="loss on general English (before: gray, after: orange)", title="forgetting score")
        lo = min(min(r["regression_before"], r["regression_after"]) for rs in methods.values() for r in rs
                 if r["regression_after"] is not None)
        b.set_ylim(lo - 0.1, None)
        fig.tight_layout()
        fig.savefig(out / "methods.png", dpi=110)
        plt.close(fig)
        made.append("methods.png")
    mem = results.get("memory")
    if mem:
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        full = mem["full"]
        parts = [(k, v) for k, v in full.items() if k not in ("parameters", "total")]
        bottom = 0.0
        for k, v in parts:
            a.bar(0, v, bottom=bottom, width=0.5, label=f"{k}: {v:.2f}")
            bottom += v
        a.set_xticks([0], ["full fine-tuning, bf16 + AdamW"])
        a.set_xlim(-0.5, 1.5)
        a.set(ylabel="bytes per parameter (measured)", title=f"total {full['total']:.2f} B/param")
        a.legend(fontsize=8)
        nf4 = mem["nf4"]
        bits = {"bf16": 16.0, "NF4": nf4["nf4 bits/param"], "NF4 + DQ": nf4["nf4+dq bits/param"]}
        b.bar(list(bits), list(bits.values()), color=["gray", "tab:blue", "tab:green"])
        for i, v in enumerate(bits.values()):
            b.text(i, v + 0.2, f"{v:.3f}", ha="center")
        b.set(ylabel="bits per weight of the linear layers (measured)", title="the base's linear layers")
        fig.tight_layout()
        fig.savefig(out / "memory.png", dpi=110)
        plt.close(fig)
        made.append("memory.png")
    return made


# ---------------------------------------------------------------------------------------------------------
# The page.
# ---------------------------------------------------------------------------------------------------------
def write(results: dict, docs: Path) -> Path:
    """Write ``docs/claims.md`` and ``docs/claims/*.png``; returns the page's path."""
    from claims_text import page

    made = _plots(results, docs / "claims")
    path = docs / "claims.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(page(results, made))
    tmp.replace(path)
    return path
