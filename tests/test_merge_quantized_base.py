"""Merging LoRA into a quantized base (lora/base_weight.py): unmerging restores the stored bytes exactly, and
re-quantizing warns with the measured drift.

PEFT's 4-bit merge (peft/tuners/lora/bnb.py) re-quantizes on unmerge too, so about half the packed bytes and the
absmax come back different; here the layer keeps the base's tensors from before the first merge. Comparisons
are bitwise (bytes and outputs); the drift numbers are checked against their definitions to fp32 rounding.
"""

import warnings

import pytest
import torch
from torch import nn

from finetune_ref.lora import LoraConfig, inject_lora, merge_adapters, merge_and_unload, unload
from finetune_ref.lora.base_weight import RequantizationWarning, requantization_drift
from finetune_ref.lora.layer import LoRALinear
from finetune_ref.models.config import LlamaConfig
from finetune_ref.models.llama import LlamaForCausalLM
from finetune_ref.qlora.merge import merge_qlora
from finetune_ref.qlora.model import nf4_layers, quantize_model
from finetune_ref.qlora.nf4_linear import NF4Linear


def nf4_layer(double_quant: bool, bias: bool, seed: int = 0) -> LoRALinear:
    torch.manual_seed(seed)
    base = NF4Linear.from_linear(nn.Linear(128, 64, bias=bias), double_quant=double_quant,
                                 compute_dtype=torch.float32)
    layer = LoRALinear(base)
    for name in ("a", "b"):
        layer.add_adapter(name, r=2, lora_alpha=4, init_lora_weights=False)  # non-zero B: a trained adapter
    return layer


def stored(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same_bytes(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_unmerge_from_nf4_base_restores_exact_packed_bytes_and_scales(double_quant, bias):
    layer = nf4_layer(double_quant, bias)
    base = layer.base_layer
    before, x = stored(base), torch.randn(5, 128)
    y_before = base(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RequantizationWarning)
        layer.merge(["a"])
        layer.merge(["b"])  # a second merge re-quantizes the already re-quantized base
    assert not torch.equal(base.weight, before["weight"])  # the merge did change the codes
    assert layer.unmerge() == ["b", "a"]
    assert_same_bytes(stored(base), before)
    assert torch.equal(base(x), y_before)
    # And again: merge/unmerge cycles do not drift.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RequantizationWarning)
        layer.merge(["a"])
    layer.unmerge()
    assert_same_bytes(stored(base), before)


def tiny_qlora_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = quantize_model(LlamaForCausalLM(tiny_config()).eval(), compute_dtype=torch.float32)
    inject_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                  init_lora_weights=False))
    return model


def test_unload_after_merge_gives_back_the_original_nf4_base():
    model = tiny_qlora_model()
    before = {name.removesuffix(".base_layer"): stored(layer) for name, layer in nf4_layers(model)}
    with pytest.warns(RequantizationWarning):
        merge_adapters(model)
    plain = unload(model)
    after = dict(nf4_layers(plain))
    assert before.keys() == after.keys()
    for name, tensors in before.items():
        assert_same_bytes(stored(after[name]), tensors)


def test_requantizing_merge_warns_once_with_the_measured_drift():
    model = tiny_qlora_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merge_and_unload(model)
    ours = [w for w in caught if issubclass(w.category, RequantizationWarning)]
    assert len(ours) == 1  # one for the model, not one per layer
    drift = ours[0].message.drift
    assert drift.layers == 3 and f"kept {drift.kept:.1%}" in str(ours[0].message)


def test_requantization_drift_measures_an_update_rounded_away():
    """An update far below half an NF4 step is rounded back to the old codes: almost nothing kept (only the
    blocks' absmax follow it), error about the update itself. (Without double quantization: with it, re-quantizing
    re-quantizes the absmax around a new mean too, so even a zero update moves the weights, and the warning
    reports an error many times the update.)"""
    layer = nf4_layer(double_quant=False, bias=False)
    with torch.no_grad():
        layer.lora_B["a"].weight.mul_(1e-6)
    with pytest.warns(RequantizationWarning, match=r"kept \d\.\d% of the LoRA update") as record:
        layer.merge(["a"])
    drift = layer.requantization_drift
    assert record[0].message.drift is drift
    assert 0.0 <= drift.kept < 0.1 and 0.9 < drift.relative_error < 1.5
    # The definition on hand-made tensors: half the update kept.
    w, d = torch.zeros(4, 4), torch.ones(4, 4)
    half = requantization_drift(w + d, w + 0.5 * d, d)
    assert half.kept == 0.5 and half.relative_error == 0.5 and half.max_abs_error == 0.5


def tiny_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("base", ["nf4-dequant", "original"])
def test_merge_qlora_requantize_warns_with_the_measured_drift(base):
    """Both ways to a 4-bit merged model warn: PEFT's (merge into the NF4 base) and quantizing original + dW."""
    model = tiny_qlora_model()
    torch.manual_seed(0)
    original = LlamaForCausalLM(tiny_config()).eval() if base == "original" else None  # what was quantized
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = merge_qlora(model, base=base, original=original, requantize="nf4", dtype=torch.float32)
    ours = [w.message for w in caught if issubclass(w.category, RequantizationWarning)]
    assert len(ours) == 1 and ours[0].drift.layers == 3 and str(ours[0]).startswith(ours[0].drift.describe())
    assert len(nf4_layers(merged)) == 7


def test_merge_into_a_gptq_base_is_refused_and_changes_nothing():
    """GPTQLinear can be read (dequantize) but not written: merging raises before any change, so no success is
    claimed and there is nothing to unmerge."""
    from finetune_ref.gptq.linear import GPTQLinear

    layer = LoRALinear(GPTQLinear(128, 64, group_size=64))
    layer.add_adapter("a", r=2, lora_alpha=4, init_lora_weights=False)
    before = stored(layer.base_layer)
    with pytest.raises(TypeError, match="no requantize_"):
        layer.merge(["a"])
    assert not layer.merged and layer.base_snapshot is None and layer.unmerge() == []
    assert_same_bytes(stored(layer.base_layer), before)
