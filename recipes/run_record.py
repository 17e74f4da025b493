"""The record of a training run, ``<run dir>/run_config.json``: everything that determines what the run
trains, written when it starts and checked whole when it is resumed.

What it holds:

* ``config``: every field of the run's recipe (``RunConfig`` and the method's own), paths made absolute, so
  ``finetune train --resume DIR`` alone can rebuild the run from any directory;
* ``fingerprint``: ``data``, a SHA-256 of the token ids and labels of every training and held-out sequence
  (what the loop is fed: it changes with the data files' contents, the tokenizer, ``seq_len`` and the split),
  and ``base``, ``models.checkpoint.weights_fingerprint`` of the base model directory (config.json, the
  safetensors headers and 16 evenly spaced 64 KiB samples per file: milliseconds, where a full hash of a 7B
  base reads 14 GB), and the number of processes (``--batch-size`` is per process: the global batch must
  match, so a run resumes on another number of processes with the same global batch);
* ``finished``: null while the run goes on; ``{"update", "stopped_early"}`` once its result is written.

On resume every setting is compared at once (``differences``): the method, every hyperparameter, the data and
the base. Only the fields in ``FREE_ON_RESUME`` may change (where files go, how often to checkpoint and
evaluate, the progress bar); paths in ``BY_CONTENT`` are compared by their fingerprints, so moved files still
resume. ``--steps`` may grow on purpose with ``extend`` (``finetune train --extend``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Callable, Iterable

from finetune_ref.models.checkpoint import atomic_write_text, weights_fingerprint
from finetune_ref.train.bookkeeping import METRICS_FILE

from .base import RunConfig

RUN_FILE = "run_config.json"
CHECKPOINTS_DIR = "checkpoints"
FORMAT = "finetune-ref-run"
VERSION = 1

# May differ on resume: they change where files go and what is shown, not what is trained.
# fused_projections and compile change how the same sums are computed (their rounding) only (models/fused.py,
# torch.compile), and a run recorded before fused_projections has none.
FREE_ON_RESUME = frozenset({"out", "resume", "cache_dir", "progress", "log_every", "metrics_path", "save_every",
                            "keep_last", "eval_every", "log", "plot", "fused_projections", "compile"})
# Compared by content (``fingerprint``), not by path.
BY_CONTENT = frozenset({"model", "data", "eval_data"})
PATHS = ("model", "data", "eval_data", "cache_dir")


def run_dir_of(path: str | Path) -> Path | None:
    """The run directory of ``path`` (a run directory, its ``checkpoints/`` or one checkpoint in it): the
    nearest of them holding ``run_config.json``, else (a run from before the record) ``checkpoints/``."""
    path = Path(path)
    candidates = (path, path.parent, path.parent.parent)
    for marker in (RUN_FILE, CHECKPOINTS_DIR):
        for candidate in candidates:
            if (candidate / marker).exists():
                return candidate
    return None


def latest_checkpoint_update(run_dir: Path) -> int | None:
    """The update of the run's newest checkpoint (its ``latest``), or None when it has none."""
    from finetune_ref.train.checkpoint_files import read_checkpoint_record

    try:
        return read_checkpoint_record(run_dir, verify=False)["update"]
    except (FileNotFoundError, ValueError):
        return None


def check_not_behind_result(record: dict | None, given: str | Path, ckpt: Path, at: int, run_dir: Path | None,
                            out: Path) -> None:
    """``--resume given`` continues from update ``at`` (checkpoint ``ckpt``). Refuse it when the run already
    finished past that update and the resume would replace its result (in place) or the checkpoint was not named
    (``--resume RUN_DIR`` took the newest): it would silently discard the finished updates. A checkpoint named on
    purpose, into another ``--out``, is a branch and allowed.

    Raises:
        ValueError: naming the updates that would be lost and how to branch from the checkpoint instead.
    """
    done = (record or {}).get("finished")
    if done is None or run_dir is None or at >= done["update"]:
        return
    named = Path(given).resolve() == ckpt.resolve()
    if out.resolve() == run_dir.resolve() or not named:
        raise ValueError(f"--resume {given}: the newest checkpoint ({ckpt.name}, update {at}) is older than the "
                         f"run's finished result (update {done['update']}); continuing from it would discard updates "
                         f"{at + 1}-{done['update']}. To branch from update {at} on purpose: finetune train --resume "
                         f"{ckpt} --out NEW_DIR")


def holds_run(out: Path) -> bool:
    return any((out / name).exists() for name in (RUN_FILE, METRICS_FILE, CHECKPOINTS_DIR))


def config_json(cfg: RunConfig) -> dict:
    """The recipe's fields as JSON (paths absolute; ``metrics_path`` is derived from ``out``, left out)."""
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "metrics_path"}
    for name in PATHS:
        if fields.get(name) is not None:
            fields[name] = str(Path(fields[name]).resolve())
    return json.loads(json.dumps(fields))  # tuples become lists, as they are read back


