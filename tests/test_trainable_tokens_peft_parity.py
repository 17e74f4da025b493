"""``trainable_token_indices`` (``lora.trainable_tokens``) against PEFT 0.22's TrainableTokensLayer on tiny random
Llamas (GQA), untied and tied (the tied lm_head wrapped with the same rows, as PEFT does): logits, loss and every
trainable gradient within 1e-6 relative (the same operations); the rows start at the embedding's values; files
both ways; merged = unmerged (bitwise: merging copies rows); unmerge restores E bitwise; refusals by name."""

import copy

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from peft_oracle import assert_rel_close, tiny_hf_llama  # noqa: E402

from finetune_ref import lora  # noqa: E402
from finetune_ref.lora.peft_format import ADAPTER_WEIGHTS_NAME  # noqa: E402
from finetune_ref.lora.trainable_tokens import TrainableTokensLayer  # noqa: E402

PREFIX = "base_model.model."
TOKENS = [1, 5, 17, 90]
IDS = torch.tensor([[1, 2, 5, 17, 3, 90, 4, 5], [0, 17, 17, 6, 1, 7, 8, 9]])


def tiny_llama(tie=False):
    return tiny_hf_llama(tie)



def pair(tie=False, tokens=TOKENS):
    base = tiny_llama(tie)
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], trainable_token_indices=tokens)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **kwargs))
    ours = copy.deepcopy(base)
    lora.inject_lora(ours, lora.LoraConfig(**kwargs))
    assert torch.equal(ours.model.embed_tokens.trainable_tokens_delta["default"],
                       base.model.embed_tokens.weight[TOKENS])  # the rows start at their values
    theirs = {n.replace(".token_adapter", ""): p for n, p in pm.named_parameters()}
    torch.manual_seed(3)
    with torch.no_grad():  # as if trained: the rows moved, the same on both sides
        for name, p in ours.named_parameters():
            if p.requires_grad:
                ref = theirs[PREFIX + name]
                p.copy_(ref if "lora_" in name else ref + 0.1 * torch.randn_like(ref))
                ref.copy_(p)
    return base, ours, pm


@pytest.mark.parametrize("tie", [False, True])
def test_outputs_loss_and_every_trainable_gradient_match_peft(tie):
    _, ours, pm = pair(tie)
    assert isinstance(ours.lm_head, TrainableTokensLayer) == tie
    out, ref = ours(IDS, labels=IDS), pm(input_ids=IDS, labels=IDS)
    assert_rel_close(out.logits, ref.logits)
    assert_rel_close(out.loss, ref.loss)
    out.loss.backward()
    ref.loss.backward()
    g = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    g_ref = {n.removeprefix(PREFIX).replace(".token_adapter", ""): p.grad
             for n, p in pm.named_parameters() if p.requires_grad}
    assert set(g) == set(g_ref) and "model.embed_tokens.trainable_tokens_delta.default" in g
    for k in g_ref:
        assert_rel_close(g[k], g_ref[k])
    assert lora.trainable_parameters(ours) == pm.get_nb_trainable_parameters()


@pytest.mark.parametrize("tie", [False, True])
def test_files_both_ways_merge_and_unmerge(tie, tmp_path):
    base, ours, pm = pair(tie)
    lora.save_adapter(ours, tmp_path / "ours")
    pm.save_pretrained(tmp_path / "peft")
    mine, theirs = load_file(tmp_path / "ours" / ADAPTER_WEIGHTS_NAME), load_file(tmp_path / "peft" / ADAPTER_WEIGHTS_NAME)
    assert set(mine) == set(theirs) and f"{PREFIX}model.embed_tokens.token_adapter.trainable_tokens_delta" in mine
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    loaded = copy.deepcopy(base)
    lora.load_adapter(loaded, tmp_path / "peft")
    with torch.no_grad():
        expected = pm(input_ids=IDS).logits
        assert_rel_close(back(input_ids=IDS).logits, expected)
        assert torch.equal(loaded(IDS).logits, ours(IDS).logits)
        with lora.disable_adapters(loaded):
            assert torch.equal(loaded(IDS).logits, base(IDS).logits)
        lora.merge_adapters(loaded)
        assert_rel_close(loaded(IDS).logits, expected, 1e-5)
        lora.unmerge_adapters(loaded)
        assert torch.equal(loaded.model.embed_tokens.weight, base.model.embed_tokens.weight)  # the originals back
        merged = lora.merge_and_unload(loaded)
        assert type(merged.model.embed_tokens) is torch.nn.Embedding and type(merged.lm_head) is torch.nn.Linear
        assert (merged.lm_head.weight is merged.model.embed_tokens.weight) == tie
        assert_rel_close(merged(IDS).logits, expected, 1e-5)


def test_dict_form_and_refusals():
    _, ours, _ = pair(tokens={"embed_tokens": TOKENS})
    assert ours.model.embed_tokens.token_indices == {"default": TOKENS}
    with pytest.raises(ValueError, match="outside the vocabulary"):
        lora.inject_lora(tiny_llama(), lora.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[96]))
    with pytest.raises(ValueError, match="repeats"):
        lora.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[3, 3])
    with pytest.raises(ValueError, match="not both"):
        lora.inject_lora(tiny_llama(), lora.LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"],
                                                       trainable_token_indices=[3]))
    model = tiny_llama()
    lora.inject_lora(model, lora.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[3, 4]))
    lora.inject_lora(model, lora.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[4, 5]), "b")
    lora.set_adapter(model, ["default", "b"])
    with pytest.raises(ValueError, match="disjoint"):
        model(IDS)
    from finetune_ref.lora.mixed import set_row_adapters

    with pytest.raises(ValueError, match="adapt an embedding"):
        set_row_adapters(model, ["default", "b"])
