"""The Triton NF4 dequantize kernel against its PyTorch reference, under Triton's interpreter.

Run on CPU with ``TRITON_INTERPRET=1`` (set below, before the kernel module is first imported:
``@triton.jit`` reads it when the kernels are defined). With ``TRITON_INTERPRET=0`` on a CUDA machine
the same tests run natively.

Tolerance: the kernel computes ``quant_map[code] * absmax`` in fp32 exactly like the reference,
so fp32 and fp16 outputs must be *bit-identical*. bf16: the interpreter truncates fp32 -> bf16
instead of rounding to nearest, so there we allow 1 bf16 ulp (2^-7 relative);
``benchmarks/bench_kernels.py`` checks bf16 exactly on a GPU.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of a Triton kernel module

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="the Triton kernel tests need triton (pip install triton)")

from finetune_ref.kernels.backend import interpreter_enabled  # noqa: E402
from finetune_ref.kernels.nf4_dequant import dequantize_nf4_triton  # noqa: E402
from finetune_ref.kernels.reference import dequantize_nf4  # noqa: E402
from kernel_testing import (  # noqa: E402
    assert_guards_intact,
    guarded_empty,
    make_nf4_weight,
    nf4_row_slice,
    nf4_tensors,
    random_nf4_weight,
)

DEVICE = "cpu" if interpreter_enabled() else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is off and there is no CUDA device", allow_module_level=True)

SHAPES = ((1, 1), (3, 5), (65, 67), (100, 300))


def _weight(shape, double_quant, blocksize=64, seed=0):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return make_nf4_weight(w, blocksize, double_quant, DEVICE)  # (packed, state)


def _snapshot(nw):
    return [t.clone() for t in nf4_tensors(*nw)]


def _assert_unchanged(nw, before):
    for t, old in zip(nf4_tensors(*nw), before):
        assert torch.equal(t, old), "the kernel modified one of its inputs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_dequant_kernel_equals_reference(shape, double_quant, dtype):
    nw = _weight(shape, double_quant)
    before = _snapshot(nw)
    # Guarded contiguous output: sentinels on both sides of the flat range.
    buffer, out = guarded_empty(shape, dtype, DEVICE)
    result = dequantize_nf4_triton(*nw, dtype, out=out)
    assert result is out
    assert torch.equal(out, dequantize_nf4(*nw, dtype))
    assert_guards_intact(buffer, out)
    _assert_unchanged(nw, before)


@pytest.mark.parametrize("double_quant", [False, True])
def test_dequant_kernel_bf16_within_interpreter_truncation(double_quant):
    nw = _weight((100, 300), double_quant)
    got = dequantize_nf4_triton(*nw, torch.bfloat16).float()
    want = dequantize_nf4(*nw, torch.bfloat16).float()
    if interpreter_enabled():
        torch.testing.assert_close(got, want, rtol=2**-7, atol=0)
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("block_bytes", [8, 64])
def test_dequant_kernel_many_programs_and_tails(block_bytes):
    # 65 * 67 = 4355 elements: odd (a padded last byte), 69 blocks with a partial last one, and
    # with small programs the program boundaries fall inside absmax blocks.
    nw = _weight((65, 67), double_quant=True)
    buffer, out = guarded_empty((65, 67), torch.float32, DEVICE, guard=33)
    dequantize_nf4_triton(*nw, out=out, block_bytes=block_bytes)
    assert torch.equal(out, dequantize_nf4(*nw))
    assert_guards_intact(buffer, out)


@pytest.mark.parametrize("blocksize", [32, 128, 4096])
def test_dequant_kernel_other_blocksizes(blocksize):
    # 300 * 130 / 32 = 1219 blocks: five nested (256-block) groups, the last partial.
    nw = _weight((300, 130), double_quant=True, blocksize=blocksize)
    assert torch.equal(dequantize_nf4_triton(*nw, torch.float16), dequantize_nf4(*nw, torch.float16))


def test_dequant_kernel_rejects_bad_out():
    nw = _weight((4, 64), double_quant=False)
    with pytest.raises(ValueError, match="out must be torch.float16 of shape"):
        dequantize_nf4_triton(*nw, torch.float16, out=torch.empty(4, 64, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        dequantize_nf4_triton(*nw, out=torch.empty(64, 4, device=DEVICE).t())
    for bad in (48, 0, 2**20):
        with pytest.raises(ValueError, match="power of two from 1 to 2"):
            dequantize_nf4_triton(*nw, block_bytes=bad)
    with pytest.raises(TypeError, match="dtype must be one of"):
        dequantize_nf4_triton(*nw, torch.int8)


@pytest.mark.skipif(
    os.environ.get("KERNELS_LARGE_TESTS") != "1",
    reason="set KERNELS_LARGE_TESTS=1 (about 7 GB RAM and 7 minutes): int64 offsets past 2^31 elements",
)
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequant_kernel_past_int32_offsets(double_quant):
    # 65539 x 32832 = 2^31 + 4,325,440 elements: flat indices, byte offsets and block indices
    # past 2^31 would wrap in int32. Rows from 65536 on start on a nested-block boundary.
    rows, cols = 65539, 32832
    assert rows * cols > 2**31
    nw = random_nf4_weight((rows, cols), double_quant, DEVICE)
    out = dequantize_nf4_triton(*nw, torch.float16, block_bytes=1 << 19)
    tail = nf4_row_slice(*nw, 65536, rows)
    assert torch.equal(out[65536:], dequantize_nf4(*tail, torch.float16))
