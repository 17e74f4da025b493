"""Triton: the gathered LoRA update of a mixed-adapter batch (BGMV: batched gather matrix-vector).

Punica (Chen et al. 2023, "Punica: Multi-Tenant LoRA Serving", section 4) splits a LoRA layer of a batch whose
tokens use different adapters into two gathered products, each token reading its own adapter's matrix:

    shrink:  h[n, :] = A[i_n] @ x[n, :]                     A: (n_adapters, r, in)   h: (N, r), fp32
    expand:  y[n, :] = scaling[i_n] * B[i_n] @ h[n, :]      B: (n_adapters, out, r)  y: (N, out)

with i_n the adapter of token n, or -1 for none (y = 0). Adapters of different ranks are stacked zero-padded to
the largest rank (S-LoRA, Sheng et al. 2023, section 5.2). The PyTorch definition is ``lora.mixed.lora_bgmv``
(this room imports nothing of the project; ``tests/test_kernels_lora_bgmv.py`` holds the two equal).

Each program computes one token's BLOCK_R (shrink) or BLOCK_O (expand) outputs as a reduction over the
other dimension, loading 16-bit inputs and upcasting to fp32 before any arithmetic (Triton's interpreter gets
bf16 arithmetic wrong). This is the decode-time shape (one or a few tokens per row, tiny r), where a gathered
GEMV is what matters; a prefill of long prompts would use a tiled SGMV with ``tl.dot`` instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add(a, b):
    """The combine function of the row sums below. ``tl.sum`` (like ``tl.zeros``) is a ``@triton.jit`` helper of
    ``triton.language``: where Triton was imported before ``TRITON_INTERPRET=1`` was set (bitsandbytes imports it),
    the interpreter cannot call it, while ``tl.reduce`` (a builtin) with this module's own combine function runs in
    both orders, as the NF4 kernels' builtins-only rule (``kernels/nf4_dequant.py``) requires."""
    return a + b


@triton.jit
def bgmv_shrink_kernel(
    # pointers
    x_ptr, a_ptr, idx_ptr, h_ptr,
    # sizes
    K, R,
    # strides
    stride_xn, stride_xk, stride_aa, stride_ar, stride_ak, stride_hn, stride_hr,
    # meta-parameters
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """h[n, r-block] = A[idx[n], r-block, :] @ x[n, :] (fp32)."""
    n = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1)
    adapter = tl.maximum(tl.load(idx_ptr + n), 0).to(tl.int64)  # -1 reads adapter 0; expand scales it by 0
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = tl.full((BLOCK_R,), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + n * stride_xn + offs_k * stride_xk, mask=offs_k < K, other=0.0).to(tl.float32)
        a_ptrs = a_ptr + adapter * stride_aa + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak
        a = tl.load(a_ptrs, mask=(offs_r[:, None] < R) & (offs_k[None, :] < K), other=0.0).to(tl.float32)
        acc += tl.reduce(a * x[None, :], 1, _add)  # (BLOCK_R, BLOCK_K) -> (BLOCK_R,)
    tl.store(h_ptr + n * stride_hn + offs_r * stride_hr, acc, mask=offs_r < R)


