"""Choosing the layers that get LoRA and wrapping them: targets, "all-linear", regex, exclude, rank/alpha patterns.

Hu et al. 2021, section 4.2 and section 7.1 adapt only some weight matrices of each Transformer block (W_q and
W_v in their GPT-3 study); later practice (QLoRA, Dettmers et al. 2023, section 4) adapts every linear layer of
the blocks. The selection rules here are PEFT's, so that a config means the same modules in both:

  * a list of names: a module is targeted when its full name equals an entry or ends with "." + entry
    (peft/tuners/tuners_utils.py ``check_target_module_exists``), e.g. ["q_proj", "v_proj"];
  * a string: ``re.fullmatch(pattern, full_name)``, e.g. r".*\\.(q|v)_proj";
  * "all-linear": every linear layer except the model's output head (``get_output_embeddings()`` when the
    model has it, and any module named ``lm_head``), as PEFT's ``_maybe_include_all_linear_layers`` does on a
    transformers model; a list may add names to it, e.g. ["all-linear", "lm_head"];
  * exclude_modules: the same list/regex rules, applied first;
  * rank_pattern / alpha_pattern: {regex: value}; the first key with ``re.match(rf"(.*\\.)?({key})$", name)``
    sets that module's r / lora_alpha (peft/utils/other.py ``get_pattern_key``).

"Linear layer" means any module with int ``in_features`` and ``out_features`` (nn.Linear, a LoRALinear, or a
quantized linear such as a 4-bit NF4 base); an nn.Embedding target gets a ``lora.embedding.LoRAEmbedding``
(never chosen by "all-linear": name it, e.g. ["all-linear", "embed_tokens"]), and ``trainable_token_indices``
wraps embeddings in ``lora.trainable_tokens.TrainableTokensLayer``. Modules inside a LoRALinear (its base_layer, lora_A, lora_B) are
never targets. Grouped-query attention needs nothing special: k_proj/v_proj simply have fewer out_features.

``inject_lora`` wraps the targets in place, freezes every parameter of the model that is not a LoRA A or B,
records the config on the model (attribute ``lora_configs``, adapter name -> LoraConfig) for saving, and marks
layers whose base weight is shared with another module (``LoRALinear.shared_weight_with``, e.g. a tied lm_head)
so that merging into them is refused (see ``lora.adapters.merge_adapters``).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from finetune_ref.lora.config import ALL_LINEAR, LoraConfig, names_module, uses_all_linear
from finetune_ref.lora.embedding import LoRAEmbedding, TiedLoRAHead
from finetune_ref.lora.init import is_mutating_init
from finetune_ref.lora.layer import LoRALinear, check_adapter_name
from finetune_ref.lora.modules_to_save import (ModulesToSaveWrapper, check_one_copy_each, modules_to_save_of,
                                              wrappers)
from finetune_ref.lora.trainable_tokens import TrainableTokensLayer, token_targets

LORA_CONFIGS_ATTR = "lora_configs"


def is_linear_like(module: nn.Module) -> bool:
    """True for modules LoRALinear can wrap: int ``in_features`` and ``out_features`` (nn.Linear, NF4, ...)."""
    return all(isinstance(getattr(module, a, None), int) and not isinstance(getattr(module, a), bool)
               for a in ("in_features", "out_features"))


def is_embedding(module: nn.Module) -> bool:
    """True for modules LoRAEmbedding can wrap (or already wraps): an nn.Embedding (lora.embedding)."""
    return isinstance(module, (nn.Embedding, LoRAEmbedding))


def candidate_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) for every module of ``model`` except the root and anything inside a LoRALinear."""
    inside: list[str] = []
    found = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, (LoRALinear, LoRAEmbedding, TiedLoRAHead, ModulesToSaveWrapper, TrainableTokensLayer)):
            inside.append(name + ".")
        found.append((name, module))
    return found


