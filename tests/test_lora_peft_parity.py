"""Oracle parity with Hugging Face PEFT 0.22 on tiny random transformers Llama models made in the test.

Same base weights and same (non-zero) adapter weights in both: logits, loss and every LoRA gradient must agree
within 1e-6 relative in fp32 (max|ours - peft| <= 1e-6 * max|peft| over each whole tensor). Files written by
one side are read by the other. Model: hidden 64, 2 layers, 4 query heads / 2 KV heads (GQA), vocab 128.
"""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from finetune_ref import lora  # noqa: E402
from finetune_ref.lora.peft_format import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME  # noqa: E402
from finetune_ref.parity import oracles  # noqa: E402

PREFIX = oracles.PEFT_PREFIX
tiny_llama = oracles.tiny_hf_llama  # a random transformers Llama: hidden 64, 2 layers, 4 heads / 2 KV heads
peft_model = oracles.peft_lora  # PEFT on a copy, init_lora_weights=False so that B != 0
copy_peft_adapter_into = oracles.copy_peft_adapter_into


def assert_rel_close(actual, expected, rel=1e-6):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3e} > {rel:.0e} * {scale:.3e}"


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (2, 12), generator=g)
    return ids, ids.clone()


def lora_grads(model, prefix=""):
    return {n.removeprefix(prefix): p.grad for n, p in model.named_parameters() if p.requires_grad}


def check_forward_backward(ours, pm):
    ids, labels = batch()
    out_ours, out_peft = ours(ids, labels=labels), pm(input_ids=ids, labels=labels)
    assert_rel_close(out_ours.logits, out_peft.logits)
    assert_rel_close(out_ours.loss, out_peft.loss)
    out_ours.loss.backward()
    out_peft.loss.backward()
    g_ours, g_peft = lora_grads(ours), lora_grads(pm, PREFIX)
    assert set(g_ours) == set(g_peft) and g_ours
    assert all(".lora_" in k for k in g_ours)
    for k in g_peft:
        assert_rel_close(g_ours[k], g_peft[k])


# ---- same weights, same numbers ----

@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]])
@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("r, alpha", [(1, 3), (3, 7), (8, 32), (16, 8)])  # scaling != 1 in every case
def test_outputs_and_grads_match_peft(r, alpha, use_rslora, targets):
    base = tiny_llama()
    pm = peft_model(base, r=r, lora_alpha=alpha, use_rslora=use_rslora, target_modules=targets)
    ours = copy.deepcopy(base)
    lora.inject_lora(ours, lora.LoraConfig(r=r, lora_alpha=alpha, use_rslora=use_rslora, target_modules=targets))
    copy_peft_adapter_into(ours, pm)
    check_forward_backward(ours, pm)


def test_rank_and_alpha_patterns_match_peft():
    kwargs = dict(r=4, lora_alpha=8, target_modules="all-linear",
                  rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6}, alpha_pattern={"v_proj": 3})
    base = tiny_llama()
    pm = peft_model(base, **kwargs)
    ours = copy.deepcopy(base)
    lora.inject_lora(ours, lora.LoraConfig(**kwargs))
    layers = dict(lora.lora_layers(ours))
    for name, module in pm.base_model.model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            assert layers[name].r["default"] == module.r["default"], name
            assert layers[name].scaling["default"] == module.scaling["default"], name
    assert layers["model.layers.1.mlp.down_proj"].r["default"] == 6
    copy_peft_adapter_into(ours, pm)
    check_forward_backward(ours, pm)


def test_dropout_in_train_mode_matches_peft_for_the_same_seed():
    base = tiny_llama()
    pm = peft_model(base, r=4, lora_alpha=8, lora_dropout=0.3, target_modules="all-linear").train()
    ours = copy.deepcopy(base)
    lora.inject_lora(ours, lora.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules="all-linear"))
    copy_peft_adapter_into(ours, pm)
    ours.train()
    ids, _ = batch()
    torch.manual_seed(5)
    a = ours(ids).logits
    torch.manual_seed(5)
    b = pm(input_ids=ids).logits
    assert_rel_close(a, b)
    torch.manual_seed(6)
    assert not torch.allclose(ours(ids).logits, a)  # dropout really is active