def config_from_record(record: dict, recipes: dict[str, type[RunConfig]], **changes) -> RunConfig:
    """The recorded run's recipe, with ``changes`` (fields) applied."""
    recipe = recipes[record["method"]]
    names = {f.name for f in dataclasses.fields(recipe)}
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in record["config"].items() if k in names}
    return recipe(**{**fields, **{k: v for k, v in changes.items() if k in names}})


def data_fingerprint(*splits: Iterable[dict]) -> str:
    """SHA-256 of the input ids and labels of every example of every split, in order."""
    h = hashlib.sha256()
    for split in splits:
        h.update(b"split")
        for example in split:
            for key in ("input_ids", "labels"):
                h.update(example[key].numpy().tobytes())
    return h.hexdigest()


def fingerprint(model_dir: Path, train_examples, held_examples, world_size: int = 1) -> dict:
    return {"data": data_fingerprint(train_examples, held_examples), "base": weights_fingerprint(model_dir),
            "base_dir": str(Path(model_dir).resolve()), "world_size": world_size}


def new_record(cfg: RunConfig, fingerprint: dict, command: str | None = None) -> dict:
    return {"format": FORMAT, "version": VERSION, "method": cfg.method, "command": command,
            "config": config_json(cfg), "fingerprint": fingerprint, "finished": None, "extended": []}


def read_run_record(run_dir: str | Path) -> dict | None:
    """The record in ``run_dir``, or None where there is none.

    Raises:
        ValueError: the file is not a run record of this project (corrupt or hand-edited).
    """
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON (corrupt run record): {e}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT or not isinstance(record.get("config"), dict):
        raise ValueError(f"{path} is not a run record of finetune-ref (format {FORMAT!r} expected)")
    return record


def write_run_record(run_dir: str | Path, record: dict) -> None:
    atomic_write_text(Path(run_dir) / RUN_FILE, json.dumps(record, indent=1, sort_keys=True) + "\n")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def differences(record: dict, cfg: RunConfig, now: dict, flag: Callable[[str], str] | None = None,
                extend: bool = False) -> list[str]:
    """Every way this run (``cfg`` with fingerprint ``now``) differs from the recorded one, as the flags the
    user types; empty when it may resume. ``extend``: ``--steps`` may be larger than recorded."""
    flag = flag or _flag
    diffs = []
    if record["method"] != cfg.method:
        diffs.append(f"--method: recorded {record['method']}, now {cfg.method}")
    recorded, current = record["config"], config_json(cfg)
    saved = record.get("fingerprint", {})
    saved_world = saved.get("world_size", 1)
    for name in sorted(set(recorded) | set(current)):
        if name in FREE_ON_RESUME or name in BY_CONTENT:
            continue
        old, new = recorded.get(name), current.get(name)
        if name == "batch_size":  # per process: what must match is the global batch (train/distributed.py)
            before, after = saved_world * (old or 0), now.get("world_size", 1) * new
            if before != after:
                diffs.append(f"{flag(name)}: recorded {old} x {saved_world} process(es) = {before} sequences per "
                             f"micro-batch, now {new} x {now.get('world_size', 1)} = {after}")
        elif name == "steps" and extend:
            if new is not None and old is not None and new <= old:
                diffs.append(f"--steps: --extend needs more than the recorded {old}, got {new}")
        elif old != new:
            hint = " (add --extend to train further on purpose)" if name == "steps" and new > old else ""
            diffs.append(f"{flag(name)}: recorded {old}, now {new}{hint}")
    if saved.get("data") != now["data"]:
        diffs.append(f"--data: the training and held-out sequences differ from the recorded ones (sha256 "
                     f"{str(saved.get('data'))[:12]}, now {now['data'][:12]}): other data or contents")
    if saved.get("base") != now["base"]:
        diffs.append(f"--model: the base weights differ from the recorded ones ({saved.get('base_dir')} "
                     f"fingerprint {str(saved.get('base'))[:12]}, now {now['base_dir']} {now['base'][:12]})")
    return diffs


def check_resume(record: dict, cfg: RunConfig, now: dict, run_dir: Path, flag=None, extend: bool = False) -> None:
    """Raises ValueError listing every difference (``differences``) in one line."""
    diffs = differences(record, cfg, now, flag, extend)
    if diffs:
        raise ValueError(f"--resume {run_dir}: this run differs from the recorded one ({run_dir / RUN_FILE}) in "
                         f"{len(diffs)} way(s): " + "; ".join(diffs) + f". Resume with the recorded settings "
                         f"(--resume {run_dir} alone reuses them) or start a new run with another --out")
