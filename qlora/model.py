"""Whole-model NF4 quantization: quantize while loading, save and load 4-bit directories, prepare QLoRA.

QLoRA (Dettmers et al. 2023, section 3): every linear layer of the transformer blocks is stored as NF4 with
double quantization and dequantized on the fly; embeddings, norms and the output head stay in 16/32-bit
(transformers' ``get_keys_to_not_convert`` leaves ``lm_head`` out the same way). Here each such
``nn.Linear`` becomes a :class:`qlora.nf4_linear.NF4Linear`.

Quantize while loading. :func:`load_quantized` builds the model on the meta device and reads the
safetensors checkpoint one decoder layer at a time (the file is opened, that layer's tensors are read, the
file is closed again so its memory map does not keep the pages resident). Each linear weight is quantized
as soon as it is read and its dense copy dropped, so peak memory is the quantized model plus one layer in
16/32-bit, never the whole model (measured for SmolLM2 in ``qlora/README_SECTION.md``).

Dtypes, explicitly (QLoRA section 3, "QLoRA has one storage data type (NF4) and a computation data type"):

* ``compute_dtype`` (default bf16): the dtype every NF4 matmul runs in. Not a storage property, so it is
  always the caller's choice; the value saved in ``config.json`` is only for transformers.
* ``dtype`` (default: ``compute_dtype``): the dtype of everything not quantized (embeddings, norms,
  ``lm_head``) and hence of the activations between layers. A linear weight is cast to ``dtype`` *before*
  it is quantized, as transformers' ``from_pretrained(dtype=..., quantization_config=...)`` does, so the NF4
  bytes equal transformers+bitsandbytes' for the same checkpoint and dtype. With the defaults the whole
  forward computes in bf16 (RMSNorm and the loss upcast to fp32 internally).
* LoRA adapters on top get their own dtype (``adapter_dtype``, bf16 by default in :func:`prepare_qlora_model`).

On disk (bitsandbytes/transformers layout): each quantized linear ``p`` is stored as ``p.weight`` (packed
uint8), ``p.weight.absmax``, ``p.weight.quant_map``, ``p.weight.nested_absmax``,
``p.weight.nested_quant_map``, ``p.weight.quant_state.bitsandbytes__nf4`` (see :mod:`qlora.bnb_format`),
and ``config.json`` carries a ``quantization_config`` object spelled as transformers'
``BitsAndBytesConfig.to_dict()`` writes it. Loading is strict: every linear that should be quantized must
carry all of its quantization entries, and nothing may be left over.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from torch import nn

from finetune_ref.lora.layer import LoRALinear
from finetune_ref.models.checkpoint import (SINGLE_FILE, atomic_save_safetensors, atomic_write_text, checkpoint_files,
                               parse_dtype, read_tensors)
from finetune_ref.models.config import LlamaConfig, read_config_json
from finetune_ref.models.llama import LlamaForCausalLM
from finetune_ref.qlora.bnb_format import bnb_linear_keys, from_bnb_state_dict, to_bnb_state_dict
from finetune_ref.qlora.nf4 import quantize_nf4
from finetune_ref.qlora.nf4_linear import NF4Linear
from finetune_ref.qlora.quant_state import SUPPORTED_BLOCKSIZES

DEFAULT_BLOCKSIZE = 64  # bitsandbytes' and transformers' default (QLoRA section 3)
DEFAULT_SKIP_MODULES = ("lm_head",)  # transformers leaves the output head unquantized
QUANTIZATION_CONFIG_KEY = "quantization_config"
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# --------------------------------------------------------------------------------------------------------
# quantization_config in config.json (transformers' BitsAndBytesConfig.to_dict() spelling)
# --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BnbQuantizationConfig:
    """The part of transformers' ``BitsAndBytesConfig`` a 4-bit NF4 checkpoint needs.

    Attributes:
        double_quant: ``bnb_4bit_use_double_quant``.
        compute_dtype: ``bnb_4bit_compute_dtype`` (informational on load: the caller picks the compute dtype).
        skip_modules: ``llm_int8_skip_modules``: linear layers left unquantized (None: transformers' default,
            the output head).
    """

    double_quant: bool = True
    compute_dtype: torch.dtype = torch.bfloat16
    skip_modules: Optional[tuple[str, ...]] = None

    def to_dict(self) -> dict[str, Any]:
        """The object transformers 5.x writes under ``quantization_config`` for a 4-bit NF4 model."""
        return {
            "_load_in_4bit": True,
            "_load_in_8bit": False,
            "bnb_4bit_compute_dtype": _DTYPE_NAMES[self.compute_dtype],
            "bnb_4bit_quant_storage": "uint8",
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": self.double_quant,
            "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False,
            "llm_int8_skip_modules": None if self.skip_modules is None else list(self.skip_modules),
            "llm_int8_threshold": 6.0,
            "load_in_4bit": True,
            "load_in_8bit": False,
            "quant_method": "bitsandbytes",
        }

    @classmethod
    def from_dict(cls, d: Any) -> "BnbQuantizationConfig":
        """Read a ``quantization_config`` object; anything but bitsandbytes 4-bit NF4 in uint8 is refused.

        Raises:
            ValueError: another quantization method, 8-bit, fp4, a non-uint8 quant storage, or a malformed field.
        """
        if not isinstance(d, dict):
            raise ValueError(f"quantization_config must be a JSON object, got {type(d).__name__}")
        if d.get("quant_method") != "bitsandbytes":
            raise ValueError(f"quantization_config.quant_method is {d.get('quant_method')!r}; only 'bitsandbytes' "
                             "4-bit NF4 checkpoints can be loaded")
        if not (d.get("load_in_4bit") or d.get("_load_in_4bit")) or d.get("load_in_8bit") or d.get("_load_in_8bit"):
            raise ValueError("quantization_config is not 4-bit (load_in_4bit must be true, load_in_8bit false); "
                             "8-bit bitsandbytes checkpoints are not supported")
        if d.get("bnb_4bit_quant_type", "fp4") != "nf4":
            raise ValueError(f"quantization_config.bnb_4bit_quant_type is {d.get('bnb_4bit_quant_type', 'fp4')!r}; "
                             "only 'nf4' is supported")
        if d.get("bnb_4bit_quant_storage", "uint8") != "uint8":
            raise ValueError(f"quantization_config.bnb_4bit_quant_storage is {d['bnb_4bit_quant_storage']!r}; "
                             "only 'uint8' is supported")
        double_quant = d.get("bnb_4bit_use_double_quant", False)
        if not isinstance(double_quant, bool):
            raise ValueError(f"quantization_config.bnb_4bit_use_double_quant must be true/false, got {double_quant!r}")
        compute = d.get("bnb_4bit_compute_dtype") or "float32"  # transformers' default when unset
        try:
            compute_dtype = parse_dtype(str(compute).removeprefix("torch."))
        except TypeError as e:
            raise ValueError(f"quantization_config.bnb_4bit_compute_dtype: {e}") from e
        skip = d.get("llm_int8_skip_modules")
        if skip is not None and (not isinstance(skip, list) or not all(isinstance(s, str) and s for s in skip)):
            raise ValueError(f"quantization_config.llm_int8_skip_modules must be null or a list of names, got {skip!r}")
        return cls(double_quant=double_quant, compute_dtype=compute_dtype,
                   skip_modules=None if skip is None else tuple(skip))


def read_quantization_config(config: dict[str, Any]) -> Optional[BnbQuantizationConfig]:
    """The 4-bit settings of a ``config.json`` object, or None for a 16/32-bit checkpoint. Raises as ``from_dict``."""
    q = config.get(QUANTIZATION_CONFIG_KEY)
    return None if q is None else BnbQuantizationConfig.from_dict(q)


def is_quantized_dir(model_dir: str | Path) -> bool:
    """True when ``model_dir/config.json`` declares a bitsandbytes 4-bit checkpoint."""
    return read_quantization_config(read_config_json(Path(model_dir) / "config.json")) is not None


# --------------------------------------------------------------------------------------------------------
# Which layers, and in-memory quantization
# --------------------------------------------------------------------------------------------------------
def _matches(name: str, patterns: Iterable[str]) -> bool:
    # A pattern names a module by its full name or by a suffix of whole components ("lm_head", "mlp.down_proj").
    return any(name == p or name.endswith("." + p) for p in patterns)


def quantizable_linear_names(model: nn.Module, skip_modules: Iterable[str] = DEFAULT_SKIP_MODULES) -> list[str]:
    """Full names of the ``nn.Linear`` modules that quantization replaces: all except ``skip_modules``.

    Raises:
        ValueError: the model already carries LoRA adapters (quantize first, then inject LoRA).
    """
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model carries LoRA adapters; quantize the base model first and inject LoRA after "
                         "(qlora.model.prepare_qlora_model does both in that order)")
    skip = _skip_tuple(skip_modules)
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and not _matches(n, skip)]


def _skip_tuple(skip_modules: Iterable[str] | str) -> tuple[str, ...]:
    skip = (skip_modules,) if isinstance(skip_modules, str) else tuple(skip_modules)
    if not all(isinstance(s, str) and s for s in skip):
        raise TypeError(f"skip_modules must be module names (strings), got {skip_modules!r}")
    return skip


def quantize_model(model: LlamaForCausalLM, *, blocksize: int = DEFAULT_BLOCKSIZE, double_quant: bool = True,
                   compute_dtype: torch.dtype = torch.bfloat16,
                   skip_modules: Iterable[str] = DEFAULT_SKIP_MODULES) -> LlamaForCausalLM:
    """Replace, in place, every ``nn.Linear`` of ``model`` not in ``skip_modules`` by an NF4Linear.

    Layer by layer: each dense weight is freed as soon as its layer is replaced (unless the caller holds it).
    Each weight is quantized in its current dtype (that becomes the state's dtype).

    Returns:
        ``model`` itself.

    Raises:
        ValueError: bad blocksize, non-finite weights (the tensor is named), a target whose weight is shared
            with another module (a tied ``lm_head``), or LoRA adapters already present.
        TypeError: unsupported compute dtype.
    """
    _check_settings(blocksize, compute_dtype)
    names = quantizable_linear_names(model, skip_modules)
    shared = _shared_weight_names(model)
    for name in names:
        if name in shared:
            raise ValueError(f"cannot quantize {name}: its weight is shared with {shared[name]} (tied embeddings); "
                             "leave it out with skip_modules")
        linear = model.get_submodule(name)
        try:
            layer = NF4Linear.from_linear(linear, blocksize=blocksize, double_quant=double_quant,
                                          compute_dtype=compute_dtype)
        except ValueError as e:
            raise ValueError(f"{name}.weight: {e}") from e
        model.set_submodule(name, layer)
    return model


def _shared_weight_names(model: nn.Module) -> dict[str, list[str]]:
    """Linear name -> other modules holding the very same weight tensor (e.g. lm_head -> embed_tokens)."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if weight is not None:
            owners.setdefault(id(weight), []).append(name)
    return {n: [o for o in names if o != n] for names in owners.values() if len(names) > 1 for n in names}


def _check_settings(blocksize: int, compute_dtype: torch.dtype) -> None:
    if isinstance(blocksize, bool) or blocksize not in SUPPORTED_BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {SUPPORTED_BLOCKSIZES}, got {blocksize!r}")
    if compute_dtype not in _DTYPE_NAMES:
        raise TypeError(f"compute_dtype must be one of {list(_DTYPE_NAMES)}, got {compute_dtype!r}")


# --------------------------------------------------------------------------------------------------------
# Loading (16/32-bit checkpoints are quantized while loading; 4-bit ones are read as they are)
# --------------------------------------------------------------------------------------------------------
def load_quantized(model_dir: str | Path, *, blocksize: Optional[int] = None, double_quant: Optional[bool] = None,
                   compute_dtype: torch.dtype | str = torch.bfloat16, dtype: torch.dtype | str | None = None,
                   skip_modules: Optional[Iterable[str]] = None) -> LlamaForCausalLM:
    """Build a ``LlamaForCausalLM`` whose linear layers are NF4, from a 16/32-bit or a 4-bit model directory.

    A 16/32-bit checkpoint is quantized while loading, one decoder layer at a time (see the module docstring);
    a 4-bit checkpoint (``config.json`` with a bitsandbytes ``quantization_config``, as transformers or
    :func:`save_quantized` write it) is loaded as stored.

    Args:
        model_dir: Hugging Face directory (``config.json`` + ``model.safetensors`` or a sharded index).
        blocksize: NF4 block size (32..4096) when quantizing; default 64. For a 4-bit directory the stored
            value is used and a different explicit value is an error.
        double_quant: quantize the absmax values too (QLoRA section 3); default True. For a 4-bit directory
            the stored setting is used and a different explicit value is an error.
        compute_dtype: dtype of the NF4 matmuls (bf16, fp16 or fp32; or 'bf16', ...). Default bf16.
        dtype: dtype of the unquantized tensors and of the weights just before quantization; default
            ``compute_dtype``.
        skip_modules: linear layers to leave unquantized (full names or name suffixes); default ``("lm_head",)``,
            or the checkpoint's ``llm_int8_skip_modules`` for a 4-bit directory.

    Returns:
        The model in eval mode, on the CPU.

    Raises:
        FileNotFoundError: missing directory, config or weight file.
        ValueError: missing, unexpected or wrongly-shaped tensors (named, before any weight is read); a quantized
            linear without all of its quantization entries; settings that contradict the checkpoint;
            non-finite weights; an unsupported quantization_config.
        TypeError: unsupported dtype.
    """
    compute_dtype = parse_dtype(compute_dtype)
    dtype = compute_dtype if dtype is None else parse_dtype(dtype)
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    raw_config = read_config_json(model_dir / "config.json")
    qconfig = read_quantization_config(raw_config)
    if qconfig is not None:
        if double_quant is not None and double_quant != qconfig.double_quant:
            raise ValueError(f"{model_dir} is stored with double_quant={qconfig.double_quant}; it cannot be loaded "
                             f"with double_quant={double_quant} (omit the argument to use the stored setting)")
        double_quant = qconfig.double_quant
        if skip_modules is None:
            skip_modules = qconfig.skip_modules
    blocksize = DEFAULT_BLOCKSIZE if blocksize is None and qconfig is None else blocksize
    double_quant = True if double_quant is None else double_quant
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be True or False, got {double_quant!r}")
    skip_modules = _skip_tuple(DEFAULT_SKIP_MODULES if skip_modules is None else skip_modules)
    if blocksize is not None:
        _check_settings(blocksize, compute_dtype)

    config = LlamaConfig.from_dict(raw_config)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    targets = quantizable_linear_names(model, skip_modules)
    if config.tie_word_embeddings and "lm_head" in targets:
        raise ValueError("lm_head is tied to the input embedding and cannot be quantized; keep it in skip_modules")
    files = checkpoint_files(model_dir)
    expected = _expected_keys(model, targets, quantized=qconfig is not None, double_quant=double_quant)
    _check_keys(model_dir, set(files), expected, config.tie_word_embeddings, qconfig is not None)

    # One group per decoder layer, then everything else (embeddings, final norm, head): at most one layer's
    # source tensors are alive at a time, and each is dropped as soon as its NF4 layer is built.
    groups: dict[str, list[str]] = {}
    for name in files:
        groups.setdefault(_group_of(name), []).append(name)
    for key in sorted(groups, key=lambda k: (k == "", int(k.split(".")[2]) if k else 0)):
        tensors = read_tensors(files, groups[key])
        for name in [t for t in targets if _group_of(t + ".weight") == key]:
            layer = _load_linear(model, name, tensors, qconfig, blocksize, double_quant, compute_dtype, dtype)
            if blocksize is not None and layer.blocksize != blocksize:
                raise ValueError(f"{name} is stored with blocksize {layer.blocksize}, not the requested {blocksize} "
                                 "(omit blocksize to use the stored one)")
            model.set_submodule(name, layer)
            for k in [k for k in tensors if k.startswith(name + ".")]:
                del tensors[k]
        _assign_plain(model, tensors, dtype, config.tie_word_embeddings, model_dir)
        del tensors
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb.reset_inv_freq("cpu")
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:  # cannot happen after _check_keys; a guard against silently uninitialised weights
        raise ValueError(f"{model_dir}: tensors {leftover[:5]} were not loaded")
    return model.eval()


def _group_of(tensor_name: str) -> str:
    """"model.layers.3." for a tensor of decoder layer 3, "" for the rest (embeddings, final norm, head)."""
    parts = tensor_name.split(".")
    return ".".join(parts[:3]) + "." if tensor_name.startswith("model.layers.") and len(parts) > 3 else ""


def _expected_keys(model: nn.Module, targets: list[str], quantized: bool, double_quant: bool) -> set[str]:
    """Every tensor name the checkpoint must hold (tied ``lm_head.weight`` excluded)."""
    keys = set(model.state_dict().keys())
    for name in targets:
        linear = model.get_submodule(name)
        keys.discard(name + ".weight")
        keys.discard(name + ".bias")
        if quantized:
            keys.update(bnb_linear_keys(name + ".", double_quant=double_quant, bias=linear.bias is not None))
        else:
            keys.add(name + ".weight")
            if linear.bias is not None:
                keys.add(name + ".bias")
    if getattr(model.config, "tie_word_embeddings", False):
        keys.discard("lm_head.weight")
    return keys


def _check_keys(model_dir: Path, present: set[str], expected: set[str], tied: bool, quantized: bool) -> None:
    if tied:
        present = present - {"lm_head.weight"}  # allowed; compared with the embedding when read
    missing = sorted(expected - present)
    unexpected = sorted(present - expected)
    if not missing and not unexpected:
        return
    hints = []
    if quantized and any(".weight." in k for k in missing):
        hints.append("a quantized linear lacks quantization entries (every 4-bit weight needs absmax, quant_map, "
                     "the quant_state JSON and, with double quantization, nested_absmax and nested_quant_map)")
    if not quantized and any(".weight." in k for k in unexpected):
        hints.append("the checkpoint holds 4-bit entries but config.json has no quantization_config")
    raise ValueError(f"checkpoint {model_dir} does not match its config: missing tensors {missing[:8]}"
                     f"{' ...' if len(missing) > 8 else ''} ({len(missing)}), unexpected tensors {unexpected[:8]}"
                     f"{' ...' if len(unexpected) > 8 else ''} ({len(unexpected)})"
                     + (f"; {'; '.join(hints)}" if hints else ""))


def _load_linear(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], qconfig, blocksize, double_quant,
                 compute_dtype: torch.dtype, dtype: torch.dtype) -> NF4Linear:
    meta = model.get_submodule(name)
    shape = (meta.out_features, meta.in_features)
    if qconfig is not None:
        # Copies: safetensors returns tensors backed by the file's memory map, which must not outlive this layer.
        own = {k: v.clone() for k, v in tensors.items() if k.startswith(name + ".")}
        packed, state, bias = from_bnb_state_dict(own, name + ".")
        if tuple(state.shape) != shape:
            raise ValueError(f"{name}.weight has shape {tuple(state.shape)} in the checkpoint; the config implies "
                             f"{shape}")
        if state.nested != double_quant:
            raise ValueError(f"{name}.weight: double quantization is {state.nested} but quantization_config says "
                             f"{double_quant}")
    else:
        weight = tensors[name + ".weight"]
        if tuple(weight.shape) != shape:
            raise ValueError(f"{name}.weight has shape {tuple(weight.shape)} in the checkpoint; the config implies "
                             f"{shape}")
        try:
            packed, state = quantize_nf4(weight.to(dtype), blocksize=blocksize, double_quant=double_quant)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{name}.weight: {e}") from e
        bias = tensors.get(name + ".bias")
    if bias is not None:
        if tuple(bias.shape) != (meta.out_features,):
            raise ValueError(f"{name}.bias has shape {tuple(bias.shape)}, expected ({meta.out_features},)")
        bias = bias.to(dtype, copy=True)
    return NF4Linear(packed, state, bias, compute_dtype=compute_dtype)