def test_bf16_base_with_fp32_adapters_matches_peft():
    base = tiny_llama().to(torch.bfloat16)
    pm = peft_model(base, r=8, lora_alpha=32, target_modules="all-linear")  # PEFT upcasts adapters to fp32
    ours = copy.deepcopy(base)
    lora.inject_lora(ours, lora.LoraConfig(r=8, lora_alpha=32, target_modules="all-linear"))
    copy_peft_adapter_into(ours, pm)
    ids, _ = batch()
    a, b = ours(ids).logits, pm(input_ids=ids).logits
    assert a.dtype == b.dtype == torch.bfloat16
    assert_rel_close(a, b, rel=2 ** -8)  # bf16: 8 significant bits


def test_all_linear_selects_what_peft_selects():
    for tie in (False, True):
        base = tiny_llama(tie=tie)
        pm = peft_model(base, target_modules="all-linear")
        ours = copy.deepcopy(base)
        names = lora.inject_lora(ours, lora.LoraConfig(target_modules="all-linear"))
        assert sorted(names) == sorted(pm.base_model.targeted_module_names)
        assert "lm_head" not in names
        assert lora.format_trainable_parameters(ours) == _peft_trainable_line(pm)


def _peft_trainable_line(pm):
    trainable, total = pm.get_nb_trainable_parameters()
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


# ---- files, both ways ----

FILE_CONFIGS = [
    dict(r=4, lora_alpha=8, target_modules="all-linear", rank_pattern={"o_proj": 2}),
    dict(r=3, lora_alpha=7, target_modules=["q_proj", "v_proj"], use_rslora=True),
    dict(r=2, lora_alpha=5, target_modules=r".*\.(k|o)_proj"),
    dict(r=2, lora_alpha=6, target_modules=["q_proj", "k_proj", "up_proj"], exclude_modules=["layers.0.mlp.up_proj"]),
]


@pytest.mark.parametrize("kwargs", FILE_CONFIGS, ids=["all-linear", "qv-rslora", "regex", "exclude"])
def test_adapter_saved_by_peft_loads_into_ours(tmp_path, kwargs):
    base = tiny_llama()
    pm = peft_model(base, **kwargs)
    pm.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    modules = lora.load_adapter(ours, tmp_path)
    assert sorted(modules) == sorted(pm.base_model.targeted_module_names)
    ids, _ = batch()
    assert_rel_close(ours(ids).logits, pm(input_ids=ids).logits)


