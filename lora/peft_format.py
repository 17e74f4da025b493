"""Saving and loading adapters in Hugging Face PEFT's on-disk format, strictly.

A PEFT LoRA adapter directory (peft/peft_model.py ``save_pretrained``, peft/utils/save_and_load.py
``get_peft_model_state_dict`` / ``set_peft_model_state_dict``) holds two files:

  adapter_config.json         {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": [...], ...}
  adapter_model.safetensors   for every adapted module <path> (its name in the base model, HF spelling):
                                base_model.model.<path>.lora_A.weight   (r, in_features)
                                base_model.model.<path>.lora_B.weight   (out_features, r)
                                base_model.model.<path>.lora_magnitude_vector   (out_features,)  DoRA only
                                  (no ".weight": PEFT's file spelling; in memory it is
                                  <path>.lora_magnitude_vector.<name>.weight, peft/tuners/lora/model.py)

The adapter's name ("default") is not in the file keys; in memory the keys are ``<path>.lora_A.<name>.weight``.
Conversion touches only the fixed prefix and the trailing ``lora_A|lora_B .weight`` part, so module paths that
themselves contain "weight" or "lora" survive unchanged.

Loading is strict: the config is turned into the set of modules it targets on *this* model (``lora.inject``
rules, the same as PEFT's), and the file must hold exactly an A and a B of the right shape for each of them.
Missing or unexpected tensors and wrong shapes are reported together in one ValueError, before the model is
touched. Files are written atomically (a temp file in the same directory, then ``os.replace``; the writers of
``models.checkpoint``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from finetune_ref.lora.adapters import freeze_adapter, set_adapter
from finetune_ref.lora.base_weight import is_quantized
from finetune_ref.lora.config import LoraConfig, uses_all_linear
from finetune_ref.lora.init import converted_lora, is_mutating_init
from finetune_ref.lora.inject import (candidate_modules, embedding_layers, find_target_modules, get_lora_configs,
                                      inject_lora, is_embedding, lora_layers, rank_and_alpha, tied_heads,
                                      token_layers, weight_sharers)
from finetune_ref.lora.embedding import TiedLoRAHead
from finetune_ref.lora.trainable_tokens import token_targets
from finetune_ref.lora.modules_to_save import (check_disjoint_copies, check_legacy_suffix_choice, modules_to_save_of,
                                              wrappers)
from finetune_ref.models.checkpoint import atomic_save_safetensors, atomic_write_text, check_finite_tensors

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel.base_model (LoraModel) .model (the transformers model)
MAGNITUDE = "lora_magnitude_vector"  # DoRA's m (Liu et al. 2024, section 4)
EMBEDDING_PARTS = ("lora_embedding_A", "lora_embedding_B")  # LoRA on an nn.Embedding (lora.embedding)
TOKENS_KEY = "token_adapter.trainable_tokens_delta"  # trainable_token_indices' rows (PEFT's TrainableTokensWrapper)
# Parameters without a ".weight" in the file (and, except m, in memory: nn.ParameterDict entries).
_FILE_SUFFIX = {"lora_A": ".lora_A.weight", "lora_B": ".lora_B.weight", MAGNITUDE: f".{MAGNITUDE}",
                **{part: f".{part}" for part in EMBEDDING_PARTS}}


# ---- key names ----

def peft_key(module_name: str, part: str) -> str:
    """File key of one LoRA tensor: ("model.layers.0.self_attn.q_proj", "lora_A") ->
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"; a DoRA magnitude has no ".weight"."""
    if part not in _FILE_SUFFIX:
        raise ValueError(f"part must be one of {tuple(_FILE_SUFFIX)}, got {part!r}")
    return f"{PEFT_PREFIX}{module_name}{_FILE_SUFFIX[part]}"


