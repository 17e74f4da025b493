"""Weighted combination of adapters and per-adapter scale against PEFT 0.22 on a tiny random Llama (GQA).

Both sides hold the same two (non-zero) adapters; ``add_weighted_adapter`` must give the same new A and B
(linear and cat: the same elementwise operations, compared within 1e-6 relative; svd: the same SVD call on the
same matrix, 1e-5 relative since singular vectors of near-equal singular values may rotate by rounding, so
there B A is compared). The combined adapter then gives PEFT's outputs."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from finetune_ref import lora  # noqa: E402
from finetune_ref.lora.combine import add_weighted_adapter, set_scale  # noqa: E402

PREFIX = "base_model.model."


def assert_rel_close(actual, expected, rel):
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= rel * expected.double().abs().max().item(), err


def models(r2=4):
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)).eval()
    c1 = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.1)
    c2 = dict(r=r2, lora_alpha=3, target_modules=["v_proj", "down_proj"], use_rslora=True)
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **c1), adapter_name="a")
    pm.add_adapter("b", peft.LoraConfig(init_lora_weights=False, **c2))
    ours = copy.deepcopy(base)
    lora.inject_lora(ours, lora.LoraConfig(**c1), "a")
    lora.inject_lora(ours, lora.LoraConfig(**c2), "b")
    theirs = {k.removeprefix(PREFIX): v for k, v in pm.state_dict().items() if ".lora_" in k}
    with torch.no_grad():
        for k, v in theirs.items():
            ours.get_parameter(k).copy_(v)
    return ours, pm


@pytest.mark.parametrize("combination, r2", [("linear", 4), ("cat", 2), ("svd", 2)])
def test_add_weighted_adapter_matches_peft(combination, r2):
    ours, pm = models(r2)
    weights = [0.7, -0.3]
    pm.add_weighted_adapter(["a", "b"], weights, "mix", combination_type=combination)
    add_weighted_adapter(ours, ["a", "b"], weights, "mix", combination_type=combination)
    peft_layers = {n: m for n, m in pm.base_model.model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    layers = dict(lora.lora_layers(ours))
    assert {n for n, layer in layers.items() if "mix" in layer.adapter_names} == \
        {n for n, m in peft_layers.items() if "mix" in m.lora_A}
    check_mix_matches_peft(ours, pm, combination.endswith("svd"))
    if combination == "cat":  # cat is exact: B A = sum w_i s_i B_i A_i
        for name, layer in layers.items():
            expected = sum(w * layer.get_delta_weight(a) for a, w in zip("ab", weights) if a in layer.adapter_names)
            assert_rel_close(layer.get_delta_weight("mix"), expected, 1e-5)


def check_mix_matches_peft(ours, pm, svd):
    """Adapter "mix": PEFT's rank, scaling 1 and dropout (the first adapter's), A and B within 1e-6 relative (svd:
    B A within 1e-5), and PEFT's logits with it active."""
    peft_layers = {n: m for n, m in pm.base_model.model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    for name, layer in lora.lora_layers(ours):
        ref = peft_layers[name]
        assert layer.r["mix"] == ref.r["mix"] and layer.scaling["mix"] == 1.0
        assert layer.lora_dropout["mix"] == ref.lora_dropout["mix"].p == 0.1
        if svd:
            assert_rel_close(layer.get_delta_weight("mix"), ref.get_delta_weight("mix"), 1e-5)
        else:
            assert_rel_close(layer.lora_A["mix"].weight, ref.lora_A["mix"].weight, 1e-6)
            assert_rel_close(layer.lora_B["mix"].weight, ref.lora_B["mix"].weight, 1e-6)
    lora.set_adapter(ours, "mix")
    pm.base_model.set_adapter("mix")
    pm.eval()  # get_peft_model leaves the model in training mode (adapter a has dropout)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_rel_close(ours(ids).logits, pm(input_ids=ids).logits, 1e-5)


def test_set_scale_is_peft_set_scale_and_rslora_aware():
    ours, pm = models()
    lora.set_adapter(ours, ["a", "b"])
    pm.base_model.set_adapter(["a", "b"])
    pm.eval()
    for _, m in pm.base_model.model.named_modules():
        if isinstance(m, peft.tuners.lora.LoraLayer):
            m.set_scale("b", 0.25)
    set_scale(ours, "b", 0.25)
    layer = dict(lora.lora_layers(ours))["model.layers.0.self_attn.v_proj"]
    assert layer.scaling["b"] == 0.25 * 3 / 2.0  # rsLoRA: alpha / sqrt(r)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_rel_close(ours(ids).logits, pm(input_ids=ids).logits, 1e-6)
    set_scale(ours, "b", 1)
    assert layer.scaling["b"] == 3 / 2.0


def test_bad_combinations_are_refused():
    ours, _ = models(r2=2)
    with pytest.raises(ValueError, match="one rank"):
        add_weighted_adapter(ours, ["a", "b"], [0.5, 0.5], "mix", combination_type="linear")
    with pytest.raises(ValueError, match="one weight per adapter"):
        add_weighted_adapter(ours, ["a", "b"], [0.5], "mix")
    with pytest.raises(ValueError, match="unknown adapter"):
        add_weighted_adapter(ours, ["a", "zz"], [0.5, 0.5], "mix")
    with pytest.raises(ValueError, match="combination"):
        add_weighted_adapter(ours, ["a", "b"], [0.5, 0.5], "mix", combination_type="ties")


PRUNED = ["ties", "dare_linear", "dare_ties", "magnitude_prune"]


@pytest.mark.parametrize("combination, sign_method", [(c, "total") for c in PRUNED + [f"{c}_svd" for c in PRUNED]]
                         + [(c, "frequency") for c in ("ties", "dare_ties", "ties_svd")])
def test_ties_dare_magnitude_prune_match_peft(combination, sign_method, monkeypatch):
    """The same elementwise operations on the same tensors: A and B within 1e-6 relative (the _svd forms: B A
    within 1e-5, as "svd"). DARE's masks are random, and PEFT draws them from the global generator after making
    the new adapter's layers (which draw too, differently from ours): PEFT's torch.bernoulli is given a generator
    with the seed ours gets, so equal results mean the same masks drawn in the same order (per layer the A's,
    then the B's; the _svd forms one per update)."""
    ours, pm = models(r2=4)
    weights, density = [0.7, -0.3], 0.5
    bernoulli, masks = torch.bernoulli, torch.Generator().manual_seed(7)
    with monkeypatch.context() as m:
        m.setattr(torch, "bernoulli", lambda p: bernoulli(p, generator=masks))
        pm.add_weighted_adapter(["a", "b"], weights, "mix", combination_type=combination, density=density,
                                majority_sign_method=sign_method)
    add_weighted_adapter(ours, ["a", "b"], weights, "mix", combination_type=combination, density=density,
                         majority_sign_method=sign_method, generator=torch.Generator().manual_seed(7))
    check_mix_matches_peft(ours, pm, combination.endswith("_svd"))


def test_pruning_functions_by_hand():
    from finetune_ref.lora.combine import majority_sign_mask, merge_task_tensors

    a, b = torch.tensor([3.0, -1.0, 0.5, -4.0]), torch.tensor([-2.0, -2.0, 1.0, 1.0])
    w = torch.tensor([1.0, 1.0])
    # magnitude_prune at density 0.5: a keeps 3, -4; b keeps two of its |2|'s (topk)
    assert torch.equal(merge_task_tensors("magnitude_prune", [a, a], w, 0.5), torch.tensor([6.0, 0, 0, -8.0]))
    # TIES "total": elected sign of the sum (1, -3, 1.5, -3); disjoint mean of the agreeing entries
    assert torch.equal(majority_sign_mask(torch.stack([a, b]), "total"),
                       torch.tensor([[True, True, True, True], [False, True, True, False]]))
    assert torch.equal(merge_task_tensors("ties", [a, b], w, 1.0), torch.tensor([3.0, -1.5, 0.75, -4.0]))
    # "frequency": ties of the count go to +
    assert torch.equal(majority_sign_mask(torch.stack([a, b]), "frequency"),
                       torch.tensor([[True, True, True, False], [False, True, True, True]]))
    # DARE keeps each entry with probability density and rescales: unbiased; density 1 keeps all
    x = torch.ones(20000)
    kept = merge_task_tensors("dare_linear", [x], torch.tensor([1.0]), 0.25, generator=torch.Generator().manual_seed(0))
    assert set(kept.unique().tolist()) == {0.0, 4.0} and abs(kept.mean().item() - 1) < 0.05
    assert torch.equal(merge_task_tensors("dare_ties", [a, b], w, 1.0), merge_task_tensors("ties", [a, b], w, 1.0))


def test_pruning_options_are_checked():
    ours, _ = models()
    for kwargs, match in [(dict(combination_type="ties"), "needs a density"),
                          (dict(combination_type="ties", density=0.0), r"\(0, 1\]"),
                          (dict(combination_type="dare_linear", density=1.5), r"\(0, 1\]"),
                          (dict(combination_type="linear", density=0.5), "density applies to"),
                          (dict(combination_type="ties", density=0.5, majority_sign_method="mean"), "total")]:
        with pytest.raises(ValueError, match=match):
            add_weighted_adapter(ours, ["a", "b"], [0.5, 0.5], "mix", **kwargs)
    ours, _ = models(r2=2)
    with pytest.raises(ValueError, match="one rank"):
        add_weighted_adapter(ours, ["a", "b"], [0.5, 0.5], "mix", combination_type="dare_ties", density=0.5)
