"""``kernels.nf4_linear`` (the autograd op QLoRA's NF4Linear calls): outputs and gradients
equal a dense oracle on both backends, and the backend is chosen at call time.

The oracle is autograd through ``F.linear(x, W_dense, bias)`` with W_dense the reference
dequantization (a constant): dx = dy @ W_dense, dbias = sum of dy. The Triton path runs under
``TRITON_INTERPRET=1`` (set below, before the first Triton kernel module is imported).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of a Triton kernel module

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


from finetune_ref import kernels  # noqa: E402
from finetune_ref.kernels import reference  # noqa: E402
from finetune_ref.kernels.backend import interpreter_enabled, triton_available  # noqa: E402
from finetune_ref.kernels.reference import dequantize_nf4  # noqa: E402
from kernel_testing import TOLERANCES, make_nf4_weight, nf4_tensors  # noqa: E402

needs_triton = pytest.mark.skipif(not triton_available(), reason="the Triton path needs triton (pip install triton)")
DEVICE = "cpu" if interpreter_enabled() else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is off and there is no CUDA device", allow_module_level=True)


@pytest.fixture(autouse=True)
def _no_backend_choice(monkeypatch):
    monkeypatch.delenv("KERNELS_BACKEND", raising=False)
    kernels.set_backend(None)
    yield
    kernels.set_backend(None)


def _case(dtype, shape=(65, 67), lead=(3, 17), double_quant=True):
    g = torch.Generator().manual_seed(0)
    nw = make_nf4_weight(torch.randn(shape, generator=g), 64, double_quant, DEVICE)  # (packed, state)
    x = torch.randn(*lead, shape[1], generator=g).to(DEVICE, dtype)
    bias = torch.randn(shape[0], generator=g).to(DEVICE, dtype)
    dy = torch.randn(*lead, shape[0], generator=g).to(DEVICE, dtype)
    return nw, x, bias, dy


def _run(fn, x, bias, dy):
    x = x.clone().requires_grad_(True)
    bias = bias.clone().requires_grad_(True)
    y = fn(x, bias)
    y.backward(dy)
    return y.detach(), x.grad, bias.grad


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nf4_linear_matches_dense_oracle(backend, dtype):
    nw, x, bias, dy = _case(dtype)
    dense = dequantize_nf4(*nw, dtype)
    want = _run(lambda x_, b_: F.linear(x_, dense, b_), x, bias, dy)
    with kernels.use_backend(backend):
        got = _run(lambda x_, b_: kernels.nf4_linear(x_, *nw, b_), x, bias, dy)
    for g, w, name in zip(got, want, ("y", "dx", "dbias")):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        tol = TOLERANCES[dtype]
        if name == "dbias":  # a sum over 51 rows: a few roundings more in fp16
            tol = dict(atol=4 * tol["atol"], rtol=4 * tol["rtol"])
        torch.testing.assert_close(g, w, **tol, msg=lambda m: f"{name} ({backend}): {m}")


@needs_triton
def test_both_backends_agree_and_the_weight_gets_no_gradient():
    nw, x, bias, dy = _case(torch.float32, shape=(100, 300), lead=(64,), double_quant=False)
    results = {}
    for name in ("torch", "triton"):
        kernels.set_backend(name)
        results[name] = _run(lambda x_, b_: kernels.nf4_linear(x_, *nw, b_), x, bias, dy)
    for a, b in zip(results["torch"], results["triton"]):
        torch.testing.assert_close(a, b, **TOLERANCES[torch.float32])
    assert all(not t.requires_grad for t in nf4_tensors(*nw))


@needs_triton
def test_backend_is_chosen_at_call_time(monkeypatch):
    from finetune_ref.kernels import nf4_matmul

    calls = []
    for module, name in ((nf4_matmul, "nf4_matmul_triton"), (reference, "nf4_matmul"),
                         (nf4_matmul, "nf4_matmul_input_grad_triton"), (reference, "nf4_matmul_input_grad")):
        original = getattr(module, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    nw, x, bias, dy = _case(torch.float32, lead=(4,))

    _run(lambda x_, b_: kernels.nf4_linear(x_, *nw, b_), x, bias, dy)  # auto on CPU -> torch
    assert calls == ["nf4_matmul", "nf4_matmul_input_grad"]
    calls.clear()
    monkeypatch.setenv("KERNELS_BACKEND", "triton")  # no re-import needed
    _run(lambda x_, b_: kernels.nf4_linear(x_, *nw, b_), x, bias, dy)
    assert calls == ["nf4_matmul_triton", "nf4_matmul_input_grad_triton"]
    calls.clear()
    # The backward uses the forward's backend even if the setting changes in between.
    x_ = x.clone().requires_grad_(True)
    y = kernels.nf4_linear(x_, *nw, bias)
    kernels.set_backend("torch")
    y.backward(dy)
    assert calls == ["nf4_matmul_triton", "nf4_matmul_input_grad_triton"]


def test_no_input_grad_when_x_is_frozen():
    nw, x, bias, dy = _case(torch.float32, lead=(5,))
    bias = bias.clone().requires_grad_(True)
    y = kernels.nf4_linear(x, *nw, bias)  # x does not require grad
    y.backward(dy)
    torch.testing.assert_close(bias.grad, dy.sum(0))
    assert x.grad is None


def test_nf4_linear_errors(monkeypatch):
    nw, x, bias, _ = _case(torch.float32, lead=(2,))
    with pytest.raises(ValueError, match="in_features=67"):
        kernels.nf4_linear(x[:, :66], *nw, bias)
    with pytest.raises(TypeError, match="bias must be torch.float32"):
        kernels.nf4_linear(x, *nw, bias.half())
    monkeypatch.setenv("KERNELS_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if triton_available() and DEVICE == "cpu":
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            kernels.nf4_linear(x, *nw, bias)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_nf4_linear_matches_qlora_nf4linear(backend):
    # How qlora.NF4Linear calls us: its packed weight and its (cached) NF4QuantState, as they are.
    from finetune_ref.qlora import nf4_linear as nf4_linear_module
    torch.manual_seed(0)
    dense = torch.nn.Linear(67, 65)
    layer = nf4_linear_module.NF4Linear.from_linear(dense, compute_dtype=torch.float32).to(DEVICE)
    x = torch.randn(3, 5, 67, device=DEVICE)
    dy = torch.randn(3, 5, 65, device=DEVICE)
    want = _run(lambda x_, b_: layer(x_), x, layer.bias.detach(), dy)
    with kernels.use_backend(backend):
        got = _run(lambda x_, b_: kernels.nf4_linear(x_, layer.weight, layer.quant_state, b_), x,
                   layer.bias.detach(), dy)
    for g, w in zip(got[:2], want[:2]):  # y and dx (the layer's bias is frozen, so no dbias there)
        if backend == "torch":
            assert torch.equal(g, w)  # the same dequantization and the same F.linear
        else:
            torch.testing.assert_close(g, w, **TOLERANCES[torch.float32])


def test_nf4linear_takes_the_triton_path_when_forced():
    """NF4Linear routes through the kernels' op, on Triton when the backend resolves to it (interpreter here)."""
    from finetune_ref.qlora.nf4_linear import NF4Linear

    torch.manual_seed(0)
    layer = NF4Linear.from_linear(torch.nn.Linear(64, 48, bias=True), compute_dtype=torch.float32)
    x = torch.randn(5, 64, requires_grad=True)
    ref = layer(x)
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    with kernels.use_backend("triton"):
        out = layer(x)
        (g,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-5)
