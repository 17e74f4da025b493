"""Learning-rate schedule: linear warmup, then cosine decay to a minimum.

Indexed by optimizer *update* (not micro-batch). With ``T`` updates (0-based ``i``), ``W`` warmup updates and
``p = max(W - 1, 0)`` the update at the peak, update ``i`` uses

    i <  p:  peak * (i + 1) / W                                       (warmup; the first update already moves)
    i >= p:  min + (peak - min) * (1 + cos(pi * (i - p) / (T - 1 - p))) / 2     (cosine decay)

so that the three points a reader checks are exact: the first update has LR > 0 (``peak / W``), the peak is
reached at the last warmup update (and held for that one update only), and the minimum is the learning rate of
the last update (``i = T - 1``). ``W = 0`` and ``W = 1`` both start at the peak. When the warmup covers every
update (``W = T``) or there is one update, there is no decay and the last update runs at the peak.

The "+1" of the warmup is deliberate: the common ``i / W`` form spends the first update at LR 0, a wasted step
that also hides bugs (nothing changes). The cosine is Loshchilov & Hutter 2017 (SGDR), without restarts; the
common ``(i - W) / (T - W)`` form repeats the peak on the update after warmup and never reaches the minimum.
"""

from __future__ import annotations

import math


def lr_at(update: int, total_updates: int, peak_lr: float, warmup: int = 0, min_lr: float = 0.0) -> float:
    """Learning rate of optimizer update ``update`` (0-based); see the module docstring for the convention.

    Raises:
        ValueError: negative counts, ``warmup > total_updates``, or ``min_lr > peak_lr``.
    """
    if total_updates <= 0 or update < 0 or warmup < 0:
        raise ValueError(f"need total_updates > 0, update >= 0, warmup >= 0; got {total_updates}, {update}, {warmup}")
    if warmup > total_updates:
        raise ValueError(f"warmup ({warmup}) must not exceed the number of updates ({total_updates})")
    if not 0 <= min_lr <= peak_lr:
        raise ValueError(f"need 0 <= min_lr <= peak_lr, got min_lr={min_lr}, peak_lr={peak_lr}")
    peak_update = max(warmup - 1, 0)
    if update < peak_update:
        return peak_lr * (update + 1) / warmup
    decay_updates = total_updates - 1 - peak_update  # from the peak (progress 0) to the last update (progress 1)
    if decay_updates <= 0:
        return peak_lr
    if update >= total_updates - 1:
        return min_lr  # exactly, not through cos(pi) = -1 + rounding
    progress = (update - peak_update) / decay_updates
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """Sets ``lr`` on every param group of an optimizer; call ``step()`` once per optimizer update.

    A group with an ``lr_scale`` entry gets the scheduled lr times it (LoRA+'s B groups, lora/loraplus.py).

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
            group["lr"] = lr * group.get("lr_scale", 1.0)

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


def describe_schedule(total_updates: int, peak_lr: float, warmup: int = 0, min_lr: float = 0.0) -> str:
    """The convention in one line, with this run's numbers (``--dry-run`` prints it above the table)."""
    first = lr_at(0, total_updates, peak_lr, warmup, min_lr)
    peak_at = max(warmup, 1)
    decay = (f"cosine to the minimum {min_lr:g} at update {total_updates} (the last)"
             if total_updates - 1 > peak_at - 1 else "no decay (the warmup covers every update)")
    return (f"schedule: update 1 at {first:g}, linear warmup to the peak {peak_lr:g} at update {peak_at}, "
            f"then {decay}")


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
