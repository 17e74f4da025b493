"""Which implementation runs an NF4 op: the Triton kernels or the pure-PyTorch references.

The choice is made at *call time*, from (in this order):

1. ``set_backend(name)`` / ``use_backend(name)`` in this process, if one was made;
2. the environment variable ``KERNELS_BACKEND`` (read on every call, so a test or a
   launcher can change it without re-importing anything);
3. ``"auto"``.

The names:

- ``"auto"``   Triton when every tensor is on a CUDA device and the ``triton`` package is
  installed; the PyTorch reference otherwise (the CPU training path never needs Triton).
- ``"triton"`` always Triton. Raises when Triton is missing, or when the tensors are on the
  CPU and Triton's interpreter is off (``TRITON_INTERPRET=1`` runs Triton kernels on CPU
  tensors, slowly, which is how the test suite checks the kernels without a GPU).
- ``"torch"``  always the PyTorch reference (a way to rule the kernels out when debugging).

This module only uses the standard library: ``import kernels`` must stay cheap and harmless,
because bitsandbytes runs ``from kernels import get_kernel`` when it is imported (it means
Hugging Face's kernel-hub package of the same name; see ``kernels/README.md``). Nothing here
imports Triton or probes a device at import time.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from typing import Any

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "KERNELS_BACKEND"

# None means "no explicit choice in this process": fall back to the environment variable.
_backend_override: str | None = None


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"{where}: backend must be one of {BACKENDS}, got {name!r}")
    return name.lower()


def set_backend(name: str | None) -> None:
    """Force the NF4 ops onto one implementation for this process.

    Args:
        name: ``"auto"``, ``"triton"`` or ``"torch"`` (case-insensitive), or ``None`` to drop
            the choice and go back to the ``KERNELS_BACKEND`` environment variable.

    Raises:
        ValueError: for any other name.
    """
    global _backend_override
    _backend_override = None if name is None else _check_name(name, "set_backend")


def get_backend() -> str:
    """The backend name in force now: the ``set_backend`` choice, else ``$KERNELS_BACKEND``,
    else ``"auto"``.

    Raises:
        ValueError: if ``KERNELS_BACKEND`` holds an unknown name.
    """
    if _backend_override is not None:
        return _backend_override
    env = os.environ.get(ENV_VAR, "").strip()
    if not env:
        return "auto"
    return _check_name(env, f"environment variable {ENV_VAR}")


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Context manager form of ``set_backend``; restores the previous choice on exit."""
    global _backend_override
    previous = _backend_override
    set_backend(name)
    try:
        yield
    finally:
        _backend_override = previous


def triton_available() -> bool:
    """True if the ``triton`` package can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """True if Triton's CPU interpreter is switched on (``TRITON_INTERPRET`` truthy).

    Triton reads this variable when a ``@triton.jit`` decorator runs, i.e. when a kernel module
    (``kernels/nf4_dequant.py``, ``kernels/nf4_matmul.py``) is first imported, which happens on the
    first call that resolves to "triton": it must be set before then.
    """
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def resolve_backend(*tensors: Any) -> str:
    """Pick ``"triton"`` or ``"torch"`` for an op on ``tensors`` (None entries are ignored).

    Raises:
        RuntimeError: the backend is forced to ``"triton"`` but Triton is not installed.
        ValueError: the backend is forced to ``"triton"``, the tensors are not all on CUDA,
            and the interpreter is off.
    """
    name = get_backend()
    if name == "torch":
        return "torch"
    present = [t for t in tensors if t is not None]
    on_cuda = bool(present) and all(t.device.type == "cuda" for t in present)
    if name == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError(
            "the NF4 backend is forced to 'triton' but the triton package is not installed; "
            "pip install triton, or use set_backend('auto') / KERNELS_BACKEND=auto"
        )
    if not on_cuda and not interpreter_enabled():
        devices = sorted({str(t.device) for t in present})
        raise ValueError(
            f"the NF4 backend is forced to 'triton' but the tensors are on {devices}: Triton kernels "
            "need CUDA tensors, or TRITON_INTERPRET=1 set before the first kernel call to run them "
            "on the CPU"
        )
    return "triton"