def _assign_plain(model: nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype, tied: bool,
                  model_dir: Path) -> None:
    """Put the unquantized tensors (embeddings, norms, head) into the meta model, cast to ``dtype``."""
    head = tensors.pop("lm_head.weight", None) if tied else None
    for name, t in tensors.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        current = getattr(module, attr)
        if tuple(t.shape) != tuple(current.shape):
            raise ValueError(f"tensor {name!r} in {model_dir} has shape {tuple(t.shape)}, the config implies "
                             f"{tuple(current.shape)}")
        # A copy even when the dtype already matches: safetensors' tensors are views of the file's memory map,
        # and keeping one would keep every page of the file touched so far resident.
        t = t.to(dtype, copy=True) if t.is_floating_point() else t.clone()
        if isinstance(current, nn.Parameter):
            setattr(module, attr, nn.Parameter(t, requires_grad=current.requires_grad))
        else:
            module.register_buffer(attr, t)
    if head is not None and not torch.equal(head.to(dtype), model.model.embed_tokens.weight):
        raise ValueError("config says tie_word_embeddings=true but the checkpoint's lm_head.weight differs from "
                         "model.embed_tokens.weight; set tie_word_embeddings=false in config.json")


# --------------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------------
def nf4_layers(model: nn.Module) -> list[tuple[str, NF4Linear]]:
    """(name, layer) of every NF4Linear in ``model`` (inside LoRA wrappers too), in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, NF4Linear)]


def save_quantized(model: LlamaForCausalLM, out_dir: str | Path) -> Path:
    """Write a 4-bit model directory that transformers (``BitsAndBytesConfig``) and :func:`load_quantized` read.

    ``config.json`` (with ``quantization_config``) and ``model.safetensors`` (bitsandbytes keys for the NF4
    layers, HF names and the model's dtype for the rest; ``lm_head.weight`` omitted when tied). Each file is
    written atomically. Returns the directory.

    Raises:
        ValueError: the model has no NF4 layer, carries LoRA adapters (save them with ``lora.save_adapter``;
            ``lora.unload`` gives the base back), or mixes double-quantized and plain NF4 layers (one
            ``bnb_4bit_use_double_quant`` cannot describe both).
    """
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model carries LoRA adapters: save them with lora.save_adapter, and the 4-bit base "
                         "after lora.unload(model), or merge first (qlora.merge)")
    layers = nf4_layers(model)
    if not layers:
        raise ValueError("the model has no NF4 layer; save a 16/32-bit model with models.checkpoint.save_model")
    if len({layer.double_quant for _, layer in layers}) > 1 or len({layer.compute_dtype for _, layer in layers}) > 1:
        raise ValueError("all NF4 layers must share double_quant and compute_dtype to be described by one "
                         "quantization_config")
    unquantized = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    skip = None if set(unquantized) <= {"lm_head"} else tuple(unquantized)
    qconfig = BnbQuantizationConfig(double_quant=layers[0][1].double_quant, compute_dtype=layers[0][1].compute_dtype,
                                    skip_modules=skip)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    state = _unshare(state)
    plain = [v.dtype for k, v in state.items() if v.is_floating_point() and ".weight." not in k]
    config = model.config.to_dict()
    dtype_name = str(plain[0] if plain else torch.float32).removeprefix("torch.")
    config["torch_dtype"] = config["dtype"] = dtype_name
    config[QUANTIZATION_CONFIG_KEY] = qconfig.to_dict()
    out_dir = Path(out_dir)
    atomic_save_safetensors(state, out_dir / SINGLE_FILE, metadata={"format": "pt"})
    atomic_write_text(out_dir / "config.json", json.dumps(config, indent=2) + "\n")
    return out_dir


def _unshare(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share memory; a state (e.g. a quant map) may be shared between layers.
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen and v.numel() else v
        seen.add(ptr)
    return out


# --------------------------------------------------------------------------------------------------------
# Memory, QLoRA, and merging into an NF4 base
# --------------------------------------------------------------------------------------------------------
def quantized_nbytes(model: nn.Module) -> dict[str, float]:
    """Measured storage of the NF4 layers: every byte of their packed weights and states (tensors shared
    between layers counted once), against the number of weights they hold.

    Returns:
        ``{"parameters": int, "bytes": int, "bytes_per_parameter": float}``. The QLoRA paper's rate with
        double quantization at blocksize 64 is 4.127 bits = 0.516 bytes per parameter (4.5 bits = 0.5625
        without); the measured value is slightly above because of the per-tensor maps and offset.
    """
    seen: set[int] = set()
    params = nbytes = 0
    for _, layer in nf4_layers(model):
        params += layer.in_features * layer.out_features
        for name in ("weight", "absmax", "quant_map", "offset", "nested_absmax", "nested_quant_map"):
            t = getattr(layer, name)
            if t is None or t.untyped_storage().data_ptr() in seen:
                continue
            seen.add(t.untyped_storage().data_ptr())
            nbytes += t.untyped_storage().nbytes()
    return {"parameters": params, "bytes": nbytes, "bytes_per_parameter": nbytes / params if params else 0.0}


def prepare_qlora_model(model_dir: str | Path, *, lora_config, blocksize: Optional[int] = None,
                        double_quant: Optional[bool] = None, compute_dtype: torch.dtype | str = torch.bfloat16,
                        adapter_dtype: torch.dtype = torch.bfloat16, dtype: torch.dtype | str | None = None,
                        skip_modules: Optional[Iterable[str]] = None,
                        adapter_name: str = "default") -> LlamaForCausalLM:
    """QLoRA (Dettmers et al. 2023, section 3): an NF4 base (:func:`load_quantized`) plus LoRA adapters.

    The base is frozen; only the adapters' A and B train. Dtypes: NF4 matmuls in ``compute_dtype``, unquantized
    weights and activations in ``dtype`` (default ``compute_dtype``), adapters in ``adapter_dtype`` (bf16 by
    default, as the paper; PEFT would use fp32).

    Args:
        lora_config: a ``lora.LoraConfig`` (e.g. ``target_modules="all-linear"``).
        Others: see :func:`load_quantized`; ``adapter_name`` as ``lora.inject_lora``.

    Returns:
        The model (eval mode; ``finetune.trainer.train`` switches it to train mode).

    Raises:
        As :func:`load_quantized` and ``lora.inject_lora``.
    """
    from finetune_ref.lora import inject_lora

    model = load_quantized(model_dir, blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype,
                           dtype=dtype, skip_modules=skip_modules)
    inject_lora(model, lora_config, adapter_name=adapter_name, adapter_dtype=adapter_dtype)
    return model
