"""Fused q/k/v and gate/up over a frozen base, and the LoRA A's sharing an input (models/fused.py, lora/fused.py),
against the unfused model on tiny random Llamas.

Tolerances, and why they are not bitwise: a column block of one GEMM need not be bitwise the GEMM of that block
alone (the BLAS blocks and vectorises the wider matrix its own way), and in backward the input gradient is one
matmul instead of three matmuls and two additions, so sums are rounded in another order. fp32: logits and loss
within 1e-5 of max|unfused|, every trainable gradient within 1e-4 (the gradient of a 2-layer model, reordered sums).
bf16 (16-bit activations, fp32 adapters): rounding differences of 2^-8 grow through the layers, so each path is
compared with the same model run in fp32, and the fused path's error must stay within 1.5x the unfused one's
(plus 2^-8 of the scale): it is no less exact. Everything that is not arithmetic (state dicts, names, files,
merge, the stored NF4 bytes) is compared exactly.
"""

import copy

import pytest
import torch

from finetune_ref.lora import LoraConfig, inject_lora, merge_adapters, unmerge_adapters
from finetune_ref.lora.branch import shared_adapters
from finetune_ref.lora.fused import fuse_projections
from finetune_ref.models.checkpoint import SINGLE_FILE, save_model
from finetune_ref.models.config import LlamaConfig
from finetune_ref.models.fused import base_of
from finetune_ref.models.llama import LlamaForCausalLM
from finetune_ref.models.loader import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(kv_heads: int = 2, bias: bool = False) -> LlamaConfig:
    return LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=kv_heads, attention_bias=bias, mlp_bias=bias)


def lora_pair(dtype=torch.float32, kv_heads=2, targets="all-linear", dropout=0.0, bias=False):
    """(unfused, fused) copies of one tiny LoRA model with non-zero B (init_lora_weights=False)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(kv_heads, bias)).to(dtype)
    inject_lora(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets,
                                  init_lora_weights=False))
    model.train()
    fused = copy.deepcopy(model)
    fuse_projections(fused)
    return model, fused


def groups(model):
    return [m for m in model.modules() if getattr(m, "fused_projections", None) is not None]


def assert_stacked(model) -> None:
    """Every group's dense bases are views of its stacked weight (the fused path runs, not the fallback)."""
    found = groups(model)
    assert found
    for owner in found:
        group = owner.fused_projections
        assert group.stacked_weight(group.bases(owner)) is not None


def step(model, ids):
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out.logits, out.loss, grads


def rel_err(actual, expected) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@pytest.mark.parametrize("kv_heads", [2, 4])  # GQA (2 k/v heads for 4 query heads) and plain multi-head
@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj", "up_proj"]])
def test_fp32_outputs_loss_and_every_gradient_match_unfused(kv_heads, targets):
    model, fused = lora_pair(kv_heads=kv_heads, targets=targets)
    assert_stacked(fused)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    logits, loss, grads = step(model, ids)
    f_logits, f_loss, f_grads = step(fused, ids)
    assert rel_err(f_logits, logits) <= 1e-5 and rel_err(f_loss, loss) <= 1e-5
    assert grads.keys() == f_grads.keys() and grads
    for name in grads:
        assert rel_err(f_grads[name], grads[name]) <= 1e-4, name


def test_bf16_fused_is_as_exact_as_unfused_against_fp32():
    reference, _ = lora_pair(torch.float32)
    model, fused = lora_pair(torch.bfloat16)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    ref = step(reference, ids)
    unfused_run, fused_run = step(model, ids), step(fused, ids)
    assert_stacked(fused)
    for what, r, u, f in [("logits", ref[0], unfused_run[0], fused_run[0]), ("loss", ref[1], unfused_run[1], fused_run[1]),
                          *[(n, ref[2][n], unfused_run[2][n], fused_run[2][n]) for n in ref[2]]]:
        assert rel_err(f, r) <= 1.5 * rel_err(u, r) + 2 ** -8, what


