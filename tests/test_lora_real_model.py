"""LoRA on the real SmolLM2-135M-Instruct (30 layers, hidden 576, GQA 9/3 heads, tied embeddings).

Checks, on 64 tokens of English prose: the trainable-parameter count of r=8 "all-linear"; that a fresh adapter
(B = 0) leaves the logits bitwise unchanged; that a few AdamW steps lower the loss; that the saved adapter,
loaded by PEFT into transformers' own Llama, gives our logits (two model implementations: max|diff| <=
1e-4 * max|logits|); and that the merged model gives the unmerged logits (1e-5 relative, fp32).
"""

import pytest
import torch

from finetune_ref import lora

pytestmark = pytest.mark.real_model

# Per layer, r * (in + out) for q (576->576), k (576->192), v (576->192), o (576->576), gate/up (576->1536),
# down (1536->576).
SMOLLM2_IN_PLUS_OUT = 1152 + 768 + 768 + 1152 + 2112 + 2112 + 2112


def assert_rel_close(actual, expected, rel):
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3e} > {rel:.0e} * {scale:.3e}"


def test_lora_on_smollm2_trains_saves_loads_in_peft_and_merges(smollm2_dir, pydoc_text_window, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from finetune_ref.models.loader import load_model

    torch.manual_seed(0)
    ids = pydoc_text_window[:, :64]  # (1, 64): enough to see training, cheap on 2 cores
    model = load_model(smollm2_dir, dtype=torch.float32)
    with torch.no_grad():
        base_logits = model(ids).logits
    names = lora.inject_lora(model, lora.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    assert len(names) == 30 * 7 and "lm_head" not in names
    trainable, total = lora.trainable_parameters(model)
    assert trainable == 30 * 8 * SMOLLM2_IN_PLUS_OUT == 2_442_240
    assert total == 134_515_008 + trainable  # tied embedding counted once
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base_logits)

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0] - 0.05, losses
    model.eval()
    with torch.no_grad():
        ours = model(ids).logits

    lora.save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(smollm2_dir))
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    theirs_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = theirs_model(input_ids=ids).logits
    assert_rel_close(theirs, ours, rel=1e-4)

    merged = lora.merge_and_unload(model)
    with torch.no_grad():
        assert_rel_close(merged(ids).logits, ours, rel=1e-5)
