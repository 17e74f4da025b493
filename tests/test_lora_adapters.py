"""Target selection, several named adapters, merge/unmerge at model level, tied embeddings, frozen base.

Tiny random transformers Llama (hidden 64, 2 layers, GQA 4/2 heads) made in the test, plus our own
``models.llama.LlamaForCausalLM`` for the parts that depend on the model class (no ``get_output_embeddings``).
fp32 tolerance: max|a - b| <= 1e-6 * max|b| over whole tensors (merged vs unmerged: 1e-5, one rounding of
W + dW per weight).
"""

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from finetune_ref import lora  # noqa: E402
from finetune_ref.lora.inject import rank_and_alpha  # noqa: E402
from finetune_ref.lora.layer import LoRALinear  # noqa: E402
from finetune_ref.parity import oracles  # noqa: E402

QV = ["q_proj", "v_proj"]


def assert_rel_close(actual, expected, rel=1e-6):
    assert actual.shape == expected.shape
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3e} > {rel:.0e} * {scale:.3e}"


def tiny_llama(tie=False, seed=0):
    return oracles.tiny_hf_llama(tie=tie, seed=seed)


IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def config(**kwargs):
    kwargs.setdefault("init_lora_weights", False)  # B != 0 so that adapters change the output
    return lora.LoraConfig(**kwargs)


# ---- targets ----

def test_target_rules():
    model = tiny_llama()
    names = lambda **kw: lora.find_target_modules(model, lora.LoraConfig(**kw))  # noqa: E731
    assert names(target_modules=QV) == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in QV]
    assert names(target_modules=r"model\.layers\.1\..*_proj") == [
        f"model.layers.1.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                        "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    all_linear = names(target_modules="all-linear")
    assert len(all_linear) == 14 and "lm_head" not in all_linear
    assert names(target_modules=["all-linear", "lm_head"]) == all_linear + ["lm_head"]
    assert names(target_modules="all-linear", exclude_modules=["mlp.down_proj", "k_proj"]) == [
        n for n in all_linear if not n.endswith(("down_proj", "k_proj"))]
    assert names(target_modules="all-linear", exclude_modules=r".*layers\.0\..*") == [
        n for n in all_linear if ".layers.1." in n]
    # A suffix must be a whole name component: "proj" is not a suffix of "q_proj".
    with pytest.raises(ValueError, match="matches no module"):
        names(target_modules=["proj"])


def test_target_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match="not linear layers"):
        lora.find_target_modules(model, lora.LoraConfig(target_modules=["self_attn"]))
    with pytest.raises(ValueError, match="rank_pattern key 'q_porj'"):
        lora.find_target_modules(model, lora.LoraConfig(target_modules=QV, rank_pattern={"q_porj": 2}))
    with pytest.raises(ValueError, match="target_modules is required"):
        lora.LoraConfig()
    with pytest.raises(ValueError, match="bias"):
        lora.LoraConfig(target_modules=QV, bias="all")
    with pytest.raises(TypeError):
        lora.LoraConfig(target_modules=QV, r=2.5)
    with pytest.raises(ValueError, match="lora_dropout"):
        lora.LoraConfig(target_modules=QV, lora_dropout=-0.1)


def test_config_round_trips_through_peft_dict():
    cfg = lora.LoraConfig(r=3, lora_alpha=7, lora_dropout=0.1, target_modules=QV, exclude_modules=["layers.0.q_proj"],
                          use_rslora=True, init_lora_weights="gaussian", rank_pattern={"v_proj": 2},
                          alpha_pattern={"q_proj": 5}, base_model_name_or_path="some/model")
    d = cfg.to_peft_dict()
    assert d["peft_type"] == "LORA" and d["use_dora"] is False and d["bias"] == "none"
    assert lora.LoraConfig.from_peft_dict(d) == cfg
    with pytest.raises(ValueError, match="expanded"):
        lora.LoraConfig(target_modules="all-linear").to_peft_dict()
    both = {**d, "use_dora": True, "modules_to_save": ["lm_head"]}  # supported: lora/dora.py, lora/modules_to_save.py
    assert lora.LoraConfig.from_peft_dict(both).to_peft_dict() == both
    tokens = {**d, "trainable_token_indices": {"embed_tokens": [1, 2]}, "ensure_weight_tying": True}  # supported:
    assert lora.LoraConfig.from_peft_dict(tokens).to_peft_dict() == tokens  # lora/trainable_tokens.py, embedding.py
    for key, value in (("lora_bias", True), ("layers_to_transform", [0]),
                       ("fan_in_fan_out", True), ("init_lora_weights", "pissa")):
        with pytest.raises(ValueError, match=key):
            lora.LoraConfig.from_peft_dict({**d, key: value})


