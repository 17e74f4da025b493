"""8-bit AdamW: Adam's two moments stored as blockwise-quantized uint8 (Dettmers et al. 2022).

"8-bit Optimizers via Block-wise Quantization" (Dettmers, Lewis, Shleifer, Zettlemoyer, ICLR 2022): the
first moment m and the second moment v are kept as one byte per element, quantized with the dynamic
(tree) data type (section 2.2, "Dynamic Quantization") in independent blocks of 256 elements, each with
its own fp32 absmax (section 2.1, "Block-wise Quantization": an outlier only coarsens its own block).
Each step dequantizes both moments to fp32, applies the ordinary 32-bit AdamW update, and quantizes them
again (section 2: "dequantize, update, quantize").

As bitsandbytes' ``AdamW8bit`` (``bitsandbytes/optim/optimizer.py``, ``Optimizer2State``):

* m uses the signed dynamic map (``create_dynamic_map(signed=True)``), v (never negative) the unsigned
  one, which spends the sign bit on precision;
* parameters with fewer than ``min_8bit_size`` = 4096 elements keep both moments in fp32 (the quantization
  overhead is not worth it for biases and norms);
* state names ``state1`` (m), ``state2`` (v), ``absmax1``, ``absmax2`` and a per-parameter ``step``.

The quantization is :mod:`qlora.blockwise8` (the code QLoRA's double quantization uses), with a
choice of rounding rule: ``"nearest"`` (default) picks the nearest map value, which is what the paper
describes and bitsandbytes' pure-PyTorch backend does (``backends/default/ops.py``: ``torch.bucketize`` on
the midpoints; its CUDA kernel, a binary search over the map, is not compared here: no GPU); ``"lut"``
reproduces bitsandbytes' CPU kernel byte for byte (a 65536-point lookup table: values within 1/65535 of zero land on the code
nearest 1.5e-5, not on 0; see :mod:`qlora.blockwise8`). ``tests/test_adamw8bit.py`` checks the ``"lut"``
states against ``bitsandbytes.optim.AdamW8bit`` on the CPU after one step, bit for bit.

The fp32 update between dequantize and quantize is torch.optim.AdamW's (``full.optimizer.adamw_update_``);
bitsandbytes' CPU kernel writes the first moment as ``m*beta1 + g*(1-beta1)`` where torch uses
``lerp``, so the two can round a moment differently in the last bit and, rarely, pick a neighbouring
code; trajectories agree to a tolerance (measured in the tests), not bit for bit, after the first step.

Memory: 2 bytes per parameter (two uint8 codes) + 2 x 4 / 256 bytes of absmax = 2.03 bytes, against 8
for 32-bit AdamW. During one parameter's update its two moments exist in fp32 (8 bytes x its size, freed
right after; bitsandbytes' fused CUDA kernel avoids even that by working block by block in registers). For 16-bit parameters an fp32 ``master`` copy (4 bytes) is kept by default, as in
:class:`qlora.paged_adamw.PagedAdamW`; ``master_weights=False`` gives bitsandbytes' behaviour.

:class:`AdamW8bit` keeps its states on the device by default; :class:`PagedAdamW8bit` pages them to host
memory (states of parameters with >= ``min_paged_size`` elements), exactly as :class:`PagedAdamW` does.
"""

from __future__ import annotations

import torch

from finetune_ref.optim.master_adamw import adamw_update_
from finetune_ref.optim.blockwise8 import ROUNDING_RULES, create_dynamic_map, dequantize_blockwise, quantize_blockwise
from finetune_ref.optim.paged_adamw import DEFAULT_MIN_PAGED_SIZE, LOW_PRECISION, PagedAdamW, StateLayout, fp32_target

BLOCKSIZE = 256  # elements per absmax block of the optimizer states (bitsandbytes' blockwise optimizers)
MIN_8BIT_SIZE = 4096  # bitsandbytes' min_8bit_size: smaller parameters keep 32-bit states


def adamw8bit_update_(param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], step: float,
                      lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                      qmap1: torch.Tensor, qmap2: torch.Tensor, rounding: str = "nearest") -> None:
    """One AdamW update with blockwise 8-bit moments, in place on ``param`` and ``state``.

    Dettmers et al. 2022, section 2: dequantize m and v to fp32, update (AdamW, Loshchilov & Hutter 2019,
    Algorithm 2), quantize them again into the same uint8/absmax tensors.

    Args:
        param: the parameter (any float dtype), updated in place; if ``state`` has ``master`` (fp32), the
            update goes to the master and ``param`` gets it rounded to its dtype.
        grad: its gradient (``param``'s shape, finite).
        state: ``state1``/``state2`` (uint8, param's shape) with ``absmax1``/``absmax2`` (fp32,
            ``(ceil(numel / 256),)``); or ``state1``/``state2`` in fp32 for a 32-bit state; optional ``master``.
        step: 1-based number of this update.
        qmap1, qmap2: fp32 (256,) maps of m (signed dynamic) and v (unsigned dynamic).
        rounding: "nearest" or "lut" (see the module docstring).
    """
    quantized = state["state1"].dtype == torch.uint8
    if quantized:
        exp_avg = dequantize_blockwise(state["state1"], state["absmax1"], qmap1, BLOCKSIZE)  # fp32, p's shape
        exp_avg_sq = dequantize_blockwise(state["state2"], state["absmax2"], qmap2, BLOCKSIZE)
    else:
        exp_avg, exp_avg_sq = state["state1"], state["state2"]
    target = fp32_target(param, state)
    grad32 = grad if grad.dtype == torch.float32 else grad.to(torch.float32)
    adamw_update_(target, grad32, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay)
    if target is not param:
        param.copy_(target)  # round to the parameter's dtype (nearest even)
    if quantized:
        for name, values, qmap in (("1", exp_avg, qmap1), ("2", exp_avg_sq, qmap2)):
            codes, absmax = quantize_blockwise(values, qmap, BLOCKSIZE, rounding)  # uint8 p's shape, (nb,) fp32
            state["state" + name].copy_(codes)
            state["absmax" + name].copy_(absmax)


