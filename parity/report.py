"""The parity report: one row per check, the peers' versions, the peers skipped; Markdown and JSON.

A row compares one tensor of ours with the same tensor from a peer. Its status is

* ``bitwise``: every element has the same bits;
* ``explained``: not bitwise, and an entry of ``parity.known.KNOWN_DIFFERENCES`` matches the check and peer
  and bounds the divergence (its cause and the file or paper that explains it fill the cause column);
* ``unexplained``: anything else, including a row that must be bitwise and is not.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from finetune_ref.parity.known import KnownDifference, explain
from finetune_ref.parity.metrics import Divergence

STATUSES = ("bitwise", "explained", "unexplained")


@dataclass(frozen=True)
class Row:
    check: str  # what is compared, e.g. "nf4.packed", "lora.grad_A"
    case: str  # on which input, e.g. "(65, 67) bs64 dq" or "SmolLM2 layers.0.mlp.gate_proj"
    peer: str  # "bitsandbytes 0.50.2"'s short name: "bnb", "peft", "torchao", "transformers", "torch"
    dtype: str  # "fp32", "bf16", "fp16", "uint8", ...
    divergence: Divergence
    must_be_bitwise: bool = False
    known: KnownDifference | None = None

    @property
    def status(self) -> str:
        if self.divergence.bitwise:
            return "bitwise"
        return "explained" if self.known is not None else "unexplained"

    def as_dict(self) -> dict:
        out = {"check": self.check, "case": self.case, "peer": self.peer, "dtype": self.dtype,
               **self.divergence.as_dict(), "must_be_bitwise": self.must_be_bitwise, "status": self.status,
               "known": self.known.key if self.known else None, "cause": self.known.cause if self.known else None,
               "reference": self.known.reference if self.known else None}
        # JSON has no infinity: a NaN on one side only is written as the string "inf".
        return {k: "inf" if isinstance(v, float) and math.isinf(v) else v for k, v in out.items()}


def make_row(check: str, case: str, peer: str, dtype: str, divergence: Divergence,
             must_be_bitwise: bool = False) -> Row:
    """A row, with its known difference looked up (never for a row that must be bitwise)."""
    known = None
    if not divergence.bitwise and not must_be_bitwise:
        known = explain(check, peer, dtype, divergence)
    return Row(check, case, peer, dtype, divergence, must_be_bitwise, known)


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)  # package -> version, ours and every peer run
    skipped: dict[str, str] = field(default_factory=dict)  # peer -> why (and the extra that installs it)
    settings: dict = field(default_factory=dict)  # model, dtype, peers asked for

    def add(self, *rows: Row) -> None:
        self.rows.extend(rows)

    def unexplained(self) -> list[Row]:
        return [r for r in self.rows if r.status == "unexplained"]

    def counts(self) -> dict[str, int]:
        return {s: sum(r.status == s for r in self.rows) for s in STATUSES}

    def as_dict(self) -> dict:
        return {"settings": self.settings, "versions": self.versions, "skipped": self.skipped,
                "counts": self.counts(), "rows": [r.as_dict() for r in self.rows]}

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=1)

    def to_markdown(self) -> str:
        lines = ["versions: " + ", ".join(f"{k} {v}" for k, v in self.versions.items())]
        for peer, why in self.skipped.items():
            lines.append(f"skipped: {peer} ({why})")
        c = self.counts()
        lines += [f"{len(self.rows)} checks: {c['bitwise']} bitwise, {c['explained']} explained, "
                  f"{c['unexplained']} unexplained", "",
                  "| check | case | peer | dtype | max abs | max rel | max ulps | differ | bitwise | status | cause |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        causes = {}
        for r in self.rows:
            d = r.divergence
            if r.known:
                causes[r.known.key] = r.known
            cause = r.known.key if r.known else ("must be bitwise" if r.must_be_bitwise and not d.bitwise else "")
            differ = f"{100 * d.mismatched / d.numel:.3g}%" if d.numel else "-"
            lines.append(f"| {r.check} | {r.case} | {r.peer} | {r.dtype} | {_num(d.max_abs)} | {_num(d.max_rel)} | "
                         f"{_ulps(d.max_ulps)} | {differ} | {'yes' if d.bitwise else 'no'} | {r.status} | {cause} |")
        if causes:
            lines += ["", "causes:"] + [f"- {k.key}: {k.cause} ({k.reference})" for k in causes.values()]
        return "\n".join(lines)


def _num(x: float) -> str:
    return "0" if x == 0 else f"{x:.2e}"


def _ulps(x: float | None) -> str:
    if x is None:
        return "-"
    return "inf" if math.isinf(x) else f"{x:.0f}"