def test_state_dict_names_counts_and_save_load_round_trip(tmp_path):
    model, fused = lora_pair()
    before, after = model.state_dict(), fused.state_dict()
    assert list(before) == list(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in fused.named_parameters()]
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in fused.parameters())
    # files: a whole model saved from the fused base is byte for byte the unfused one's (safetensors, HF names)
    torch.manual_seed(0)
    plain = LlamaForCausalLM(tiny_config()).requires_grad_(False)
    stacked = copy.deepcopy(plain)
    assert fuse_projections(stacked) == 4
    save_model(plain, tmp_path / "plain"), save_model(stacked, tmp_path / "stacked")
    assert (tmp_path / "plain" / SINGLE_FILE).read_bytes() == (tmp_path / "stacked" / SINGLE_FILE).read_bytes()
    reloaded = load_model(tmp_path / "stacked", torch.float32).requires_grad_(False)
    fuse_projections(reloaded)
    assert_stacked(reloaded)
    # load_state_dict copies into the views: the fused model takes new weights and stays fused
    torch.manual_seed(5)
    other, _ = lora_pair()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01 * torch.randn_like(p))
    fused.load_state_dict(other.state_dict())
    assert_stacked(fused)
    ids = torch.randint(0, 64, (2, 9))
    assert rel_err(fused(ids).logits, other(ids).logits) <= 1e-5


def test_to_bfloat16_restacks_and_stays_fused():
    model, fused = lora_pair()
    model, fused = model.to(torch.bfloat16), fused.to(torch.bfloat16)
    assert_stacked(fused)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fused.state_dict().values()))
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert rel_err(fused(ids).logits, model(ids).logits) <= 2 ** -6


def test_merge_and_unmerge_write_through_the_views():
    model, fused = lora_pair()
    model.eval(), fused.eval()
    merge_adapters(model), merge_adapters(fused)
    assert_stacked(fused)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fused.state_dict().values()))
    owner = fused.model.layers[0].self_attn
    q_rows = owner.fused_projections.weight[:32]
    assert torch.equal(q_rows, owner.q_proj.base_layer.weight)  # the merge reached the stacked tensor
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert rel_err(fused(ids).logits, model(ids).logits) <= 1e-5
    unmerge_adapters(model), unmerge_adapters(fused)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fused.state_dict().values()))


def test_nf4_base_fused_dequantize_matches_per_layer():
    from finetune_ref.qlora.model import quantize_model

    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_config())
    model = quantize_model(base, double_quant=True, compute_dtype=torch.float32)
    inject_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model.train()
    fused = copy.deepcopy(model)
    assert fuse_projections(fused) == 0  # nothing stacked in storage: NF4 dequantizes into a workspace per call
    calls = []
    attn = fused.model.layers[0].self_attn
    original = type(attn.q_proj.base_layer).dequantize_into
    type(attn.q_proj.base_layer).dequantize_into = lambda self, out: calls.append(out.shape) or original(self, out)
    try:
        ids = torch.randint(0, 64, (2, 9))
        logits, loss, grads = step(model, ids)
        f_logits, f_loss, f_grads = step(fused, ids)
    finally:
        type(attn.q_proj.base_layer).dequantize_into = original
    # 2 layers x (q, k, v, gate, up) forward, and again in backward, except layer 0's q/k/v: their input (the
    # normalised frozen embeddings) needs no gradient
    assert len(calls) == 2 * 5 * 2 - 3
    assert rel_err(f_logits, logits) <= 1e-5 and rel_err(f_loss, loss) <= 1e-5
    for name in grads:
        assert rel_err(f_grads[name], grads[name]) <= 1e-4, name
    # the packed bytes and quantization state are stored as before, byte for byte
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fused.state_dict().values()))


def test_dequantize_into_is_bitwise_dequantize():
    from finetune_ref.kernels.reference import dequantize_nf4
    from finetune_ref.qlora.nf4 import quantize_nf4

    weight = torch.randn(24, 40, generator=torch.Generator().manual_seed(0))
    packed, state = quantize_nf4(weight, blocksize=64, double_quant=True)
    for dtype in (torch.float32, torch.bfloat16):
        workspace = torch.zeros(30, 40, dtype=dtype)
        dequantize_nf4(packed, state, out=workspace[3:27])
        assert torch.equal(workspace[3:27], dequantize_nf4(packed, state, dtype))
        assert not workspace[:3].any() and not workspace[27:].any()


