"""QLoRA on the real SmolLM2-135M: quantize while loading, check size and quality, train a few steps.

Slow-ish (quantizing 210 linear layers dominates), so everything shares one quantized model. The full
comparison with LoRA (tokens/s, peak memory, held-out loss after 30 updates) is in docs/qlora.md.
"""

import pytest
import torch

from finetune_ref.train.data import BatchIterator, build_datasets, iter_batches
from finetune_ref.train.config import TrainConfig
from finetune_ref.train.evaluation import evaluate
from finetune_ref.train.trainer import train
from finetune_ref.lora import LoraConfig
from finetune_ref.models.loader import load_model
from finetune_ref.models.tokenizer import Tokenizer
from finetune_ref.qlora.model import nf4_layers, prepare_qlora_model, quantized_nbytes

pytestmark = pytest.mark.real_model

# NF4 costs SmolLM2 ~0.29 nats/token on this window (3.29 fp32 -> 3.58 NF4, bf16 or fp32 compute alike): a
# 135M model whose weights were already 4-bit (Q4_1) loses more than the 7B+ models of the QLoRA paper. A broken
# quantization (wrong nibble order, scale or layout) costs several nats.
NF4_VS_FP32_NLL = 0.4


def window_nll(model, ids):
    with torch.no_grad():
        return float(model(ids, labels=ids).loss)


def test_qlora_smollm2_quantizes_to_0516_bytes_keeps_quality_and_trains(smollm2_dir, pydoc_text_window, tmp_path):
    model = prepare_qlora_model(smollm2_dir, lora_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    layers = nf4_layers(model)
    assert len(layers) == 30 * 7 and all(layer.compute_dtype == torch.bfloat16 for _, layer in layers)
    size = quantized_nbytes(model)
    assert size["parameters"] == 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)
    assert size["bytes_per_parameter"] == pytest.approx(4.127 / 8, rel=0.01)

    nll_nf4 = window_nll(model, pydoc_text_window)  # adapters start as a no-op (B = 0)
    nll_fp32 = window_nll(load_model(smollm2_dir, dtype="fp32"), pydoc_text_window)
    assert abs(nll_nf4 - nll_fp32) < NF4_VS_FP32_NLL, (nll_nf4, nll_fp32)

    from pydoc_data.topics import topics

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(topics[k] for k in ("assert", "break", "continue", "pass", "del", "return",
                                                       "global", "if", "while", "for")))
    tokenizer = Tokenizer.from_dir(smollm2_dir)
    train_examples, held = build_datasets(tokenizer, corpus, seq_len=64, eval_fraction=0.2)
    eval_batches = list(iter_batches(held, 4, tokenizer.pad_token_id))
    before = evaluate(model, eval_batches)["loss"]
    codes = layers[0][1].weight.clone()
    torch.manual_seed(0)
    result = train(model, BatchIterator(train_examples, 4, tokenizer.pad_token_id, seed=1),
                   # bf16 adapters: precision "bf16" keeps fp32 master weights and moments in the optimizer.
                   TrainConfig(steps=6, lr=3e-3, warmup_steps=1, progress=False, precision="bf16", optimizer="adamw"),
                   eval_fn=lambda: evaluate(model, eval_batches))
    assert result["eval"]["loss"] < before, (before, result["eval"]["loss"])
    assert torch.equal(layers[0][1].weight, codes)  # the NF4 base never changes