def parse_peft_key(key: str) -> tuple[str, str]:
    """Inverse of ``peft_key``: file key -> (module path, "lora_A" | "lora_B" | "lora_magnitude_vector").

    Raises:
        ValueError: the key is not a PEFT LoRA key (e.g. a bias, a modules_to_save tensor or a key without the
            "base_model.model." prefix).
    """
    for part, suffix in _FILE_SUFFIX.items():
        if key.startswith(PEFT_PREFIX) and key.endswith(suffix) and len(key) > len(PEFT_PREFIX) + len(suffix):
            return key[len(PEFT_PREFIX):-len(suffix)], part
    raise ValueError(f"{key!r} is not a LoRA weight key of the form "
                     f"'{PEFT_PREFIX}<module path>.lora_A.weight' or '...lora_B.weight'")


def module_key_to_peft_key(key: str, adapter_name: str) -> str:
    """In-memory state-dict key -> file key.

    "<path>.lora_A.<adapter>.weight" -> "base_model.model.<path>.lora_A.weight" (only the prefix and the
    trailing part change, so a <path> containing "weight" or "lora" survives);
    "<path>.lora_magnitude_vector.<adapter>.weight" -> "base_model.model.<path>.lora_magnitude_vector".
    """
    for part in _FILE_SUFFIX:
        suffix = f".{part}.{adapter_name}" + ("" if part in EMBEDDING_PARTS else ".weight")
        if key.endswith(suffix) and len(key) > len(suffix):
            return peft_key(key[:-len(suffix)], part)
    raise ValueError(f"{key!r} is not the key of a LoRA matrix of adapter {adapter_name!r} "
                     f"('<module path>.lora_A.{adapter_name}.weight')")


def peft_key_to_module_key(key: str, adapter_name: str) -> str:
    """File key -> in-memory state-dict key (inverse of ``module_key_to_peft_key``)."""
    module_name, part = parse_peft_key(key)
    return f"{module_name}.{part}.{adapter_name}" + ("" if part in EMBEDDING_PARTS else ".weight")


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """{file key: tensor} of one adapter, in PEFT's naming (tensors detached, in their own dtype/device)."""
    state = {}
    for name, layer in lora_layers(model):
        if adapter_name in layer.adapter_names:
            state[peft_key(name, "lora_A")] = layer.lora_A[adapter_name].weight.detach()
            state[peft_key(name, "lora_B")] = layer.lora_B[adapter_name].weight.detach()
            if adapter_name in layer.lora_magnitude_vector:
                state[peft_key(name, MAGNITUDE)] = layer.lora_magnitude_vector[adapter_name].weight.detach()
    for name, layer in embedding_layers(model):
        if adapter_name in layer.adapter_names:
            state[peft_key(name, "lora_embedding_A")] = layer.lora_embedding_A[adapter_name].detach()
            state[peft_key(name, "lora_embedding_B")] = layer.lora_embedding_B[adapter_name].detach()
    for name, head in tied_heads(model):  # ensure_weight_tying: PEFT also writes the tied head's A = B_e^T, B = A_e^T
        if isinstance(head, TiedLoRAHead) and adapter_name in head.embedding.adapter_names:
            state[peft_key(name, "lora_A")] = head.embedding.lora_embedding_B[adapter_name].detach().T.contiguous()
            state[peft_key(name, "lora_B")] = head.embedding.lora_embedding_A[adapter_name].detach().T.contiguous()
    for name, layer in token_layers(model):  # trainable_token_indices: the rows' values (lora.trainable_tokens)
        if adapter_name in layer.adapter_names:
            state[f"{PEFT_PREFIX}{name}.{TOKENS_KEY}"] = layer.trainable_tokens_delta[adapter_name].detach()
    for name, wrapper in wrappers(model):  # modules_to_save copies, under the module's own name (PEFT)
        if adapter_name in wrapper.modules_to_save:
            for pname, p in wrapper.modules_to_save[adapter_name].named_parameters():
                state[f"{PEFT_PREFIX}{name}.{pname}"] = p.detach()
    if not state:
        raise ValueError(f"the model has no adapter named {adapter_name!r}")
    return state


# ---- save ----

