"""The optimizer names the CLI offers (``finetune train --optimizer ...``) and the one factory that builds them.

Each name is a preset of the one :class:`optim.adamw.AdamW` (or torch's own AdamW):

=================  =============================================================  ====================
name               what                                                           state bytes/param
=================  =============================================================  ====================
adamw              ``torch.optim.AdamW`` (:class:`optim.adamw.MasterWeightAdamW`  8 (+4 master)
                   when a trainable parameter is 16-bit: fp32 master weights)
paged_adamw        :class:`optim.adamw.PagedAdamW`, states in host memory          8 (+4), on the host
                   (QLoRA section 3, "Paged Optimizers")
adamw8bit          :class:`optim.adamw.AdamW8bit` (Dettmers et al. 2022)           2.03 (+4)
paged_adamw8bit    :class:`optim.adamw.PagedAdamW8bit`                             2.03 (+4), on the host
=================  =============================================================  ====================

(+4): an fp32 master copy, for 16-bit trainable parameters only. The QLoRA recipe (Dettmers et al. 2023,
section 3 and its released training script) trains with the paged 32-bit AdamW, so ``paged_adamw`` is the
default of ``--method qlora`` (``recipes/qlora.py``); the other methods default to ``adamw``.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from finetune_ref.optim.adamw import AdamW8bit, MasterWeightAdamW, PagedAdamW, PagedAdamW8bit

OPTIMIZER_NAMES = ("adamw", "paged_adamw", "adamw8bit", "paged_adamw8bit")
# "adamw" is torch.optim.AdamW when every parameter is fp32 (build_optimizer); this preset otherwise.
_PRESETS = {"adamw": MasterWeightAdamW, "paged_adamw": PagedAdamW, "adamw8bit": AdamW8bit,
            "paged_adamw8bit": PagedAdamW8bit}
_PAGED_OPTIONS = ("state_home", "min_paged_size", "master_weights")
_OPTIONS: dict[str, tuple[str, ...]] = {  # extra keyword arguments each optimizer accepts
    "adamw": ("fused",),
    "paged_adamw": _PAGED_OPTIONS,
    "adamw8bit": ("min_8bit_size", "rounding") + _PAGED_OPTIONS,
    "paged_adamw8bit": ("min_8bit_size", "rounding") + _PAGED_OPTIONS,
}


def build_optimizer(name: str, param_groups: Iterable[Any], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-8, weight_decay: float = 0.0, **kw: Any) -> torch.optim.Optimizer:
    """Build the optimizer called ``name`` over ``param_groups``.

    Args:
        name: one of :data:`OPTIMIZER_NAMES`.
        param_groups: parameters or param-group dicts (e.g. ``train.trainer.param_groups(model, wd)``, whose
            groups carry their own ``weight_decay``).
        lr, betas, eps, weight_decay: AdamW hyperparameters (defaults for groups that do not set them).
        **kw: options of the chosen optimizer: ``fused`` for "adamw" (torch's fused kernel, fp32 parameters);
            ``state_home`` ("device"/"host"/"unified"), ``min_paged_size``,
            ``master_weights`` for the paged and 8-bit ones; ``min_8bit_size``, ``rounding`` for the 8-bit ones.

    Returns:
        The optimizer. For "adamw": ``torch.optim.AdamW`` if every parameter is fp32, else
        :class:`optim.adamw.MasterWeightAdamW`.

    Raises:
        ValueError: an unknown name (the message lists the names); bad hyperparameters or options; no
            parameters.
        TypeError: an option the chosen optimizer does not take.
    """
    if name not in OPTIMIZER_NAMES:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZER_NAMES)}")
    unknown = sorted(set(kw) - set(_OPTIONS[name]))
    if unknown:
        raise TypeError(f"optimizer {name!r} takes no option(s) {unknown}; it accepts {list(_OPTIONS[name]) or 'none'}")
    if isinstance(param_groups, torch.Tensor):
        raise TypeError("param_groups must be an iterable of parameters or of param-group dicts, not one tensor; "
                        "wrap it in a list")
    # A group's "params" may be a generator: make it a list, as it is read twice below.
    param_groups = [{**g, "params": list(g["params"])} if isinstance(g, dict) else g for g in param_groups]
    hyper = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    if name == "adamw":
        params = [p for g in param_groups for p in (g["params"] if isinstance(g, dict) else [g])]
        if all(p.dtype == torch.float32 for p in params):
            # fused: one kernel per parameter, no temporaries (the default single-tensor path makes sqrt(v)
            # and the update, 8 B/param); the same update up to the last ulp (tests/test_full.py).
            return torch.optim.AdamW(param_groups, **hyper, fused=bool(kw.get("fused", False)) or None)
        kw.pop("fused", None)  # MasterWeightAdamW updates one tensor at a time already
    return _PRESETS[name](param_groups, **hyper, **kw)
