"""Blockwise 8-bit quantization (optim/blockwise8.py) against bitsandbytes 0.50 on CPU, bit for bit.

The oracle is ``torch.ops.bitsandbytes.quantize_blockwise`` / ``dequantize_blockwise`` (bitsandbytes' native
CPU kernels). Exact equality is the claim, so tensors are compared with ``torch.equal``.
"""

import bitsandbytes.functional as bnbF
import pytest
import torch

from finetune_ref.optim.blockwise8 import (LUT_SIZE, build_quantize_lut, create_dynamic_map, dequantize_blockwise,
                                           quantize_blockwise)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def bnb_quantize(x, code, blocksize):
    # clone: keep bitsandbytes' kernel away from our map tensor
    return torch.ops.bitsandbytes.quantize_blockwise(x, code.clone(), blocksize)


@pytest.mark.parametrize("signed,max_exponent_bits", [(True, 7), (False, 7), (True, 5), (True, 2)])
def test_dynamic_map_equals_bitsandbytes(signed, max_exponent_bits):
    ours = create_dynamic_map(signed=signed, max_exponent_bits=max_exponent_bits)
    ref = bnbF.create_dynamic_map(signed=signed, max_exponent_bits=max_exponent_bits)
    assert ours.dtype == torch.float32 and ours.shape == (256,)
    assert torch.equal(ours, ref)
    assert bool((ours[1:] >= ours[:-1]).all())


def test_dynamic_map_rejects_incomplete_unsigned_map():
    with pytest.raises(ValueError, match="not 256"):
        create_dynamic_map(signed=False, max_exponent_bits=4)
    with pytest.raises(AssertionError):  # bitsandbytes refuses the same combination
        bnbF.create_dynamic_map(signed=False, max_exponent_bits=4)


def test_signed_map_shape_facts():
    code = create_dynamic_map(signed=True)
    assert code[-1].item() == 1.0 and 0.0 in code.tolist()
    assert code[0].item() == pytest.approx(-0.99297, abs=1e-5)  # no -1.0: the map is asymmetric
    assert code.unique().numel() == 256


