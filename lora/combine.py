"""Combining trained adapters into a new one, and scaling an adapter at inference.

Adapters trained for different tasks can be mixed without training (task arithmetic, Ilharco et al. 2023,
"Editing Models with Task Arithmetic", section 2: the weighted sum of task vectors). PEFT's
``LoraModel.add_weighted_adapter`` (peft/tuners/lora/model.py) defines these ways for LoRA, reproduced here with
s_i the scaling of adapter i and w_i its weight:

  linear   same rank r everywhere: A = sum_i sign(w_i s_i) sqrt|w_i s_i| A_i,  B = sum_i sqrt|w_i s_i| B_i
           (NOT the weighted sum of the updates: B A has cross terms B_i A_j; exact for one adapter)
  cat      rank sum_i r_i: A = [w_1 s_1 A_1 ; w_2 s_2 A_2 ; ...],  B = [B_1 | B_2 | ...], so that
           B A = sum_i w_i s_i B_i A_i exactly
  svd      dW = sum_i w_i s_i B_i A_i, then its best rank-k approximation (k = svd_rank, default the largest r_i):
           dW = U S V^T,  B = U_k S_k,  A = V_k^T  (torch.linalg.svd with full_matrices=True, as PEFT)

Task-vector merging (peft/utils/merge_utils.py), each applied like "linear" to the A's (weights
sign(w s) sqrt|w s|) and separately to the B's (weights sqrt|w s|), same ranks; with the "_svd" suffix applied
instead to the updates dW_i (weights w_i), then truncated as "svd":

  magnitude_prune  keep the fraction ``density`` of each tensor's entries largest in |.|, then the weighted sum
  ties             TIES-Merging (Yadav et al. 2023, "Resolving Interference When Merging Models", section 3):
                   trim as magnitude_prune, elect a sign per entry (majority_sign_method "total": the sign of
                   the sum of the trimmed tensors; "frequency": of the count of signs), then the disjoint mean:
                   sum of the weighted entries agreeing with it / how many agree (at least 1)
  dare_linear      DARE (Yu et al. 2024, "Language Models are Super Mario", section 3): drop each entry with
                   probability 1 - density (torch.bernoulli: random), rescale the rest by 1 / density, weighted sum
  dare_ties        DARE's drop and rescale, then TIES' sign election and disjoint mean

DARE's masks draw from ``generator`` (default torch's global one, as PEFT, in PEFT's order: per layer, the A of
each adapter, then the B of each), so the same seed gives PEFT's result.

The new adapter has lora_alpha = r (scaling 1), since the scalings are inside A; a layer that only some adapters
adapt combines those. PEFT copies the first adapter's other options: its lora_dropout, kept here too, and its
use_rslora, which would then scale the result by sqrt(r): wrong; here use_rslora is False. DoRA adapters and
PiSSA/OLoRA ones cannot be combined this way (their update is not B A alone) and are refused.

``set_scale`` (PEFT's ``LoraLayer.set_scale``): scaling = scale * lora_alpha / r, or scale * lora_alpha / sqrt(r)
with rsLoRA, per layer carrying the adapter; scale 1 restores the trained scaling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from finetune_ref.lora.config import LoraConfig
from finetune_ref.lora.functional import lora_scaling
from finetune_ref.lora.init import is_mutating_init
from finetune_ref.lora.inject import embedding_layers, get_lora_configs, inject_lora, lora_layers

PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")  # need a density
COMBINATIONS = ("linear", "cat", "svd", *PRUNING, *(f"{c}_svd" for c in PRUNING))
SIGN_METHODS = ("total", "frequency")  # TIES' sign election
SAME_RANK = ("linear", *PRUNING)  # A's and B's are combined entrywise


# ---- task-vector merging (peft/utils/merge_utils.py), on a list of same-shape tensors ----

def magnitude_prune_tensor(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density * numel) entries largest in |.| (torch.topk, as PEFT), zero the rest."""
    mask = torch.zeros_like(tensor).reshape(-1)  # (numel,)
    mask[torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True)[1]] = 1
    return tensor * mask.reshape(tensor.shape)


def dare_prune_tensor(tensor: torch.Tensor, density: float, generator: torch.Generator | None = None
                      ) -> torch.Tensor:
    """Keep each entry with probability ``density`` and divide the kept ones by it (DARE's rescale)."""
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density


def majority_sign_mask(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """(n, ...) bool: entries whose sign is the elected one ("total": sign of the sum, 0 counts as +;
    "frequency": sign of the sum of signs)."""
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)  # (...)
    return sign == torch.where(magnitude >= 0, 1, -1)