def output_layer_names(model: nn.Module) -> set[str]:
    """Names of the output head(s) that "all-linear" leaves out: ``get_output_embeddings()`` and any ``lm_head``."""
    names = set()
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    for name, module in candidate_modules(model):
        if module is head or name.rsplit(".", 1)[-1] == "lm_head":
            names.add(name)
    return names


def _matches(spec: list[str] | str, name: str) -> bool:
    """PEFT's module-name rule: a regex string must fullmatch; a list entry must equal the name or be its suffix."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return names_module(spec, name)


def find_target_modules(model: nn.Module, config: LoraConfig, strict_patterns: bool = True) -> list[str]:
    """Full names of the modules ``config`` adapts, in the model's module order.

    Args:
        strict_patterns: raise when a rank_pattern/alpha_pattern key matches no adapted module (a typo would
            otherwise silently give the default rank). Loading a PEFT file passes False, as PEFT accepts those.

    Raises:
        ValueError: nothing matches (the linear layers are listed), or a matched module is not a linear layer,
            or an entry of ``rank_pattern``/``alpha_pattern`` matches no target (a likely typo).
        re.error: an invalid regex in target_modules / exclude_modules.
    """
    config.validate()
    candidates = candidate_modules(model)
    targets = config.target_modules
    if uses_all_linear(targets):
        heads = output_layer_names(model)
        extra = [t for t in targets if t.lower() != ALL_LINEAR] if isinstance(targets, list) else []
        chosen = [n for n, m in candidates
                  if (is_linear_like(m) and n not in heads) or (extra and _matches(extra, n))]
    else:
        chosen = [n for n, _ in candidates if _matches(targets, n)]
    if config.exclude_modules:
        chosen = [n for n in chosen if not _matches(config.exclude_modules, n)]
    modules = dict(candidates)
    not_linear = [f"{n} ({type(modules[n]).__name__})" for n in chosen
                  if not is_linear_like(modules[n]) and not is_embedding(modules[n])]
    if not_linear:
        raise ValueError(f"target_modules matched modules that are not linear layers or embeddings: "
                         f"{not_linear[:5]}. Name the layers themselves (e.g. 'q_proj', not 'self_attn')")
    if not chosen:
        linear = [n for n, m in candidates if is_linear_like(m)]
        raise ValueError(f"target_modules={targets!r} (exclude_modules={config.exclude_modules!r}) matches no "
                         f"module; linear layers of this model include {linear[:8]}")
    for field in ("rank_pattern", "alpha_pattern"):
        for key in getattr(config, field) if strict_patterns else ():
            if not any(_pattern_matches(key, n) for n in chosen):
                raise ValueError(f"{field} key {key!r} matches none of the adapted modules (e.g. {chosen[:3]}); "
                                 "keys are regexes matched against the end of the full module name")
    return chosen


def _pattern_matches(key: str, name: str) -> bool:
    return re.match(rf"(.*\.)?({key})$", name) is not None


def rank_and_alpha(config: LoraConfig, module_name: str) -> tuple[int, float]:
    """(r, lora_alpha) for one module: the first matching rank_pattern / alpha_pattern key, else the defaults."""
    r = next((v for k, v in config.rank_pattern.items() if _pattern_matches(k, module_name)), config.r)
    alpha = next((v for k, v in config.alpha_pattern.items() if _pattern_matches(k, module_name)),
                 config.lora_alpha)
    return r, alpha


def get_lora_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """adapter name -> LoraConfig recorded by ``inject_lora`` (empty dict if none)."""
    return getattr(model, LORA_CONFIGS_ATTR, None) or {}


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """(full name, layer) for every LoRALinear in the model, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def embedding_layers(model: nn.Module) -> list[tuple[str, LoRAEmbedding]]:
    """(full name, layer) for every LoRAEmbedding in the model, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRAEmbedding)]


def token_layers(model: nn.Module) -> list[tuple[str, TrainableTokensLayer]]:
    """(full name, layer) for every embedding with trainable token rows (not the tied heads mirroring one)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TrainableTokensLayer) and m.tied_to is None]


