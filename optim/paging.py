"""Where optimizer states live: a memory "home" per parameter, and the copies that page states in and out.

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
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
from typing import Any, Iterator

import torch

STATE_HOMES = ("device", "host", "unified")
# bitsandbytes pages the state of a parameter with >= 1e5 elements (Optimizer8bit.get_state_buffer).
DEFAULT_MIN_PAGED_SIZE = 100_000

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
