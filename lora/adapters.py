"""Several named LoRA adapters on one base model: switch, disable, delete, merge, unload, count parameters.

One frozen base can carry many adapters (Hu et al. 2021, section 4.2: "switch to another downstream task by
recovering W0 by subtracting BA and then adding a different B'A'", and section 1: many small task modules
share one pre-trained model). The model-wide state lives in the ``LoRALinear`` layers (see ``lora.layer``):
each keeps the same list of active adapters and skips names it does not carry, as PEFT does
(peft/tuners/tuners_utils.py ``BaseTuner.set_adapter`` / ``disable_adapter_layers`` / ``delete_adapter``,
peft/tuners/lora/model.py ``merge_and_unload``).

Merging (section 4.2) writes W + scaling * B @ A into each base weight. When a base weight is shared with
another module - an ``lm_head`` tied to the input embedding - merging into it would silently change the
embedding too, so ``merge_adapters`` refuses (ValueError), or with ``untie_tied=True`` first gives the adapted
layer its own copy of the weight and sets ``config.tie_word_embeddings = False`` when the model has such a
config. (PEFT only warns and then changes both.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from finetune_ref.lora.inject import (LORA_CONFIGS_ATTR, embedding_layers, get_active_adapters, get_lora_configs,
                                     lora_layers, mark_only_lora_trainable, set_active_adapters, set_submodule,
                                     tied_heads, tied_weight_owners, token_layers, tuner_layers)
from finetune_ref.lora.base_weight import RequantizationWarning, dense_weight, warn_requantization
from finetune_ref.lora.layer import LoRALinear
from finetune_ref.lora.modules_to_save import check_one_copy_each, wrappers


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter on the model, in the order they were added."""
    names = list(get_lora_configs(model))
    for _, layer in tuner_layers(model):
        names.extend(n for n in layer.adapter_names if n not in names)
    return names