def tuner_layers(model: nn.Module) -> list[tuple[str, LoRALinear | LoRAEmbedding | TrainableTokensLayer]]:
    """Every layer carrying adapters (LoRALinear, LoRAEmbedding, TrainableTokensLayer), in module order: what
    switching, disabling, deleting and merging act on. Tied heads mirror their embedding and are not listed."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAEmbedding)) or
            (isinstance(m, TrainableTokensLayer) and m.tied_to is None)]


def tied_heads(model: nn.Module) -> list[tuple[str, TiedLoRAHead | TrainableTokensLayer]]:
    """(full name, head) for every output head mirroring an embedding's adapters: a TiedLoRAHead
    (ensure_weight_tying) or a tied TrainableTokensLayer."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TiedLoRAHead) or
            (isinstance(m, TrainableTokensLayer) and m.tied_to is not None)]


def get_active_adapters(model: nn.Module) -> list[str]:
    """The model-wide list of active adapters (kept identical on every tuner layer); [] if there is none."""
    for _, layer in tuner_layers(model):
        return list(layer.active_adapters)
    return []


def _storage_key(t: torch.Tensor) -> tuple:
    if t.device.type == "meta" or hasattr(t, "to_local"):
        # meta tensors have no storage; a DTensor (an FSDP2 shard) is one object however many modules hold it,
        # and its local shard may be empty (no data pointer to compare)
        return ("object", id(t))
    # the offset and shape too: the fused q/k/v base weights are row blocks of one storage (models/fused.py),
    # which is not tying
    return (str(t.device), t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))


