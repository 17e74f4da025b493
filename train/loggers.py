"""Where the loop's metrics go besides ``metrics.jsonl``: TensorBoard and Weights & Biases (``--log``).

``bookkeeping.MetricsLog`` is the one place the loop writes a record; it appends the record to the JSON-lines file
(always) and hands it to each logger opened here. A logger sees every record and keeps the scalars of two kinds:

    {"type": "train", "update", "loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_mib", ...}  per update
    {"type": "eval", "update", "loss", "perplexity", "tokens", "peak_memory_mib"}                   per evaluation

as ``train/loss``, ``eval/perplexity``, ... at step ``update``. Other records (resume, early stop) stay in the JSONL.
The packages are optional extras (``pip install 'finetune-ref[tensorboard]'``, ``[wandb]``); a missing one is
reported before the run loads anything (``check_loggers``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import netrc
import os
from pathlib import Path

# --log name -> the package it needs (the extra of setup.py that installs it has the --log name).
LOGGERS = {"tensorboard": "tensorboard", "wandb": "wandb"}
# The scalars each record type contributes, by key.
SCALARS = {"train": ("loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_mib"),
           "eval": ("loss", "perplexity", "peak_memory_mib")}
TENSORBOARD_DIR = "tensorboard"  # under the run directory (beside metrics.jsonl)
WANDB_DIR = "wandb"              # where W&B puts a run's files under the directory it is given
WANDB_PROJECT = "finetune-ref"   # unless $WANDB_PROJECT says otherwise


def scalars(record: dict) -> dict[str, float]:
    """The record's scalars as ``{"train/loss": 2.1, ...}``; empty for records that have none."""
    kind = record.get("type")
    return {f"{kind}/{k}": float(record[k]) for k in SCALARS.get(kind, ()) if record.get(k) is not None}


def missing_package(name: str) -> str:
    return f"--log {name} needs the {LOGGERS[name]} package: pip install 'finetune-ref[{name}]'"


def check_loggers(names) -> None:
    """Each of ``names`` is a logger whose package is installed.

    Raises:
        ValueError: an unknown name, or a missing package (naming the extra that installs it).
    """
    for name in names:
        if name not in LOGGERS:
            raise ValueError(f"--log {name}: unknown logger; choose from {', '.join(LOGGERS)}")
        if importlib.util.find_spec(LOGGERS[name]) is None:
            raise ValueError(missing_package(name))


def plain_config(config) -> dict:
    """A dataclass config as JSON-able values (paths as strings, tuples as lists), for the loggers' run record."""
    if config is None:
        return {}
    values = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    return json.loads(json.dumps(values, default=str))


class TensorBoardLogger:
    """Scalars into an event file in ``run_dir/tensorboard`` (``torch.utils.tensorboard.SummaryWriter``); the
    run's config as a text entry. ``tensorboard --logdir run_dir`` shows it."""

    def __init__(self, run_dir: Path, config=None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError(missing_package("tensorboard")) from None
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR))
        if config is not None:
            self.writer.add_text("config", "    " + json.dumps(plain_config(config), indent=1).replace("\n", "\n    "))

    def write(self, record: dict) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=record["update"])

    def close(self) -> None:
        self.writer.close()  # flushes


def wandb_mode() -> str | None:
    """"offline" unless the user configured W&B: $WANDB_MODE (then W&B reads it itself: None), $WANDB_API_KEY or a
    ``wandb login`` (an api.wandb.ai entry in ~/.netrc) mean online."""
    if os.environ.get("WANDB_MODE"):
        return None
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


class WandbLogger:
    """One W&B run (project $WANDB_PROJECT or finetune-ref, files in ``run_dir/wandb``), offline unless W&B is
    configured (``wandb_mode``); an offline run is uploaded later with ``wandb sync run_dir/wandb/offline-run-*``."""

    def __init__(self, run_dir: Path, config=None):
        try:
            import wandb
        except ImportError:
            raise ValueError(missing_package("wandb")) from None
        # W&B keeps its files in dir/wandb (the name is its own, WANDB_DIR)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", WANDB_PROJECT), dir=str(run_dir),
                              name=Path(run_dir).resolve().name, config=plain_config(config), mode=wandb_mode())

    def write(self, record: dict) -> None:
        values = scalars(record)
        if values:
            self.run.log(values, step=record["update"])

    def close(self) -> None:
        self.run.finish()


LOGGER_CLASSES = {"tensorboard": TensorBoardLogger, "wandb": WandbLogger}


def open_loggers(names, run_dir: Path, config=None) -> list:
    """The loggers of ``names`` (``--log``) writing into ``run_dir``, each given the run's ``config``."""
    check_loggers(names)
    return [LOGGER_CLASSES[name](run_dir, config) for name in names]
