"""One training run of a recipe, as ``finetune train`` does it: the data, the method's model, the loop with its
checkpoints and held-out evaluation, the result in ``out``, and the report printed on the way.

Every process of a torchrun job runs it with the same config; the main process prints and writes files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import resource
import sys
import time
from pathlib import Path

import torch

from finetune_ref.lora import format_trainable_parameters
from finetune_ref.models.config import check_context, describe_filled_defaults
from finetune_ref.models.tokenizer import Tokenizer
from finetune_ref.train.checkpointing import Checkpointer
from finetune_ref.train.checkpoint_files import LATEST_FILE, resolve_checkpoint
from finetune_ref.train.data import BatchIterator, build_datasets, iter_batches
from finetune_ref.train.distributed import DistInfo, ShardedBatches, shard_model, wrap_ddp
from finetune_ref.train.evaluation import evaluate
from finetune_ref.train.trainer import train

from .base import RunConfig

METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"


def check_run_dir(cfg: RunConfig) -> Path | None:
    """``cfg.out_dir`` must not hold another run unless it is resumed; returns the checkpoint to resume from.

    Raises:
        ValueError: ``out`` holds checkpoints or a finished run and ``resume`` is not set.
        FileNotFoundError: ``resume`` names no checkpoint.
    """
    out = cfg.out_dir
    if cfg.resume is None and (out / CHECKPOINTS_DIR / LATEST_FILE).exists():
        raise ValueError(f"{out} already holds checkpoints of a run: continue it with --resume {out}, or choose "
                         "another --out")
    if cfg.resume is None and (out / METRICS_FILE).exists():
        raise ValueError(f"{out} already holds a training run ({METRICS_FILE}); choose another --out, or delete it "
                         "to train again there")
    return resolve_checkpoint(cfg.resume) if cfg.resume else None


def run_training(cfg: RunConfig, model_dir: Path, info: DistInfo) -> dict:
    """Train ``cfg``'s method on ``model_dir`` (a Hugging Face directory) and save the result in ``cfg.out_dir``.

    Returns:
        ``train``'s result.

    Raises:
        ValueError / FileNotFoundError: bad data, model or checkpoint (see ``check_run_dir``, ``build_datasets``,
            the recipe's ``build`` and ``train``).
        TrainingInterrupted: Ctrl-C / SIGTERM; the checkpoint was written first.
    """
    say = print if info.is_main else (lambda *a, **k: None)
    out = cfg.out_dir
    resume = check_run_dir(cfg)
    cfg.base_dtype(info.world_size)  # a --dtype the method cannot train fails before any data or weight is read
    torch.manual_seed(cfg.seed)  # the same initialisation (e.g. LoRA A) on every rank
    check_context(model_dir, cfg.seq_len, f"seq_len={cfg.seq_len}")
    filled = describe_filled_defaults(model_dir)
    if filled:
        say(filled, file=sys.stderr)
    tokenizer = Tokenizer.from_dir(model_dir)
    # The data before the weights: a data error should not wait for them.
    train_examples, held = build_datasets(tokenizer, cfg.data, seq_len=cfg.seq_len, eval_fraction=cfg.eval_fraction,
                                          eval_data=cfg.eval_data, eval_tokens=cfg.eval_tokens)
    eval_batches = list(iter_batches(held, cfg.batch_size, tokenizer.pad_token_id)) if held else []
    say(f"model {model_dir} | {len(train_examples)} training sequences, {len(held)} held-out | seq_len "
        f"{cfg.seq_len}, batch {cfg.batch_size} x accum {cfg.grad_accum} x {info.world_size} process(es) | "
        f"{cfg.method}, {cfg.precision}, {cfg.optimizer}", file=sys.stderr)
    method = cfg.build(model_dir, info)
    model = method.model
    model.model.gradient_checkpointing = cfg.grad_checkpointing
    say(format_trainable_parameters(model))
    if info.enabled:
        torch.manual_seed(cfg.seed + info.rank)  # from here on (dropout), each rank its own stream
        model = shard_model(model, info, torch.bfloat16 if cfg.precision == "bf16" else None) \
            if cfg.parallel == "fsdp" else wrap_ddp(model, info)
    # Every rank draws the same global batch and keeps its rows; drop_last so it always splits evenly (and the
    # data position in a checkpoint is the same at any world size with the same global batch).
    batches = ShardedBatches(BatchIterator(train_examples, cfg.batch_size * info.world_size,
                                           tokenizer.pad_token_id, seed=cfg.seed, drop_last=True), info)
    eval_fn = (lambda: evaluate(model, eval_batches, info, cfg.precision)) if eval_batches else None
    before = None
    if resume is None and eval_fn is not None:
        before = eval_fn()
        say(f"held-out before: loss {before['loss']:.4f}, perplexity {before['perplexity']:.2f} "
            f"({before['tokens']} tokens)")
    elif resume is not None:
        say(f"resuming from {resume}")
    config_text = (model_dir / "config.json").read_bytes()
    metadata = {**method.metadata, "precision": cfg.precision, "base_model": model_dir.name,
                "base_config_sha256": hashlib.sha256(config_text).hexdigest(), "seq_len": cfg.seq_len}
    checkpointer = Checkpointer(out / CHECKPOINTS_DIR, save_every=cfg.save_every, keep_last=cfg.keep_last, info=info,
                                metadata=metadata, export_best=method.export, track_best=cfg.eval_every > 0)
    start = time.perf_counter()
    result = train(model, batches, dataclasses.replace(cfg, metrics_path=out / METRICS_FILE), eval_fn=eval_fn,
                   checkpointer=checkpointer, resume_from=resume, info=info)
    elapsed = time.perf_counter() - start
    method.export(model, out)
    _report(say, before, result, cfg, out, elapsed)
    say(f"{method.what} saved to {out}")
    return result


def _report(say, before: dict | None, result: dict, cfg: RunConfig, out: Path, elapsed: float) -> None:
    """The held-out losses after training, the best one, throughput and peak memory."""
    after = result.get("eval")
    if before and after:
        say(f"held-out after:  loss {after['loss']:.4f}, perplexity {after['perplexity']:.2f} "
            f"(change {after['loss'] - before['loss']:+.4f})")
    elif after:
        say(f"held-out after:  loss {after['loss']:.4f}, perplexity {after['perplexity']:.2f}")
    if result.get("best_update") is not None and cfg.eval_every:
        say(f"best held-out loss {result['best_loss']:.4f} at update {result['best_update']} "
            f"({out / CHECKPOINTS_DIR / 'best'}){' - stopped early' if result['stopped_early'] else ''}")
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    tokens_per_s = result.get("tokens_per_s", 0.0)
    say(f"trained {result['update']} updates in {elapsed:.0f} s ({tokens_per_s:.0f} tokens/s); peak memory "
        f"{peak_mib:.0f} MiB (max RSS of rank 0)")
