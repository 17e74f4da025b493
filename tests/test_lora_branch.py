"""lora/branch.py (the LoRA branch with its gradients as wide products) against PEFT's ops in lora/functional.py
run through autograd, on random tensors at small shapes.

Tolerances: for one layer the forward gives the same values, bitwise when the scaling is a power of two (alpha =
2r; the sum into the base output is one addmm_ whose values are the product's then the sum's, checked below);
otherwise the scaling multiplies the r columns of mid instead of the output (one rounding elsewhere), and
for several layers the A's are one matmul (a column block of a GEMM need not be bitwise the GEMM of that block
alone): 2e-6 of the scale in fp32, one bf16 rounding (2^-7) in bf16. Gradients come from the same products summed in an order the GEMM library picks for the transposed
shapes: within 1e-5 of each gradient's largest element in fp32. With bf16 in the chain, each path rounds its
intermediates (mid, the scaled products) in its own places, so both are compared with the same computation in
fp64: the branch's error must stay within 1.5x PEFT's ops' error plus one bf16 rounding (2^-8 of the scale).
"""

import os
import subprocess
import sys

import pytest
import torch

from finetune_ref.lora.branch import lora_branch, lora_outputs, shared_adapters
from finetune_ref.lora.functional import add_update, lora_forward
from finetune_ref.lora.fused import fuse_projections
from finetune_ref.lora import LoraConfig, inject_lora
from finetune_ref.lora.layer import LoRALinear
from finetune_ref.models.config import LlamaConfig
from finetune_ref.models.llama import LlamaForCausalLM

pytestmark = pytest.mark.usefixtures("one_thread")


def reference(x, results, lora_As, lora_Bs, scalings, dtypes):
    """PEFT's ops (lora.functional), each layer on its own, through autograd."""
    out = []
    for result, A, B, s, dtype in zip(results, lora_As, lora_Bs, scalings, dtypes):
        update = lora_forward(x.to(A.dtype), A, B, s)
        out.append(add_update(result, update, dtype))
    return out


def tensors(base_dtype, adapter_dtype, in_features, outs, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 7, in_features, generator=g).to(base_dtype).requires_grad_()
    results = [torch.randn(2, 7, o, generator=g).to(base_dtype).requires_grad_() for o in outs]
    lora_As = [(torch.randn(r, in_features, generator=g) / in_features ** 0.5).to(adapter_dtype).requires_grad_()
               for _ in outs]
    lora_Bs = [(torch.randn(o, r, generator=g) / r ** 0.5).to(adapter_dtype).requires_grad_() for o in outs]
    grads = [torch.randn(2, 7, o, generator=g).to(base_dtype) for o in outs]
    return x, results, lora_As, lora_Bs, grads


def run(fn, x, results, lora_As, lora_Bs, grads, scalings):
    for t in (x, *results, *lora_As, *lora_Bs):
        t.grad = None
    outs = fn(x, results, lora_As, lora_Bs, scalings, [r.dtype for r in results])
    torch.autograd.backward(outs, grads)
    return [o.detach() for o in outs], [t.grad for t in (x, *results, *lora_As, *lora_Bs)]


def assert_close_to_scale(actual, expected, tol):
    scale = expected.double().abs().max().item()
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= tol * scale, f"max error {err:.3e} over scale {scale:.3e} exceeds {tol:.1e}"