def test_dropout_in_training_keeps_per_layer_adapters():
    model, fused = lora_pair(dropout=0.1)
    attn = fused.model.layers[0].self_attn
    layers = [attn.q_proj, attn.k_proj, attn.v_proj]
    assert shared_adapters(layers) is None  # each layer draws its own dropout mask
    ids = torch.randint(0, 64, (2, 9))
    torch.manual_seed(3)
    logits = model(ids).logits
    torch.manual_seed(3)
    f_logits = fused(ids).logits  # same masks, in the same order: only the base matmul is reordered
    assert rel_err(f_logits, logits) <= 1e-5
    fused.eval()
    assert shared_adapters(layers) == ["default"]  # no dropout in eval: the A's are shared again


def test_trainable_base_and_disabled_fusion_run_unfused():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config())  # full fine-tuning: every weight trains
    assert fuse_projections(model) == 0
    ids = torch.randint(0, 64, (2, 9))
    model(ids, labels=ids).loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
    _, fused = lora_pair()
    fuse_projections(fused, enabled=False)
    assert not groups(fused)


def test_frozen_dense_model_with_biases_inference():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(bias=True)).requires_grad_(False)
    fused = copy.deepcopy(model)
    assert fuse_projections(fused) == 4
    assert_stacked(fused)
    owner = fused.model.layers[1].mlp
    assert owner.fused_projections.bias is not None and base_of(owner.up_proj) is owner.up_proj
    ids = torch.randint(0, 64, (2, 9))
    assert rel_err(fused(ids).logits, model(ids).logits) <= 1e-5


def test_two_active_adapters_and_gradient_checkpointing():
    from finetune_ref.lora import set_adapter

    model, fused = lora_pair()
    for m in (model, fused):
        inject_lora(m, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj"],
                                  init_lora_weights=False), adapter_name="second")
        set_adapter(m, ["default", "second"])
        m.model.gradient_checkpointing = True
    fused.load_state_dict(model.state_dict())  # the same second adapter (its random init drew other numbers)
    attn = fused.model.layers[0].self_attn
    assert shared_adapters([attn.q_proj, attn.k_proj, attn.v_proj]) == ["default", "second"]
    ids = torch.randint(0, 64, (2, 9))
    logits, loss, grads = step(model, ids)
    f_logits, f_loss, f_grads = step(fused, ids)
    assert rel_err(f_logits, logits) <= 1e-5 and rel_err(f_loss, loss) <= 1e-5
    assert grads.keys() == f_grads.keys() and any(".second." in n for n in grads)
    for name in grads:
        assert rel_err(f_grads[name], grads[name]) <= 1e-4, name


def test_recipes_fuse_by_default_and_the_flag_turns_it_off():
    from finetune_ref.cli.main import build_parser
    from finetune_ref.recipes.lora import LoraRecipe

    model, _ = lora_pair()
    LoraRecipe().configure_model(model)
    assert_stacked(model)
    LoraRecipe(fused_projections=False).configure_model(model)
    assert not groups(model)
    LoraRecipe(compile=False, parallel="fsdp", optimizer="adamw").configure_model(model)  # FSDP2: unfused
    assert not groups(model)
    args = build_parser().parse_args(["train", "--no-fused-projections"])
    assert args.fused_projections is False


def test_a_run_recorded_before_fused_projections_resumes():
    from finetune_ref.recipes.lora import LoraRecipe
    from finetune_ref.recipes.run_record import config_json, differences

    cfg = LoraRecipe()
    old = {k: v for k, v in config_json(cfg).items() if k != "fused_projections"}
    now = {"data": "d", "base": "b", "base_dir": "/m", "world_size": 1}
    record = {"method": "lora", "config": old, "fingerprint": now}
    assert differences(record, cfg, now) == []
    assert differences(record, LoraRecipe(fused_projections=False), now) == []


def test_compile_may_be_switched_on_resume():
    # torch.compile changes how the same sums are computed, like the fused projections: a run may be resumed
    # compiled (or not) without "recorded False, now True"; a change of what is trained is still refused.
    from finetune_ref.recipes.lora import LoraRecipe
    from finetune_ref.recipes.run_record import config_json, differences

    now = {"data": "d", "base": "b", "base_dir": "/m", "world_size": 1}
    record = {"method": "lora", "config": config_json(LoraRecipe()), "fingerprint": now}
    assert differences(record, LoraRecipe(compile=True), now) == []
    assert differences(record, LoraRecipe(compile=True, lr=3e-4), now) != []
