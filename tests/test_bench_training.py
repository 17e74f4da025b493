"""The memory proposals measured by benchmarks/bench_training.py keep the numerics and lower the peak.

They are candidate changes to models/llama.py, applied there by monkeypatching one model instance:
``swiglu`` must give bitwise the same loss and gradients; ``gqa-sdpa`` bitwise the same loss, and gradients up to
fp32 summation order (the kernel sums the grouped heads' k/v gradients itself), as ``fused-ce`` (which sums the
loss per chunk); together they must lower the measured peak of a training step.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

from finetune_ref.train.memory_tracker import TensorMemoryTracker
from finetune_ref.models.config import LlamaConfig
from finetune_ref.models.llama import LlamaForCausalLM

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_training.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_training", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.usefixtures("one_thread")


def loss_and_grads(model, ids, labels):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("tied", [True, False])
def test_proposals_keep_loss_and_gradients(bench, tied):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config).train()
    ids = torch.randint(0, 300, (2, 40))
    labels = ids.clone()
    labels[0, :7] = -100  # ignored positions must stay ignored
    ref_loss, ref_grads = loss_and_grads(model, ids, labels)
    for names, exact in ((("gqa-sdpa",), False), (("swiglu",), True), (("fused-ce",), False),
                         (bench.PROPOSALS, False)):
        bench.apply_proposals(model, names)
        loss, grads = loss_and_grads(model, ids, labels)
        if exact:
            assert torch.equal(loss, ref_loss), names
            assert all(torch.equal(grads[n], ref_grads[n]) for n in grads), names
        else:  # fp32 summation order: the fused loss sums per chunk; the GQA kernel sums its heads' dk, dv
            torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
            for n in grads:
                torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-5, atol=1e-7, msg=n)
    bench.apply_proposals(model, ())
    assert "forward" not in model.__dict__  # switched off again: the class's forward


def test_proposals_lower_the_peak(bench):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=16)
    model = LlamaForCausalLM(config).train()
    ids = torch.randint(0, 4096, (2, 600))
    peaks = {}
    for names in ((), bench.PROPOSALS):
        bench.apply_proposals(model, names)
        with TensorMemoryTracker() as tracker:
            tracker.track(model, ids)
            model(input_ids=ids, labels=ids).loss.backward()
        peaks[names] = tracker.peak
        model.zero_grad(set_to_none=True)
    # 1198 x 4096 fp32 logits: ~20 MB per copy, and the loss chain keeps 4 of them at once; chunks of 256
    # tokens keep ~4 MB each.
    assert peaks[bench.PROPOSALS] < 0.5 * peaks[()]