@pytest.mark.parametrize("base_dtype,adapter_dtype", [(torch.float32, torch.float32),
                                                      (torch.bfloat16, torch.float32),
                                                      (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("outs", [[24], [24, 8, 8], [40, 40]])  # one layer; q/k/v; gate/up
@pytest.mark.parametrize("scaling", [2.0, 0.75])
def test_outputs_and_every_gradient_match_peft_ops(base_dtype, adapter_dtype, outs, scaling):
    args = tensors(base_dtype, adapter_dtype, 16, outs)
    scalings = [scaling] * len(outs)
    ref_out, ref_grads = run(reference, *args, scalings)
    out, grads = run(lora_branch, *args, scalings)
    x, results, lora_As, lora_Bs, g = args
    exact_args = [t.detach().double().requires_grad_() for t in (x, *results, *lora_As, *lora_Bs)]
    n = len(outs)
    exact_out, exact_grads = run(reference, exact_args[0], exact_args[1:1 + n], exact_args[1 + n:1 + 2 * n],
                                 exact_args[1 + 2 * n:], [t.double() for t in g], scalings)
    for k, (got, ref, exact) in enumerate(zip(out + grads, ref_out + ref_grads, exact_out + exact_grads)):
        assert got.dtype == ref.dtype and got.shape == ref.shape
        if scaling == 2.0 and n == 1 and k < n:
            assert torch.equal(got, ref)  # the same ops in the same order
        elif base_dtype == adapter_dtype == torch.float32:
            assert_close_to_scale(got, ref, 1e-5)
        else:
            scale = exact.abs().max().item()
            err, ref_err = ((t.double() - exact).abs().max().item() for t in (got, ref))
            assert err <= 1.5 * ref_err + 2 ** -8 * scale, f"error {err:.3e}, PEFT's ops {ref_err:.3e}"


def test_per_layer_scalings_and_ranks():
    # gate/up-like layers with different ranks and scalings (rsLoRA, alpha per layer)
    x, results, _, _, grads = tensors(torch.float32, torch.float32, 16, [12, 20])
    g = torch.Generator().manual_seed(3)
    lora_As = [torch.randn(r, 16, generator=g).requires_grad_() for r in (2, 6)]
    lora_Bs = [torch.randn(o, r, generator=g).requires_grad_() for o, r in ((12, 2), (20, 6))]
    scalings = [4.0, 16 / 6 ** 0.5]
    ref_out, ref_grads = run(reference, x, results, lora_As, lora_Bs, grads, scalings)
    out, got = run(lora_branch, x, results, lora_As, lora_Bs, grads, scalings)
    for a, b in zip(out + got, ref_out + ref_grads):
        assert_close_to_scale(a, b, 1e-5)


def tiny_lora(dtype=torch.float32, **lora):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).to(dtype)
    inject_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **lora))
    return model.train()


def test_fuse_projections_switches_every_lora_layer():
    model = tiny_lora()
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert layers and not any(m.branch_backward for m in layers)  # PEFT's ops until fused
    fuse_projections(model)
    assert all(m.branch_backward for m in layers)  # o_proj and down_proj too
    fuse_projections(model, enabled=False)
    assert not any(m.branch_backward for m in layers)


def test_single_layer_branch_matches_peft_ops_and_falls_back_with_dropout():
    model = tiny_lora()
    o_proj = model.model.layers[0].self_attn.o_proj
    x = torch.randn(2, 5, 32, requires_grad=True)
    expected = o_proj(x)  # PEFT's ops
    o_proj.branch_backward = True
    assert torch.equal(o_proj(x), expected)
    dropped = tiny_lora(lora_dropout=0.1).model.layers[0].self_attn.o_proj
    assert shared_adapters([dropped]) is None  # each call draws a mask: PEFT's ops, not the branch


def test_two_adapters_round_once_at_the_end():
    # as LoRALinear.lora_output: a bf16 result plus fp32 updates stays fp32 until the last adapter
    model = tiny_lora(torch.bfloat16)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.add_adapter("second", r=2, lora_alpha=4, init_lora_weights=False)
            for p in m.parameters():
                if p.dtype == torch.bfloat16:
                    p.requires_grad_(False)
            m.active_adapters = ["default", "second"]
    down = model.model.layers[1].mlp.down_proj
    x = torch.randn(3, 48).to(torch.bfloat16)
    expected = down(x)
    got = lora_outputs([down], ["default", "second"], x, [down.base_layer(x)])[0]
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)


