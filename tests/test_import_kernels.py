"""Installing the project adds one import name, ``finetune_ref``; its ``kernels`` sub-package must not be taken
for Hugging Face's kernel-hub package of the same top-level name, which bitsandbytes and transformers try to import.
These tests import everything together in fresh interpreters, outside the checkout (whose folders would otherwise be
importable from the current directory), and check that nothing breaks.

What the libraries do about a ``kernels`` package (bitsandbytes 0.50.2, transformers 5.x, read from their sources):

- bitsandbytes ``backends/cpu/ops.py``, at import time on CPUs with AVX512-BF16, runs
  ``from kernels import get_kernel`` inside ``try/except Exception`` and on failure logs a
  warning and uses its built-in CPU code (``gemm_4bit_forward_kernel = None``). We install no top-level
  ``kernels``; transformers >= 5.25 requires Hugging Face's, whose hub download then fails offline (or is refused
  for an untrusted publisher): the same outcome as with no package at all.
  (``backends/mps/ops.py`` does the same on Apple GPUs only.)
- transformers ``utils/import_utils.py``: ``is_kernels_available()`` looks for a top-level ``kernels`` module
  and its distribution's version; it answers True exactly when Hugging Face's package is installed, never for ours.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

CHEAP_IMPORT = f"""
import sys
from finetune_ref import kernels
assert kernels.__file__ == {str(REPO / "kernels" / "__init__.py")!r}, kernels.__file__
heavy = [m for m in ("torch", "triton", "bitsandbytes", "transformers") if m in sys.modules]
assert not heavy, f"import kernels loaded {{heavy}}"
assert kernels.__name__ == "finetune_ref.kernels"
import importlib.util
spec = importlib.util.find_spec("kernels")  # Hugging Face's package (transformers >= 5.25 requires it), or none
ours = {str(REPO / "kernels" / "__init__.py")!r}
assert spec is None or spec.origin != ours, "the project must not install a top-level 'kernels'"
print("OK")
"""

TOGETHER = f"""
import logging
import sys

OURS_FIRST = sys.argv[1] == "ours-first"
if OURS_FIRST:
    from finetune_ref import kernels, models, lora, qlora
import bitsandbytes
import bitsandbytes.functional as bnbf
import peft
import torch
from finetune_ref import kernels, models, lora, qlora
import finetune_ref.kernels.nf4_autograd, finetune_ref.kernels.reference  # noqa: F401
import finetune_ref.kernels.nf4_dequant, finetune_ref.kernels.nf4_matmul  # noqa: F401

assert kernels.__file__ == {str(REPO / "kernels" / "__init__.py")!r}, kernels.__file__
# Only finetune_ref is ours at the top level: no generic name of the project was imported or is importable.
import importlib.util
for name in ("models", "lora", "qlora", "kernels", "full", "optim", "gptq", "train", "recipes", "parity", "serve", "cli",
             "finetune"):
    spec = importlib.util.find_spec(name)  # "kernels" may be Hugging Face's (transformers >= 5.25 requires it)
    assert spec is None or spec.origin != f"{str(REPO)}/{{name}}/__init__.py", (name, spec)

# bitsandbytes took its built-in CPU path, not a hub kernel.
import bitsandbytes.backends.cpu.ops as cpu_ops
assert getattr(cpu_ops, "gemm_4bit_forward_kernel", None) is None

# transformers does not take us for the hub package: it sees the hub package exactly when that is installed.
import importlib.metadata
from transformers.utils.import_utils import is_kernels_available
try:
    importlib.metadata.distribution("kernels")
    hub_installed = True
except importlib.metadata.PackageNotFoundError:
    hub_installed = False
assert is_kernels_available() == hub_installed

# bitsandbytes, peft and our kernels still work side by side.
w = torch.randn(64, 128)
packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
from finetune_ref.qlora.quant_state import NF4QuantState
ours = NF4QuantState.from_dict(state.as_dict(packed=True))
assert torch.equal(kernels.dequantize_nf4(packed, ours), bnbf.dequantize_4bit(packed, state))
x = torch.randn(3, 128, requires_grad=True)
kernels.nf4_linear(x, packed, ours).sum().backward()
assert x.grad is not None and x.grad.shape == (3, 128)
model = torch.nn.Sequential(torch.nn.Linear(8, 8))
lora_model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["0"]))
assert lora_model(torch.randn(2, 8)).shape == (2, 8)
print("OK")
"""


# bitsandbytes imports Triton at its own import, so in a test process Triton may be imported
# before TRITON_INTERPRET=1 is set. Our kernels must still run in the interpreter then (their modules
# are imported after it is set, and they use only Triton builtins; see kernels/nf4_dequant.py).
INTERPRETER_AFTER_TRITON = """
import os
import triton  # first, with the interpreter off, as bitsandbytes' import does
assert not os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
import torch
from finetune_ref.qlora.nf4 import quantize_nf4
from finetune_ref.kernels import reference
from finetune_ref.kernels.nf4_dequant import dequantize_nf4_triton
from finetune_ref.kernels.nf4_matmul import nf4_matmul_input_grad_triton, nf4_matmul_triton
nw = quantize_nf4(torch.randn(65, 67), 64, True)  # (packed, state)
assert torch.equal(dequantize_nf4_triton(*nw), reference.dequantize_nf4(*nw))
x, dy = torch.randn(3, 67), torch.randn(3, 65)
torch.testing.assert_close(nf4_matmul_triton(x, *nw), reference.nf4_matmul(x, *nw), atol=1e-4, rtol=1e-5)
torch.testing.assert_close(nf4_matmul_input_grad_triton(dy, *nw), reference.nf4_matmul_input_grad(dy, *nw),
                           atol=1e-4, rtol=1e-5)
from finetune_ref.kernels.lora_bgmv import lora_bgmv_triton
from finetune_ref.lora.mixed import lora_bgmv, stack_adapters
A, B = stack_adapters([torch.randn(4, 67), torch.randn(2, 67)], [torch.randn(65, 4), torch.randn(65, 2)])
x, idx, scaling = torch.randn(3, 2, 67), torch.tensor([0, -1, 1]), torch.tensor([2.0, 0.5])  # x: (B, T, in)
torch.testing.assert_close(lora_bgmv_triton(x, A, B, scaling, idx), lora_bgmv(x, A, B, scaling, idx),
                           atol=1e-4, rtol=1e-5)
print("OK")
"""


def _run(code: str, *args: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # only what is installed: the checkout's folders must not be on the path
    env.pop("KERNELS_BACKEND", None)
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_import_kernels_is_cheap_and_ours(tmp_path):
    result = _run(CHEAP_IMPORT, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "OK", result.stderr


@pytest.mark.parametrize("order", ["libraries-first", "ours-first"])
def test_kernels_next_to_bitsandbytes_and_peft(order, tmp_path):
    result = _run(TOGETHER, order, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stdout + result.stderr


def test_kernels_run_in_interpreter_when_triton_was_imported_first(tmp_path):
    pytest.importorskip("triton", reason="needs triton (pip install triton)")
    result = _run(INTERPRETER_AFTER_TRITON, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "OK", result.stdout + result.stderr
