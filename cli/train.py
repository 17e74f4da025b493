"""``finetune train``: one loop (``finetune.trainer.train``) for full fine-tuning, LoRA and QLoRA.

A method is one function in :data:`TRAIN_METHODS`: it loads the base the way it trains it (dense weights for
full and LoRA; NF4 while loading, layer by layer, for QLoRA, so the 16/32-bit model is never whole in memory),
makes the trainable part, and says how to save the result (an adapter directory, or a model directory).

Defaults per method (the usual recipes; each is a flag):

=======  ====  ===========  ===========================  =====================================================
method   lr    precision    optimizer                    saved result
=======  ====  ===========  ===========================  =====================================================
lora     1e-3  fp32         adamw                        PEFT adapter (adapter_config.json, adapter_model.safetensors)
full     2e-5  fp32         adamw (fp32 master if bf16)  HF model directory (config.json, model.safetensors, tokenizer)
qlora    1e-3  bf16         paged_adamw (QLoRA sec. 3)   PEFT adapter + qlora_config.json (how the base was quantized)
=======  ====  ===========  ===========================  =====================================================
"""

from __future__ import annotations

import argparse
import hashlib
import resource
import sys
import time
from pathlib import Path

import torch

from finetune_ref.cli.common import (NF4_BLOCKSIZES, add_data_args, add_model_args, check_out_dir, copy_tokenizer_files,
                                 non_negative_int,
                                 positive_float, positive_int, probability, resolve_model_dir, targets,
                                 write_qlora_record)

DEFAULT_PRECISION = {"lora": "fp32", "full": "fp32", "qlora": "bf16"}
# Peak learning rates: adapters take large steps (LoRA, Hu et al. 2021, used 2e-4 to 2e-3; 1e-3 is what the
# README's runs measured), full fine-tuning small ones (2e-5: larger rates wreck a pretrained model in a few steps).
DEFAULT_LR = {"lora": 1e-3, "qlora": 1e-3, "full": 2e-5}


class TrainMethod:
    """What ``cmd_train`` needs from a method: the model to train, its checkpoint metadata, and an export."""

    def __init__(self, model, metadata: dict, export, what: str):
        self.model, self.metadata, self.export, self.what = model, metadata, export, what


def _base_dtype(args) -> str:
    """Weights to load: bf16 for --precision bf16 (fp32 under FSDP, whose fp32 shards are the master copy)."""
    wanted = "bf16" if args.precision == "bf16" and not (args.parallel == "fsdp" and args.world_size > 1) else "fp32"
    if args.dtype is None:
        return wanted
    if args.method == "full" and args.dtype != wanted:
        raise ValueError(f"--method full --precision {args.precision} trains {wanted} weights; drop --dtype "
                         f"{args.dtype} (the precision decides the weight dtype)")
    return args.dtype


def _lora_config(args):
    from finetune_ref.lora import LoraConfig

    return LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=args.targets,
                      use_rslora=args.rslora)


def _lora_metadata(args) -> dict:
    return {"r": args.rank, "lora_alpha": args.alpha, "lora_dropout": args.dropout, "target_modules": args.targets,
            "use_rslora": args.rslora}


def _train_lora(args, model_dir: Path, info) -> TrainMethod:
    from finetune_ref.train.distributed import unwrap_model
    from finetune_ref.lora import inject_lora, save_adapter
    from finetune_ref.models.checkpoint import load_model

    model = load_model(model_dir, dtype=args.dtype)
    inject_lora(model, _lora_config(args))

    def export(m, directory):
        if info.is_main:
            save_adapter(unwrap_model(m), directory, base_model_name_or_path=str(model_dir))

    return TrainMethod(model, {"method": "lora", "lora": _lora_metadata(args)}, export, "adapter")


