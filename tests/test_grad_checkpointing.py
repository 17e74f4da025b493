"""Gradient (activation) checkpointing per decoder block: the same loss and gradients with it on and off
(fp32, 1e-5), for full fine-tuning, for LoRA with every base weight and the embeddings frozen, and with LoRA
dropout active (the recomputation replays the same dropout mask); fewer saved activations; same training."""

import pytest
import torch

from finetune_ref.train.data import BatchIterator, collate, pack_documents
from finetune_ref.train.config import TrainConfig
from finetune_ref.train.trainer import train
from finetune_ref.lora import LoraConfig, inject_lora
from finetune_ref.models.config import LlamaConfig
from finetune_ref.models.llama import LlamaForCausalLM

VOCAB = 64


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(layers=3, hidden=32):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden * 3 // 2,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        tie_word_embeddings=True))


def batch():
    """Two rows: packed documents (document_ids, restarted positions) and a shorter padded one."""
    packed = pack_documents([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16], [17, 18, 19]], 12, eos_token_id=2)[0]
    short = {k: v[:7].clone() for k, v in packed.items()}
    return collate([packed, short], pad_token_id=0)


def loss_and_grads(model, checkpointing, seed=123):
    model.model.gradient_checkpointing = checkpointing
    model.train()
    torch.manual_seed(seed)  # the same dropout masks in both runs
    out = model(**batch())
    out.loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), grads


def assert_same(model):
    loss_off, grads_off = loss_and_grads(model, False)
    loss_on, grads_on = loss_and_grads(model, True)
    torch.testing.assert_close(loss_on, loss_off, atol=1e-5, rtol=1e-5)
    assert grads_on.keys() == grads_off.keys() and grads_on
    for k in grads_off:
        torch.testing.assert_close(grads_on[k], grads_off[k], atol=1e-5, rtol=1e-5, msg=lambda m: f"{k}: {m}")
    return grads_on


def test_full_finetuning_gradients_equal():
    model = tiny_model()
    grads = assert_same(model)
    assert len(grads) == len(list(model.parameters()))  # every weight, the tied embedding included


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lora_with_frozen_base_and_embeddings_gradients_equal(dropout):
    model = tiny_model()
    inject_lora(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                                  init_lora_weights=False))
    assert not model.model.embed_tokens.weight.requires_grad  # the checkpointed blocks' input needs no grad
    grads = assert_same(model)
    assert grads and all("lora_" in k for k in grads)
    if dropout:
        # Dropout really is active: another seed gives other gradients (so equality above is not vacuous).
        model.model.gradient_checkpointing = False
        _, other = loss_and_grads(model, False, seed=7)
        assert any(not torch.allclose(other[k], grads[k]) for k in grads)


def saved_activation_bytes(model, checkpointing):
    """Bytes of tensors autograd keeps for backward (seen by saved-tensor hooks outside checkpointed blocks,
    plus the block inputs that non-reentrant checkpointing keeps instead)."""
    model.model.gradient_checkpointing = checkpointing
    model.train()
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    b = batch()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**b)
    total = sum(seen.values())
    if checkpointing:  # each block's input hidden state (B, T, hidden) fp32 stays alive for the recomputation
        total += len(model.model.layers) * b["input_ids"].numel() * model.config.hidden_size * 4
    out.loss.backward()
    return total


def test_checkpointing_stores_fewer_activations():
    model = tiny_model(layers=6, hidden=64)
    full = saved_activation_bytes(model, False)
    ckpt = saved_activation_bytes(model, True)
    assert ckpt < 0.5 * full, (ckpt, full)


def test_checkpointing_off_in_eval_and_same_training_trajectory():
    model = tiny_model()
    model.model.gradient_checkpointing = True
    model.eval()
    with torch.no_grad():
        logits = model(**batch()).logits
    model.model.gradient_checkpointing = False
    with torch.no_grad():
        torch.testing.assert_close(model(**batch()).logits, logits, atol=0, rtol=0)

    def run(flag):
        m = tiny_model()
        m.model.gradient_checkpointing = flag
        data = BatchIterator(pack_documents([list(range(3, 60))] * 4, 16, eos_token_id=2), 2, pad_token_id=0)
        train(m, data, TrainConfig(steps=3, lr=1e-3, warmup_steps=0, grad_accum=2, progress=False, precision="fp32",
                                   optimizer="adamw"))
        return m

    a, b = run(False), run(True)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, atol=1e-5, rtol=1e-5)
