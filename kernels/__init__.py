"""NF4 kernels for QLoRA: a dequantize kernel and fused dequantize-matmul kernels in Triton, the
pure-PyTorch references they must equal, and the autograd op NF4Linear uses.

Modules (one concept each; ``kernels/README.md`` walks through them):

- ``kernels.backend``       which implementation runs, chosen at call time
- ``kernels.reference``     the PyTorch definitions (dequantize, matmul, input gradient) and input checks
- ``kernels.nf4_dequant``   Triton: the tile helpers and the dequantize kernel
- ``kernels.nf4_matmul``    Triton: forward y = x @ dequant(W)^T (+ bias) and dx = dy @ dequant(W), fused
- ``kernels.nf4_autograd``  ``nf4_linear`` / ``NF4MatmulFunction``: the op, on either backend
- ``kernels.lora_bgmv``     Triton: the gathered LoRA update of a mixed-adapter batch (reference: lora.mixed)

Every function takes a weight as ``(packed, state)``: the uint8 codes and an NF4QuantState
(finetune_ref.qlora.quant_state), used duck-typed. This room imports nothing of the project.

Importing this package is cheap and harmless on purpose: it loads only ``kernels.backend``
(standard library); everything else, torch and Triton included, loads on first attribute
access, and the Triton modules only when a call resolves to the "triton" backend (so a CPU-only
install works without Triton, and ``TRITON_INTERPRET=1`` may be set until the first such import).
Installed, this package is ``finetune_ref.kernels``: no top-level ``kernels`` is installed, so Hugging Face's
kernel-hub package of that name (which bitsandbytes imports with ``from kernels import get_kernel``) is left
alone. Run from the root of the checkout, this folder is importable as ``kernels`` from the current directory;
then that import must still fail with ImportError (bitsandbytes catches it and uses its built-in CPU code), so
this package defines neither ``get_kernel`` nor ``__version__`` (transformers reads the latter to decide
whether the hub package is installed). ``tests/test_import_kernels.py`` checks the installed case.
"""

from __future__ import annotations

import importlib
from typing import Any

from finetune_ref.kernels.backend import (
    BACKENDS,
    get_backend,
    interpreter_enabled,
    resolve_backend,
    set_backend,
    triton_available,
    use_backend,
)

# Public name -> submodule that defines it, imported on first access (PEP 562). The matmul references are
# reached as kernels.reference.nf4_matmul / nf4_matmul_input_grad (kernels.nf4_matmul is the Triton module).
_LAZY = {
    "dequantize_absmax": "finetune_ref.kernels.reference",
    "dequantize_nf4": "finetune_ref.kernels.reference",
    "dequantize_nf4_triton": "finetune_ref.kernels.nf4_dequant",
    "nf4_matmul_triton": "finetune_ref.kernels.nf4_matmul",
    "nf4_matmul_input_grad_triton": "finetune_ref.kernels.nf4_matmul",
    "NF4MatmulFunction": "finetune_ref.kernels.nf4_autograd",
    "nf4_linear": "finetune_ref.kernels.nf4_autograd",
    "lora_bgmv_triton": "finetune_ref.kernels.lora_bgmv",
}

__all__ = [
    "BACKENDS",
    "get_backend",
    "interpreter_enabled",
    "resolve_backend",
    "set_backend",
    "triton_available",
    "use_backend",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        # Plain AttributeError: `from kernels import get_kernel` must become an ImportError.
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
