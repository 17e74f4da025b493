"""Optimizers: one and several steps of AdamW, paged AdamW and 8-bit AdamW against torch and bitsandbytes.

The same fp32 parameters (a 96 x 100 matrix: 37.5 blocks of 256, so 8-bit states with a partial last block)
receive the same gradients. Compared after 1 and after 5 steps: the parameters and every state tensor
(torch's names ``exp_avg``/``exp_avg_sq``; bitsandbytes' ``state1``/``state2`` and, for 8-bit states, their
uint8 codes and ``absmax1``/``absmax2``). Ours: ``optim.AdamW`` with its options (``state_home="host"`` for
paged, ``optim_bits=8, rounding="lut"`` to match bitsandbytes' CPU kernel, no master copy for fp32).
"""

from __future__ import annotations

import torch
from torch import nn

from finetune_ref.optim import AdamW, AdamW8bit, PagedAdamW, PagedAdamW8bit
from finetune_ref.parity.metrics import divergence
from finetune_ref.parity.report import Row, make_row

HYPER = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
SHAPE = (96, 100)
STEPS = (1, 5)
TORCH_NAMES = {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}
BNB_NAMES = {"exp_avg": "state1", "exp_avg_sq": "state2"}  # bitsandbytes' 32-bit state names


def _run(make_opt, steps: int):
    g = torch.Generator().manual_seed(0)
    p = nn.Parameter(0.1 * torch.randn(SHAPE, generator=g))
    opt = make_opt([p])
    for _ in range(steps):
        p.grad = 0.01 * torch.randn(SHAPE, generator=g)
        opt.step()
    return p.detach(), opt.state[p]


def _rows(check: str, case: str, peer: str, ours, theirs, names: dict[str, str], must_be_bitwise: bool) -> list[Row]:
    (p, state), (q, ref_state) = ours, theirs
    rows = [make_row(f"{check}.params", case, peer, "fp32", divergence(p, q), must_be_bitwise)]
    for mine, theirs_name in names.items():
        a, b = state[mine], ref_state[theirs_name]
        dtype = "uint8" if b.dtype == torch.uint8 else "fp32"
        rows.append(make_row(f"{check}.{theirs_name}", case, peer, dtype, divergence(a.reshape(b.shape), b),
                             must_be_bitwise))
    return rows


def check_optimizers(peers: set[str]) -> list[Row]:
    rows = []
    for steps in STEPS:
        case = f"{SHAPE[0]}x{SHAPE[1]} fp32, {steps} step{'s' * (steps > 1)}"
        ours = {
            "adamw": _run(lambda ps: AdamW(ps, **HYPER), steps),
            "paged_adamw": _run(lambda ps: PagedAdamW(ps, min_paged_size=0, **HYPER), steps),
        }
        # torch.optim.AdamW's single-tensor loop is the reference ours is written after (optim/functional.py).
        ref = _run(lambda ps: torch.optim.AdamW(ps, foreach=False, **HYPER), steps)
        for name, result in ours.items():
            rows += _rows(f"optim.{name}", case, "torch", result, ref, TORCH_NAMES, True)
        if "bnb" not in peers:
            continue
        import bitsandbytes as bnb

        bnb_ref = {"adamw": bnb.optim.AdamW, "paged_adamw": bnb.optim.PagedAdamW}
        for name, result in ours.items():
            theirs = _run(lambda ps: bnb_ref[name](ps, **HYPER), steps)
            rows += _rows(f"optim.{name}", case, "bnb", result, theirs, BNB_NAMES, False)
        for name, cls, ref_cls in (("adamw8bit", AdamW8bit, bnb.optim.AdamW8bit),
                                   ("paged_adamw8bit", PagedAdamW8bit, bnb.optim.PagedAdamW8bit)):
            mine = _run(lambda ps: cls(ps, rounding="lut", master_weights=False, min_paged_size=0, **HYPER), steps)
            theirs = _run(lambda ps: ref_cls(ps, **HYPER), steps)
            names = {k: k for k in ("state1", "state2", "absmax1", "absmax2")}
            # One step from zero states: bitsandbytes' CPU kernel, bit for bit (optim/blockwise8.py).
            rows += _rows(f"optim.{name}", case, "bnb", mine, theirs, names, steps == 1)
    return rows