def save_adapter(model: nn.Module, save_directory: str | os.PathLike, adapter_name: str = "default",
                 base_model_name_or_path: str | None = None, metadata: dict[str, str] | None = None) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` for one adapter, as PEFT would.

    target_modules is written as configured, except that "all-linear" (or a config whose matching would not
    give back exactly the adapted modules on reload) is written as the explicit list of module paths, as PEFT
    itself does for "all-linear".

    Args:
        base_model_name_or_path: recorded in the config (default: the config's own value).
        metadata: extra string entries for the safetensors header (besides PEFT's ``format: pt``).

    Returns:
        The directory.

    Raises:
        ValueError: no such adapter on the model (or it was not made by ``inject_lora``/``load_adapter``).
    """
    configs = get_lora_configs(model)
    if adapter_name not in configs:
        raise ValueError(f"no LoRA config recorded for adapter {adapter_name!r} (known: {list(configs)}); "
                         "adapters must be added with lora.inject_lora or lora.load_adapter")
    config = configs[adapter_name]
    tensors = adapter_state_dict(model, adapter_name)
    modules = sorted(n for n, layer in [*lora_layers(model), *embedding_layers(model)]
                     if adapter_name in layer.adapter_names)
    targets = config.target_modules
    if uses_all_linear(targets) or sorted(find_target_modules(model, config, strict_patterns=False)) != modules:
        targets = modules
    if is_mutating_init(config.init_lora_weights):
        config, tensors = _converted_to_plain_lora(model, config, adapter_name, tensors)
    peft_dict = config.to_peft_dict(target_modules=targets)
    if base_model_name_or_path is not None:
        peft_dict["base_model_name_or_path"] = base_model_name_or_path
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.to("cpu") for k, v in tensors.items()}
    atomic_save_safetensors(cpu, out / ADAPTER_WEIGHTS_NAME, metadata={**(metadata or {}), "format": "pt"})
    atomic_write_text(out / ADAPTER_CONFIG_NAME, json.dumps(peft_dict, indent=2, sort_keys=True) + "\n")
    return out


def _converted_to_plain_lora(model: nn.Module, config: LoraConfig, adapter_name: str,
                             tensors: dict[str, torch.Tensor]) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """A PiSSA/OLoRA adapter as the rank-2r plain LoRA on the *original* base (lora.init; PEFT's
    ``path_initial_model_for_weight_conversion``): r and rank_pattern doubled, lora_alpha and alpha_pattern
    doubled (times sqrt(2) with rsLoRA) so that the scaling is unchanged, init_lora_weights True.

    Raises:
        ValueError: a layer no longer knows its initial A0/B0 (e.g. the adapter was loaded from a file).
    """
    converted = dict(tensors)
    for name, layer in lora_layers(model):
        if adapter_name not in layer.adapter_names:
            continue
        if is_quantized(layer.base_layer):
            raise ValueError(f"adapter {adapter_name!r} was initialised with {config.init_lora_weights!r} on a 4-bit "
                             f"base ({name}), whose residual W - s B0 A0 was quantized again: as a plain LoRA on the "
                             "original 4-bit base (PEFT's path_initial_model_for_weight_conversion) it would be off "
                             "by that rounding, about one NF4 step per weight. Keep the rewritten base instead: "
                             "lora.adopt_rewritten_base, then save the 4-bit base beside the adapter "
                             "(finetune train --method qlora --init olora does)")
        if adapter_name not in layer.initial_lora:
            raise ValueError(f"adapter {adapter_name!r} was initialised with {config.init_lora_weights!r}, which "
                             f"rewrote the base weights, but {name} no longer has its initial A0/B0: it cannot be "
                             "saved as an adapter on the original base")
        key_a, key_b = peft_key(name, "lora_A"), peft_key(name, "lora_B")
        converted[key_a], converted[key_b] = converted_lora(tensors[key_a], tensors[key_b],
                                                            *layer.initial_lora[adapter_name])
    factor = 2 ** 0.5 if config.use_rslora else 2
    return dataclasses.replace(
        config, r=2 * config.r, lora_alpha=factor * config.lora_alpha, init_lora_weights=True,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: factor * v for k, v in config.alpha_pattern.items()}), converted


# ---- load ----

def read_adapter_config(directory: str | os.PathLike) -> LoraConfig:
    """Parse ``<directory>/adapter_config.json``.

    Raises:
        FileNotFoundError: no directory or no config file.
        ValueError: invalid JSON, or a config lora/ cannot honour (see ``LoraConfig.from_peft_dict``).
    """
    path = Path(directory) / ADAPTER_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: an adapter directory needs {ADAPTER_CONFIG_NAME} and "
                                f"{ADAPTER_WEIGHTS_NAME}")
    try:
        return LoraConfig.from_peft_dict(json.loads(path.read_text(encoding="utf-8")))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    except (ValueError, TypeError) as e:  # a bad r, lora_alpha, ...: said with the file it came from
        raise ValueError(f"{path}: {e}") from None


def read_adapter_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """{file key: tensor} from ``<directory>/adapter_model.safetensors`` (CPU). Raises ValueError for an
    unreadable file or a NaN/inf weight (named)."""
    path = Path(directory) / ADAPTER_WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (only the safetensors format is read, never pickle)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    check_finite_tensors(tensors, path)
    return tensors


def check_adapter_weights(model: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Check that ``tensors`` hold exactly the A/B matrices ``config`` implies on ``model``; return the modules.

    Raises:
        ValueError: in one line, how many keys are missing, unexpected, misshapen or not floating (the first of
            each), and the base model the adapter records.
    """
    modules, candidates = find_target_modules(model, config, strict_patterns=False), candidate_modules(model)
    check_legacy_suffix_choice(config.modules_to_save or [], candidates, list(tensors), PEFT_PREFIX)
    expected = {}
    for name in modules_to_save_of(model, config.modules_to_save, candidates, modules):
        module = model.get_submodule(name)
        module = getattr(module, "original_module", module)  # already wrapped for another adapter
        for pname, p in module.named_parameters():
            expected[f"{PEFT_PREFIX}{name}.{pname}"] = tuple(p.shape)
    optional = {}  # PEFT's save_embedding_layers: the base embedding (and tied head) weights, if present
    for name in modules:
        target = model.get_submodule(name)
        r, _ = rank_and_alpha(config, name)
        if is_embedding(target):  # lora.embedding: A (r, V), B (D, r); a tied head reads them transposed
            base = getattr(target, "base_layer", target)
            expected[peft_key(name, "lora_embedding_A")] = (r, base.num_embeddings)
            expected[peft_key(name, "lora_embedding_B")] = (base.embedding_dim, r)
            optional[f"{PEFT_PREFIX}{name}.base_layer.weight"] = base.weight
            for head in weight_sharers(model, name) if config.ensure_weight_tying else ():
                expected[peft_key(head, "lora_A")] = (r, base.embedding_dim)
                expected[peft_key(head, "lora_B")] = (base.num_embeddings, r)
                optional[f"{PEFT_PREFIX}{head}.base_layer.weight"] = base.weight
            continue
        expected[peft_key(name, "lora_A")] = (r, target.in_features)
        expected[peft_key(name, "lora_B")] = (target.out_features, r)
        if config.use_dora:
            expected[peft_key(name, MAGNITUDE)] = (target.out_features,)
    for name, (indices, _) in token_targets(model, config.trainable_token_indices, modules).items():
        base = model.get_submodule(name)
        base = getattr(base, "base_layer", base)
        expected[f"{PEFT_PREFIX}{name}.{TOKENS_KEY}"] = (len(indices), base.embedding_dim)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected) - set(optional))
    for key in sorted(set(optional) & set(tensors)):
        if tensors[key].shape != optional[key].shape or not torch.equal(tensors[key].to(optional[key]), optional[key]):
            raise ValueError(f"{key} is a base embedding saved with the adapter (PEFT's save_embedding_layers) that "
                             "differs from this model's: the adapter was trained on a resized or changed vocabulary, "
                             "which is not supported here. Load it on the model it was trained on")
    common = sorted(set(expected) & set(tensors))
    misshapen = [f"{k} is {tuple(tensors[k].shape)}, expected {expected[k]}" for k in common
                 if tuple(tensors[k].shape) != expected[k]]
    wrong_dtype = [f"{k} is {tensors[k].dtype}" for k in common if not tensors[k].is_floating_point()]
    # One short line: counts, and the first of each kind (a whole list of keys helps nobody).
    problems = [f"{len(items)} {what} (first: {items[0]})" for what, items in (
        ("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen), ("not floating", wrong_dtype))
        if items]
    if problems:
        base = config.base_model_name_or_path
        raise ValueError("the adapter does not fit this model: " + "; ".join(problems) + ". "
                         + (f"It was trained on {base}" if base else "Was it trained on another base model?"))
    return modules


def load_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default",
                 adapter_dtype: torch.dtype = torch.float32, is_trainable: bool = False) -> list[str]:
    """Load a PEFT-format adapter (saved by PEFT or by ``save_adapter``) into ``model`` as ``adapter_name``.

    Everything is checked before the model is changed. As with ``inject_lora``, the model's first adapter
    becomes active; later ones are added inactive (``lora.adapters.set_adapter`` switches).

    Args:
        adapter_dtype: dtype of the loaded A/B (fp32 by default, as PEFT's autocast_adapter_dtype).
        is_trainable: leave this adapter's A/B with requires_grad (default False: loaded for inference, like
            PEFT's ``PeftModel.from_pretrained``).

    Returns:
        The adapted module paths.

    Raises:
        FileNotFoundError: missing directory or file.
        ValueError: unsupported config; missing/unexpected/misshapen tensors; the adapter name is taken.
    """
    config = read_adapter_config(directory)
    tensors = read_adapter_weights(directory)
    try:
        check_adapter_weights(model, config, tensors)
    except ValueError as e:
        raise ValueError(f"{directory}: {e}") from None
    modules = inject_lora(model, config, adapter_name=adapter_name, adapter_dtype=adapter_dtype,
                          strict_patterns=False)
    layers = dict(lora_layers(model))
    with torch.no_grad():
        for name in (n for n in modules if n in layers):
            layers[name].lora_A[adapter_name].weight.copy_(tensors[peft_key(name, "lora_A")])
            layers[name].lora_B[adapter_name].weight.copy_(tensors[peft_key(name, "lora_B")])
            if config.use_dora:
                layers[name].lora_magnitude_vector[adapter_name].weight.copy_(tensors[peft_key(name, MAGNITUDE)])
        for name, layer in embedding_layers(model):
            if adapter_name in layer.adapter_names:
                for part in EMBEDDING_PARTS:
                    getattr(layer, part)[adapter_name].copy_(tensors[peft_key(name, part)])
        for name, layer in token_layers(model):
            if adapter_name in layer.adapter_names:
                layer.trainable_tokens_delta[adapter_name].copy_(tensors[f"{PEFT_PREFIX}{name}.{TOKENS_KEY}"])
        for name, wrapper in wrappers(model):
            if adapter_name in wrapper.modules_to_save:
                for pname, p in wrapper.modules_to_save[adapter_name].named_parameters():
                    p.copy_(tensors[f"{PEFT_PREFIX}{name}.{pname}"])
    if not is_trainable:
        freeze_adapter(model, adapter_name)
    return modules


def load_adapters(model: nn.Module, directories: Sequence[str | os.PathLike],
                  adapter_names: Sequence[str] | None = None, adapter_dtype: torch.dtype = torch.float32,
                  is_trainable: bool = False) -> list[str]:
    """Load several adapters and activate them all (their updates are summed). Returns their names.

    Default names: "default" for a single directory, else "adapter_0", "adapter_1", ... in order.

    Raises:
        ValueError: names and directories differ in number, or as ``load_adapter``.
    """
    directories = list(directories)
    if not directories:
        raise ValueError("load_adapters needs at least one adapter directory")
    if adapter_names is None:
        adapter_names = ["default"] if len(directories) == 1 else [f"adapter_{i}" for i in range(len(directories))]
    adapter_names = list(adapter_names)
    if len(adapter_names) != len(directories):
        raise ValueError(f"got {len(directories)} adapter directories but {len(adapter_names)} names")
    check_disjoint_copies(model, {str(d): read_adapter_config(d).modules_to_save for d in directories})
    for directory, name in zip(directories, adapter_names):
        load_adapter(model, directory, adapter_name=name, adapter_dtype=adapter_dtype, is_trainable=is_trainable)
    set_adapter(model, adapter_names)
    if not is_trainable:
        for name in adapter_names:
            freeze_adapter(model, name)
    return adapter_names
