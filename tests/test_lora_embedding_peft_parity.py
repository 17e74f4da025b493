"""LoRA on the input embedding (``lora.embedding``) against PEFT 0.22's ``lora.Embedding`` on tiny random Llamas
(GQA: 4 query, 2 KV heads), untied and tied (``ensure_weight_tying``). Same base, same factors: logits and loss
within 1e-6 relative (the same operations in the same order), every trainable gradient within 1e-6 relative
(tied: ours is the sum of PEFT's two storage-sharing Parameters' gradients, see lora/embedding.py); PEFT's init
bitwise for the same seed; files both ways; merged = unmerged; refusals by name."""

import copy

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from peft_oracle import assert_rel_close, tiny_hf_llama  # noqa: E402

from finetune_ref import lora  # noqa: E402
from finetune_ref.lora.embedding import LoRAEmbedding, TiedLoRAHead  # noqa: E402
from finetune_ref.lora.peft_format import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME  # noqa: E402

PREFIX = "base_model.model."
TARGETS = ["q_proj", "v_proj", "embed_tokens"]


def tiny_llama(tie=False, intermediate_size=96):
    return tiny_hf_llama(tie, intermediate_size=intermediate_size)



def pair(tie=False, targets=TARGETS, dropout=0.0):
    """PEFT and ours on copies of one base, with PEFT's random (init False) factors copied into ours."""
    base = tiny_llama(tie)
    kwargs = dict(r=4, lora_alpha=8, target_modules=targets, lora_dropout=dropout, ensure_weight_tying=tie)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **kwargs))
    ours = copy.deepcopy(base)
    lora.inject_lora(ours, lora.LoraConfig(**kwargs))
    theirs = dict(pm.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                p.copy_(theirs[PREFIX + name])
    return base, ours, pm


IDS = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))


def test_init_is_peft_bitwise_for_the_same_seed():
    base = tiny_llama()
    config = dict(r=4, lora_alpha=8, target_modules=["embed_tokens"])
    torch.manual_seed(7)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    torch.manual_seed(7)
    ours = copy.deepcopy(base)
    lora.inject_lora(ours, lora.LoraConfig(**config))
    emb, ref = ours.model.embed_tokens, pm.base_model.model.model.embed_tokens
    assert isinstance(emb, LoRAEmbedding)
    assert torch.equal(emb.lora_embedding_A["default"], torch.zeros(4, 96))  # A = 0, the opposite of Linear's B = 0
    assert torch.equal(emb.lora_embedding_A["default"], ref.lora_embedding_A["default"])
    assert torch.equal(emb.lora_embedding_B["default"], ref.lora_embedding_B["default"])
    with torch.no_grad():
        assert torch.equal(ours(IDS).logits, base(IDS).logits)  # a no-op at init


@pytest.mark.parametrize("tie", [False, True])
def test_outputs_loss_and_every_trainable_gradient_match_peft(tie):
    _, ours, pm = pair(tie)
    out, ref = ours(IDS, labels=IDS), pm(input_ids=IDS, labels=IDS)
    assert_rel_close(out.logits, ref.logits)
    assert_rel_close(out.loss, ref.loss)
    out.loss.backward()
    ref.loss.backward()
    g = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    g_ref = {n.removeprefix(PREFIX): p.grad for n, p in pm.named_parameters() if p.requires_grad}
    if tie:  # PEFT's head holds separate Parameters over the embedding's storage: A_head = B_e^T, B_head = A_e^T
        assert isinstance(ours.lm_head, TiedLoRAHead)
        g_ref["model.embed_tokens.lora_embedding_A.default"] += g_ref.pop("lm_head.lora_B.default.weight").T
        g_ref["model.embed_tokens.lora_embedding_B.default"] += g_ref.pop("lm_head.lora_A.default.weight").T
    assert set(g) == set(g_ref) and "model.embed_tokens.lora_embedding_A.default" in g
    for k in g_ref:
        assert_rel_close(g[k], g_ref[k])


def test_no_dropout_on_the_embedding_as_peft():
    _, ours, pm = pair(targets=["embed_tokens"], dropout=0.5)
    ours.train(), pm.train()
    assert_rel_close(ours(IDS).logits, pm(input_ids=IDS).logits)


