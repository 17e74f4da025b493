"""``modules_to_save`` (fully trained copies saved with the adapter) against PEFT (0.22 or later: an entry names
whole name components, so "norm" is the final norm only) on a tiny random Llama (GQA, untied head). Same base,
same LoRA tensors, same copies: logits, loss and every trainable gradient within 1e-6 relative (the same
operations); files both ways; merge_and_unload keeps the trained copy, unload the original; tied embeddings are
refused; a file whose copies PEFT < 0.22 chose by a plain suffix is refused saying which names to add."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft", minversion="0.22")  # the whole-component rule (peft/utils/other.py)

from peft_oracle import assert_rel_close, tiny_hf_llama  # noqa: E402

from finetune_ref import lora  # noqa: E402
from finetune_ref.lora.modules_to_save import ModulesToSaveWrapper, check_legacy_suffix_choice  # noqa: E402
from finetune_ref.lora.peft_format import ADAPTER_WEIGHTS_NAME  # noqa: E402

PREFIX = "base_model.model."
KWARGS = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head", "norm", "input_layernorm"])


def tiny_llama(tie=False):
    return tiny_hf_llama(tie, vocab_size=128)



def pair():
    base = tiny_llama()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **KWARGS))
    ours = copy.deepcopy(base)
    lora.inject_lora(ours, lora.LoraConfig(**KWARGS))
    theirs = dict(pm.named_parameters())
    torch.manual_seed(3)
    with torch.no_grad():  # the copies as if trained: perturbed, the same on both sides
        for name, p in ours.named_parameters():
            if p.requires_grad:
                ref = theirs[PREFIX + name]
                p.copy_(ref if "lora_" in name else ref + 0.01 * torch.randn_like(ref))
                ref.copy_(p)
    return base, ours, pm


def test_outputs_and_all_trainable_gradients_match_peft():
    _, ours, pm = pair()
    wrapped = sorted(n for n, m in ours.named_modules() if isinstance(m, ModulesToSaveWrapper))
    assert wrapped == ["lm_head", "model.layers.0.input_layernorm", "model.layers.1.input_layernorm", "model.norm"]
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    out, ref = ours(ids, labels=ids), pm(input_ids=ids, labels=ids)
    assert_rel_close(out.logits, ref.logits)
    out.loss.backward()
    ref.loss.backward()
    g = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    g_ref = {n.removeprefix(PREFIX): p.grad for n, p in pm.named_parameters() if p.requires_grad}
    assert set(g) == set(g_ref) and any("modules_to_save.default" in k for k in g)
    for k in g_ref:
        assert_rel_close(g[k], g_ref[k])
    assert lora.trainable_parameters(ours) == pm.get_nb_trainable_parameters()


def test_files_both_ways_and_merge_keeps_the_trained_copy(tmp_path):
    base, ours, pm = pair()
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    lora.save_adapter(ours, tmp_path / "ours")
    pm.save_pretrained(tmp_path / "peft")
    mine, theirs = load_file(tmp_path / "ours" / ADAPTER_WEIGHTS_NAME), load_file(tmp_path / "peft" / ADAPTER_WEIGHTS_NAME)
    assert set(mine) == set(theirs) and "base_model.model.lm_head.weight" in mine
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    loaded = copy.deepcopy(base)
    lora.load_adapter(loaded, tmp_path / "peft")
    with torch.no_grad():
        expected = pm(input_ids=ids).logits
        assert_rel_close(back(input_ids=ids).logits, expected)
        assert_rel_close(loaded(ids).logits, expected)
        with lora.disable_adapters(loaded):
            assert_rel_close(loaded(ids).logits, base(ids).logits)
        merged = lora.merge_and_unload(copy.deepcopy(loaded))
        assert not any(isinstance(m, ModulesToSaveWrapper) for m in merged.modules())
        assert_rel_close(merged(ids).logits, expected, 1e-5)
        assert_rel_close(lora.unload(loaded)(ids).logits, base(ids).logits)


def test_tied_embeddings_and_overlaps_are_refused():
    with pytest.raises(ValueError, match="tied"):
        lora.inject_lora(tiny_llama(tie=True), lora.LoraConfig(r=2, target_modules=["q_proj"],
                                                               modules_to_save=["embed_tokens"]))
    with pytest.raises(ValueError, match="both target_modules and modules_to_save"):
        lora.inject_lora(tiny_llama(), lora.LoraConfig(r=2, target_modules=["q_proj", "lm_head"],
                                                       modules_to_save=["lm_head"]))
    with pytest.raises(ValueError, match="names no module"):
        lora.inject_lora(tiny_llama(), lora.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["nothing"]))


def test_a_file_saved_with_the_plain_suffix_rule_says_which_names_to_add(tmp_path):
    """PEFT before 0.22 let "norm" choose every *norm module; such a file holds the layers' norms too. Loading it
    names the entries to add instead of reporting bare unexpected keys (or silently dropping trained norms)."""
    base = tiny_llama()
    ours = copy.deepcopy(base)
    lora.inject_lora(ours, lora.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                           modules_to_save=["norm", "input_layernorm", "post_attention_layernorm"]))
    lora.save_adapter(ours, tmp_path / "old")
    config_path = tmp_path / "old" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    # what PEFT 0.21 wrote for the same tensors: ["norm"], or ["layernorm"] for the layers' norms
    for old in (["norm"], ["layernorm"]):  # "layernorm" now names nothing at all
        config["modules_to_save"] = old
        config_path.write_text(json.dumps(config))
        with pytest.raises(ValueError, match=r"chose 4 module\(s\) by a plain name suffix.*Add 'input_layernorm', "
                                             r"'post_attention_layernorm' to modules_to_save in its adapter_config"):
            lora.load_adapter(copy.deepcopy(base), tmp_path / "old")
    config["modules_to_save"] = ["norm", "input_layernorm", "post_attention_layernorm"]  # as the message says
    config_path.write_text(json.dumps(config))
    loaded = copy.deepcopy(base)
    lora.load_adapter(loaded, tmp_path / "old")
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ours(ids).logits)


def test_the_old_rule_hint_names_only_what_the_file_holds():
    """An old entry "1.input_layernorm" chose layers 1 and 11 of 12; adding "input_layernorm" would ask for all 12
    (and fail on the 10 the file lacks), so the message gives the full name of the one the rule no longer picks."""
    candidates = [(f"model.layers.{i}.{norm}", None) for i in range(12)
                  for norm in ("input_layernorm", "post_attention_layernorm")]
    keys = [f"{PREFIX}model.layers.{i}.input_layernorm.weight" for i in (1, 11)]
    keys.append(f"{PREFIX}model.layers.1.self_attn.q_proj.lora_A.weight")
    with pytest.raises(ValueError, match=r"chose 1 module\(s\).*Add 'model.layers.11.input_layernorm' to"):
        check_legacy_suffix_choice(["1.input_layernorm"], candidates, keys, PREFIX)
    check_legacy_suffix_choice(["input_layernorm"], candidates, keys, PREFIX)  # today's rule: nothing to say


def test_two_active_adapters_each_use_their_own_copies_as_peft(tmp_path):
    """Adapter a trains model.norm, adapter b the layers' input norms; both active: each module computes with the
    copy of the adapter that has one (PEFT's check_set_adapter), not the original. Two active copies of one
    module are refused, as PEFT refuses them."""
    base = tiny_llama()
    for name, saved in (("a", ["norm"]), ("b", ["input_layernorm"]), ("c", ["norm"])):
        model = copy.deepcopy(base)
        lora.inject_lora(model, lora.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                init_lora_weights=False, modules_to_save=saved))
        torch.manual_seed(len(name) + ord(name))
        with torch.no_grad():
            for p in (p for n, p in model.named_parameters() if "modules_to_save" in n):
                p.add_(0.05 * torch.randn_like(p))
        lora.save_adapter(model, tmp_path / name)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    ours = copy.deepcopy(base)
    lora.load_adapters(ours, [tmp_path / "a", tmp_path / "b"], adapter_names=["a", "b"])
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a", adapter_name="a")
    theirs.load_adapter(tmp_path / "b", adapter_name="b")
    theirs.base_model.set_adapter(["a", "b"])
    with torch.no_grad():
        out, ref = ours(ids).logits, theirs(input_ids=ids).logits
        only_a = copy.deepcopy(base)
        lora.load_adapters(only_a, [tmp_path / "a"], adapter_names=["a"])
        assert not torch.equal(out, only_a(ids).logits)  # b's norms count
    assert_rel_close(out, ref)
    untouched = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"adapters \['.*/a', '.*/c'\] each hold a trained copy of model.norm"):
        lora.load_adapters(untouched, [tmp_path / "a", tmp_path / "c"], adapter_names=["a", "c"])
    assert not lora.lora_layers(untouched)  # refused before anything was loaded
    with pytest.raises(ValueError, match=r"adapters \['a', 'c'\] each hold a trained copy of model.norm"):
        for name in ("a", "c"):  # one by one, then both activated
            lora.load_adapter(untouched, tmp_path / name, adapter_name=name)
        lora.set_adapter(untouched, ["a", "c"])
    with pytest.raises(ValueError, match="Only one adapter can be set at a time"):
        theirs.load_adapter(tmp_path / "c", adapter_name="c")
        theirs.base_model.set_adapter(["a", "c"])


def test_merge_and_unload_of_named_adapters_keeps_their_copy_as_peft(tmp_path):
    """Adapters a and b both train model.norm, a is active; merging b keeps b's copy (PEFT's
    unload_and_optionally_merge_module keeps the named adapter's copy, not the active one's)."""
    base = tiny_llama()
    for k, name in enumerate(("a", "b")):
        model = copy.deepcopy(base)
        lora.inject_lora(model, lora.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False,
                                                modules_to_save=["norm"]))
        with torch.no_grad():
            model.get_submodule("model.norm").modules_to_save["default"].weight.add_(0.1 * (k + 1))
        lora.save_adapter(model, tmp_path / name)
    ours = copy.deepcopy(base)
    lora.load_adapter(ours, tmp_path / "a", adapter_name="a")
    lora.load_adapter(ours, tmp_path / "b", adapter_name="b")
    lora.set_adapter(ours, ["a"])
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a", adapter_name="a")
    theirs.load_adapter(tmp_path / "b", adapter_name="b")
    merged, ref = lora.merge_and_unload(ours, adapter_names=["b"]), theirs.merge_and_unload(adapter_names=["b"])
    assert torch.equal(merged.model.norm.weight, ref.model.norm.weight)
    assert torch.equal(merged.model.norm.weight, base.model.norm.weight + 0.2)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_rel_close(merged(ids).logits, ref(input_ids=ids).logits)