def _train_qlora(args, model_dir: Path, info) -> TrainMethod:
    """QLoRA (Dettmers et al. 2023, section 3): frozen NF4 base (double quantization by default), LoRA adapters
    in bf16 for --precision bf16 (fp32 otherwise), NF4 matmuls in --compute-dtype."""
    from finetune_ref.train.distributed import unwrap_model
    from finetune_ref.lora import save_adapter
    from finetune_ref.qlora.model import nf4_layers, prepare_qlora_model

    compute = args.compute_dtype or ("fp32" if args.precision == "fp32" else "bf16")
    adapter_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    model = prepare_qlora_model(model_dir, lora_config=_lora_config(args), blocksize=args.blocksize,
                                double_quant=False if args.no_double_quant else None, compute_dtype=compute,
                                adapter_dtype=adapter_dtype, dtype=args.dtype)
    layer = nf4_layers(model)[0][1]  # every layer shares the settings (a 4-bit --model: those it was saved with)
    settings = {"blocksize": layer.blocksize, "double_quant": layer.double_quant, "compute_dtype": compute,
                "dtype": args.dtype}

    def export(m, directory):
        if info.is_main:
            save_adapter(unwrap_model(m), directory, base_model_name_or_path=str(model_dir))
            write_qlora_record(Path(directory), settings)

    return TrainMethod(model, {"method": "qlora", "lora": _lora_metadata(args), "qlora": settings}, export,
                       "QLoRA adapter")


def _train_full(args, model_dir: Path, info) -> TrainMethod:
    from finetune_ref.full import export_full_model, prepare_full_finetuning
    from finetune_ref.models.checkpoint import load_model

    model = load_model(model_dir, dtype=args.dtype)
    prepare_full_finetuning(model, next(model.parameters()).dtype)
    config = model.config

    def export(m, directory):
        export_full_model(m, directory, config, is_main=info.is_main)
        if info.is_main:
            copy_tokenizer_files(model_dir, Path(directory))

    return TrainMethod(model, {"method": "full"}, export, "model")


TRAIN_METHODS = {"lora": _train_lora, "full": _train_full, "qlora": _train_qlora}


def cmd_train(args) -> int:
    from finetune_ref.train.schedule import format_lr_table
    from finetune_ref.train.trainer import TrainConfig
    from finetune_ref.optim.optimizers import default_optimizer

    args.precision = args.precision or DEFAULT_PRECISION[args.method]
    args.lr = args.lr or DEFAULT_LR[args.method]
    args.optimizer = args.optimizer or default_optimizer(args.method)
    if args.method != "qlora" and (args.blocksize is not None or args.no_double_quant or args.compute_dtype):
        raise ValueError("--blocksize, --no-double-quant and --compute-dtype set up the NF4 base of --method qlora")
    cfg = TrainConfig(steps=args.steps, lr=args.lr, warmup_steps=min(args.warmup, args.steps),
                      min_lr_ratio=args.min_lr_ratio, grad_accum=args.grad_accum,
                      max_grad_norm=args.max_grad_norm, eval_every=args.eval_every,
                      early_stopping_patience=args.early_stopping_patience, precision=args.precision,
                      optimizer=args.optimizer, weight_decay=args.weight_decay, seed=args.seed,
                      progress=not args.no_progress)
    cfg.validate()
    if args.parallel == "fsdp" and args.method != "full":
        raise ValueError(f"--parallel fsdp shards full fine-tuning only; {args.method} trains with DDP (the default)")
    if args.dry_run:
        print(f"method {args.method}, precision {args.precision}, optimizer {args.optimizer}, {cfg.steps} updates "
              f"of {args.batch_size} x {args.grad_accum} sequences per process, warmup {cfg.warmup_steps}, peak lr "
              f"{cfg.lr:g}, min lr {cfg.lr * cfg.min_lr_ratio:g}")
        print(format_lr_table(cfg.steps, cfg.lr, cfg.warmup_steps, cfg.lr * cfg.min_lr_ratio))
        return 0
    from finetune_ref.train.distributed import destroy_distributed, init_distributed

    info = init_distributed()
    finished = False
    try:
        status = _run_training(args, cfg, info)
        finished = True  # every rank got here (an interruption is agreed on by all ranks)
        return status
    finally:
        destroy_distributed(info, synchronize=finished)


