"""AdamW with the field's standard options: fp32 master weights, paged states, 8-bit states.

One optimizer, :class:`AdamW`, with the options bitsandbytes' ``Optimizer2State`` and mixed-precision
training name (``bitsandbytes/optim/optimizer.py``, ``bitsandbytes/optim/adamw.py``):

* ``master_weights`` (default True): an fp32 copy of each 16-bit parameter receives the update, which is
  then rounded to the parameter's dtype (Micikevicius et al. 2018, section 3.1). With the 2-byte weight and
  gradient and the two fp32 moments this is the 16 bytes/parameter of mixed precision (Rajbhandari et al.
  2020, "ZeRO", section 3.1: 2 + 2 + 12). No effect on fp32 parameters, which are their own master.
* ``state_home`` ("device", "host" or "unified") and ``min_paged_size`` (bitsandbytes' 1e5 elements):
  where the states live, and which parameters' states leave the device (:mod:`optim.paging`; QLoRA,
  Dettmers et al. 2023, section 3, "Paged Optimizers"). The master copy is paged with the moments.
* ``optim_bits=8``, ``min_8bit_size`` (4096, bitsandbytes' default) and ``rounding``: blockwise 8-bit
  moments for parameters of at least ``min_8bit_size`` elements (Dettmers et al. 2022; smaller ones keep
  fp32 moments, not worth quantizing), quantized with the rule "nearest" (default, the paper's and
  bitsandbytes' pure-PyTorch backend's) or "lut" (bitsandbytes' CPU kernel, byte for byte; see
  :mod:`optim.blockwise8`). 2 bytes + 2 x 4 / 256 of absmax = 2.03 bytes of state per parameter, against 8.

The math is :mod:`optim.functional`: with fp32 parameters and 32-bit states the parameters and states are
bitwise equal to ``torch.optim.AdamW(foreach=False)`` in every home.

State per parameter (torch's and bitsandbytes' names, so state dicts load across them): ``step`` (fp32
scalar tensor on the CPU, never paged); with 32-bit states ``exp_avg``, ``exp_avg_sq`` (fp32); with 8-bit
states ``state1``, ``state2`` (uint8, the parameter's shape) and ``absmax1``, ``absmax2`` (fp32,
``(ceil(numel / 256),)``), or ``state1``, ``state2`` in fp32 below ``min_8bit_size``; and ``master`` (fp32)
for 16-bit parameters with ``master_weights``.

The names users know are presets of this one class with bitsandbytes' defaults, as bitsandbytes defines its
own: :class:`PagedAdamW` (states in "host"), :class:`AdamW8bit` (8-bit states on the device),
:class:`PagedAdamW8bit` (both), and :class:`MasterWeightAdamW` (what ``build_optimizer("adamw")`` gives
16-bit parameters: 32-bit states on the device, weight_decay 0.0 by default).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from finetune_ref.optim.blockwise8 import ROUNDING_RULES, create_dynamic_map
from finetune_ref.optim.functional import BLOCKSIZE, adamw8bit_update_, mixed_precision_update_
from finetune_ref.optim.paging import DEFAULT_MIN_PAGED_SIZE, STATE_HOMES, PagingStats, StateLayout, StatePager

LOW_PRECISION = (torch.bfloat16, torch.float16)
FLOAT_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MIN_8BIT_SIZE = 4096  # bitsandbytes' min_8bit_size: smaller parameters keep 32-bit states
OPTIM_BITS = (32, 8)


def check_hyperparameters(lr: Any, betas: Any, eps: Any, weight_decay: Any) -> None:
    """Raise ValueError unless lr, eps, weight_decay are finite numbers >= 0 and betas two numbers in [0, 1)."""
    for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if (not isinstance(betas, (tuple, list)) or len(betas) != 2
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in betas)):
        raise ValueError(f"betas must be two numbers in [0, 1), e.g. (0.9, 0.999), got {betas!r}")


class AdamW(torch.optim.Optimizer):
    """AdamW with fp32 master weights, a state home and 32- or 8-bit states (see the module docstring).

    Args:
        params: parameters or param groups, as for any torch optimizer; fp32, bf16 or fp16, dense.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (decoupled weight decay, bias correction).
        master_weights: keep an fp32 copy of 16-bit parameters and apply the update to it (default True).
            Without it a 16-bit parameter is upcast, updated in fp32 and rounded back each step
            (bitsandbytes' behaviour), which loses updates smaller than half a bf16 ulp.
        state_home: "device" (default), "host" (paged) or "unified".
        min_paged_size: parameters with fewer elements keep their states on the device (default 100,000).
        optim_bits: 32 (default) or 8 (blockwise 8-bit moments).
        min_8bit_size: with 8-bit states, parameters with fewer elements keep fp32 moments (default 4096).
        rounding: with 8-bit states, "nearest" (default) or "lut" (bitsandbytes' CPU kernel, byte for byte).

    Attributes:
        pager: the :class:`optim.paging.StatePager`; ``pager.stats`` (``paging_stats``) counts its copies.

    Only parameters with ``requires_grad`` and a gradient are updated and get state; others are untouched.

    Raises:
        ValueError: bad hyperparameters or options; unified memory unavailable for a CUDA parameter; with
            8-bit states, a non-finite gradient (in ``step``, before anything is changed: it cannot be
            quantized).
        TypeError: a parameter that is not fp32/bf16/fp16; a sparse gradient (in ``step``).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, master_weights: bool = True, state_home: str = "device",
                 min_paged_size: int = DEFAULT_MIN_PAGED_SIZE, optim_bits: int = 32,
                 min_8bit_size: int = MIN_8BIT_SIZE, rounding: str = "nearest"):
        check_hyperparameters(lr, betas, eps, weight_decay)
        if not isinstance(master_weights, bool):
            raise TypeError(f"master_weights must be a bool, got {master_weights!r}")
        if isinstance(optim_bits, bool) or optim_bits not in OPTIM_BITS:
            raise ValueError(f"optim_bits must be one of {OPTIM_BITS}, got {optim_bits!r}")
        if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 1:
            raise ValueError(f"min_8bit_size must be an int >= 1 (elements), got {min_8bit_size!r}")
        if rounding not in ROUNDING_RULES:
            raise ValueError(f"rounding must be one of {ROUNDING_RULES}, got {rounding!r}")
        self.pager = StatePager(state_home, min_paged_size)
        self.master_weights, self.optim_bits = master_weights, optim_bits
        self.min_8bit_size, self.rounding = min_8bit_size, rounding
        self._qmaps: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def add_param_group(self, param_group: dict) -> None:
        """As ``torch.optim.Optimizer.add_param_group``, then check the group (it is not added if it is bad).

        Raises:
            ValueError: bad hyperparameters; unified memory unavailable for one of its CUDA parameters.
            TypeError: a parameter that is not fp32/bf16/fp16.
        """
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            check_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"])
            group["betas"] = tuple(group["betas"])
            for p in group["params"]:
                if p.dtype not in FLOAT_PARAM_DTYPES:
                    raise TypeError(f"{type(self).__name__} needs fp32/bf16/fp16 parameters, got one of {p.dtype}")
                self.pager.check_param(p)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    @property
    def state_home(self) -> str:
        return self.pager.state_home

    @property
    def paging_stats(self) -> PagingStats:
        return self.pager.stats

    def _state_layout(self, p: torch.Tensor) -> StateLayout:
        """Names, shapes and dtypes of ``p``'s state tensors (``step`` excluded)."""
        shape, n = tuple(p.shape), p.numel()
        if self.optim_bits == 32:
            layout = {"exp_avg": (shape, torch.float32), "exp_avg_sq": (shape, torch.float32)}
        elif n < self.min_8bit_size:
            layout = {"state1": (shape, torch.float32), "state2": (shape, torch.float32)}
        else:
            nb = -(-n // BLOCKSIZE)
            layout = {"state1": (shape, torch.uint8), "absmax1": ((nb,), torch.float32),
                      "state2": (shape, torch.uint8), "absmax2": ((nb,), torch.float32)}
        if self.master_weights and p.dtype in LOW_PRECISION:
            layout["master"] = (shape, torch.float32)
        return layout

    def _qmaps_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The signed (m) and unsigned (v) dynamic maps on ``device``, built once per device."""
        if device not in self._qmaps:
            self._qmaps[device] = (create_dynamic_map(signed=True).to(device),
                                   create_dynamic_map(signed=False).to(device))
        return self._qmaps[device]

    def _check_grads(self, grads: list[torch.Tensor]) -> None:
        """Raise before any update if a gradient cannot be used: 8-bit states cannot hold NaN/inf."""
        if self.optim_bits == 32 or not grads:
            return
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).cpu()  # one device sync per step
        if not bool(finite.all()):
            i = int((~finite).nonzero()[0, 0])
            raise ValueError(f"{type(self).__name__}.step: gradient {i} (in param-group order, among parameters "
                             f"with a gradient) has NaN/inf values, which cannot be stored in 8-bit states; "
                             f"nothing was updated. Skip this step (e.g. on a non-finite loss or grad norm) or "
                             f"lower the learning rate")

    @torch.no_grad()
    def step(self, closure=None):
        """Update every parameter that requires grad and has a gradient; page its states in and out around it.

        Returns:
            ``closure()``'s value, if a closure was given.

        Raises:
            TypeError: a sparse gradient. ValueError: a non-finite gradient with 8-bit states.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        todo = [(p, group) for group in self.param_groups for p in group["params"]
                if p.grad is not None and p.requires_grad]
        for p, _ in todo:
            if p.grad.is_sparse:
                raise TypeError(f"{type(self).__name__} does not support sparse gradients")
        self._check_grads([p.grad for p, _ in todo])  # before any update: a refused step changes nothing
        try:
            for p, group in todo:
                state = self.state[p]
                if not state:
                    homed = self.pager.allocate(p, self._state_layout(p))
                    if "master" in homed:
                        homed["master"].copy_(p.detach())  # exact upcast of the 16-bit weight
                    state.update({"step": torch.tensor(0.0, dtype=torch.float32), **homed})
                homed = {name: t for name, t in state.items() if name != "step"}
                working = self.pager.page_in(p, homed)
                beta1, beta2 = group["betas"]
                hyper = (state["step"].item() + 1, group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
                if self.optim_bits == 8:
                    adamw8bit_update_(p, p.grad, working, *hyper, *self._qmaps_on(p.device), self.rounding)
                else:
                    mixed_precision_update_(p, p.grad, working["exp_avg"], working["exp_avg_sq"],
                                            working.get("master"), *hyper)
                state["step"] += 1  # fp32 counter on the CPU, as torch.optim.AdamW keeps it
                self.pager.page_out(p, working, homed)
                del working  # evict: the device copies are freed before the next parameter's page-in
        finally:
            self.pager.synchronize()
        return loss

    def state_bytes(self) -> dict[str, int]:
        """Bytes of state tensors (``step`` counters excluded) by home: {"device": n, "host": n, "unified": n}."""
        out = {home: 0 for home in STATE_HOMES}
        for p, state in self.state.items():
            out[self.pager.home_of(p)] += sum(t.nbytes for name, t in state.items() if name != "step")
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a ``state_dict()`` (also after ``torch.save``/``torch.load(weights_only=True)``).

        Every state tensor is copied into the home this optimizer assigns to its parameter (not the device
        the saved tensor names), keeping its fp32 dtype (``torch.optim.Optimizer.load_state_dict`` would cast
        it to the parameter's, rounding the master and moments of a bf16 parameter); the step counters and
        the param groups' hyperparameters are restored. Nothing changes if the state dict is rejected.

        Raises:
            ValueError: a different number of groups or parameters; a state entry with missing or extra
                tensors (saved by another optimizer or other settings), or a tensor of the wrong shape/dtype;
                a bad step counter or hyperparameter.
        """
        name = type(self).__name__
        if not isinstance(state_dict, dict) or "param_groups" not in state_dict:
            raise ValueError(f"{name}.load_state_dict expects a dict from state_dict() with 'state' and "
                             f"'param_groups', got {type(state_dict).__name__}")
        groups, saved_groups = self.param_groups, state_dict["param_groups"]
        if not isinstance(saved_groups, (list, tuple)) or len(saved_groups) != len(groups):
            raise ValueError(f"the saved state has {len(saved_groups)} param groups, this {name} has {len(groups)}")
        id_to_param: dict[Any, torch.Tensor] = {}
        for i, (group, saved) in enumerate(zip(groups, saved_groups)):
            if len(saved.get("params", ())) != len(group["params"]):
                raise ValueError(f"saved param group {i} has {len(saved.get('params', ()))} parameters, this "
                                 f"{name}'s has {len(group['params'])}")
            check_hyperparameters(saved.get("lr"), saved.get("betas"), saved.get("eps"), saved.get("weight_decay"))
            id_to_param.update(zip(saved["params"], group["params"]))
        new_state = {}
        for key, entry in state_dict.get("state", {}).items():
            if key not in id_to_param:
                raise ValueError(f"the saved state refers to parameter {key!r}, which no saved param group lists")
            p = id_to_param[key]
            new_state[p] = self._restore_entry(p, key, entry)
        self.state.clear()
        self.state.update(new_state)
        for group, saved in zip(groups, saved_groups):
            group.update({k: (tuple(v) if k == "betas" else v) for k, v in saved.items() if k != "params"})

    def _restore_entry(self, p: torch.Tensor, key: Any, entry: dict) -> dict[str, torch.Tensor]:
        """Check one saved per-parameter state against ``_state_layout(p)`` and copy it into p's home."""
        layout = self._state_layout(p)
        names = {n for n in entry if n != "step"}
        if names != set(layout):
            raise ValueError(f"the saved state of parameter {key!r} has {sorted(names)}, {type(self).__name__} "
                             f"expects {sorted(layout)} for a {p.dtype} parameter of {p.numel()} elements "
                             f"(saved by another optimizer, or with other master_weights/min_8bit_size settings?)")
        for n, (shape, dtype) in layout.items():
            t = entry[n]
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != dtype:
                got = f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"the saved state '{n}' of parameter {key!r} is {got}, expected {dtype} of "
                                 f"shape {shape}")
        step = entry.get("step")
        step = step.item() if isinstance(step, torch.Tensor) and step.numel() == 1 else step
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not (step >= 0 and float(step).is_integer()):
            raise ValueError(f"the saved state of parameter {key!r} has step {entry.get('step')!r}; expected an "
                             f"integer >= 0")
        homed = self.pager.place(p, {n: entry[n] for n in layout})
        return {"step": torch.tensor(float(step), dtype=torch.float32), **homed}


# ---------------------------------------------------------------------- presets (bitsandbytes' defaults)
class MasterWeightAdamW(AdamW):
    """:class:`AdamW` with 32-bit states on the device: fp32 master + moments for 16-bit parameters, exactly
    ``torch.optim.AdamW(foreach=False)`` for fp32 ones. ``weight_decay`` defaults to 0.0."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, lr, betas, eps, weight_decay)


class PagedAdamW(AdamW):
    """:class:`AdamW` with 32-bit states paged to host memory (``state_home="host"`` by default)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, state_home: str = "host", min_paged_size: int = DEFAULT_MIN_PAGED_SIZE,
                 master_weights: bool = True):
        super().__init__(params, lr, betas, eps, weight_decay, master_weights=master_weights,
                         state_home=state_home, min_paged_size=min_paged_size)


class AdamW8bit(AdamW):
    """:class:`AdamW` with blockwise 8-bit states (``optim_bits=8``) on the device by default."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, min_8bit_size: int = MIN_8BIT_SIZE, rounding: str = "nearest",
                 state_home: str = "device", min_paged_size: int = DEFAULT_MIN_PAGED_SIZE,
                 master_weights: bool = True):
        super().__init__(params, lr, betas, eps, weight_decay, master_weights=master_weights,
                         state_home=state_home, min_paged_size=min_paged_size, optim_bits=8,
                         min_8bit_size=min_8bit_size, rounding=rounding)


class PagedAdamW8bit(AdamW8bit):
    """:class:`AdamW8bit` with its states paged to host memory (``state_home="host"`` by default)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, min_8bit_size: int = MIN_8BIT_SIZE, rounding: str = "nearest",
                 state_home: str = "host", min_paged_size: int = DEFAULT_MIN_PAGED_SIZE,
                 master_weights: bool = True):
        super().__init__(params, lr, betas, eps, weight_decay, min_8bit_size, rounding, state_home,
                         min_paged_size, master_weights)
