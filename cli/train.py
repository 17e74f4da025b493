"""``finetune train``: the flags of one run, parsed once into the method's recipe (``recipes/``), then run.

The method's defaults live in its recipe's dataclass (``recipes/full.py``, ``lora.py``, ``qlora.py``); a flag
that is left out keeps the recipe's default: the config is ``dataclasses.replace(Recipe(), **the flags given)``.
``--help`` shows the defaults read from the recipes.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from finetune_ref.cli.common import (NF4_BLOCKSIZES, add_data_args, add_model_args, check_out_dir, finite_non_negative,
                                     fraction, grad_accum, learning_rate, non_negative_int, positive_float,
                                     positive_int, probability, rank, resolve_model_dir, seed, show_number, targets,
                                     weight_decay)
from finetune_ref.optim import OPTIMIZER_NAMES
from finetune_ref.recipes import RECIPES, RunConfig
from finetune_ref.train.config import PRECISIONS

NOT_CONFIG = ("command", "func", "method", "dry_run")  # parsed flags that are not recipe fields
NF4_FIELDS = ("blocksize", "double_quant", "compute_dtype")
DEFAULTS = {method: recipe() for method, recipe in RECIPES.items()}


def run_config(args: argparse.Namespace) -> RunConfig:
    """The recipe of ``--method`` with the flags that were given (LoRA's on ``--method full`` are unused).

    Raises:
        ValueError: NF4 flags without ``--method qlora``, or what the recipe rejects (it names the field).
    """
    defaults = DEFAULTS[args.method]
    fields = {f.name for f in dataclasses.fields(defaults)}
    given = {k: v for k, v in vars(args).items() if k not in NOT_CONFIG}
    if any(k in given for k in NF4_FIELDS) and not set(NF4_FIELDS) <= fields:
        raise ValueError("--blocksize, --no-double-quant and --compute-dtype set up the NF4 base of --method qlora")
    # --warmup is capped at --steps, so that a short run keeps its default warmup valid.
    given["warmup_steps"] = min(given.get("warmup_steps", defaults.warmup_steps), given.get("steps", defaults.steps))
    return dataclasses.replace(defaults, **{k: v for k, v in given.items() if k in fields})


def cmd_train(args) -> int:
    cfg = run_config(args)
    if args.dry_run:
        from finetune_ref.train.schedule import format_lr_table

        min_lr = cfg.lr * cfg.min_lr_ratio
        print(f"method {cfg.method}, precision {cfg.precision}, optimizer {cfg.optimizer}, {cfg.steps} updates "
              f"of {cfg.batch_size} x {cfg.grad_accum} sequences per process, warmup {cfg.warmup_steps}, peak lr "
              f"{cfg.lr:g}, min lr {min_lr:g}")
        print(format_lr_table(cfg.steps, cfg.lr, cfg.warmup_steps, min_lr))
        return 0
    from finetune_ref.train.distributed import destroy_distributed, init_distributed

    model_dir = resolve_model_dir(cfg.model, cfg.cache_dir)
    check_out_dir(cfg.out_dir, model_dir)
    info = init_distributed()
    finished = False
    try:
        status = _run(cfg, model_dir, info)
        finished = True  # every rank got here (an interruption is agreed on by all ranks)
        return status
    finally:
        destroy_distributed(info, synchronize=finished)


def _run(cfg: RunConfig, model_dir, info) -> int:
    """Exit status of the run: 0, or 130 after Ctrl-C / SIGTERM (its checkpoint written)."""
    from finetune_ref.recipes.run import run_training
    from finetune_ref.train.bookkeeping import TrainingInterrupted

    try:
        run_training(cfg, model_dir, info)
    except TrainingInterrupted as stop:
        if info.is_main:
            print(f"interrupted after update {stop.update}; checkpoint {stop.checkpoint}; continue with "
                  f"--resume {cfg.out_dir}", file=sys.stderr)
        return 130
    return 0


# ---------------------------------------------------------------------------------------------------------
# The parser: every default shown is read from the recipes.
# ---------------------------------------------------------------------------------------------------------
def _default(name: str) -> str:
    """'default X', or 'default: X for full, Y for lora and qlora' where the recipes that have ``name`` differ."""
    by_value: dict[str, list[str]] = {}
    for method, cfg in DEFAULTS.items():
        if hasattr(cfg, name):
            by_value.setdefault(show_number(getattr(cfg, name)), []).append(method)
    if len(by_value) == 1:
        return f"default {next(iter(by_value))}"
    return "default: " + ", ".join(f"{value} for {' and '.join(methods)}" for value, methods in by_value.items())


def add_train_parser(sub) -> argparse.ArgumentParser:
    """Register ``train`` on the ``finetune`` subcommands."""
    # A flag left out sets nothing (SUPPRESS), so the recipe's default stays.
    p = sub.add_parser("train", help="fine-tune a model (LoRA, QLoRA or full) and save the adapter or model",
                       argument_default=argparse.SUPPRESS)
    p.add_argument("--method", default="lora", choices=sorted(RECIPES), help="what to train (default lora)")
    add_model_args(p, dtype_help="dtype of the unquantized base weights (default: what --precision implies)",
                   given_only=True)
    add_data_args(p, given_only=True)
    p.add_argument("--out", help="output directory: the adapter (lora, qlora) or model (full), metrics.jsonl and "
                                 "checkpoints/ (default runs/<method>)")
    p.add_argument("--steps", type=positive_int, help=f"optimizer updates ({_default('steps')})")
    p.add_argument("--lr", type=learning_rate, help=f"peak learning rate ({_default('lr')})")
    p.add_argument("--warmup", dest="warmup_steps", metavar="WARMUP", type=non_negative_int,
                   help=f"linear-warmup updates, at most --steps ({_default('warmup_steps')})")
    p.add_argument("--min-lr-ratio", type=fraction, help=f"cosine decays to lr * this ({_default('min_lr_ratio')})")
    p.add_argument("--weight-decay", type=weight_decay,
                   help=f"AdamW decoupled weight decay, matrices only ({_default('weight_decay')})")
    p.add_argument("--max-grad-norm", type=finite_non_negative,
                   help=f"clip the global gradient norm, 0: off ({_default('max_grad_norm')})")
    p.add_argument("--grad-accum", type=grad_accum,
                   help=f"micro-batches per optimizer update ({_default('grad_accum')})")
    p.add_argument("--optimizer", choices=OPTIMIZER_NAMES,
                   help="AdamW with 32-bit states (adamw), states paged to host memory (paged_adamw), blockwise "
                        f"8-bit states (adamw8bit), or both ({_default('optimizer')})")
    p.add_argument("--eval-every", type=non_negative_int,
                   help=f"evaluate every N updates, 0: only before and after ({_default('eval_every')})")
    p.add_argument("--early-stopping-patience", type=non_negative_int,
                   help="stop after N evaluations without a new best held-out loss (needs --eval-every; "
                        f"{_default('early_stopping_patience')}, never)")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="fp32; bf16-autocast (fp32 weights, bf16 matmuls); bf16 (bf16 weights, fp32 master "
                        f"weights and AdamW states) ({_default('precision')})")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each block's activations in backward (less memory, ~1/3 more compute)")
    p.add_argument("--save-every", type=non_negative_int,
                   help="write a training checkpoint every N updates and at the end, 0: only on Ctrl-C "
                        f"({_default('save_every')})")
    p.add_argument("--keep-last", type=non_negative_int,
                   help=f"checkpoints to keep, 0: all ({_default('keep_last')})")
    p.add_argument("--resume", metavar="DIR",
                   help="continue from a checkpoint (a checkpoint directory, or the --out directory of the "
                        "interrupted run; default: none, a fresh run)")
    p.add_argument("--parallel", choices=["ddp", "fsdp"],
                   help="under torchrun: replicate (ddp) or shard with FSDP2 (fsdp, --method full only) "
                        f"({_default('parallel')})")
    p.add_argument("--dry-run", action="store_true", default=False,
                   help="print the plan and the learning rate of every update, then exit")
    g = p.add_argument_group("LoRA and QLoRA adapters")
    g.add_argument("--rank", type=rank, help=f"LoRA rank r ({_default('rank')})")
    g.add_argument("--alpha", type=positive_float, help=f"LoRA alpha, scaling = alpha / r ({_default('alpha')})")
    g.add_argument("--dropout", type=probability,
                   help=f"LoRA dropout on the adapter input ({_default('dropout')})")
    g.add_argument("--targets", type=targets,
                   help=f"'all-linear', module names like q_proj,v_proj, or re:<regex> ({_default('targets')})")
    g.add_argument("--rslora", action="store_true", help="rank-stabilised scaling alpha / sqrt(r)")
    g = p.add_argument_group("QLoRA's NF4 base")
    g.add_argument("--blocksize", type=int, choices=NF4_BLOCKSIZES,
                   help="NF4 block size (default 64; a 4-bit --model keeps its own)")
    g.add_argument("--no-double-quant", dest="double_quant", action="store_const", const=False,
                   help="keep the absmax values in fp32 (4.5 instead of 4.127 bits per weight)")
    g.add_argument("--compute-dtype", choices=["fp32", "bf16", "fp16"],
                   help="dtype of the NF4 matmuls (default: fp32 for --precision fp32, else bf16)")
    p.add_argument("--seed", type=seed, help=f"seed for initialisation and data order ({_default('seed')})")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False,
                   help="no progress bar: a line every --log-every updates and one per evaluation instead (for logs)")
    p.add_argument("--log-every", type=non_negative_int,
                   help=f"with --no-progress, updates between progress lines, 0: none ({_default('log_every')})")
    p.set_defaults(func=cmd_train)
    return p
