"""What the training loop records and how it is stopped: its resumable state, the metrics log (JSON lines, and
TensorBoard or W&B through ``loggers.py``), the progress bar, and Ctrl-C / SIGTERM turned into a clean stop after
the update in flight."""

from __future__ import annotations

import dataclasses
import json
import resource
import signal
import sys
import threading
import time
from pathlib import Path

from finetune_ref.models.checkpoint import atomic_write_text

from .config import TrainConfig
from .distributed import DistInfo, all_reduce_sum
from .loggers import open_loggers

MIB = 2**20
METRICS_FILE = "metrics.jsonl"  # a run directory's log (recipes/run.py), read back by plots.py


@dataclasses.dataclass
class TrainState:
    """What the loop itself must remember across a resume (saved in every checkpoint, as JSON)."""

    update: int = 0                 # optimizer updates done
    tokens_seen: int = 0            # input positions processed, all ranks
    elapsed_s: float = 0.0          # training time (evaluation included), all sessions
    best_loss: float | None = None  # lowest held-out loss so far
    best_update: int | None = None
    evals_since_best: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during ``train``: the update in flight finished and ``checkpoint`` was written."""

    def __init__(self, update: int, checkpoint: Path | None):
        super().__init__(f"interrupted after update {update}" + (f"; checkpoint {checkpoint}" if checkpoint else ""))
        self.update, self.checkpoint = update, checkpoint


class ResultNotSaved(Exception):
    """The run finished but its result could not be written (``error``, e.g. a full disk); the trained state is
    kept in ``checkpoint`` (None if even that could not be written)."""

    def __init__(self, update: int, checkpoint: Path | None, error: OSError):
        super().__init__(f"the result of update {update} could not be written: {error}")
        self.update, self.checkpoint, self.error = update, checkpoint, error


class StopSignal:
    """While active, SIGINT/SIGTERM set ``requested`` instead of raising; a second Ctrl-C raises at once."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False
        self._previous: dict = {}

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: give up on the clean stop
        self.requested = True

    def __enter__(self):
        if self.enabled:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def peak_memory() -> tuple[int, str]:
    """(bytes, what they are): the peak of this process so far. On a GPU the tensors' peak on the current device
    (``torch.cuda.max_memory_allocated``); on CPU the maximum resident set size (``ru_maxrss``: the whole process,
    interpreter and libraries included; see memory_tracker.py for why CPU tensor bytes are not tracked here)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated(), "CUDA max allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024), "max RSS"  # Linux reports KiB, macOS bytes


class MetricsLog:
    """The one place the loop's records go: each is appended to the JSON-lines file ``path`` (flushed line by
    line, so a crash loses nothing already logged) and handed to the loggers of ``log`` (``loggers.py``:
    "tensorboard", "wandb"), which write beside it. ``path`` None: nothing is written (ranks other than 0)."""

    def __init__(self, path: Path | None, log=(), config=None):
        self.path = path
        self.loggers: list = []
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.loggers = open_loggers(log, path.parent, config)

    def write(self, record: dict) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        for logger in self.loggers:
            logger.write(record)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
        self.loggers = []

    def truncate_after(self, update: int) -> int:
        """Drop the lines about updates after ``update``: those logged after the checkpoint being resumed (a crash
        or kill -9 came later), which the resumed run logs again. Returns how many were dropped."""
        if self.path is None or not self.path.is_file():
            return 0
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
        kept = [line for line in lines if _update_of(line) <= update]
        if len(kept) < len(lines):
            atomic_write_text(self.path, "".join(kept))
        return len(lines) - len(kept)


def _update_of(line: str) -> float:
    """The update a metrics line is about (0 for a line without one; inf for a torn last line, dropped)."""
    try:
        return float(json.loads(line).get("update") or 0)
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return float("inf")


class Progress:
    """One session of the loop as the user sees it: the metrics log (closed on exit), the progress bar (main rank,
    unless ``cfg.progress`` is off: then a line every ``cfg.log_every`` updates and per evaluation) and the
    training clock, which goes on from the resumed state's ``elapsed_s``."""

    def __init__(self, cfg: TrainConfig, state: TrainState, log: MetricsLog, info: DistInfo):
        self.log, self.info = log, info
        self.bar = _progress_bar(cfg, state.update) if info.is_main else None
        # Without a bar (``progress`` off: CI, nohup), a plain line every ``log_every`` updates and per evaluation.
        self.lines = info.is_main and self.bar is None
        self.log_every, self.steps = cfg.log_every, cfg.steps
        self.start, self.elapsed_before = time.perf_counter(), state.elapsed_s

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> bool:
        if self.bar is not None:
            self.bar.close()
        self.log.close()
        return False

    def record_update(self, state: TrainState, micro: list[dict], loss_sum: float, n_label: int, lr: float,
                      grad_norm: float) -> dict:
        """Count the update in ``state`` and log it; returns its metrics (loss summed over ranks)."""
        local_tokens = sum(int(b["input_ids"].numel()) for b in micro)
        loss_total, tokens = all_reduce_sum([loss_sum, float(local_tokens)], self.info)
        state.update += 1
        state.tokens_seen += int(tokens)
        state.elapsed_s = self.elapsed_before + time.perf_counter() - self.start
        metrics = {"update": state.update, "loss": loss_total if n_label else None, "lr": lr, "grad_norm": grad_norm,
                   "label_tokens": n_label, "tokens_per_s": state.tokens_seen / max(state.elapsed_s, 1e-9),
                   "elapsed_s": state.elapsed_s, "peak_memory_mib": peak_memory()[0] / MIB}
        self.log.write({"type": "train", **metrics})
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss_total:.4f}", lr=f"{lr:.2e}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            self.bar.update(1)
        elif self.lines and self.log_every and (state.update % self.log_every == 0 or state.update == self.steps):
            loss = f"{loss_total:.4f}" if n_label else "-"
            print(f"update {state.update}/{self.steps}: loss {loss}, lr {lr:.2e}, grad norm {grad_norm:.3g}, "
                  f"{metrics['tokens_per_s']:.0f} tokens/s, {state.elapsed_s:.0f} s", file=sys.stderr, flush=True)
        return metrics

    def record_eval(self, update: int, ev: dict, echo: bool = True) -> None:
        """Log an evaluation (and print it above the progress bar, or as a line without one, when ``echo``)."""
        self.log.write({"type": "eval", "update": update, **ev, "peak_memory_mib": peak_memory()[0] / MIB})
        line = f"update {update}: held-out loss {ev['loss']:.4f} (perplexity {ev['perplexity']:.2f})"
        if self.bar is not None and echo:
            self.bar.write(line)
        elif self.lines and echo:
            print(line, file=sys.stderr, flush=True)


def _progress_bar(cfg: TrainConfig, initial: int):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, initial=initial, desc="train", unit="update", dynamic_ncols=True)
