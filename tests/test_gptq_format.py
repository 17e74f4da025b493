"""The GPTQ checkpoint layout (gptq/format.py) and GPTQLinear (gptq/linear.py).

No GPTQ library installs on this CPU-only torch 2.13 environment without replacing torch or downgrading numpy
(see docs/serving.md), so the bit layout is checked against a straightforward reference written here
from the layout's description (a Python-integer bit stream per column, AutoGPTQ's ``pack`` semantics), against
hand-computed words, and by bitwise round trips. tests/test_gptq_oracle.py compares with GPTQModel where it is
installed.
"""

import pytest
import torch

from finetune_ref.gptq.gptq import gptq_quantize, rtn_quantize
from finetune_ref.gptq.format import (GPTQConfig, check_gptq_tensors, dequantize_gptq, pack_codes, pack_gptq, unpack_codes,
                               unpack_gptq)
from finetune_ref.gptq.linear import GPTQLinear


pytestmark = pytest.mark.usefixtures("one_thread")


def reference_pack(codes, bits):
    """Column j of codes (n, m) as one little-endian bit stream of n * bits bits, cut into signed 32-bit words."""
    n, m = codes.shape
    words = torch.zeros(n * bits // 32, m, dtype=torch.int32)
    for j in range(m):
        stream = 0
        for k in range(n):
            stream |= int(codes[k, j]) << (k * bits)
        for r in range(words.shape[0]):
            w = (stream >> (32 * r)) & 0xFFFFFFFF
            words[r, j] = w - 2 ** 32 if w >= 2 ** 31 else w
    return words


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_matches_reference_and_round_trips_bitwise(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2 ** bits, (96, 5), generator=g).to(torch.uint8)
    words = pack_codes(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (96 * bits // 32, 5)
    assert torch.equal(words, reference_pack(codes, bits))
    assert torch.equal(unpack_codes(words, bits), codes)
    # Every 32-bit pattern is a valid packing: unpack -> pack gives the same words back.
    any_words = torch.randint(-2 ** 31, 2 ** 31 - 1, (12, 7), generator=g, dtype=torch.int32)
    assert torch.equal(pack_codes(unpack_codes(any_words, bits), bits), any_words)


def test_pack_hand_computed_words():
    # 4 bits: eight codes per word, the first in the low nibble.
    assert pack_codes(torch.arange(8)[:, None], 4).item() == 0x76543210
    assert pack_codes(torch.full((8, 1), 15), 4).item() == -1  # 0xFFFFFFFF as signed int32
    # 8 bits: four codes per word.
    assert pack_codes(torch.tensor([[1], [2], [3], [255]]), 8).item() == 0xFF030201 - 2 ** 32
    # 3 bits: 32 codes in 3 words; code 10 straddles words 0/1 and code 21 words 1/2.
    codes = torch.zeros(32, 1, dtype=torch.int64)
    codes[10] = 0b101
    assert pack_codes(codes, 3)[:, 0].tolist() == [1 << 30, 1, 0]  # low bits 01 at 30-31, high bit at word 1 bit 0
    codes[10], codes[21] = 0, 0b110
    assert pack_codes(codes, 3)[:, 0].tolist() == [0, 0, 0b11]  # low bit 0 at word 1 bit 31, high bits 11 at 0-1
    codes[21], codes[0], codes[11], codes[22] = 0, 7, 7, 7
    assert pack_codes(codes, 3)[:, 0].tolist() == [7, 7 << 1, 7 << 2]


@pytest.mark.parametrize("bits,checkpoint_format", [(4, "gptq"), (4, "gptq_v2"), (3, "gptq"), (8, "gptq"),
                                                     (2, "gptq_v2")])
@pytest.mark.parametrize("act_order", [False, True])
def test_layer_round_trip_and_dequantize(bits, checkpoint_format, act_order):
    torch.manual_seed(0)
    W = torch.randn(64, 96) * 0.02
    X = torch.randn(256, 96)
    q = gptq_quantize(W, 2 * X.t() @ X / 256, bits, 32, act_order=act_order)
    t = pack_gptq(q, checkpoint_format)
    assert t["qweight"].shape == (96 * bits // 32, 64) and t["qweight"].dtype == torch.int32
    assert t["qzeros"].shape == (3, 64 * bits // 32) and t["qzeros"].dtype == torch.int32
    assert t["scales"].shape == (3, 64) and t["scales"].dtype == torch.float16
    assert t["g_idx"].shape == (96,) and t["g_idx"].dtype == torch.int32
    back = unpack_gptq(t, bits, 32, checkpoint_format)
    for field in ("codes", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(back, field), getattr(q, field)), field
    assert torch.equal(pack_gptq(back, checkpoint_format)["qweight"], t["qweight"])
    # The dense weight: fp16 result equals the fp16 arithmetic scales * (code - zero), bitwise.
    deq = dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, checkpoint_format)
    assert deq.dtype == torch.float16
    g = q.g_idx.long()
    expected = (t["scales"][g] * (q.codes.t().to(torch.float16) - q.zeros[g].to(torch.float16))).t()
    assert torch.equal(deq, expected)
    assert torch.equal(dequantize_gptq(**t, bits=bits, checkpoint_format=checkpoint_format, dtype=torch.float32),
                       q.dequantize())


def test_v1_stores_zero_minus_one_and_keeps_zero_zero():
    q = rtn_quantize(torch.cat([torch.rand(8, 32), -torch.rand(8, 32)]), 4, 32)  # rows >= 0 give zero point 0
    zeros = q.zeros[0]
    assert int(zeros[:8].max()) == 0 and int(zeros[8:].min()) == 15
    v1, v2 = pack_gptq(q, "gptq"), pack_gptq(q, "gptq_v2")
    assert torch.equal(unpack_codes(v2["qzeros"].t().contiguous(), 4).t(), q.zeros)
    assert torch.equal(unpack_codes(v1["qzeros"].t().contiguous(), 4).t(), (q.zeros.long() - 1) % 16)
    assert torch.equal(unpack_gptq(v1, 4, 32, "gptq").zeros, q.zeros)  # 0 -> stored 15 -> read back 0
    assert torch.equal(v1["qweight"], v2["qweight"]) and torch.equal(v1["scales"], v2["scales"])


def test_odd_shapes():
    torch.manual_seed(1)
    # in_features not a multiple of the group size: a last, shorter group; the layout holds it.
    q = rtn_quantize(torch.randn(16, 200), 4, 128)
    t = pack_gptq(q)
    assert t["scales"].shape == (2, 16) and torch.bincount(t["g_idx"].long()).tolist() == [128, 72]
    assert torch.equal(unpack_gptq(t, 4, 128).codes, q.codes)
    # Shapes the int32 packing cannot hold are refused with the rule in the message.
    with pytest.raises(ValueError, match=r"in_features = 100 .* multiple of 8"):
        pack_gptq(rtn_quantize(torch.randn(16, 100), 4, 32))
    with pytest.raises(ValueError, match=r"out_features = 12 .* multiple of 8"):
        pack_gptq(rtn_quantize(torch.randn(12, 64), 4, 32))
    with pytest.raises(ValueError, match=r"in_features = 48 .* multiple of 32"):
        pack_gptq(rtn_quantize(torch.randn(32, 48), 3, 16))
    with pytest.raises(ValueError, match="multiple of 8"):
        GPTQLinear(100, 16)


def test_bad_tensors_raise_clearly():
    t = pack_gptq(rtn_quantize(torch.randn(16, 64), 4, 32))
    with pytest.raises(ValueError, match=r"missing GPTQ tensors \['g_idx'\]"):
        check_gptq_tensors({k: v for k, v in t.items() if k != "g_idx"}, 4, "q_proj")
    with pytest.raises(ValueError, match="qzeros must be int32"):
        check_gptq_tensors({**t, "qzeros": t["qzeros"][:1]}, 4)
    with pytest.raises(ValueError, match="g_idx values"):
        check_gptq_tensors({**t, "g_idx": t["g_idx"] + 5}, 4)
    with pytest.raises(ValueError, match="qweight must be 2-D int32"):
        check_gptq_tensors({**t, "qweight": t["qweight"].float()}, 4)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 15\]"):
        pack_codes(torch.full((8, 1), 16), 4)
    with pytest.raises(ValueError, match="checkpoint_format"):
        pack_gptq(rtn_quantize(torch.randn(16, 64), 4, 32), "awq")


def test_config_round_trip_and_errors():
    cfg = GPTQConfig(bits=3, group_size=-1, sym=True, desc_act=True, damp_percent=0.05, checkpoint_format="gptq_v2")
    d = cfg.to_dict()
    assert d["quant_method"] == "gptq" and d["bits"] == 3 and d["group_size"] == -1 and d["desc_act"] is True
    assert GPTQConfig.from_dict(d) == cfg
    assert GPTQConfig.from_dict({"quant_method": "gptq", "bits": 4, "group_size": 128, "format": "gptq_v2"}) \
        .checkpoint_format == "gptq_v2"  # GPTQModel's older key
    with pytest.raises(ValueError, match="not 'gptq'"):
        GPTQConfig.from_dict({"quant_method": "awq"})
    with pytest.raises(ValueError, match="bits must be one of"):
        GPTQConfig.from_dict({"quant_method": "gptq", "bits": 5})
    with pytest.raises(ValueError, match="static_groups"):
        GPTQConfig.from_dict({"quant_method": "gptq", "static_groups": True})
    with pytest.raises(ValueError, match="calibration"):
        GPTQConfig(method="rtn", desc_act=True)
    with pytest.raises(ValueError, match="damp_percent"):
        GPTQConfig(damp_percent=-0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gptq_linear_forward_backward_and_state_dict(dtype):
    torch.manual_seed(2)
    linear = torch.nn.Linear(64, 32, bias=True)
    q = rtn_quantize(linear.weight, 4, 32)
    layer = GPTQLinear.from_quantized(q, linear.bias)
    weight = q.dequantize(dtype)  # (out, in)
    x = torch.randn(3, 5, 64, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (3, 5, 32)
    expected = torch.nn.functional.linear(x.detach(), weight, linear.bias.detach().to(dtype))
    assert torch.equal(y.detach(), expected)  # same dense weight, same F.linear: exact
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ weight, rtol=0, atol=0)
    assert not layer.bias.requires_grad
    # state dict: the GPTQ names, loadable into a fresh layer, bitwise.
    sd = layer.state_dict()
    assert sorted(sd) == ["bias", "g_idx", "qweight", "qzeros", "scales"]
    fresh = GPTQLinear(64, 32, 4, 32, bias=True)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.dequantize(), layer.dequantize())
    # model.to(dtype) moves but never casts the fp16 scales.
    layer.to(torch.bfloat16)
    assert layer.scales.dtype == torch.float16 and layer.bias.dtype == torch.bfloat16


def test_gptq_linear_errors():
    layer = GPTQLinear.from_quantized(rtn_quantize(torch.randn(16, 64), 4, 32))
    with pytest.raises(ValueError, match="last dimension must be 64"):
        layer(torch.randn(2, 63))
    with pytest.raises(TypeError, match="floating"):
        layer(torch.ones(2, 64, dtype=torch.int64))
    sd = layer.state_dict()
    with pytest.raises(RuntimeError, match="size mismatch"):
        GPTQLinear(64, 8, 4, 32).load_state_dict(pack_gptq(rtn_quantize(torch.randn(16, 64), 4, 32)))
    with pytest.raises(RuntimeError, match="float16"):
        GPTQLinear(64, 16, 4, 32).load_state_dict({**sd, "scales": sd["scales"].float()})