def _run_training(args, cfg, info) -> int:
    from finetune_ref.train.checkpointing import Checkpointer, resolve_checkpoint
    from finetune_ref.train.data import BatchIterator, build_datasets, iter_batches
    from finetune_ref.train.distributed import ShardedBatches, shard_model, wrap_ddp
    from finetune_ref.train.trainer import TrainingInterrupted, evaluate, train
    from finetune_ref.lora import format_trainable_parameters
    from finetune_ref.models.tokenizer import Tokenizer

    say = print if info.is_main else (lambda *a, **k: None)
    out = Path(args.out or f"runs/{args.method}")
    ckpt_root = out / "checkpoints"
    if args.resume is None and (ckpt_root / "latest").exists():
        raise ValueError(f"{out} already holds checkpoints of a run: continue it with --resume {out}, or choose "
                         "another --out")
    if args.resume is None and (out / "metrics.jsonl").exists():
        raise ValueError(f"{out} already holds a training run (metrics.jsonl); choose another --out, or delete it to "
                         "train again there")
    resume = resolve_checkpoint(args.resume) if args.resume else None
    cfg.metrics_path = out / "metrics.jsonl"
    args.world_size = info.world_size
    args.dtype = _base_dtype(args)
    torch.manual_seed(args.seed)  # the same initialisation (e.g. LoRA A) on every rank
    model_dir = resolve_model_dir(args.model, args.cache_dir)
    check_out_dir(out, model_dir)
    tokenizer = Tokenizer.from_dir(model_dir)
    # The data before the weights: a data error should not wait for them.
    train_examples, held = build_datasets(tokenizer, args.data, seq_len=args.seq_len,
                                          eval_fraction=args.eval_fraction, eval_data=args.eval_data)
    eval_batches = list(iter_batches(held, args.batch_size, tokenizer.pad_token_id)) if held else []
    say(f"model {model_dir} | {len(train_examples)} training sequences, {len(held)} held-out | seq_len "
        f"{args.seq_len}, batch {args.batch_size} x accum {args.grad_accum} x {info.world_size} process(es) | "
        f"{args.method}, {args.precision}, {args.optimizer}", file=sys.stderr)
    method = TRAIN_METHODS[args.method](args, model_dir, info)
    model = method.model
    model.model.gradient_checkpointing = args.grad_checkpointing
    say(format_trainable_parameters(model))
    if info.enabled:
        torch.manual_seed(args.seed + info.rank)  # from here on (dropout), each rank its own stream
        model = shard_model(model, info, torch.bfloat16 if args.precision == "bf16" else None) \
            if args.parallel == "fsdp" else wrap_ddp(model, info)
    # Every rank draws the same global batch and keeps its rows; drop_last so it always splits evenly (and the
    # data position in a checkpoint is the same at any world size with the same global batch).
    batches = ShardedBatches(BatchIterator(train_examples, args.batch_size * info.world_size,
                                           tokenizer.pad_token_id, seed=args.seed, drop_last=True), info)
    eval_fn = (lambda: evaluate(model, eval_batches, info, args.precision)) if eval_batches else None
    before = None
    if resume is None and eval_fn is not None:
        before = eval_fn()
        say(f"held-out before: loss {before['loss']:.4f}, perplexity {before['perplexity']:.2f} "
            f"({before['tokens']} tokens)")
    elif resume is not None:
        say(f"resuming from {resume}")
    config_text = (model_dir / "config.json").read_bytes()
    metadata = {**method.metadata, "precision": args.precision, "base_model": model_dir.name,
                "base_config_sha256": hashlib.sha256(config_text).hexdigest(), "seq_len": args.seq_len}
    checkpointer = Checkpointer(ckpt_root, save_every=args.save_every, keep_last=args.keep_last, info=info,
                                metadata=metadata, export_best=method.export, track_best=cfg.eval_every > 0)
    start = time.perf_counter()
    try:
        result = train(model, batches, cfg, eval_fn=eval_fn, checkpointer=checkpointer, resume_from=resume,
                       info=info)
    except TrainingInterrupted as stop:
        say(f"interrupted after update {stop.update}; checkpoint {stop.checkpoint}; continue with "
            f"--resume {out}", file=sys.stderr)
        return 130
    elapsed = time.perf_counter() - start
    method.export(model, out)
    after = result.get("eval")
    if before and after:
        say(f"held-out after:  loss {after['loss']:.4f}, perplexity {after['perplexity']:.2f} "
            f"(change {after['loss'] - before['loss']:+.4f})")
    elif after:
        say(f"held-out after:  loss {after['loss']:.4f}, perplexity {after['perplexity']:.2f}")
    if result.get("best_update") is not None and cfg.eval_every:
        say(f"best held-out loss {result['best_loss']:.4f} at update {result['best_update']} "
            f"({ckpt_root / 'best'}){' - stopped early' if result['stopped_early'] else ''}")
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    tokens_per_s = result.get("tokens_per_s", 0.0)
    say(f"trained {result['update']} updates in {elapsed:.0f} s ({tokens_per_s:.0f} tokens/s); peak memory "
        f"{peak_mib:.0f} MiB (max RSS of rank 0)")
    say(f"{method.what} saved to {out}")
    return 0