def tied_weight_owners(model: nn.Module) -> dict[str, list[str]]:
    """{LoRA layer name: names of the *other* modules holding a parameter that shares storage with its base
    weight} for every LoRALinear whose base weight is shared (e.g. an lm_head tied to the input embedding)."""
    index: dict[tuple, list[str]] = {}
    for name, module in model.named_modules():
        for p in module._parameters.values():
            if p is not None:
                index.setdefault(_storage_key(p), []).append(name)
    owners = {}
    for name, layer in lora_layers(model):
        weight = getattr(layer.base_layer, "weight", None)
        if isinstance(weight, torch.Tensor):
            others = [n for n in index.get(_storage_key(weight), []) if n != f"{name}.base_layer"]
            if others:
                owners[name] = others
    return owners


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` (e.g. "model.layers.0.self_attn.q_proj") by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject_lora(model: nn.Module, config: LoraConfig, adapter_name: str = "default",
                adapter_dtype: torch.dtype = torch.float32, strict_patterns: bool = True) -> list[str]:
    """Add LoRA adapter ``adapter_name`` to the modules ``config`` targets; modifies ``model`` in place.

    Each target is replaced by a ``LoRALinear`` wrapping it (or, if it already is one, gets another adapter).
    Every parameter that is not a LoRA A/B is frozen (requires_grad=False), the base weights included; the
    model's train/eval mode is kept. The first adapter of a model becomes active and trainable; a further
    adapter is added inactive and frozen (PEFT's ``add_adapter`` behaviour): ``lora.adapters.set_adapter``
    activates it.

    Args:
        adapter_dtype: dtype of A and B. fp32 by default whatever the base dtype, as PEFT (autocast_adapter_dtype)
            does; bf16 adapters on an fp32/bf16 base are allowed.
        strict_patterns: see ``find_target_modules``.

    Returns:
        The full names of the adapted modules.

    Raises:
        ValueError: the adapter name exists already or is invalid; the config matches no module or a
            non-linear one (see ``find_target_modules``).
    """
    check_adapter_name(adapter_name)
    configs = dict(get_lora_configs(model))
    existing = {n for _, layer in tuner_layers(model) for n in layer.adapter_names}
    if adapter_name in configs or adapter_name in existing:
        raise ValueError(f"the model already has an adapter named {adapter_name!r}; delete it "
                         "(lora.adapters.delete_adapter) or choose another name")
    names = find_target_modules(model, config, strict_patterns=strict_patterns)
    if is_mutating_init(config.init_lora_weights):
        _refuse_shared_targets(model, names, config.init_lora_weights)
    saved = modules_to_save_of(model, config.modules_to_save, candidate_modules(model), names)
    previous_active = get_active_adapters(model)
    heads = tied_heads_to_wrap(model, names, config)
    tokens = token_targets(model, config.trainable_token_indices, names)
    for name in names:
        module = model.get_submodule(name)
        if is_embedding(module):  # lora.embedding: lora_embedding_A/B, no dropout, no DoRA
            if not isinstance(module, LoRAEmbedding):
                module = LoRAEmbedding(module)
                set_submodule(model, name, module)
            r, alpha = rank_and_alpha(config, name)
            module.add_adapter(adapter_name, r=r, lora_alpha=alpha, lora_dropout=config.lora_dropout,
                               use_rslora=config.use_rslora, init_lora_weights=config.init_lora_weights,
                               dtype=adapter_dtype, use_dora=config.use_dora)
            continue
        if not isinstance(module, LoRALinear):
            module = LoRALinear(module)
            module.train(model.training)
            set_submodule(model, name, module)
        r, alpha = rank_and_alpha(config, name)
        module.add_adapter(adapter_name, r=r, lora_alpha=alpha, lora_dropout=config.lora_dropout,
                           use_rslora=config.use_rslora, init_lora_weights=config.init_lora_weights,
                           dtype=adapter_dtype, use_dora=config.use_dora)
    for name in saved:  # trained in full: a copy per adapter (lora.modules_to_save)
        module = model.get_submodule(name)
        if not isinstance(module, ModulesToSaveWrapper):
            module = ModulesToSaveWrapper(module)
            set_submodule(model, name, module)
        module.add_copy(adapter_name)
    for head_name, embedding_name in heads:  # ensure_weight_tying: the head reads the embedding's adapters
        set_submodule(model, head_name, TiedLoRAHead(model.get_submodule(head_name),
                                                     model.get_submodule(embedding_name)))
    for name, (indices, tied) in tokens.items():  # trainable_token_indices (lora.trainable_tokens)
        module = model.get_submodule(name)
        if not isinstance(module, TrainableTokensLayer):
            module = TrainableTokensLayer(module)
            set_submodule(model, name, module)
        module.add_adapter(adapter_name, indices)
        for head_name in tied:  # a tied head computes with the same rows (PEFT wraps it with tied_adapter)
            set_submodule(model, head_name, TrainableTokensLayer(model.get_submodule(head_name), tied_to=module))
    configs[adapter_name] = config
    setattr(model, LORA_CONFIGS_ATTR, configs)
    tied = tied_weight_owners(model)
    for name, layer in lora_layers(model):
        layer.shared_weight_with = tied.get(name, [])
    set_active_adapters(model, [adapter_name] if not existing else previous_active)
    return names


def weight_sharers(model: nn.Module, name: str) -> list[str]:
    """Names of the other modules whose parameters share storage with module ``name``'s weight (its base
    layer's, when wrapped), with a trailing ".base_layer" removed: e.g. ["lm_head"] for a tied embed_tokens."""
    module = model.get_submodule(name)
    base = getattr(module, "base_layer", module)
    key = _storage_key(base.weight)
    found = []
    for other, m in model.named_modules():
        if other in (name, f"{name}.base_layer"):
            continue
        if any(p is not None and _storage_key(p) == key for p in m._parameters.values()):
            found.append(other.removesuffix(".base_layer"))
    return list(dict.fromkeys(found))


def tied_heads_to_wrap(model: nn.Module, names: list[str], config: LoraConfig) -> list[tuple[str, str]]:
    """(head name, embedding name) for each targeted embedding whose weight another module shares (a tied
    lm_head). With ``ensure_weight_tying`` the head will read the embedding's adapters (``TiedLoRAHead``);
    without it the tie would be silently broken in training (only the input side adapted), so it is refused.

    Raises:
        ValueError: a tied embedding without ensure_weight_tying; a tied head that is itself a target or already
            carries LoRA.
    """
    pairs = []
    for name in names:
        if not is_embedding(model.get_submodule(name)):
            continue
        for head_name in weight_sharers(model, name):
            head = model.get_submodule(head_name)
            if not config.ensure_weight_tying:
                raise ValueError(f"{name} shares its weight with {head_name} (tied embeddings): LoRA on the embedding "
                                 "alone would adapt the input side only and silently untie them. Set "
                                 "ensure_weight_tying=True to give the tied head the same "
                                 "update, or leave the embedding out of the targets")
            if isinstance(head, TiedLoRAHead):
                continue  # tied by an earlier adapter: it reads every adapter of the embedding
            if head_name in names or isinstance(head, LoRALinear) or not is_linear_like(head):
                raise ValueError(f"{head_name} is tied to {name}: with ensure_weight_tying it gets the embedding's "
                                 "adapter, so it cannot be a target or carry its own LoRA; leave it out of "
                                 "target_modules")
            pairs.append((head_name, name))
    return pairs


def _refuse_shared_targets(model: nn.Module, names: list[str], init: str) -> None:
    """PiSSA/OLoRA rewrite the base weight: refuse when a target's weight is shared (a tied lm_head would
    silently rewrite the input embedding too)."""
    owners: dict[tuple, list[str]] = {}
    for name, module in model.named_modules():
        for p in module._parameters.values():
            if p is not None:
                owners.setdefault(_storage_key(p), []).append(name)
    for name in names:
        weight = getattr(model.get_submodule(name), "weight", None)
        if isinstance(weight, torch.Tensor) and len(owners.get(_storage_key(weight), [])) > 1:
            raise ValueError(f"init_lora_weights={init!r} rewrites the base weight of {name}, which is shared with "
                             f"{[n for n in owners[_storage_key(weight)] if n != name]} (tied embeddings): untie "
                             "them first or leave this module out of target_modules")


def set_active_adapters(model: nn.Module, names: list[str]) -> None:
    """Copy the model-wide active list to every LoRALinear (each skips names it does not carry), then make only
    the active adapters' A/B trainable. The caller has checked the names.

    Raises:
        ValueError: two of ``names`` hold trained copies of one module (modules_to_save); nothing is changed.
    """
    check_one_copy_each(model, names)
    for _, layer in tuner_layers(model):
        layer.set_adapter(names, strict=False)
    for _, wrapper in wrappers(model):
        wrapper.active_adapters = list(names)
    mark_only_lora_trainable(model)


def mark_only_lora_trainable(model: nn.Module) -> None:
    """requires_grad = True exactly for the A/B (and DoRA magnitude) of active adapters; everything else is frozen."""
    trainable = set()
    for _, layer in lora_layers(model):
        for name in layer.active_adapters:
            if name not in layer.lora_A:
                continue  # this adapter does not target this layer
            trainable.update(id(p) for p in layer.lora_A[name].parameters())
            trainable.update(id(p) for p in layer.lora_B[name].parameters())
            if name in layer.lora_magnitude_vector:  # DoRA's magnitude m trains with A and B
                trainable.update(id(p) for p in layer.lora_magnitude_vector[name].parameters())
    for _, layer in embedding_layers(model):
        for name in layer.active_adapters:
            if name in layer.lora_embedding_A:
                trainable.update((id(layer.lora_embedding_A[name]), id(layer.lora_embedding_B[name])))
    for _, layer in token_layers(model):  # trainable_token_indices: the chosen rows
        trainable.update(id(layer.trainable_tokens_delta[n]) for n in layer.active_adapters
                         if n in layer.trainable_tokens_delta)
    for _, wrapper in wrappers(model):  # modules_to_save: the active adapter's copies train in full
        for name in wrapper.active_adapters:
            if name in wrapper.modules_to_save:
                trainable.update(id(p) for p in wrapper.modules_to_save[name].parameters())
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