def _check_names(model: nn.Module, names: Sequence[str]) -> list[str]:
    if isinstance(names, str):
        names = [names]
    names = list(names)
    known = adapter_names(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; the model has {known}")
    return names


def set_adapter(model: nn.Module, names: str | Sequence[str]) -> None:
    """Activate exactly ``names`` (one name or a list; several active adapters are summed).

    Only the active adapters' A and B are trainable afterwards. No weights are reloaded: switching is instant.

    Raises:
        ValueError: unknown adapter, or adapters are merged (``unmerge_adapters`` first).
    """
    names = _check_names(model, names)
    merged = {n for _, layer in tuner_layers(model) for n in layer.merged_adapters}
    if merged and set(names) != set(get_active_adapters(model)):
        raise ValueError(f"cannot switch adapters while {sorted(merged)} are merged; call unmerge_adapters first")
    set_active_adapters(model, names)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: inside it the model computes with its base weights only.

    Raises:
        ValueError: an adapter is merged (its update is inside W, so disabling cannot remove it; unmerge first).
    """
    layers = [layer for _, layer in tuner_layers(model)] + [w for _, w in wrappers(model)]
    merged = sorted({n for layer in layers for n in getattr(layer, "merged_adapters", [])})
    if merged:
        raise ValueError(f"adapters {merged} are merged into the base weights; call unmerge_adapters before "
                         "disabling adapters")
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, previous):
            layer.disabled = was


def freeze_adapter(model: nn.Module, adapter_name: str) -> None:
    """requires_grad False for every tensor of ``adapter_name`` (an adapter loaded for inference)."""
    for _, layer in lora_layers(model):
        if adapter_name in layer.adapter_names:
            layer.lora_A[adapter_name].weight.requires_grad_(False)
            layer.lora_B[adapter_name].weight.requires_grad_(False)
            if adapter_name in layer.lora_magnitude_vector:
                layer.lora_magnitude_vector[adapter_name].weight.requires_grad_(False)
    for _, layer in embedding_layers(model):
        if adapter_name in layer.adapter_names:
            layer.lora_embedding_A[adapter_name].requires_grad_(False)
            layer.lora_embedding_B[adapter_name].requires_grad_(False)
    for _, layer in token_layers(model):
        if adapter_name in layer.adapter_names:
            layer.trainable_tokens_delta[adapter_name].requires_grad_(False)
    for _, wrapper in wrappers(model):
        if adapter_name in wrapper.modules_to_save:
            wrapper.modules_to_save[adapter_name].requires_grad_(False)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove an adapter everywhere; a layer left with no adapter is replaced by its plain base layer.

    Raises:
        ValueError: unknown adapter, or it is merged (unmerge first).
    """
    _check_names(model, [adapter_name])
    for _, layer in tuner_layers(model):
        if adapter_name in layer.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged; call unmerge_adapters before deleting it")
    for name, layer in tuner_layers(model):
        if adapter_name in layer.adapter_names:
            layer.delete_adapter(adapter_name)
        elif adapter_name in layer.active_adapters:
            layer.active_adapters.remove(adapter_name)
        if not layer.adapter_names:
            set_submodule(model, name, layer.base_layer)
    for name, head in tied_heads(model):  # a head tied to an embedding left without adapters
        if not head.source.adapter_names:
            set_submodule(model, name, head.base_layer)
    for name, wrapper in wrappers(model):
        if adapter_name in wrapper.modules_to_save:
            del wrapper.modules_to_save[adapter_name]
        if not wrapper.modules_to_save:
            set_submodule(model, name, wrapper.original_module)
    configs = dict(get_lora_configs(model))
    configs.pop(adapter_name, None)
    setattr(model, LORA_CONFIGS_ATTR, configs)
    mark_only_lora_trainable(model)


def adopt_rewritten_base(model: nn.Module, adapter_name: str = "default") -> None:
    """Take the base that PiSSA/OLoRA rewrote (W_res, lora/init.py) as the adapter's base from now on: the adapter
    becomes a plain LoRA (init_lora_weights True, its A0/B0 forgotten), saved as it is instead of converted for
    the original base. The caller must then ship W_res with the adapter; this is the exact way for OLoRA on a 4-bit
    base, where W_res was re-quantized (``save_adapter`` refuses the conversion there), as LoftQ ships its base.

    Raises:
        ValueError: unknown adapter.
    """
    _check_names(model, [adapter_name])
    configs = dict(get_lora_configs(model))
    if adapter_name in configs:
        configs[adapter_name] = dataclasses.replace(configs[adapter_name], init_lora_weights=True)
        setattr(model, LORA_CONFIGS_ATTR, configs)
    for _, layer in lora_layers(model):
        layer.initial_lora.pop(adapter_name, None)


# ---- merging ----

def merge_adapters(model: nn.Module, adapter_names: Sequence[str] | None = None, safe_merge: bool = True,
                   untie_tied: bool = False) -> list[str]:
    """Merge adapters (default: the active ones) into the base weights of every layer that carries them.

    W <- W + scaling * B @ A per layer, in fp32, rounded once; adapters already merged are skipped.

    Args:
        safe_merge: compute and check every merged weight (finite) before changing any; on failure raise with
            the model untouched. Without it a failing layer is found only when it is reached.
        untie_tied: a base weight shared with another module (tied lm_head/embedding) gets its own copy
            before merging, instead of raising.

    Returns:
        Names of the layers whose weights changed.

    Raises:
        ValueError: unknown adapter; a tied base weight without ``untie_tied``; non-finite result (safe_merge).
        TypeError: a base layer that can be neither read nor written as a dense weight (e.g. GPTQLinear).

    Warns:
        RequantizationWarning: a quantized base (NF4Linear) was re-quantized; the message gives the fraction of
            the update the stored weights kept (``lora.base_weight.RequantizationDrift``), summed over the layers.
    """
    names = _check_names(model, get_active_adapters(model) if adapter_names is None else adapter_names)
    work = []
    for layer_name, layer in tuner_layers(model):
        todo = [n for n in names if n in layer.adapter_names and n not in layer.merged_adapters]
        if todo:
            if isinstance(layer, LoRALinear):  # an embedding's base is a plain nn.Embedding (lora.embedding)
                dense_weight(layer.base_layer)  # TypeError for a base that cannot be merged into, before changes
            work.append((layer_name, layer, todo))
    todo_layers = {layer_name for layer_name, _, _ in work}
    tied = {k: v for k, v in tied_weight_owners(model).items() if k in todo_layers}
    if tied and not untie_tied:
        owners = sorted({owner for names_ in tied.values() for owner in names_})
        raise ValueError(f"cannot merge into {sorted(tied)}: the weight is shared with {owners} (tied "
                         "embeddings), so merging would change the input embedding too. Pass "
                         "untie_tied=True to give the adapted layer its own copy of the weight, or do not "
                         "target the tied layer")
    if safe_merge:
        for layer_name, layer, todo in work:
            if not torch.isfinite(layer.merged_base_weight(todo)).all():
                raise ValueError(f"merging {todo} into {layer_name} gives non-finite weights (NaN/inf or "
                                 "overflow); nothing was merged")
    for layer_name in tied:
        _untie(model, model.get_submodule(layer_name))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RequantizationWarning)  # one warning for the model, below, not one per layer
        for _, layer, todo in work:
            layer.merge(todo, safe_merge=False, allow_shared_weight=True)  # ties were checked just above
    drifts = [layer.requantization_drift for _, layer, _ in work if layer.requantization_drift is not None]
    if drifts:
        warn_requantization(sum(drifts[1:], drifts[0]))
    return [layer_name for layer_name, _, _ in work]


