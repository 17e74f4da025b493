"""NF4 + double quantization (qlora/nf4.py, qlora/quant_state.py) against bitsandbytes 0.50 on CPU.

The claim is byte-for-byte equality, so packed bytes and states are compared with ``torch.equal``
(tolerance zero). Dequantized values are compared, also exactly, with bitsandbytes' pure-PyTorch
dequantize path (its native CPU kernel is wrong for some shapes; see the bug test below).
"""

import json
import math

import bitsandbytes.functional as bnbF
import pytest
import torch

from finetune_ref.optim.blockwise8 import quantize_blockwise
from finetune_ref.parity import oracles
from finetune_ref.qlora.nf4 import (NF4_CODE_VALUES, derive_nf4_code, nf4_code, pack_nibbles, quantize_nf4, unpack_nibbles)
from finetune_ref.kernels.reference import dequantize_absmax, dequantize_nf4
from finetune_ref.qlora.quant_state import PACKED_STATE_KEY, NF4QuantState

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
# 1x1, odd counts, last dims not a multiple of 64, blocks straddling rows, 1-D and 3-D, >256 blocks.
SHAPES = [(1, 1), (3, 5), (65, 67), (5, 100), (64, 64), (128, 96), (7,), (2, 3, 50), (300, 257), (96, 576)]

bnb_quantize = oracles.bnb_quantize_nf4  # quantize_4bit(quant_type="nf4", compress_statistics=double_quant)
# bitsandbytes' dequantization, pure-PyTorch path (absmax rebuilt as functional.dequantize_4bit does)
bnb_dequantize_reference = oracles.bnb_dequantize_pure


def assert_state_equals_bnb(packed, state, packed_ref, qs):
    assert torch.equal(packed, packed_ref)
    ours, ref = state.to_dict(packed=True), qs.as_dict(packed=True)
    assert sorted(ours) == sorted(ref)
    for key in ref:  # absmax (or its 8-bit codes), maps, nested absmax, and the JSON bytes (offset inside)
        assert ours[key].dtype == ref[key].dtype and torch.equal(ours[key], ref[key]), key
    if qs.nested:
        assert torch.equal(state.offset, qs.offset)


# ---------------------------------------------------------------------------------------------- the table
def test_nf4_table_equals_bitsandbytes():
    code = nf4_code()
    assert torch.equal(code, bnbF.get_4bit_type("nf4", device="cpu"))
    assert code[7].item() == 0.0 and code[0].item() == -1.0 and code[-1].item() == 1.0
    assert bool((code[1:] > code[:-1]).all())
    assert len(NF4_CODE_VALUES) == 16


