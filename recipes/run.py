"""One training run of a recipe, as ``finetune train`` does it: the data, the method's model, the loop with its
checkpoints and held-out evaluation, the result in ``out``, and the report printed on the way.

Every process of a torchrun job runs it with the same config; the main process prints and writes files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from finetune_ref.lora import format_trainable_parameters
from finetune_ref.models.checkpoint import atomic_write_text
from finetune_ref.models.config import check_context, describe_filled_defaults
from finetune_ref.models.tokenizer import Tokenizer
from finetune_ref.train.checkpointing import Checkpointer
from finetune_ref.models.output_dir import publish_files
from finetune_ref.train.checkpoint_files import LATEST_FILE, read_checkpoint_record, resolve_checkpoint
from finetune_ref.train.data import BatchIterator, build_datasets, iter_batches
from finetune_ref.train.distributed import DistInfo, ShardedBatches, wrap_ddp
from finetune_ref.train.fsdp import shard_model
from finetune_ref.train.evaluation import evaluate
from finetune_ref.train.bookkeeping import METRICS_FILE, MIB, ResultNotSaved, peak_memory
from finetune_ref.train.loggers import check_loggers
from finetune_ref.train.plots import check_matplotlib, plot_runs, read_curves
from finetune_ref.train.trainer import train

from .base import RunConfig
from .run_record import (CHECKPOINTS_DIR, RUN_FILE, check_not_behind_result, check_resume, fingerprint, holds_run,
                         new_record, read_run_record, run_dir_of, write_run_record)

PLOT_FILE = "loss.png"  # --plot


def check_run_dir(cfg: RunConfig) -> tuple[Path | None, dict | None, Path | None]:
    """``cfg.out_dir`` must not hold another run unless it is resumed. Returns the checkpoint to resume from,
    the record of the run it belongs to and that run's directory (Nones for a new run).

    Raises:
        ValueError: ``out`` holds a run and ``resume`` is not set; a corrupt run record; a resume that would go
            back past the run's finished result (``run_record.check_not_behind_result``).
        FileNotFoundError: ``resume`` names no checkpoint.
    """
    out = cfg.out_dir
    if cfg.resume is None:
        if (out / CHECKPOINTS_DIR / LATEST_FILE).exists():
            raise ValueError(f"{out} already holds checkpoints of a run: continue it with --resume {out}, or "
                             "choose another --out")
        if holds_run(out):
            raise ValueError(f"{out} already holds a training run ({METRICS_FILE}); choose another --out, or add "
                             "--overwrite to train again there")
        return None, None, None
    ckpt = resolve_checkpoint(cfg.resume)
    run_dir = run_dir_of(cfg.resume)
    record = read_run_record(run_dir) if run_dir is not None else None
    check_not_behind_result(record, cfg.resume, ckpt, read_checkpoint_record(ckpt, verify=False)["update"], run_dir,
                            out)
    return ckpt, record, run_dir


def run_training(cfg: RunConfig, model_dir: Path, info: DistInfo, *, extend: bool = False,
                 flag: Callable[[str], str] | None = None, command: str | None = None,
                 files: dict[str, str] | None = None) -> dict:
    """Train ``cfg``'s method on ``model_dir`` (a Hugging Face directory) and save the result in ``cfg.out_dir``,
    with the run's record (``run_record.py``) and metrics, and the curves in ``loss.png`` when ``cfg.plot``.

    Args:
        extend: a resumed run may train to more ``steps`` than recorded.
        flag: the command-line flag of a config field, for messages (default ``--field-name``).
        command: the command line, kept in the run record.
        files: name -> text written into ``out`` beside the run record (the CLI's resolved train_config.yaml).

    Returns:
        ``train``'s result.

    Raises:
        ValueError / FileNotFoundError: bad data, model or checkpoint, or a resume whose settings, data or base
            differ from the recorded ones (all listed; see ``check_run_dir``, ``run_record.check_resume``).
        TrainingInterrupted: Ctrl-C / SIGTERM; the checkpoint was written first.
        ResultNotSaved: the result could not be written; a checkpoint keeps the trained state.
    """
    say = print if info.is_main else (lambda *a, **k: None)
    out = cfg.out_dir
    resume, record, run_dir = check_run_dir(cfg)
    # What the method, the loggers or the plot cannot do fails before any data or weight is read.
    cfg.base_dtype(info.world_size)
    check_loggers(cfg.log)
    if cfg.plot:
        check_matplotlib()
    torch.manual_seed(cfg.seed)  # the same initialisation (e.g. LoRA A) on every rank
    flag = flag or (lambda name: "--" + name.replace("_", "-"))
    check_context(model_dir, cfg.seq_len, f"seq_len={cfg.seq_len}")
    cfg.check_shapes(model_dir, flag)
    cfg.check_data_paths(flag)
    filled = describe_filled_defaults(model_dir)
    if filled:
        say(filled, file=sys.stderr)
    tokenizer = Tokenizer.from_dir(model_dir)
    # The data before the weights: a data error should not wait for them.
    train_examples, held = build_datasets(tokenizer, cfg.data, seq_len=cfg.seq_len, eval_fraction=cfg.eval_fraction,
                                          eval_data=cfg.eval_data, eval_tokens=cfg.eval_tokens)
    now = fingerprint(model_dir, train_examples, held, info.world_size)
    if record is not None:  # every difference from the recorded run at once, before the weights load
        check_resume(record, cfg, now, run_dir, flag, extend)
    eval_batches = list(iter_batches(held, cfg.batch_size, tokenizer.pad_token_id)) if held else []
    say(f"model {model_dir} | {len(train_examples)} training sequences, {len(held)} held-out | seq_len "
        f"{cfg.seq_len}, batch {cfg.batch_size} x accum {cfg.grad_accum} x {info.world_size} process(es) | "
        f"{cfg.method}, {cfg.precision}, {cfg.optimizer} | {torch.get_num_threads()} torch thread(s)", file=sys.stderr)
    method = cfg.build(model_dir, info)
    model = method.model
    cfg.configure_model(model)
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
    at = read_checkpoint_record(resume, verify=False)["update"] if resume is not None else 0
    if resume is not None:
        say(f"resuming from {resume}" + (": the last update of the run; writing its result" if at >= cfg.steps
                                         else ""))
    run = _start_record(cfg, now, command, record, run_dir, resume, extend) if info.is_main else None
    if info.is_main:
        for name, text in (files or {}).items():
            atomic_write_text(out / name, text)
    config_text = (model_dir / "config.json").read_bytes()
    metadata = {**method.metadata, "precision": cfg.precision, "base_model": model_dir.name,
                "base_config_sha256": hashlib.sha256(config_text).hexdigest(), "seq_len": cfg.seq_len}
    # An adapter run always ends with a checkpoint (3x the adapter: it and its AdamW moments), so it can be
    # extended; full fine-tuning's would be a copy of the model and two moments, so only with --save-every.
    checkpointer = Checkpointer(out / CHECKPOINTS_DIR, save_every=cfg.save_every, keep_last=cfg.keep_last, info=info,
                                metadata=metadata, export_best=method.export, track_best=cfg.eval_every > 0,
                                extend=extend, save_final=cfg.method != "full")
    start = time.perf_counter()
    try:
        result = train(model, batches, dataclasses.replace(cfg, metrics_path=out / METRICS_FILE), eval_fn=eval_fn,
                       checkpointer=checkpointer, resume_from=resume, info=info, eval_before=before,
                       finish=lambda m: _write_result(method, m, out, info))
    except ResultNotSaved as err:  # a checkpoint outside ``out`` (no room there) gets the run's record too
        kept = Path(err.checkpoint).parent.parent if err.checkpoint is not None else out
        if info.is_main and kept.resolve() != out.resolve():
            shutil.copyfile(out / RUN_FILE, kept / RUN_FILE)
        raise
    elapsed = time.perf_counter() - start
    if run is not None:
        run["finished"] = {"update": result["update"], "stopped_early": result["stopped_early"]}
        write_run_record(out, run)
    _report(say, before, result, cfg, out, elapsed, at)
    say(f"{method.what} saved to {out}")
    if cfg.plot and info.is_main:
        say(f"curves plotted in {plot_runs([read_curves(out)], out / PLOT_FILE)}")
    return result


def _start_record(cfg: RunConfig, now: dict, command, record, run_dir, resume, extend: bool) -> dict:
    """Write the run record into ``out`` (the recorded one, extended if asked, for a run resumed in place); a run
    continued from another run's checkpoint gets that run's metrics up to the checkpoint."""
    out = cfg.out_dir
    run = new_record(cfg, now, command)
    in_place = record is not None and run_dir is not None and run_dir.resolve() == out.resolve()
    if in_place:
        run["command"], run["extended"] = record.get("command"), list(record.get("extended", []))
    if extend and record is not None and cfg.steps != record["config"]["steps"]:
        run["extended"].append({"steps": [record["config"]["steps"], cfg.steps],
                                "at_update": read_checkpoint_record(resume, verify=False)["update"]})
    out.mkdir(parents=True, exist_ok=True)
    if resume is not None and not in_place and run_dir is not None and (run_dir / METRICS_FILE).is_file():
        shutil.copyfile(run_dir / METRICS_FILE, out / METRICS_FILE)  # the trainer drops what comes after
        run["continued_from"] = str(Path(resume).resolve())
    write_run_record(out, run)
    return run


def _write_result(method, model, out: Path, info: DistInfo) -> None:
    """``method.export`` into ``out/.result.tmp``, then each file renamed into ``out`` (a failed write leaves no
    half result under the final names). Collective."""
    tmp = out / ".result.tmp"
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    try:
        method.export(model, tmp)
        if info.is_main:
            publish_files(tmp, out)
    finally:
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)


def _report(say, before: dict | None, result: dict, cfg: RunConfig, out: Path, elapsed: float, start: int) -> None:
    """The held-out losses after training, the best one, throughput and peak memory; ``start``: the update this
    session resumed from (0 for a fresh run)."""
    after = result.get("eval")
    if before and after:
        say(f"held-out after:  loss {after['loss']:.4f}, perplexity {after['perplexity']:.2f} "
            f"(change {after['loss'] - before['loss']:+.4f})")
    elif after:
        say(f"held-out after:  loss {after['loss']:.4f}, perplexity {after['perplexity']:.2f}")
    if result.get("best_update") is not None and cfg.eval_every:
        say(f"best held-out loss {result['best_loss']:.4f} at update {result['best_update']} "
            f"({out / CHECKPOINTS_DIR / 'best'}){' - stopped early' if result['stopped_early'] else ''}")
    peak, what = peak_memory()
    tokens_per_s = result.get("tokens_per_s", 0.0)
    end = result["update"]
    updates = f"{end} update{'s' if end != 1 else ''}"
    what = (updates if start == 0 else f"updates {start + 1}-{end} ({end - start} in this session)"
            if end > start else f"no update (the run had reached update {end})")
    say(f"trained {what} in {elapsed:.0f} s ({tokens_per_s:.0f} tokens/s); peak memory "
        f"{peak / MIB:.0f} MiB ({what} of rank 0)")
