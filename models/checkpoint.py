"""Hugging Face model directories (``config.json`` + safetensors): reading and writing the files.

A directory holds ``config.json`` and either one ``model.safetensors`` or shards listed in
``model.safetensors.index.json`` (``{"weight_map": {tensor name: file name}}``), the layout transformers'
``save_pretrained`` writes; tensors carry HF names. Building a model from such a directory is
``models/loader.py`` (``load_model``); this file has the pieces it reads and writes with: which file holds each
tensor, reading tensors, the dtype names of ``config.json``, atomic writes, and ``save_model``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .llama import LlamaForCausalLM

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}  # config.json's
SUPPORTED_DTYPES = tuple(DTYPE_NAMES)
_SHORT_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """'fp32'/'float32'/'bf16'/'bfloat16'/'fp16'/'float16' or a torch dtype -> torch dtype (TypeError otherwise)."""
    names = {**_SHORT_NAMES, **{name: dt for dt, name in DTYPE_NAMES.items()}}
    if isinstance(dtype, str):
        if dtype not in names:
            raise TypeError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
        return names[dtype]
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
    return dtype


# --------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------
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


def read_safetensors(path: Path, keys: Optional[Iterable[str]] = None) -> dict[str, torch.Tensor]:
    """The tensors ``keys`` (default: all) of one safetensors file, as safetensors returns them (possibly views of
    the file's memory map: copy what you keep). The file is open for this call only, so its memory map is released
    afterwards. Raises ValueError for an unreadable (truncated, corrupt) file or an absent tensor."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys()) if keys is None else list(keys)
            absent = sorted(set(keys) - set(f.keys()))
            if absent:
                raise ValueError(f"tensors {absent[:5]} are listed in the index but absent from {Path(path).name}")
            return {key: f.get_tensor(key) for key in keys}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e


def read_tensors(files: dict[str, Path], names: list[str]) -> dict[str, torch.Tensor]:
    """The tensors ``names`` from their files (``checkpoint_files``), each file read by ``read_safetensors``."""
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    return {k: v for path, keys in by_file.items() for k, v in read_safetensors(path, keys).items()}


def check_finite_tensors(tensors: dict[str, torch.Tensor], where: str | Path) -> None:
    """Raise ValueError naming the first floating tensor that holds NaN or inf: a corrupt or diverged checkpoint
    would otherwise give a NaN loss many steps later. One reduction per tensor (cheap beside reading it)."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"tensor {name!r} in {where} holds NaN or inf ({bad} of {t.numel()} values): the "
                             "file is corrupt or was saved from a run that diverged")


def load_state_dict(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Read every tensor of a checkpoint directory, cast to ``dtype`` (floating tensors only)."""
    files = checkpoint_files(Path(model_dir))
    return {name: (t.to(dtype) if t.is_floating_point() else t) for name, t in read_tensors(files, list(files)).items()}


# --------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------
def make_readable(path: str | Path) -> None:
    """Give a file or directory made private (0600/0700) by ``tempfile.mkstemp``/``mkdtemp`` or safetensors'
    ``save_file`` the mode ``open`` or ``mkdir`` would have given it: 0666/0777 less the umask (0644/0755 under the usual 022), so that a result
    renamed into place reads like any other file."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask)


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """safetensors ``save_file`` into a temp file in the same directory, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        make_readable(tmp)  # safetensors writes 0600 (its own temp file), whatever the umask
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) into a temp file in the same directory, fsync it, then rename it over ``path``: a
    crash leaves either the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    make_readable(tmp)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
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


def weights_fingerprint(model_dir: str | Path, samples: int = 16, sample_bytes: int = 1 << 16) -> str:
    """A cheap content fingerprint of a model directory: SHA-256 over ``config.json`` and, for every
    ``*.safetensors`` file, its name, size, header (tensor names, dtypes, shapes, offsets) and ``samples``
    evenly spaced chunks of ``sample_bytes`` of its tensor data (1 MiB per file by default).

    Why not a full hash: it reads ~1 MiB per file in milliseconds, where hashing a 7B checkpoint reads 14 GB.
    Another base with the same architecture (identical config and header) differs in the sampled weights; what
    it misses is a change confined to bytes between the samples (e.g. one edited tensor of many).
    """
    import hashlib

    model_dir = Path(model_dir)
    h = hashlib.sha256()
    config = model_dir / "config.json"
    h.update(config.read_bytes() if config.is_file() else b"")
    for path in sorted(model_dir.glob("*.safetensors")):
        size = path.stat().st_size
        h.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            start = 8 + min(header_len, size)
            f.seek(8)
            h.update(f.read(start - 8))
            span = max(size - start - sample_bytes, 0)
            for i in range(samples):
                f.seek(start + span * i // max(samples - 1, 1))
                h.update(f.read(sample_bytes))
    return h.hexdigest()
