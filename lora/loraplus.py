"""LoRA+ (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models", section 3): B learns faster.

With A and B trained at the same learning rate, feature learning is inefficient for wide layers; LoRA+ sets
lr_B = ratio * lr_A (section 3, "set lambda = eta_B / eta_A >> 1"; the paper uses ratios around 2^4). The split is
PEFT's ``create_loraplus_optimizer`` (peft/optimizers/loraplus.py), so that the same model gives the same groups:

    group A          every trainable parameter that is neither a ``lora_B`` weight nor 1-dimensional
                     lr = lr,         weight_decay = weight_decay
    group B          ``lora_B`` weights and 1-dimensional parameters (DoRA's magnitude m included), except biases
                     and parameters of nn.LayerNorm modules
                     lr = ratio * lr, weight_decay = weight_decay
    group B, no decay  the biases and LayerNorm parameters among those
                     lr = ratio * lr, weight_decay = 0

(PEFT also has a group for LoRA on embeddings, at a fixed lr of 1e-6; lora/ adapts no embeddings, so it is empty.)
Note that, as in PEFT, DoRA's magnitude is decayed in group B, while plain training (train.step.param_groups)
decays matrices only.

Each group carries ``lr_scale`` (1 or ratio): the learning-rate schedule (train.schedule) sets
``lr = schedule(update) * lr_scale`` on every group, so warmup and decay keep the ratio.
"""

from __future__ import annotations

import math

from torch import nn


def check_loraplus_lr_ratio(ratio: object, name: str = "loraplus_lr_ratio") -> float:
    """Raise unless ratio is a finite number > 0 (Hayou et al. use ratios >= 1; < 1 is allowed for ablations)."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio <= 0:
        raise ValueError(f"{name} must be a finite number > 0 (LoRA+ uses e.g. 16), got {ratio!r}")
    return float(ratio)


def loraplus_param_groups(model: nn.Module, lr_ratio: float, weight_decay: float = 0.0) -> list[dict]:
    """The trainable parameters in PEFT's LoRA+ groups (see the module docstring), as param-group dicts with
    ``params``, ``weight_decay`` and ``lr_scale``; empty groups are left out.

    Raises:
        ValueError: ratio not a finite number > 0, or no trainable ``lora_B`` weight (LoRA+ needs adapters).
    """
    lr_ratio = check_loraplus_lr_ratio(lr_ratio)
    no_decay_modules = {f"{n}.{p}" if n else p for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)
                        for p, _ in m.named_parameters(recurse=False)}
    group_a, group_b, group_b_no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "lora_B" in name or p.ndim == 1:
            decayed = "bias" not in name and name not in no_decay_modules
            (group_b if decayed else group_b_no_decay).append(p)
        else:
            group_a.append(p)
    if not any("lora_B" in n and p.requires_grad for n, p in model.named_parameters()):
        raise ValueError("LoRA+ (--loraplus-lr-ratio) sets the learning rate of LoRA's B matrices, and this model "
                         "has no trainable lora_B: use it with --method lora or qlora")
    groups = [{"params": group_a, "weight_decay": weight_decay, "lr_scale": 1.0},
              {"params": group_b, "weight_decay": weight_decay, "lr_scale": lr_ratio},
              {"params": group_b_no_decay, "weight_decay": 0.0, "lr_scale": lr_ratio}]
    return [g for g in groups if g["params"]]