def test_benchmark_script_prints_one_row_per_group():
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_lora_branch.py"
    done = subprocess.run([sys.executable, str(script), "--tokens", "8", "--repeats", "1", "--threads", "1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and line.endswith("x |")]
    assert [r.split(" | ")[0] for r in rows] == ["| q/k/v", "| o", "| gate/up", "| down"]
    assert all(len(r.split(" | ")) == 7 for r in rows)  # group, four implementations, two ratios


def test_gradients_not_asked_for_are_not_computed():
    x, results, lora_As, lora_Bs, grads = tensors(torch.bfloat16, torch.float32, 16, [24, 8])
    x.requires_grad_(False)
    results[1].requires_grad_(False)
    out = lora_branch(x, results, lora_As, lora_Bs, [2.0, 2.0], [torch.bfloat16] * 2)
    torch.autograd.backward(out, grads)
    assert x.grad is None and results[1].grad is None and torch.equal(results[0].grad, grads[0])
    assert all(t.grad is not None for t in (*lora_As, *lora_Bs))


def test_under_autocast_as_exact_as_peft_ops():
    # --precision bf16-autocast: fp32 weights, bf16 matmuls; backward runs in forward's autocast state. Both
    # paths against the same model without autocast: the branch's error within 1.5x PEFT's ops' plus 2^-8.
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))

    def loss_and_grads(fused: bool, autocast: bool):
        model = tiny_lora()
        fuse_projections(model, fused)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(ids, labels=ids).loss
        loss.backward()
        return [loss.detach()] + [p.grad for p in model.parameters() if p.requires_grad]

    exact = loss_and_grads(False, False)
    peft, branch = loss_and_grads(False, True), loss_and_grads(True, True)
    for e, p, b in zip(exact, peft, branch):
        assert b.dtype == e.dtype and torch.isfinite(b).all()
        scale = e.abs().max().item()
        assert (b - e).abs().max().item() <= 1.5 * (p - e).abs().max().item() + 2 ** -8 * scale


def test_frozen_adapters_get_no_gradient():
    x, results, lora_As, lora_Bs, grads = tensors(torch.float32, torch.float32, 16, [24, 8])
    lora_As[0].requires_grad_(False)
    lora_Bs[1].requires_grad_(False)
    out = lora_branch(x, results, lora_As, lora_Bs, [2.0, 2.0], [torch.float32] * 2)
    torch.autograd.backward(out, grads)
    assert lora_As[0].grad is None and lora_Bs[1].grad is None
    assert lora_As[1].grad is not None and lora_Bs[0].grad is not None and x.grad is not None


@pytest.mark.parametrize("r", [8, 64, 65, 128])
@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_forward_with_fp32_adapters_is_peft_ops_bitwise(r, base_dtype):
    # The update is summed into the base output by one addmm_ up to r = 64 (lora/branch.py _add_up), bitwise the
    # product then the sum while K = r fits one GEMM block; above, the two steps are taken.
    x, results, lora_As, lora_Bs, _ = tensors(base_dtype, torch.float32, 64, [96], r=r)
    got = lora_branch(x, results, lora_As, lora_Bs, [2.0], [base_dtype])[0]
    ref = reference(x, results, lora_As, lora_Bs, [2.0], [base_dtype])[0]
    assert got.dtype == base_dtype and torch.equal(got, ref)


def test_forward_sum_bitwise_under_mkl_conditional_numerical_reproducibility():
    # MKL_CBWR=COMPATIBLE (reproducible results across CPUs) blocks K by 112: r = 64 must stay bitwise there.
    # MKL reads it when it loads, so in a fresh interpreter.
    code = (
        "import torch\n"
        "from finetune_ref.lora.branch import lora_branch\n"
        "from finetune_ref.lora.functional import add_update, lora_forward\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for n, i, o in ((1024, 576, 1536), (37, 64, 96)):\n"
        "    x = torch.randn(n, i, generator=g).bfloat16()\n"
        "    res = torch.randn(n, o, generator=g).bfloat16()\n"
        "    A, B = torch.randn(64, i, generator=g) / 24, torch.randn(o, 64, generator=g) / 8\n"
        "    got = lora_branch(x, [res], [A], [B], [2.0], [torch.bfloat16])[0]\n"
        "    ref = add_update(res, lora_forward(x.float(), A, B, 2.0), torch.bfloat16)\n"
        "    assert torch.equal(got, ref), (n, i, o)\n"
        "print('ok')\n")
    env = {**os.environ, "MKL_CBWR": "COMPATIBLE"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
