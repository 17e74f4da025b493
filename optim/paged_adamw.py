"""Paged AdamW: AdamW whose state tensors live in a chosen memory "home" and visit the device only to be updated.

QLoRA (Dettmers et al. 2023, section 3, "Paged Optimizers") avoids the out-of-memory spikes of long
sequences by keeping optimizer states where they do not compete with activations. bitsandbytes allocates
them in CUDA unified memory (``cudaMallocManaged``; ``bitsandbytes/functional.py`` ``get_paged``) and lets
the driver migrate pages. Here the same job is done by an explicit, readable shim, :class:`StatePager`,
with three homes for the state tensors of a parameter:

* ``"device"``  plain tensors on the parameter's device (this is ordinary AdamW).
* ``"host"``    CPU tensors (pinned when the parameter is on an accelerator). For each parameter's update
                its states are copied to the device with non-blocking copies ("page in"), updated there,
                copied back ("page out") and the device copies dropped, so the device holds the states of
                one parameter at a time. The copy back is waited for at the end of ``step()``, so that the
                host tensors are complete whenever the caller sees them (``state_dict()``, checkpoints).
* ``"unified"`` CUDA managed memory, migrated by the driver on demand, as bitsandbytes does. PyTorch 2.13
                has no public API to allocate it; the only route is the private, experimental
                ``torch.cuda._use_uvm()`` (a ``MemPool`` whose allocator calls ``cudaMallocManaged`` through
                the ``cuda-python`` package). We use it when both exist and otherwise raise a ValueError that
                says so; ``"host"`` is the portable choice. For a parameter on the CPU there is nothing to
                migrate: the states are plain CPU tensors.

Only states of parameters with at least ``min_paged_size`` elements leave the device; smaller ones stay in
``"device"`` (the copies would cost more than they save). bitsandbytes pages a state buffer when its
parameter has >= 1e5 elements (``Optimizer8bit.get_state_buffer`` in ``bitsandbytes/optim/optimizer.py``),
which is the default here. All the state tensors of one parameter share its home.

The copies run on the current stream, in order with the updates: the CPU enqueues the next parameter's
page-in while the GPU still works, but the copy engine and the update kernels do not overlap. Prefetching
the next parameter's states on a side stream would hide the copies; this reference keeps the simple order.

Without a GPU every home runs: ``"host"`` then copies CPU to CPU, and :class:`PagingStats` counts every copy,
so the mechanism is exercised (and tested) on any machine.

The update is torch.optim.AdamW's single-tensor path (``full.optimizer.adamw_update_``: Loshchilov & Hutter
2019, Algorithm 2, with Adam's bias correction), so with fp32 parameters the parameters and states are
bitwise equal to ``torch.optim.AdamW(foreach=False)`` in every home. The moments are always fp32; for 16-bit
parameters an fp32 ``master`` copy is kept too (``master_weights=True``, as ``full.MasterWeightAdamW``), and is
paged with the moments.

State per parameter (torch's names, so state dicts look like ``torch.optim.AdamW``'s): ``step`` (fp32 scalar
tensor on the CPU, never paged), ``exp_avg``, ``exp_avg_sq`` (fp32) and, for 16-bit parameters with
``master_weights``, ``master`` (fp32). ``load_state_dict`` puts every tensor into the home this optimizer
assigns to its parameter, whatever device the saved tensor names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
from typing import Any, Iterator

import torch

from finetune_ref.optim.master_adamw import adamw_update_

STATE_HOMES = ("device", "host", "unified")
# bitsandbytes pages the state of a parameter with >= 1e5 elements (Optimizer8bit.get_state_buffer).
DEFAULT_MIN_PAGED_SIZE = 100_000
LOW_PRECISION = (torch.bfloat16, torch.float16)
FLOAT_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

StateLayout = dict[str, tuple[tuple[int, ...], torch.dtype]]  # state name -> (shape, dtype)


@dataclasses.dataclass
class PagingStats:
    """Counters of the copies a :class:`StatePager` made (cumulative; ``reset()`` zeroes them).

    Attributes:
        page_ins: state tensors copied from their home to the device.
        page_outs: state tensors copied from the device back to their home.
        bytes_in, bytes_out: bytes moved by those copies.
        max_resident_bytes: the most bytes of paged-in state held on the device at one time (the states of
            one parameter, as they are evicted before the next parameter's are paged in).
    """

    page_ins: int = 0
    page_outs: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    max_resident_bytes: int = 0

    def reset(self) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, 0)


class StatePager:
    """Where the state tensors of an optimizer live, and the page-in/page-out copies between there and the device.

    Args:
        state_home: "device", "host" or "unified" (see the module docstring).
        min_paged_size: parameters with fewer elements keep their states in "device" (int >= 0).

    Raises:
        ValueError: an unknown home or a bad threshold.
    """

    def __init__(self, state_home: str, min_paged_size: int):
        if state_home not in STATE_HOMES:
            raise ValueError(f"state_home must be one of {STATE_HOMES}, got {state_home!r}")
        if isinstance(min_paged_size, bool) or not isinstance(min_paged_size, int) or min_paged_size < 0:
            raise ValueError(f"min_paged_size must be an int >= 0 (elements of a parameter), got {min_paged_size!r}")
        self.state_home = state_home
        self.min_paged_size = min_paged_size
        self.stats = PagingStats()
        self._uvm_pools: list[Any] = []  # unified-memory pools must outlive the tensors allocated from them
        self._unsynced: set[torch.device] = set()  # devices with device->host copies not yet waited for

    def home_of(self, param: torch.Tensor) -> str:
        """The home of ``param``'s states: "device" below the threshold, else the configured home."""
        if self.state_home == "device" or param.numel() < self.min_paged_size:
            return "device"
        return self.state_home

    def check_param(self, param: torch.Tensor) -> None:
        """Raise ValueError if ``param``'s home cannot be allocated here (unified memory without support)."""
        if self.home_of(param) == "unified" and param.device.type == "cuda":
            if not hasattr(torch.cuda, "_use_uvm"):
                raise ValueError("state_home='unified' needs torch.cuda._use_uvm (a private PyTorch API, absent "
                                 f"from torch {torch.__version__}); use state_home='host' instead")
            if importlib.util.find_spec("cuda") is None or importlib.util.find_spec("cuda.bindings") is None:
                raise ValueError("state_home='unified' allocates with cudaMallocManaged through the 'cuda-python' "
                                 "package, which is not installed: `pip install cuda-python`, or use "
                                 "state_home='host'")
        elif self.home_of(param) == "unified" and param.device.type != "cpu":
            raise ValueError(f"state_home='unified' is implemented for CUDA (and CPU) parameters only, got one on "
                             f"{param.device}; use state_home='host'")

    @contextlib.contextmanager
    def _allocating_in(self, param: torch.Tensor, home: str) -> Iterator[torch.device]:
        """Yield the device to allocate ``param``'s states on, inside the right allocator context."""
        if home == "host":
            yield torch.device("cpu")
        elif home == "unified" and param.device.type == "cuda":
            self.check_param(param)
            with torch.cuda._use_uvm(param.device) as pool:  # every allocation inside goes to managed memory
                self._uvm_pools.append(pool)
                yield param.device
        else:  # "device", or "unified" for a CPU parameter (host memory is already where the CPU computes)
            yield param.device

    def allocate(self, param: torch.Tensor, layout: StateLayout) -> dict[str, torch.Tensor]:
        """Zero-filled state tensors for ``param`` in its home, one per entry of ``layout``."""
        home = self.home_of(param)
        pin = home == "host" and param.device.type != "cpu"  # pinned memory makes non-blocking copies async
        with self._allocating_in(param, home) as device:
            return {name: torch.zeros(shape, dtype=dtype, device=device, pin_memory=pin)
                    for name, (shape, dtype) in layout.items()}

    def place(self, param: torch.Tensor, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Copies of ``values`` (any device) in ``param``'s home (used to restore a saved state)."""
        layout = {name: (tuple(v.shape), v.dtype) for name, v in values.items()}
        homed = self.allocate(param, layout)
        for name, value in values.items():
            homed[name].copy_(value)  # blocking: the source may be a temporary the caller drops
        return homed

    def is_paged(self, param: torch.Tensor) -> bool:
        """True when ``param``'s states are moved by explicit copies around each update ("host" home)."""
        return self.home_of(param) == "host"

    def page_in(self, param: torch.Tensor, homed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Device copies of ``param``'s states (non-blocking); for an unpaged home, ``homed`` itself."""
        if not self.is_paged(param):
            return homed
        # copy=True: on a CPU-only machine the "device" is the CPU too, and the copy must still happen.
        working = {name: t.to(param.device, non_blocking=True, copy=True) for name, t in homed.items()}
        nbytes = sum(t.nbytes for t in working.values())
        self.stats.page_ins += len(working)
        self.stats.bytes_in += nbytes
        self.stats.max_resident_bytes = max(self.stats.max_resident_bytes, nbytes)
        return working

    def page_out(self, param: torch.Tensor, working: dict[str, torch.Tensor], homed: dict[str, torch.Tensor]) -> None:
        """Copy updated device states back home (non-blocking); the caller then drops ``working`` (eviction).

        Freeing a device tensor right after enqueueing its copy is safe: the caching allocator reuses the
        block only for work queued later on the same stream, which runs after the copy.
        """
        if working is homed:
            return
        for name, t in working.items():
            homed[name].copy_(t, non_blocking=True)
            self.stats.page_outs += 1
            self.stats.bytes_out += t.nbytes
        if param.device.type != "cpu":
            self._unsynced.add(param.device)

    def synchronize(self) -> None:
        """Wait for pending device->host copies, so host states can be read (called at the end of a step)."""
        for device in self._unsynced:
            torch.accelerator.synchronize(device)
        self._unsynced.clear()


def check_hyperparameters(lr: Any, betas: Any, eps: Any, weight_decay: Any) -> None:
    """Raise ValueError unless lr, eps, weight_decay are finite numbers >= 0 and betas two numbers in [0, 1)."""
    for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if (not isinstance(betas, (tuple, list)) or len(betas) != 2
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in betas)):
        raise ValueError(f"betas must be two numbers in [0, 1), e.g. (0.9, 0.999), got {betas!r}")


class PagedAdamW(torch.optim.Optimizer):
    """AdamW with its state tensors in a chosen home (see the module docstring).

    Args:
        params: parameters or param groups, as for any torch optimizer; fp32, bf16 or fp16, dense.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (decoupled weight decay, bias correction).
        state_home: "host" (default: the paged optimizer), "device" or "unified".
        min_paged_size: parameters with fewer elements keep their states on the device (default 100,000,
            bitsandbytes' threshold).
        master_weights: keep an fp32 copy of 16-bit parameters and apply the update to it (no effect on fp32
            parameters). Without it a 16-bit parameter is upcast, updated in fp32 and rounded back each step
            (bitsandbytes' behaviour), which loses updates smaller than half a bf16 ulp.

    Attributes:
        pager: the :class:`StatePager`; ``pager.stats`` counts page-in/page-out copies.

    Only parameters with ``requires_grad`` and a gradient are updated and get state; others are untouched.

    Raises:
        ValueError: bad hyperparameters, home or threshold; unified memory unavailable for a CUDA parameter.
        TypeError: a parameter that is not fp32/bf16/fp16; a sparse gradient (in ``step``).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, state_home: str = "host",
                 min_paged_size: int = DEFAULT_MIN_PAGED_SIZE, master_weights: bool = True):
        check_hyperparameters(lr, betas, eps, weight_decay)
        if not isinstance(master_weights, bool):
            raise TypeError(f"master_weights must be a bool, got {master_weights!r}")
        self.pager = StatePager(state_home, min_paged_size)
        self.master_weights = master_weights
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

    # ------------------------------------------------------------------ what a subclass changes
    def _state_layout(self, p: torch.Tensor) -> StateLayout:
        """Names, shapes and dtypes of ``p``'s state tensors (``step`` excluded)."""
        layout = {"exp_avg": (tuple(p.shape), torch.float32), "exp_avg_sq": (tuple(p.shape), torch.float32)}
        if self.master_weights and p.dtype in LOW_PRECISION:
            layout["master"] = (tuple(p.shape), torch.float32)
        return layout

    def _update(self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], step: float,
                group: dict) -> None:
        """One AdamW update of ``p`` with its (paged-in) ``state``; ``step`` is 1-based."""
        beta1, beta2 = group["betas"]
        target = fp32_target(p, state)
        grad32 = grad if grad.dtype == torch.float32 else grad.to(torch.float32)
        adamw_update_(target, grad32, state["exp_avg"], state["exp_avg_sq"], step, group["lr"], beta1, beta2,
                      group["eps"], group["weight_decay"])
        if target is not p:
            p.copy_(target)  # round to the parameter's dtype (nearest even)

    def _check_grads(self, grads: list[torch.Tensor]) -> None:
        """Raise before any update if the gradients cannot be used (AdamW, like torch's, accepts any)."""

    # ------------------------------------------------------------------ the loop
    def _init_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        homed = self.pager.allocate(p, self._state_layout(p))
        if "master" in homed:
            homed["master"].copy_(p.detach())  # exact upcast of the 16-bit weight
        return {"step": torch.tensor(0.0, dtype=torch.float32), **homed}

    @torch.no_grad()
    def step(self, closure=None):
        """Update every parameter that requires grad and has a gradient; page its states in and out around it.

        Returns:
            ``closure()``'s value, if a closure was given.

        Raises:
            TypeError: a sparse gradient. Subclasses may raise ValueError for a gradient they cannot use.
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
                    state.update(self._init_state(p))
                homed = {name: t for name, t in state.items() if name != "step"}
                working = self.pager.page_in(p, homed)
                self._update(p, p.grad, working, state["step"].item() + 1, group)
                state["step"] += 1  # fp32 counter on the CPU, as torch.optim.AdamW keeps it
                self.pager.page_out(p, working, homed)
                del working  # evict: the device copies are freed before the next parameter's page-in
        finally:
            self.pager.synchronize()
        return loss

    # ------------------------------------------------------------------ state dict
    def state_bytes(self) -> dict[str, int]:
        """Bytes of state tensors (``step`` counters excluded) by home: {"device": n, "host": n, "unified": n}."""
        out = {home: 0 for home in STATE_HOMES}
        for p, state in self.state.items():
            home = self.pager.home_of(p)
            out[home] += sum(t.nbytes for name, t in state.items() if name != "step" and torch.is_tensor(t))
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a ``state_dict()`` (also after ``torch.save``/``torch.load(weights_only=True)``).

        Every state tensor is copied into the home this optimizer assigns to its parameter (not the device
        the saved tensor names); the step counters and the param groups' hyperparameters are restored.
        Nothing changes if the state dict is rejected.

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
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"the saved state '{n}' of parameter {key!r} is {got}, expected {dtype} {shape}")
        step = entry.get("step")
        step = step.item() if isinstance(step, torch.Tensor) and step.numel() == 1 else step
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not (step >= 0 and float(step).is_integer()):
            raise ValueError(f"the saved state of parameter {key!r} has step {entry.get('step')!r}; expected an "
                             f"integer >= 0")
        homed = self.pager.place(p, {n: entry[n] for n in layout})
        return {"step": torch.tensor(float(step), dtype=torch.float32), **homed}


def fp32_target(p: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """The fp32 tensor an update is applied to: the ``master`` copy if kept, ``p`` if fp32, else an upcast copy."""
    if "master" in state:
        return state["master"]
    return p if p.dtype == torch.float32 else p.to(torch.float32)
