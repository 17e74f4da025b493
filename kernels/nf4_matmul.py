"""Fused NF4 dequantize-matmul kernels: the forward y = x @ dequant(W)^T (+ bias) and the input gradient
dx = dy @ dequant(W), in the shape of Triton's matrix-multiplication tutorial
(``python/tutorials/03-matrix-multiplication.py``).

W (N = out_features, K = in_features) stays 4-bit in global memory. The forward program owns a
(BLOCK_M, BLOCK_N) tile of y and walks K in steps of BLOCK_K; at every step it loads a (BLOCK_M,
BLOCK_K) tile of x and dequantizes a (BLOCK_N, BLOCK_K) tile of W *in registers*
(``kernels/nf4_dequant.py``: ``dequantize_nf4_tile``), then multiplies the two with ``tl.dot``
(tensor cores on a GPU) into an fp32 accumulator. Decode (M = 1) uses the same code with a 16-row
tile, 15 rows masked: at small M the time is set by the bytes of W read, not by FLOPs.

In QLoRA the base weight is frozen, so its backward needs only dx = dy @ W (QLoRA paper, section 3:
gradients flow through the 4-bit weight into the adapters; dW is never formed). That program owns a
(BLOCK_M, BLOCK_K) tile of dx and walks N, dequantizing the same (BLOCK_N, BLOCK_K) tiles of W with
the same helper, so W is read along its rows either way. Its tile sizes are the forward's
``matmul_config`` with the roles of N (output) and K (reduction) swapped.

The dequantized tile is rounded to x's dtype before the product, so each kernel equals its reference
in ``kernels/reference.py`` (``nf4_matmul``, ``nf4_matmul_input_grad``) up to summation order.
Program order is grouped along M (``GROUP_M``, as in the tutorial) so programs running together reuse
the same W tiles from L2. Every load and store is masked (M, N, K tails; blocks of ``blocksize`` that
straddle rows), x and dy may be non-contiguous (their strides are kernel arguments), every offset that
can pass 2^31 is int64, and nothing outside the output is written. Builtins only (no ``tl.cdiv``,
``tl.zeros``, ``tl.sum``): see ``kernels/nf4_dequant.py``. ``kernels/README.md`` walks through it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import triton
import triton.language as tl

from finetune_ref.kernels.backend import interpreter_enabled
from finetune_ref.kernels.nf4_dequant import dequantize_nf4_tile, nf4_pointer_args
from finetune_ref.kernels.reference import check_input_grad_inputs, check_matmul_inputs


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Launch parameters of a fused NF4 matmul. BLOCK_* are powers of two >= 16 (``tl.dot`` on a
    GPU needs 16); GROUP_M a power of two >= 1."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name, least in (("BLOCK_M", 16), ("BLOCK_N", 16), ("BLOCK_K", 16), ("GROUP_M", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or v < least or v & (v - 1):
                raise ValueError(f"TileConfig.{name} must be a power of two >= {least}, got {v!r}")


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def matmul_config(M: int, N: int, K: int, interpret: bool) -> TileConfig:
    """Tile sizes for an (M, K) x (K, N) product: a small heuristic, one config per shape bucket.

    - Interpreter: as few programs as possible (its cost grows with programs), tiles up to
      64 x 128 x 128.
    - GPU, M <= 16 (decode): one 16-row tile; narrow N tiles so there are enough programs to
      fill the SMs, long K tiles so each program streams long runs of W's bytes.
    - GPU, M <= 64: tiles of 32 or 64 rows.
    - GPU, larger M: 128x128x64 tiles, 8 warps (compute-bound; dequant is overhead to hide).
    These were chosen from first principles; ``benchmarks/bench_kernels.py`` measures them.
    """
    if interpret:
        return TileConfig(BLOCK_M=min(64, max(16, _pow2_at_least(M))), BLOCK_N=min(128, max(16, _pow2_at_least(N))),
                          BLOCK_K=min(128, max(16, _pow2_at_least(K))), GROUP_M=8, num_warps=4, num_stages=1)
    if M <= 16:
        return TileConfig(16, 16, 256, GROUP_M=1, num_warps=4, num_stages=4)
    if M <= 64:
        return TileConfig(max(32, _pow2_at_least(M)), 64, 128, GROUP_M=8, num_warps=4, num_stages=3)
    return TileConfig(128, 128, 64, GROUP_M=8, num_warps=8, num_stages=3)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use exact fp32 products ("ieee"), not TF32, to match F.linear's default."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` in grouped order: GROUP_M consecutive row-tiles sweep the
    column tiles together, so programs running at once share W tiles in L2 (the tutorial's
    "L2 cache optimizations"). ``(M + BLOCK_M - 1) // BLOCK_M`` stands for ``tl.cdiv`` (builtins only)."""
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def nf4_matmul_kernel(
    # pointers: x (M, K), the NF4 tensors of W (N, K), bias (N,), y (M, N)
    x_ptr, packed_ptr, absmax_ptr, quant_map_ptr, nested_absmax_ptr, nested_quant_map_ptr, offset_ptr,
    bias_ptr, y_ptr,
    # sizes
    M, N, K,
    # strides (elements): how far to move in memory for one step along each dimension
    stride_xm, stride_xk, stride_ym, stride_yn,
    # meta-parameters
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), (M + BLOCK_M - 1) // BLOCK_M, (N + BLOCK_N - 1) // BLOCK_N, GROUP_M)

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BLOCK_M,)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # (BLOCK_N,)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm  # (BLOCK_M, 1) pointers to x[m, 0]
    w_flat = offs_n[:, None] * K  # (BLOCK_N, 1) flat index of W[n, 0]; int64: N*K > 2^31

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)  # (BLOCK_K,)
        mask_k = offs_k < K
        x = tl.load(x_ptrs + offs_k[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w_mask = mask_n[:, None] & mask_k[None, :]  # (BLOCK_N, BLOCK_K)
        w = dequantize_nf4_tile(w_flat + offs_k[None, :], w_mask, packed_ptr, absmax_ptr, quant_map_ptr,
                                nested_absmax_ptr, nested_quant_map_ptr, offset_ptr,
                                BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT)
        w = w.to(x_ptr.dtype.element_ty)  # round like the reference, which dequantizes to x.dtype
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)  # (BM, BK) @ (BK, BN)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn  # (BLOCK_M, BLOCK_N)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def nf4_matmul_input_grad_kernel(
    # pointers: dy (M, N), the NF4 tensors of W (N, K), dx (M, K)
    dy_ptr, packed_ptr, absmax_ptr, quant_map_ptr, nested_absmax_ptr, nested_quant_map_ptr, offset_ptr, dx_ptr,
    # sizes
    M, N, K,
    # strides (elements)
    stride_dym, stride_dyn, stride_dxm, stride_dxk,
    # meta-parameters
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Grouped program order over the (M, K) tiles of dx, as in the forward kernel.
    pid_m, pid_k = grouped_tile(tl.program_id(0), (M + BLOCK_M - 1) // BLOCK_M, (K + BLOCK_K - 1) // BLOCK_K, GROUP_M)

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BLOCK_M,)
    offs_k = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)  # (BLOCK_K,)
    mask_m = offs_m < M
    mask_k = offs_k < K
    dy_ptrs = dy_ptr + offs_m[:, None] * stride_dym  # (BLOCK_M, 1) pointers to dy[m, 0]

    acc = tl.full((BLOCK_M, BLOCK_K), 0.0, tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)  # (BLOCK_N,)
        mask_n = offs_n < N
        dy = tl.load(dy_ptrs + offs_n[None, :] * stride_dyn, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        w_mask = mask_n[:, None] & mask_k[None, :]  # (BLOCK_N, BLOCK_K)
        w = dequantize_nf4_tile(offs_n[:, None] * K + offs_k[None, :], w_mask, packed_ptr, absmax_ptr,
                                quant_map_ptr, nested_absmax_ptr, nested_quant_map_ptr, offset_ptr,
                                BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT)
        w = w.to(dy_ptr.dtype.element_ty)  # round like the reference (dequantized to dy's dtype)
        acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)  # (BM, BN) @ (BN, BK)
    dx_ptrs = dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk  # (BLOCK_M, BLOCK_K)
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])


