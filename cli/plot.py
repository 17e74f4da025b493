"""``finetune plot RUN_DIR [RUN_DIR ...] --out plot.png``: the curves of training runs read from their
``metrics.jsonl``, overlaid (``train/plots.py`` draws them)."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_plot(args) -> int:
    from finetune_ref.train.plots import check_matplotlib, plot_runs, read_curves

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"--out {out} exists; pass --overwrite to replace it, or choose another file")
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out {out}: the plot is a PNG file; give a name ending in .png")
    check_matplotlib()
    names = [Path(d).resolve().name for d in args.runs]
    # Runs with the same directory name (runs/a/lora, runs/b/lora) are told apart by their path as given.
    runs = [read_curves(d, name=d if names.count(n) > 1 else n) for d, n in zip(args.runs, names)]
    print(f"plotted {len(runs)} run(s) into {plot_runs(runs, out)}")
    return 0


def add_plot_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("plot", help="plot the loss, learning rate and tokens/s of training runs (metrics.jsonl)")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="the --out directory of a finetune train run")
    p.add_argument("--out", required=True, metavar="FILE.png", help="the PNG file to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_plot)
    return p
