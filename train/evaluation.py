"""Held-out evaluation, and what the training loop does with it: evaluate when due, keep the best model
(``Checkpointer.save_best``), stop early after ``early_stopping_patience`` evaluations without a new best."""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn

from .bookkeeping import MetricsLog, Progress, TrainState
from .config import TrainConfig
from .data import count_label_tokens
from .distributed import DistInfo, all_reduce_sum, reshard
from .step import autocast_context, model_inputs


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[dict], info: DistInfo | None = None,
             precision: str = "fp32") -> dict:
    """Held-out loss: mean NLL (nats) over all label tokens of all batches, and perplexity exp(loss).

    Under torch.distributed the batches are split round-robin over ranks and the sums all-reduced; every rank
    runs the same number of forwards (a rank short of batches repeats one and ignores it), as FSDP requires.

    Raises:
        ValueError: the batches hold no label token.
    """
    info = info or DistInfo()
    batches = list(batches)
    was_training = model.training
    model.eval()
    mine = batches[info.rank::info.world_size]
    rounds = -(-len(batches) // info.world_size) if batches else 0
    total_nll, total_tokens = 0.0, 0
    for i in range(rounds):
        batch = mine[i] if i < len(mine) else batches[0]  # the repeat keeps collectives in step; not counted
        n = count_label_tokens(batch) if i < len(mine) else 0
        with autocast_context(model, precision):
            out = model(**model_inputs(batch), num_items_in_batch=1)  # loss = sum of NLL over the batch
        if n:
            total_nll += float(out.loss)
            total_tokens += n
    total_nll, total_tokens = all_reduce_sum([total_nll, float(total_tokens)], info)
    reshard(model)  # FSDP2 leaves the root unsharded after a forward without backward
    model.train(was_training)
    if total_tokens == 0:
        raise ValueError("the evaluation data has no label tokens")
    loss = total_nll / total_tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(total_tokens)}


def evaluate_if_due(eval_fn: Callable[[], dict] | None, cfg: TrainConfig, update: int,
                    progress: Progress) -> dict | None:
    """``eval_fn()`` every ``cfg.eval_every`` updates and after the last one (logged), else None."""
    is_last = update == cfg.steps
    if eval_fn is None or not (is_last or (cfg.eval_every and update % cfg.eval_every == 0)):
        return None
    ev = eval_fn()
    progress.record_eval(update, ev)
    return ev


def track_best(state: TrainState, loss: float, cfg: TrainConfig, log: MetricsLog, save_best=None,
               model: nn.Module | None = None) -> bool:
    """Note a held-out ``loss`` in ``state``: a new best is exported with ``save_best(model, update, loss)``
    (when given); returns True when ``cfg.early_stopping_patience`` evaluations in a row brought none."""
    if state.best_loss is None or loss < state.best_loss:
        state.best_loss, state.best_update, state.evals_since_best = loss, state.update, 0
        if save_best is not None:
            save_best(model, state.update, loss)
        return False
    state.evals_since_best += 1
    if cfg.early_stopping_patience and state.evals_since_best >= cfg.early_stopping_patience:
        log.write({"type": "early_stop", "update": state.update, "best_update": state.best_update,
                   "best_loss": state.best_loss})
        return True
    return False
