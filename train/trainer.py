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
  FSDP shards); the norm before clipping is logged. A non-finite norm stops training with an error before the
  update (the weights stay as they were).
* **AdamW** (Loshchilov & Hutter 2019) without weight decay on biases and norm weights (ndim < 2) and without
  state for frozen parameters. 16-bit trainable weights get ``optim.MasterWeightAdamW`` (fp32 master + moments).
* **Evaluation** every ``eval_every`` updates and after the last; the best held-out loss is tracked (and
  exported through the checkpointer); early stopping after ``early_stopping_patience`` evaluations without
  improvement.
* **Checkpoints** (``checkpointing.py``) every ``save_every`` updates, after the last, and on Ctrl-C / SIGTERM
  (the update in flight finishes first, then the checkpoint is written and ``TrainingInterrupted`` raised).
  Resuming gives bitwise the parameters of an uninterrupted run (same world size).
* **Precision**: "fp32"; "bf16-autocast" (fp32 weights and optimizer, ``torch.autocast`` bf16 compute);
  "bf16" (bf16 weights; fp32 master weights and moments in the optimizer, or FSDP2's fp32 shards).
* **Distributed** (``distributed.py``): same loss and gradients as one process with the global batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from .data import count_label_tokens
from .distributed import DistInfo, all_reduce_sum, any_rank, gradient_sync, local_tensor, reshard
from .schedule import WarmupCosine

PRECISIONS = ("fp32", "bf16-autocast", "bf16")


@dataclasses.dataclass
class TrainConfig:
    steps: int = 40                 # optimizer updates
    lr: float = 2e-4
    min_lr_ratio: float = 0.1       # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_accum: int = 1             # micro-batches per update (per rank)
    max_grad_norm: float | None = 1.0  # None or 0 disables clipping
    eval_every: int = 0             # updates between evaluations (0: only after the last)
    early_stopping_patience: int = 0  # stop after this many evaluations without a new best (0: never)
    precision: str = "fp32"         # one of PRECISIONS
    optimizer: str = "adamw"        # one of qlora.optimizers.OPTIMIZER_NAMES
    seed: int = 0
    metrics_path: Path | None = None
    progress: bool = True

    def validate(self) -> None:
        """Raises ValueError naming the bad field."""
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
        if self.eval_every < 0 or self.early_stopping_patience < 0:
            raise ValueError("eval_every and early_stopping_patience must be >= 0")
        if self.early_stopping_patience and not self.eval_every:
            raise ValueError("early stopping needs periodic evaluation: set eval_every > 0 "
                             "(--eval-every N) together with the patience")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        from finetune_ref.optim import OPTIMIZER_NAMES

        if self.optimizer not in OPTIMIZER_NAMES:
            raise ValueError(f"optimizer must be one of {OPTIMIZER_NAMES}, got {self.optimizer!r}")
        if self.max_grad_norm is not None and not (self.max_grad_norm >= 0 and math.isfinite(self.max_grad_norm)):
            raise ValueError(f"max_grad_norm must be a finite number >= 0 (0: off), got {self.max_grad_norm}")


@dataclasses.dataclass
class TrainState:
    """What the loop itself must remember across a resume (saved in every checkpoint, as JSON)."""

    update: int = 0                 # optimizer updates done
    tokens_seen: int = 0            # input positions processed, all ranks
    elapsed_s: float = 0.0          # training time (evaluation included), all sessions
    best_loss: float | None = None  # lowest held-out loss so far
    best_update: int | None = None
    evals_since_best: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during ``train``: the update in flight finished and ``checkpoint`` was written."""

    def __init__(self, update: int, checkpoint: Path | None):
        super().__init__(f"interrupted after update {update}" + (f"; checkpoint {checkpoint}" if checkpoint else ""))
        self.update, self.checkpoint = update, checkpoint


# ---------------------------------------------------------------------------------------------------------
# Optimizer and precision.
# ---------------------------------------------------------------------------------------------------------
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


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over ``param_groups`` (see ``optim.optimizers.build_optimizer``): for "adamw",
    ``torch.optim.AdamW`` if every trainable parameter is fp32, else ``optim.MasterWeightAdamW`` (fp32 master
    copy and moments for the 16-bit ones); the paged and 8-bit ones keep fp32 master weights too."""
    from finetune_ref.optim import build_optimizer as build_named_optimizer

    groups = param_groups(model, cfg.weight_decay)
    return build_named_optimizer(cfg.optimizer, groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def check_precision(model: nn.Module, precision: str) -> None:
    """The trainable weights must suit the precision: fp32 for "fp32" and "bf16-autocast".

    Raises:
        ValueError: e.g. bf16 trainable weights with precision "fp32".
    """
    if precision in ("fp32", "bf16-autocast"):
        wrong = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad and p.dtype != torch.float32})
        if wrong:
            raise ValueError(f"precision {precision!r} trains fp32 weights, but trainable parameters are {wrong}; "
                             "load the model in fp32 or use precision 'bf16'")