@pytest.mark.parametrize("tie", [False, True])
def test_files_both_ways_and_merged_equals_unmerged(tie, tmp_path):
    base, ours, pm = pair(tie)
    lora.save_adapter(ours, tmp_path / "ours")
    pm.save_pretrained(tmp_path / "peft")
    mine, theirs = load_file(tmp_path / "ours" / ADAPTER_WEIGHTS_NAME), load_file(tmp_path / "peft" / ADAPTER_WEIGHTS_NAME)
    # PEFT also writes the base embedding (save_embedding_layers="auto"); everything we write is in its file, equal
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in mine and set(mine) < set(theirs)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert {k for k in theirs if k not in mine} <= {f"{PREFIX}model.embed_tokens.base_layer.weight",
                                                  f"{PREFIX}lm_head.base_layer.weight"}
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    loaded = copy.deepcopy(base)
    lora.load_adapter(loaded, tmp_path / "peft")
    with torch.no_grad():
        expected = pm(input_ids=IDS).logits
        assert_rel_close(back(input_ids=IDS).logits, expected)
        assert_rel_close(loaded(IDS).logits, expected)
        with lora.disable_adapters(loaded):
            assert torch.equal(loaded(IDS).logits, base(IDS).logits)
        lora.merge_adapters(loaded)
        assert_rel_close(loaded(IDS).logits, expected, 1e-5)
        big = loaded.model.embed_tokens.weight.abs().max()  # fp32: unmerge restores E up to rounding of E + dE
        lora.unmerge_adapters(loaded)
        assert_rel_close(loaded(IDS).logits, expected, 1e-5)
        err = (loaded.model.embed_tokens.weight - base.model.embed_tokens.weight).abs().max()
        assert err <= 2 * torch.finfo(torch.float32).eps * big
        merged = lora.merge_and_unload(loaded)
        assert type(merged.model.embed_tokens) is torch.nn.Embedding and type(merged.lm_head) is torch.nn.Linear
        assert (merged.lm_head.weight is merged.model.embed_tokens.weight) == tie
        assert_rel_close(merged(IDS).logits, expected, 1e-5)


def test_tied_embedding_without_ensure_weight_tying_and_dora_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="ensure_weight_tying"):
        lora.inject_lora(tiny_llama(tie=True), lora.LoraConfig(r=2, target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match="use_dora on an embedding"):
        lora.inject_lora(tiny_llama(), lora.LoraConfig(r=2, target_modules=["embed_tokens"], use_dora=True))
    with pytest.raises(ValueError, match="tied to"):
        lora.inject_lora(tiny_llama(tie=True), lora.LoraConfig(r=2, target_modules=["embed_tokens", "lm_head"],
                                                               ensure_weight_tying=True))


def test_combine_and_per_row_adapters_refuse_embedding_adapters_and_set_scale_reaches_them():
    from finetune_ref.lora.combine import add_weighted_adapter, set_scale
    from finetune_ref.lora.mixed import set_row_adapters

    _, ours, pm = pair()
    with pytest.raises(ValueError, match="adapt an embedding"):
        add_weighted_adapter(ours, ["default"], [1.0], "combined", "linear")
    with pytest.raises(ValueError, match="adapt an embedding"):
        set_row_adapters(ours, ["default", None])
    set_scale(ours, "default", 0.5)
    for _, m in pm.base_model.model.named_modules():
        if isinstance(m, peft.tuners.lora.LoraLayer):
            m.set_scale("default", 0.5)
    with torch.no_grad():
        assert_rel_close(ours(IDS).logits, pm(input_ids=IDS).logits)


@pytest.mark.parametrize("variant", ["lora_embedding", "trainable_tokens"])
def test_on_an_nf4_base_matches_peft_on_bitsandbytes(tmp_path, variant):
    """QLoRA: the embedding is not quantized, the linear layers are NF4 (the same bytes on both sides, see
    test_qlora_peft_parity.py); loss within 1e-6 relative, gradients rtol 1e-4 (bitsandbytes' 4-bit matmul)."""
    from finetune_ref.parity import oracles
    from finetune_ref.qlora.model import load_quantized

    # in_features multiples of 64: bitsandbytes' CPU dequantize is wrong otherwise (test_qlora_peft_parity.py)
    tiny_llama(tie=True, intermediate_size=128).save_pretrained(tmp_path)
    extra = (dict(target_modules=["q_proj", "v_proj", "embed_tokens"], ensure_weight_tying=True)
             if variant == "lora_embedding" else dict(target_modules=["q_proj", "v_proj"], trainable_token_indices=[1, 5]))
    torch.manual_seed(1)
    pm = peft.get_peft_model(oracles.hf_4bit(tmp_path, compute_dtype=torch.float32),
                             peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **extra))
    ours = load_quantized(tmp_path, compute_dtype=torch.float32, dtype=torch.float32)
    lora.inject_lora(ours, lora.LoraConfig(r=4, lora_alpha=8, **extra))
    theirs = {n.removeprefix(PREFIX).replace(".token_adapter", ""): p for n, p in pm.named_parameters()}
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                p.copy_(theirs[name] if "lora_" in name else theirs[name] + 0.1 * torch.randn_like(p))
                theirs[name].copy_(p)
    ours.train(), pm.train()
    out, ref = ours(IDS, labels=IDS), pm(input_ids=IDS, labels=IDS)
    assert_rel_close(out.loss, ref.loss)
    out.loss.backward()
    ref.loss.backward()
    g_ref = {n: p.grad for n, p in theirs.items() if p.requires_grad}
    if variant == "lora_embedding":  # the tied head's two Parameters in PEFT, one here (see above)
        g_ref["model.embed_tokens.lora_embedding_A.default"] += g_ref.pop("lm_head.lora_B.default.weight").T
        g_ref["model.embed_tokens.lora_embedding_B.default"] += g_ref.pop("lm_head.lora_A.default.weight").T
    g = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert set(g) == set(g_ref)
    for k in g:
        torch.testing.assert_close(g[k], g_ref[k], rtol=1e-4, atol=1e-6)
