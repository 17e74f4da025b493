"""The fused NF4 matmul kernels (forward y = x @ W^T + b, backward dx = dy @ W) against their
PyTorch references, under Triton's interpreter.

``TRITON_INTERPRET=1`` is set below, before the kernel module is first imported. Tolerances per dtype
are ``kernel_testing.TOLERANCES`` (fp32: 1e-4 abs / 1e-5 rel, summation order; fp16: 1e-3 abs /
2e-3 rel, one rounding of the output either way). bf16 is not tested here: the interpreter's bf16
``tl.dot`` is wrong; ``benchmarks/bench_kernels.py`` checks bf16 on a GPU.

Shapes: weights 1x1, 3x5, 65x67, 100x300 (tails everywhere, blocks straddling rows) times
M in {1, 3, 17, 64}.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of a Triton kernel module

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="the Triton kernel tests need triton (pip install triton)")

from finetune_ref.kernels.backend import interpreter_enabled  # noqa: E402
from finetune_ref.kernels.nf4_matmul import (  # noqa: E402
    TileConfig,
    matmul_config,
    nf4_matmul_input_grad_triton,
    nf4_matmul_triton,
)
from finetune_ref.kernels.reference import nf4_matmul, nf4_matmul_input_grad  # noqa: E402
from kernel_testing import TOLERANCES, assert_guards_intact, guarded_empty, make_nf4_weight, nf4_tensors  # noqa: E402

DEVICE = "cpu" if interpreter_enabled() else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is off and there is no CUDA device", allow_module_level=True)

SHAPES = ((1, 1), (3, 5), (65, 67), (100, 300))
MS = (1, 3, 17, 64)
DTYPES = (torch.float32, torch.float16)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _weight(shape, double_quant, seed=0):
    w = torch.randn(shape, generator=_gen(seed))
    return make_nf4_weight(w, 64, double_quant, DEVICE)  # (packed, state)


def _randn(*shape, dtype=torch.float32, seed=1):
    return torch.randn(*shape, generator=_gen(seed)).to(device=DEVICE, dtype=dtype)


def _close(got, want):
    torch.testing.assert_close(got, want, **TOLERANCES[want.dtype])


def _assert_unchanged(tensors, before):
    for t, old in zip(tensors, before):
        assert torch.equal(t, old), "the kernel modified one of its inputs"


# ---------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_kernel_equals_reference(shape, M, double_quant, dtype):
    nw = _weight(shape, double_quant)
    N, K = shape
    x = _randn(M, K, dtype=dtype)
    bias = _randn(N, dtype=dtype, seed=2) if M != 3 else None  # with and without bias
    inputs = [x, *nf4_tensors(*nw)] + ([bias] if bias is not None else [])
    before = [t.clone() for t in inputs]
    buffer, out = guarded_empty((M, N), dtype, DEVICE, contiguous=False)  # strided, sentinel all round
    y = nf4_matmul_triton(x, *nw, bias, out=out)
    assert y is out
    _close(y, nf4_matmul(x, *nw, bias))
    assert_guards_intact(buffer, out)
    _assert_unchanged(inputs, before)


@pytest.mark.parametrize(
    "M, config",
    [
        (17, TileConfig(16, 16, 16, GROUP_M=2)),  # 2 x 5 tiles, tails in M, N and K, grouped order
        (64, TileConfig(16, 32, 16, GROUP_M=1)),  # 4 x 3 tiles
        (3, TileConfig(16, 16, 32)),  # decode-like: 13 of 16 rows masked
    ],
)
def test_forward_kernel_multi_tile_tails(M, config):
    nw = _weight((65, 67), double_quant=True)
    x = _randn(M, 67)
    buffer, out = guarded_empty((M, 65), torch.float32, DEVICE, contiguous=False)
    nf4_matmul_triton(x, *nw, out=out, config=config)
    _close(out, nf4_matmul(x, *nw))
    assert_guards_intact(buffer, out)


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_kernel_non_contiguous_x(dtype):
    nw = _weight((100, 300), double_quant=True)
    wide = _randn(17, 600, dtype=dtype)
    x_strided = wide[:, ::2]  # (17, 300), stride (600, 2)
    x_transposed = _randn(300, 17, dtype=dtype).t()  # (17, 300), stride (1, 17)
    x_3d = _randn(2, 5, 300, dtype=dtype).transpose(0, 1)  # (5, 2, 300), non-contiguous leading dims
    for x in (x_strided, x_transposed, x_3d):
        assert not x.is_contiguous()
        before = x.clone()
        y = nf4_matmul_triton(x, *nw)
        assert y.shape == (*x.shape[:-1], 100)
        _close(y, nf4_matmul(x.contiguous(), *nw))
        assert torch.equal(x, before)


def test_forward_kernel_empty_and_bad_out():
    nw = _weight((65, 67), double_quant=False)
    assert nf4_matmul_triton(_randn(0, 67), *nw).shape == (0, 65)
    with pytest.raises(ValueError, match=r"out must be a torch.float32 tensor of shape \(2, 65\)"):
        nf4_matmul_triton(_randn(2, 67), *nw, out=torch.empty(2, 64, device=DEVICE))
    with pytest.raises(ValueError, match="power of two >= 16"):
        TileConfig(16, 24, 16)
    with pytest.raises(ValueError, match="power of two >= 16"):
        TileConfig(8, 16, 16)


def test_interpreter_config_is_one_config_with_big_tiles():
    cfg = matmul_config(64, 100, 300, interpret=True)
    assert (cfg.BLOCK_M, cfg.BLOCK_N, cfg.BLOCK_K) == (64, 128, 128)
    assert matmul_config(1, 4096, 4096, interpret=False).BLOCK_M == 16
    assert matmul_config(4096, 4096, 4096, interpret=False).BLOCK_M == 128


# ---------------------------------------------------------------------------------- backward
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("shape", SHAPES)
def test_input_grad_kernel_equals_reference(shape, M, double_quant, dtype):
    nw = _weight(shape, double_quant)
    N, K = shape
    dy = _randn(M, N, dtype=dtype, seed=3)
    inputs = [dy, *nf4_tensors(*nw)]
    before = [t.clone() for t in inputs]
    buffer, out = guarded_empty((M, K), dtype, DEVICE, contiguous=False)
    dx = nf4_matmul_input_grad_triton(dy, *nw, out=out)
    assert dx is out
    _close(dx, nf4_matmul_input_grad(dy, *nw))
    assert_guards_intact(buffer, out)
    _assert_unchanged(inputs, before)


@pytest.mark.parametrize(
    "M, config",
    [
        (17, TileConfig(16, 16, 16, GROUP_M=2)),  # reduction over N=65 in 5 steps, K=67 in 5 tiles
        (3, TileConfig(16, 32, 16)),
    ],
)
def test_input_grad_kernel_multi_tile_tails(M, config):
    nw = _weight((65, 67), double_quant=True)
    dy = _randn(M, 65)
    buffer, out = guarded_empty((M, 67), torch.float32, DEVICE, contiguous=False)
    nf4_matmul_input_grad_triton(dy, *nw, out=out, config=config)
    _close(out, nf4_matmul_input_grad(dy, *nw))
    assert_guards_intact(buffer, out)


def test_input_grad_kernel_non_contiguous_dy():
    nw = _weight((100, 300), double_quant=False)
    dy = _randn(100, 17, dtype=torch.float16).t()  # (17, 100), stride (1, 17)
    dy_3d = _randn(2, 5, 100).transpose(0, 1)  # (5, 2, 100)
    for g in (dy, dy_3d):
        dx = nf4_matmul_input_grad_triton(g, *nw)
        assert dx.shape == (*g.shape[:-1], 300)
        _close(dx, nf4_matmul_input_grad(g.contiguous(), *nw))
