"""A training checkpoint on disk: its file names, fsync, and finding and verifying one (files are written with
models.checkpoint.atomic_write_text and safetensors).

Integrity: every file of a checkpoint is fsync'ed, the directory is renamed into place (``replace_dir``) and
``latest`` rewritten by temp file + rename (``atomic_write_text``), so a crash leaves the previous checkpoint or
the new one, never a half-written one under a final name. ``read_checkpoint_record`` checks the format, and
every file's size and SHA-256 against what was recorded when it was written (``trainer_state.json`` itself
holds the SHA-256 of its other keys), before anything is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from finetune_ref.models.output_dir import fsync_dir, replace_dir  # noqa: F401 (the checkpoint writers' too)


FORMAT = "finetune-ref-training-checkpoint"
VERSION = 2  # 2: trainer_state.json holds its own SHA-256 (state_sha256); 1 is still read
STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
LATEST_FILE = "latest"
BEST_DIR = "best"
BEST_FILE = "best.json"
CHECKPOINT_PREFIX = "checkpoint-"


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def checkpoint_name(update: int) -> str:
    return f"{CHECKPOINT_PREFIX}{update:06d}"


def state_sha256(record: dict) -> str:
    """SHA-256 of a ``trainer_state.json`` record without its ``state_sha256`` key, as canonical JSON (the file
    is written with the same ``json.dumps`` settings, so a changed byte of any value is a changed digest)."""
    body = {k: v for k, v in record.items() if k not in ("state_sha256", "path")}
    return hashlib.sha256(json.dumps(body, indent=1, sort_keys=True).encode()).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from ``path``: the directory itself, or the one its ``latest`` file names
    (``path`` may be the checkpoint root or a run directory holding ``checkpoints/``).

    Raises:
        FileNotFoundError: nothing that looks like a checkpoint there.
    """
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        if (candidate / STATE_FILE).is_file():
            return candidate
        latest = candidate / LATEST_FILE
        if latest.is_file():
            target = candidate / latest.read_text().strip()
            if not (target / STATE_FILE).is_file():
                raise FileNotFoundError(f"{latest} names {target.name}, which has no {STATE_FILE} (deleted?)")
            return target
    raise FileNotFoundError(f"no training checkpoint at {path}: expected a directory with {STATE_FILE}, or a "
                            f"checkpoint root (or run directory with checkpoints/) holding a '{LATEST_FILE}' file")


def read_checkpoint_record(path: str | Path, verify: bool = True) -> dict:
    """The checkpoint's ``trainer_state.json`` (with ``"path"`` added), after checking its files.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        ValueError: unreadable JSON, another format or version, or a file missing, truncated or altered
            (its size or SHA-256 differs from what was recorded when it was written); the message names the
            previous checkpoint of the same run, if there is one, to resume from instead.
    """
    ckpt = resolve_checkpoint(path)
    try:
        return _read_record(ckpt, verify)
    except ValueError as e:
        earlier = sorted(p for p in ckpt.parent.glob(f"{CHECKPOINT_PREFIX}*") if p.name < ckpt.name
                         and (p / STATE_FILE).is_file()) if ckpt.name.startswith(CHECKPOINT_PREFIX) else []
        if not earlier:
            raise
        raise ValueError(f"{e}; the previous checkpoint may be intact: --resume {earlier[-1]}") from None


def _read_record(ckpt: Path, verify: bool) -> dict:
    try:
        record = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{ckpt / STATE_FILE} is not valid JSON (corrupt checkpoint): {e}") from e
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{ckpt} is not a training checkpoint of this project (format {FORMAT!r} expected)")
    if record.get("version") not in (1, VERSION):
        raise ValueError(f"{ckpt} has checkpoint format version {record.get('version')!r}; this code reads "
                         f"version {VERSION}")
    for key in ("update", "train_state", "scheduler", "data", "optimizer", "trainable", "files", "world_size"):
        if key not in record:
            raise ValueError(f"{ckpt / STATE_FILE} lacks {key!r} (corrupt or hand-edited checkpoint)")
    if verify:
        if record["version"] >= 2 and record.get("state_sha256") != state_sha256(record):
            raise ValueError(f"corrupt checkpoint {ckpt}: {STATE_FILE} does not match the SHA-256 recorded when it "
                             "was written (edited or damaged)")
        for name, expected in record["files"].items():
            file = ckpt / name
            if not file.is_file():
                raise ValueError(f"corrupt checkpoint {ckpt}: {name} is missing")
            size = file.stat().st_size
            if size != expected["bytes"]:
                raise ValueError(f"corrupt checkpoint {ckpt}: {name} has {size} bytes, {expected['bytes']} were "
                                 "written (truncated copy?)")
            if sha256_file(file) != expected["sha256"]:
                raise ValueError(f"corrupt checkpoint {ckpt}: {name} does not match the SHA-256 recorded when "
                                 "it was written")
    record["path"] = str(ckpt)
    return record