def merge_task_tensors(method: str, tensors: Sequence[torch.Tensor], weights: torch.Tensor,
                       density: float | None = None, majority_sign_method: str = "total",
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """PEFT's task_arithmetic ("linear", "svd") / magnitude_prune / ties / dare_linear / dare_ties (the "_svd"
    suffix ignored) of ``tensors`` with ``weights`` (n,), see the module docstring."""
    method = method.removesuffix("_svd")
    if method in PRUNING and density < 1:  # density >= 1 keeps everything (PEFT warns)
        if method.startswith("dare"):
            tensors = [dare_prune_tensor(t, density, generator) for t in tensors]
        else:
            tensors = [magnitude_prune_tensor(t, density) for t in tensors]
    stacked = torch.stack(list(tensors))  # (n, ...)
    weighted = stacked * weights.view(-1, *(1,) * (stacked.dim() - 1))  # weights (n,) -> (n, 1, ..)
    if method not in ("ties", "dare_ties"):
        return weighted.sum(dim=0)
    mask = majority_sign_mask(stacked, majority_sign_method)  # (n, ...)
    return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def check_merge_options(combination_type: str, density: float | None, majority_sign_method: str) -> None:
    """Raises ValueError: unknown combination or sign method; density missing for (or given without) pruning,
    or outside (0, 1]."""
    if combination_type not in COMBINATIONS:
        raise ValueError(f"combination must be one of {COMBINATIONS}, got {combination_type!r}")
    if majority_sign_method not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {SIGN_METHODS}, got {majority_sign_method!r}")
    prunes = combination_type.removesuffix("_svd") in PRUNING
    if prunes and density is None:
        raise ValueError(f"combination {combination_type!r} needs a density (the fraction of entries kept, (0, 1])")
    if not prunes and density is not None:
        raise ValueError(f"density applies to {PRUNING} (and their _svd forms), not to {combination_type!r}")
    if prunes and (isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1):
        raise ValueError(f"density must be a number in (0, 1] (the fraction of entries kept), got {density!r}")


def combine_linear(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], scalings: Sequence[float],
                   weights: Sequence[float], method: str = "linear", density: float | None = None,
                   majority_sign_method: str = "total", generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's "linear": A = sum sign(w s) sqrt|w s| A_i (r, in), B = sum sqrt|w s| B_i (out, r); with ``method``
    "ties", "dare_linear", "dare_ties" or "magnitude_prune" the sums are that merge (``merge_task_tensors``) of
    the A's, then of the B's, with the same weights."""
    if len({tuple(a.shape) for a in As}) != 1:
        raise ValueError(f"{method!r} combines adapters of one rank; got ranks {[a.shape[0] for a in As]} (use "
                         "'cat' or 'svd')")
    ws = [w * s for w, s in zip(weights, scalings)]
    wa = torch.tensor([math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in ws], device=As[0].device)
    wb = torch.tensor([math.sqrt(abs(x)) for x in ws], device=Bs[0].device)
    A = merge_task_tensors(method, As, wa, density, majority_sign_method, generator)  # (r, in)
    B = merge_task_tensors(method, Bs, wb, density, majority_sign_method, generator)  # (out, r)
    return A.to(As[0].dtype), B.to(Bs[0].dtype)


def combine_cat(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], scalings: Sequence[float],
                weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's "cat": A = [w_i s_i A_i] stacked (sum r_i, in), B = [B_i] side by side (out, sum r_i)."""
    A = torch.cat([a * w * s for a, s, w in zip(As, scalings, weights)], dim=0)
    return A, torch.cat(list(Bs), dim=1)


def combine_svd(deltas: Sequence[torch.Tensor], weights: Sequence[float], rank: int, method: str = "svd",
                density: float | None = None, majority_sign_method: str = "total",
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's "svd": the rank-``rank`` SVD truncation of sum w_i dW_i (dW_i = s_i B_i A_i, (out, in)); with
    ``method`` "ties_svd", ... of that merge of the dW_i (``merge_task_tensors``) instead of the sum."""
    delta = merge_task_tensors(method, deltas, torch.tensor(weights, device=deltas[0].device), density,
                               majority_sign_method, generator)  # (out, in)
    u, s, vh = torch.linalg.svd(delta, full_matrices=True)  # u (out, out), s (k,), vh (in, in)
    return vh[:rank, :], u[:, :rank] @ torch.diag(s[:rank])  # A (rank, in), B (out, rank)


def add_weighted_adapter(model: nn.Module, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None, density: float | None = None,
                         majority_sign_method: str = "total", generator: torch.Generator | None = None
                         ) -> list[str]:
    """Add ``adapter_name``, the combination of ``adapters`` (module docstring), inactive; returns its modules.

    Args:
        density: the fraction of entries kept by "ties", "dare_*", "magnitude_prune" (and their "_svd" forms).
        majority_sign_method: TIES' sign election, "total" or "frequency".
        generator: for DARE's random masks (default torch's global generator, as PEFT).

    Raises:
        ValueError: unknown or duplicate names, weights and adapters of different lengths, an unknown
            combination, a density missing/out of range/given without pruning, DoRA or PiSSA/OLoRA adapters,
            ranks that differ with "linear" or the pruning ones.
    """
    configs = get_lora_configs(model)
    adapters = list(adapters)
    if not adapters or len(adapters) != len(weights):
        raise ValueError(f"need one weight per adapter, got {len(adapters)} adapters and {len(weights)} weights")
    unknown = [a for a in adapters if a not in configs]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; the model has {list(configs)}")
    check_merge_options(combination_type, density, majority_sign_method)
    odd = [a for a in adapters if configs[a].use_dora or is_mutating_init(configs[a].init_lora_weights)
           or configs[a].modules_to_save or configs[a].trainable_token_indices]
    if odd:
        raise ValueError(f"adapters {odd} are DoRA, PiSSA/OLoRA, modules_to_save or trainable-token adapters, whose "
                         "update is not B A alone; only plain LoRA adapters can be combined")
    on_embedding = [a for a in adapters if any(a in layer.adapter_names for _, layer in embedding_layers(model))]
    if on_embedding:
        raise ValueError(f"adapters {on_embedding} adapt an embedding (lora_embedding_A/B); combining those is not "
                         "supported: train them without embed_tokens in target_modules")
    combination_type = "linear" if len(adapters) == 1 else combination_type
    layers = [(n, layer) for n, layer in lora_layers(model) if any(a in layer.adapter_names for a in adapters)]
    ranks = [max(layer.r[a] for _, layer in layers if a in layer.adapter_names) for a in adapters]
    new_rank = ranks[0] if combination_type in SAME_RANK else sum(ranks) if combination_type == "cat" else \
        svd_rank or max(ranks)
    if combination_type in SAME_RANK and len(set(ranks)) != 1:
        raise ValueError(f"{combination_type!r} combines adapters of one rank; got ranks {ranks} (use 'cat' or "
                         "'svd')")
    options = dict(method=combination_type, density=density, majority_sign_method=majority_sign_method,
                   generator=generator)
    config = LoraConfig(r=new_rank, lora_alpha=new_rank, lora_dropout=configs[adapters[0]].lora_dropout,
                        target_modules=[n for n, _ in layers])
    names = inject_lora(model, config, adapter_name=adapter_name, strict_patterns=False)
    with torch.no_grad():
        for _, layer in layers:
            here = [(a, w) for a, w in zip(adapters, weights) if a in layer.adapter_names]
            As = [layer.lora_A[a].weight for a, _ in here]
            Bs = [layer.lora_B[a].weight for a, _ in here]
            scalings, ws = [layer.scaling[a] for a, _ in here], [w for _, w in here]
            if combination_type in SAME_RANK:
                A, B = combine_linear(As, Bs, scalings, ws, **options)
            elif combination_type == "cat":
                A, B = combine_cat(As, Bs, scalings, ws)
            else:
                A, B = combine_svd([layer.get_delta_weight(a) for a, _ in here], ws, new_rank, **options)
            target_A, target_B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            target_A.zero_()
            target_B.zero_()
            target_A[:A.shape[0]] = A  # a layer with fewer of the adapters fills only part of "cat"'s rank
            target_B[:, :B.shape[1]] = B
        if density is not None and all(not layer.get_delta_weight(adapter_name).any() for _, layer in layers):
            raise ValueError(f"the combination is all zeros: density {density} keeps no entry of the adapters' "
                             "updates; use a larger density")
    return names


def set_scale(model: nn.Module, adapter_name: str, scale: float) -> None:
    """scaling = scale * (lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA) on every layer carrying the adapter.

    Raises:
        ValueError: no layer carries the adapter, or scale is not a finite number; it is merged (unmerge first).
    """
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    layers = [layer for _, layer in [*lora_layers(model), *embedding_layers(model)] if adapter_name in layer.adapter_names]
    if not layers:
        raise ValueError(f"no layer carries adapter {adapter_name!r}")
    if any(adapter_name in layer.merged_adapters for layer in layers):
        raise ValueError(f"adapter {adapter_name!r} is merged; unmerge it before changing its scale")
    for layer in layers:
        layer.scaling[adapter_name] = scale * lora_scaling(layer.r[adapter_name], layer.lora_alpha[adapter_name],
                                                           layer.use_rslora[adapter_name])
