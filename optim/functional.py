"""The AdamW update as plain functions on tensors: fp32, through an fp32 master copy, and with 8-bit moments.

:func:`adamw_update_` is the math (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization",
Algorithm 2, with Adam's bias correction, Kingma & Ba 2015, Algorithm 1) in torch.optim.AdamW's operation
order, so fp32 results are bitwise equal to it. The two functions around it are how the optimizer
(:class:`optim.adamw.AdamW`) applies it to a parameter of any float dtype:

* :func:`mixed_precision_update_`: upcast the 16-bit gradient, apply AdamW to the parameter's fp32
  ``master`` copy, then round the master to the parameter's dtype (round-to-nearest-even,
  ``Tensor.copy_``). Mixed-precision training, Micikevicius et al. 2018, section 3.1. Why the master copy:
  bf16 has 8 significant bits, so an update smaller than half a unit in the last place of the weight
  (|w| * 2^-9) is rounded away. With lr = 1e-5 and Adam's normalised step of about lr, every weight with
  |w| > ~0.005 would never move in pure bf16; the fp32 master accumulates those small updates until they
  cross a bf16 rounding boundary (``tests/test_full.py`` shows both behaviours). Without a master (the
  parameter fp32, or ``master_weights=False``) the update goes to the parameter itself, or to an fp32 copy
  of it rounded back each step (bitsandbytes' behaviour). The gradient is upcast one parameter at a time,
  so the only transient extra memory is one fp32 copy of one gradient, not a second set of fp32 grads.
* :func:`adamw8bit_update_`: Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization",
  section 2: "dequantize, update, quantize". The moments m and v are stored as one byte per element with
  the dynamic (tree) data type (section 2.2; m with the signed map, v, never negative, with the unsigned
  one) in independent blocks of 256 elements, each with its own fp32 absmax (section 2.1: an outlier
  only coarsens its own block). Each step dequantizes both to fp32, applies the update above and
  quantizes them again (:mod:`optim.blockwise8`). During the update the two moments exist in fp32 (8 bytes
  x the parameter's size, freed right after; bitsandbytes' fused CUDA kernel works block by block in
  registers instead). bitsandbytes' CPU kernel writes the first moment as ``m*beta1 + g*(1-beta1)`` where
  torch uses ``lerp``, so the two can round a moment differently in the last bit and, rarely, pick a
  neighbouring code: trajectories agree to a tolerance after the first step (``tests/test_adamw8bit.py``).
"""

from __future__ import annotations

from typing import Optional

import torch

from finetune_ref.optim.blockwise8 import dequantize_blockwise, quantize_blockwise

BLOCKSIZE = 256  # elements per absmax block of 8-bit optimizer states (bitsandbytes' blockwise optimizers)


def adamw_update_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                  step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamW update, in place on ``param``, ``exp_avg`` and ``exp_avg_sq`` (all fp32, same shape).

    ``step`` is the 1-based number of this update. The operation order is torch.optim.AdamW's single-tensor
    path (torch/optim/adam.py ``_single_tensor_adam`` with ``decoupled_weight_decay=True``)::

        param      <- param * (1 - lr * weight_decay)                     (decoupled decay)
        exp_avg    <- beta1 * exp_avg + (1 - beta1) * grad                 (as lerp)
        exp_avg_sq <- beta2 * exp_avg_sq + (1 - beta2) * grad^2
        param      <- param - lr / (1 - beta1^step) * exp_avg / (sqrt(exp_avg_sq) / sqrt(1 - beta2^step) + eps)
    """
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / bias_correction2 ** 0.5).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


def mixed_precision_update_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                            exp_avg_sq: torch.Tensor, master: Optional[torch.Tensor], step: float, lr: float,
                            beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamW update of ``param`` (fp32, bf16 or fp16) with fp32 moments, in fp32.

    The update goes to ``master`` (fp32, ``param``'s shape) if given, else to ``param`` if it is fp32, else to
    an fp32 copy of it; then ``param`` gets the result rounded to its dtype (nearest even).
    """
    target = master if master is not None else param if param.dtype == torch.float32 else param.to(torch.float32)
    grad32 = grad if grad.dtype == torch.float32 else grad.to(torch.float32)  # one parameter at a time
    adamw_update_(target, grad32, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay)
    if target is not param:
        param.copy_(target)  # round to the parameter's dtype (nearest even)


def adamw8bit_update_(param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], step: float,
                      lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                      qmap1: torch.Tensor, qmap2: torch.Tensor, rounding: str = "nearest") -> None:
    """One AdamW update with blockwise 8-bit moments, in place on ``param`` and ``state``.

    Dettmers et al. 2022, section 2: dequantize m and v to fp32, update (:func:`mixed_precision_update_`),
    quantize them again into the same uint8/absmax tensors.

    Args:
        param: the parameter (any float dtype), updated in place; if ``state`` has ``master`` (fp32), the
            update goes to the master and ``param`` gets it rounded to its dtype.
        grad: its gradient (``param``'s shape, finite).
        state: ``state1``/``state2`` (uint8, param's shape) with ``absmax1``/``absmax2`` (fp32,
            ``(ceil(numel / 256),)``); or ``state1``/``state2`` in fp32 for a 32-bit state; optional ``master``.
        step: 1-based number of this update.
        qmap1, qmap2: fp32 (256,) maps of m (signed dynamic) and v (unsigned dynamic).
        rounding: "nearest" or "lut" (:mod:`optim.blockwise8`).
    """
    quantized = state["state1"].dtype == torch.uint8
    if quantized:
        exp_avg = dequantize_blockwise(state["state1"], state["absmax1"], qmap1, BLOCKSIZE)  # fp32, p's shape
        exp_avg_sq = dequantize_blockwise(state["state2"], state["absmax2"], qmap2, BLOCKSIZE)
    else:
        exp_avg, exp_avg_sq = state["state1"], state["state2"]
    mixed_precision_update_(param, grad, exp_avg, exp_avg_sq, state.get("master"), step, lr, beta1, beta2, eps,
                            weight_decay)
    if quantized:
        for name, values, qmap in (("1", exp_avg, qmap1), ("2", exp_avg_sq, qmap2)):
            codes, absmax = quantize_blockwise(values, qmap, BLOCKSIZE, rounding)  # uint8 p's shape, (nb,) fp32
            state["state" + name].copy_(codes)
            state["absmax" + name].copy_(absmax)
