"""PiSSA and OLoRA initialisations against PEFT 0.22 on tiny random transformers Llama models (GQA: 4 query,
2 KV heads), fp32. The arithmetic is PEFT's (lora/init.py), so A0, B0 and the residual base weights are
compared bitwise; the saved (converted, rank-2r) adapter is compared with the one PEFT writes with
``path_initial_model_for_weight_conversion`` within 1e-6 relative (the same values; the trained A/B differ only
by the fp32 update copied in), and PEFT loads it on the original base with our outputs. OLoRA on a bitsandbytes
4-bit base (and PiSSA's refusal there) is compared with PEFT on transformers' 4-bit load."""

import copy

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from finetune_ref import lora  # noqa: E402
from finetune_ref.lora.init import pissa_init  # noqa: E402
from finetune_ref.lora.peft_format import ADAPTER_WEIGHTS_NAME, read_adapter_config  # noqa: E402
from test_dora_peft_parity import QCONFIG, check_4bit_loss_and_grads, fp_dir, hf_4bit  # noqa: E402, F401 (fixture)

PREFIX = "base_model.model."


def tiny_llama(tie=False):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).eval()


def assert_rel_close(actual, expected, rel=1e-6):
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= rel * expected.double().abs().max().item(), err


def ids():
    return torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("init, use_rslora", [("pissa", False), ("olora", True)])
def test_init_and_converted_adapter_match_peft(init, use_rslora, tmp_path):
    base = tiny_llama()
    kwargs = dict(r=4, lora_alpha=12, target_modules="all-linear", use_rslora=use_rslora)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=init, **kwargs))
    ours = copy.deepcopy(base)
    lora.inject_lora(ours, lora.LoraConfig(init_lora_weights=init, **kwargs))
    theirs = dict(pm.named_parameters())
    for name, p in ours.named_parameters():  # A0, B0 and the residual base weights, bitwise
        assert torch.equal(p, theirs[PREFIX + name]), name
    x = ids()
    with torch.no_grad():  # the model is unchanged at step 0 (W = W_res + s B0 A0 up to fp32 rounding)
        torch.testing.assert_close(ours(x).logits, base(x).logits, rtol=0, atol=1e-4)
    pm.save_pretrained(tmp_path / "init")  # PEFT needs the initial adapter on disk for its conversion
    torch.manual_seed(3)
    with torch.no_grad():  # "training": the same change to A and B on both sides
        for name, p in ours.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
                theirs[PREFIX + name].copy_(p)
    lora.save_adapter(ours, tmp_path / "ours")
    pm.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    mine, ref = load_file(tmp_path / "ours" / ADAPTER_WEIGHTS_NAME), load_file(tmp_path / "peft" / ADAPTER_WEIGHTS_NAME)
    assert set(mine) == set(ref)
    for k in ref:
        assert_rel_close(mine[k], ref[k])
    config = read_adapter_config(tmp_path / "ours")
    ref_config = read_adapter_config(tmp_path / "peft")
    assert (config.r, config.lora_alpha, config.init_lora_weights) == (8, ref_config.lora_alpha, True)
    # On the ORIGINAL base, the converted adapter computes what the trained model on the residual base computes.
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    with torch.no_grad():
        assert_rel_close(back(input_ids=x).logits, ours(x).logits, 1e-5)
        plain = copy.deepcopy(base)
        lora.load_adapter(plain, tmp_path / "ours")
        assert_rel_close(plain(x).logits, ours(x).logits, 1e-5)


def test_pissa_niter_is_torch_svd_lowrank_as_peft_calls_it():
    """pissa_niter_K is random (torch.svd_lowrank draws from the global generator): the same seed gives PEFT's
    call's A0 and B0; and W = W_res + s B0 A0 holds."""
    w = tiny_llama().model.layers[0].mlp.up_proj.weight.detach()
    torch.manual_seed(4)
    a, b, res = pissa_init(w, 4, 0.5, niter=2)
    torch.manual_seed(4)
    v, s, u = torch.svd_lowrank(w, 4, niter=2)  # peft/tuners/lora/layer.py pissa_init's call
    s = s / 0.5
    assert torch.equal(a, torch.diag(torch.sqrt(s)) @ u.t()) and torch.equal(b, v @ torch.diag(torch.sqrt(s)))
    torch.testing.assert_close(res + 0.5 * b @ a, w, rtol=0, atol=1e-5)
    config = lora.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa_niter_3")
    assert config.init_lora_weights == "pissa_niter_3"


