"""The report of ``finetune compare`` (cli/compare.py): the Markdown table, the loss-curve plot, and the
machine it ran on."""

from __future__ import annotations

import os
from pathlib import Path

import torch

MB = 1e6  # the table's unit: 1e6 bytes


def environment() -> dict:
    import platform

    cpu = platform.processor() or platform.machine()
    try:  # Linux names the CPU model here; platform.processor() is often empty
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "torch": torch.__version__, "python": platform.python_version()}


def _mb(n: float) -> str:
    return f"{n / MB:,.1f}"


def _loss(before: dict, after: dict, key: str) -> str:
    if key not in before:
        return "n/a: `pip install -e '.[compare]'` or `--regression-data`"
    b, a = before[key], after[key]
    return f"{b['loss']:.4f} → {a['loss']:.4f} ({a['loss'] - b['loss']:+.4f}; ppl {b['perplexity']:.2f} → " \
           f"{a['perplexity']:.2f})"


def format_table(report: dict) -> str:
    """The Markdown table (one row per method) with a line of settings above it."""
    s, env, rows = report["settings"], report["environment"], report["results"]
    r0 = rows[0]
    lines = [f"Settings: {s['model_dir'] or 'SmolLM2-135M-Instruct (embedded)'}, precision {s['precision']}; "
             f"{s['steps']} updates x {s['batch_size']} x {s['seq_len']} tokens = {r0['tokens']:,} training tokens "
             f"per method, warmup {s['warmup']} then cosine to 10%, seed {s['seed']}; LoRA r={s['rank']} "
             f"alpha={s['alpha']:g} all-linear, fp32 adapters; held-out: {r0['before']['heldout']['tokens']:,} "
             f"tokens of pydoc topics; regression: {r0['regression_corpus'] or 'none'}"
             + (f" ({r0['before']['regression']['tokens']:,} tokens)" if 'regression' in r0['before'] else "")
             + f". {env['nproc']} CPU cores ({env['cpu']}), {s['threads']} torch thread(s), load average "
             f"{env['load_average_start']:.1f} at start / {env['load_average_end']:.1f} at end, torch {env['torch']}. "
             "MB = 1e6 bytes.",
             "",
             "| method | lr | trainable params | saved result | peak (measured) | at peak: weights / grads / "
             "optimizer / activations+rest | peak (estimated) | max RSS | tokens/s | train / total s | "
             "held-out loss before → after | regression loss before → after |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["memory"]
        lines.append(
            f"| {r['method']} | {r['lr']:g} | {r['trainable_params']:,} ({r['trainable_pct']:.3g}%) | "
            f"{_mb(r['saved_bytes'])} MB | {_mb(m['peak'])} MB ({m['peak_phase']}) | {_mb(m['weights'])} / "
            f"{_mb(m['gradients'])} / {_mb(m['optimizer_states'])} / {_mb(m['activations'])} | "
            f"{_mb(r['estimated_peak'])} MB ({100 * (r['estimated_peak'] / m['peak'] - 1):+.1f}%) | "
            f"{_mb(r['max_rss'])} MB | {r['tokens_per_s']:.0f} | {r['train_s']:.0f} / {r['wall_s']:.0f} | "
            f"{_loss(r['before'], r['after'], 'heldout')} | {_loss(r['before'], r['after'], 'regression')} |")
    lines += ["", "Gradients of all trainable parameters at the end of backward: " + ", ".join(
        f"{r['method']} {_mb(r['memory']['gradients_all'])} MB" for r in rows) + ". A peak reached early in "
        "backward (the loss chain) comes before most of them exist."]
    return "\n".join(lines)


def plot_curves(results: list[dict], path: Path) -> str | None:
    """Training and held-out loss per update for each method, as a PNG; None (with a message) without
    matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is not installed (pip install matplotlib, or pip install -e '.[compare]')")
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        for ax, key in zip(axes, ("train", "heldout")):
            xs, ys = zip(*r["curve"][key]) if r["curve"][key] else ((), ())
            ax.plot(xs, ys, marker="o" if key == "heldout" else None, label=f"{r['method']} (lr {r['lr']:g})")
    for ax, title in zip(axes, ("training loss (per update)", "held-out loss")):
        ax.set(title=title, xlabel="optimizer update", ylabel="loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