def add_train_parser(sub) -> argparse.ArgumentParser:
    """Register ``train`` on the ``finetune`` subcommands."""
    from finetune_ref.train.trainer import PRECISIONS
    from finetune_ref.optim import OPTIMIZER_NAMES

    p = sub.add_parser("train", help="fine-tune a model (LoRA, QLoRA or full) and save the adapter or model")
    p.add_argument("--method", default="lora", choices=sorted(TRAIN_METHODS), help="what to train")
    add_model_args(p, dtype_help="dtype of the unquantized base weights (default: what --precision implies)")
    add_data_args(p)
    p.add_argument("--out", default=None, help="output directory: the adapter (lora, qlora) or model (full), "
                                               "metrics.jsonl and checkpoints/ (default runs/<method>)")
    p.add_argument("--steps", type=positive_int, default=30, help="optimizer updates")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="peak learning rate (default: 1e-3 for lora and qlora, 2e-5 for full)")
    p.add_argument("--warmup", type=non_negative_int, default=4, help="linear-warmup updates")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to lr * this")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW decoupled weight decay (matrices only)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer update")
    p.add_argument("--optimizer", default=None, choices=OPTIMIZER_NAMES,
                   help="AdamW with 32-bit states (adamw), states paged to host memory (paged_adamw), blockwise "
                        "8-bit states (adamw8bit), or both (default: paged_adamw for qlora, else adamw)")
    p.add_argument("--eval-every", type=non_negative_int, default=0,
                   help="evaluate every N updates (0: only before and after)")
    p.add_argument("--early-stopping-patience", type=non_negative_int, default=0,
                   help="stop after N evaluations without a new best held-out loss (needs --eval-every)")
    p.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="fp32; bf16-autocast (fp32 weights, bf16 matmuls); bf16 (bf16 weights, fp32 master "
                        "weights and AdamW states). Default: bf16 for qlora, else fp32")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each block's activations in backward (less memory, ~1/3 more compute)")
    p.add_argument("--save-every", type=non_negative_int, default=0,
                   help="write a training checkpoint every N updates and at the end (0: only on Ctrl-C)")
    p.add_argument("--keep-last", type=non_negative_int, default=2, help="checkpoints to keep (0: all)")
    p.add_argument("--resume", metavar="DIR", help="continue from a checkpoint (a checkpoint directory, or the "
                                                   "--out directory of the interrupted run)")
    p.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"],
                   help="under torchrun: replicate (ddp) or shard with FSDP2 (fsdp, --method full only)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the learning rate of every "
                                                          "update, then exit")
    g = p.add_argument_group("LoRA and QLoRA adapters")
    g.add_argument("--rank", type=positive_int, default=8, help="LoRA rank r")
    g.add_argument("--alpha", type=positive_float, default=16.0, help="LoRA alpha (scaling = alpha / r)")
    g.add_argument("--dropout", type=probability, default=0.0, help="LoRA dropout on the adapter input")
    g.add_argument("--targets", type=targets, default="all-linear",
                   help="'all-linear', module names like q_proj,v_proj, or re:<regex>")
    g.add_argument("--rslora", action="store_true", help="rank-stabilised scaling alpha / sqrt(r)")
    g = p.add_argument_group("QLoRA's NF4 base")
    g.add_argument("--blocksize", type=int, choices=NF4_BLOCKSIZES, default=None,
                   help="NF4 block size (default 64; a 4-bit --model keeps its own)")
    g.add_argument("--no-double-quant", action="store_true",
                   help="keep the absmax values in fp32 (4.5 instead of 4.127 bits per weight)")
    g.add_argument("--compute-dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="dtype of the NF4 matmuls (default: fp32 for --precision fp32, else bf16)")
    p.add_argument("--seed", type=int, default=0, help="seed for initialisation and data order")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)
    return p
