"""Oracle parity: our Llama against transformers' LlamaForCausalLM on tiny random models saved to disk.

Tolerance: fp32 logits within 1e-5 max abs.
"""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from finetune_ref.models.checkpoint import save_model  # noqa: E402
from finetune_ref.models.loader import load_model
from finetune_ref.models.config import LlamaConfig  # noqa: E402
from finetune_ref.models.llama import KVCache, LlamaForCausalLM  # noqa: E402

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}


def tiny_hf_model(tmp_path, *, tie=False, rope_scaling=None, kv_heads=2, bias=False, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=5000.0,
        rope_scaling=rope_scaling, tie_word_embeddings=tie, attention_bias=bias, mlp_bias=bias)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # RMSNorm weights start at 1; perturb them so the test sees them
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    return hf


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("rope_scaling", [None, LLAMA3_SCALING])
@pytest.mark.parametrize("kv_heads", [2, 4])
def test_logits_match_transformers(tmp_path, tie, rope_scaling, kv_heads):
    hf = tiny_hf_model(tmp_path, tie=tie, rope_scaling=rope_scaling, kv_heads=kv_heads)
    ours = load_model(tmp_path, dtype=torch.float32)
    assert ours.config.tie_word_embeddings == tie
    if tie:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = torch.randint(0, 128, (2, 40))  # 40 > original_max_position_embeddings: llama3 scaling matters
    labels = ids.clone()
    labels[0, :5] = -100
    with torch.no_grad():
        ref = hf(ids, labels=labels)
        out = ours(ids, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)


def test_bias_and_padding_match_transformers(tmp_path):
    hf = tiny_hf_model(tmp_path, bias=True)
    ours = load_model(tmp_path)
    ids = torch.randint(0, 128, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 9:] = 0  # right padding
    mask[2, :4] = 0  # left padding
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=position_ids).logits
        out = ours(ids, attention_mask=mask, position_ids=position_ids).logits
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=0)
    assert torch.isfinite(out).all()


def test_kv_cache_equals_full_forward(tmp_path):
    tiny_hf_model(tmp_path)
    model = load_model(tmp_path)
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache(model.config.num_hidden_layers)
        first = model(ids[:, :6], cache=cache).logits
        second = model(ids[:, 6:8], cache=cache).logits  # several tokens at once after a cache
        third = model(ids[:, 8:], cache=cache).logits
    torch.testing.assert_close(torch.cat([first, second, third], 1), full, atol=1e-5, rtol=0)


def test_document_ids_block_cross_document_attention():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    a, b = torch.randint(0, 64, (1, 7)), torch.randint(0, 64, (1, 5))
    packed = torch.cat([a, b], 1)
    docs = torch.tensor([[0] * 7 + [1] * 5])
    pos = torch.cat([torch.arange(7), torch.arange(5)])[None]
    with torch.no_grad():
        out = model(packed, document_ids=docs, position_ids=pos).logits
        ref_a, ref_b = model(a).logits, model(b).logits
    torch.testing.assert_close(out, torch.cat([ref_a, ref_b], 1), atol=1e-5, rtol=0)


def test_save_load_roundtrip_and_transformers_reads_ours(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      rope_scaling=dict(LLAMA3_SCALING))
    model = LlamaForCausalLM(cfg).eval()
    save_model(model, tmp_path)
    again = load_model(tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 64, (1, 30))
    with torch.no_grad():
        ref = model(ids).logits
        torch.testing.assert_close(again(ids).logits, ref, atol=0, rtol=0)
        torch.testing.assert_close(hf(ids).logits, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_load_in_16_bit(tmp_path, dtype):
    hf = tiny_hf_model(tmp_path)
    model = load_model(tmp_path, dtype=dtype)
    assert all(p.dtype == dtype for p in model.parameters())
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        out = model(ids).logits.float()
        ref = hf(ids).logits
    # 16-bit weights and activations: a few ulps of bf16 (2^-8) accumulate over the layers.
    torch.testing.assert_close(out, ref, atol=0.05, rtol=0.05)


def test_sharded_checkpoint_loads(tmp_path):
    hf = tiny_hf_model(tmp_path / "one")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    a, b = load_model(tmp_path / "one"), load_model(tmp_path / "sharded")
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)


def test_unsupported_config_field_is_named(tmp_path):
    tiny_hf_model(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rope_scaling"):
        load_model(tmp_path)
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    cfg["hidden_act"] = "gelu"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="hidden_act"):
        load_model(tmp_path)
