"""DoRA and QDoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation") against Hugging Face PEFT 0.22.

Tiny random transformers Llama models made here (hidden 64, 4 query / 2 KV heads: GQA). Both sides hold the
same base and the same adapter tensors (PEFT's, with ``init_lora_weights=False`` so that B != 0 and the
magnitude differs from the norm). Our forward performs PEFT's operations in PEFT's order (``lora.dora``), so in
fp32 logits, loss and every trainable gradient (A, B and the magnitude m) agree within 1e-6 relative (max error
over a whole tensor <= 1e-6 * its max; the only differences are fp32 rounding of the same sums).
On the 4-bit base (QDoRA) the same NF4 bytes are on both sides; the tolerance is that of
tests/test_qlora_peft_parity.py (bitsandbytes' CPU matmul sums in another order than ours).
"""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from finetune_ref import lora  # noqa: E402
from finetune_ref.lora.peft_format import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME  # noqa: E402

PREFIX = "base_model.model."


def assert_rel_close(actual, expected, rel=1e-6):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3e} > {rel:.0e} * {scale:.3e}"


def tiny_llama(seed=0, kv_heads=2):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=kv_heads,
                                   max_position_embeddings=64, tie_word_embeddings=False, attention_bias=True)
    return transformers.LlamaForCausalLM(cfg).eval()


def peft_dora(base, **kwargs):
    kwargs.setdefault("init_lora_weights", False)
    kwargs.setdefault("use_dora", True)
    torch.manual_seed(7)
    return peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))


def copy_adapters(ours, pm):
    """Every LoRA/DoRA tensor of ``pm`` into ``ours`` (same in-memory names minus PEFT's prefix)."""
    theirs = {k.removeprefix(PREFIX): v for k, v in pm.state_dict().items() if ".lora_" in k}
    mine = {k for k in ours.state_dict() if ".lora_" in k}
    assert set(theirs) == mine
    with torch.no_grad():
        for k, v in theirs.items():
            ours.get_parameter(k).copy_(v)


def batch(seed=1):
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))
    return ids, ids.clone()


def grads(model, prefix=""):
    return {n.removeprefix(prefix): p.grad for n, p in model.named_parameters() if p.requires_grad}


def check_forward_backward(ours, pm, rel=1e-6):
    ids, labels = batch()
    out, ref = ours(ids, labels=labels), pm(input_ids=ids, labels=labels)
    assert_rel_close(out.logits, ref.logits, rel)
    assert_rel_close(out.loss, ref.loss, rel)
    out.loss.backward()
    ref.loss.backward()
    g, g_ref = grads(ours), grads(pm, PREFIX)
    assert set(g) == set(g_ref)
    assert any("lora_magnitude_vector" in k for k in g)
    for k in g_ref:
        assert g[k] is not None and g[k].abs().sum() > 0, k
        assert_rel_close(g[k], g_ref[k], rel)


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]])
@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("kv_heads", [2, 4])
def test_dora_outputs_and_grads_match_peft(targets, use_rslora, kv_heads):
    base = tiny_llama(kv_heads=kv_heads)
    pm = peft_dora(base, r=4, lora_alpha=12, use_rslora=use_rslora, target_modules=targets)
    ours = copy.deepcopy(base)
    lora.inject_lora(ours, lora.LoraConfig(r=4, lora_alpha=12, use_rslora=use_rslora, target_modules=targets,
                                           use_dora=True))
    copy_adapters(ours, pm)
    check_forward_backward(ours, pm)


def test_dora_magnitude_init_matches_peft_and_starts_as_the_base():
    """With B = 0 (the default init) m = ||W||_c and the model is the base model; m equals PEFT's."""
    base = tiny_llama()
    pm = peft_dora(base, r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=True)
    ours = copy.deepcopy(base)
    lora.inject_lora(ours, lora.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True))
    theirs = dict(pm.named_parameters())
    for name, p in ours.named_parameters():
        if "lora_magnitude_vector" in name:
            assert torch.equal(p, theirs[PREFIX + name]), name
    ids, _ = batch()
    torch.testing.assert_close(ours(ids).logits, base(ids).logits, rtol=0, atol=1e-5)


def test_dora_magnitude_init_with_nonzero_b_matches_peft():
    """init_lora_weights=False: m = ||W + s B A||_c from PEFT's random A and B (peft DoraLinearLayer.update_layer)."""
    from finetune_ref.lora.dora import dora_init_magnitude

    base = tiny_llama()
    pm = peft_dora(base, r=4, lora_alpha=8, target_modules="all-linear")
    checked = 0
    for name, module in pm.base_model.model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            m = dora_init_magnitude(base.get_submodule(name).weight, module.lora_A["default"].weight,
                                    module.lora_B["default"].weight, module.scaling["default"])
            assert torch.equal(m, module.lora_magnitude_vector["default"].weight), name
            checked += 1
    assert checked == 14


