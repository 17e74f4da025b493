"""NF4 kernels for QLoRA: a dequantize kernel and fused dequantize-matmul kernels in Triton,
each next to the pure-PyTorch reference it must equal, and the autograd function NF4Linear uses.

Modules (one concept each; ``kernels/README.md`` walks through them):

- ``kernels.backend``              which implementation runs, chosen at call time
- ``kernels.nf4_layout``           ``NF4Weight``: bitsandbytes' NF4 (+ double quant) tensors, checked
- ``kernels.nf4_dequant``          dequantize: reference, Triton kernel, shared tile helper
- ``kernels.nf4_matmul_forward``   forward y = x @ dequant(W)^T (+ bias), fused
- ``kernels.nf4_matmul_backward``  input gradient dx = dy @ dequant(W), fused
- ``kernels.nf4_autograd``         ``nf4_linear`` / ``NF4MatmulFunction``
- ``kernels.testing``              helpers for tests and the benchmark

Importing this package is cheap and harmless on purpose: it loads only ``kernels.backend``
(standard library); everything else, torch and Triton included, loads on first attribute
access. bitsandbytes runs ``from kernels import get_kernel`` at its own import time, meaning
Hugging Face's kernel-hub package of the same name. That import must fail with ImportError
(which bitsandbytes catches, falling back to its built-in CPU code), so this package defines
neither ``get_kernel`` nor ``__version__`` (transformers reads the latter to decide whether the
hub package is installed). ``tests/test_import_kernels.py`` holds both to that.
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

# Public name -> submodule that defines it, imported on first access (PEP 562).
_LAZY = {
    "NF4_VALUES": "finetune_ref.kernels.nf4_layout",
    "NF4Weight": "finetune_ref.kernels.nf4_layout",
    "nf4_quant_map": "finetune_ref.kernels.nf4_layout",
    "dequantize_nf4": "finetune_ref.kernels.nf4_dequant",
    "dequantize_nf4_reference": "finetune_ref.kernels.nf4_dequant",
    "dequantize_nf4_triton": "finetune_ref.kernels.nf4_dequant",
    "nf4_matmul": "finetune_ref.kernels.nf4_matmul_forward",
    "nf4_matmul_reference": "finetune_ref.kernels.nf4_matmul_forward",
    "nf4_matmul_triton": "finetune_ref.kernels.nf4_matmul_forward",
    "nf4_matmul_input_grad": "finetune_ref.kernels.nf4_matmul_backward",
    "nf4_matmul_input_grad_reference": "finetune_ref.kernels.nf4_matmul_backward",
    "nf4_matmul_input_grad_triton": "finetune_ref.kernels.nf4_matmul_backward",
    "NF4MatmulFunction": "finetune_ref.kernels.nf4_autograd",
    "nf4_linear": "finetune_ref.kernels.nf4_autograd",
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
        raise AttributeError(f"module 'kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