class AdamW8bit(PagedAdamW):
    """AdamW with blockwise 8-bit moments (Dettmers et al. 2022); see the module docstring.

    Args:
        params, lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` / ``bitsandbytes.optim.AdamW8bit``.
        min_8bit_size: parameters with fewer elements keep fp32 moments (default 4096, as bitsandbytes).
        rounding: "nearest" (default) or "lut" (bitsandbytes' CPU kernel, byte for byte).
        state_home, min_paged_size: where states live, as :class:`qlora.paged_adamw.PagedAdamW`; default
            "device" (not paged).
        master_weights: fp32 master copy of 16-bit parameters (default True; bitsandbytes has none).

    State per parameter: ``step`` (fp32 scalar on the CPU); ``state1``, ``state2`` (uint8, the parameter's
    shape) and ``absmax1``, ``absmax2`` (fp32, ``(ceil(numel / 256),)``), or ``state1``, ``state2`` in fp32
    below ``min_8bit_size``; ``master`` for 16-bit parameters with ``master_weights``.

    Raises:
        ValueError: as PagedAdamW; a bad ``min_8bit_size`` or ``rounding``; a non-finite gradient (in ``step``,
            before anything is changed: non-finite values cannot be quantized).
        TypeError: as PagedAdamW.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, min_8bit_size: int = MIN_8BIT_SIZE, rounding: str = "nearest",
                 state_home: str = "device", min_paged_size: int = DEFAULT_MIN_PAGED_SIZE,
                 master_weights: bool = True):
        if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 1:
            raise ValueError(f"min_8bit_size must be an int >= 1 (elements), got {min_8bit_size!r}")
        if rounding not in ROUNDING_RULES:
            raise ValueError(f"rounding must be one of {ROUNDING_RULES}, got {rounding!r}")
        self.min_8bit_size = min_8bit_size
        self.rounding = rounding
        self._qmaps: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, state_home=state_home,
                         min_paged_size=min_paged_size, master_weights=master_weights)

    def _state_layout(self, p: torch.Tensor) -> StateLayout:
        shape, n = tuple(p.shape), p.numel()
        if n < self.min_8bit_size:
            layout = {"state1": (shape, torch.float32), "state2": (shape, torch.float32)}
        else:
            nb = -(-n // BLOCKSIZE)
            layout = {"state1": (shape, torch.uint8), "absmax1": ((nb,), torch.float32),
                      "state2": (shape, torch.uint8), "absmax2": ((nb,), torch.float32)}
        if self.master_weights and p.dtype in LOW_PRECISION:
            layout["master"] = (shape, torch.float32)
        return layout

    def _qmaps_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The signed (m) and unsigned (v) dynamic maps on ``device``, built once per device."""
        if device not in self._qmaps:
            self._qmaps[device] = (create_dynamic_map(signed=True).to(device),
                                   create_dynamic_map(signed=False).to(device))
        return self._qmaps[device]

    def _check_grads(self, grads: list[torch.Tensor]) -> None:
        if not grads:
            return
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).cpu()  # one device sync per step
        if not bool(finite.all()):
            i = int((~finite).nonzero()[0, 0])
            raise ValueError(f"{type(self).__name__}.step: gradient {i} (in param-group order, among parameters "
                             f"with a gradient) has NaN/inf values, which cannot be stored in 8-bit states; "
                             f"nothing was updated. Skip this step (e.g. on a non-finite loss or grad norm) or "
                             f"lower the learning rate")

    def _update(self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], step: float,
                group: dict) -> None:
        beta1, beta2 = group["betas"]
        qmap1, qmap2 = self._qmaps_on(p.device)
        adamw8bit_update_(p, grad, state, step, group["lr"], beta1, beta2, group["eps"], group["weight_decay"],
                          qmap1, qmap2, self.rounding)


class PagedAdamW8bit(AdamW8bit):
    """:class:`AdamW8bit` with its states paged to host memory (``state_home="host"`` by default).

    Arguments and state as :class:`AdamW8bit`.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, min_8bit_size: int = MIN_8BIT_SIZE, rounding: str = "nearest",
                 state_home: str = "host", min_paged_size: int = DEFAULT_MIN_PAGED_SIZE,
                 master_weights: bool = True):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         min_8bit_size=min_8bit_size, rounding=rounding, state_home=state_home,
                         min_paged_size=min_paged_size, master_weights=master_weights)
