"""The autograd function QLoRA's ``NF4Linear`` calls: y = x @ dequant(W)^T + bias, trainable
through x and bias, with the 4-bit W frozen.

Forward and backward each pick their implementation at call time (``kernels/backend.py``):
the fused Triton kernels (``kernels/nf4_matmul_forward.py``, ``kernels/nf4_matmul_backward.py``) for
CUDA tensors, the PyTorch references on the CPU, unless ``set_backend`` / ``KERNELS_BACKEND``
forces one. The backward runs on the backend the forward used.

Memory: nothing is saved for backward but the NF4 weight itself (already resident); the
dequantized W is recomputed tile by tile in the backward kernel (or, on the reference path,
materialised transiently in x's dtype and freed), as in QLoRA (paper, section 3).
"""

from __future__ import annotations

from typing import Any

import torch

from finetune_ref.kernels.backend import resolve_backend
from finetune_ref.kernels.nf4_layout import NF4Weight
from finetune_ref.kernels.nf4_matmul_forward import check_matmul_inputs, nf4_matmul_reference, nf4_matmul_triton
from finetune_ref.kernels.nf4_matmul_backward import nf4_matmul_input_grad_reference, nf4_matmul_input_grad_triton


class NF4MatmulFunction(torch.autograd.Function):
    """``NF4MatmulFunction.apply(x, weight, bias, backend)`` with backend "triton" or "torch".

    Gradients: dx = dy @ dequant(W); dbias = dy summed over the leading dims; none for the NF4
    tensors (frozen). Prefer ``nf4_linear``, which checks the inputs and resolves the backend.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None, backend: str) -> torch.Tensor:
        ctx.weight = weight  # the frozen 4-bit tensors; nothing is dequantized and kept
        ctx.backend = backend
        ctx.has_bias = bias is not None
        if backend == "triton":
            return nf4_matmul_triton(x, weight, bias)
        return nf4_matmul_reference(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None, None]:
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            if ctx.backend == "triton":
                grad_x = nf4_matmul_input_grad_triton(grad_y, ctx.weight)
            else:
                grad_x = nf4_matmul_input_grad_reference(grad_y, ctx.weight)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)  # (..., N) -> (M, N) -> (N,)
        return grad_x, None, grad_bias, None


def nf4_linear(x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ dequant(W)^T + bias, differentiable in x and bias.

    Args:
        x: (..., in_features), fp32 / fp16 / bf16, on the weight's device.
        weight: the frozen NF4 weight, shape (out_features, in_features).
        bias: optional (out_features,), x's dtype.

    Returns:
        (..., out_features) in x's dtype.

    Raises:
        TypeError / ValueError: mismatched shapes, dtypes or devices (see
            ``kernels.nf4_matmul_forward.check_matmul_inputs``), or a backend forced to "triton" where
            it cannot run (see ``kernels.backend.resolve_backend``).
        RuntimeError: backend forced to "triton" without Triton installed.
    """
    check_matmul_inputs(x, weight, bias)
    backend = resolve_backend(x, weight.packed)
    return NF4MatmulFunction.apply(x, weight, bias, backend)
