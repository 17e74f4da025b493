"""LoRA math and LoRALinear on their own (no oracle library): scaling, init, dtypes, dropout, merge/unmerge.

Tolerances: fp32 comparisons use max|a - b| <= 1e-6 * max|b| over the whole tensor (the same operations in a
different order); 16-bit merges are checked bitwise against "compute in fp32, round once", and unmerge within
one unit in the last place (ulp) of max(|W|, |W + dW|).
"""

import math

import pytest
import torch
from torch import nn

from finetune_ref.lora.base_weight import dense_weight
from finetune_ref.lora.functional import init_lora_weights_, lora_delta_weight, lora_forward, lora_scaling, merged_weight
from finetune_ref.lora.layer import LoRALinear


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-6) -> None:
    """Whole-tensor relative check: max|actual - expected| <= rel * max|expected|."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3e} > {rel:.0e} * {scale:.3e}"


def make_layer(in_features=24, out_features=16, r=4, alpha=12.0, bias=True, seed=0, init=False,
               dtype=torch.float32, adapter_dtype=torch.float32, dropout=0.0):
    torch.manual_seed(seed)
    base = nn.Linear(in_features, out_features, bias=bias).to(dtype)
    layer = LoRALinear(base)
    layer.add_adapter("default", r=r, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights=init,
                      dtype=adapter_dtype)
    layer.set_adapter("default")
    return layer


def ulp(x: torch.Tensor) -> torch.Tensor:
    """Unit in the last place of each element of a bf16/fp16 tensor (as fp32)."""
    mantissa_bits = {torch.bfloat16: 7, torch.float16: 10}[x.dtype]
    xf = x.float().abs().clamp(min=torch.finfo(x.dtype).tiny)
    return torch.exp2(torch.floor(torch.log2(xf)) - mantissa_bits)


# ---- scaling and init ----

def test_scaling_standard_and_rslora():
    assert lora_scaling(8, 32) == 4.0
    assert lora_scaling(3, 7) == 7 / 3
    assert lora_scaling(16, 8, use_rslora=True) == 2.0
    assert lora_scaling(3, 7, use_rslora=True) == 7 / math.sqrt(3)


@pytest.mark.parametrize("r, alpha, error", [(0, 8, ValueError), (-1, 8, ValueError), (2.0, 8, TypeError),
                                             (True, 8, TypeError), (4, 0, ValueError), (4, float("nan"),
                                                                                        ValueError)])
def test_scaling_rejects_bad_values(r, alpha, error):
    with pytest.raises(error):
        lora_scaling(r, alpha)


def test_default_init_is_a_no_op_and_within_kaiming_bound():
    layer = make_layer(in_features=200, init=True)
    a = layer.lora_A["default"].weight
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    # kaiming_uniform(a=sqrt(5)) draws from U(-b, b) with b = sqrt(6 / ((1 + 5) * fan_in)) = 1 / sqrt(fan_in).
    bound = 1 / math.sqrt(200)
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound
    x = torch.randn(3, 5, 200)
    assert torch.equal(layer(x), layer.base_layer(x))


def test_gaussian_init_std_is_one_over_r():
    a, b = torch.empty(8, 4096), torch.ones(32, 8)
    torch.manual_seed(0)
    init_lora_weights_(a, b, "gaussian", r=8)
    assert abs(a.std().item() - 1 / 8) < 0.002  # 32768 samples: std of the std estimate ~ 0.0005
    assert torch.count_nonzero(b) == 0


def test_false_init_gives_a_nonzero_update():
    layer = make_layer(init=False)
    assert torch.count_nonzero(layer.lora_B["default"].weight) > 0
    x = torch.randn(4, 24)
    assert not torch.allclose(layer(x), layer.base_layer(x))


def test_unknown_init_is_rejected():
    with pytest.raises(ValueError, match="init_lora_weights"):
        init_lora_weights_(torch.empty(2, 3), torch.empty(3, 2), "pissa", r=2)


# ---- forward ----

def test_forward_matches_formula_with_bias():
    layer = make_layer(bias=True)
    x = torch.randn(2, 7, 24)
    w, bias = layer.base_layer.weight, layer.base_layer.bias
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = x @ w.T + bias + (x @ a.T @ b.T) * (12.0 / 4)
    assert_rel_close(layer(x), expected)
    assert_rel_close(lora_forward(x, a, b, 3.0), (x @ a.T @ b.T) * 3.0)


def test_adapter_computes_in_its_dtype_and_returns_base_dtype():
    # bf16 adapter on an fp32 base: the update is computed in bf16, the sum returned in fp32.
    layer = make_layer(adapter_dtype=torch.bfloat16)
    x = torch.randn(5, 24)
    out = layer(x)
    assert out.dtype == torch.float32
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.dtype == torch.bfloat16
    update = lora_forward(x.bfloat16(), a, b, 3.0)  # bf16
    assert torch.equal(out, layer.base_layer(x) + update)
    # fp32 adapter on a bf16 base (the QLoRA arrangement): result in bf16.
    layer16 = make_layer(dtype=torch.bfloat16, adapter_dtype=torch.float32)
    x16 = torch.randn(5, 24, dtype=torch.bfloat16)
    out16 = layer16(x16)
    assert out16.dtype == torch.bfloat16
    expected = (layer16.base_layer(x16) + lora_forward(x16.float(), layer16.lora_A["default"].weight,
                                                       layer16.lora_B["default"].weight, 3.0)).bfloat16()
    assert torch.equal(out16, expected)


@pytest.mark.parametrize("base_dtype,adapter_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                                     (torch.float32, torch.bfloat16), (torch.float32, torch.float32)])
@pytest.mark.parametrize("alpha", [8, 16, 32, 12, 4])  # r=8: scaling 1, 2, 4 (exact shortcuts), 1.5, 0.5 (PEFT's order)
def test_forward_and_gradients_bitwise_peft_order(base_dtype, adapter_dtype, alpha):
    # PEFT's lora.Linear.forward, written out: result + lora_B(lora_A(x)) * scaling, then .to(base dtype).
    # LoRALinear scales the rank-r side for a power-of-two scaling and adds-and-casts in one kernel
    # (lora.functional.lora_up / add_update): outputs and every gradient must stay bitwise the same.
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(24, 40).to(base_dtype))
    layer.add_adapter("default", r=8, lora_alpha=alpha, init_lora_weights=False, dtype=adapter_dtype)
    layer.set_adapter("default")
    layer.base_layer.requires_grad_(False)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(3, 5, 24, dtype=base_dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    a_ref, b_ref = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    scaling = alpha / 8
    expected = (layer.base_layer(x_ref) + torch.nn.functional.linear(
        torch.nn.functional.linear(x_ref.to(adapter_dtype), a_ref), b_ref) * scaling).to(base_dtype)
    out = layer(x)
    assert out.dtype == expected.dtype and torch.equal(out, expected)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for got, want in ((x.grad, x_ref.grad), (a.grad, a_ref.grad), (b.grad, b_ref.grad)):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_dropout_is_inverted_on_adapter_input_only():
    """With W = I, A = I, B = I, scaling 1: out = x + dropout(x). The base half must never be dropped."""
    n, p = 64, 0.25
    base = nn.Linear(n, n, bias=False)
    layer = LoRALinear(base)
    layer.add_adapter("default", r=n, lora_alpha=n, lora_dropout=p)
    layer.set_adapter("default")
    with torch.no_grad():
        base.weight.copy_(torch.eye(n))
        layer.lora_A["default"].weight.copy_(torch.eye(n))
        layer.lora_B["default"].weight.copy_(torch.eye(n))
    x = torch.ones(500, n)
    torch.manual_seed(0)
    layer.train()
    out = layer(x)
    kept = out - 1.0  # the adapter half
    scaled = torch.isclose(kept, torch.tensor(1 / (1 - p)), rtol=1e-6, atol=0)
    assert ((kept == 0) | scaled).all()  # each element dropped, or kept and scaled by 1/(1-p)
    dropped = (kept == 0).float().mean().item()
    sigma = math.sqrt(p * (1 - p) / x.numel())
    assert abs(dropped - p) < 5 * sigma
    assert (out >= 1.0).all()  # the base path x W^T = 1 is always there
    layer.eval()
    assert torch.equal(layer(x), 2 * x)  # eval: identity dropout


def test_several_adapters_on_one_layer_sum_in_active_order():
    layer = make_layer()
    layer.add_adapter("other", r=2, lora_alpha=5, init_lora_weights=False)
    x = torch.randn(3, 24)
    base = layer.base_layer(x)
    one = layer(x) - base
    layer.set_adapter("other")
    two = layer(x) - base
    layer.set_adapter(["default", "other"])
    assert_rel_close(layer(x), base + one + two)
    layer.disabled = True
    assert torch.equal(layer(x), base)


def test_add_adapter_errors():
    layer = make_layer()
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("default", r=2, lora_alpha=2)
    for bad in ("", "a.b", "keys", 3):
        with pytest.raises(ValueError, match="invalid adapter name"):
            layer.add_adapter(bad, r=2, lora_alpha=2)
    with pytest.raises(ValueError, match="lora_dropout"):
        layer.add_adapter("x", r=2, lora_alpha=2, lora_dropout=1.0)
    with pytest.raises(TypeError, match="floating"):
        layer.add_adapter("x", r=2, lora_alpha=2, dtype=torch.int8)
    with pytest.raises(ValueError, match="unknown adapter"):
        layer.set_adapter("nope")
    assert layer.adapter_names == ["default"]  # nothing half-added


def test_wrapping_requires_a_linear_like_module():
    with pytest.raises(TypeError, match="in_features"):
        LoRALinear(nn.LayerNorm(8))
    with pytest.raises(TypeError, match="already a LoRALinear"):
        LoRALinear(make_layer())


# ---- merge / unmerge ----

def test_merge_fp32_equals_unmerged_and_merging_twice_merges_once():
    layer = make_layer().eval()
    x = torch.randn(4, 9, 24)
    before = layer(x)
    w0 = layer.base_layer.weight.detach().clone()
    delta = lora_delta_weight(layer.lora_A["default"].weight, layer.lora_B["default"].weight, 3.0)
    assert layer.merge() == ["default"]
    assert torch.equal(layer.base_layer.weight, w0 + delta)
    assert layer.merged and layer.merged_adapters == ["default"]
    assert_rel_close(layer(x), before)
    assert layer.merge() == []  # already merged: no-op
    assert torch.equal(layer.base_layer.weight, w0 + delta)
    assert layer.unmerge() == ["default"]
    assert not layer.merged
    assert_rel_close(layer.base_layer.weight.detach(), w0, rel=1e-6)
    assert layer.unmerge() == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_16bit_rounds_once_and_unmerge_within_one_ulp(dtype):
    layer = make_layer(dtype=dtype, alpha=64.0).eval()
    w0 = layer.base_layer.weight.detach().clone()
    delta = layer.get_delta_weight("default")
    assert delta.dtype == torch.float32
    layer.merge()
    merged = layer.base_layer.weight.detach().clone()
    assert torch.equal(merged, (w0.float() + delta).to(dtype))  # one rounding
    layer.unmerge()
    restored = layer.base_layer.weight.detach()
    bound = ulp(torch.maximum(w0.float().abs(), merged.float().abs()).to(dtype))
    assert ((restored.float() - w0.float()).abs() <= bound).all()


def test_merged_weight_adds_deltas_in_order():
    w = torch.randn(5, 6)
    d1, d2 = torch.randn(5, 6), torch.randn(5, 6)
    assert torch.equal(merged_weight(w, [d1, d2]), (w + d1) + d2)
    assert torch.equal(merged_weight(w, [d2, d1], sign=-1), (w - d2) - d1)
    assert torch.equal(w, w.clone())  # input untouched (fp32 .float() would alias without the clone)
    with pytest.raises(ValueError):
        merged_weight(w, [d1], sign=2)


@pytest.mark.parametrize("poison", ["nan", "overflow"])
def test_safe_merge_refuses_and_leaves_weight_unchanged(poison):
    layer = make_layer(dtype=torch.float16 if poison == "overflow" else torch.float32)
    with torch.no_grad():
        if poison == "nan":
            layer.lora_B["default"].weight[0, 0] = float("nan")
        else:
            layer.lora_B["default"].weight.mul_(1e6)  # |W + dW| > 65504: inf in fp16
    w0 = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, w0)
    assert not layer.merged and layer.merged_adapters == []


class PackedBase(nn.Module):
    """A stand-in for a quantized base: in/out features and a forward, but an integer weight buffer."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.randint(0, 255, (out_features * in_features // 2, 1),
                                                     dtype=torch.uint8))

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], self.out_features)


