"""RoPE's inverse frequencies are fp32 constants: no cast, move or checkpoint load may change their bits.

A bf16 copy of Llama 3.1's inv_freq moves cos/sin at position 32767 by up to ~1.9 (a rounding of 2^-8 relative
in the frequency is a whole radian or more at that position), which changes the model with no weight changed.
Tolerance: none; every comparison is bitwise.
"""

import pytest
import torch

from finetune_ref.full.prepare import prepare_full_finetuning
from finetune_ref.models.checkpoint import save_model
from finetune_ref.models.config import LlamaConfig
from finetune_ref.models.llama import LlamaForCausalLM
from finetune_ref.models.loader import load_model
from finetune_ref.models.rope import rope_inv_freq

# Llama 3.1's own scaling (its config.json), so positions past 8192 use the stretched low frequencies.
LLAMA31_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}
LONG_POSITIONS = torch.tensor([[0, 1, 8191, 8192, 32767]])  # (1, 5)


def llama31_tiny() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=1, num_key_value_heads=1, rope_theta=500000.0,
                      max_position_embeddings=131072, rope_scaling=dict(LLAMA31_SCALING))
    return LlamaForCausalLM(cfg).eval()  # head_dim 128, as Llama 3.1 8B


def cos_sin_fp32_cast_once(inv_freq: torch.Tensor, dtype: torch.dtype):
    angles = LONG_POSITIONS[:, :, None].double() * inv_freq.double()[None, None, :]  # (1, 5, head_dim/2)
    angles = torch.cat((angles, angles), dim=-1).float()  # (1, 5, head_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


@pytest.mark.parametrize("cast", ["to_bf16", "to_fp16", "half", "bfloat16", "to_device_and_dtype",
                                  "full_finetuning_bf16", "round_trip"])
def test_rope_inv_freq_survives_dtype_casts(cast):
    model = llama31_tiny()
    reference = rope_inv_freq(model.config)
    casts = {
        "to_bf16": lambda m: m.to(torch.bfloat16),
        "to_fp16": lambda m: m.to(torch.float16),
        "half": lambda m: m.half(),
        "bfloat16": lambda m: m.bfloat16(),
        "to_device_and_dtype": lambda m: m.to("cpu", torch.bfloat16),
        "full_finetuning_bf16": lambda m: prepare_full_finetuning(m, torch.bfloat16),
        "round_trip": lambda m: m.bfloat16().float().half().to("cpu"),
    }
    model = casts[cast](model)
    rotary = model.model.rotary_emb
    assert rotary.inv_freq.dtype == torch.float32
    assert torch.equal(rotary.inv_freq, reference)
    # cos/sin: computed in fp32 from the fp32 frequencies, cast once to the activations' dtype.
    dtype = model.model.embed_tokens.weight.dtype
    cos, sin = rotary(LONG_POSITIONS, dtype)
    fp32_cos, fp32_sin = rotary(LONG_POSITIONS, torch.float32)
    assert cos.dtype == dtype and torch.equal(cos, fp32_cos.to(dtype)) and torch.equal(sin, fp32_sin.to(dtype))
    # ... and those fp32 values are the angles' own cos/sin (to fp32 rounding of the angle itself).
    want_cos, want_sin = cos_sin_fp32_cast_once(reference, torch.float32)
    torch.testing.assert_close(fp32_cos, want_cos, atol=0, rtol=0)
    torch.testing.assert_close(fp32_sin, want_sin, atol=0, rtol=0)


def test_rope_inv_freq_survives_checkpoint_load_in_16_bit(tmp_path):
    model = llama31_tiny()
    reference = rope_inv_freq(model.config)
    save_model(model, tmp_path)
    for dtype in (torch.bfloat16, torch.float16):
        loaded = load_model(tmp_path, dtype=dtype)
        assert torch.equal(loaded.model.rotary_emb.inv_freq, reference)
        assert loaded.model.rotary_emb.inv_freq.dtype == torch.float32
    # A 16-bit state dict loaded into an fp32 model, then the model cast: still the fp32 constants.
    bf16 = llama31_tiny().bfloat16()
    bf16.load_state_dict({k: v.bfloat16() for k, v in model.state_dict().items()})
    assert torch.equal(bf16.model.rotary_emb.inv_freq, reference)


def test_rope_meta_device_build_then_materialize():
    with torch.device("meta"):
        model = llama31_tiny()
    model.to_empty(device="cpu")
    assert torch.equal(model.model.rotary_emb.inv_freq, rope_inv_freq(model.config))
