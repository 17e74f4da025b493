"""NF4Linear (qlora/nf4_linear.py) and the bitsandbytes state-dict layout (qlora/bnb_format.py).

Oracle: ``bitsandbytes.nn.Linear4bit`` (NF4, double quant) built from the same ``nn.Linear``. Both dequantize
the same bytes with the same fp32 arithmetic and call the same ``F.linear``, so outputs and input
gradients are compared exactly (tolerance zero). ``support_avx512bf16_for_cpu = False`` keeps bitsandbytes
from repacking its weight on AVX512-BF16 CPUs (which silently drops input gradients).
"""

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from finetune_ref.qlora.bnb_format import bnb_linear_keys, bnb_linear_prefixes, from_bnb_state_dict, to_bnb_state_dict
from finetune_ref.kernels.reference import dequantize_nf4
from finetune_ref.qlora.nf4 import quantize_nf4
from finetune_ref.qlora.nf4_linear import NF4Linear
from finetune_ref.parity import oracles
from finetune_ref.qlora.quant_state import NF4QuantState

COMPUTE_DTYPES = [torch.bfloat16, torch.float32, torch.float16]


def make_linear(in_features, out_features, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias).to(dtype)


bnb_linear4bit = oracles.bnb_linear4bit  # bitsandbytes quantizes the same weight; AVX512-BF16 repacking off


def run(layer, x, grad_out):
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y.backward(grad_out)
    return y.detach(), x.grad


# Input feature counts that are multiples of 64: bitsandbytes' native CPU dequantize is right there (and odd
# counts send bitsandbytes to a torch.compile'd fallback that costs seconds per shape).
@pytest.mark.parametrize("compute_dtype", COMPUTE_DTYPES)
@pytest.mark.parametrize("in_features,out_features,bias", [(128, 96, True), (64, 33, False), (192, 65, True)])
def test_forward_and_input_grad_equal_bitsandbytes(compute_dtype, in_features, out_features, bias):
    linear = make_linear(in_features, out_features, bias)
    ours = NF4Linear.from_linear(linear, compute_dtype=compute_dtype)
    ref = bnb_linear4bit(linear, compute_dtype)
    assert torch.equal(ours.weight, ref.weight.data)
    x = torch.randn(2, 5, in_features)
    g = torch.randn(2, 5, out_features)
    y, gx = run(ours, x, g)
    y_ref, gx_ref = run(ref, x, g)
    assert y.dtype == torch.float32 and y.shape == (2, 5, out_features)  # output in the input dtype
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=0)


@pytest.mark.parametrize("blocksize,double_quant", [(128, False), (32, True)])
def test_other_blocksizes_and_no_double_quant_equal_bitsandbytes(blocksize, double_quant):
    linear = make_linear(128, 48, dtype=torch.bfloat16)
    ours = NF4Linear.from_linear(linear, blocksize=blocksize, double_quant=double_quant)
    ref = bnb_linear4bit(linear, torch.bfloat16, blocksize, double_quant)
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    g = torch.randn(4, 48, dtype=torch.bfloat16)
    y, gx = run(ours, x, g)
    y_ref, gx_ref = run(ref, x, g)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=0)


@pytest.mark.parametrize("in_features,out_features", [(192, 80), (67, 65)])
def test_against_dense_reference_and_frozen_base(in_features, out_features):
    linear = make_linear(in_features, out_features)
    layer = NF4Linear.from_linear(linear, compute_dtype=torch.float32)
    assert (layer.in_features, layer.out_features) == (in_features, out_features)
    assert layer.weight.dtype == torch.uint8 and layer.weight.shape == ((in_features * out_features + 1) // 2, 1)
    assert not layer.bias.requires_grad and list(layer.parameters(recurse=False)) == [layer.bias]
    w = layer.dequantize(torch.float32)  # (out, in)
    assert torch.equal(w, dequantize_nf4(layer.weight, layer.quant_state))
    # NF4 error bound: half the widest code gap (between -1 and -0.696: 0.152) times the block absmax,
    # plus a little for the double-quantized absmax.
    assert float((w - linear.weight.detach()).abs().max()) <= 0.153 * float(linear.weight.detach().abs().max())
    x = torch.randn(3, 7, in_features, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, x @ w.t() + linear.bias, rtol=1e-5, atol=1e-5)  # fp32: summation order only
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ w, rtol=1e-5, atol=1e-5)
    assert layer.bias.grad is None
    layer.bias.requires_grad_(True)  # a trainable bias still works
    layer(x).backward(g)
    torch.testing.assert_close(layer.bias.grad, g.sum((0, 1)), rtol=1e-5, atol=1e-5)


