"""Fused NF4 dequantize-matmul for the forward pass: y = x @ dequant(W)^T (+ bias).

W (N = out_features, K = in_features) stays 4-bit in global memory. Each program owns a
(BLOCK_M, BLOCK_N) tile of y and walks K in steps of BLOCK_K; at every step it loads a
(BLOCK_M, BLOCK_K) tile of x and dequantizes a (BLOCK_N, BLOCK_K) tile of W *in registers*
(``kernels/nf4_dequant.py``: ``dequantize_nf4_tile``), then multiplies the two with ``tl.dot``
(tensor cores on a GPU) into an fp32 accumulator. Decode (M = 1) uses the same code with a
16-row tile, 15 rows masked: the wasted multiplies are free, because at small M the time is set
by the bytes of W read, not by FLOPs.

The dequantized tile is rounded to x's dtype before the product, so the kernel equals the
reference ``F.linear(x, dequant(W).to(x.dtype), bias)`` up to summation order. Program order
is grouped along M (``GROUP_M``, as in Triton's matmul tutorial) so programs running together
reuse the same W tiles from L2.

Correct on any shape: every load and store is masked (M, N, K tails; blocks of ``blocksize``
that straddle rows), x may be non-contiguous (its strides are kernel arguments), every offset
that can pass 2^31 is computed in int64, and nothing outside y is written.
See ``kernels/README.md`` for a walk-through.

The kernel uses only Triton *builtins* (no ``tl.cdiv``, ``tl.zeros``, ``tl.sum``: those are
``@triton.jit`` helpers in ``triton/language/standard.py``, compiled-or-interpreted once, when
Triton is first imported; bitsandbytes imports Triton at its own import, possibly before
``TRITON_INTERPRET=1`` is set, and the interpreter then cannot call them).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
import torch.nn.functional as F

from finetune_ref.kernels import nf4_dequant
from finetune_ref.kernels.backend import import_triton, interpreter_enabled, resolve_backend
from finetune_ref.kernels.nf4_dequant import check_dtype, dequantize_nf4_reference, weight_kernel_args
from finetune_ref.kernels.nf4_layout import NF4Weight

# Bound by _build() on first use (see kernels/nf4_dequant.py for why).
triton: Any = None
tl: Any = None
dequantize_nf4_tile: Any = None
_nf4_matmul_kernel: Any = None


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
        return TileConfig(
            BLOCK_M=min(64, max(16, _pow2_at_least(M))),
            BLOCK_N=min(128, max(16, _pow2_at_least(N))),
            BLOCK_K=min(128, max(16, _pow2_at_least(K))),
            GROUP_M=8,
            num_warps=4,
            num_stages=1,
        )
    if M <= 16:
        return TileConfig(16, 16, 256, GROUP_M=1, num_warps=4, num_stages=4)
    if M <= 64:
        return TileConfig(max(32, _pow2_at_least(M)), 64, 128, GROUP_M=8, num_warps=4, num_stages=3)
    return TileConfig(128, 128, 64, GROUP_M=8, num_warps=8, num_stages=3)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use exact fp32 products ("ieee"), not TF32, to match F.linear's default."""
    return "ieee" if dtype == torch.float32 else "tf32"


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------
def nf4_matmul_reference(x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ dequant(W)^T + bias with plain PyTorch: dequantize W to x's dtype, then F.linear.

    Shapes: x (..., K), weight.shape (N, K), bias (N,) -> y (..., N), dtype of x.
    Raises: as ``check_matmul_inputs``.
    """
    check_matmul_inputs(x, weight, bias)
    return F.linear(x, dequantize_nf4_reference(weight, x.dtype), bias)


def check_matmul_inputs(x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None) -> None:
    """Raise TypeError / ValueError unless x (..., K) and bias (N,) fit the NF4 weight (N, K)."""
    if not isinstance(weight, NF4Weight):
        raise TypeError(f"weight must be an NF4Weight, got {type(weight).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    check_dtype(x.dtype, "x.dtype")
    if len(weight.shape) != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {weight.shape}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x's last dimension must be in_features={weight.shape[1]}, got x of shape {tuple(x.shape)}"
        )
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but the weight is on {weight.device}; move one of them")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be a tensor of shape ({weight.shape[0]},), got {getattr(bias, 'shape', bias)}")
        if bias.dtype != x.dtype or bias.device != x.device:
            raise TypeError(f"bias must be {x.dtype} on {x.device} like x, got {bias.dtype} on {bias.device}")


# --------------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------------
@functools.cache
def _build() -> Any:
    """Import Triton and define the kernel (once per process)."""
    global triton, tl, dequantize_nf4_tile, _nf4_matmul_kernel
    triton, tl = import_triton()
    nf4_dequant._build()
    dequantize_nf4_tile = nf4_dequant.dequantize_nf4_tile

    @triton.jit
    def _nf4_matmul_kernel(
        # pointers
        x_ptr,
        packed_ptr,
        absmax_ptr,
        quant_map_ptr,
        nested_absmax_ptr,
        nested_quant_map_ptr,
        offset_ptr,
        bias_ptr,
        y_ptr,
        # sizes: x (M, K), W (N, K), y (M, N)
        M,
        N,
        K,
        # strides (elements)
        stride_xm,
        stride_xk,
        stride_ym,
        stride_yn,
        # meta
        BLOCKSIZE: tl.constexpr,
        NESTED_BLOCKSIZE: tl.constexpr,
        DOUBLE_QUANT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        # Grouped program order: GROUP_M consecutive row-tiles sweep the N tiles together.
        pid = tl.program_id(0)
        num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
        num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_n = (pid % num_pid_in_group) // group_size_m

        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BLOCK_M,)
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # (BLOCK_N,)
        mask_m = offs_m < M
        mask_n = offs_n < N
        x_rows = x_ptr + offs_m[:, None] * stride_xm  # (BLOCK_M, 1) pointers to x[m, 0]
        w_rows = offs_n[:, None] * K  # (BLOCK_N, 1) flat index of W[n, 0]; int64: N*K > 2^31

        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)  # (BLOCK_K,)
            mask_k = offs_k < K
            x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w_mask = mask_n[:, None] & mask_k[None, :]  # (BLOCK_N, BLOCK_K)
            w = dequantize_nf4_tile(
                w_rows + offs_k[None, :], w_mask, packed_ptr, absmax_ptr, quant_map_ptr, nested_absmax_ptr,
                nested_quant_map_ptr, offset_ptr, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT,
            )
            w = w.to(x_ptr.dtype.element_ty)  # round like the reference, which dequantizes to x.dtype
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)  # (BM,BK)@(BK,BN)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn  # (BLOCK_M, BLOCK_N)
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    return _nf4_matmul_kernel


def nf4_matmul_triton(
    x: torch.Tensor,
    weight: NF4Weight,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """y = x @ dequant(W)^T (+ bias) with the fused Triton kernel; W is never dequantized to
    global memory.

    Args:
        x: (..., K) fp32 / fp16 / bf16, any strides (a 2-D x is read through its strides; more
            dims are flattened with ``reshape``, which copies only if it must).
        weight: NF4 weight of shape (N, K) on x's device.
        bias: optional (N,), x's dtype.
        out: optional (M, N) output (M = prod of x's leading dims), x's dtype, any strides;
            nothing outside it is written.
        config: tile sizes; default ``matmul_config(M, N, K, interpreter_enabled())``.

    Returns:
        y of shape (..., N) in x's dtype (``out`` itself when given).

    Raises:
        TypeError / ValueError: as ``check_matmul_inputs``, or a bad ``out``.
        ImportError: Triton is not installed.
    """
    check_matmul_inputs(x, weight, bias)
    N, K = weight.shape
    lead = x.shape[:-1]
    x2 = x if x.dim() == 2 else x.reshape(-1, K)  # (..., K) -> (M, K)
    M = x2.shape[0]
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    elif not isinstance(out, torch.Tensor) or out.shape != (M, N) or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"out must be a {x.dtype} tensor of shape ({M}, {N}) on {x.device}")
    if M == 0:
        return out.reshape(*lead, N)  # (0, N) -> (..., N)
    cfg = config or matmul_config(M, N, K, interpreter_enabled())
    kernel = _build()
    grid = (triton.cdiv(M, cfg.BLOCK_M) * triton.cdiv(N, cfg.BLOCK_N),)
    kernel[grid](
        x2,
        *weight_kernel_args(weight),
        bias if bias is not None else x2,  # never read when HAS_BIAS is False
        out,
        M,
        N,
        K,
        x2.stride(0),
        x2.stride(1),
        out.stride(0),
        out.stride(1),
        BLOCKSIZE=weight.blocksize,
        NESTED_BLOCKSIZE=weight.nested_blocksize,
        DOUBLE_QUANT=weight.double_quant,
        HAS_BIAS=bias is not None,
        BLOCK_M=cfg.BLOCK_M,
        BLOCK_N=cfg.BLOCK_N,
        BLOCK_K=cfg.BLOCK_K,
        GROUP_M=cfg.GROUP_M,
        DOT_PRECISION=dot_precision(x.dtype),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out if x.dim() == 2 else out.reshape(*lead, N)  # (M, N) -> (..., N)


def nf4_matmul(x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ dequant(W)^T (+ bias) on the backend chosen now (``kernels.backend``): the fused
    Triton kernel for CUDA tensors, the PyTorch reference on CPU, unless forced. No autograd
    through the kernel; use ``kernels.nf4_linear`` for training."""
    check_matmul_inputs(x, weight, bias)
    if resolve_backend(x, weight.packed) == "triton":
        return nf4_matmul_triton(x, weight, bias)
    return nf4_matmul_reference(x, weight, bias)
