"""Oracle: GPTQModel (``gptqmodel``, the maintained successor of AutoGPTQ) packs and dequantizes our layers.

Skipped where gptqmodel is not installed, which is the project's default environment: every gptqmodel release
either requires torch >= 2.14.1 (7.4+, it would replace torch 2.13.0) or pins numpy==2.2.6 and pulls ~18
packages (7.3.6), and it imports torchvision, which has no CPU wheel for torch 2.13 on PyPI. See
docs/serving.md ("The checkpoint layout", Oracle) for how it was run once in a scratch environment.

GPTQModel keeps zero points in its "v2" form in memory (``qzeros`` hold the zero point itself) and converts v1
checkpoints on load by adding 1 to every packed field of each word. Checked here: its packer writes our
``qweight`` and v2 ``qzeros`` bit for bit; its torch dequantizer gives our fp16 weight bit for bit; and its
v1 -> v2 conversion turns our v1 ``qzeros`` into our v2 ones whenever no zero point is 0 (symmetric grids
always), the case its conversion cannot represent (documented in qlora/gptq_format.py).
"""

import pytest
import torch
from torch import nn

from finetune_ref.gptq.gptq import gptq_quantize, rtn_quantize
from finetune_ref.gptq.format import pack_gptq

gptqmodel = pytest.importorskip("gptqmodel")


def gptqmodel_layer(q, desc_act):
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    out_f, in_f = q.shape
    layer = TorchLinear(bits=q.bits, group_size=q.group_size, sym=False, desc_act=desc_act, in_features=in_f,
                        out_features=out_f, bias=False, pack_dtype=torch.int32)
    linear = nn.Linear(in_f, out_f, bias=False)
    linear.weight.data = q.dequantize(torch.float32)  # on the grid, so GPTQModel's rounding recovers our codes
    layer.pack_original(linear, scales=q.scales.t().contiguous(), zeros=q.zeros.t().to(torch.int32).contiguous(),
                        g_idx=q.g_idx.clone())
    return layer.eval()


@pytest.mark.parametrize("bits,act_order", [(4, False), (4, True), (8, False), (3, False), (2, True)])
def test_gptqmodel_packs_and_dequantizes_like_us(bits, act_order):
    torch.manual_seed(0)
    W = torch.randn(64, 128) * 0.02
    X = torch.randn(512, 128) @ torch.randn(128, 128)
    q = gptq_quantize(W, 2 * X.t() @ X / 512, bits, 32, act_order=act_order)
    ours = pack_gptq(q, "gptq_v2")
    layer = gptqmodel_layer(q, act_order)
    assert torch.equal(layer.qweight, ours["qweight"])
    assert torch.equal(layer.qzeros, ours["qzeros"])
    assert torch.equal(layer.scales, ours["scales"])
    from gptqmodel.nn_modules.qlinear import PackableQuantLinear

    dense = PackableQuantLinear.dequantize_weight(layer)  # (in, out), fp16: the generic torch path
    assert torch.equal(dense.t(), q.dequantize(torch.float16))


@pytest.mark.parametrize("sym", [True, False])
def test_gptqmodel_v1_to_v2_conversion(sym):
    from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module

    torch.manual_seed(1)
    W = torch.randn(64, 128) * 0.02
    if not sym:
        W[:8, :32] = W[:8, :32].abs()  # rows whose first group is all >= 0: zero point 0
    q = rtn_quantize(W, 4, 32, sym=sym)
    v1, v2 = pack_gptq(q, "gptq"), pack_gptq(q, "gptq_v2")
    layer = gptqmodel_layer(q, False)
    layer.qzeros.data = v1["qzeros"].clone()
    convert_gptq_v1_to_v2_format_module(layer, bits=4, pack_dtype=torch.int32)
    zero0 = (q.zeros == 0).any(dim=0)  # (out,) output channels with a zero point of 0 somewhere
    if sym:
        assert not bool(zero0.any())
        assert torch.equal(layer.qzeros, v2["qzeros"])
    else:
        # Words (8 output channels each) without a zero point of 0 convert exactly; the others carry into
        # the next field: the v1 limitation.
        words_ok = ~zero0.reshape(-1, 8).any(dim=1)  # (out / 8,)
        assert bool(words_ok.any()) and not bool(words_ok.all())
        assert torch.equal(layer.qzeros[:, words_ok], v2["qzeros"][:, words_ok])
        assert not torch.equal(layer.qzeros[:, ~words_ok], v2["qzeros"][:, ~words_ok])


@pytest.mark.parametrize("sym,desc_act", [(True, False), (True, True), (False, False)])
def test_gptqmodel_loads_our_directory(tmp_path, smollm2_dir, sym, desc_act):
    """A tiny Llama quantized and saved by us (v1 for symmetric, v2 for asymmetric grids: the defaults), loaded
    by ``GPTQModel.load`` with its torch kernel: same dequantized weights bitwise, logits within fp16 rounding
    of two attention implementations (ours and transformers')."""
    import shutil

    from gptqmodel import BACKEND, GPTQModel

    from finetune_ref.models.config import LlamaConfig
    from finetune_ref.models.llama import LlamaForCausalLM
    from finetune_ref.gptq.format import GPTQConfig
    from finetune_ref.gptq.linear import gptq_layers
    from finetune_ref.gptq.model import gptq_quantize_model
    from finetune_ref.gptq.checkpoint import load_gptq_model, save_gptq_model

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                         rms_norm_eps=1e-5)).eval()
    config = GPTQConfig(group_size=32, sym=sym, desc_act=desc_act)
    assert config.checkpoint_format == ("gptq" if sym else "gptq_v2")
    gptq_quantize_model(model, torch.randint(0, 128, (8, 32)), config)
    out = save_gptq_model(model, tmp_path / "m", config)  # dense tensors in fp16
    for name in ("tokenizer.json", "tokenizer_config.json"):  # GPTQModel.load also loads a tokenizer
        shutil.copy(smollm2_dir / name, out / name)
    ours = load_gptq_model(out, dtype=torch.float16)
    theirs = GPTQModel.load(str(out), backend=BACKEND.GPTQ_TORCH, device="cpu", dtype=torch.float16).model
    for name, layer in gptq_layers(ours):
        dense = theirs.get_submodule(name).dequantize_weight()  # (in, out)
        assert torch.equal(dense.t(), layer.dequantize(torch.float16)), name
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        a, b = ours(ids).logits.float(), theirs(ids).logits.float()
    assert (a - b).abs().max().item() <= 2e-3 * a.abs().max().item()
