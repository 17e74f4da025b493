"""Whole-model NF4: quantize while loading, save and load 4-bit directories, prepare QLoRA.

QLoRA (Dettmers et al. 2023, section 3): every linear layer of the transformer blocks is stored as NF4 with
double quantization and dequantized on the fly; embeddings, norms and the output head stay in 16/32-bit
(transformers' ``get_keys_to_not_convert`` leaves ``lm_head`` out the same way). Here each such
``nn.Linear`` becomes a :class:`qlora.nf4_linear.NF4Linear`.

Quantize while loading: :func:`load_quantized` is ``models.loader.load_model`` with an :class:`NF4Builder`:
the checkpoint is read one decoder layer at a time and each linear weight quantized as soon as it is read, so
peak memory is the quantized model plus one layer in 16/32-bit, never the whole model.

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
and ``config.json`` carries a ``quantization_config`` object (:mod:`qlora.bnb_config`). Loading is strict:
every linear that should be quantized must carry all of its quantization entries, and nothing may be left over.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from finetune_ref.lora.layer import LoRALinear
from finetune_ref.models.checkpoint import (DTYPE_NAMES, SINGLE_FILE, atomic_save_safetensors, atomic_write_text,
                                            parse_dtype)
from finetune_ref.models.loader import LinearBuilder, load_model, module_matches
from finetune_ref.models.config import read_config_json
from finetune_ref.models.llama import LlamaForCausalLM
from finetune_ref.qlora.bnb_config import QUANTIZATION_CONFIG_KEY, BnbQuantizationConfig, read_quantization_config
from finetune_ref.qlora.bnb_format import bnb_linear_keys, from_bnb_state_dict
from finetune_ref.qlora.nf4 import quantize_nf4
from finetune_ref.qlora.nf4_linear import NF4Linear
from finetune_ref.qlora.quant_state import check_blocksize

DEFAULT_BLOCKSIZE = 64  # bitsandbytes' and transformers' default (QLoRA section 3)
DEFAULT_SKIP_MODULES = ("lm_head",)  # transformers leaves the output head unquantized


# --------------------------------------------------------------------------------------------------------
# Which layers, and in-memory quantization
# --------------------------------------------------------------------------------------------------------
def quantizable_linear_names(model: nn.Module, skip_modules: Iterable[str] = DEFAULT_SKIP_MODULES) -> list[str]:
    """Full names of the ``nn.Linear`` modules that quantization replaces: all except ``skip_modules``.

    Raises:
        ValueError: the model already carries LoRA adapters (quantize first, then inject LoRA).
    """
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model carries LoRA adapters; quantize the base model first and inject LoRA after "
                         "(qlora.model.prepare_qlora_model does both in that order)")
    skip = _skip_tuple(skip_modules)
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and not module_matches(n, skip)]


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
    check_blocksize(blocksize, "NF4 quantization")
    if compute_dtype not in DTYPE_NAMES:
        raise TypeError(f"compute_dtype must be one of {list(DTYPE_NAMES)}, got {compute_dtype!r}")


# --------------------------------------------------------------------------------------------------------
# Loading (16/32-bit checkpoints are quantized while loading; 4-bit ones are read as they are)
# --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class NF4Builder(LinearBuilder):
    """Builds every linear not in ``skip_modules`` as an NF4Linear: quantized from its 16/32-bit ``weight``
    (cast to ``dtype`` first) as soon as it is read, or, with ``stored=True``, read from the bitsandbytes
    entries of a 4-bit checkpoint (``blocksize`` None: as stored; otherwise it must match)."""

    skip_modules: tuple[str, ...]
    blocksize: Optional[int]
    double_quant: bool
    compute_dtype: torch.dtype
    dtype: torch.dtype
    stored: bool

    def keys(self, name, linear, present):
        if module_matches(name, self.skip_modules):
            return None
        bias = linear.bias is not None
        if self.stored:
            return bnb_linear_keys(name + ".", double_quant=self.double_quant, bias=bias)
        return [name + ".weight"] + ([name + ".bias"] if bias else [])

    def build(self, name, linear, tensors):
        shape = (linear.out_features, linear.in_features)
        if self.stored:
            # Copies: safetensors returns tensors backed by the file's memory map, which must not outlive loading.
            packed, state, bias = from_bnb_state_dict({k: v.clone() for k, v in tensors.items()}, name + ".")
            if tuple(state.shape) != shape:
                raise ValueError(f"{name}.weight has shape {tuple(state.shape)} in the checkpoint; the config "
                                 f"implies {shape}")
            if state.nested != self.double_quant:
                raise ValueError(f"{name}.weight: double quantization is {state.nested} but quantization_config "
                                 f"says {self.double_quant}")
            if self.blocksize is not None and state.blocksize != self.blocksize:
                raise ValueError(f"{name} is stored with blocksize {state.blocksize}, not the requested "
                                 f"{self.blocksize} (omit blocksize to use the stored one)")
        else:
            weight = tensors[name + ".weight"]
            if tuple(weight.shape) != shape:
                raise ValueError(f"{name}.weight has shape {tuple(weight.shape)} in the checkpoint; the config "
                                 f"implies {shape}")
            try:
                packed, state = quantize_nf4(weight.to(self.dtype), blocksize=self.blocksize,
                                             double_quant=self.double_quant)
            except (ValueError, TypeError) as e:
                raise type(e)(f"{name}.weight: {e}") from e
            bias = tensors.get(name + ".bias")
        if bias is not None:
            if tuple(bias.shape) != (linear.out_features,):
                raise ValueError(f"{name}.bias has shape {tuple(bias.shape)}, expected ({linear.out_features},)")
            bias = bias.to(self.dtype, copy=True)
        return NF4Linear(packed, state, bias, compute_dtype=self.compute_dtype)

    def hint(self, missing, unexpected):
        if self.stored and any(".weight." in k for k in missing):
            return ("a quantized linear lacks quantization entries (every 4-bit weight needs absmax, quant_map, "
                    "the quant_state JSON and, with double quantization, nested_absmax and nested_quant_map)")
        if not self.stored and any(".weight." in k for k in unexpected):
            return "the checkpoint holds 4-bit entries but config.json has no quantization_config"
        return None


def load_quantized(model_dir: str | Path, *, blocksize: Optional[int] = None, double_quant: Optional[bool] = None,
                   compute_dtype: torch.dtype | str = torch.bfloat16, dtype: torch.dtype | str | None = None,
                   skip_modules: Optional[Iterable[str]] = None,
                   on_layer: Optional[Callable[[nn.Module], None]] = None) -> LlamaForCausalLM:
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
        on_layer: called with each decoder layer once quantized (``models.loader.load_model``), e.g. to shard
            its NF4 storage across processes at once (``train.fsdp.shard_nf4_layers``).

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
    qconfig = read_quantization_config(read_config_json(model_dir / "config.json"))
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
    if blocksize is not None:
        _check_settings(blocksize, compute_dtype)
    builder = NF4Builder(skip_modules=_skip_tuple(DEFAULT_SKIP_MODULES if skip_modules is None else skip_modules),
                         blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype, dtype=dtype,
                         stored=qconfig is not None)
    return load_model(model_dir, dtype, linear_builder=builder, on_layer=on_layer)


# --------------------------------------------------------------------------------------------------------
# Saving, measuring, QLoRA
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
                        skip_modules: Optional[Iterable[str]] = None, adapter_name: str = "default",
                        on_layer: Optional[Callable[[nn.Module], None]] = None) -> LlamaForCausalLM:
    """QLoRA (Dettmers et al. 2023, section 3): an NF4 base (:func:`load_quantized`) plus LoRA adapters.

    The base is frozen; only the adapters' A and B train. Dtypes: NF4 matmuls in ``compute_dtype``, unquantized
    weights and activations in ``dtype`` (default ``compute_dtype``), adapters in ``adapter_dtype`` (bf16 by
    default, as the paper; PEFT would use fp32).

    Args:
        lora_config: a ``lora.LoraConfig`` (e.g. ``target_modules="all-linear"``).
        Others: see :func:`load_quantized`; ``adapter_name`` as ``lora.inject_lora``.

    Returns:
        The model (eval mode; ``train.trainer.train`` switches it to train mode).

    Raises:
        As :func:`load_quantized` and ``lora.inject_lora``.
    """
    from finetune_ref.lora import inject_lora

    model = load_quantized(model_dir, blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype,
                           dtype=dtype, skip_modules=skip_modules, on_layer=on_layer)
    inject_lora(model, lora_config, adapter_name=adapter_name, adapter_dtype=adapter_dtype)
    return model