def test_lut_is_monotone_and_covers_the_map():
    lut = build_quantize_lut(create_dynamic_map(signed=True))
    assert lut.shape == (LUT_SIZE,) and lut.dtype == torch.uint8
    assert lut[0].item() == 0 and lut[-1].item() == 255
    assert bool((lut[1:].long() >= lut[:-1].long()).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
def test_quantize_blockwise_equals_bitsandbytes(dtype, blocksize):
    gen = torch.Generator().manual_seed(blocksize)
    code = create_dynamic_map(signed=True)
    for n in [1, 7, 255, 256, 257, 1000, 40_000]:
        x = (torch.randn(n, generator=gen) * torch.rand(n, generator=gen) * 3).to(dtype)
        x_before = x.clone()
        q, absmax = quantize_blockwise(x, code, blocksize)
        q_ref, absmax_ref = bnb_quantize(x, code, blocksize)
        assert torch.equal(x, x_before), "input modified"
        assert q.dtype == torch.uint8 and q.shape == x.shape
        assert torch.equal(absmax, absmax_ref), (n, dtype, blocksize)
        assert torch.equal(q, q_ref), (n, dtype, blocksize, int((q != q_ref).sum()))


def test_quantize_blockwise_equals_bitsandbytes_2d_and_unsigned_map():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(37, 300, generator=gen)
    q, a = quantize_blockwise(x, blocksize=256)
    q_ref, a_ref = bnb_quantize(x, bnbF.create_dynamic_map(signed=True), 256)
    assert torch.equal(q, q_ref) and torch.equal(a, a_ref)
    # An 8-bit optimizer's second moment: non-negative data on the unsigned map.
    v = torch.rand(5000, generator=gen) ** 4
    unsigned = create_dynamic_map(signed=False)
    q, a = quantize_blockwise(v, unsigned, 256)
    q_ref, a_ref = bnb_quantize(v, unsigned, 256)
    assert torch.equal(q, q_ref) and torch.equal(a, a_ref)


def test_lut_rule_differs_from_nearest_and_bitsandbytes_follows_it():
    """bitsandbytes' CPU 8-bit step is not nearest rounding; we match it, and 'nearest' is really nearest."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256 * 400, generator=gen)
    code = create_dynamic_map(signed=True)
    q_lut, absmax = quantize_blockwise(x, code, 256, rounding="lut")
    q_near, _ = quantize_blockwise(x, code, 256, rounding="nearest")
    q_ref, _ = bnb_quantize(x, code, 256)
    assert torch.equal(q_lut, q_ref)
    differ = (q_lut != q_near).float().mean().item()
    assert 0.0005 < differ < 0.005, differ  # ~0.1-0.2% on normal data
    # 'nearest' picks a map value at minimal distance from x / absmax (fp32 arithmetic).
    v = (x.view(-1, 256) * (1.0 / absmax).view(-1, 1)).view(-1)
    dist = (v[:, None] - code[None, :]).abs()  # (n, 256)
    assert torch.equal(dist.gather(1, q_near.long()[:, None]).squeeze(1), dist.min(1).values)


def test_zero_block_and_partial_block():
    x = torch.cat([torch.zeros(256), torch.randn(256), torch.zeros(10)])
    q, absmax = quantize_blockwise(x, blocksize=256)
    q_ref, absmax_ref = bnb_quantize(x, create_dynamic_map(signed=True), 256)
    assert torch.equal(q, q_ref) and torch.equal(absmax, absmax_ref)
    assert absmax[0].item() == 0.0 and absmax[2].item() == 0.0 and bool((q[:256] == 0).all())
    out = dequantize_blockwise(q, absmax, blocksize=256)
    assert bool(torch.isfinite(out).all()) and bool((out[:256] == 0).all()) and bool((out[512:] == 0).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_blockwise_equals_bitsandbytes(dtype):
    gen = torch.Generator().manual_seed(3)
    code = create_dynamic_map(signed=True)
    x = torch.randn(3, 1000, generator=gen)
    q, absmax = quantize_blockwise(x, code, 256)
    ours = dequantize_blockwise(q, absmax, code, 256, dtype)
    ref = torch.ops.bitsandbytes.dequantize_blockwise(q, absmax, code, 256, dtype)
    assert ours.dtype == dtype and ours.shape == x.shape
    assert torch.equal(ours, ref)
    # Round-trip error: at most half the widest gap of the map (0.0141 near +-1) times absmax, plus grid slack.
    err = (dequantize_blockwise(q, absmax, code, 256) - x).abs().view(-1)
    assert float(err.max()) <= 0.0075 * float(absmax.max()) + 1e-6


def test_noncontiguous_input_quantizes_like_its_copy():
    x = torch.randn(300, 200).t()  # (200, 300), non-contiguous
    assert not x.is_contiguous()
    q, a = quantize_blockwise(x, blocksize=256)
    q2, a2 = quantize_blockwise(x.contiguous(), blocksize=256)
    assert torch.equal(q, q2) and torch.equal(a, a2)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="non-finite"):
        quantize_blockwise(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="non-finite"):
        quantize_blockwise(torch.tensor([1.0, float("inf")]))
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        quantize_blockwise(torch.randn(10, dtype=torch.float64))
    with pytest.raises(TypeError, match="already-quantized codes"):
        quantize_blockwise(torch.zeros(10, dtype=torch.uint8))
    with pytest.raises(ValueError, match="empty"):
        quantize_blockwise(torch.zeros(0))
    with pytest.raises(ValueError, match="blocksize"):
        quantize_blockwise(torch.randn(10), blocksize=0)
    with pytest.raises(ValueError, match="rounding"):
        quantize_blockwise(torch.randn(10), rounding="stochastic")
    with pytest.raises(ValueError, match="sorted"):
        quantize_blockwise(torch.randn(10), code=create_dynamic_map().flip(0))
    with pytest.raises(TypeError, match="shape \\(256,\\)"):
        quantize_blockwise(torch.randn(10), code=torch.zeros(16))
    q, a = quantize_blockwise(torch.randn(300))
    with pytest.raises(ValueError, match="absmax of shape"):
        dequantize_blockwise(q, a[:1])
    with pytest.raises(TypeError, match="uint8"):
        dequantize_blockwise(q.float(), a)
