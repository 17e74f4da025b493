"""The LoRA branch of layers that read one input, forward and backward written out by hand.

Per layer i (Hu et al. 2021, section 4.1), with x (N, in), A_i (r_i, in), B_i (out_i, r_i), base output y_i:

    mid   = x A^T               A = [A_1; A_2; ...] (R, in), R = sum of r_i: one matmul for all the layers
    out_i = y_i + s_i mid_i B_i^T                  added in the adapter dtype, rounded once to y_i's dtype

and backward, from the output gradients g_i (N, out_i):

    dB_i = s_i g_i^T mid_i          dmid_i = s_i g_i B_i          (N, r_i)
    dA   = dmid^T x                 dx     = dmid A               dy_i = g_i

Autograd computes the same sums through ``F.linear``'s backward, but asks the CPU GEMM for two skinny shapes it
runs far below its speed: dB_i as (out_i, N) @ (N, r_i), reading the transposed gradient, and dmid_i as
(N, out_i) @ (out_i, r_i). Here each is taken as its transpose, a wide product with r_i rows,
(r_i, N) @ (N, out_i) and (r_i, out_i) @ (out_i, N): the same products and sums, measured 2.4-3.7x faster at
SmolLM2's shapes in fp32 on a 2-core AMD EPYC (``benchmarks/PROFILE_BF16_STEP.md``). For one layer the forward
gives the values of ``lora.functional.lora_forward`` and PEFT's sum (bitwise when scaling is a power of two, as
alpha = 2r gives, and the sum is bitwise, see ``_add_up``; else the scaling is applied to the r columns of mid,
not to the output); for several, x A^T is one matmul, as ``models/fused.py`` stacks the frozen weights. The
gradients' sums may be ordered differently.

What is saved for backward is x in its own dtype (a bf16 x is cast to fp32 adapters again in backward: 2 bytes
an element kept instead of 4), the A's and B's, and mid (N, R), small. The result is not bitwise ``F.linear``'s
autograd (GEMM libraries may sum a transposed product in another order): within fp32 rounding of it, stated per
dtype in tests/test_lora_branch.py. ``lora.functional.lora_forward`` stays the bitwise PEFT path
(``--no-fused-projections``).

Usable when every layer adds the same adapters to the same x: no dropout while training (each layer draws its
own mask), no DoRA, no per-row adapters of a mixed batch (``shared_adapters``).
"""

from __future__ import annotations

import torch

from finetune_ref.lora.functional import add_update
from finetune_ref.models.checkpoint import SUPPORTED_DTYPES

def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])  # (..., n) -> (N, n)