def test_backward_saves_only_the_packed_weight():
    layer = NF4Linear.from_linear(make_linear(256, 128), compute_dtype=torch.bfloat16)
    x = torch.randn(4, 256, requires_grad=True)
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel(), t.data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    ours = [s for s in saved if s[2] == layer.weight.data_ptr()]
    assert ours == [(torch.uint8, 256 * 128 // 2, layer.weight.data_ptr())]
    # Nothing as large as the weight in a floating dtype is kept (the casts save no tensors at all).
    assert all(not (dt.is_floating_point and n >= 256 * 128) for dt, n, _ in saved), saved
    y.sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32


def test_compute_dtype_is_explicit():
    linear = make_linear(64, 16)
    for cd in COMPUTE_DTYPES:
        layer = NF4Linear.from_linear(linear, compute_dtype=cd)
        x = torch.randn(2, 64)
        expected = nn.functional.linear(x.to(cd), layer.dequantize(cd), linear.bias.to(cd)).to(torch.float32)
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
        assert layer(x.to(torch.bfloat16)).dtype == torch.bfloat16
    with pytest.raises(TypeError, match="compute_dtype"):
        NF4Linear.from_linear(linear, compute_dtype=torch.float64)


def test_model_dtype_casts_keep_the_quantization_state():
    layer = NF4Linear.from_linear(make_linear(64, 16), compute_dtype=torch.bfloat16)
    x = torch.randn(2, 64)
    y = layer(x)
    absmax_before = layer.absmax.clone()
    layer.to(torch.float16)  # what model.half() does
    assert layer.offset.dtype == torch.float32 and layer.nested_absmax.dtype == torch.float32
    assert torch.equal(layer.absmax, absmax_before) and layer.bias.dtype == torch.float16
    torch.testing.assert_close(layer(x), y, rtol=0, atol=1e-2)  # only the bias rounding (bf16 compute) changes


def test_quant_state_is_built_once_over_the_buffers(monkeypatch):
    layer = NF4Linear.from_linear(make_linear(64, 16))
    state = layer.quant_state
    assert layer.quant_state is state  # cached, not rebuilt per access
    assert all(getattr(layer, name) is t for name, t in state.tensors().items())
    layer.to(torch.float16)  # no device move: the state's tensors stay the buffers
    assert layer.quant_state is state
    monkeypatch.setattr(NF4QuantState, "__post_init__", lambda self: pytest.fail("state rebuilt in forward"))
    layer(torch.randn(2, 64)).sum()
    monkeypatch.undo()
    layer.to("meta")  # a device move replaces the buffers: the state is rebuilt over the new ones
    moved = layer.quant_state
    assert moved is not state and moved.device.type == "meta"
    assert all(getattr(layer, name) is t for name, t in moved.tensors().items())


def test_bad_input_raises():
    layer = NF4Linear.from_linear(make_linear(64, 16))
    with pytest.raises(ValueError, match="last dimension must be 64"):
        layer(torch.randn(2, 63))
    with pytest.raises(TypeError, match="floating point"):
        layer(torch.ones(2, 64, dtype=torch.long))
    with pytest.raises(TypeError, match="nn.Linear"):
        NF4Linear.from_linear(nn.Conv1d(3, 3, 1))
    packed, state = quantize_nf4(torch.randn(16, 64))
    with pytest.raises(ValueError, match="2-D"):
        NF4Linear(*quantize_nf4(torch.randn(4, 4, 4)))
    with pytest.raises(ValueError, match="bytes"):
        NF4Linear(packed[:-1], state)
    with pytest.raises(ValueError, match="bias"):
        NF4Linear(packed, state, torch.zeros(15))
    with pytest.raises(ValueError, match="non-finite"):
        NF4Linear.from_linear(nn.Linear(4, 4).requires_grad_(False).apply(lambda m: m.weight.fill_(float("nan"))))


# ---------------------------------------------------------------------------------------------- state dicts
def test_state_dict_has_bitsandbytes_keys_and_bytes():
    linear = make_linear(128, 40, dtype=torch.bfloat16)
    ours = NF4Linear.from_linear(linear).state_dict()
    ref = bnb_linear4bit(linear, torch.bfloat16).state_dict()
    assert sorted(ours) == sorted(ref) == sorted(bnb_linear_keys("", double_quant=True, bias=True))
    for key in ref:
        assert ours[key].dtype == ref[key].dtype and torch.equal(ours[key], ref[key]), key


def test_our_layer_loads_into_bitsandbytes_and_back(tmp_path):
    linear = make_linear(128, 40)
    ours = NF4Linear.from_linear(linear, compute_dtype=torch.bfloat16)
    path = tmp_path / "layer.safetensors"
    save_file({"proj." + k: v.contiguous() for k, v in ours.state_dict().items()}, str(path))
    loaded = load_file(str(path))
    assert bnb_linear_prefixes(loaded) == ["proj."]

    # bitsandbytes reads our file as transformers does (Params4bit.from_prequantized).
    ref = bnb.nn.Linear4bit(128, 40, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4")
    stats = {k[len("proj.weight."):]: v for k, v in loaded.items() if k.startswith("proj.weight.")}
    ref.weight = bnb.nn.Params4bit.from_prequantized(loaded["proj.weight"], stats, device="cpu", module=ref)
    ref.bias = nn.Parameter(loaded["proj.bias"])
    ref.support_avx512bf16_for_cpu = False
    x = torch.randn(3, 128)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)

    # ... and we read bitsandbytes' own state dict.
    back = NF4Linear.from_bnb_state_dict(ref.state_dict(), compute_dtype=torch.bfloat16)
    assert torch.equal(back.weight, ours.weight) and torch.equal(back.offset, ours.offset)
    torch.testing.assert_close(back(x), ours(x), rtol=0, atol=0)


def test_load_state_dict_is_strict():
    src = NF4Linear.from_linear(make_linear(64, 32, seed=1))
    dst = NF4Linear.from_linear(make_linear(64, 32, seed=2), double_quant=False, blocksize=128)
    dst.load_state_dict(src.state_dict())  # the checkpoint defines blocksize and double quant
    assert dst.blocksize == 64 and dst.double_quant
    assert torch.equal(dst.weight, src.weight) and torch.equal(dst.bias, src.bias)
    x = torch.randn(2, 64)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)

    sd = src.state_dict()
    for key in [k for k in sd if k.startswith("weight.")]:
        broken = {k: v for k, v in sd.items() if k != key}
        with pytest.raises(RuntimeError, match="missing"):
            dst.load_state_dict(broken, strict=False)  # a partial quantization state is always an error
    with pytest.raises(RuntimeError, match="Missing key"):
        dst.load_state_dict({"bias": sd["bias"]})
    result = dst.load_state_dict({"bias": sd["bias"]}, strict=False)
    assert result.missing_keys == ["weight"]
    with pytest.raises(RuntimeError, match="Unexpected key"):
        dst.load_state_dict({**sd, "scale": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="unknown entries"):  # inside the weight's state: always an error
        dst.load_state_dict({**sd, "weight.extra": torch.zeros(1)}, strict=False)
    with pytest.raises(RuntimeError, match="size mismatch"):
        NF4Linear.from_linear(make_linear(64, 16)).load_state_dict(sd)


def test_bnb_format_functions_roundtrip_and_errors():
    packed, state = quantize_nf4(torch.randn(24, 64, dtype=torch.float16), 64, True)
    bias = torch.randn(24)
    sd = to_bnb_state_dict(packed, state, bias, prefix="m.layers.0.q_proj.")
    assert sorted(sd) == sorted(bnb_linear_keys("m.layers.0.q_proj.", True, True))
    p2, s2, b2 = from_bnb_state_dict(sd, prefix="m.layers.0.q_proj.")
    assert torch.equal(p2, packed) and b2 is bias and s2.dtype == torch.float16
    assert torch.equal(dequantize_nf4(p2, s2), dequantize_nf4(packed, state))
    with pytest.raises(ValueError, match="packed NF4 codes"):
        from_bnb_state_dict({k: v for k, v in sd.items() if not k.endswith("q_proj.weight")}, "m.layers.0.q_proj.")
    with pytest.raises(ValueError, match="no quantization state"):
        from_bnb_state_dict({"w.weight": torch.zeros(3, 3)}, "w.")
    with pytest.raises(TypeError, match="uint8"):
        from_bnb_state_dict({**sd, "m.layers.0.q_proj.weight": packed.float()}, "m.layers.0.q_proj.")
