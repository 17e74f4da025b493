"""Load and save Hugging Face-format model directories (``config.json`` + safetensors).

A directory holds ``config.json`` and either one ``model.safetensors`` or shards listed in
``model.safetensors.index.json`` (``{"weight_map": {tensor name: file name}}``), the layout transformers'
``save_pretrained`` writes. Loading is all-or-nothing: every tensor is read and checked (name, shape, finite
file) before the model is returned, so a bad checkpoint raises an error naming the tensor or file and never
yields a half-loaded model. The model is built on the meta device and the loaded tensors are assigned in place,
so peak memory is one copy of the weights in the requested dtype.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import LlamaConfig
from .llama import LlamaForCausalLM

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """'fp32'/'float32'/'bf16'/'bfloat16'/'fp16'/'float16' or a torch dtype -> torch dtype (TypeError otherwise)."""
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if isinstance(dtype, str):
        if dtype not in names:
            raise TypeError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
        return names[dtype]
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
    return dtype


def checkpoint_files(model_dir: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file holding it. Raises FileNotFoundError / ValueError."""
    single, index = model_dir / SINGLE_FILE, model_dir / INDEX_FILE
    if single.is_file():
        try:
            with safe_open(single, framework="pt") as f:
                return {name: single for name in f.keys()}
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{single} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index (needs a 'weight_map' object): {e}") from e
        files = {name: model_dir / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise FileNotFoundError(f"shard {shard.name} listed in {index} is missing from {model_dir}")
        return files
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {model_dir}")


def read_tensors(files: dict[str, Path], names: list[str]) -> dict[str, torch.Tensor]:
    """The tensors ``names`` from their files (``checkpoint_files``); each file is opened for this call only, so
    its memory map is released afterwards. Raises ValueError for an unreadable (truncated, corrupt) file."""
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    out = {}
    for path, keys in by_file.items():
        try:
            with safe_open(path, framework="pt") as f:
                for key in keys:
                    out[key] = f.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    return out




def load_state_dict(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Read every tensor of a checkpoint directory, cast to ``dtype`` (floating tensors only)."""
    model_dir = Path(model_dir)
    files = checkpoint_files(model_dir)
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    state = {}
    for path, names in by_file.items():
        try:
            with safe_open(path, framework="pt") as f:
                present = set(f.keys())
                for name in names:
                    if name not in present:
                        raise ValueError(f"tensor {name!r} is listed in the index but absent from {path.name}")
                    t = f.get_tensor(name)
                    state[name] = t.to(dtype) if t.is_floating_point() else t
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    return state


def load_model(model_dir: str | Path, dtype: torch.dtype | str = torch.float32) -> LlamaForCausalLM:
    """Build a ``LlamaForCausalLM`` from a Hugging Face directory.

    Args:
        model_dir: directory with ``config.json`` and ``model.safetensors`` (or a sharded index).
        dtype: float32, bfloat16 or float16 (or 'fp32'/'bf16'/'fp16'); every floating tensor is cast to it.

    Raises:
        FileNotFoundError: directory, config or a weight file is missing.
        ValueError: unsupported config field; missing, unexpected or wrongly-shaped tensors (all named);
            unreadable file.
        TypeError: unsupported dtype.
    """
    dtype = parse_dtype(dtype)
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    config = LlamaConfig.from_json_file(model_dir / "config.json")
    state = load_state_dict(model_dir, dtype)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    expected = {name: p.shape for name, p in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")  # the same tensor as model.embed_tokens.weight
        extra = state.pop("lm_head.weight", None)
        emb = state.get("model.embed_tokens.weight")
        if extra is not None and emb is not None and not torch.equal(extra, emb):
            raise ValueError("config says tie_word_embeddings=true but the checkpoint's lm_head.weight differs "
                             "from model.embed_tokens.weight; set tie_word_embeddings=false in config.json")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint {model_dir} does not match its config: missing tensors {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''}, unexpected tensors {unexpected[:10]}"
                         f"{' ...' if len(unexpected) > 10 else ''}")
    for name, shape in expected.items():
        if state[name].shape != shape:
            raise ValueError(f"tensor {name!r} in {model_dir} has shape {tuple(state[name].shape)}, "
                             f"the config implies {tuple(shape)}")
    model.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # assign=True broke the tie; restore it
    model.model.rotary_emb.reset_inv_freq("cpu")
    return model.eval()


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """safetensors ``save_file`` into a temp file in the same directory, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_model(model: LlamaForCausalLM, out_dir: str | Path, dtype: torch.dtype | str | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (HF names; ``lm_head.weight`` omitted when tied).

    Each file is written atomically. Returns the directory.
    """
    out_dir = Path(out_dir)
    dtype = parse_dtype(dtype) if dtype is not None else None
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu()
             for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    config = model.config.to_dict()
    config["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    atomic_save_safetensors(state, out_dir / SINGLE_FILE, metadata={"format": "pt"})
    atomic_write_text(out_dir / "config.json", json.dumps(config, indent=2) + "\n")
    return out_dir