def test_rank_and_alpha_pattern_first_match_wins():
    cfg = lora.LoraConfig(target_modules="all-linear", r=8, lora_alpha=16,
                          rank_pattern={r"layers\.1\.self_attn\.q_proj": 2, "q_proj": 4}, alpha_pattern={"o_proj": 3})
    assert rank_and_alpha(cfg, "model.layers.0.self_attn.q_proj") == (4, 16)
    assert rank_and_alpha(cfg, "model.layers.1.self_attn.q_proj") == (2, 16)
    assert rank_and_alpha(cfg, "model.layers.1.self_attn.o_proj") == (8, 3)
    assert rank_and_alpha(cfg, "model.layers.1.self_attn.xq_proj") == (8, 16)  # whole components only


def test_gqa_shapes():
    model = tiny_llama()
    lora.inject_lora(model, config(r=4, target_modules="all-linear"))
    k = model.model.layers[0].self_attn.k_proj
    assert isinstance(k, LoRALinear) and (k.in_features, k.out_features) == (64, 32)
    assert k.lora_A["default"].weight.shape == (4, 64) and k.lora_B["default"].weight.shape == (32, 4)


# ---- training invariants ----

def test_zero_B_leaves_outputs_unchanged_and_only_lora_trains():
    model = tiny_llama()
    before = logits(model)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    lora.inject_lora(model, lora.LoraConfig(r=8, lora_alpha=32, target_modules="all-linear"))  # default init
    assert torch.equal(logits(model), before)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    # Train a few steps with weight decay on *all* parameters: frozen ones must stay bitwise identical.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    losses = []
    for _ in range(3):
        loss = model(IDS, labels=IDS).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0]
    plain = lora.unload(model)
    for k, v in plain.state_dict().items():
        assert torch.equal(v, base_state[k]), k


def test_trainable_parameter_report_matches_count():
    model = tiny_llama(tie=True)
    lora.inject_lora(model, lora.LoraConfig(r=8, lora_alpha=16, target_modules=QV))
    # q: 8 * (64 + 64), v: 8 * (64 + 32) per layer, 2 layers; tied embedding counted once.
    trainable = 2 * (8 * 128 + 8 * 96)
    total = sum(p.numel() for p in tiny_llama(tie=True).parameters()) + trainable
    assert lora.trainable_parameters(model) == (trainable, total)
    lines = []
    assert lora.print_trainable_parameters(model, print_fn=lines.append) == lines[0]
    assert lines[0] == (f"trainable params: {trainable:,d} || all params: {total:,d} || "
                        f"trainable%: {100 * trainable / total:.4f}")


# ---- several adapters ----

def test_named_adapters_switch_disable_delete():
    base = tiny_llama()
    plain = logits(base)
    model = copy.deepcopy(base)
    lora.inject_lora(model, config(r=4, lora_alpha=8, target_modules=QV), adapter_name="qv")
    lora.inject_lora(model, config(r=2, lora_alpha=6, target_modules=["up_proj", "q_proj"], init_lora_weights=False),
                     adapter_name="mlp")
    assert lora.adapter_names(model) == ["qv", "mlp"]
    assert lora.get_active_adapters(model) == ["qv"]  # a later adapter is added inactive
    # Reference models carrying one adapter each.
    only_qv, only_mlp = copy.deepcopy(model), copy.deepcopy(model)
    lora.delete_adapter(only_qv, "mlp")
    lora.delete_adapter(only_mlp, "qv")
    lora.set_adapter(only_mlp, "mlp")
    out_qv, out_mlp = logits(model), logits(only_mlp)
    assert torch.equal(out_qv, logits(only_qv))
    assert not torch.allclose(out_qv, plain) and not torch.allclose(out_mlp, plain)
    lora.set_adapter(model, "mlp")
    assert_rel_close(logits(model), out_mlp)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".mlp." in n.split("lora_")[1] for n in trainable)
    # Both active: the updates add up (checked on one layer, where both adapters live).
    lora.set_adapter(model, ["qv", "mlp"])
    q = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64)
    with torch.no_grad():
        both = q(x) - q.base_layer(x)
        parts = []
        for name in ("qv", "mlp"):
            q.set_adapter(name)
            parts.append(q(x) - q.base_layer(x))
        q.set_adapter(["qv", "mlp"])
    assert_rel_close(both, parts[0] + parts[1])
    with lora.disable_adapters(model):
        assert torch.equal(logits(model), plain)
    assert not torch.equal(logits(model), plain)  # re-enabled on exit
    with pytest.raises(ValueError, match="unknown adapter"):
        lora.set_adapter(model, "nope")
    with pytest.raises(ValueError, match="already has an adapter"):
        lora.inject_lora(model, config(target_modules=QV), adapter_name="qv")
    lora.delete_adapter(model, "qv")
    lora.delete_adapter(model, "mlp")
    assert not lora.lora_layers(model) and lora.adapter_names(model) == []
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
    assert torch.equal(logits(model), plain)