def autocast_context(model: nn.Module, precision: str):
    """``torch.autocast(bf16)`` for "bf16-autocast", else a no-op context."""
    if precision != "bf16-autocast":
        return contextlib.nullcontext()
    device = next(model.parameters()).device
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def clip_grad_norm_(params: list[torch.Tensor], max_norm: float | None, info: DistInfo | None = None) -> float:
    """Global L2 norm of all gradients, in fp32, before clipping; scales them in place to ``max_norm`` if larger.

    FSDP2 gradients (DTensors sharded on dim 0) contribute their local shards' squared norms, summed over ranks.
    Same scaling rule as ``torch.nn.utils.clip_grad_norm_``: g *= min(1, max_norm / (norm + 1e-6)).
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    sharded = any(hasattr(g, "to_local") for g in grads)
    squares = torch.stack([torch.linalg.vector_norm(local_tensor(g), dtype=torch.float32) ** 2 for g in grads])
    total_sq = squares.sum()
    if sharded and info is not None and info.enabled:
        total_sq = torch.tensor(all_reduce_sum([float(total_sq)], info)[0], dtype=torch.float32)
    norm = float(total_sq.sqrt())
    if max_norm and math.isfinite(norm):
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            for g in grads:
                local_tensor(g).mul_(coef)
    return norm


def accumulate_gradients(model: nn.Module, micro: list[dict], n_label: int, precision: str,
                         info: DistInfo) -> float:
    """Forward and backward every micro-batch of one update; returns this rank's share of the update's loss.

    Each micro-batch's loss is its token-summed NLL / ``n_label`` (the label tokens of the whole update, all
    ranks), so the accumulated gradient is that of the update's token-mean loss. Gradients are communicated
    (DDP all-reduce / FSDP reduce-scatter) only in the last micro-batch's backward.
    """
    loss_sum = torch.zeros((), dtype=torch.float64)
    for i, batch in enumerate(micro):
        if not info.enabled and count_label_tokens(batch) == 0:
            continue  # nothing to learn from; under DDP/FSDP every rank must still run it (collectives)
        with gradient_sync(model, i == len(micro) - 1):
            with autocast_context(model, precision):  # the forward only, as torch.autocast advises
                out = model(**model_inputs(batch), num_items_in_batch=n_label)
            # DDP/FSDP average gradients over ranks; the world_size factor turns that into the sum.
            (out.loss * info.world_size).backward()
        loss_sum += out.loss.detach().double()
    return float(loss_sum)


# ---------------------------------------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------------------------------------
def model_inputs(batch: dict) -> dict:
    keys = ("input_ids", "attention_mask", "position_ids", "document_ids", "labels")
    return {k: batch[k] for k in keys if k in batch}


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


class _StopSignal:
    """While active, SIGINT/SIGTERM set a flag instead of raising; a second Ctrl-C raises at once."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False
        self._previous: dict = {}

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: give up on the clean stop
        self.requested = True

    def __enter__(self):
        if self.enabled:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


