"""The whole model against transformers, and one training step against transformers + PEFT (+ bitsandbytes).

* logits and loss of the same checkpoint (a tiny random Llama with GQA saved to disk, and the real default
  model on one short window of real text), loaded by ``models.loader.load_model`` and by transformers;
* one LoRA step: the same adapter weights (PEFT's, copied into ours), the same batch, AdamW on both sides
  (ours: ``optim.AdamW``; theirs: ``torch.optim.AdamW(foreach=False)``, the loop PEFT users run): the loss,
  the adapter gradients and the adapter update (each concatenated over all adapter tensors). AdamW's first
  update is lr * g / (|g| + eps) per element, about lr * sign(g): a gradient that is ~0 on both sides may
  flip its sign, so a non-bitwise gradient shows in the update as elements moved by up to 2 lr.
* one QLoRA step: the same, on NF4 + double quantization (ours: ``qlora.model.load_quantized``; theirs:
  transformers' 4-bit load through bitsandbytes) computing in the model dtype; once with every in_features a multiple of
  64, and once with an MLP width of 96, the edge class where bitsandbytes' native CPU dequantize is wrong.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from finetune_ref.lora import LoraConfig, inject_lora
from finetune_ref.models.loader import load_model
from finetune_ref.optim import AdamW
from finetune_ref.parity import oracles
from finetune_ref.parity.metrics import divergence, dtype_name
from finetune_ref.parity.report import Row, make_row

HYPER = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
LORA = dict(r=4, lora_alpha=8, target_modules="all-linear")


def _batch(vocab: int, seed: int = 3):
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(seed))  # (batch, tokens)
    labels = ids.clone()
    labels[0, :5] = -100  # positions without loss
    return ids, labels


def _logit_rows(ours, theirs, ids, labels, case: str) -> list[Row]:
    """The dtype column is the model's (the loss itself is fp32 on both sides)."""
    with torch.no_grad():
        out, ref = ours(ids, labels=labels), theirs(input_ids=ids, labels=labels)
    name = dtype_name(ref.logits.dtype)
    return [make_row("model.logits", case, "transformers", name, divergence(out.logits, ref.logits)),
            make_row("model.loss", case, "transformers", name, divergence(out.loss, ref.loss))]


def _adapters(model) -> dict[str, torch.Tensor]:
    return {n.removeprefix(oracles.PEFT_PREFIX): p.detach().clone() for n, p in model.named_parameters()
            if p.requires_grad}


def _step(model, opt, ids, labels, ours: bool):
    """Loss, adapter gradients and adapter update of one step, each over all adapter tensors (sorted names)."""
    before = _adapters(model)
    model.train()
    loss = model(ids, labels=labels).loss if ours else model(input_ids=ids, labels=labels).loss
    loss.backward()
    named = {n.removeprefix(oracles.PEFT_PREFIX): p for n, p in model.named_parameters() if p.requires_grad}
    grads = torch.cat([named[k].grad.reshape(-1) for k in sorted(named)])  # (n,)
    opt.step()
    after = _adapters(model)
    update = torch.cat([(after[k].float() - before[k].float()).reshape(-1) for k in sorted(before)])  # (n,)
    return loss.detach(), grads, update


def _step_rows(prefix, case, peer, dtype, ours, theirs, ids, labels) -> list[Row]:
    oracles.copy_peft_adapter_into(ours, theirs)
    params = [p for p in ours.parameters() if p.requires_grad]
    mine = _step(ours, AdamW(params, **HYPER), ids, labels, True)
    ref_params = [p for p in theirs.parameters() if p.requires_grad]
    ref = _step(theirs, torch.optim.AdamW(ref_params, foreach=False, **HYPER), ids, labels, False)
    name = dtype_name(dtype)
    return [make_row(f"{prefix}.{what}", case, peer, name, divergence(a, b))
            for what, a, b in zip(("loss", "adapter_grads", "adapter_update"), mine, ref)]


def check_tiny_model(peers: set[str], dtype: torch.dtype) -> list[Row]:
    """Logits/loss and a LoRA step (transformers, peft) and a QLoRA step (peft + bnb) on a tiny random Llama."""
    rows = []
    for intermediate in (128, 96):  # 96: in_features of down_proj in bitsandbytes' CPU dequantize edge class
        hf = oracles.tiny_hf_llama(kv_heads=2, intermediate=intermediate, rms_norm_eps=1e-5)
        ids, labels = _batch(hf.config.vocab_size)
        case = f"tiny llama h64 i{intermediate} l2 gqa 4/2"
        with tempfile.TemporaryDirectory() as tmp:
            hf.save_pretrained(tmp)
            if intermediate == 128:
                # from_pretrained in the dtype, as users load it (``.to(bf16)`` would also round RoPE's inv_freq)
                theirs = oracles.hf_llama(tmp, dtype)
                rows += _logit_rows(load_model(tmp, dtype), theirs, ids, labels, case)
                if "peft" in peers:
                    ours = load_model(tmp, dtype)
                    inject_lora(ours, LoraConfig(**LORA))
                    rows += _step_rows("step.lora", f"{case} r4 all-linear", "peft", dtype, ours,
                                       oracles.peft_lora(theirs, **LORA), ids, labels)
            if {"peft", "bnb"} <= peers:
                from finetune_ref.qlora.model import load_quantized

                ours = load_quantized(tmp, compute_dtype=dtype, dtype=dtype)
                inject_lora(ours, LoraConfig(**LORA))
                theirs = oracles.peft_lora(oracles.hf_4bit(tmp, dtype, dtype), copy_base=False, **LORA)
                prefix = "step.qlora" if intermediate % 64 == 0 else "step.qlora_bnb_edge"
                rows += _step_rows(prefix, f"{case} nf4+dq r4", "peft+bnb", dtype, ours, theirs, ids, labels)
    return rows


def check_real_model(model_dir: Path, dtype: torch.dtype, tokens: int = 32) -> list[Row]:
    """Logits and loss of the real model on the first ``tokens`` tokens of Python's "naming" reference topic."""
    from pydoc_data.topics import topics

    from finetune_ref.models.tokenizer import Tokenizer

    ids = torch.tensor([Tokenizer.from_dir(model_dir).encode(topics["naming"])[:tokens]])  # (1, tokens)
    ours = load_model(model_dir, dtype)
    theirs = oracles.hf_llama(model_dir, dtype)
    return _logit_rows(ours, theirs, ids, ids.clone(), f"{Path(model_dir).name} {tokens} tokens")
