"""Measure the tensor memory of a piece of PyTorch code on any device, CPU included: live bytes and their peak.

Why not the process's resident set size (RSS)? On CPU, glibc's allocator keeps freed chunks below its
(adaptive) mmap threshold in its arenas, so RSS stays high after tensors die and the peak depends on the
history of allocation sizes; it also includes the interpreter and the loaded libraries (~0.5 GB). And torch
has no ``torch.cpu.max_memory_allocated``. What an analytic estimator predicts is the bytes of live tensors, so
that is what this measures, exactly and deterministically:

* every tensor an operator returns is seen by a ``TorchDispatchMode`` (``__torch_dispatch__`` runs for each
  aten op, forward and backward: the autograd engine propagates the mode to its work), and its *storage* is
  recorded once (views and in-place results share a storage and are not counted again);
* a weak reference on each storage object fires when the storage is freed and subtracts its bytes. PyTorch
  keeps one Python object per live storage, so the reference lives exactly as long as the memory;
* tensors that exist before the tracker starts (parameters, buffers, optimizer states, the batch) are added
  with :meth:`TensorMemoryTracker.track`.

The peak is exact for the allocations torch ops make; scratch memory an op uses *inside* one kernel (e.g.
oneDNN or flash-attention workspaces) is invisible here, which is small beside the tensors themselves. The
same approach underlies torch's private ``torch.distributed._tools.mem_tracker.MemTracker``; this is a small
version of it with named phases, built on ``TorchDispatchMode`` (documented in PyTorch's "Extending PyTorch"
notes, though it lives in ``torch.utils._python_dispatch``).

Usage::

    with TensorMemoryTracker() as tracker:
        tracker.track(model, optimizer)           # what already exists
        with tracker.phase("forward"):
            loss = model(**batch).loss
        with tracker.phase("backward"):
            loss.backward()
    tracker.peak, tracker.phase_peaks["forward"]  # bytes

The tracker slows every op by a Python call: measure memory and speed in separate runs.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Iterable, Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TensorMemoryTracker(TorchDispatchMode):
    """Live tensor bytes on one device type while active; see the module docstring.

    Args:
        device: device type to count ("cpu" by default; "cuda" works too). Tensors elsewhere are ignored.

    Attributes:
        current: bytes of live storages now (int).
        peak: the largest ``current`` seen since entry or the last :meth:`reset_peak` (int).
        phase_peaks: phase name -> peak bytes inside that phase (the last time it ran).
        phase_starts: phase name -> ``current`` bytes when that phase began.

    Raises:
        TypeError: ``device`` is not a string.
    """

    def __init__(self, device: str = "cpu") -> None:
        super().__init__()
        if not isinstance(device, str):
            raise TypeError(f"device must be a device type string such as 'cpu', got {device!r}")
        self.device = device
        self.current = 0
        self.peak = 0
        self.phase_peaks: dict[str, int] = {}
        self.phase_starts: dict[str, int] = {}
        self._bytes: dict[int, int] = {}  # id(storage) -> bytes counted for it
        self._refs: dict[int, weakref.ref] = {}
        self._phase_stack: list[tuple[str, int]] = []  # (name, peak before the phase)

    # ---------------------------------------------------------------------------------------------- counting
    def _on_free(self, key: int) -> None:
        self.current -= self._bytes.pop(key, 0)
        self._refs.pop(key, None)

    def _add_tensor(self, t: torch.Tensor) -> None:
        if t.device.type != self.device or t.layout != torch.strided:
            return  # other devices; sparse tensors
        if type(t).__torch_dispatch__ is not torch.Tensor.__torch_dispatch__:
            # A wrapper subclass (DTensor, ...) holds no storage of its own; the plain tensors inside it are
            # counted when ops create them. Plain subclasses such as bitsandbytes' Params4bit are counted.
            return
        storage = t.untyped_storage()
        key = id(storage)
        nbytes = storage.nbytes()
        known = self._bytes.get(key)
        if known is None:
            self._refs[key] = weakref.ref(storage, lambda _ref, key=key: self._on_free(key))
            self._bytes[key] = nbytes
            self.current += nbytes
        elif known != nbytes:  # resized in place (out= ops resize their output)
            self._bytes[key] = nbytes
            self.current += nbytes - known
        if self.current > self.peak:
            self.peak = self.current

    def track(self, *objects: Any) -> None:
        """Count tensors that already exist: tensors, modules (parameters, buffers, gradients), optimizers
        (state tensors), or any nesting of lists/tuples/dicts of them. Shared storages count once.

        Raises:
            TypeError: an object that is none of these.
        """
        for obj in objects:
            if isinstance(obj, torch.Tensor):
                self._add_tensor(obj)
                if obj.grad is not None:
                    self._add_tensor(obj.grad)
            elif isinstance(obj, nn.Module):
                for p in obj.parameters():
                    self.track(p)
                for b in obj.buffers():
                    self._add_tensor(b)
            elif isinstance(obj, torch.optim.Optimizer):
                for state in obj.state.values():
                    self.track(list(state.values()))
            elif isinstance(obj, dict):
                self.track(*obj.values())
            elif isinstance(obj, (list, tuple)):
                self.track(*obj)
            elif isinstance(obj, (int, float, bool, str)) or obj is None:
                continue  # e.g. an optimizer's "step" count or a config value
            else:
                raise TypeError(f"track() takes tensors, modules, optimizers and containers of them, "
                                f"got {type(obj).__name__}")

    def reset_peak(self) -> None:
        """Start a new peak from the bytes live now."""
        self.peak = self.current

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Record the bytes at the start of the block (``phase_starts[name]``) and its own peak
        (``phase_peaks[name]``); the overall ``peak`` keeps counting across phases."""
        self.phase_starts[name] = self.current
        self._phase_stack.append((name, self.peak))
        self.peak = self.current
        try:
            yield
        finally:
            _, outer_peak = self._phase_stack.pop()
            self.phase_peaks[name] = self.peak
            self.peak = max(self.peak, outer_peak)

    # ---------------------------------------------------------------------------------------------- dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves, _ = tree_flatten(out)
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                self._add_tensor(leaf)
        return out


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (each storage once, whole storage counted)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None:
            storage = t.untyped_storage()
            seen[id(storage)] = storage.nbytes()
    return sum(seen.values())
