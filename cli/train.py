"""``finetune train``: the flags of one run, parsed once into the method's recipe (``recipes/``), then run.

The method's defaults live in its recipe's dataclass (``recipes/full.py``, ``lora.py``, ``qlora.py``); a flag
that is left out keeps the recipe's default: the config is ``dataclasses.replace(Recipe(), **the flags given)``.
``--help`` shows the defaults read from the recipes. ``--config FILE.yaml`` gives flags from a file, through this
same parser (``train_config.py``); the resolved config is written to ``OUT/train_config.yaml``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shlex
import sys
from pathlib import Path

from finetune_ref.cli.common import (NF4_BLOCKSIZES, add_data_args, add_model_args, add_out_args, finite_non_negative,
                                     fraction, grad_accum, learning_rate, module_names, non_negative_int,
                                     positive_float, positive_int, probability, rank, resolve_model_dir, seed,
                                     show_number, targets, token_ids, weight_decay, writing_to)
from finetune_ref.models.output_dir import replaced_when_written
from finetune_ref.optim import OPTIMIZER_NAMES
from finetune_ref.recipes import RECIPES, RunConfig
from finetune_ref.recipes.run_record import (config_from_record, holds_run, latest_checkpoint_update, read_run_record,
                                             run_dir_of)
from finetune_ref.train.config import PRECISIONS
from finetune_ref.train.loggers import LOGGERS

DEFAULT_METHOD = "lora"
NF4_FIELDS = ("blocksize", "double_quant", "compute_dtype")
DEFAULTS = {method: recipe() for method, recipe in RECIPES.items()}
ALL_FIELDS = {f.name for cfg in DEFAULTS.values() for f in dataclasses.fields(cfg)}  # of any recipe


def run_config(args: argparse.Namespace) -> tuple[RunConfig, dict | None, Path | None]:
    """The run's config, and for ``--resume`` the record of the run it continues and that run's directory.

    A new run: the recipe of ``--method`` with the flags that were given (LoRA's on ``--method full`` are
    unused). A resumed run: the recorded config (``recipes/run_record.py``) with the flags that were given, and
    ``--out`` the run's own directory unless given; ``run_training`` checks what differs from the record.

    Raises:
        ValueError: NF4 flags without ``--method qlora``, ``--resume`` of a checkpoint outside a run directory
            without ``--out``, or what the recipe rejects (it names the field).
    """
    given = {k: v for k, v in vars(args).items() if k in ALL_FIELDS}
    method = getattr(args, "method", None)
    record = run_dir = None
    if "resume" in given:
        run_dir = run_dir_of(given["resume"])
        if run_dir is None and "out" not in given:
            raise ValueError(f"--resume {given['resume']}: no run directory around it (run_config.json or "
                             "checkpoints/); give --out DIR for the continued run")
        given.setdefault("out", str(run_dir))
        record = read_run_record(run_dir) if run_dir is not None else None
        if record is not None and (method is None or method == record["method"]):
            return config_from_record(record, RECIPES, **given), record, run_dir
    defaults = DEFAULTS[method or DEFAULT_METHOD]
    fields = {f.name for f in dataclasses.fields(defaults)}
    if "loraplus_lr_ratio" in given and (method or DEFAULT_METHOD) == "full":
        raise ValueError("--loraplus-lr-ratio sets the learning rate of LoRA's B matrices: use it with --method lora "
                         "or qlora")
    if any(k in given for k in NF4_FIELDS) and not set(NF4_FIELDS) <= fields:
        raise ValueError("--blocksize, --no-double-quant and --compute-dtype set up the NF4 base of --method qlora")
    unused = [k for k in given if k not in fields]  # e.g. LoRA's flags with --method full: refused, not ignored
    if unused:
        table = getattr(args, "flags", None) or {}
        names = ", ".join(table.get(k, "--" + k.replace("_", "-")) for k in unused)
        raise ValueError(f"{names} {'does' if len(unused) == 1 else 'do'} not apply to --method "
                         f"{method or DEFAULT_METHOD}: {'it sets' if len(unused) == 1 else 'they set'} up the adapters "
                         "of --method lora and qlora; leave it out, or choose --method lora / qlora")
    steps = given.get("steps", defaults.steps)
    if given.get("warmup_steps", 0) > steps:  # asked for: a warmup the run cannot hold is a mistake, not a cap
        raise ValueError(f"--warmup {given['warmup_steps']} is longer than the run (--steps {steps}): give --warmup "
                         f"{steps} or less, or more --steps")
    # The recipe's default warmup is capped at --steps, so that a short run keeps it valid (the dry run says so).
    given["warmup_steps"] = min(given.get("warmup_steps", defaults.warmup_steps), steps)
    return dataclasses.replace(defaults, **{k: v for k, v in given.items() if k in fields}), record, run_dir


def _explain(out: Path) -> str | None:
    """What a non-empty ``--out`` of ``train`` holds, when it is a run."""
    if holds_run(out):
        return f"it holds a training run: continue it with finetune train --resume {out}"
    return None


def cmd_train(args) -> int:
    from finetune_ref.cli.train_config import CONFIG_FILE, config_text, resolve_config

    args, (cfg, record, run_dir) = resolve_config(args, train_arguments(), run_config)
    extend = getattr(args, "extend", False)
    if getattr(args, "print_config", False):
        print(config_text(cfg, train_arguments()), end="")
        return 0
    if extend and cfg.resume is None:
        raise ValueError("--extend trains a run further: give it with --resume DIR and a larger --steps")
    out = cfg.out_dir
    own = run_dir is not None and out.resolve() == run_dir.resolve()
    if args.dry_run:
        _dry_run_checks(cfg, args, own)
        from finetune_ref.train.schedule import describe_schedule, format_lr_table

        min_lr = cfg.lr * cfg.min_lr_ratio
        default_warmup = DEFAULTS[cfg.method].warmup_steps
        capped = (f" (the default {default_warmup}, capped at --steps)" if not hasattr(args, "warmup_steps")
                  and cfg.warmup_steps < default_warmup else "")
        print(f"method {cfg.method}, precision {cfg.precision}, optimizer {cfg.optimizer}, {cfg.steps} updates "
              f"of {cfg.batch_size} sequences x {cfg.grad_accum} accumulated micro-batch(es) per process, warmup {cfg.warmup_steps}{capped}, peak lr "
              f"{cfg.lr:g}, min lr {min_lr:g}")
        print(describe_schedule(cfg.steps, cfg.lr, cfg.warmup_steps, min_lr))
        print(format_lr_table(cfg.steps, cfg.lr, cfg.warmup_steps, min_lr))
        return 0
    if own and record is not None and record.get("finished") and not extend:  # (another --out: a branch)
        done = record["finished"]
        steps = record["config"]["steps"]
        at = latest_checkpoint_update(run_dir)
        further = (f"To train it further: finetune train --resume {run_dir} --steps N --extend (N > {steps})"
                   if at == done["update"] else
                   f"It keeps no checkpoint of its last update (newest: {'none' if at is None else f'update {at}'}; "
                   "a --method full run writes one only with --save-every), so it cannot be trained further in place")
        print(f"run {run_dir} already finished at update {done['update']} of {steps}"
              f"{' (stopped early)' if done.get('stopped_early') else ''}; its result is in {run_dir}. {further}")
        return 0
    from finetune_ref.train.distributed import destroy_distributed, init_distributed

    model_dir = resolve_model_dir(cfg.model, cfg.cache_dir)
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun rank 0 alone guards and writes --out
    inputs = (model_dir, cfg.data, cfg.eval_data) + (() if own else (cfg.resume,))
    guard = writing_to(out, *inputs, overwrite=args.overwrite, own=own, explain=_explain) if main_rank \
        else contextlib.nullcontext(out)
    # asked for: start over in a clean directory, the old contents kept until the new run writes
    replacing = replaced_when_written(out) if main_rank and args.overwrite and not own else contextlib.nullcontext()
    with guard, replacing:
        info = init_distributed()
        finished = False
        try:
            status = _run(cfg, model_dir, info, extend, args.flags,
                          {CONFIG_FILE: config_text(cfg, train_arguments())})
            finished = True  # every rank got here (an interruption is agreed on by all ranks)
            return status
        finally:
            destroy_distributed(info, synchronize=finished)


def _dry_run_checks(cfg: RunConfig, args, own: bool) -> None:
    """What a real run checks before loading weights, writing nothing but the default model's cached conversion
    (made once, as the first run would): the model directory (its
    config.json: context, --targets, --rank; a missing one is a warning, as a plan may be made on a machine
    without the weights), the data files, and --out (when its parent exists)."""
    from finetune_ref.models.config import check_context
    from finetune_ref.models.output_dir import check_output_dir

    model_dir = None
    if cfg.model is not None and not Path(cfg.model).exists():  # a plan may be made away from the weights
        print(f"finetune train: warning: --model {cfg.model} does not exist here: its shapes are not checked, and "
              "a real run here would fail", file=sys.stderr)
    elif cfg.model is None or Path(cfg.model).suffix != ".gguf":  # converting a .gguf is the real run's work
        model_dir = resolve_model_dir(cfg.model, cfg.cache_dir)  # the default: its cached conversion (made once)
        check_context(model_dir, cfg.seq_len, f"seq_len={cfg.seq_len}")
        cfg.check_shapes(model_dir, lambda name: args.flags.get(name, name))
    cfg.check_data_paths(lambda name: args.flags.get(name, name))
    if cfg.out_dir.parent.is_dir():
        check_output_dir(cfg.out_dir, (model_dir, cfg.data, cfg.eval_data), overwrite=args.overwrite, own=own,
                         explain=_explain)


def _run(cfg: RunConfig, model_dir, info, extend: bool, flag_names: dict, files: dict[str, str]) -> int:
    """Exit status of the run: 0; 130 after Ctrl-C / SIGTERM (its checkpoint written); 1 when the result could not
    be written (the checkpoint that keeps it is named). ``files`` go into the run directory (``run_training``)."""
    from finetune_ref.recipes.run import run_training
    from finetune_ref.train.bookkeeping import ResultNotSaved, TrainingInterrupted

    command = shlex.join(["finetune", *sys.argv[1:]])
    try:
        run_training(cfg, model_dir, info, extend=extend, flag=lambda name: flag_names.get(name, name),
                     command=command, files=files)
    except TrainingInterrupted as stop:
        if info.is_main:
            print(f"interrupted after update {stop.update}; checkpoint {stop.checkpoint}; continue with: "
                  f"finetune train --resume {cfg.out_dir}", file=sys.stderr)
        return 130
    except ResultNotSaved as err:
        if info.is_main:
            print(f"finetune train: error: {_not_saved(err, cfg)}", file=sys.stderr)
        return 1
    return 0


def _not_saved(err, cfg: RunConfig) -> str:
    """What happened to the result and the command that writes it from the kept checkpoint."""
    where = f"could not write the result to {cfg.out_dir} ({err.error.strerror or err.error})"
    if err.checkpoint is None:
        return f"{where}, nor a checkpoint anywhere; the trained state is lost"
    ckpt = Path(err.checkpoint)
    run = ckpt.parent.parent
    if run.resolve() == cfg.out_dir.resolve():
        return (f"{where}. The trained state (update {err.update}) is kept in {ckpt}; once there is space or write "
                f"permission, write the result with: finetune train --resume {run}")
    return (f"{where}, nor a checkpoint there. The trained state (update {err.update}) is kept in {ckpt}; write "
            f"the result into a writable NEW_DIR with: finetune train --resume {ckpt} --out NEW_DIR")


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


def log_names(text: str) -> tuple[str, ...]:
    """--log: a comma-separated list of loggers ("tensorboard", "wandb")."""
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [n for n in names if n not in LOGGERS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected {' or '.join(LOGGERS)} (or both, comma-separated), got {text!r}")
    return names


def add_train_parser(sub) -> argparse.ArgumentParser:
    """Register ``train`` on the ``finetune`` subcommands."""
    # A flag left out sets nothing (SUPPRESS), so the recipe's (or the --config file's) value stays.
    p = sub.add_parser("train", help="fine-tune a model (LoRA, QLoRA or full) and save the adapter or model",
                       argument_default=argparse.SUPPRESS,
                       epilog="Torch threads: the cores less those other processes keep busy, now and over the last "
                              "minute (the run's 'model ... |' line names the count); set OMP_NUM_THREADS=N to "
                              "choose N.")
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)  # cli/main.py adds ``flags``: the flag of each config field, for messages
    return p


def train_arguments() -> argparse.ArgumentParser:
    """The flags of ``finetune train`` in a parser of their own that raises ``argparse.ArgumentError`` instead of
    exiting: what reads a --config file parses its values with."""
    p = argparse.ArgumentParser(prog="finetune train", argument_default=argparse.SUPPRESS, exit_on_error=False,
                                add_help=False)
    add_train_arguments(p)
    return p


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Every flag of ``finetune train``; a flag left out sets no attribute (but --overwrite, --extend, --dry-run)."""
    p.add_argument("--config", metavar="FILE.yaml",
                   help="take flags from a YAML file: one 'flag-name: value' line per flag, without the dashes "
                        "(e.g. min-lr-ratio: 0.1; flags given here override it); a file the package ships can be "
                        "named without its path (lora, qlora, full, ...; see recipes/); OUT/train_config.yaml "
                        "repeats a run (default: none)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved configuration (as the YAML --config reads) and exit")
    p.add_argument("--method", choices=sorted(RECIPES), help=f"what to train (default {DEFAULT_METHOD})")
    add_model_args(p, dtype_help="dtype of the unquantized base weights (default: what --precision implies)",
                   given_only=True)
    add_data_args(p, given_only=True)
    add_out_args(p, "output directory: the adapter (lora, qlora) or model (full), run_config.json, metrics.jsonl "
                    "and checkpoints/ (default runs/<method>; with --resume, the run's own directory)")
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
    p.add_argument("--fused-adamw", action="store_true",
                   help="--optimizer adamw with torch's fused kernel (fp32 weights: one kernel per tensor, no "
                        "temporaries; the same update to the last ulp)")
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
    p.add_argument("--no-chunked-loss", dest="chunked_loss", action="store_const", const=False,
                   help="compute the loss on materialised (batch, seq_len, vocab) logits instead of from the "
                        "hidden states in chunks (same loss to rounding, more memory)")
    p.add_argument("--no-fused-projections", dest="fused_projections", action="store_const", const=False,
                   help="run q/k/v and gate/up (and their LoRA A's) as separate matmuls instead of one each over "
                        "the frozen base, and LoRA with PEFT's ops (bitwise PEFT) instead of its gradients as wide "
                        "products (same results to float rounding; slower, and with fp32 adapters on a 16-bit base "
                        "more memory)")
    p.add_argument("--no-selective-recompute", dest="selective_recompute", action="store_const", const=False,
                   help="store RMSNorm and SwiGLU outputs for backward instead of recomputing them there (the "
                        "same gradients; more memory, a few elementwise ops fewer)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each decoder layer (the first steps compile; needs a C++ compiler on CPU)")
    p.add_argument("--save-every", type=non_negative_int,
                   help="write a training checkpoint every N updates and at the end, 0: only on Ctrl-C "
                        f"({_default('save_every')})")
    p.add_argument("--keep-last", type=non_negative_int,
                   help=f"checkpoints to keep, 0: all ({_default('keep_last')})")
    p.add_argument("--resume", metavar="DIR",
                   help="continue a run (its --out directory, or one of its checkpoints) with its recorded "
                        "settings; flags given must agree with them (default: none, a fresh run)")
    p.add_argument("--extend", action="store_true", default=False,
                   help="with --resume and a --steps larger than recorded: train a run further on purpose")
    p.add_argument("--parallel", choices=["ddp", "fsdp"],
                   help="under torchrun: replicate (ddp) or shard with FSDP2 (fsdp: weights, or the frozen (NF4) base and "
                        "adapters, gradients and optimizer states) "
                        f"({_default('parallel')})")
    p.add_argument("--dry-run", action="store_true", default=False,
                   help="check what needs no weights (flags, the model's config.json: --model's or the default's "
                        "cached conversion; the data files, --out), print the plan and the learning rate of every "
                        "update, then exit")
    p.add_argument("--log", type=log_names, metavar="NAMES",
                   help="also log to tensorboard (OUT/tensorboard) or wandb (OUT/wandb; offline unless W&B is "
                        "configured), or both: tensorboard,wandb (default: none; metrics.jsonl is always written)")
    p.add_argument("--plot", action="store_true",
                   help="draw the loss, learning-rate and tokens/s curves into OUT/loss.png at the end")
    g = p.add_argument_group("LoRA and QLoRA adapters")
    g.add_argument("--rank", type=rank, help=f"LoRA rank r ({_default('rank')})")
    g.add_argument("--alpha", type=positive_float, help=f"LoRA alpha, scaling = alpha / r ({_default('alpha')})")
    g.add_argument("--dropout", type=probability,
                   help=f"LoRA dropout on the adapter input ({_default('dropout')})")
    g.add_argument("--targets", type=targets,
                   help=f"'all-linear', module names like q_proj,v_proj (embed_tokens: LoRA on the input embedding), "
                        f"or re:<regex> ({_default('targets')})")
    g.add_argument("--rslora", action="store_true", help="rank-stabilised scaling alpha / sqrt(r)")
    g.add_argument("--loraplus-lr-ratio", type=positive_float,
                   help="LoRA+: B's learning rate = this x --lr (Hayou et al. 2024 use ~16; default off)")
    g.add_argument("--init", metavar="INIT",
                   help="how A and B start: default, gaussian, pissa, pissa_niter_K, olora (these three move part of "
                        "W into the adapter; pissa with --method lora only; olora with --method qlora saves its "
                        "re-quantized base in OUT/olora_base), loftq (--method qlora) (default: default, PEFT's "
                        "init_lora_weights=True)")
    g.add_argument("--loftq-iter", type=positive_int, help="LoftQ's alternating quantize/SVD steps (default 1)")
    g.add_argument("--modules-to-save", type=module_names, metavar="NAMES",
                   help="modules trained in full and saved with the adapter, named as PEFT does (the full name or "
                        "its trailing parts, no re: or all-linear): norm (the final norm only), input_layernorm,"
                        "post_attention_layernorm (every layer's), lm_head (an untied one); default none")
    g.add_argument("--trainable-tokens", type=token_ids, metavar="IDS",
                   help="token ids whose embedding rows train directly, e.g. 0,5,17 (PEFT's trainable_token_indices; "
                        "a tied lm_head follows them, and the loss is then computed on the whole (batch, seq-len, vocab) logits: "
                        "see finetune memory); default none")
    g.add_argument("--ensure-weight-tying", action="store_true",
                   help="with embed_tokens in --targets on a model whose lm_head is tied to it: give the head the "
                        "same adapter (PEFT's ensure_weight_tying; the loss is then computed on the whole logits, more memory: "
                        "see finetune memory); without it such targets are refused")
    g.add_argument("--dora", action="store_true",
                   help="DoRA: also train a magnitude per output feature (Liu et al. 2024; QDoRA with --method qlora)")
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
