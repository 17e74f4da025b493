"""Training checkpoints: save everything a run needs to continue bitwise-identically, atomically; load strictly.

(Not to be confused with *gradient* checkpointing, ``LlamaModel.gradient_checkpointing``.)

A checkpoint is a directory ``<root>/checkpoint-000006/`` (the number is the optimizer update reached):

    model.safetensors      the trainable parameters (the whole model for full fine-tuning, the LoRA A/B for
                           LoRA), unsharded, HF key names; a tied weight is stored once, under its first name
    optimizer.safetensors  optimizer state tensors, key ``state/<parameter name>/<name>`` (exp_avg, step, master..)
    rng.safetensors        every rank's RNG states (torch CPU/CUDA, Python ``random``, NumPy), key ``rank<r>/...``
    trainer_state.json     update number, scheduler, data position (``BatchIterator.state_dict``), best-eval and
                           early-stopping counters, optimizer param groups, what was trained (names, shapes,
                           dtypes), caller metadata, world size, and the SHA-256 and size of the three files

No pickle anywhere: tensors go through safetensors, the rest is JSON. The unsharded layout does not depend on
the world size, so a checkpoint written by 2 FSDP2 ranks resumes on 1 process and vice versa
(``torch.distributed.checkpoint.state_dict`` gathers and re-shards the model and optimizer state). What does not
carry over across world sizes is the per-rank RNG streams (dropout masks): resuming at another world size warns
and continues with each rank's current RNG, so it is equal within floating-point tolerance, not bitwise.

Atomicity: rank 0 writes into ``<root>/.tmp-...`` (each file fsync'ed), renames the directory into place, then
rewrites ``<root>/latest`` (a one-line file naming the newest checkpoint) by temp file + rename. A crash at any
point leaves either the previous checkpoint or the new one, never a half-written one under a final name.

Loading checks, before touching the model: the format, every file's size and SHA-256 (a truncated or corrupted
file is named), the caller's metadata (e.g. method and LoRA config), and the trainable parameters' names, shapes
and dtypes; the scheduler and data iterator check their own settings. Each mismatch raises a ``ValueError``
saying what differs; a missing checkpoint raises ``FileNotFoundError``. Nothing ever silently restarts from
scratch.

This file saves, loads and holds the ``Checkpointer``; ``checkpoint_files.py`` has the file names, atomic writes
and the integrity checks, ``checkpoint_state.py`` the state gathered into a checkpoint (parameters, optimizer,
RNG).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file
from torch import nn

from finetune_ref.models.checkpoint import atomic_write_text, make_readable, read_safetensors
from finetune_ref.train.checkpoint_files import (BEST_DIR, BEST_FILE, CHECKPOINT_PREFIX, FORMAT, LATEST_FILE,
                                                 MODEL_FILE, OPTIMIZER_FILE, RNG_FILE, STATE_FILE, VERSION,
                                                 checkpoint_name, fsync_file, read_checkpoint_record, replace_dir,
                                                 sha256_file, state_sha256)
from finetune_ref.train.checkpoint_state import (dcp_state_dict, describe, flatten_optimizer, full_options,
                                                 gather_optimizer_state, gather_rng, gather_trainable_state,
                                                 optimizer_param_names, set_local_state, set_rng_state_tensors,
                                                 trainable_parameters, unflatten_optimizer)
from finetune_ref.train.distributed import DistInfo, barrier, is_sharded

__all__ = ["Checkpointer", "export_trainable", "load_checkpoint", "save_checkpoint"]


# ---------------------------------------------------------------------------------------------------------
# Save.
# ---------------------------------------------------------------------------------------------------------
def save_checkpoint(root: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, data,
                    train_state: dict, info: DistInfo | None = None, metadata: dict | None = None,
                    keep_last: int = 0) -> Path:
    """Write ``<root>/checkpoint-<update>`` atomically and point ``<root>/latest`` at it. Collective.

    Args:
        model: plain, DDP-wrapped or FSDP2-sharded.
        scheduler, data: objects with ``state_dict()`` (``WarmupCosine``, ``BatchIterator``/``ShardedBatches``).
        train_state: JSON-able dict with at least ``"update"`` (int).
        metadata: JSON-able facts a resume must match (e.g. {"method": "lora", "lora": {...}}).
        keep_last: delete older ``checkpoint-*`` directories beyond the newest ``keep_last`` (0 keeps all).

    Returns:
        The checkpoint directory (on every rank).
    """
    info = info or DistInfo()
    root = Path(root)
    update = int(train_state["update"])
    final = root / checkpoint_name(update)
    model_state = gather_trainable_state(model)
    optim_tensors, optim_meta = flatten_optimizer(gather_optimizer_state(model, optimizer))
    rng = gather_rng(info)
    if info.is_main:
        params = trainable_parameters(model)
        record = {
            "format": FORMAT, "version": VERSION, "update": update, "world_size": info.world_size,
            "train_state": train_state, "scheduler": scheduler.state_dict(), "data": data.state_dict(),
            "optimizer": {"class": type(optimizer).__name__, **optim_meta},
            "trainable": {name: describe(p) for name, p in params.items()},
            "metadata": metadata or {},
        }
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{final.name}-"))
        make_readable(tmp)
        try:
            files = {MODEL_FILE: model_state, OPTIMIZER_FILE: optim_tensors, RNG_FILE: rng}
            record["files"] = {}
            for name, tensors in files.items():
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / name),
                          metadata={"format": "pt"})
                make_readable(tmp / name)  # safetensors writes 0600
                fsync_file(tmp / name)
                record["files"][name] = {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
            record["state_sha256"] = state_sha256(record)  # trainer_state.json is checked too, by itself
            (tmp / STATE_FILE).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
            fsync_file(tmp / STATE_FILE)
            replace_dir(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        atomic_write_text(root / LATEST_FILE, final.name + "\n")
        if keep_last > 0:
            for old in sorted(root.glob(f"{CHECKPOINT_PREFIX}*"))[:-keep_last]:
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
    barrier(info)
    return final


def export_trainable(model: nn.Module, directory: str | Path, info: DistInfo | None = None) -> Path:
    """Write the trainable parameters to ``<directory>/model.safetensors`` (rank 0). Collective."""
    info = info or DistInfo()
    directory = Path(directory)
    state = gather_trainable_state(model)
    if info.is_main:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{MODEL_FILE}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata={"format": "pt"})
            make_readable(tmp)  # safetensors writes 0600
            os.replace(tmp, directory / MODEL_FILE)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return directory


def _check_metadata(saved: dict, expected: dict, where: Path) -> None:
    expected = json.loads(json.dumps(expected))  # compare as saved: tuples became lists
    keys = sorted(set(saved) | set(expected))
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, this run {expected.get(k)!r}" for k in keys
             if saved.get(k) != expected.get(k)]
    if diffs:
        raise ValueError(f"checkpoint {where} was made for a different setup: " + "; ".join(diffs))


def _check_trainable(saved: dict, model: nn.Module, where: Path) -> None:
    current = {name: describe(p) for name, p in trainable_parameters(model).items()}
    missing = sorted(set(saved) - set(current))
    extra = sorted(set(current) - set(saved))
    wrong = [f"{n}: checkpoint {saved[n]['dtype']}{tuple(saved[n]['shape'])}, model "
             f"{current[n]['dtype']}{tuple(current[n]['shape'])}"
             for n in sorted(set(saved) & set(current)) if saved[n] != current[n]]
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"trained in the checkpoint but not trainable here: {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''} ({len(missing)})")
        if extra:
            parts.append(f"trainable here but not in the checkpoint: {extra[:5]}{' ...' if len(extra) > 5 else ''}"
                         f" ({len(extra)})")
        if wrong:
            parts.append("different shape/dtype: " + "; ".join(wrong[:5]))
            if all(saved[n]["shape"] == current[n]["shape"] for n in set(saved) & set(current)):
                parts.append("only dtypes differ: another --precision, or a --parallel fsdp checkpoint (its "
                             "weights stay fp32 under bf16) resumed without FSDP")
        raise ValueError(f"checkpoint {where} does not match the model being trained: " + "; ".join(parts)
                         + ". Resume with the same model, method, adapter config and --precision")


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, data,
                    info: DistInfo | None = None, metadata: dict | None = None, extend: bool = False) -> dict:
    """Restore model (trainable part), optimizer, scheduler, data position and RNG from a checkpoint.

    Call on every rank with the same arguments (reads files on every rank: on several machines ``path`` must be
    on a shared filesystem). ``metadata`` must equal what was saved. ``extend``: the schedule may run longer
    than the saved one (``WarmupCosine.load_state_dict``).

    Returns:
        The saved ``train_state`` dict (``"update"`` etc.), with ``"path"`` of the checkpoint added.

    Raises:
        FileNotFoundError / ValueError: see ``read_checkpoint_record``; a metadata, trainable-parameter,
            optimizer, schedule or data-setting mismatch (each says what differs).
    """
    info = info or DistInfo()
    record = read_checkpoint_record(path)
    ckpt = Path(record["path"])
    _check_metadata(record.get("metadata", {}), metadata or {}, ckpt)
    _check_trainable(record["trainable"], model, ckpt)
    opt_meta = record["optimizer"]
    if opt_meta.get("class") != type(optimizer).__name__:
        raise ValueError(f"checkpoint {ckpt} holds {opt_meta.get('class')} state, this run uses "
                         f"{type(optimizer).__name__} (another --precision?)")
    saved_names = [g.get("params") for g in opt_meta["param_groups"]]
    current_names = optimizer_param_names(model, optimizer)
    if saved_names != current_names:
        raise ValueError(f"checkpoint {ckpt}: the optimizer's parameter groups differ from this run's "
                         f"(saved {[len(g or []) for g in saved_names]} parameters per group, now "
                         f"{[len(g) for g in current_names]}; another --weight-decay split or trainable set?)")
    # Settings checked by their owners; these two mutate only small counters, before the model is touched.
    scheduler.load_state_dict(record["scheduler"], **({"extend": True} if extend else {}))
    data.load_state_dict(record["data"])

    model_state = read_safetensors(ckpt / MODEL_FILE)
    if set(model_state) != set(record["trainable"]):
        raise ValueError(f"corrupt checkpoint {ckpt}: {MODEL_FILE} keys differ from {STATE_FILE}")
    optim_tensors = read_safetensors(ckpt / OPTIMIZER_FILE)
    rng = read_safetensors(ckpt / RNG_FILE)
    osd = unflatten_optimizer(optim_tensors, opt_meta)
    if is_sharded(model):
        dcp = dcp_state_dict()
        from finetune_ref.train.fsdp import scatter_full

        scatter_full(model, model_state)  # each rank keeps its shard (DCP's helper fails on NF4Linear's keys)
        dcp.set_optimizer_state_dict(model, optimizer, osd, options=full_options())
    else:
        set_local_state(model, optimizer, model_state, osd)

    saved_world = record["world_size"]
    mine = {k.split("/", 1)[1]: v for k, v in rng.items() if k.startswith(f"rank{info.rank}/")}
    if saved_world == info.world_size and mine:
        set_rng_state_tensors(mine)
    elif info.is_main:
        warnings.warn(f"checkpoint {ckpt} was written by {saved_world} process(es), this run has "
                      f"{info.world_size}: RNG streams (dropout masks) are not restored, so the continuation "
                      "matches an uninterrupted run only within floating-point tolerance", stacklevel=2)
    barrier(info)
    return {**record["train_state"], "path": str(ckpt)}


# ---------------------------------------------------------------------------------------------------------
# The trainer's handle.
# ---------------------------------------------------------------------------------------------------------
class Checkpointer:
    """Where and when the training loop saves: every ``save_every`` updates, at the end, on Ctrl-C, and the
    best model (lowest held-out loss) in ``<root>/best``.

    Args:
        root: checkpoint root directory (created on first save).
        save_every: updates between checkpoints (0: only on interrupt, and at the end with ``save_final``).
        save_final: also checkpoint the last update when ``save_every`` is 0, so a finished run can be extended
            (``finetune train --extend``) without going back to an older checkpoint.
        keep_last: how many ``checkpoint-*`` directories to keep (0: all).
        metadata: JSON-able facts a resume must match (checked by ``load_checkpoint``).
        export_best: ``fn(model, directory)`` writing the best model in a usable format (e.g. a PEFT adapter);
            called on every rank (it must write on rank 0 only). Default: ``export_trainable``.
        track_best: export the model to ``<root>/best`` whenever the held-out loss reaches a new minimum.
        extend: a resume may continue the schedule to more updates than the checkpoint's (``--extend``).

    Raises:
        ValueError: negative ``save_every`` or ``keep_last``.
    """

    def __init__(self, root: str | Path, save_every: int = 0, keep_last: int = 2, info: DistInfo | None = None,
                 metadata: dict | None = None,
                 export_best: Callable[[nn.Module, Path], object] | None = None, track_best: bool = True,
                 extend: bool = False, save_final: bool = False):
        for name, value in (("save_every", save_every), ("keep_last", keep_last)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        self.root = Path(root)
        self.save_every, self.keep_last = save_every, keep_last
        self.info = info or DistInfo()
        self.metadata = metadata or {}
        self.export_best = export_best or (lambda model, directory: export_trainable(model, directory, self.info))
        self.track_best, self.extend = track_best, extend
        self.save_final = bool(save_every) or save_final
        self.last_saved: Path | None = None

    def due(self, update: int) -> bool:
        return bool(self.save_every) and update % self.save_every == 0

    def save(self, model, optimizer, scheduler, data, train_state: dict) -> Path:
        self.last_saved = save_checkpoint(self.root, model, optimizer, scheduler, data, train_state, self.info,
                                          self.metadata, self.keep_last)
        return self.last_saved

    def save_anywhere(self, model, optimizer, scheduler, data, train_state: dict) -> Path:
        """``save``, or where the root cannot be written (full disk, read-only), a checkpoint in a new temporary
        directory ``<tmp>/finetune-rescue-*/checkpoints`` (the run's state is not lost)."""
        try:
            return self.save(model, optimizer, scheduler, data, train_state)
        except OSError:
            root = Path(tempfile.mkdtemp(prefix="finetune-rescue-")) / self.root.name
            self.last_saved = save_checkpoint(root, model, optimizer, scheduler, data, train_state, self.info,
                                              self.metadata)
            return self.last_saved

    def load(self, path: str | Path, model, optimizer, scheduler, data) -> dict:
        return load_checkpoint(path, model, optimizer, scheduler, data, self.info, self.metadata, self.extend)

    def save_best(self, model: nn.Module, update: int, loss: float) -> Path:
        """Export the current model as the best one (collective); records update and loss in best.json."""
        final = self.root / BEST_DIR
        tmp = self.root / f".tmp-{BEST_DIR}"
        if self.info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier(self.info)
        self.export_best(model, tmp)
        if self.info.is_main:
            (tmp / BEST_FILE).write_text(json.dumps({"update": update, "eval_loss": loss}) + "\n")
            replace_dir(tmp, final)
        barrier(self.info)
        return final