def test_nf4_table_derived_from_normal_quantiles():
    assert torch.equal(derive_nf4_code(), nf4_code())  # bitsandbytes' 7-digit offset: exact
    exact_offset = 1 - (1 / (2 * 15) + 1 / (2 * 16)) / 2  # QLoRA section 3, unrounded
    diff = (derive_nf4_code(exact_offset) - nf4_code()).abs().max().item()
    assert diff <= 3e-7, diff  # a few fp32 ulps
    with pytest.raises(ValueError, match="offset"):
        derive_nf4_code(0.4)


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_equals_bitsandbytes(dtype, double_quant):
    gen = torch.Generator().manual_seed(0)
    for shape in SHAPES:
        for blocksize in BLOCKSIZES:
            w = (torch.randn(shape, generator=gen) * 0.05).to(dtype)
            packed, state = quantize_nf4(w, blocksize, double_quant)
            packed_ref, qs = bnb_quantize(w, blocksize, double_quant)
            assert packed.shape == ((w.numel() + 1) // 2, 1) and packed.dtype == torch.uint8
            assert_state_equals_bnb(packed, state, packed_ref, qs)
            out = dequantize_nf4(packed, state)
            assert out.dtype == dtype and out.shape == w.shape
            assert torch.equal(out, bnb_dequantize_reference(packed_ref, qs)), (shape, blocksize)


def test_double_quant_uses_bitsandbytes_8bit_rule_not_nearest():
    """On a tensor with many blocks some nested codes differ from nearest rounding; bitsandbytes agrees with us."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(1024, 1024, generator=gen) * torch.rand(1024, 1, generator=gen)  # 16384 blocks, varied scale
    packed, state = quantize_nf4(w, 64, True)
    packed_ref, qs = bnb_quantize(w, 64, True)
    assert_state_equals_bnb(packed, state, packed_ref, qs)
    absmax = w.reshape(-1, 64).abs().amax(1)
    nearest, _ = quantize_blockwise(absmax - absmax.mean(), state.nested_quant_map, 256, rounding="nearest")
    assert int((nearest != state.absmax).sum()) > 0
    # Rebuilt absmax stays close to the true one (8-bit dynamic map: well under 1% of the group max).
    err = (dequantize_absmax(state) - absmax).abs().view(-1)
    assert float(err.max()) <= 0.01 * float(absmax.max())


def test_packed_data_identical_with_and_without_double_quant():
    w = torch.randn(70, 130)
    assert torch.equal(quantize_nf4(w, 64, True)[0], quantize_nf4(w, 64, False)[0])


def test_dequantize_equals_bitsandbytes_native_on_safe_shapes():
    """Where bitsandbytes' native CPU kernel is right (last dim a multiple of the blocksize), we equal it.
    (For an odd last dim bitsandbytes itself falls back to the pure-PyTorch path, tested above, through a
    torch.compile wrapper that costs seconds; so odd shapes are left out here.)"""
    gen = torch.Generator().manual_seed(2)
    for shape, dtype in [((96, 576), torch.float32), ((64, 128), torch.bfloat16), ((32, 64), torch.float16),
                         ((5, 3, 128), torch.bfloat16)]:
        w = torch.randn(shape, generator=gen).to(dtype)
        packed, state = quantize_nf4(w, 64, True)
        packed_ref, qs = bnb_quantize(w, 64, True)
        assert torch.equal(dequantize_nf4(packed, state), bnbF.dequantize_4bit(packed_ref, qs))


def test_bnb_native_cpu_dequantize_bug_is_documented():
    """bitsandbytes 0.50's native CPU dequantize_4bit is wrong when the last dimension is even and not a
    multiple of the blocksize, e.g. (128, 96): quantization is right, and its pure-PyTorch dequantize
    agrees with ours, but the native kernel returns different values. (It also returns shape (1, n)
    for a 1-D tensor.) If this test starts skipping, bitsandbytes fixed it."""
    w = torch.randn(128, 96, generator=torch.Generator().manual_seed(0))
    packed, state = quantize_nf4(w, 64, True)
    packed_ref, qs = bnb_quantize(w, 64, True)
    assert_state_equals_bnb(packed, state, packed_ref, qs)
    ours = dequantize_nf4(packed, state)
    assert torch.equal(ours, bnb_dequantize_reference(packed_ref, qs))
    native = bnbF.dequantize_4bit(packed_ref, qs)
    if torch.equal(native, ours):
        pytest.skip("bitsandbytes' native CPU dequantize is now right for (128, 96)")
    assert native.shape == ours.shape
    assert float((native - ours).abs().max()) > 0.1  # not a rounding difference: wrong blocks


# ---------------------------------------------------------------------------------------------- the rules
def test_nibble_order_and_odd_padding():
    w = torch.tensor([-1.0, 1.0, 0.0])  # absmax 1: codes 0, 15, 7 (+ pad 7)
    packed, state = quantize_nf4(w, 64, False)
    assert packed.tolist() == [[0x0F], [0x77]]
    assert torch.equal(unpack_nibbles(packed, 3), torch.tensor([0, 15, 7], dtype=torch.uint8))
    three = torch.tensor([1, 2, 3], dtype=torch.uint8)
    assert torch.equal(pack_nibbles(three), torch.tensor([[0x12], [0x37]], dtype=torch.uint8))
    assert torch.equal(dequantize_nf4(packed, state), w)


def test_midpoint_ties_go_to_the_lower_code():
    code = nf4_code()
    mids = (code[:-1] + code[1:]) / 2  # fp32 midpoints
    w = torch.cat([torch.tensor([1.0]), mids])  # absmax 1, so scaled values are the midpoints exactly
    packed, _ = quantize_nf4(w, 64, False)
    codes = unpack_nibbles(packed, w.numel())
    assert codes[0].item() == 15
    assert codes[1:].tolist() == list(range(15))  # midpoint between i and i+1 -> i
    assert torch.equal(packed, bnb_quantize(w, 64, False)[0])


def test_all_zero_blocks_dequantize_to_exact_zeros():
    for w in [torch.zeros(64, 64), torch.zeros(5, 13), torch.cat([torch.zeros(64), torch.randn(64), torch.zeros(10)])]:
        for dq in (False, True):
            packed, state = quantize_nf4(w, 64, dq)
            assert_state_equals_bnb(packed, state, *bnb_quantize(w, 64, dq))
            for t in state.tensors().values():
                assert bool(torch.isfinite(t.float()).all())
            out = dequantize_nf4(packed, state)
            assert bool(torch.isfinite(out).all())
            assert bool((out[w == 0] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_noncontiguous_views_and_inputs_untouched(dtype):
    base = torch.randn(100, 130, dtype=dtype)
    for view in [base, base.t(), base[:, ::2], base[10:50, 3:]]:
        before = view.clone()
        packed, state = quantize_nf4(view, 64, True)
        packed2, state2 = quantize_nf4(view.contiguous(), 64, True)
        assert torch.equal(packed, packed2)
        assert all(torch.equal(a, b) for a, b in zip(state.tensors().values(), state2.tensors().values()))
        assert torch.equal(view, before)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="non-finite"):
        quantize_nf4(torch.tensor([[0.5, float("nan")]]))
    with pytest.raises(ValueError, match="non-finite"):
        quantize_nf4(torch.tensor([float("-inf"), 1.0]))
    for dtype in [torch.float64, torch.int32, torch.int8, torch.float8_e4m3fn]:
        with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
            quantize_nf4(torch.zeros(8, dtype=dtype))
    packed, state = quantize_nf4(torch.randn(8, 8))
    with pytest.raises(TypeError, match="already-quantized codes"):
        quantize_nf4(packed)
    with pytest.raises(TypeError):
        quantize_nf4([1.0, 2.0])
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(torch.zeros(0, 4))
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4(torch.randn(8, 8), blocksize=48)
    with pytest.raises(ValueError, match="overflows"):
        quantize_nf4(torch.full((64 * 4,), 3e38))
    with pytest.raises(ValueError, match="packs into"):
        dequantize_nf4(packed[:-1], state)
    with pytest.raises(TypeError, match="uint8"):
        dequantize_nf4(packed.float(), state)
    with pytest.raises(TypeError, match="dtype"):
        dequantize_nf4(packed, state, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------- the state
def test_bits_per_parameter():
    w = torch.randn(576, 1536)
    _, dq = quantize_nf4(w, 64, True)
    _, plain = quantize_nf4(w, 64, False)
    assert plain.bits_per_parameter() == 4.5
    assert dq.bits_per_parameter() == pytest.approx(4.127, abs=5e-4)
    assert dq.bits_per_parameter() == 4 + 8 / 64 + 32 / (64 * 256)
    # Exact bytes of this tensor: within 0.1% of the nominal rate (partial nested group + offset).
    assert dq.storage_nbytes() * 8 / w.numel() == pytest.approx(dq.bits_per_parameter(), rel=1e-3)
    assert plain.storage_nbytes() * 8 / w.numel() == 4.5
    assert dq.storage_nbytes(include_quant_maps=True) == dq.storage_nbytes() + 16 * 4 + 256 * 4


@pytest.mark.parametrize("double_quant", [False, True])
def test_state_dict_roundtrip_and_strictness(double_quant):
    packed, state = quantize_nf4(torch.randn(33, 70, dtype=torch.float16), 128, double_quant)
    for packed_form in (True, False):
        back = NF4QuantState.from_dict(state.to_dict(packed=packed_form))
        assert (back.shape, back.dtype, back.blocksize, back.nested) == (state.shape, state.dtype, 128, double_quant)
        assert torch.equal(dequantize_nf4(packed, back), dequantize_nf4(packed, state))
    d = state.to_dict()
    meta = json.loads(bytes(d[PACKED_STATE_KEY].tolist()))
    assert meta["quant_type"] == "nf4" and meta["dtype"] == "float16" and meta["shape"] == [33, 70]
    for key in d:
        broken = {k: v for k, v in d.items() if k != key}
        with pytest.raises(ValueError, match="missing"):
            NF4QuantState.from_dict(broken)
    with pytest.raises(ValueError, match="unknown"):
        NF4QuantState.from_dict({**d, "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="only nf4"):
        NF4QuantState.from_dict({**d, "quant_state.bitsandbytes__fp4": d[PACKED_STATE_KEY]})
    with pytest.raises(ValueError, match="JSON"):
        NF4QuantState.from_dict({**d, PACKED_STATE_KEY: torch.tensor([0xFF, 0x00], dtype=torch.uint8)})
    with pytest.raises(ValueError, match="absmax"):
        NF4QuantState.from_dict({**d, "absmax": d["absmax"][:-1]})
    if double_quant:
        with pytest.raises(TypeError, match="absmax must be torch.uint8"):
            NF4QuantState.from_dict({**d, "absmax": d["absmax"].float()})


def test_state_constructor_validates():
    _, state = quantize_nf4(torch.randn(10, 10))
    kw = dict(shape=state.shape, dtype=state.dtype, blocksize=64, absmax=state.absmax, quant_map=state.quant_map)
    with pytest.raises(ValueError, match="together"):
        NF4QuantState(**kw, offset=state.offset)
    with pytest.raises(ValueError, match="blocksize"):
        NF4QuantState(**{**kw, "blocksize": 48})
    with pytest.raises(TypeError, match="dtype"):
        NF4QuantState(**{**kw, "dtype": torch.float64})
    assert math.prod(state.shape) == state.numel == 100


@pytest.mark.real_model
def test_real_smollm2_weights_equal_bitsandbytes(smollm2_dir):
    from safetensors import safe_open

    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.7.mlp.down_proj.weight"]
    found = {}
    for path in sorted(smollm2_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in names:
                if name in f.keys():
                    found[name] = f.get_tensor(name)
    assert sorted(found) == sorted(names)
    for name, w in found.items():
        for dtype in (torch.float32, torch.bfloat16):
            wd = w.to(dtype)
            packed, state = quantize_nf4(wd, 64, True)
            packed_ref, qs = bnb_quantize(wd, 64, True)
            assert_state_equals_bnb(packed, state, packed_ref, qs)
            assert torch.equal(dequantize_nf4(packed, state), bnb_dequantize_reference(packed_ref, qs))
