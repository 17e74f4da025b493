"""``finetune advise``: which method (full, LoRA, QLoRA), with which settings, for a model on given GPUs, with the
estimated peak memory of each method and why not the others (``recipes/advice.py``; loads no weights)."""

from __future__ import annotations

import argparse
import json
import re
import sys

from finetune_ref.cli.common import HelpFormatter, positive_int, show_number, tokens_per_sequence
from finetune_ref.recipes import advice
from finetune_ref.recipes.advice import DEFAULT_SEQ_LEN, TARGET_BATCH, TASKS, Advice, advise
from finetune_ref.train.memory_shapes import DEFAULT_PRESET, PRESETS, parameter_count, shape_from

DESCRIPTION = __doc__.split("\n\n")[0]
_UNITS = {"": 10**9, "gb": 10**9, "g": 10**9, "gib": 2**30, "mb": 10**6, "mib": 2**20, "tb": 10**12, "tib": 2**40}
_NAMES = {"full": "full fine-tuning", "lora": "LoRA", "qlora": "QLoRA"}


def memory_size(text: str) -> int:
    """'24GB', '80GB', '24GiB', '40' (GB), '16000MB' -> bytes; GB = 1e9 bytes as the estimator counts."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a size like 24GB, 80GB or 24GiB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def train_command(s: dict, gpus: int) -> str:
    """The ``finetune train`` line for the settings (under torchrun for several GPUs)."""
    head = f"torchrun --standalone --nproc-per-node {gpus} -m finetune_ref train" if gpus > 1 else "finetune train"
    parts = [head, f"--method {s['method']}", "--precision bf16", f"--batch-size {s['micro_batch']}",
             f"--grad-accum {s['grad_accum']}", f"--seq-len {s['seq_len']}", f"--lr {show_number(s['lr'])}",
             f"--optimizer {s['optimizer']}"]
    if "updates" in s:
        parts += [f"--steps {s['updates']}", f"--warmup {s['warmup_steps']}"]
    if s["gradient_checkpointing"]:
        parts.append("--grad-checkpointing")
    if s["parallel"] == "fsdp":
        parts.append("--parallel fsdp")
    if s["method"] != "full":
        parts += [f"--rank {s['rank']}", f"--alpha {s['alpha']}", f"--dropout {s['dropout']}",
                  f"--targets {s['targets']}"]
    return " ".join(parts)


def format_advice(a: Advice, model_name: str, parameters: int, gpu_memory: int, gpus: int) -> str:
    """The advice as text: the choice and its reasons, the settings, each method's peak, why not the others."""
    gpu = f"{gpus} GPUs of {gpu_memory / 1e9:.1f} GB" if gpus > 1 else f"one GPU of {gpu_memory / 1e9:.1f} GB"
    lines = [f"model {model_name}: {parameters / 1e9:.3g}B parameters ({2 * parameters / 1e9:.1f} GB in bf16); {gpu}"]
    if a.recommended is None:
        lines += ["", "recommended: nothing fits"] + [f"  - {r}" for r in a.reasons]
        lines += ["what would fit:"] + [f"  - {w}" for w in a.would_fit]
    else:
        s = a.settings
        lines += ["", f"recommended: {_NAMES[a.recommended]}"] + [f"  - {r}" for r in a.reasons]
        lines += ["", "settings:"]
        batch = (f"micro-batch {s['micro_batch']} x {s['grad_accum']} accumulation steps"
                 + (f" x {gpus} GPUs" if gpus > 1 else "") + f" = {s['effective_batch']} sequences of "
                 f"{s['seq_len']} tokens per update")
        lines.append(f"  batch              {batch}")
        lines.append(f"  memory             gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, "
                     f"optimizer {s['optimizer']}, bf16, {s['parallel']}")
        warm = f"{s['warmup_ratio']:.0%} warmup" + (f" ({s['warmup_steps']} of {s['updates']} updates)"
                                                      if "updates" in s else "")
        lines.append(f"  schedule           lr {show_number(s['lr'])}, {warm}, then cosine")
        if a.recommended != "full":
            lines.append(f"  adapter            r={s['rank']}, alpha={s['alpha']}, dropout {s['dropout']}, "
                         f"{s['targets']} targets" + (", NF4 + double quantization (blocksize 64)"
                                                      if a.recommended == "qlora" else ""))
        lines += ["", "  " + train_command(s, gpus)]
    lines += ["", "estimated peak per GPU (train/memory.py; 'needed' adds 10% fragmentation and 1 GB CUDA context):",
              f"  {'method':18s} {'fits':5s} {'micro-batch':>11s} {'checkpointing':>13s} {'optimizer':>16s} "
              f"{'parallel':>8s} {'peak GB':>8s} {'needed GB':>9s}"]
    for m, p in a.plans.items():
        lines.append(f"  {_NAMES[m]:18s} {'yes' if p.fits else 'no':5s} {p.micro_batch:11d} "
                     f"{'on' if p.gradient_checkpointing else 'off':>13s} {p.optimizer:>16s} {p.parallel:>8s} "
                     f"{p.peak / 1e9:8.1f} {p.needed / 1e9:9.1f}")
    if a.why_not:
        lines += ["", "why not:"] + [f"  {_NAMES[m]}: {w}" for m, w in a.why_not.items()]
    return "\n".join(lines)


def configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``finetune advise`` options to ``p``; ``p.set_defaults(func=cmd_advise)``."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="DIR|config.json",
                     help="a Hugging Face model directory or its config.json (default: --preset)")
    src.add_argument("--preset", choices=sorted(PRESETS),
                     help=f"a published model shape (default without --model: {DEFAULT_PRESET}, the embedded model)")
    p.add_argument("--gpu-memory", type=memory_size, required=True, metavar="SIZE",
                   help="memory of one GPU: 24GB, 80GB, 24GiB (GB = 1e9 bytes)")
    p.add_argument("--gpus", type=positive_int, default=1, help="how many such GPUs (default 1)")
    p.add_argument("--examples", type=positive_int, help="training examples (decides full fine-tuning, rank, "
                   "dropout and the warmup steps; default unknown)")
    p.add_argument("--seq-len", type=tokens_per_sequence, default=DEFAULT_SEQ_LEN,
                   help=f"tokens per sequence (default {DEFAULT_SEQ_LEN})")
    p.add_argument("--target-batch", type=positive_int, default=TARGET_BATCH,
                   help=f"sequences per update, reached by gradient accumulation (default {TARGET_BATCH})")
    p.add_argument("--epochs", type=positive_int, default=1, help="passes over --examples (default 1)")
    p.add_argument("--task", choices=TASKS, default="general",
                   help="general (rank 8), complex (rank 16-32) or style/format (rank 4) (default general)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    p.set_defaults(func=cmd_advise)
    return p


class RawDescriptionHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """The description as written (its paragraphs and list), the flags as every command shows them."""


def add_advise_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``advise`` on a ``parser.add_subparsers()`` object (as ``cli/main.py`` builds its commands)."""
    p = subparsers.add_parser("advise", help="which method and settings for a model on your GPUs",
                              description="\n\n".join([DESCRIPTION] + advice.__doc__.split("\n\n")[1:4]),
                              formatter_class=RawDescriptionHelpFormatter)
    return configure_parser(p)


def cmd_advise(args: argparse.Namespace) -> int:
    """Run ``finetune advise``; raises ValueError / FileNotFoundError for bad input (the CLI prints them)."""
    config, name = shape_from(args.model, args.preset)
    if args.seq_len > config.max_position_embeddings:
        raise ValueError(f"--seq-len {args.seq_len} is longer than {name}'s context "
                         f"({config.max_position_embeddings} tokens); give at most that")
    a = advise(config, args.gpu_memory, args.gpus, args.examples, args.seq_len, args.task, args.target_batch,
               args.epochs)
    if args.json:
        out = {"model": name, "parameters": parameter_count(config), "gpu_memory": args.gpu_memory,
               "gpus": args.gpus, **a.to_dict()}
        if a.recommended:
            out["command"] = train_command(a.settings, args.gpus)
        print(json.dumps(out, indent=2))
    else:
        print(format_advice(a, name, parameter_count(config), args.gpu_memory, args.gpus))
    return 0


if __name__ == "__main__":
    sys.exit(cmd_advise(configure_parser(argparse.ArgumentParser(prog="finetune advise")).parse_args()))
