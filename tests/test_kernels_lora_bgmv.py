"""The Triton BGMV kernel (kernels/lora_bgmv.py) against its PyTorch definition ``lora.mixed.lora_bgmv``,
under Triton's interpreter; and a whole mixed batch through a model with the kernel as the layers' BGMV.

``TRITON_INTERPRET=1`` is set below, before the kernel module is first imported. Tolerances per dtype are
``kernel_testing.TOLERANCES`` (fp32 1e-4 abs / 1e-5 rel: summation order; fp16: one rounding of the output).
bf16 is not tested: the interpreter holds bf16 as raw bits (the kernel upcasts loads, but the comparison would
test the interpreter's casts). Shapes: ranks 1..16 mixed (padding), in/out not multiples of the blocks, rows
without an adapter (-1), T of 1 (decode) and 5 (prefill).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of a Triton kernel module

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="the Triton kernel tests need triton (pip install triton)")

from finetune_ref.kernels.backend import interpreter_enabled  # noqa: E402
from finetune_ref.kernels.lora_bgmv import lora_bgmv_triton  # noqa: E402
from finetune_ref.lora.mixed import lora_bgmv, stack_adapters  # noqa: E402
from kernel_testing import TOLERANCES  # noqa: E402

DEVICE = "cpu" if interpreter_enabled() else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is off and there is no CUDA device", allow_module_level=True)

pytestmark = pytest.mark.usefixtures("one_thread")


def _adapters(ranks, in_f, out_f, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    As = [torch.randn(r, in_f, generator=g) for r in ranks]
    Bs = [torch.randn(out_f, r, generator=g) for r in ranks]
    A, B = stack_adapters(As, Bs)
    scaling = torch.rand(len(ranks), generator=g) * 4
    return A.to(DEVICE, dtype), B.to(DEVICE, dtype), scaling.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("ranks, in_f, out_f", [((1, 16, 4), 70, 33), ((8,), 200, 130), ((2, 3, 5, 7), 9, 300)])
def test_kernel_equals_reference(ranks, in_f, out_f, T, dtype):
    A, B, scaling = _adapters(ranks, in_f, out_f, dtype)
    g = torch.Generator().manual_seed(1)
    indices = torch.tensor([len(ranks) - 1, -1, 0, *range(len(ranks))], device=DEVICE)
    x = torch.randn(len(indices), T, in_f, generator=g).to(DEVICE, dtype)
    got = lora_bgmv_triton(x, A, B, scaling, indices)
    # The definition in fp32 (the kernel accumulates in fp32), cast once to the output dtype.
    want = lora_bgmv(x.float(), A.float(), B.float(), scaling, indices).to(dtype)
    assert got.dtype == dtype and got.shape == (len(indices), T, out_f)
    torch.testing.assert_close(got, want, **TOLERANCES[dtype])
    assert (got[indices == -1] == 0).all()


def test_kernel_rejects_shapes_that_do_not_chain():
    A, B, scaling = _adapters((4,), 16, 8, torch.float32)
    with pytest.raises(ValueError, match="do not chain"):
        lora_bgmv_triton(torch.zeros(2, 1, 15, device=DEVICE), A, B, scaling, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="indices"):
        lora_bgmv_triton(torch.zeros(2, 1, 16, device=DEVICE), A, B, scaling, torch.zeros(3, dtype=torch.long))


def test_mixed_batch_through_the_kernel_equals_the_reference():
    from finetune_ref import lora
    from finetune_ref.lora.mixed import row_adapters
    from finetune_ref.models.config import LlamaConfig
    from finetune_ref.models.llama import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2)).to(DEVICE)
    for name, r in (("a", 2), ("b", 6)):
        lora.inject_lora(model, lora.LoraConfig(r=r, lora_alpha=4, target_modules="all-linear",
                                                init_lora_weights=False), adapter_name=name)
    model.eval()
    ids = torch.randint(0, 64, (3, 4), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    rows = ["b", None, "a"]
    with torch.no_grad():
        with row_adapters(model, rows):
            want = model(ids).logits
        with row_adapters(model, rows, bgmv=lora_bgmv_triton):
            got = model(ids).logits
    torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])
