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
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from finetune_ref.train.distributed import DistInfo, barrier, unwrap_model

FORMAT = "finetune-ref-training-checkpoint"
VERSION = 1
STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
LATEST_FILE = "latest"
BEST_DIR = "best"
BEST_FILE = "best.json"
CHECKPOINT_PREFIX = "checkpoint-"


# ---------------------------------------------------------------------------------------------------------
# Small atomic-file helpers.
# ---------------------------------------------------------------------------------------------------------
def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move directory ``tmp`` to ``final``; an existing ``final`` is moved aside first and then deleted."""
    trash = None
    if final.exists():
        trash = final.parent / f".trash-{final.name}-{os.getpid()}"
        os.replace(final, trash)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Names of trainable parameters (tied weights once) and RNG states as tensors.
# ---------------------------------------------------------------------------------------------------------
def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """{name: parameter} of the trainable parameters, a tied parameter once under its first name.

    Names are those of the unwrapped model (a DDP wrapper's ``module.`` prefix is not part of them; FSDP2 keeps
    the original names), i.e. Hugging Face key names.
    """
    return {name: p for name, p in unwrap_model(model).named_parameters() if p.requires_grad}


def _describe(p: torch.Tensor) -> dict:
    return {"shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch.")}


def rng_state_tensors() -> dict[str, torch.Tensor]:
    """This process's RNG states (torch CPU and current CUDA device, Python ``random``, NumPy) as tensors."""
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    out = {
        "torch_cpu": torch.get_rng_state(),
        "python_state": torch.tensor(internal, dtype=torch.int64),  # 624 words + position
        "python_meta": torch.tensor([version], dtype=torch.int64),
        "python_gauss": torch.tensor([float("nan") if gauss is None else gauss], dtype=torch.float64),
        "numpy_keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        "numpy_meta": torch.tensor([np_pos, np_has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([np_gauss], dtype=torch.float64),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["torch_cuda"] = torch.cuda.get_rng_state()
    if np_name != "MT19937":
        raise ValueError(f"unsupported NumPy bit generator {np_name!r} in the legacy global RNG")
    return out


def set_rng_state_tensors(states: dict[str, torch.Tensor]) -> None:
    """Inverse of ``rng_state_tensors``. Raises ValueError if an entry is missing."""
    missing = {"torch_cpu", "python_state", "python_meta", "python_gauss", "numpy_keys", "numpy_meta",
               "numpy_gauss"} - set(states)
    if missing:
        raise ValueError(f"the checkpoint's RNG state lacks {sorted(missing)}")
    torch.set_rng_state(states["torch_cpu"].to(torch.uint8))
    gauss = float(states["python_gauss"][0])
    random.setstate((int(states["python_meta"][0]), tuple(int(x) for x in states["python_state"].tolist()),
                     None if gauss != gauss else gauss))
    pos, has_gauss = (int(x) for x in states["numpy_meta"].tolist())
    np.random.set_state(("MT19937", states["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss,
                         float(states["numpy_gauss"][0])))
    if "torch_cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["torch_cuda"].to(torch.uint8))


def _gather_rng(info: DistInfo) -> dict[str, torch.Tensor]:
    """Every rank's RNG tensors as ``{"rank<r>/<name>": tensor}`` (complete on rank 0)."""
    mine = rng_state_tensors()
    if not info.enabled:
        return {f"rank0/{k}": v for k, v in mine.items()}
    device = torch.device("cuda", torch.cuda.current_device()) if info.backend == "nccl" else torch.device("cpu")
    out = {}
    for name in sorted(mine):  # every rank has the same entries (same build, same devices)
        local = mine[name].to(device)
        parts = [torch.empty_like(local) for _ in range(info.world_size)]
        dist.all_gather(parts, local)
        out.update({f"rank{r}/{name}": t.cpu() for r, t in enumerate(parts)})
    return out


# ---------------------------------------------------------------------------------------------------------
# Model and optimizer state, unsharded, keyed by parameter name.
# ---------------------------------------------------------------------------------------------------------
def _dcp():
    from torch.distributed.checkpoint import state_dict as dcp_state_dict

    return dcp_state_dict


def _full_options(**kw):
    return _dcp().StateDictOptions(full_state_dict=True, **kw)


def is_sharded(model: nn.Module) -> bool:
    """True for an FSDP2-sharded model (its parameters are DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


# Sharded (FSDP2) models go through torch.distributed.checkpoint.state_dict, which gathers and re-shards. Plain and
# DDP models (every rank holds all of it) use the parameters and optimizer.state_dict() directly: DCP resolves
# every state-dict key as an attribute path, which fails on layers that store several tensors under one weight
# (NF4Linear's ``weight.absmax``, bitsandbytes' layout).
def gather_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded trainable parameters on CPU (rank 0 gets them; other FSDP2 ranks may get ``{}``). Collective."""
    names = trainable_parameters(model)
    if not is_sharded(model):
        return {k: p.detach().cpu() for k, p in names.items()}
    state = _dcp().get_model_state_dict(model, options=_full_options(cpu_offload=True, ignore_frozen_params=True))
    return {k: v.detach().cpu() for k, v in state.items() if k in names}


def gather_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state dict with parameter names instead of indices, unsharded, on CPU. Collective."""
    if is_sharded(model):
        return _dcp().get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))
    names = _optimizer_param_names(model, optimizer)
    flat = [n for group in names for n in group]  # torch numbers parameters group after group
    osd = optimizer.state_dict()
    return {"state": {flat[i]: entry for i, entry in osd["state"].items()},
            "param_groups": [{**g, "params": names[k]} for k, g in enumerate(osd["param_groups"])]}


def _set_local_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, osd: dict) -> None:
    params = trainable_parameters(model)
    with torch.no_grad():
        for name, value in model_state.items():
            params[name].copy_(value)
    flat = [n for group in _optimizer_param_names(model, optimizer) for n in group]
    index = {n: i for i, n in enumerate(flat)}
    optimizer.load_state_dict({"state": {index[n]: entry for n, entry in osd["state"].items()},
                               "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                                                for g in osd["param_groups"]]})


def _flatten_optimizer(osd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for pname, entry in osd.get("state", {}).items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{pname}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(pname, {})[key] = value
    groups = []
    for g in osd.get("param_groups", []):
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()})
    return tensors, {"param_groups": groups, "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[str, dict] = {}
    for key, value in tensors.items():
        _, rest = key.split("/", 1)
        pname, name = rest.rsplit("/", 1)
        state.setdefault(pname, {})[name] = value
    for pname, entry in meta.get("scalars", {}).items():
        state.setdefault(pname, {}).update(entry)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _optimizer_param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    by_id = {id(p): name for name, p in unwrap_model(model).named_parameters()}
    try:
        return [[by_id[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    except KeyError:
        raise ValueError("the optimizer holds a tensor that is not a parameter of the model") from None


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
    final = root / f"{CHECKPOINT_PREFIX}{update:06d}"
    model_state = gather_trainable_state(model)
    optim_tensors, optim_meta = _flatten_optimizer(gather_optimizer_state(model, optimizer))
    rng = _gather_rng(info)
    if info.is_main:
        params = trainable_parameters(model)
        record = {
            "format": FORMAT, "version": VERSION, "update": update, "world_size": info.world_size,
            "train_state": train_state, "scheduler": scheduler.state_dict(), "data": data.state_dict(),
            "optimizer": {"class": type(optimizer).__name__, **optim_meta},
            "trainable": {name: _describe(p) for name, p in params.items()},
            "metadata": metadata or {},
        }
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{final.name}-"))
        try:
            files = {MODEL_FILE: model_state, OPTIMIZER_FILE: optim_tensors, RNG_FILE: rng}
            record["files"] = {}
            for name, tensors in files.items():
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / name),
                          metadata={"format": "pt"})
                _fsync_file(tmp / name)
                record["files"][name] = {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
            (tmp / STATE_FILE).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
            _fsync_file(tmp / STATE_FILE)
            _replace_dir(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        _atomic_write_text(root / LATEST_FILE, final.name + "\n")
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
            os.replace(tmp, directory / MODEL_FILE)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return directory


# ---------------------------------------------------------------------------------------------------------
# Load.
# ---------------------------------------------------------------------------------------------------------
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
            (its size or SHA-256 differs from what was recorded when it was written).
    """
    ckpt = resolve_checkpoint(path)
    try:
        record = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{ckpt / STATE_FILE} is not valid JSON (corrupt checkpoint): {e}") from e
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{ckpt} is not a training checkpoint of this project (format {FORMAT!r} expected)")
    if record.get("version") != VERSION:
        raise ValueError(f"{ckpt} has checkpoint format version {record.get('version')!r}; this code reads "
                         f"version {VERSION}")
    for key in ("update", "train_state", "scheduler", "data", "optimizer", "trainable", "files", "world_size"):
        if key not in record:
            raise ValueError(f"{ckpt / STATE_FILE} lacks {key!r} (corrupt or hand-edited checkpoint)")
    if verify:
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


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file (corrupt checkpoint?): {e}") from e


def _check_metadata(saved: dict, expected: dict, where: Path) -> None:
    expected = json.loads(json.dumps(expected))  # compare as saved: tuples became lists
    keys = sorted(set(saved) | set(expected))
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, this run {expected.get(k)!r}" for k in keys
             if saved.get(k) != expected.get(k)]
    if diffs:
        raise ValueError(f"checkpoint {where} was made for a different setup: " + "; ".join(diffs))


def _check_trainable(saved: dict, model: nn.Module, where: Path) -> None:
    current = {name: _describe(p) for name, p in trainable_parameters(model).items()}
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
                    info: DistInfo | None = None, metadata: dict | None = None) -> dict:
    """Restore model (trainable part), optimizer, scheduler, data position and RNG from a checkpoint.

    Call on every rank with the same arguments (reads files on every rank: on several machines ``path`` must be
    on a shared filesystem). ``metadata`` must equal what was saved.

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
    current_names = _optimizer_param_names(model, optimizer)
    if saved_names != current_names:
        raise ValueError(f"checkpoint {ckpt}: the optimizer's parameter groups differ from this run's "
                         f"(saved {[len(g or []) for g in saved_names]} parameters per group, now "
                         f"{[len(g) for g in current_names]}; another --weight-decay split or trainable set?)")
    # Settings checked by their owners; these two mutate only small counters, before the model is touched.
    scheduler.load_state_dict(record["scheduler"])
    data.load_state_dict(record["data"])

    model_state = _read_tensors(ckpt / MODEL_FILE)
    if set(model_state) != set(record["trainable"]):
        raise ValueError(f"corrupt checkpoint {ckpt}: {MODEL_FILE} keys differ from {STATE_FILE}")
    optim_tensors = _read_tensors(ckpt / OPTIMIZER_FILE)
    rng = _read_tensors(ckpt / RNG_FILE)
    osd = _unflatten_optimizer(optim_tensors, opt_meta)
    if is_sharded(model):
        dcp = _dcp()
        dcp.set_model_state_dict(model, dict(model_state), options=_full_options(strict=False))
        dcp.set_optimizer_state_dict(model, optimizer, osd, options=_full_options())
    else:
        _set_local_state(model, optimizer, model_state, osd)

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
        save_every: updates between checkpoints (0: only at the end and on interrupt).
        keep_last: how many ``checkpoint-*`` directories to keep (0: all).
        metadata: JSON-able facts a resume must match (checked by ``load_checkpoint``).
        export_best: ``fn(model, directory)`` writing the best model in a usable format (e.g. a PEFT adapter);
            called on every rank (it must write on rank 0 only). Default: ``export_trainable``.
        track_best: export the model to ``<root>/best`` whenever the held-out loss reaches a new minimum.

    Raises:
        ValueError: negative ``save_every`` or ``keep_last``.
    """

    def __init__(self, root: str | Path, save_every: int = 0, keep_last: int = 2, info: DistInfo | None = None,
                 metadata: dict | None = None,
                 export_best: Callable[[nn.Module, Path], object] | None = None, track_best: bool = True):
        for name, value in (("save_every", save_every), ("keep_last", keep_last)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        self.root = Path(root)
        self.save_every, self.keep_last = save_every, keep_last
        self.info = info or DistInfo()
        self.metadata = metadata or {}
        self.export_best = export_best or (lambda model, directory: export_trainable(model, directory, self.info))
        self.track_best = track_best
        self.last_saved: Path | None = None

    def due(self, update: int) -> bool:
        return bool(self.save_every) and update % self.save_every == 0

    def save(self, model, optimizer, scheduler, data, train_state: dict) -> Path:
        self.last_saved = save_checkpoint(self.root, model, optimizer, scheduler, data, train_state, self.info,
                                          self.metadata, self.keep_last)
        return self.last_saved

    def load(self, path: str | Path, model, optimizer, scheduler, data) -> dict:
        return load_checkpoint(path, model, optimizer, scheduler, data, self.info, self.metadata)

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
            _replace_dir(tmp, final)
        barrier(self.info)
        return final