def test_non_dense_base_runs_forward_but_refuses_merge():
    layer = LoRALinear(PackedBase(8, 6))
    layer.add_adapter("default", r=2, lora_alpha=4, init_lora_weights=False)
    layer.set_adapter("default")
    x = torch.randn(3, 8)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert_rel_close(layer(x), lora_forward(x, a, b, 2.0))
    with pytest.raises(TypeError, match="dense floating weight"):
        layer.merge()
    with pytest.raises(TypeError):
        dense_weight(layer.base_layer)
    assert not layer.merged


class HalfStoredBase(nn.Module):
    """Stores W as fp16 in a buffer and computes in fp32: a stand-in for a quantized base."""

    def __init__(self):
        super().__init__()
        self.in_features, self.out_features = 8, 6
        self.register_buffer("packed", torch.randn(6, 8).half())

    def forward(self, x):
        return x @ self.packed.float().T

    def dequantize(self):
        return self.packed.float()

    def requantize_(self, w):
        self.packed.copy_(w.half())


def test_a_base_with_dequantize_and_requantize_merges():
    """A quantized base takes part in merge/unmerge through its own dequantize() and requantize_(weight)
    (duck-typed: nothing is registered, so it works whatever was imported first)."""
    layer = LoRALinear(HalfStoredBase())
    layer.add_adapter("default", r=2, lora_alpha=4, init_lora_weights=False)
    layer.set_adapter("default")
    x = torch.randn(3, 8)
    before = layer(x)
    stored = layer.base_layer.packed.clone()
    layer.merge()
    assert torch.equal(layer.base_layer.packed, (stored.float() + layer.get_delta_weight("default")).half())
    assert_rel_close(layer(x), before, rel=1e-3)  # fp16 storage of W + dW
    layer.unmerge()
    assert not layer.merged


def test_a_base_that_can_only_be_read_is_refused_on_merge():
    class ReadOnlyBase(HalfStoredBase):
        requantize_ = None

    layer = LoRALinear(ReadOnlyBase())
    layer.add_adapter("default", r=2, lora_alpha=4, init_lora_weights=False)
    layer.set_adapter("default")
    with pytest.raises(TypeError, match="no requantize_"):
        layer.merge()


def test_switching_or_deleting_while_merged_is_refused():
    layer = make_layer()
    layer.add_adapter("other", r=2, lora_alpha=2)
    layer.merge()
    with pytest.raises(ValueError, match="unmerge first"):
        layer.set_adapter("other")
    with pytest.raises(ValueError, match="unmerge"):
        layer.delete_adapter("default")
    layer.unmerge()
    layer.delete_adapter("default")
    assert layer.adapter_names == ["other"] and layer.active_adapters == []
