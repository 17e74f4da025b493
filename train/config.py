"""The settings of the training loop (``train.trainer.train``), checked once when they are made.

Only what the loop itself reads lives here. Where the model, data and output are, and each method's own
defaults (its learning rate, precision and optimizer), are the recipes' (``recipes/``): a recipe's config extends
this one, so the loop takes it as it is.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from finetune_ref.lora.loraplus import check_loraplus_lr_ratio
from finetune_ref.optim import OPTIMIZER_NAMES

from .loggers import LOGGERS

PRECISIONS = ("fp32", "bf16-autocast", "bf16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run of the loop.

    ``lr``, ``precision`` and ``optimizer`` have no default: they are the method's (``recipes/``).

    Raises:
        ValueError: on construction, naming the bad field.
    """

    steps: int = 30                    # optimizer updates
    lr: float                          # peak learning rate
    min_lr_ratio: float = 0.1          # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 4              # linear warmup (schedule.py)
    weight_decay: float = 0.0          # AdamW's decoupled decay, on matrices only (step.param_groups)
    loraplus_lr_ratio: float | None = None  # LoRA+: lr of LoRA's B = ratio * lr (lora/loraplus.py); None: off
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_accum: int = 1                # micro-batches per update (per rank)
    max_grad_norm: float | None = 1.0  # clip the global gradient norm; None or 0 disables clipping
    eval_every: int = 0                # updates between evaluations (0: only after the last)
    early_stopping_patience: int = 0   # stop after this many evaluations without a new best (0: never)
    precision: str                     # one of PRECISIONS
    optimizer: str                     # one of optim.OPTIMIZER_NAMES
    fused_adamw: bool = False          # "adamw" on fp32 parameters: torch's fused kernel (optim/optimizers.py)
    metrics_path: Path | None = None   # JSON lines of every update and evaluation (None: not written)
    progress: bool = True              # a tqdm bar on the main rank
    log_every: int = 10                # without the bar: a line every this many updates (0: none) and per eval
    log: tuple[str, ...] = ()          # loggers beside metrics.jsonl: "tensorboard", "wandb" (loggers.py)

    def __post_init__(self) -> None:
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
        if self.eval_every < 0 or self.early_stopping_patience < 0 or self.log_every < 0:
            raise ValueError("eval_every, early_stopping_patience and log_every must be >= 0")
        if self.early_stopping_patience and not self.eval_every:
            raise ValueError("early_stopping_patience needs periodic evaluation: set eval_every > 0 too")
        if self.loraplus_lr_ratio is not None:
            check_loraplus_lr_ratio(self.loraplus_lr_ratio)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.optimizer not in OPTIMIZER_NAMES:
            raise ValueError(f"optimizer must be one of {OPTIMIZER_NAMES}, got {self.optimizer!r}")
        if self.fused_adamw and self.optimizer != "adamw":
            raise ValueError(f"fused_adamw applies to optimizer 'adamw', not {self.optimizer!r}")
        if any(name not in LOGGERS for name in self.log):
            raise ValueError(f"log must hold names from {tuple(LOGGERS)}, got {self.log!r}")
        if self.max_grad_norm is not None and not (self.max_grad_norm >= 0 and math.isfinite(self.max_grad_norm)):
            raise ValueError(f"max_grad_norm must be a finite number >= 0 (0: off), got {self.max_grad_norm}")
