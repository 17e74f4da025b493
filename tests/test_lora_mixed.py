"""Mixed-adapter batches (lora/mixed.py): each row gets exactly its own adapter's output.

Oracles: PEFT 0.22's ``adapter_names`` forward on the same tiny random transformers Llama with the same adapter
weights, and running each row alone with its adapter active (or adapters disabled for a "__base__" row).
Tolerance, fp32: max|ours - oracle| <= 1e-5 * max|oracle| over the whole logits tensor (the gathered batched
matmul sums in another order than F.linear; seen: 3e-7 against PEFT, up to 8e-7 against rows alone). Adapters:
ranks 2, 4 and 8, one rsLoRA, one on q/v only, all with B != 0; dense and NF4 bases.
"""

import copy

import pytest
import torch

from finetune_ref import lora
from finetune_ref.lora.mixed import (clear_row_adapters, lora_bgmv, lora_sgmv, row_adapters, set_row_adapters,
                                     stack_adapters)

pytestmark = pytest.mark.usefixtures("one_thread")

ADAPTERS = {  # name -> LoraConfig fields: different ranks, rsLoRA and not, different targets
    "alpha": dict(r=2, lora_alpha=5, target_modules="all-linear"),
    "beta": dict(r=8, lora_alpha=4, use_rslora=True, target_modules="all-linear"),
    "gamma": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
}
ROWS = ["beta", "__base__", "alpha", "gamma", "alpha"]


def assert_rel_close(actual, expected, rel=1e-5):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3e} > {rel:.0e} * {scale:.3e}"


def ids(rows=len(ROWS), T=7, vocab=128, seed=1):
    return torch.randint(0, vocab, (rows, T), generator=torch.Generator().manual_seed(seed))


def add_adapters(model):
    """Our three adapters on ``model`` with random non-zero A and B (init_lora_weights=False)."""
    for name, fields in ADAPTERS.items():
        lora.inject_lora(model, lora.LoraConfig(init_lora_weights=False, **fields), adapter_name=name)
    return model.eval()


def each_row_alone(model, input_ids, names):
    out = []
    for row, name in zip(input_ids, names):
        if name == "__base__":
            with lora.disable_adapters(model):
                out.append(model(row[None]).logits)
        else:
            lora.set_adapter(model, name)
            out.append(model(row[None]).logits)
    return torch.cat(out)


def test_bgmv_equals_sgmv_with_different_ranks():
    g = torch.Generator().manual_seed(0)
    As = [torch.randn(r, 24, generator=g) for r in (2, 8, 5)]
    Bs = [torch.randn(16, r, generator=g) for r in (2, 8, 5)]
    scalings = [0.5, 3.0, 1.25]
    x = torch.randn(6, 3, 24, generator=g)
    indices = torch.tensor([2, -1, 0, 1, 2, -1])
    A, B = stack_adapters(As, Bs)
    assert A.shape == (3, 8, 24) and B.shape == (3, 16, 8)
    got = lora_bgmv(x, A, B, torch.tensor(scalings), indices)
    want = lora_sgmv(x, As, Bs, scalings, indices)
    assert_rel_close(got, want)
    assert (got[indices == -1] == 0).all()
    for b, i in enumerate(indices.tolist()):  # each row: the plain LoRA formula with its own adapter
        if i >= 0:
            assert_rel_close(got[b], lora.lora_forward(x[b], As[i], Bs[i], scalings[i]))


def test_mixed_batch_equals_peft_adapter_names():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)).eval()
    ours = add_adapters(copy.deepcopy(base))
    pm = None
    for name, fields in ADAPTERS.items():
        config = peft.LoraConfig(init_lora_weights=False, **fields)
        if pm is None:
            pm = peft.get_peft_model(copy.deepcopy(base), config, adapter_name=name)
        else:
            pm.add_adapter(name, config)
    theirs = {k.removeprefix("base_model.model."): v for k, v in pm.state_dict().items() if ".lora_" in k}
    assert set(theirs) == {k for k in ours.state_dict() if ".lora_" in k}
    with torch.no_grad():
        for k, v in theirs.items():
            ours.get_parameter(k).copy_(v)
    pm.eval()
    x = ids()
    with torch.no_grad():
        want = pm(input_ids=x, adapter_names=ROWS).logits
        with row_adapters(ours, ROWS):
            got = ours(x).logits
    assert_rel_close(got, want)


@pytest.mark.parametrize("quantize", [False, True], ids=["dense", "nf4"])
def test_mixed_batch_equals_each_row_alone(quantize):
    from finetune_ref.models.config import LlamaConfig
    from finetune_ref.models.llama import LlamaForCausalLM
    from finetune_ref.qlora.model import quantize_model

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    if quantize:
        quantize_model(model, compute_dtype=torch.float32)  # fp32 compute: the tolerance is fp32's
    add_adapters(model)
    x = ids()
    with torch.no_grad():
        set_row_adapters(model, ROWS)
        got = model(x).logits
        # A new composition reuses the stacked adapters and still gives each row its own.
        set_row_adapters(model, ROWS[::-1])
        got_reversed = model(x.flip(0)).logits
        clear_row_adapters(model)
        want = each_row_alone(model, x, ROWS)
    assert_rel_close(got, want)
    assert_rel_close(got_reversed, want.flip(0))
    # the rows really differ: every adapter changes the output
    for i in range(1, len(ROWS)):
        if ROWS[i] != ROWS[0]:
            assert not torch.allclose(want[0], want[i])


def test_bad_row_adapters_are_refused():
    from finetune_ref.models.config import LlamaConfig
    from finetune_ref.models.llama import LlamaForCausalLM

    model = add_adapters(LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=48,
                                                      num_hidden_layers=1, num_attention_heads=4,
                                                      num_key_value_heads=2)))
    with pytest.raises(ValueError, match="unknown adapter.*'nope'"):
        set_row_adapters(model, ["alpha", "nope"])
    with pytest.raises(TypeError, match="one name per row"):
        set_row_adapters(model, "alpha")
    with pytest.raises(ValueError, match="rows but 2 row adapters"), torch.no_grad():
        set_row_adapters(model, ["alpha", "beta"])
        model(ids(3, vocab=32))
    clear_row_adapters(model)
    model.train()
    with pytest.raises(ValueError, match="inference"):
        set_row_adapters(model, ["alpha"])
    model.eval()
    lora.set_adapter(model, "alpha")
    lora.merge_adapters(model, untie_tied=True)
    with pytest.raises(ValueError, match="merged"):
        set_row_adapters(model, ["alpha", "beta"])