def test_mutating_inits_refuse_tied_weights_dora_and_unconverted_files(tmp_path):
    base = tiny_llama(tie=True)
    with pytest.raises(ValueError, match="tied"):
        lora.inject_lora(copy.deepcopy(base), lora.LoraConfig(r=2, target_modules=["lm_head"], init_lora_weights="olora"))
    with pytest.raises(ValueError, match="use_dora"):
        lora.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa", use_dora=True)
    with pytest.raises(ValueError, match="init_lora_weights"):
        lora.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa_niter_0")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa"))
    pm.save_pretrained(tmp_path)  # not converted: only right on PEFT's residual base
    with pytest.raises(ValueError, match="path_initial_model_for_weight_conversion"):
        lora.load_adapter(copy.deepcopy(base), tmp_path)


# ---- OLoRA on a bitsandbytes 4-bit base (PEFT's olora_init dequantizes, QRs and quantizes the residual) ----

def test_olora_on_a_4bit_base_matches_peft_on_bitsandbytes(fp_dir, tmp_path):
    """A0, B0 bitwise (the same QR of the same dequantized weight); the re-quantized residual has bnb's NF4 bytes
    and absmax (qlora/nf4.py is byte-for-byte bnb); loss within 1e-6 and gradients rtol 1e-4 as for QDoRA
    (bitsandbytes' CPU matmul sums in another order). The 4-bit model is not unchanged at step 0: the residual is
    rounded to the NF4 grid, so outputs move (bounded here), which is why the adapter keeps its base."""
    import bitsandbytes as bnb
    from finetune_ref.qlora.model import load_quantized

    targets = ["q_proj", "k_proj", "v_proj", "down_proj"]
    kwargs = dict(r=4, lora_alpha=12, target_modules=targets)
    theirs = peft.get_peft_model(hf_4bit(fp_dir), peft.LoraConfig(init_lora_weights="olora", **kwargs))
    ours = load_quantized(fp_dir, compute_dtype=torch.float32, dtype=torch.float32)
    start = load_quantized(fp_dir, compute_dtype=torch.float32, dtype=torch.float32)
    lora.inject_lora(ours, lora.LoraConfig(init_lora_weights="olora", **kwargs))
    peft_layers = {n.removeprefix(PREFIX): m for n, m in theirs.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)}
    layers = dict(lora.lora_layers(ours))
    assert set(layers) == set(peft_layers) and len(layers) == 8
    for name, layer in layers.items():
        ref = peft_layers[name]
        assert torch.equal(layer.lora_A["default"].weight, ref.lora_A["default"].weight), name
        assert torch.equal(layer.lora_B["default"].weight, ref.lora_B["default"].weight), name
        w = ref.base_layer.weight
        assert torch.equal(layer.base_layer.weight.view(-1), w.data.view(-1)), name  # the packed NF4 codes
        assert torch.equal(layer.base_layer.dequantize(), bnb.functional.dequantize_4bit(w.data, w.quant_state))
    ids = torch.randint(0, QCONFIG["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(3))
    assert len(check_4bit_loss_and_grads(ours, theirs, ids)) == 16
    with torch.no_grad():  # W_res rounded to NF4: close to, not equal to, the 4-bit model before OLoRA
        moved = (ours(ids).logits - start(ids).logits).abs().max().item()
    assert 0 < moved < 0.5
    # Saving: the conversion for the original 4-bit base would be off by the rounding, so it is refused; adopting
    # the rewritten base gives a plain LoRA that PEFT loads on that base (our 4-bit save) with our loss.
    with pytest.raises(ValueError, match="4-bit base.*adopt_rewritten_base"):
        lora.save_adapter(ours, tmp_path / "refused")
    assert not (tmp_path / "refused" / ADAPTER_WEIGHTS_NAME).exists()
    lora.adopt_rewritten_base(ours)
    lora.save_adapter(ours, tmp_path / "adapter")
    assert read_adapter_config(tmp_path / "adapter").init_lora_weights is True
    from finetune_ref.qlora.model import save_quantized

    ours.eval()
    save_quantized(lora.unload(copy.deepcopy(ours)), tmp_path / "base")
    back = peft.PeftModel.from_pretrained(hf_4bit(tmp_path / "base"), tmp_path / "adapter")
    with torch.no_grad():
        assert abs(back(input_ids=ids, labels=ids).loss.item() - ours(ids, labels=ids).loss.item()) < 1e-6


def test_pissa_on_a_4bit_base_is_refused_as_peft_does(fp_dir):
    from finetune_ref.qlora.model import load_quantized

    ours = load_quantized(fp_dir, compute_dtype=torch.float32, dtype=torch.float32)
    with pytest.raises(ValueError, match="16/32-bit base.*pissa_init"):
        lora.inject_lora(ours, lora.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa"))