@pytest.mark.parametrize("kwargs", FILE_CONFIGS, ids=["all-linear", "qv-rslora", "regex", "exclude"])
def test_adapter_saved_by_ours_loads_into_peft(tmp_path, kwargs):
    base = tiny_llama()
    ours = copy.deepcopy(base)
    lora.inject_lora(ours, lora.LoraConfig(init_lora_weights=False, **kwargs))
    base_dir = str(tmp_path / "base")  # a local path, so that PEFT does not look it up on the Hub
    base.config.save_pretrained(base_dir)
    lora.save_adapter(ours, tmp_path / "ours", base_model_name_or_path=base_dir)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    ids, _ = batch()
    assert_rel_close(loaded(input_ids=ids).logits, ours(ids).logits)
    # Same file keys and config meaning as PEFT's own save of the same adapter.
    loaded.save_pretrained(tmp_path / "peft")
    ours_file = load_file(tmp_path / "ours" / ADAPTER_WEIGHTS_NAME)
    peft_file = load_file(tmp_path / "peft" / ADAPTER_WEIGHTS_NAME)
    assert set(ours_file) == set(peft_file)
    for k in ours_file:
        assert torch.equal(ours_file[k], peft_file[k])
    cfg = json.loads((tmp_path / "ours" / ADAPTER_CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == kwargs["r"] and cfg["lora_alpha"] == kwargs["lora_alpha"]
    assert cfg["base_model_name_or_path"] == base_dir
    if kwargs["target_modules"] == "all-linear":  # written out as the explicit list, as PEFT does
        assert sorted(cfg["target_modules"]) == sorted(loaded.base_model.targeted_module_names)


def test_merged_models_are_interchangeable():
    base = tiny_llama()
    kwargs = dict(r=8, lora_alpha=32, target_modules="all-linear")
    pm = peft_model(base, **kwargs)
    ours = copy.deepcopy(base)
    lora.inject_lora(ours, lora.LoraConfig(**kwargs))
    copy_peft_adapter_into(ours, pm)
    ids, _ = batch()
    unmerged = pm(input_ids=ids).logits
    merged_peft = pm.merge_and_unload()
    merged_ours = lora.merge_and_unload(ours)
    assert not lora.lora_layers(merged_ours)
    sd_ours, sd_peft = merged_ours.state_dict(), merged_peft.state_dict()
    assert set(sd_ours) == set(sd_peft)
    for k in sd_peft:
        assert_rel_close(sd_ours[k], sd_peft[k])
    # Each merged state dict, loaded into a plain transformers model, gives the unmerged outputs.
    for sd in (sd_ours, sd_peft):
        plain = copy.deepcopy(base)
        plain.load_state_dict(sd)
        assert_rel_close(plain(ids).logits, unmerged, rel=1e-5)  # one rounding of W + dW per weight


# ---- strict loading ----

def _saved_adapter(tmp_path, **kwargs):
    base = tiny_llama()
    ours = copy.deepcopy(base)
    lora.inject_lora(ours, lora.LoraConfig(init_lora_weights=False, **kwargs))
    lora.save_adapter(ours, tmp_path)
    return base


def test_missing_unexpected_and_misshapen_tensors_are_errors(tmp_path):
    base = _saved_adapter(tmp_path, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    path = tmp_path / ADAPTER_WEIGHTS_NAME
    good = load_file(path)
    key = PREFIX + "model.layers.0.self_attn.q_proj.lora_A.weight"
    cases = {
        "1 missing": {k: v for k, v in good.items() if k != key},
        "1 unexpected": {**good, PREFIX + "model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(2, 64)},
        "1 misshapen": {**good, key: torch.zeros(3, 64)},
    }
    for message, tensors in cases.items():
        save_file(tensors, path)
        model = copy.deepcopy(base)
        with pytest.raises(ValueError, match=message):
            lora.load_adapter(model, tmp_path)
        assert not lora.lora_layers(model)  # the model was not touched


def test_unsupported_config_and_bad_files_are_errors(tmp_path):
    base = _saved_adapter(tmp_path, r=2, lora_alpha=4, target_modules=["q_proj"])
    cfg_path = tmp_path / ADAPTER_CONFIG_NAME
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "lora_bias": True}))
    with pytest.raises(ValueError, match="lora_bias"):
        lora.load_adapter(copy.deepcopy(base), tmp_path)
    cfg_path.write_text(json.dumps({**cfg, "use_dora": True}))  # DoRA without its magnitudes in the file
    with pytest.raises(ValueError, match="missing.*lora_magnitude_vector"):
        lora.load_adapter(copy.deepcopy(base), tmp_path)
    cfg_path.write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(ValueError, match="LORA"):
        lora.load_adapter(copy.deepcopy(base), tmp_path)
    cfg_path.write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        lora.load_adapter(copy.deepcopy(base), tmp_path)
    cfg_path.write_text(json.dumps(cfg))
    (tmp_path / ADAPTER_WEIGHTS_NAME).write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="safetensors"):
        lora.load_adapter(copy.deepcopy(base), tmp_path)
    with pytest.raises(FileNotFoundError):
        lora.load_adapter(copy.deepcopy(base), tmp_path / "nowhere")


