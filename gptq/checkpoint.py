"""GPTQ model directories: reading their settings, saving, and loading them with the model loader.

A directory holds ``config.json`` with a ``quantization_config`` (:class:`gptq.format.GPTQConfig`), the same
object in ``quantize_config.json`` (AutoGPTQ's and GPTQModel's file), and ``model.safetensors`` with
``<layer>.qweight/.qzeros/.scales/.g_idx`` for each quantized linear (:mod:`gptq.format`) and the other tensors
(embedding, norms) dense, in fp16 by default, as GPTQ checkpoints are. HF tensor names throughout. Older
AutoGPTQ directories, whose settings live only in ``quantize_config.json``, are read too.

:func:`load_gptq_model` is ``models.loader.load_model`` with a :class:`GPTQBuilder`: one decoder layer is
read at a time, and a linear whose ``qweight`` the checkpoint holds becomes a :class:`gptq.linear.GPTQLinear`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import torch

from finetune_ref.models.checkpoint import SINGLE_FILE, atomic_save_safetensors, atomic_write_text, parse_dtype
from finetune_ref.models.loader import LinearBuilder, load_model
from finetune_ref.models.config import read_config_json
from finetune_ref.models.llama import LlamaForCausalLM
from finetune_ref.gptq.format import GPTQ_KEYS, GPTQConfig, check_gptq_tensors
from finetune_ref.gptq.linear import GPTQLinear, gptq_layers

QUANTIZE_CONFIG_FILE = "quantize_config.json"  # AutoGPTQ's / GPTQModel's copy of the quantization settings


def _gptq_entry(model_dir: Path) -> Optional[dict]:
    """The GPTQ settings object: ``config.json``'s ``quantization_config`` if it is GPTQ, else (older AutoGPTQ
    directories) ``quantize_config.json`` when config.json has no quantization_config at all."""
    q = read_config_json(model_dir / "config.json").get("quantization_config")
    if q is not None:
        return q if isinstance(q, dict) and q.get("quant_method") == "gptq" else None
    path = model_dir / QUANTIZE_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    return d if isinstance(d, dict) and d.get("quant_method", "gptq") == "gptq" and "bits" in d else None


def read_gptq_config(model_dir: str | Path) -> Optional[GPTQConfig]:
    """The GPTQ settings of a model directory (see :func:`_gptq_entry`), or None for a checkpoint that is not
    GPTQ. Raises ValueError for a malformed GPTQ entry, FileNotFoundError without config.json."""
    q = _gptq_entry(Path(model_dir))
    return None if q is None else GPTQConfig.from_dict(q)


def is_gptq_dir(model_dir: str | Path) -> bool:
    """True when the directory declares a GPTQ checkpoint (``quant_method: "gptq"`` in config.json's
    ``quantization_config``, or an AutoGPTQ ``quantize_config.json``)."""
    return _gptq_entry(Path(model_dir)) is not None


def save_gptq_model(model: LlamaForCausalLM, out_dir: str | Path, config: GPTQConfig,
                    dtype: torch.dtype | str = torch.float16) -> Path:
    """Write a GPTQ model directory: ``config.json`` (+ ``quantization_config``), ``quantize_config.json``,
    ``model.safetensors`` (GPTQ tensors as they are; other floating tensors in ``dtype``, fp16 by default;
    ``lm_head.weight`` omitted when tied). Each file is written atomically. Returns the directory.

    Raises:
        ValueError: the model has no GPTQLinear, or a layer's bits / group size / format differ from ``config``.
    """
    dtype = parse_dtype(dtype)
    layers = gptq_layers(model)
    if not layers:
        raise ValueError("the model has no GPTQLinear layer; run gptq_quantize_model first")
    for name, layer in layers:
        if (layer.bits, layer.group_size, layer.checkpoint_format) != (config.bits, config.group_size,
                                                                       config.checkpoint_format):
            raise ValueError(f"{name} is {layer.bits}-bit, group_size {layer.group_size}, format "
                             f"{layer.checkpoint_format}; the config says {config.bits}, {config.group_size}, "
                             f"{config.checkpoint_format}")
    packed = {f"{name}.{key}" for name, _ in layers for key in GPTQ_KEYS}
    state = {k: (v if k in packed or not v.is_floating_point() else v.to(dtype)).detach().cpu().contiguous()
             for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    out_dir = Path(out_dir)
    hf_config = model.config.to_dict()
    hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    hf_config["quantization_config"] = config.to_dict()
    atomic_save_safetensors(state, out_dir / SINGLE_FILE, metadata={"format": "pt"})
    atomic_write_text(out_dir / QUANTIZE_CONFIG_FILE, json.dumps(config.to_dict(), indent=2) + "\n")
    atomic_write_text(out_dir / "config.json", json.dumps(hf_config, indent=2) + "\n")
    return out_dir


@dataclasses.dataclass(frozen=True)
class GPTQBuilder(LinearBuilder):
    """Builds a GPTQLinear for every linear whose ``<name>.qweight`` the checkpoint holds; the others stay dense.
    Biases are kept in ``dtype``."""

    config: GPTQConfig
    dtype: torch.dtype

    def keys(self, name, linear, present):
        if f"{name}.qweight" not in present:
            return None
        return [f"{name}.{k}" for k in GPTQ_KEYS] + ([f"{name}.bias"] if linear.bias is not None else [])

    def build(self, name, linear, tensors):
        own = {k: tensors[f"{name}.{k}"] for k in GPTQ_KEYS}
        out_f, in_f, _ = check_gptq_tensors(own, self.config.bits, name)
        if (out_f, in_f) != (linear.out_features, linear.in_features):
            raise ValueError(f"{name}: the checkpoint layer is ({out_f}, {in_f}), the config implies "
                             f"({linear.out_features}, {linear.in_features})")
        layer = GPTQLinear(in_f, out_f, self.config.bits, self.config.group_size, self.config.checkpoint_format,
                           bias=linear.bias is not None)
        if linear.bias is not None:
            own["bias"] = tensors[f"{name}.bias"].to(self.dtype)
        layer.load_state_dict(own, strict=True)  # copies into the layer's own buffers
        return layer

    def hint(self, missing, unexpected):
        incomplete: dict[str, list[str]] = {}
        for key in missing:
            name, _, entry = key.rpartition(".")
            if entry in GPTQ_KEYS:
                incomplete.setdefault(name, []).append(entry)
        notes = [f"{name}: missing GPTQ tensors {entries}" for name, entries in incomplete.items()]
        stray = [k for k in unexpected if k.rpartition(".")[2] in GPTQ_KEYS]
        if stray:
            notes.append(f"GPTQ tensors {stray[:4]} belong to no linear layer of this model")
        return "; ".join(notes) or None


def load_gptq_model(model_dir: str | Path, dtype: torch.dtype | str = torch.float32) -> LlamaForCausalLM:
    """Build a ``LlamaForCausalLM`` with GPTQLinear layers from a GPTQ model directory (ours, or AutoGPTQ /
    GPTQModel output for a Llama with the same tensor names, v1 or v2 format, no ``lm_head`` quantization).

    Args:
        model_dir: directory with ``config.json`` (GPTQ ``quantization_config``) and safetensors weights.
        dtype: dtype of the dense tensors and biases (the GPTQ layers dequantize to their input's dtype).
    Raises:
        FileNotFoundError: missing directory or files. ValueError: not a GPTQ checkpoint, missing, unexpected,
        or wrongly shaped tensors (named), unreadable files. TypeError: unsupported dtype.
    """
    dtype = parse_dtype(dtype)
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    qconfig = read_gptq_config(model_dir)
    if qconfig is None:
        raise ValueError(f"{model_dir} has no GPTQ quantization_config (config.json) or quantize_config.json; "
                         "load it with models.loader.load_model (16/32-bit) or qlora.model.load_quantized (NF4)")
    model = load_model(model_dir, dtype, linear_builder=GPTQBuilder(qconfig, dtype))
    if not gptq_layers(model):
        raise ValueError(f"{model_dir} declares GPTQ but holds no '*.qweight' tensor")
    return model