def add_up_two_steps(result: torch.Tensor, mid: torch.Tensor, lora_B: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``_add_up`` as PEFT's ops: the (N, out_i) product in B's dtype, then ``add_update``."""
    return add_update(result, (mid @ lora_B.t()).view(result.shape), dtype)  # (N, r_i) @ (r_i, out_i)


def _add_up(result: torch.Tensor, mid: torch.Tensor, lora_B: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(result + mid B^T).to(dtype), summed in B's dtype: PEFT's ``result + lora_B(...)``, then the cast.

    With fp32 adapters, r_i <= 64 and a 16/32-bit result: one ``addmm_`` into an fp32 copy of result, so the
    (N, out_i) product is neither written nor read back, and no 16-bit + fp32 ``torch.add(..., out=<16-bit>)``,
    which the CPU runs as three passes with two temporaries (TensorIterator casts the 16-bit input to fp32, adds,
    then casts into out): 0.44 ms against 1.29 ms at (1024, 1536) on 2 cores. A GEMM adds C once, after the
    K = r_i sums, when K fits one of its blocks: then the values are bitwise the product's then the sum's. MKL
    (PyTorch's CPU BLAS on x86) does so up to K = 192 by default and K = 112 under ``MKL_CBWR=COMPATIBLE``;
    r_i <= 64 keeps a margin (tests/test_lora_branch.py checks both settings). Other BLAS libraries are not
    checked; there the sum is within one fp32 rounding of it. Larger ranks, 16-bit adapters (PEFT rounds the
    product to their dtype first), autocast's 16-bit mid and an fp64 result (summed in fp64) take the two steps.
    """
    if not (mid.dtype == lora_B.dtype == torch.float32 and mid.shape[-1] <= 64 and result.dtype in SUPPORTED_DTYPES):
        return add_up_two_steps(result, mid, lora_B, dtype)
    acc = _rows(result).to(torch.float32, copy=True)  # (..., out_i) -> (N, out_i): a new tensor, summed into
    acc.addmm_(mid, lora_B.t())  # += (N, r_i) @ (r_i, out_i)
    return acc.view(result.shape).to(dtype)  # (N, out_i) -> (..., out_i)


class LoRABranch(torch.autograd.Function):
    """outputs_i = (results_i + s_i (x A_i^T) B_i^T).to(dtypes_i); see the module docstring."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scalings: tuple[float, ...], dtypes: tuple[torch.dtype, ...], *tensors):
        n = len(scalings)
        results, lora_As, lora_Bs = tensors[:n], tensors[n:2 * n], tensors[2 * n:]
        adapter_dtype = lora_As[0].dtype
        rows = _rows(x).to(adapter_dtype)  # (N, in): x in the adapters' dtype (a no-op when it already is)
        A = torch.cat(lora_As) if n > 1 else lora_As[0]  # (R, in)
        mid = rows @ A.t()  # (N, in) @ (in, R) -> (N, R)
        ranks = [a.shape[0] for a in lora_As]
        outputs = []
        for result, mid_i, B, s, dtype in zip(results, mid.split(ranks, dim=1), lora_Bs, scalings, dtypes):
            if s != 1.0:
                mid_i.mul_(s)  # s mid_i: r_i columns scaled instead of out_i (exact when s is a power of two)
            outputs.append(_add_up(result, mid_i, B, dtype))
        ctx.save_for_backward(x, mid, *lora_As, *lora_Bs)
        ctx.scalings, ctx.ranks = scalings, ranks
        ctx.result_dtypes = [r.dtype for r in results]
        # Under torch.autocast (``--precision bf16-autocast``) the matmuls above ran in its dtype (mid too);
        # backward runs in the same autocast state, as ``torch.amp.custom_bwd`` would, so its products see the
        # dtypes PEFT's ops would see through autograd.
        device = x.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return tuple(outputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        device, enabled, dtype = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            return LoRABranch._backward(ctx, grads)

    @staticmethod
    def _backward(ctx, grads):
        x, mid, *weights = ctx.saved_tensors
        n = len(ctx.scalings)
        lora_As, lora_Bs = weights[:n], weights[n:]
        # needs_input_grad: (x, scalings, dtypes, *results, *lora_As, *lora_Bs)
        need_results, need_As, need_Bs = (ctx.needs_input_grad[3 + k * n:3 + (k + 1) * n] for k in range(3))
        adapter_dtype = mid.dtype  # the adapters' dtype, or autocast's
        grad_results, grad_Bs, grad_midT = [], [], []
        for i, (g, mid_i, B, s) in enumerate(zip(grads, mid.split(ctx.ranks, dim=1), lora_Bs, ctx.scalings)):
            grad_results.append(g.to(ctx.result_dtypes[i]) if need_results[i] else None)
            g = _rows(g).to(adapter_dtype)  # (N, out_i)
            # mid_i was saved scaled: dB_i = g_i^T (s mid_i), and the unscaled mid's gradient is s g_i B_i.
            grad_B = (mid_i.t() @ g).t() if need_Bs[i] else None  # (r_i, N) @ (N, out_i) -> (out_i, r_i)
            midT = B.t().to(adapter_dtype) @ g.t()  # (r_i, out_i) @ (out_i, N) -> (r_i, N): dmid_i^T
            if s != 1.0:
                midT.mul_(s)
            grad_Bs.append(None if grad_B is None else grad_B.contiguous())
            grad_midT.append(midT)
        gmidT = torch.cat(grad_midT) if n > 1 else grad_midT[0]  # (R, N)
        A = (torch.cat(lora_As) if n > 1 else lora_As[0]).to(adapter_dtype)  # (R, in)
        grad_As = [None] * n
        if any(need_As):
            rows = _rows(x).to(adapter_dtype)  # (N, in)
            grad_As = list((gmidT @ rows).split(ctx.ranks))  # (R, N) @ (N, in) -> (R, in) -> (r_i, in) each
        grad_x = None
        if ctx.needs_input_grad[0]:  # not for a first layer over frozen embeddings
            grad_x = (gmidT.t() @ A).view(x.shape).to(x.dtype)  # (N, R) @ (R, in) -> (..., in)
        return (grad_x, None, None, *grad_results, *grad_As, *grad_Bs)


def lora_branch(x: torch.Tensor, results: list[torch.Tensor], lora_As: list[torch.Tensor],
                lora_Bs: list[torch.Tensor], scalings: list[float], dtypes: list[torch.dtype]) -> list[torch.Tensor]:
    """(results_i + s_i B_i(A_i x)).to(dtypes_i) for layers reading the same x (..., in).

    Args:
        x: the layers' shared input, in any floating dtype (cast to the adapters' dtype here).
        results: each layer's running output (..., out_i).
        lora_As: (r_i, in) each, one dtype.  lora_Bs: (out_i, r_i) each, that dtype.  scalings: floats.
        dtypes: the dtype of each returned output.
    """
    assert len(results) == len(lora_As) == len(lora_Bs) == len(scalings) == len(dtypes) >= 1
    return list(LoRABranch.apply(x, tuple(scalings), tuple(dtypes), *results, *lora_As, *lora_Bs))


def shared_adapters(layers) -> list[str] | None:
    """The adapters the ``LoRALinear`` layers would all add to the same input in the same order, or None when
    they cannot share one branch (see the module docstring)."""
    shared = None
    for layer in layers:
        if layer.disabled or layer.row_adapters is not None:
            return None
        names = [n for n in layer.active_adapters if n in layer.lora_A and n not in layer.merged_adapters]
        if any(layer.use_dora[n] or (layer.training and layer.lora_dropout[n] > 0.0) for n in names):
            return None
        if shared is not None and names != shared:
            return None
        shared = names
    for name in shared or []:
        if len({layer.lora_A[name].weight.dtype for layer in layers}) != 1:
            return None
    return shared


def lora_outputs(layers, names: list[str], x: torch.Tensor, results: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each ``LoRALinear`` layer's output from its base output: the adapters ``names`` (``shared_adapters``) added
    in turn, as ``LoRALinear.lora_output`` adds them (a 16-bit result plus fp32 updates stays fp32 until the last
    one, then is rounded once to the base output's dtype)."""
    dtypes = [r.dtype for r in results]
    for k, name in enumerate(names):
        lora_As = [m.lora_A[name].weight for m in layers]  # (r_i, in) each
        out_dtypes = dtypes if k == len(names) - 1 else [torch.promote_types(r.dtype, lora_As[0].dtype)
                                                           for r in results]
        results = lora_branch(x, results, lora_As, [m.lora_B[name].weight for m in layers],
                              [m.scaling[name] for m in layers], out_dtypes)
    return results