def test_model_level_merge_unmerge_and_merge_and_unload():
    model = tiny_llama()
    lora.inject_lora(model, config(r=8, lora_alpha=32, target_modules="all-linear"), adapter_name="a")
    lora.inject_lora(model, config(r=3, lora_alpha=7, target_modules=QV), adapter_name="b")
    lora.set_adapter(model, ["a", "b"])
    unmerged = logits(model)
    weights = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    changed = lora.merge_adapters(model)
    assert len(changed) == 14
    assert_rel_close(logits(model), unmerged, rel=1e-5)
    assert lora.merge_adapters(model) == []  # merging twice merges once
    with pytest.raises(ValueError, match="unmerge"):
        lora.set_adapter(model, "a")
    with pytest.raises(ValueError, match="unmerge"):
        with lora.disable_adapters(model):
            pass
    with pytest.raises(ValueError, match="unmerge"):
        lora.delete_adapter(model, "b")
    assert len(lora.unmerge_adapters(model)) == 14
    for k, v in model.state_dict().items():
        if "base_layer" in k:
            assert_rel_close(v, weights[k])
    plain = lora.merge_and_unload(model)
    assert plain is model and not lora.lora_layers(plain)
    assert not hasattr(plain, "lora_configs")
    assert isinstance(plain.model.layers[1].mlp.down_proj, nn.Linear)
    assert_rel_close(logits(plain), unmerged, rel=1e-5)


def test_model_level_safe_merge_is_all_or_nothing():
    model = tiny_llama()
    lora.inject_lora(model, config(target_modules="all-linear"))
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.lora_B["default"].weight[0, 0] = float("inf")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="nothing was merged"):
        lora.merge_adapters(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not any(layer.merged for _, layer in lora.lora_layers(model))


# ---- tied embeddings ----

def test_merge_into_tied_lm_head_refuses_or_unties():
    model = tiny_llama(tie=True)
    lora.inject_lora(model, config(target_modules=["all-linear", "lm_head"]))
    assert model.lm_head.base_layer.weight is model.model.embed_tokens.weight
    embed = model.model.embed_tokens.weight.detach().clone()
    unmerged = logits(model)
    assert model.lm_head.shared_weight_with == ["model.embed_tokens"]
    with pytest.raises(ValueError, match="tied"):
        lora.merge_adapters(model)
    with pytest.raises(ValueError, match="tied"):
        model.lm_head.merge()  # the layer-level merge refuses too
    assert torch.equal(model.model.embed_tokens.weight, embed)
    assert not any(layer.merged for _, layer in lora.lora_layers(model))
    plain = lora.merge_and_unload(model, untie_tied=True)
    assert torch.equal(plain.model.embed_tokens.weight, embed)  # the input embedding is untouched
    assert plain.lm_head.weight is not plain.model.embed_tokens.weight
    assert plain.config.tie_word_embeddings is False
    assert_rel_close(logits(plain), unmerged, rel=1e-5)


# ---- our own model class ----

def test_on_our_llama_model(tmp_path):
    from finetune_ref.models import checkpoint, loader
    hf = tiny_llama(tie=True)
    hf.save_pretrained(tmp_path / "base")
    ours = loader.load_model(tmp_path / "base", dtype=torch.float32)
    names = lora.inject_lora(ours, config(r=4, lora_alpha=8, target_modules="all-linear"))
    assert "lm_head" not in names and len(names) == 14  # no get_output_embeddings(): lm_head found by name
    # Same adapter in transformers + our LoRA: same logits as our model + our LoRA.
    lora.save_adapter(ours, tmp_path / "adapter")
    lora.load_adapter(hf, tmp_path / "adapter")
    assert_rel_close(ours(IDS).logits, logits(hf), rel=1e-5)  # two model implementations: summation order
    # Merge, save with our checkpoint code, reload: a plain model with the adapter's outputs.
    expected = ours(IDS).logits.detach()
    merged = lora.merge_and_unload(ours)
    checkpoint.save_model(merged, tmp_path / "merged")
    reloaded = loader.load_model(tmp_path / "merged", dtype=torch.float32)
    assert_rel_close(reloaded(IDS).logits.detach(), expected, rel=1e-5)
