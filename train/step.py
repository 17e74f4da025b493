"""The parts of one optimizer update: the optimizer's parameter groups, the precision, gradient accumulation
normalised by label tokens, and clipping by the global norm (see ``trainer.py`` for the guarantees)."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from finetune_ref.lora.loraplus import loraplus_param_groups
from finetune_ref.optim import build_optimizer

from .config import TrainConfig
from .data import count_label_tokens
from .distributed import DistInfo, all_reduce_sum, any_rank, gradient_sync, local_tensor

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "document_ids", "labels")


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


def optimizer_for(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over ``param_groups`` (see ``optim.build_optimizer``): for "adamw",
    ``torch.optim.AdamW`` if every trainable parameter is fp32, else ``MasterWeightAdamW`` (fp32 master
    copy and moments for the 16-bit ones); the paged and 8-bit ones keep fp32 master weights too. With
    ``cfg.loraplus_lr_ratio`` the groups are LoRA+'s (``lora.loraplus.loraplus_param_groups``); with
    ``cfg.fused_adamw``, torch's fused AdamW kernel for fp32 parameters."""
    if cfg.loraplus_lr_ratio is not None:
        groups = loraplus_param_groups(model, cfg.loraplus_lr_ratio, cfg.weight_decay)
    else:
        groups = param_groups(model, cfg.weight_decay)
    extra = {"fused": True} if cfg.fused_adamw else {}
    return build_optimizer(cfg.optimizer, groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **extra)


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


def model_inputs(batch: dict) -> dict:
    """The keys of a batch the model takes (``data.collate`` makes them)."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


# ---------------------------------------------------------------------------------------------------------
# Gradients of one update.
# ---------------------------------------------------------------------------------------------------------
def update_label_tokens(micro: list[dict], info: DistInfo) -> int:
    """The label tokens of one whole update: all its micro-batches on all ranks (the loss's denominator)."""
    return int(all_reduce_sum([sum(count_label_tokens(b) for b in micro)], info)[0])


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


def check_finite(grad_norm: float, update: int, loss: float | None = None,
                 info: DistInfo | None = None) -> None:
    """Raises FloatingPointError, naming the update, for a non-finite loss (on any rank) or gradient norm, before
    the update is applied: the weights stay as they were and training stops (never a "loss nan" that exits 0).
    Under torch.distributed every rank takes the same decision (the norm is global, the loss flag all-reduced)."""
    bad_loss = loss is not None and not math.isfinite(loss)
    if info is not None and info.enabled:
        bad_loss = any_rank(bad_loss, info)
    if bad_loss or not math.isfinite(grad_norm):
        what = "the loss is not finite (NaN or inf)" if bad_loss else f"the gradient norm is {grad_norm}"
        raise FloatingPointError(f"update {update}: {what}; the update was not applied and training stopped. "
                                 "Lower --lr, check the data, or use --precision fp32")
