"""The training loop shared by full fine-tuning, LoRA and QLoRA.

Guarantees (each has a test in tests/test_trainer.py, test_checkpointing.py or test_distributed.py):

* **Token-normalised accumulation.** One optimizer update = ``grad_accum`` micro-batches (on each of
  ``world_size`` ranks). Its loss is

      sum over the update's label tokens of -log p(token)  /  (number of label tokens in the whole update)

  so k micro-batches of one sequence give the loss and gradients of one batch of k, whatever their lengths and
  padding (averaging per-micro-batch means would weight a short sequence's tokens more). A micro-batch whose
  labels are all -100 adds zero loss and zero gradient, never NaN; an update without any label token steps
  nothing but the schedule.
* **Schedule** (``schedule.py``): linear warmup then cosine to ``lr * min_lr_ratio``; the first update has
  LR > 0; the scheduler advances once per optimizer update, never per micro-batch.
* **Clipping** by the global L2 norm of all gradients (Pascanu et al. 2013), computed in fp32 (also across
  FSDP shards); the norm before clipping is logged. A non-finite loss or norm stops training with an error
  naming the update, before it is applied (the weights stay as they were).
* **AdamW** (Loshchilov & Hutter 2019) without weight decay on biases and norm weights (ndim < 2) and without
  state for frozen parameters. 16-bit trainable weights get ``optim.MasterWeightAdamW`` (fp32 master + moments).
* **Evaluation** every ``eval_every`` updates and after the last; the best held-out loss is tracked (and
  exported through the checkpointer); early stopping after ``early_stopping_patience`` evaluations without
  improvement.
* **Checkpoints** (``checkpointing.py``) every ``save_every`` updates, after the last, and on Ctrl-C / SIGTERM
  (the update in flight finishes first, then the checkpoint is written and ``TrainingInterrupted`` raised).
  Resuming gives bitwise the parameters of an uninterrupted run (same world size), and the metrics log keeps
  each update once (lines past the checkpoint are dropped; a "resume" line marks the session). If writing the
  result (``finish``) fails, the trained state is kept in a checkpoint of the last update first.
* **Precision**: "fp32"; "bf16-autocast" (fp32 weights and optimizer, ``torch.autocast`` bf16 compute);
  "bf16" (bf16 weights; fp32 master weights and moments in the optimizer, or FSDP2's fp32 shards).
* **Distributed** (``distributed.py``): same loss and gradients as one process with the global batch.

This file is the loop; each side concern is one call into its own file: the settings (``config.py``), the parts
of an update (``step.py``), evaluation, the best model and early stopping (``evaluation.py``), the metrics log,
progress bar and interrupts (``bookkeeping.py``), checkpoints (``checkpointing.py``).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from .bookkeeping import MetricsLog, Progress, ResultNotSaved, StopSignal, TrainingInterrupted, TrainState
from .checkpoint_files import checkpoint_name
from .config import TrainConfig
from .distributed import DistInfo, any_rank
from .evaluation import evaluate_if_due, track_best
from .schedule import WarmupCosine
from .step import (accumulate_gradients, check_finite, check_precision, clip_grad_norm_, optimizer_for,
                   update_label_tokens)

__all__ = ["train"]


def train(model: nn.Module, batches: Iterator[dict], cfg: TrainConfig,
          eval_fn: Callable[[], dict] | None = None,
          optimizer: torch.optim.Optimizer | None = None,
          on_update: Callable[[int, dict], None] | None = None,
          checkpointer=None, resume_from: str | Path | None = None,
          info: DistInfo | None = None, finish: Callable[[nn.Module], object] | None = None,
          eval_before: dict | None = None) -> dict:
    """Run optimizer updates until ``cfg.steps`` (or early stopping).

    Args:
        model: plain, DDP-wrapped or FSDP2-sharded; returns an object with ``.loss`` from
            ``model(**batch, num_items_in_batch=N)`` (loss = token-summed NLL / N).
        batches: endless iterator of this rank's micro-batches, dicts of (B, T) tensors (input_ids, labels,
            optional attention_mask, position_ids, document_ids). For checkpoints it needs
            ``state_dict``/``load_state_dict`` (``BatchIterator``, ``ShardedBatches``).
        cfg: the loop's settings (a recipe's config is one).
        eval_fn: returns a dict with "loss"; called every ``cfg.eval_every`` updates and after the last.
        optimizer: default ``optimizer_for(model, cfg)``.
        on_update: called after each update with (update number, its metrics).
        checkpointer: a ``train.checkpointing.Checkpointer`` (periodic, final, Ctrl-C and best checkpoints).
        resume_from: a checkpoint (or checkpoint root) to continue from; needs ``checkpointer``'s metadata.
        info: ``DistInfo`` of this process (default: single process).
        finish: writes the result (e.g. the adapter) after the last update; called on every rank. If it fails
            with an OSError (full disk, read-only directory), the trained state is kept in a checkpoint first.
        eval_before: the held-out result before training, logged as the evaluation of update 0 (a fresh run).

    Returns:
        The last update's metrics, plus "eval" (last evaluation), "best_loss"/"best_update",
        "stopped_early", "checkpoint" (last one written) and "state" (``TrainState`` as a dict).

    Raises:
        ValueError: trainable weights that do not suit ``cfg.precision``, or a checkpoint that does not match
            (see ``checkpointing.load_checkpoint``).
        FloatingPointError: a non-finite loss or gradient norm (the update is not applied).
        TrainingInterrupted: Ctrl-C or SIGTERM; a checkpoint was written first when ``checkpointer`` is set.
        ResultNotSaved: ``finish`` failed; it names the checkpoint that holds the trained state.
    """
    info = info or DistInfo()
    check_precision(model, cfg.precision)
    log = MetricsLog(cfg.metrics_path if info.is_main else None, cfg.log, cfg)
    optimizer = optimizer if optimizer is not None else optimizer_for(model, cfg)
    scheduler = WarmupCosine(optimizer, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.lr * cfg.min_lr_ratio)
    state = _resume(resume_from, checkpointer, model, optimizer, scheduler, batches, log)
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    save_best = checkpointer.save_best if checkpointer is not None and checkpointer.track_best else None
    model.train()
    result: dict = {"update": state.update, "stopped_early": False}
    stopped_early = False
    with StopSignal(enabled=checkpointer is not None) as stop, Progress(cfg, state, log, info) as progress:
        if eval_before is not None and state.update == 0:
            progress.record_eval(0, eval_before, echo=False)  # the curves start where training did
        while state.update < cfg.steps and not stopped_early:
            # One update is grad_accum micro-batches on every rank; its loss is normalised by the label
            # tokens of all of them, so accumulation gives the gradient of one big batch.
            micro = [next(batches) for _ in range(cfg.grad_accum)]
            n_label = update_label_tokens(micro, info)
            lr = scheduler.current_lr()  # this update's rate (logged), before the scheduler moves on
            # Without a label token there is no gradient: such an update steps only the schedule.
            loss_sum = accumulate_gradients(model, micro, n_label, cfg.precision, info) if n_label else 0.0
            # Clip by the global norm (the norm before clipping is logged); a non-finite one stops here,
            # before the weights change.
            grad_norm = clip_grad_norm_(trainable, cfg.max_grad_norm, info)
            check_finite(grad_norm, state.update + 1, loss_sum, info)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)  # free the gradients before the next forward
            scheduler.step()  # once per update, never per micro-batch
            result = progress.record_update(state, micro, loss_sum, n_label, lr, grad_norm)
            # Evaluation when due; a new best is exported; patience runs out -> stop after this update.
            ev = evaluate_if_due(eval_fn, cfg, state.update, progress)
            if ev is not None:
                result["eval"] = ev
                stopped_early = track_best(state, ev["loss"], cfg, log, save_best, model)
            if on_update is not None:
                on_update(state.update, result)
            # Ctrl-C / SIGTERM on any rank: every rank checkpoints together (collectives), then stops.
            interrupted = any_rank(stop.requested, info)
            _checkpoint_if_due(checkpointer, state, interrupted, state.update == cfg.steps or stopped_early,
                               model, optimizer, scheduler, batches)
            if interrupted:
                raise TrainingInterrupted(state.update, checkpointer.last_saved if checkpointer else None)
    model.eval()
    if finish is not None:
        _finish(finish, model, checkpointer, state, optimizer, scheduler, batches)
    result.update({"best_loss": state.best_loss, "best_update": state.best_update, "stopped_early": stopped_early,
                   "checkpoint": str(checkpointer.last_saved) if checkpointer and checkpointer.last_saved else None,
                   "state": dataclasses.asdict(state)})
    return result


def _resume(resume_from, checkpointer, model, optimizer, scheduler, batches, log: MetricsLog) -> TrainState:
    """A fresh ``TrainState``, or the one of the checkpoint ``resume_from`` (which restores everything else)."""
    if resume_from is None:
        return TrainState()
    if checkpointer is None:
        raise ValueError("resume_from needs a checkpointer (it holds the metadata the checkpoint must match)")
    loaded = checkpointer.load(resume_from, model, optimizer, scheduler, batches)
    state = TrainState.from_dict(loaded)
    # Updates logged after this checkpoint (before a crash) are logged again by this session: each update once.
    dropped = log.truncate_after(state.update)
    log.write({"type": "resume", "update": state.update, "checkpoint": loaded["path"], "dropped_lines": dropped,
               "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return state


def _finish(finish, model, checkpointer, state: TrainState, optimizer, scheduler, batches) -> None:
    """``finish(model)``; if it cannot write, keep the trained state in a checkpoint of this update (the last
    one written, else a new one: in the checkpoint root, or failing that in a fresh temporary directory)."""
    try:
        finish(model)
    except OSError as err:
        kept = None
        if checkpointer is not None:
            last = checkpointer.last_saved
            if last is not None and last.name == checkpoint_name(state.update):
                kept = last
            else:
                try:
                    kept = checkpointer.save_anywhere(model, optimizer, scheduler, batches, dataclasses.asdict(state))
                except OSError:
                    kept = None
        raise ResultNotSaved(state.update, kept, err) from err


def _checkpoint_if_due(checkpointer, state: TrainState, interrupted: bool, finished: bool, model, optimizer,
                       scheduler, batches) -> None:
    """A checkpoint every ``save_every`` updates, after the last one (when ``save_every`` or ``save_final`` is
    set) and on an interrupt."""
    if checkpointer is None:
        return
    if interrupted or checkpointer.due(state.update) or (finished and checkpointer.save_every):
        checkpointer.save(model, optimizer, scheduler, batches, dataclasses.asdict(state))
    elif finished and checkpointer.save_final:
        # Only so the run can be extended later: where it cannot be written (full disk), the result is still
        # written, and if that fails too ``_finish`` keeps the state in a checkpoint elsewhere.
        try:
            checkpointer.save(model, optimizer, scheduler, batches, dataclasses.asdict(state))
        except OSError as err:
            warnings.warn(f"could not write the final checkpoint into {checkpointer.root} ({err}); the run's result "
                          "is still written, but the run cannot be extended with --extend", stacklevel=2)
