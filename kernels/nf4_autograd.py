"""The one autograd op of a frozen NF4 linear: y = x @ dequant(W)^T + bias, trainable through x and
bias, with the 4-bit W frozen. QLoRA's ``NF4Linear`` calls it.

Each call picks its implementation (``kernels/backend.py``): the fused Triton kernels
(``kernels/nf4_matmul.py``) for CUDA tensors, the PyTorch references (``kernels/reference.py``) on
the CPU, unless ``set_backend`` / ``KERNELS_BACKEND`` forces one. The backward runs on the backend
the forward used. The Triton module is imported on the first call that resolves to "triton", so
this module loads without Triton.

Memory: forward saves only the packed 4-bit bytes (``save_for_backward``; resident anyway) and a
reference to the small, immutable quantization state. No dequantized W is kept between forward and
backward: backward dequantizes again, tile by tile in the kernel, or transiently in dy's dtype on the
reference path (QLoRA paper, section 3; as bitsandbytes' ``MatMul4Bit``,
``bitsandbytes/autograd/_functions.py``).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch

from finetune_ref.kernels import reference
from finetune_ref.kernels.backend import resolve_backend


def _triton_kernels() -> ModuleType:
    """``kernels.nf4_matmul``, imported (with Triton) only once a call resolves to "triton"."""
    from finetune_ref.kernels import nf4_matmul

    return nf4_matmul


class NF4MatmulFunction(torch.autograd.Function):
    """``NF4MatmulFunction.apply(x, packed, state, bias, backend)``, backend "triton" or "torch".

    state: an NF4QuantState (finetune_ref.qlora.quant_state). Gradients: dx = dy @ dequant(W);
    dbias = dy summed over the leading dims; none for the NF4 tensors (frozen). The inputs are not
    checked here: ``nf4_linear`` checks them, ``qlora.nf4_linear.NF4Linear`` did when it was built.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, packed: torch.Tensor, state: Any, bias: torch.Tensor | None,
                backend: str) -> torch.Tensor:
        ctx.save_for_backward(packed)
        ctx.state, ctx.backend, ctx.has_bias = state, backend, bias is not None
        if backend == "triton":
            return _triton_kernels().nf4_matmul_triton(x, packed, state, bias)
        return reference.nf4_matmul(x, packed, state, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, None, None, torch.Tensor | None, None]:
        (packed,) = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            if ctx.backend == "triton":
                grad_x = _triton_kernels().nf4_matmul_input_grad_triton(grad_y, packed, ctx.state)
            else:
                grad_x = reference.nf4_matmul_input_grad(grad_y, packed, ctx.state)  # (..., N) @ (N, K)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)  # (..., N) -> (M, N) -> (N,)
        return grad_x, None, None, grad_bias, None


def nf4_linear(x: torch.Tensor, packed: torch.Tensor, state: Any, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ dequant(W)^T + bias, differentiable in x and bias.

    Args:
        x: (..., in_features), fp32 / fp16 / bf16, on the weight's device.
        packed: the uint8 codes of the frozen weight W (out_features, in_features).
        state: an NF4QuantState (finetune_ref.qlora.quant_state) of shape (out_features, in_features).
        bias: optional (out_features,), x's dtype.

    Returns:
        (..., out_features) in x's dtype.

    Raises:
        TypeError / ValueError: mismatched shapes, dtypes or devices (see
            ``kernels.reference.check_matmul_inputs``), or a backend forced to "triton" where it
            cannot run (see ``kernels.backend.resolve_backend``).
        RuntimeError: backend forced to "triton" without Triton installed.
    """
    reference.check_matmul_inputs(x, packed, state, bias)
    return NF4MatmulFunction.apply(x, packed, state, bias, resolve_backend(x, packed))