@triton.jit
def bgmv_expand_kernel(
    # pointers
    h_ptr, b_ptr, scaling_ptr, idx_ptr, y_ptr,
    # sizes
    R, N_OUT,
    # strides
    stride_hn, stride_hr, stride_ba, stride_bo, stride_br, stride_yn, stride_yo,
    # meta-parameters
    BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """y[n, o-block] = scaling[idx[n]] * B[idx[n], o-block, :] @ h[n, :]; 0 where idx[n] = -1."""
    n = tl.program_id(0).to(tl.int64)
    pid_o = tl.program_id(1)
    raw = tl.load(idx_ptr + n)
    adapter = tl.maximum(raw, 0).to(tl.int64)
    scale = tl.where(raw >= 0, tl.load(scaling_ptr + adapter), 0.0)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    acc = tl.full((BLOCK_O,), 0.0, tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        h = tl.load(h_ptr + n * stride_hn + offs_r * stride_hr, mask=offs_r < R, other=0.0)
        b_ptrs = b_ptr + adapter * stride_ba + offs_o[:, None] * stride_bo + offs_r[None, :] * stride_br
        b = tl.load(b_ptrs, mask=(offs_o[:, None] < N_OUT) & (offs_r[None, :] < R), other=0.0).to(tl.float32)
        acc += tl.reduce(b * h[None, :], 1, _add)  # (BLOCK_O, BLOCK_R) -> (BLOCK_O,)
    y = acc * scale
    tl.store(y_ptr + n * stride_yn + offs_o * stride_yo, y.to(y_ptr.dtype.element_ty), mask=offs_o < N_OUT)


def lora_bgmv_triton(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: torch.Tensor,
                     indices: torch.Tensor, block_k: int = 128, block_o: int = 128) -> torch.Tensor:
    """The Triton form of ``lora.mixed.lora_bgmv`` (same arguments, same result within fp32 summation order).

    Args:
        x: (B, T, in).  lora_A: (n, r, in).  lora_B: (n, out, r), same dtype as x.  scaling: (n,) fp32.
        indices: int64 (B,), the adapter of each row (all T tokens of a row share it), -1 for none.

    Returns:
        (B, T, out) in x's dtype.
    """
    # check constraints
    if x.dim() != 3 or lora_A.dim() != 3 or lora_B.dim() != 3:
        raise ValueError(f"x, lora_A, lora_B must be 3-D, got {tuple(x.shape)}, {tuple(lora_A.shape)}, "
                         f"{tuple(lora_B.shape)}")
    n_adapters, R, K = lora_A.shape
    if x.shape[-1] != K or lora_B.shape[0] != n_adapters or lora_B.shape[2] != R:
        raise ValueError(f"shapes do not chain: x {tuple(x.shape)}, A {tuple(lora_A.shape)}, B {tuple(lora_B.shape)}")
    if indices.shape != (x.shape[0],) or scaling.shape != (n_adapters,):
        raise ValueError(f"indices must be ({x.shape[0]},) and scaling ({n_adapters},), got "
                         f"{tuple(indices.shape)} and {tuple(scaling.shape)}")
    Bsz, T, _ = x.shape
    N_OUT = lora_B.shape[1]
    x2 = x.reshape(Bsz * T, K)  # (B, T, in) -> (N, in): one program row per token
    token_idx = indices.to(torch.int32).repeat_interleave(T)  # (B,) -> (N,)
    scaling = scaling.to(torch.float32).contiguous()
    # allocate output
    h = torch.empty(Bsz * T, R, device=x.device, dtype=torch.float32)
    y = torch.empty(Bsz * T, N_OUT, device=x.device, dtype=x.dtype)
    # launch
    block_r = triton.next_power_of_2(R)
    block_k = min(block_k, triton.next_power_of_2(K))
    bgmv_shrink_kernel[(Bsz * T, 1)](
        x2, lora_A, token_idx, h, K, R,
        x2.stride(0), x2.stride(1), lora_A.stride(0), lora_A.stride(1), lora_A.stride(2), h.stride(0), h.stride(1),
        BLOCK_R=block_r, BLOCK_K=block_k)
    block_o = min(block_o, triton.next_power_of_2(N_OUT))
    bgmv_expand_kernel[(Bsz * T, triton.cdiv(N_OUT, block_o))](
        h, lora_B, scaling, token_idx, y, R, N_OUT,
        h.stride(0), h.stride(1), lora_B.stride(0), lora_B.stride(1), lora_B.stride(2), y.stride(0), y.stride(1),
        BLOCK_O=block_o, BLOCK_R=block_r)
    return y.reshape(Bsz, T, N_OUT)  # (N, out) -> (B, T, out)