def test_dora_dropout_in_train_mode_matches_peft_for_the_same_seed():
    base = tiny_llama()
    pm = peft_dora(base, r=4, lora_alpha=8, lora_dropout=0.3, target_modules="all-linear").train()
    ours = copy.deepcopy(base)
    lora.inject_lora(ours, lora.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules="all-linear",
                                           use_dora=True))
    copy_adapters(ours, pm)
    ours.train()
    torch.manual_seed(5)
    ids, labels = batch()
    out = ours(ids, labels=labels)
    torch.manual_seed(5)
    ref = pm(input_ids=ids, labels=labels)
    assert_rel_close(out.logits, ref.logits)
    out.loss.backward()
    ref.loss.backward()
    g, g_ref = grads(ours), grads(pm, PREFIX)
    for k in g_ref:
        assert_rel_close(g[k], g_ref[k])


def test_dora_merge_unmerge_match_peft_and_merged_equals_unmerged():
    base = tiny_llama()
    pm = peft_dora(base, r=4, lora_alpha=12, target_modules="all-linear")
    ours = copy.deepcopy(base)
    lora.inject_lora(ours, lora.LoraConfig(r=4, lora_alpha=12, target_modules="all-linear", use_dora=True))
    copy_adapters(ours, pm)
    ids, _ = batch()
    unmerged = ours(ids).logits
    lora.merge_adapters(ours)
    pm.merge_adapter()
    for name, layer in lora.lora_layers(ours):
        ref = pm.base_model.model.get_submodule(name).base_layer.weight
        assert_rel_close(layer.base_layer.weight, ref)
    assert_rel_close(ours(ids).logits, unmerged, 1e-5)  # merged weight: one rounding per element, then matmuls
    lora.unmerge_adapters(ours)
    for name, layer in lora.lora_layers(ours):
        assert_rel_close(layer.base_layer.weight, base.get_submodule(name).weight, 1e-6)


def test_two_dora_adapters_and_a_plain_one_match_peft_active_together_and_merged():
    """Several adapters: PEFT rescales the running output (adapters before a DoRA one included); so do we, and
    merging them in turn gives the same weights as PEFT's merge and the same outputs as the unmerged model."""
    base = tiny_llama()
    targets = ["q_proj", "v_proj", "down_proj"]
    torch.manual_seed(11)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                   init_lora_weights=False), adapter_name="plain")
    pm.add_adapter("d1", peft.LoraConfig(r=2, lora_alpha=5, target_modules=targets, init_lora_weights=False,
                                         use_dora=True))
    pm.add_adapter("d2", peft.LoraConfig(r=3, lora_alpha=3, target_modules=["q_proj"], init_lora_weights=False,
                                         use_dora=True))
    pm.base_model.set_adapter(["plain", "d1", "d2"])
    ours = copy.deepcopy(base)
    lora.inject_lora(ours, lora.LoraConfig(r=4, lora_alpha=8, target_modules=targets), adapter_name="plain")
    lora.inject_lora(ours, lora.LoraConfig(r=2, lora_alpha=5, target_modules=targets, use_dora=True), "d1")
    lora.inject_lora(ours, lora.LoraConfig(r=3, lora_alpha=3, target_modules=["q_proj"], use_dora=True), "d2")
    lora.set_adapter(ours, ["plain", "d1", "d2"])
    copy_adapters(ours, pm)
    check_forward_backward(ours, pm)
    ids, _ = batch()
    with torch.no_grad():
        unmerged = ours(ids).logits
        lora.merge_adapters(ours)
        pm.merge_adapter()
        for name, layer in lora.lora_layers(ours):
            assert_rel_close(layer.base_layer.weight, pm.base_model.model.get_submodule(name).base_layer.weight)
        assert_rel_close(ours(ids).logits, unmerged, 1e-5)
        lora.unmerge_adapters(ours)
        for name, layer in lora.lora_layers(ours):
            assert_rel_close(layer.base_layer.weight, base.get_submodule(name).weight, 1e-6)


def test_dora_files_both_ways(tmp_path):
    base = tiny_llama()
    pm = peft_dora(base, r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "gate_proj"])
    pm.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(base)
    lora.load_adapter(ours, tmp_path / "peft")
    ids, _ = batch()
    assert_rel_close(ours(ids).logits, pm(input_ids=ids).logits)
    lora.save_adapter(ours, tmp_path / "ours")
    theirs = load_file(tmp_path / "peft" / ADAPTER_WEIGHTS_NAME)
    mine = load_file(tmp_path / "ours" / ADAPTER_WEIGHTS_NAME)
    assert set(mine) == set(theirs) and any(k.endswith(".lora_magnitude_vector") for k in mine)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert json.loads((tmp_path / "ours" / ADAPTER_CONFIG_NAME).read_text())["use_dora"] is True
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert_rel_close(back(input_ids=ids).logits, pm(input_ids=ids).logits)