def test_peft_config_defaults_we_ignore_are_accepted(tmp_path):
    """A config as PEFT writes it (with all its off-by-default options) loads; only plain LoRA is in it."""
    base = tiny_llama()
    peft_model(base, r=2, lora_alpha=4, target_modules=["q_proj"]).save_pretrained(tmp_path)
    config = lora.read_adapter_config(tmp_path)
    assert (config.r, config.lora_alpha, config.target_modules) == (2, 4, ["q_proj"])


# ---- key names and several adapters from files ----

class OddNames(torch.nn.Module):
    """Module paths that contain "weight" and "lora": key conversion must leave them alone."""

    def __init__(self):
        super().__init__()
        self.lora_blocks = torch.nn.ModuleList([torch.nn.ModuleDict({"weight": torch.nn.Linear(8, 8),
                                                                     "lora_A": torch.nn.Linear(8, 6)})])
        self.weight_head = torch.nn.Linear(6, 4)

    def forward(self, x):
        block = self.lora_blocks[0]
        return self.weight_head(block["lora_A"](block["weight"](x)))


def test_key_conversion_keeps_module_names_with_weight_or_lora(tmp_path):
    from finetune_ref.lora.peft_format import module_key_to_peft_key, peft_key_to_module_key

    torch.manual_seed(0)
    base = OddNames()
    model = copy.deepcopy(base)
    lora.inject_lora(model, lora.LoraConfig(r=2, lora_alpha=3, target_modules=["weight", "lora_A", "weight_head"],
                                            init_lora_weights=False))
    lora.save_adapter(model, tmp_path)
    keys = set(load_file(tmp_path / ADAPTER_WEIGHTS_NAME))
    assert keys == {f"{PREFIX}{m}.{p}.weight" for m in ("lora_blocks.0.weight", "lora_blocks.0.lora_A", "weight_head")
                    for p in ("lora_A", "lora_B")}
    for key in (k for k in model.state_dict() if ".default." in k):
        assert peft_key_to_module_key(module_key_to_peft_key(key, "default"), "default") == key
    reloaded = copy.deepcopy(base)
    lora.load_adapter(reloaded, tmp_path)
    x = torch.randn(3, 8)
    assert torch.equal(reloaded(x), model(x))
    with pytest.raises(ValueError, match="not a LoRA weight key"):
        peft_key_to_module_key("model.layers.0.q_proj.lora_A.weight", "default")  # no base_model.model. prefix


def test_load_several_adapters_sums_them_and_unload_restores_the_base(tmp_path):
    base = tiny_llama()
    reference = copy.deepcopy(base)
    lora.inject_lora(reference, lora.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                init_lora_weights=False), adapter_name="a")
    lora.inject_lora(reference, lora.LoraConfig(r=3, lora_alpha=5, target_modules="all-linear",
                                                init_lora_weights=False), adapter_name="b")
    lora.save_adapter(reference, tmp_path / "a", adapter_name="a")
    lora.save_adapter(reference, tmp_path / "b", adapter_name="b")
    lora.set_adapter(reference, ["a", "b"])
    model = copy.deepcopy(base)
    names = lora.load_adapters(model, [tmp_path / "a", tmp_path / "b"])
    assert names == ["adapter_0", "adapter_1"] and lora.get_active_adapters(model) == names
    assert not any(p.requires_grad for p in model.parameters())  # loaded for inference
    ids, _ = batch()
    assert_rel_close(model(ids).logits, reference(ids).logits)
    lora.set_adapter(model, "adapter_1")
    lora.set_adapter(reference, "b")
    assert_rel_close(model(ids).logits, reference(ids).logits)
    plain = lora.unload(model)
    assert torch.equal(plain(ids).logits, base(ids).logits)
