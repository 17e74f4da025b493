"""``finetune combine``: a weighted combination of trained adapters saved as a new PEFT adapter.

    finetune combine --adapter A --adapter B --weights 0.7,0.3 --method linear|cat|svd [--svd-rank K] --out DIR

The adapters are loaded on the base they were trained on (``--model``; a QLoRA adapter's NF4 base is rebuilt
from its ``qlora_config.json``, which is copied to the result) and combined by ``lora.combine.add_weighted_adapter``
(PEFT's ``add_weighted_adapter``: see lora/combine.py for what each method computes). The result is a plain
LoRA adapter (lora_alpha = r) that eval, generate and merge take like any other.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from finetune_ref.cli.common import add_model_args, add_out_args, resolve_model_dir, writing_to
from finetune_ref.lora.combine import COMBINATIONS

COMBINED = "combined"


def weights(text: str) -> list[float]:
    """'0.7,0.3' -> [0.7, 0.3] (argparse type)."""
    import argparse

    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--weights takes comma-separated numbers like 0.7,0.3, got {text!r}") \
            from None
    return values


def cmd_combine(args) -> int:
    if len(args.weights) != len(args.adapter):
        raise ValueError(f"--weights has {len(args.weights)} numbers for {len(args.adapter)} --adapter directories; "
                         "give one weight per adapter")
    if args.svd_rank is not None and args.method != "svd":
        raise ValueError("--svd-rank sets the rank of --method svd")
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
    add_weighted_adapter(model, names, args.weights, COMBINED, combination_type=args.method, svd_rank=args.svd_rank)
    save_adapter(model, out, adapter_name=COMBINED, base_model_name_or_path=str(model_dir))
    if record is not None:  # the same NF4 base as the inputs
        shutil.copyfile(Path(args.adapter[0]) / QLORA_CONFIG_FILE, out / QLORA_CONFIG_FILE)
    print(f"combined {len(args.adapter)} adapter(s) ({args.method}, weights {args.weights}) into {out}")
    return 0


def add_combine_parser(sub) -> None:
    """Register ``combine`` on the ``finetune`` subcommands."""
    p = sub.add_parser("combine", help="combine trained adapters with weights into a new adapter (linear, cat, svd)")
    add_model_args(p, dtype_help="dtype to load the base in (default fp32)")
    p.add_argument("--adapter", action="append", required=True, help="adapter directory (repeatable)")
    p.add_argument("--weights", type=weights, required=True, help="one weight per --adapter, e.g. 0.7,0.3")
    p.add_argument("--method", choices=COMBINATIONS, default="svd",
                   help="linear (same ranks; A and B mixed separately), cat (exact, rank = sum of ranks), svd "
                        "(the weighted sum of updates truncated to --svd-rank) (default svd, as PEFT)")
    p.add_argument("--svd-rank", type=int, default=None, help="rank of --method svd (default: the largest input rank)")
    add_out_args(p, "output directory for the combined adapter", required=True)
    p.set_defaults(func=cmd_combine)