def _check_out(out: Any, rows: int, cols: int, like: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor) or out.shape != (rows, cols) or out.dtype != like.dtype \
            or out.device != like.device:
        raise ValueError(f"out must be a {like.dtype} tensor of shape ({rows}, {cols}) on {like.device}")


def nf4_matmul_triton(x: torch.Tensor, packed: torch.Tensor, state: Any, bias: torch.Tensor | None = None,
                      out: torch.Tensor | None = None, config: TileConfig | None = None) -> torch.Tensor:
    """y = x @ dequant(W)^T (+ bias) with the fused kernel; W is never dequantized to global memory.

    Args:
        x: (..., K) fp32 / fp16 / bf16, any strides (a 2-D x is read through its strides; more
            dims are flattened with ``reshape``, which copies only if it must).
        packed: the uint8 codes of W (N, K), on x's device.
        state: an NF4QuantState (finetune_ref.qlora.quant_state) of shape (N, K).
        bias: optional (N,), x's dtype.
        out: optional (M, N) output (M = prod of x's leading dims), x's dtype, any strides.
        config: tile sizes; default ``matmul_config(M, N, K, interpreter_enabled())``.

    Returns:
        y of shape (..., N) in x's dtype (``out`` itself when given).

    Raises:
        TypeError / ValueError: as ``kernels.reference.check_matmul_inputs``, or a bad ``out``.
    """
    # check constraints
    check_matmul_inputs(x, packed, state, bias)
    pointers = nf4_pointer_args(packed, state)
    N, K = state.shape
    lead = x.shape[:-1]
    x2 = x if x.dim() == 2 else x.reshape(-1, K)  # (..., K) -> (M, K)
    M = x2.shape[0]
    if out is not None:
        _check_out(out, M, N, x)
    # allocate output
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return out.reshape(*lead, N)  # (0, N) -> (..., N)
    # launch: one program per (BLOCK_M, BLOCK_N) tile of y
    cfg = config or matmul_config(M, N, K, interpreter_enabled())
    grid = (triton.cdiv(M, cfg.BLOCK_M) * triton.cdiv(N, cfg.BLOCK_N),)
    nf4_matmul_kernel[grid](
        x2, *pointers, bias if bias is not None else x2, out,  # bias_ptr is never read when HAS_BIAS is False
        M, N, K,
        x2.stride(0), x2.stride(1), out.stride(0), out.stride(1),
        BLOCKSIZE=state.blocksize, NESTED_BLOCKSIZE=state.nested_blocksize, DOUBLE_QUANT=state.nested,
        HAS_BIAS=bias is not None, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
        GROUP_M=cfg.GROUP_M, DOT_PRECISION=dot_precision(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out if x.dim() == 2 else out.reshape(*lead, N)  # (M, N) -> (..., N)


def nf4_matmul_input_grad_triton(grad_y: torch.Tensor, packed: torch.Tensor, state: Any,
                                 out: torch.Tensor | None = None, config: TileConfig | None = None) -> torch.Tensor:
    """dx = grad_y @ dequant(W) with the fused kernel.

    Args:
        grad_y: (..., N) fp32 / fp16 / bf16, any strides.
        packed: the uint8 codes of W (N, K), on grad_y's device.
        state: an NF4QuantState (finetune_ref.qlora.quant_state) of shape (N, K).
        out: optional (M, K) output, grad_y's dtype, any strides; nothing outside it is written.
        config: tile sizes, read as (BLOCK_M, BLOCK_N = reduction, BLOCK_K = output columns);
            default ``matmul_config(M, K, N, ...)`` with the roles swapped back.

    Returns:
        dx of shape (..., K) in grad_y's dtype (``out`` itself when given).

    Raises:
        TypeError / ValueError: as ``kernels.reference.check_input_grad_inputs``, or a bad ``out``.
    """
    # check constraints
    check_input_grad_inputs(grad_y, packed, state)
    pointers = nf4_pointer_args(packed, state)
    N, K = state.shape
    lead = grad_y.shape[:-1]
    dy = grad_y if grad_y.dim() == 2 else grad_y.reshape(-1, N)  # (..., N) -> (M, N)
    M = dy.shape[0]
    if out is not None:
        _check_out(out, M, K, dy)
    # allocate output
    if out is None:
        out = torch.empty((M, K), dtype=dy.dtype, device=dy.device)
    if M == 0:
        return out.reshape(*lead, K)  # (0, K) -> (..., K)
    # launch: one program per (BLOCK_M, BLOCK_K) tile of dx
    if config is None:
        # Output columns are K here and the reduction runs over N: swap them in and back out.
        fwd = matmul_config(M, K, N, interpreter_enabled())
        config = TileConfig(fwd.BLOCK_M, fwd.BLOCK_K, fwd.BLOCK_N, fwd.GROUP_M, fwd.num_warps, fwd.num_stages)
    grid = (triton.cdiv(M, config.BLOCK_M) * triton.cdiv(K, config.BLOCK_K),)
    nf4_matmul_input_grad_kernel[grid](
        dy, *pointers, out,
        M, N, K,
        dy.stride(0), dy.stride(1), out.stride(0), out.stride(1),
        BLOCKSIZE=state.blocksize, NESTED_BLOCKSIZE=state.nested_blocksize, DOUBLE_QUANT=state.nested,
        BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N, BLOCK_K=config.BLOCK_K, GROUP_M=config.GROUP_M,
        DOT_PRECISION=dot_precision(dy.dtype), num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out if grad_y.dim() == 2 else out.reshape(*lead, K)  # (M, K) -> (..., K)