def _untie(model: nn.Module, layer: LoRALinear) -> None:
    weight = layer.base_layer.weight
    layer.base_layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    layer.shared_weight_with = []
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "tie_word_embeddings"):
        config.tie_word_embeddings = False  # so that savers do not write the two as one tensor again


def unmerge_adapters(model: nn.Module) -> list[str]:
    """Subtract every merged update from its base weight; returns the names of the layers changed."""
    return [name for name, layer in tuner_layers(model) if layer.unmerge()]


def merge_and_unload(model: nn.Module, adapter_names: Sequence[str] | None = None, safe_merge: bool = True,
                     untie_tied: bool = False) -> nn.Module:
    """Merge adapters (default: the active ones) and return the plain model (every LoRALinear replaced by its
    base layer, the adapter configs removed). Modifies ``model`` in place and returns it.

    The base parameters stay frozen (requires_grad=False); call ``requires_grad_(True)`` to train the result.
    Raises as ``merge_adapters``.
    """
    if adapter_names is not None:
        check_one_copy_each(model, list(adapter_names))  # before anything is merged
    merge_adapters(model, adapter_names, safe_merge=safe_merge, untie_tied=untie_tied)
    return _unwrap(model, keep_trained_copies=True, adapter_names=adapter_names)


def unload(model: nn.Module) -> nn.Module:
    """Remove all adapters without merging (merged ones are unmerged first); returns the plain base model."""
    unmerge_adapters(model)
    return _unwrap(model)


def _unwrap(model: nn.Module, keep_trained_copies: bool = False,
            adapter_names: Sequence[str] | None = None) -> nn.Module:
    for name, layer in [*tuner_layers(model), *tied_heads(model)]:
        set_submodule(model, name, layer.base_layer)
    for name, wrapper in wrappers(model):
        # modules_to_save when merging: the copy of the merged adapters (default the active ones) that has one,
        # as PEFT's ModulesToSaveWrapper.unload_and_optionally_merge_module; else the original
        if not keep_trained_copies:
            module = wrapper.original_module
        else:
            module = wrapper.active_module() if adapter_names is None else wrapper.copy_of(list(adapter_names))
        set_submodule(model, name, module.requires_grad_(False))
    if hasattr(model, LORA_CONFIGS_ATTR):
        delattr(model, LORA_CONFIGS_ATTR)
    return model


# ---- trainable-parameter report ----

def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied parameter is counted once, as PEFT counts.

    A quantized linear layer (``qlora``'s NF4Linear or GPTQLinear) keeps its frozen weight as packed buffers; it
    is counted at its logical size ``in_features * out_features``, as PEFT counts bitsandbytes' 4-bit weights
    (``PeftModel.get_nb_trainable_parameters`` doubles the uint8 element count of a ``Params4bit``).
    """
    trainable = total = 0
    for p in model.parameters():  # parameters() yields each shared Parameter once
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    for m in model.modules():
        if ("weight" in m._buffers or "qweight" in m._buffers) and isinstance(getattr(m, "in_features", None), int):
            total += m.in_features * m.out_features
    return trainable, total


def format_trainable_parameters(model: nn.Module) -> str:
    """PEFT's line: "trainable params: 13,824 || all params: 83,776 || trainable%: 16.5011"."""
    trainable, total = trainable_parameters(model)
    percent = 100.0 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}"


def print_trainable_parameters(model: nn.Module, print_fn: Callable[[str], object] = print) -> str:
    """Print (with ``print_fn``) and return ``format_trainable_parameters(model)``."""
    line = format_trainable_parameters(model)
    print_fn(line)
    return line
