"""LoftQ (Li et al. 2023, Algorithm 1) against PEFT 0.22's loop, and what it is for.

PEFT's ``loftq_init`` moves the weight to "cuda"/"xpu" unconditionally, so the oracle here runs its steps on the
CPU: bitsandbytes' NF4 (``quantize_4bit``/``dequantize_4bit``, blocksize 64, no double quantization, as PEFT's
``Params4bit(compress_statistics=False)``) and PEFT's own ``_low_rank_decomposition``. At scaling 1 (where PEFT's
A = R, B = L is right) A, B and the dequantized base must agree to fp32 rounding (1e-5 relative: the SVDs see the
same matrices; the NF4 bytes are compared exactly).
"""

import pytest
import torch

from finetune_ref.kernels.reference import dequantize_nf4
from finetune_ref.qlora.loftq import loftq_init


def assert_rel_close(actual, expected, rel):
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= rel * expected.double().abs().max().item(), err


def peft_loftq_on_cpu(weight, r, num_iter):
    """peft/utils/loftq_utils.py loftq_init's loop with compute_device = "cpu"."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft.utils.loftq_utils import _low_rank_decomposition

    res = weight.clone()
    for i in range(num_iter):
        q, state = bnb.functional.quantize_4bit(res, blocksize=64, compress_statistics=False, quant_type="nf4")
        deq = bnb.functional.dequantize_4bit(q, state)
        res = weight - deq
        out = _low_rank_decomposition(res, reduced_rank=r)
        if i + 1 == num_iter:
            break
        res = weight - out["L"] @ out["R"]
    return out["R"], out["L"], deq, q


@pytest.mark.parametrize("num_iter", [1, 3])
def test_loftq_matches_peft_loop_at_scaling_one(num_iter):
    torch.manual_seed(0)
    w = torch.randn(96, 128) * 0.05
    ref_A, ref_B, ref_deq, ref_q = peft_loftq_on_cpu(w, 4, num_iter)
    A, B, packed, state = loftq_init(w, r=4, scaling=1.0, num_iter=num_iter, blocksize=64, double_quant=False)
    assert torch.equal(packed.flatten(), ref_q.flatten())
    assert_rel_close(dequantize_nf4(packed, state, torch.float32), ref_deq, 1e-6)
    assert_rel_close(A, ref_A, 1e-5)
    assert_rel_close(B, ref_B, 1e-5)


def test_loftq_starts_closer_to_w_than_nf4_and_is_scaling_aware():
    torch.manual_seed(1)
    w = torch.randn(128, 256) * 0.02
    from finetune_ref.qlora.nf4 import quantize_nf4

    packed, state = quantize_nf4(w, blocksize=64, double_quant=True)
    nf4_error = (w - dequantize_nf4(packed, state, torch.float32)).norm()
    errors = []
    for num_iter in (1, 4):
        A, B, packed, state = loftq_init(w, r=16, scaling=2.0, num_iter=num_iter)  # s B A must be L R
        errors.append((w - dequantize_nf4(packed, state, torch.float32) - 2.0 * B @ A).norm())
    assert errors[0] < 0.95 * nf4_error and errors[1] <= errors[0] * 1.001, (nf4_error, errors)
    with pytest.raises(ValueError, match="num_iter"):
        loftq_init(w, r=2, scaling=1.0, num_iter=0)


def test_prepared_loftq_model_is_closer_to_the_dense_model_than_plain_qlora(tmp_path):
    from tiny_model_dir import make_model_dir

    from finetune_ref.lora import LoraConfig, lora_layers
    from finetune_ref.models.loader import load_model
    from finetune_ref.qlora.loftq import prepare_loftq_model
    from finetune_ref.qlora.model import nf4_layers, prepare_qlora_model

    model_dir, _ = make_model_dir(tmp_path, hidden=64)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    kwargs = dict(lora_config=config, compute_dtype=torch.float32, adapter_dtype=torch.float32, dtype=torch.float32)
    dense = load_model(model_dir, torch.float32)
    plain = prepare_qlora_model(model_dir, **kwargs)
    loftq = prepare_loftq_model(model_dir, num_iter=2, **kwargs)
    assert len(nf4_layers(loftq)) == len(nf4_layers(plain)) == len(lora_layers(loftq)) == 14
    assert all(layer.lora_B["default"].weight.abs().sum() > 0 for _, layer in lora_layers(loftq))
    ids = torch.randint(0, dense.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = dense(ids).logits
        err_plain = (plain(ids).logits - ref).abs().mean()
        err_loftq = (loftq(ids).logits - ref).abs().mean()
    assert err_loftq < 0.8 * err_plain, (err_loftq, err_plain)
