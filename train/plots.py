"""Plots of training runs read back from their ``metrics.jsonl`` (``bookkeeping.MetricsLog``): training and
held-out loss, learning rate and tokens/s against optimizer updates, several runs overlaid with their names.
``finetune plot RUN_DIR ... --out plot.png`` and ``finetune train --plot`` (``loss.png`` beside the result) draw it.

matplotlib is an optional extra (``pip install 'finetune-ref[plot]'``), imported only when a plot is drawn.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from .bookkeeping import METRICS_FILE
from .readers import json_lines

MISSING_MATPLOTLIB = "plotting needs matplotlib: pip install 'finetune-ref[plot]'"


@dataclasses.dataclass
class RunCurves:
    """One run's series, each a list of (update, value) in update order."""

    name: str
    train_loss: list[tuple[int, float]]
    heldout_loss: list[tuple[int, float]]
    lr: list[tuple[int, float]]
    tokens_per_s: list[tuple[int, float]]


def read_curves(run_dir: str | Path, name: str | None = None) -> RunCurves:
    """The series of a run directory's ``metrics.jsonl``. An update logged twice (a run resumed from an earlier
    checkpoint) keeps its last record.

    Raises:
        FileNotFoundError: the directory has no metrics.jsonl.
        ValueError: a line that is not JSON (naming the file and line; ``readers.json_lines``).
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {METRICS_FILE} (not the --out directory of a finetune train run)")
    train: dict[int, dict] = {}
    heldout: dict[int, float] = {}
    for _, record in json_lines(path):
        if record.get("type") == "train":
            train[record["update"]] = record
        elif record.get("type") == "eval":
            heldout[record["update"]] = record["loss"]

    def series(key: str) -> list[tuple[int, float]]:
        return [(u, r[key]) for u, r in sorted(train.items()) if r.get(key) is not None]

    return RunCurves(name or Path(run_dir).resolve().name, series("loss"), sorted(heldout.items()), series("lr"),
                     series("tokens_per_s"))


def check_matplotlib() -> None:
    """Raises ValueError (naming the extra to install) when matplotlib is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError(MISSING_MATPLOTLIB)


def plot_runs(runs: list[RunCurves], path: str | Path) -> Path:
    """Four panels against optimizer updates (training loss, held-out loss, learning rate, tokens/s), one colour
    per run, written as a PNG to ``path``.

    Raises:
        ValueError: no runs, or matplotlib is missing.
    """
    if not runs:
        raise ValueError("nothing to plot: no runs given")
    check_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    panels = [("training loss", "loss (nats/token)", "train_loss"),
              ("held-out loss", "loss (nats/token)", "heldout_loss"),
              ("learning rate", "lr", "lr"),
              ("throughput (average since the start)", "tokens/s", "tokens_per_s")]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    for i, run in enumerate(runs):
        colour = f"C{i % 10}"
        for ax, (_, _, key) in zip(axes.flat, panels):
            points = getattr(run, key)
            if points:
                xs, ys = zip(*points)
                # Held-out losses are few points (every --eval-every updates): markers make them visible.
                ax.plot(xs, ys, color=colour, label=run.name, marker="o" if key == "heldout_loss" else None,
                        markersize=4)
    for ax, (title, ylabel, _) in zip(axes.flat, panels):
        ax.set(title=title, ylabel=ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    for ax in axes[1]:
        ax.set_xlabel("optimizer update")
    axes[1][0].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    fig.suptitle(", ".join(run.name for run in runs))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)  # atomic: a reader never sees half a file
    return path