# ---------------------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------------------
def train(model: nn.Module, batches: Iterator[dict], cfg: TrainConfig,
          eval_fn: Callable[[], dict] | None = None,
          optimizer: torch.optim.Optimizer | None = None,
          on_update: Callable[[int, dict], None] | None = None,
          checkpointer=None, resume_from: str | Path | None = None,
          info: DistInfo | None = None) -> dict:
    """Run optimizer updates until ``cfg.steps`` (or early stopping).

    Args:
        model: plain, DDP-wrapped or FSDP2-sharded; returns an object with ``.loss`` from
            ``model(**batch, num_items_in_batch=N)`` (loss = token-summed NLL / N).
        batches: endless iterator of this rank's micro-batches, dicts of (B, T) tensors (input_ids, labels,
            optional attention_mask, position_ids, document_ids). For checkpoints it needs
            ``state_dict``/``load_state_dict`` (``BatchIterator``, ``ShardedBatches``).
        eval_fn: returns a dict with "loss"; called every ``cfg.eval_every`` updates and after the last.
        optimizer: default ``build_optimizer(model, cfg)``.
        on_update: called after each update with (update number, its metrics).
        checkpointer: a ``finetune.checkpointing.Checkpointer`` (periodic, final, Ctrl-C and best checkpoints).
        resume_from: a checkpoint (or checkpoint root) to continue from; needs ``checkpointer``'s metadata.
        info: ``DistInfo`` of this process (default: single process).

    Returns:
        The last update's metrics, plus "eval" (last evaluation), "best_loss"/"best_update",
        "stopped_early", "checkpoint" (last one written) and "state" (``TrainState`` as a dict).

    Raises:
        ValueError: bad config, or a checkpoint that does not match (see ``checkpointing.load_checkpoint``).
        FloatingPointError: a non-finite gradient norm (the update is not applied).
        TrainingInterrupted: Ctrl-C or SIGTERM; a checkpoint was written first when ``checkpointer`` is set.
    """
    cfg.validate()
    info = info or DistInfo()
    check_precision(model, cfg.precision)
    log = MetricsLog(cfg.metrics_path if info.is_main else None)
    if optimizer is None:
        optimizer = build_optimizer(model, cfg)
    scheduler = WarmupCosine(optimizer, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.lr * cfg.min_lr_ratio)
    state = TrainState()
    if resume_from is not None:
        if checkpointer is None:
            raise ValueError("resume_from needs a checkpointer (it holds the metadata the checkpoint must match)")
        state = TrainState.from_dict(checkpointer.load(resume_from, model, optimizer, scheduler, batches))
        log.write({"type": "resume", "update": state.update, "checkpoint": str(resume_from)})
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    model.train()
    bar = _progress_bar(cfg, state.update) if info.is_main else None
    session_start, elapsed_before = time.perf_counter(), state.elapsed_s
    result: dict = {"update": state.update, "stopped_early": False}
    stopped_early = False
    with _StopSignal(enabled=checkpointer is not None) as stop:
        for update in range(state.update, cfg.steps):
            micro = [next(batches) for _ in range(cfg.grad_accum)]
            n_label = int(all_reduce_sum([sum(count_label_tokens(b) for b in micro)], info)[0])
            lr = scheduler.current_lr()
            loss_sum = accumulate_gradients(model, micro, n_label, cfg.precision, info) if n_label > 0 else 0.0
            grad_norm = clip_grad_norm_(trainable, cfg.max_grad_norm, info)
            if not math.isfinite(grad_norm):
                raise FloatingPointError(f"gradient norm is {grad_norm} at update {update + 1}; the update was not "
                                         "applied. Lower the learning rate, or use fp32/bf16-autocast")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            local_tokens = sum(int(b["input_ids"].numel()) for b in micro)
            loss_total, tokens = all_reduce_sum([loss_sum, float(local_tokens)], info)
            state.update = update + 1
            state.tokens_seen += int(tokens)
            state.elapsed_s = elapsed_before + time.perf_counter() - session_start
            result = {"update": state.update, "loss": loss_total if n_label else None, "lr": lr,
                      "grad_norm": grad_norm, "label_tokens": n_label,
                      "tokens_per_s": state.tokens_seen / max(state.elapsed_s, 1e-9), "elapsed_s": state.elapsed_s}
            log.write({"type": "train", **result})
            if bar is not None:
                bar.set_postfix(loss=f"{loss_total:.4f}", lr=f"{lr:.2e}", tok_s=f"{result['tokens_per_s']:.0f}")
                bar.update(1)
            is_last = state.update == cfg.steps
            if eval_fn is not None and (is_last or (cfg.eval_every and state.update % cfg.eval_every == 0)):
                ev = eval_fn()
                result["eval"] = ev
                log.write({"type": "eval", "update": state.update, **ev})
                if bar is not None:
                    bar.write(f"update {state.update}: held-out loss {ev['loss']:.4f} "
                              f"(perplexity {ev['perplexity']:.2f})")
                if state.best_loss is None or ev["loss"] < state.best_loss:
                    state.best_loss, state.best_update, state.evals_since_best = ev["loss"], state.update, 0
                    if checkpointer is not None and checkpointer.track_best:
                        checkpointer.save_best(model, state.update, ev["loss"])
                else:
                    state.evals_since_best += 1
                    if cfg.early_stopping_patience and state.evals_since_best >= cfg.early_stopping_patience:
                        stopped_early = True
                        log.write({"type": "early_stop", "update": state.update, "best_update": state.best_update,
                                   "best_loss": state.best_loss})
            if on_update is not None:
                on_update(state.update, result)
            interrupted = any_rank(stop.requested, info)
            if checkpointer is not None and (interrupted or checkpointer.due(state.update)
                                             or ((is_last or stopped_early) and checkpointer.save_every)):
                checkpointer.save(model, optimizer, scheduler, batches, dataclasses.asdict(state))
            if interrupted:
                if bar is not None:
                    bar.close()
                raise TrainingInterrupted(state.update, checkpointer.last_saved if checkpointer else None)
            if stopped_early:
                break
    if bar is not None:
        bar.close()
    model.eval()
    result.update({"best_loss": state.best_loss, "best_update": state.best_update, "stopped_early": stopped_early,
                   "checkpoint": str(checkpointer.last_saved) if checkpointer and checkpointer.last_saved else None,
                   "state": dataclasses.asdict(state)})
    return result


def _progress_bar(cfg: TrainConfig, initial: int):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, initial=initial, desc="train", unit="update", dynamic_ncols=True)
