"""The training loop shared by full fine-tuning, LoRA and QLoRA.

One optimizer update = ``grad_accum`` micro-batches. The loss of the update is

    sum over the update's label tokens of -log p(token)  /  (number of label tokens in the whole update)

so k micro-batches of one sequence give exactly the loss and gradients of one batch of k, whatever their
lengths and padding. (Averaging per-micro-batch means instead would weight a short sequence's tokens more than
a long one's.) A micro-batch whose labels are all -100 contributes zero loss and zero gradient, never NaN.

Then: gradient clipping by global L2 norm (Pascanu et al. 2013), AdamW (Loshchilov & Hutter 2019) without
weight decay on biases, norms and embeddings-free 1-D parameters, and the warmup-cosine schedule of
``schedule.py``, advanced once per update.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from .data import count_label_tokens
from .schedule import WarmupCosine


@dataclasses.dataclass
class TrainConfig:
    steps: int = 40                 # optimizer updates
    lr: float = 2e-4
    min_lr_ratio: float = 0.1       # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0  # None or 0 disables clipping
    eval_every: int = 0             # updates between evaluations (0: only before and after)
    seed: int = 0
    metrics_path: Path | None = None
    progress: bool = True

    def validate(self) -> None:
        if self.steps <= 0:
            raise ValueError(f"steps must be positive, got {self.steps}")
        if self.grad_accum <= 0:
            raise ValueError(f"grad_accum must be positive, got {self.grad_accum}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps}")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into decayed (matrices) and not decayed (biases, norm weights: ndim < 2).

    Frozen parameters (requires_grad False) are left out entirely, so the optimizer holds no state for them.
    Tied parameters appear once (``named_parameters`` de-duplicates them).
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (all requires_grad=False)")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def model_inputs(batch: dict) -> dict:
    keys = ("input_ids", "attention_mask", "position_ids", "document_ids", "labels")
    return {k: batch[k] for k in keys if k in batch}


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[dict]) -> dict:
    """Held-out loss: mean NLL (nats) over all label tokens of all batches, and perplexity exp(loss)."""
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    for batch in batches:
        n = count_label_tokens(batch)
        if n == 0:
            continue
        out = model(**model_inputs(batch), num_items_in_batch=1)  # loss = sum of NLL over the batch's tokens
        total_nll += float(out.loss)
        total_tokens += n
    model.train(was_training)
    if total_tokens == 0:
        raise ValueError("the evaluation data has no label tokens")
    loss = total_nll / total_tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": total_tokens}


class MetricsLog:
    """Appends one JSON object per line; each line is flushed so a crash loses nothing already logged."""

    def __init__(self, path: Path | None):
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def train(model: nn.Module, batches: Iterator[dict], cfg: TrainConfig,
          eval_fn: Callable[[], dict] | None = None,
          optimizer: torch.optim.Optimizer | None = None,
          on_update: Callable[[int, dict], None] | None = None) -> dict:
    """Run ``cfg.steps`` optimizer updates.

    Args:
        model: returns an object with ``.loss`` from ``model(**batch, num_items_in_batch=N)``.
        batches: an endless iterator of batch dicts (input_ids, labels, optional attention_mask, position_ids,
            document_ids), each (B, T).
        eval_fn: returns a dict with "loss"; called every ``cfg.eval_every`` updates and after the last.
        optimizer: default AdamW over ``param_groups(model, cfg.weight_decay)``.
        on_update: called after each update with (update number, its metrics).

    Returns:
        the last training metrics and the last evaluation (key "eval").
    """
    cfg.validate()
    log = MetricsLog(cfg.metrics_path)
    if optimizer is None:
        optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    scheduler = WarmupCosine(optimizer, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.lr * cfg.min_lr_ratio)
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    model.train()
    bar = _progress_bar(cfg)
    start, tokens_seen, result = time.perf_counter(), 0, {}
    for update in range(cfg.steps):
        micro = [next(batches) for _ in range(cfg.grad_accum)]
        n_label = sum(count_label_tokens(b) for b in micro)
        lr = scheduler.current_lr()
        loss_sum = 0.0
        for batch in micro:
            if count_label_tokens(batch) == 0:
                continue  # nothing to learn from, and nothing to add: skipping avoids 0/0
            out = model(**model_inputs(batch), num_items_in_batch=n_label)
            out.loss.backward()
            loss_sum += out.loss.item()
        grad_norm = _clip(trainable, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        tokens_seen += sum(int(b["input_ids"].numel()) for b in micro)
        elapsed = time.perf_counter() - start
        result = {"update": update + 1, "loss": loss_sum if n_label else float("nan"), "lr": lr,
                  "grad_norm": grad_norm, "label_tokens": n_label, "tokens_per_s": tokens_seen / elapsed,
                  "elapsed_s": elapsed}
        log.write({"type": "train", **result})
        if bar is not None:
            bar.set_postfix(loss=f"{result['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{result['tokens_per_s']:.0f}")
            bar.update(1)
        is_last = update + 1 == cfg.steps
        if eval_fn is not None and (is_last or (cfg.eval_every and (update + 1) % cfg.eval_every == 0)):
            ev = eval_fn()
            result["eval"] = ev
            log.write({"type": "eval", "update": update + 1, **ev})
            if bar is not None:
                bar.write(f"update {update + 1}: held-out loss {ev['loss']:.4f} (perplexity {ev['perplexity']:.2f})")
        if on_update is not None:
            on_update(update + 1, result)
    if bar is not None:
        bar.close()
    model.eval()
    return result


def _clip(params: list[torch.Tensor], max_norm: float | None) -> float:
    """Global L2 norm of all gradients (before clipping); clips in place when ``max_norm`` is set."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if max_norm:
        return float(torch.nn.utils.clip_grad_norm_(grads, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in grads])))


def _progress_bar(cfg: TrainConfig):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, desc="train", unit="update", dynamic_ncols=True)
