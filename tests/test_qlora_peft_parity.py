"""QLoRA parity with PEFT on a transformers model loaded 4-bit by bitsandbytes (CPU).

Both sides hold the same NF4 bytes (each quantizes the same fp32 checkpoint; checked byte for byte) and the
same adapter weights (PEFT's, made non-zero with ``init_lora_weights=False``, copied into ours). With fp32
compute and fp32 adapters the loss and every LoRA gradient agree to fp32 rounding (tolerances below).
Shapes keep ``in_features`` a multiple of 64 so that bitsandbytes' native CPU dequantize is right (it is wrong
e.g. for (128, 96), tests/test_nf4.py::test_bnb_native_cpu_dequantize_bug_is_documented), and ``support_avx512bf16_for_cpu = False`` stops bitsandbytes from
repacking weights on AVX512-BF16 CPUs, after which it silently loses input gradients.
"""

import pytest
import torch

from finetune_ref import lora

from finetune_ref.lora import LoraConfig, inject_lora, load_adapter, lora_layers, save_adapter
from finetune_ref.qlora.merge import merge_qlora, merge_report
from finetune_ref.qlora.model import load_quantized, nf4_layers
from finetune_ref.parity import oracles

CONFIG = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=10000.0)
FP32_LOSS_ATOL = 1e-6
FP32_GRAD = dict(rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def fp_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("fp")
    LlamaForCausalLM(LlamaConfig(**CONFIG)).save_pretrained(path)
    return path


def hf_4bit(fp_dir):
    """transformers 4-bit load (NF4 + double quant, fp32 compute) on CPU, AVX512-BF16 repacking off."""
    return oracles.hf_4bit(fp_dir, compute_dtype=torch.float32)


def peft_qlora(fp_dir, lora_config):
    """PEFT LoRA with non-zero A and B on the transformers 4-bit model."""
    import peft

    model = hf_4bit(fp_dir)
    torch.manual_seed(1)
    config = peft.LoraConfig(r=lora_config.r, lora_alpha=lora_config.lora_alpha,
                             target_modules=lora_config.target_modules, init_lora_weights=False)
    return peft.get_peft_model(model, config)


def our_qlora(fp_dir, lora_config, peft_model):
    """Our QLoRA model (fp32 compute, fp32 adapters) with PEFT's adapter weights."""
    ours = load_quantized(fp_dir, compute_dtype=torch.float32, dtype=torch.float32)
    inject_lora(ours, lora_config, adapter_dtype=torch.float32)
    theirs = dict(peft_model.named_modules())
    with torch.no_grad():
        for name, layer in lora_layers(ours):
            peft_layer = theirs["base_model.model." + name]
            layer.lora_A["default"].weight.copy_(peft_layer.lora_A["default"].weight)
            layer.lora_B["default"].weight.copy_(peft_layer.lora_B["default"].weight)
    return ours


def batch(seed=3):
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[0, :5] = -100  # some positions without loss
    return ids, labels


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj", "down_proj"]])
def test_loss_and_lora_gradients_match_peft_on_bitsandbytes(fp_dir, targets):
    lora_config = LoraConfig(r=4, lora_alpha=12, target_modules=targets)
    theirs = peft_qlora(fp_dir, lora_config)
    ours = our_qlora(fp_dir, lora_config, theirs)
    # The same NF4 bytes on both sides.
    peft_modules = dict(theirs.named_modules())
    for name, layer in nf4_layers(ours):
        ref = peft_modules["base_model.model." + name]  # PEFT also names the wrapped 4-bit layer "base_layer"
        assert torch.equal(layer.weight, ref.weight.data), name
        assert torch.equal(layer.absmax, ref.weight.quant_state.absmax), name

    ids, labels = batch()
    ours.train()
    theirs.train()
    loss = ours(ids, labels=labels).loss
    ref_loss = theirs(input_ids=ids, labels=labels).loss
    assert abs(loss.item() - ref_loss.item()) <= FP32_LOSS_ATOL
    loss.backward()
    ref_loss.backward()
    checked = 0
    for name, layer in lora_layers(ours):
        peft_layer = peft_modules["base_model.model." + name]
        for part in ("lora_A", "lora_B"):
            grad = getattr(layer, part)["default"].weight.grad
            ref_grad = getattr(peft_layer, part)["default"].weight.grad
            assert grad is not None and ref_grad is not None and grad.abs().sum() > 0
            torch.testing.assert_close(grad, ref_grad, **FP32_GRAD)
            checked += 1
    assert checked == 2 * len(lora_layers(ours))
    # Only adapters train; the 4-bit base has no gradient on either side.
    assert all(not p.requires_grad for n, p in ours.named_parameters() if "lora_" not in n)
    # The same parameter counts as PEFT's, 4-bit weights at their logical size.
    assert lora.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()


def test_requantized_merge_is_byte_identical_to_peft_merge_and_unload(fp_dir):
    lora_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"])
    theirs = peft_qlora(fp_dir, lora_config)
    ours = our_qlora(fp_dir, lora_config, theirs)
    merged = merge_qlora(ours, base="nf4-dequant", requantize="nf4")
    ref = theirs.merge_and_unload()  # dequantize, add B @ A * scaling, re-quantize (peft/tuners/lora/bnb.py)
    ref_modules = dict(ref.named_modules())
    for name, layer in nf4_layers(merged):
        ref_layer = ref_modules[name]
        assert torch.equal(layer.weight, ref_layer.weight.data), name
        assert torch.equal(layer.absmax, ref_layer.weight.quant_state.absmax), name
        assert torch.equal(layer.nested_absmax, ref_layer.weight.quant_state.state2.absmax), name
    ids, labels = batch()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, ref(input_ids=ids).logits, rtol=0, atol=0)
    # merge_qlora left ours (the unmerged QLoRA model) untouched; the report compares the two.
    assert len(lora_layers(ours)) == 4 and len(nf4_layers(ours)) == 14
    report = merge_report(ours, merged, [{"input_ids": ids, "labels": labels}])
    assert report["tokens"] == int((labels[:, 1:] != -100).sum()) and 0 < report["logits_max_abs"] < 1


def test_our_qlora_adapter_loads_into_peft_on_the_4bit_model_and_back(fp_dir, tmp_path):
    import peft

    lora_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    theirs = peft_qlora(fp_dir, lora_config)
    ours = our_qlora(fp_dir, lora_config, theirs)
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(fp_dir))
    reloaded = peft.PeftModel.from_pretrained(hf_4bit(fp_dir), tmp_path / "adapter")
    ids, labels = batch()
    with torch.no_grad():
        expected = ours(ids, labels=labels).loss
        assert abs(reloaded(input_ids=ids, labels=labels).loss.item() - expected.item()) <= FP32_LOSS_ATOL
    again = load_quantized(fp_dir, compute_dtype=torch.float32, dtype=torch.float32)
    load_adapter(again, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(again(ids, labels=labels).loss, expected, rtol=0, atol=0)
