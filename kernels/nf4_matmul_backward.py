"""Fused NF4 input-gradient matmul for the backward pass: dx = dy @ dequant(W).

In QLoRA the base weight is frozen, so its backward needs only the input gradient
(QLoRA paper, section 3: gradients flow through the 4-bit weight into the adapters; dW is never
formed). With y = x @ W^T, dx = dy @ W: dy is (M, N), W is (N, K), dx is (M, K).

Each program owns a (BLOCK_M, BLOCK_K) tile of dx and walks N in steps of BLOCK_N. At every
step it dequantizes a (BLOCK_N, BLOCK_K) tile of W in registers - the same tile shape and the
same helper (``kernels/nf4_dequant.py``: ``dequantize_nf4_tile``) as the forward kernel, so W
is read along its rows either way - and multiplies ``dy_tile @ w_tile``. The tile sizes come
from ``kernels/nf4_matmul_forward.py``: ``matmul_config`` with the roles of N (output) and K
(reduction) swapped.

Same guarantees as the forward kernel: masked tails, strided dy, int64 offsets, no writes
outside dx, inputs unchanged.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from finetune_ref.kernels import nf4_dequant
from finetune_ref.kernels.backend import import_triton, interpreter_enabled, resolve_backend
from finetune_ref.kernels.nf4_dequant import check_dtype, dequantize_nf4_reference, weight_kernel_args
from finetune_ref.kernels.nf4_layout import NF4Weight
from finetune_ref.kernels.nf4_matmul_forward import TileConfig, dot_precision, matmul_config

# Bound by _build() on first use (see kernels/nf4_dequant.py for why).
triton: Any = None
tl: Any = None
dequantize_nf4_tile: Any = None
_nf4_matmul_input_grad_kernel: Any = None


def check_grad_inputs(grad_y: torch.Tensor, weight: NF4Weight) -> None:
    """Raise TypeError / ValueError unless grad_y (..., N) fits the NF4 weight (N, K)."""
    if not isinstance(weight, NF4Weight):
        raise TypeError(f"weight must be an NF4Weight, got {type(weight).__name__}")
    if not isinstance(grad_y, torch.Tensor):
        raise TypeError(f"grad_y must be a torch.Tensor, got {type(grad_y).__name__}")
    check_dtype(grad_y.dtype, "grad_y.dtype")
    if len(weight.shape) != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {weight.shape}")
    if grad_y.dim() < 1 or grad_y.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"grad_y's last dimension must be out_features={weight.shape[0]}, got shape {tuple(grad_y.shape)}"
        )
    if grad_y.device != weight.device:
        raise ValueError(f"grad_y is on {grad_y.device} but the weight is on {weight.device}")


def nf4_matmul_input_grad_reference(grad_y: torch.Tensor, weight: NF4Weight) -> torch.Tensor:
    """dx = grad_y @ dequant(W) with plain PyTorch (W dequantized to grad_y's dtype).

    Shapes: grad_y (..., N), weight.shape (N, K) -> dx (..., K), dtype of grad_y.
    """
    check_grad_inputs(grad_y, weight)
    return grad_y @ dequantize_nf4_reference(weight, grad_y.dtype)


@functools.cache
def _build() -> Any:
    """Import Triton and define the kernel (once per process)."""
    global triton, tl, dequantize_nf4_tile, _nf4_matmul_input_grad_kernel
    triton, tl = import_triton()
    nf4_dequant._build()
    dequantize_nf4_tile = nf4_dequant.dequantize_nf4_tile

    @triton.jit
    def _nf4_matmul_input_grad_kernel(
        # pointers
        dy_ptr,
        packed_ptr,
        absmax_ptr,
        quant_map_ptr,
        nested_absmax_ptr,
        nested_quant_map_ptr,
        offset_ptr,
        dx_ptr,
        # sizes: dy (M, N), W (N, K), dx (M, K)
        M,
        N,
        K,
        # strides (elements)
        stride_dym,
        stride_dyn,
        stride_dxm,
        stride_dxk,
        # meta
        BLOCKSIZE: tl.constexpr,
        NESTED_BLOCKSIZE: tl.constexpr,
        DOUBLE_QUANT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        # Grouped program order over the (M, K) tiles of dx, as in the forward kernel.
        # (Builtins only; see kernels/nf4_matmul_forward.py.)
        pid = tl.program_id(0)
        num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
        num_pid_k = (K + BLOCK_K - 1) // BLOCK_K
        num_pid_in_group = GROUP_M * num_pid_k
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_k = (pid % num_pid_in_group) // group_size_m

        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BLOCK_M,)
        offs_k = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)  # (BLOCK_K,)
        mask_m = offs_m < M
        mask_k = offs_k < K
        dy_rows = dy_ptr + offs_m[:, None] * stride_dym  # (BLOCK_M, 1) pointers to dy[m, 0]

        acc = tl.full((BLOCK_M, BLOCK_K), 0.0, tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)  # (BLOCK_N,)
            mask_n = offs_n < N
            dy = tl.load(dy_rows + offs_n[None, :] * stride_dyn, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
            w_mask = mask_n[:, None] & mask_k[None, :]  # (BLOCK_N, BLOCK_K)
            w = dequantize_nf4_tile(
                offs_n[:, None] * K + offs_k[None, :], w_mask, packed_ptr, absmax_ptr, quant_map_ptr,
                nested_absmax_ptr, nested_quant_map_ptr, offset_ptr, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT,
            )
            w = w.to(dy_ptr.dtype.element_ty)  # round like the reference (dequantized to dy's dtype)
            acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)  # (BM,BN)@(BN,BK)
        dx_ptrs = dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk  # (BLOCK_M, BLOCK_K)
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])

    return _nf4_matmul_input_grad_kernel


def nf4_matmul_input_grad_triton(
    grad_y: torch.Tensor,
    weight: NF4Weight,
    out: torch.Tensor | None = None,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """dx = grad_y @ dequant(W) with the fused Triton kernel.

    Args:
        grad_y: (..., N) fp32 / fp16 / bf16, any strides.
        weight: NF4 weight of shape (N, K) on grad_y's device.
        out: optional (M, K) output, grad_y's dtype, any strides; nothing outside it is written.
        config: tile sizes, read as (BLOCK_M, BLOCK_N = reduction, BLOCK_K = output columns);
            default ``matmul_config(M, K, N, ...)`` with the roles swapped back.

    Returns:
        dx of shape (..., K) in grad_y's dtype (``out`` itself when given).

    Raises:
        TypeError / ValueError: as ``check_grad_inputs``, or a bad ``out``.
        ImportError: Triton is not installed.
    """
    check_grad_inputs(grad_y, weight)
    N, K = weight.shape
    lead = grad_y.shape[:-1]
    dy = grad_y if grad_y.dim() == 2 else grad_y.reshape(-1, N)  # (..., N) -> (M, N)
    M = dy.shape[0]
    if out is None:
        out = torch.empty((M, K), dtype=dy.dtype, device=dy.device)
    elif not isinstance(out, torch.Tensor) or out.shape != (M, K) or out.dtype != dy.dtype or out.device != dy.device:
        raise ValueError(f"out must be a {dy.dtype} tensor of shape ({M}, {K}) on {dy.device}")
    if M == 0:
        return out.reshape(*lead, K)  # (0, K) -> (..., K)
    if config is None:
        # Output columns are K here and the reduction runs over N: swap them in and back out.
        fwd = matmul_config(M, K, N, interpreter_enabled())
        config = TileConfig(fwd.BLOCK_M, fwd.BLOCK_K, fwd.BLOCK_N, fwd.GROUP_M, fwd.num_warps, fwd.num_stages)
    kernel = _build()
    grid = (triton.cdiv(M, config.BLOCK_M) * triton.cdiv(K, config.BLOCK_K),)
    kernel[grid](
        dy,
        *weight_kernel_args(weight),
        out,
        M,
        N,
        K,
        dy.stride(0),
        dy.stride(1),
        out.stride(0),
        out.stride(1),
        BLOCKSIZE=weight.blocksize,
        NESTED_BLOCKSIZE=weight.nested_blocksize,
        DOUBLE_QUANT=weight.double_quant,
        BLOCK_M=config.BLOCK_M,
        BLOCK_N=config.BLOCK_N,
        BLOCK_K=config.BLOCK_K,
        GROUP_M=config.GROUP_M,
        DOT_PRECISION=dot_precision(dy.dtype),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out if grad_y.dim() == 2 else out.reshape(*lead, K)  # (M, K) -> (..., K)


def nf4_matmul_input_grad(grad_y: torch.Tensor, weight: NF4Weight) -> torch.Tensor:
    """dx = grad_y @ dequant(W) on the backend chosen now (``kernels.backend``)."""
    check_grad_inputs(grad_y, weight)
    if resolve_backend(grad_y, weight.packed) == "triton":
        return nf4_matmul_input_grad_triton(grad_y, weight)
    return nf4_matmul_input_grad_reference(grad_y, weight)