def test_a_dora_file_missing_its_magnitudes_is_refused(tmp_path):
    base = tiny_llama()
    pm = peft_dora(base, r=4, lora_alpha=8, target_modules=["q_proj"])
    pm.save_pretrained(tmp_path)
    config = json.loads((tmp_path / ADAPTER_CONFIG_NAME).read_text())
    config["use_dora"] = False  # the file still holds magnitudes: unexpected keys
    (tmp_path / ADAPTER_CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unexpected.*lora_magnitude_vector"):
        lora.load_adapter(copy.deepcopy(base), tmp_path)


# ---- QDoRA: the norm is taken on the dequantized 4-bit weight ----

QCONFIG = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=10000.0)


@pytest.fixture(scope="module")
def fp_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("fp")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**QCONFIG)).save_pretrained(path)
    return path


def hf_4bit(fp_dir):
    """transformers 4-bit load (NF4 + double quant, fp32 compute) on CPU, AVX512-BF16 repacking off (with it,
    bitsandbytes repacks the weight and silently loses input gradients)."""
    import bitsandbytes as bnb

    bnb_config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_use_double_quant=True,
                                                 bnb_4bit_compute_dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=bnb_config,
                                                              device_map="cpu", dtype=torch.float32)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def check_4bit_loss_and_grads(ours, theirs, ids):
    """Training-mode loss within 1e-6 of PEFT's on bitsandbytes, every trainable gradient rtol 1e-4 (bnb's CPU
    matmul sums in another order); returns our gradients by name."""
    ours.train()
    theirs.train()
    loss = ours(ids, labels=ids).loss
    ref = theirs(input_ids=ids, labels=ids).loss
    assert abs(loss.item() - ref.item()) <= 1e-6
    loss.backward()
    ref.backward()
    g, g_ref = grads(ours), grads(theirs, PREFIX)
    assert set(g) == set(g_ref)
    for k in g_ref:
        torch.testing.assert_close(g[k], g_ref[k], rtol=1e-4, atol=1e-6)
    return g


def test_qdora_loss_and_gradients_match_peft_on_bitsandbytes(fp_dir, tmp_path):
    from finetune_ref.qlora.model import load_quantized

    targets = ["q_proj", "k_proj", "v_proj", "down_proj"]
    torch.manual_seed(1)
    theirs = peft.get_peft_model(hf_4bit(fp_dir), peft.LoraConfig(r=4, lora_alpha=12, target_modules=targets,
                                                                   init_lora_weights=False, use_dora=True))
    ours = load_quantized(fp_dir, compute_dtype=torch.float32, dtype=torch.float32)
    lora.inject_lora(ours, lora.LoraConfig(r=4, lora_alpha=12, target_modules=targets, use_dora=True))
    copy_adapters(ours, theirs)
    ids = torch.randint(0, QCONFIG["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(3))
    g = check_4bit_loss_and_grads(ours, theirs, ids)
    assert sum("lora_magnitude_vector" in k for k in g) == 8
    # The magnitude PEFT initialises on the 4-bit base is the norm of the dequantized weight.
    from finetune_ref.lora.dora import dora_init_magnitude
    layer = dict(lora.lora_layers(ours))["model.layers.0.self_attn.q_proj"]
    peft_layer = theirs.base_model.model.model.layers[0].self_attn.q_proj
    m = dora_init_magnitude(layer.base_layer.dequantize(), peft_layer.lora_A["default"].weight,
                            peft_layer.lora_B["default"].weight, peft_layer.scaling["default"])
    torch.testing.assert_close(m, peft_layer.lora_magnitude_vector["default"].weight, rtol=1e-6, atol=0)
    # Files: ours loads into PEFT on the 4-bit model and gives PEFT's loss.
    ours.eval()
    theirs.eval()
    lora.save_adapter(ours, tmp_path / "qdora")
    back = peft.PeftModel.from_pretrained(hf_4bit(fp_dir), tmp_path / "qdora")
    with torch.no_grad():
        assert abs(back(input_ids=ids, labels=ids).loss.item() - theirs(input_ids=ids, labels=ids).loss.item()) < 1e-6


def test_qdora_merge_is_close_to_the_unmerged_model(fp_dir):
    """Merging into a 4-bit base re-quantizes f * (W + dW) (lossy, as PEFT's bnb merge): outputs move by about
    one NF4 step, not more; the magnitude factor comes from the dequantized unmerged weight."""
    from finetune_ref.qlora.model import load_quantized

    ours = load_quantized(fp_dir, compute_dtype=torch.float32, dtype=torch.float32)
    torch.manual_seed(2)
    lora.inject_lora(ours, lora.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"],
                                           use_dora=True, init_lora_weights=False))
    ids = torch.randint(0, QCONFIG["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = ours(ids).logits
        expected = {n: layer.merged_base_weight(["default"]) for n, layer in lora.lora_layers(ours)}
        lora.merge_adapters(ours)
        for name, layer in lora.lora_layers(ours):
            step = expected[name].abs().amax(dim=1, keepdim=True) / 3  # coarse bound: NF4 codes are ~0.1-0.3 apart
            assert ((layer.base_layer.dequantize() - expected[name]).abs() <= step).all()
        after = ours(ids).logits
    assert (after - before).abs().max() < 0.1 * before.abs().max()
