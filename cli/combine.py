"""``finetune combine``: a weighted combination of trained adapters saved as a new PEFT adapter.

    finetune combine --adapter A --adapter B --weights 0.7,0.3 --method linear|cat|svd [--svd-rank K] --out DIR
    finetune combine ... --method ties|dare_linear|dare_ties|magnitude_prune[_svd] --density D
                     [--majority-sign-method total|frequency] [--seed S]

The adapters are loaded on the base they were trained on (``--model``; a QLoRA adapter's NF4 base is rebuilt
from its ``qlora_config.json``, which is copied to the result) and combined by ``lora.combine.add_weighted_adapter``
(PEFT's ``add_weighted_adapter``: see lora/combine.py for what each method computes). The result is a plain
LoRA adapter (lora_alpha = r) that eval, generate and merge take like any other.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from finetune_ref.cli.common import add_model_args, add_out_args, density, rank, resolve_model_dir, seed, writing_to
from finetune_ref.lora.combine import COMBINATIONS, PRUNING, SIGN_METHODS

COMBINED = "combined"


def weights(text: str) -> list[float]:
    """'0.7,0.3' -> [0.7, 0.3] (argparse type of --weights and --adapter-scale; argparse names the flag)."""
    import argparse
    import math

    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"takes comma-separated finite numbers like 0.7,0.3, got {text!r}")
    return values


def cmd_combine(args) -> int:
    if len(args.weights) != len(args.adapter):
        raise ValueError(f"--weights has {len(args.weights)} numbers for {len(args.adapter)} --adapter directories; "
                         "give one weight per adapter")
    method = args.method.removesuffix("_svd")
    if args.svd_rank is not None and not args.method.endswith("svd"):
        raise ValueError(f"--svd-rank sets the rank of --method svd (or ties_svd, ...), not --method {args.method}")
    if method in PRUNING and args.density is None:
        raise ValueError(f"--method {args.method} needs --density D, the fraction of entries kept (0 < D <= 1)")
    if method not in PRUNING and args.density is not None:
        raise ValueError(f"--density applies to --method {'|'.join(PRUNING)} (and their _svd forms), not "
                         f"--method {args.method}")
    if args.majority_sign_method is not None and method not in ("ties", "dare_ties"):
        raise ValueError(f"--majority-sign-method applies to --method ties|dare_ties (and their _svd forms), not "
                         f"--method {args.method}")
    if args.seed is not None and not method.startswith("dare"):
        raise ValueError(f"--seed seeds DARE's random masks (--method dare_linear|dare_ties), not --method "
                         f"{args.method}")
    model_dir = resolve_model_dir(args.model, args.cache_dir)
    with writing_to(args.out, model_dir, *args.adapter, overwrite=args.overwrite) as out:
        return _combine(args, model_dir, out)


def _combine(args, model_dir: Path, out: Path) -> int:
    from finetune_ref.lora import save_adapter
    from finetune_ref.lora.combine import add_weighted_adapter
    from finetune_ref.qlora.adapter_record import QLORA_CONFIG_FILE, read_qlora_record
    from finetune_ref.recipes.inference import load_inference_model

    record = read_qlora_record(args.adapter)
    model = load_inference_model(model_dir, args.dtype, args.adapter)
    names = [f"adapter_{i}" for i in range(len(args.adapter))] if len(args.adapter) > 1 else ["default"]
    generator = torch.Generator().manual_seed(args.seed or 0)  # DARE's masks: the same seed, the same adapter
    add_weighted_adapter(model, names, args.weights, COMBINED, combination_type=args.method, svd_rank=args.svd_rank,
                         density=args.density, majority_sign_method=args.majority_sign_method or "total",
                         generator=generator)
    save_adapter(model, out, adapter_name=COMBINED, base_model_name_or_path=str(model_dir))
    if record is not None:  # the same NF4 base as the inputs
        shutil.copyfile(Path(args.adapter[0]) / QLORA_CONFIG_FILE, out / QLORA_CONFIG_FILE)
    extra = "" if args.density is None else f", density {args.density}"
    print(f"combined {len(args.adapter)} adapter(s) ({args.method}{extra}, weights {args.weights}) into {out}")
    return 0


def add_combine_parser(sub) -> None:
    """Register ``combine`` on the ``finetune`` subcommands."""
    p = sub.add_parser("combine", help="combine trained adapters with weights into a new adapter (linear, cat, svd, "
                                       "ties, dare, magnitude_prune)")
    add_model_args(p, dtype_help="dtype to load the base in (default fp32)")
    p.add_argument("--adapter", action="append", required=True, help="adapter directory (repeatable)")
    p.add_argument("--weights", type=weights, required=True, help="one weight per --adapter, e.g. 0.7,0.3")
    p.add_argument("--method", choices=COMBINATIONS, default="svd", metavar="METHOD",
                   help="linear (same ranks; A and B mixed separately), cat (exact, rank = sum of ranks), svd "
                        "(the weighted sum of updates truncated to --svd-rank); ties (TIES-Merging: trim to "
                        "--density, elect signs, disjoint mean), dare_linear / dare_ties (DARE: random drop to "
                        "--density and rescale, then sum / TIES), magnitude_prune (trim, then sum), each on A and B "
                        "like linear, or with an _svd suffix on the updates like svd (default svd, as PEFT)")
    p.add_argument("--svd-rank", type=rank, default=None,
                   help="rank of --method svd and the _svd forms (default: the largest input rank)")
    p.add_argument("--density", type=density, default=None,
                   help="fraction of entries kept by ties, dare_*, magnitude_prune (required for them; no "
                        "default)")
    p.add_argument("--majority-sign-method", choices=SIGN_METHODS, default=None,
                   help="TIES' sign election for ties / dare_ties: total (sign of the sum) or frequency (sign of "
                        "the count) (default total)")
    p.add_argument("--seed", type=seed, default=None, help="seed of DARE's random masks (default 0)")
    add_out_args(p, "output directory for the combined adapter", required=True)
    p.set_defaults(func=cmd_combine)
