"""Learning-rate schedule: linear warmup, then cosine decay to a minimum.

Indexed by optimizer *update* (not micro-batch): update ``i`` (0-based) of ``total`` uses

    i <  warmup:  peak * (i + 1) / warmup          (the first update already moves: LR > 0)
    i >= warmup:  min + (peak - min) * (1 + cos(pi * (i - warmup) / (total - warmup))) / 2

The "+1" is deliberate: the common ``i / warmup`` form spends the first update at LR 0, a wasted step that
also hides bugs (nothing changes). Cosine decay as in Loshchilov & Hutter 2017 (SGDR), without restarts.
"""

from __future__ import annotations

import math


def lr_at(update: int, total_updates: int, peak_lr: float, warmup: int = 0, min_lr: float = 0.0) -> float:
    """Learning rate of optimizer update ``update`` (0-based).

    Raises:
        ValueError: negative counts, ``warmup > total_updates``, or ``min_lr > peak_lr``.
    """
    if total_updates <= 0 or update < 0 or warmup < 0:
        raise ValueError(f"need total_updates > 0, update >= 0, warmup >= 0; got {total_updates}, {update}, {warmup}")
    if warmup > total_updates:
        raise ValueError(f"warmup ({warmup}) must not exceed the number of updates ({total_updates})")
    if not 0 <= min_lr <= peak_lr:
        raise ValueError(f"need 0 <= min_lr <= peak_lr, got min_lr={min_lr}, peak_lr={peak_lr}")
    if update < warmup:
        return peak_lr * (update + 1) / warmup
    progress = (update - warmup) / max(1, total_updates - warmup)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


class WarmupCosine:
    """Sets ``lr`` on every param group of an optimizer; call ``step()`` once per optimizer update.

    Its state (the update counter) goes into checkpoints through ``state_dict``/``load_state_dict``.
    """

    def __init__(self, optimizer, total_updates: int, peak_lr: float, warmup: int = 0, min_lr: float = 0.0):
        self.optimizer = optimizer
        self.total_updates, self.peak_lr, self.warmup, self.min_lr = total_updates, peak_lr, warmup, min_lr
        self.update = 0
        lr_at(0, total_updates, peak_lr, warmup, min_lr)  # validate the arguments now, not at the first step
        self._apply()

    def _apply(self) -> None:
        lr = self.current_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def current_lr(self) -> float:
        return lr_at(min(self.update, self.total_updates - 1), self.total_updates, self.peak_lr, self.warmup,
                     self.min_lr)

    def step(self) -> None:
        self.update += 1
        self._apply()

    def state_dict(self) -> dict:
        """The update counter plus the settings a resumed run must share (checked by ``load_state_dict``)."""
        return {"update": self.update, "total_updates": self.total_updates, "peak_lr": self.peak_lr,
                "warmup": self.warmup, "min_lr": self.min_lr}

    def load_state_dict(self, state: dict, extend: bool = False) -> None:
        """Resume at ``state["update"]``. ``extend``: the saved schedule may be shorter than this one (a run
        trained further on purpose); the cosine is this one's, over the new total, from the saved update on.

        Raises:
            ValueError: the saved schedule had other settings (steps, lr, warmup, min lr): resuming would
                silently follow another curve, so change the settings back or start a new run.
        """
        update = state.get("update")
        if not isinstance(update, int) or isinstance(update, bool) or not 0 <= update <= self.total_updates:
            raise ValueError(f"cannot resume the LR schedule: bad update counter {update!r} "
                             f"(expected 0..{self.total_updates})")
        mine = self.state_dict()
        diffs = [f"{k}: saved {state[k]!r}, now {mine[k]!r}" for k in ("total_updates", "peak_lr", "warmup", "min_lr")
                 if k in state and state[k] != mine[k]
                 and not (extend and k == "total_updates" and state[k] < mine[k])]
        if diffs:
            raise ValueError("cannot resume: the checkpoint's LR schedule differs from this run's ("
                             + "; ".join(diffs) + "); resume with the same --steps/--lr/--warmup/--min-lr-ratio")
        self.update = update
        self._apply()

    def table(self) -> list[tuple[int, float]]:
        """(update, lr) for every update: what ``--dry-run`` prints."""
        return [(i, lr_at(i, self.total_updates, self.peak_lr, self.warmup, self.min_lr))
                for i in range(self.total_updates)]


def format_lr_table(total_updates: int, peak_lr: float, warmup: int = 0, min_lr: float = 0.0,
                    max_rows: int = 0) -> str:
    """The learning rate of every update as text, one ``update  lr`` line each (1-based update numbers).

    ``max_rows`` > 0 keeps the first and last ``max_rows // 2`` rows with "..." between (long runs).
    Raises ValueError for the arguments ``lr_at`` rejects.
    """
    rows = [(i + 1, lr_at(i, total_updates, peak_lr, warmup, min_lr)) for i in range(total_updates)]
    lines = [f"{'update':>8}  {'lr':>12}"]
    if max_rows and len(rows) > max_rows:
        half = max(1, max_rows // 2)
        body = [f"{u:>8}  {lr:>12.6e}" for u, lr in rows[:half]] + [f"{'...':>8}"] + \
               [f"{u:>8}  {lr:>12.6e}" for u, lr in rows[-half:]]
    else:
        body = [f"{u:>8}  {lr:>12.6e}" for u, lr in rows]
    return "\n".join(lines + body)
