"""GPTQ: post-training weight quantization with second-order error compensation, and its RTN baseline.

Frantar, Ashkboos, Hoefler, Alistarh 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers" (arXiv:2210.17323). For one linear layer ``y = x W^T`` (W: (out, in)) and
calibration inputs X (n tokens, in), GPTQ looks for a quantized Q that minimises the layer's output error

    || X W^T - X Q^T ||_F^2  =  n/2 * tr((W - Q) H (W - Q)^T),      H = 2 X^T X / n   (section 3, eq. 1)

Every row of W shares H, so all rows are processed together, one input column at a time, in a fixed order
(section 4, "Step 1: arbitrary order insight"). Quantizing column q leaves an error that the optimal brain
surgeon update spreads over the columns not yet quantized (section 3, eq. 2-3):

    err = (w_q - quant(w_q)) / [H^-1]_qq,        W[:, later] -= err * [H^-1]_{q, later}

Using the upper Cholesky factor U of H^-1 (H^-1 = U^T U) gives the rows of the successively reduced inverse
Hessians directly, so H^-1 is computed once (section 4, "Step 3: Cholesky reformulation"). Updates inside a
block of ``blocksize`` columns are applied immediately; the rest of the matrix receives them once per block
as one matrix product ("Step 2: lazy batch-updates", Algorithm 1). The diagonal of H is dampened by
``damp_percent`` times its mean first (1% by default, as in the paper) so the Cholesky factorization is
stable.

The grid ("asymmetric min-max", the reference code's ``quant.py``): for each output row and each group of
``group_size`` input columns (or the whole row when ``group_size == -1``, per-channel)

    scale = (xmax - xmin) / maxq,  xmin = min(0, min w),  xmax = max(0, max w),  maxq = 2^bits - 1
    zero  = round(-xmin / scale)                             (an integer in [0, maxq])
    code  = clamp(round(w / scale) + zero, 0, maxq),          dequant = scale * (code - zero)

or, with ``sym=True``, ``scale = 2 max|w| / maxq`` and ``zero = (maxq + 1) / 2`` (the reference grid: it can
represent -(maxq+1)/2 * scale .. (maxq-1)/2 * scale). The scale is rounded to fp16 *before* the codes are chosen,
because the checkpoint stores it in fp16 (:mod:`gptq.format`): the error GPTQ compensates is then the
error of the weights that are actually served. Group parameters are fitted on the group's current
(already error-compensated) weights when its first column comes up, as the reference does; every group start
is made a block boundary so those weights are up to date.

With ``act_order=True`` columns are processed by decreasing diag(H) (the reference's ``--act-order``,
GPTQModel's ``desc_act``); groups are then consecutive in that order and ``g_idx`` maps each input column to
its group. Two deliberate differences from the reference code: an input column that never fires in
calibration (diag(H) = 0) keeps its weight (it is quantized to nearest) instead of being zeroed, since other
inputs may use it; and ``sym=True`` always uses the symmetric range (the reference shrinks it for an
all-positive group).

:func:`rtn_quantize` is plain round-to-nearest on the same grid: the baseline, and exactly what
:func:`gptq_quantize` returns when H is diagonal (no off-diagonal term carries error forward).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
DEFAULT_GROUP_SIZE = 128
DEFAULT_BLOCKSIZE = 128  # lazy-batch width of the paper (Algorithm 1, B = 128)
DEFAULT_DAMP_PERCENT = 0.01  # lambda = 1% of the mean diagonal (section 4, "Cholesky reformulation")
SCALE_DTYPE = torch.float16  # the dtype of `scales` in the GPTQ checkpoint layout
_FP16_MAX = torch.finfo(torch.float16).max
_FP16_TINY = torch.finfo(torch.float16).tiny  # smallest normal fp16: the smallest scale we use


# --------------------------------------------------------------------------------------------------------
# The result: integer codes plus the per-group grid
# --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class QuantizedWeight:
    """A weight quantized on a per-group asymmetric integer grid (unpacked; see :mod:`gptq.format`).

    Attributes:
        codes: (out, in) uint8, integer codes in [0, 2^bits - 1], in the original column order.
        scales: (n_groups, out) float32, every value exactly representable in fp16.
        zeros: (n_groups, out) uint8, integer zero points in [0, 2^bits - 1].
        g_idx: (in,) int32, the group of each input column (``i // group_size`` unless act-order was used).
        bits: 2, 3, 4 or 8. group_size: columns per group, or -1 (one group per row: per-channel).
        perm: (in,) int64, the order the columns were quantized in (None: natural order).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int
    perm: Optional[torch.Tensor] = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``scales[g_idx[i], j] * (codes[j, i] - zeros[g_idx[i], j])`` as an (out, in) tensor in ``dtype``.

        Computed in fp32 and rounded once to ``dtype``; for fp16 this equals the fp16 arithmetic GPTQ kernels
        use (the exact product of an fp16 scale and a small integer fits in fp32).
        """
        g = self.g_idx.long()
        scale = self.scales.float().t()[:, g]  # (out, n_groups) -> (out, in)
        zero = self.zeros.float().t()[:, g]  # (out, in)
        return (scale * (self.codes.float() - zero)).to(dtype)


# --------------------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------------------
def check_bits(bits: int) -> int:
    """Return ``2^bits - 1``; ValueError unless bits is one of SUPPORTED_BITS."""
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return 2 ** bits - 1


def check_group_size(group_size: int) -> None:
    """ValueError unless group_size is a positive int or -1 (per-channel)."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or not (group_size > 0 or group_size == -1):
        raise ValueError(f"group_size must be a positive integer or -1 (one group per row), got {group_size!r}")


def find_params(w: torch.Tensor, bits: int, sym: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row grid of a block of weights (the reference ``Quantizer.find_params``, see the module docstring).

    Args:
        w: (rows, cols) floating, finite.
        bits: 2, 3, 4 or 8. sym: symmetric grid with the middle zero point.
    Returns:
        scale (rows,) float32, rounded to fp16 values and at least fp16's smallest normal; zero (rows,) float32
        holding integers in [0, 2^bits - 1].
    Raises:
        ValueError: the scale would overflow fp16 (|w| larger than about 65504 * maxq / 2).
    """
    maxq = check_bits(bits)
    w = w.float()
    xmin = torch.clamp(w.min(dim=1).values, max=0.0)  # (rows,) the grid always contains 0
    xmax = torch.clamp(w.max(dim=1).values, min=0.0)  # (rows,)
    if sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)  # an all-zero row: any grid works; the reference picks [-1, 1]
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    if bool((scale > _FP16_MAX).any()):
        raise ValueError(f"weights too large for an fp16 scale (max |w| = {w.abs().max().item():.3g}); "
                         "the GPTQ layout stores scales in fp16")
    scale = scale.to(SCALE_DTYPE).float().clamp(min=_FP16_TINY)  # the value the checkpoint will hold
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def quantize_to_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """``clamp(round(w / scale) + zero, 0, maxq)`` (round half to even), same shape as w, float.

    w (rows,) or (rows, cols); scale and zero (rows,) broadcast along the columns.
    """
    if w.dim() == 2:
        scale, zero = scale[:, None], zero[:, None]  # (rows,) -> (rows, 1)
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def _check_weight(weight: torch.Tensor, what: str = "weight") -> None:
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got "
                        f"{weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"{what} must be a non-empty 2-D (out_features, in_features) tensor, got shape "
                         f"{tuple(weight.shape)}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{what} holds NaN or inf; quantizing it would give a silently wrong layer")


def _group_count(in_features: int, group_size: int) -> tuple[int, int]:
    g = in_features if group_size == -1 else group_size
    return g, math.ceil(in_features / g)


# --------------------------------------------------------------------------------------------------------
# RTN: the baseline on the same grid
# --------------------------------------------------------------------------------------------------------
@torch.no_grad()
def rtn_quantize(weight: torch.Tensor, bits: int = 4, group_size: int = DEFAULT_GROUP_SIZE,
                 sym: bool = False) -> QuantizedWeight:
    """Round-to-nearest quantization of ``weight`` (out, in) on the GPTQ grid, groups of consecutive columns.

    The last group may be shorter when ``in`` is not a multiple of ``group_size``.

    Raises:
        TypeError: weight is not floating point. ValueError: bad shape, non-finite values, bad bits/group_size.
    """
    maxq = check_bits(bits)
    check_group_size(group_size)
    _check_weight(weight)
    W = weight.detach().float()
    out_f, in_f = W.shape
    g, n_groups = _group_count(in_f, group_size)
    codes = torch.empty(out_f, in_f, dtype=torch.uint8, device=W.device)
    scales = torch.empty(n_groups, out_f, dtype=torch.float32, device=W.device)
    zeros = torch.empty(n_groups, out_f, dtype=torch.uint8, device=W.device)
    for k in range(n_groups):
        block = W[:, k * g:(k + 1) * g]  # (out, <= g)
        scale, zero = find_params(block, bits, sym)
        codes[:, k * g:(k + 1) * g] = quantize_to_codes(block, scale, zero, maxq).to(torch.uint8)
        scales[k], zeros[k] = scale, zero.to(torch.uint8)
    g_idx = (torch.arange(in_f, device=W.device) // g).to(torch.int32)
    return QuantizedWeight(codes, scales, zeros, g_idx, bits, group_size)


# --------------------------------------------------------------------------------------------------------
# The Hessian H = 2 X^T X / n
# --------------------------------------------------------------------------------------------------------
class HessianAccumulator:
    """Accumulates ``H = 2 X^T X / n`` over batches of a layer's inputs (GPTQ section 3; the reference's
    ``add_batch``), as a running sum in float32 (or float64) divided by the token count at the end.

    Args:
        in_features: the layer's input width. device: where H lives. dtype: float32 (default) or float64.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features <= 0:
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"HessianAccumulator dtype must be float32 or float64, got {dtype}")
        self.in_features = in_features
        self.sum = torch.zeros(in_features, in_features, device=device, dtype=dtype)  # sum of x x^T
        self.tokens = 0

    def add_batch(self, x: torch.Tensor) -> None:
        """Add inputs x (..., in_features), any floating dtype; every leading position counts as one token.

        Raises: TypeError (not floating), ValueError (wrong last dimension, NaN/inf).
        """
        if not x.is_floating_point():
            raise TypeError(f"calibration inputs must be floating point, got {x.dtype}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"calibration inputs have last dimension {x.shape[-1]}, expected {self.in_features}")
        x = x.reshape(-1, self.in_features).to(self.sum.dtype)  # (..., in) -> (n, in)
        if not bool(torch.isfinite(x).all()):
            raise ValueError("calibration inputs hold NaN or inf (is the model itself producing them?)")
        self.sum.addmm_(x.t(), x)  # (in, n) @ (n, in)
        self.tokens += x.shape[0]

    def hessian(self) -> torch.Tensor:
        """``2 X^T X / n`` (in, in). Raises ValueError if no token was added."""
        if self.tokens == 0:
            raise ValueError("no calibration tokens reached this layer; give calibration data")
        return self.sum * (2.0 / self.tokens)


def output_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """The layer objective ``tr((W - Q) H (W - Q)^T) / 2`` = mean over calibration tokens of
    ``||x W^T - x Q^T||^2`` when H = 2 X^T X / n. weight, quantized (out, in); hessian (in, in)."""
    delta = (weight.double() - quantized.double())  # (out, in)
    return float(((delta @ hessian.double()) * delta).sum() / 2)


# --------------------------------------------------------------------------------------------------------
# GPTQ
# --------------------------------------------------------------------------------------------------------
def _check_hessian(hessian: torch.Tensor, in_features: int) -> None:
    if not isinstance(hessian, torch.Tensor) or not hessian.is_floating_point():
        raise TypeError("hessian must be a floating-point tensor (2 X^T X / n of the layer's inputs)")
    if tuple(hessian.shape) != (in_features, in_features):
        raise ValueError(f"hessian must be (in_features, in_features) = ({in_features}, {in_features}), got "
                         f"{tuple(hessian.shape)}")
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError("hessian holds NaN or inf")
    if bool((torch.diagonal(hessian) < 0).any()):
        raise ValueError("hessian has a negative diagonal entry; it must be 2 X^T X / n (positive semidefinite)")


def _inverse_cholesky_upper(H: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Dampen H in place, then return U upper-triangular with ``U^T U = H^-1`` (GPTQ section 4, step 3)."""
    damp = damp_percent * torch.mean(torch.diagonal(H))
    H.diagonal().add_(damp)
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        raise ValueError(f"the dampened Hessian is not positive definite (damp_percent={damp_percent}); raise "
                         "damp_percent (e.g. 0.1) or give more calibration tokens")
    Hinv = torch.cholesky_inverse(L)  # (in, in)
    U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
    if int(info) != 0:
        raise ValueError(f"the inverse Hessian lost positive definiteness to rounding (damp_percent="
                         f"{damp_percent}); raise damp_percent (e.g. 0.1)")
    return U


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int = 4, group_size: int = DEFAULT_GROUP_SIZE,
                  sym: bool = False, act_order: bool = False, damp_percent: float = DEFAULT_DAMP_PERCENT,
                  blocksize: int = DEFAULT_BLOCKSIZE) -> QuantizedWeight:
    """Quantize one layer's weight with GPTQ (Frantar et al. 2022, Algorithm 1).

    Args:
        weight: (out, in) floating. Computation is float32, or float64 if the weight is float64.
        hessian: (in, in) ``2 X^T X / n`` of the layer's calibration inputs (:class:`HessianAccumulator`).
        bits: 2, 3, 4 or 8. group_size: columns per group (the last may be shorter) or -1 (per-channel).
        sym: symmetric grid. act_order: process columns by decreasing diag(H) (``desc_act``).
        damp_percent: lambda / mean(diag(H)), in (0, 1]; 0 is allowed for a well-conditioned H.
        blocksize: lazy-batch width (changes only rounding order, not the result's maths).
    Returns:
        :class:`QuantizedWeight` (codes in the original column order; ``perm`` set when act_order).
    Raises:
        TypeError / ValueError: bad dtypes, shapes, non-finite values, bad settings, or an H that stays
        singular after dampening (the message says to raise damp_percent).
    """
    maxq = check_bits(bits)
    check_group_size(group_size)
    _check_weight(weight)
    out_f, in_f = weight.shape
    _check_hessian(hessian, in_f)
    if not isinstance(damp_percent, (int, float)) or isinstance(damp_percent, bool) or not 0 <= damp_percent <= 1:
        raise ValueError(f"damp_percent must be a number in [0, 1], got {damp_percent!r}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize <= 0:
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    W = weight.detach().to(dtype).clone()  # (out, in), updated in place as columns are quantized
    H = hessian.detach().to(device=W.device, dtype=dtype).clone()  # (in, in)

    dead = torch.diagonal(H) == 0  # inputs that never fire: no curvature, so no error to carry; RTN them
    H[dead, dead] = 1.0
    perm = None
    if act_order:
        # Largest diag(H) first (stable, so H = I keeps the natural order).
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    U = _inverse_cholesky_upper(H, damp_percent)  # (in, in), upper

    g, n_groups = _group_count(in_f, group_size)
    codes = torch.empty(out_f, in_f, dtype=torch.uint8, device=W.device)  # in processing order for now
    scales = torch.empty(n_groups, out_f, dtype=torch.float32, device=W.device)
    zeros = torch.empty(n_groups, out_f, dtype=torch.uint8, device=W.device)
    # Block boundaries: every `blocksize` columns and every group start, so a group's grid is fitted on
    # weights that already carry all the updates from earlier columns.
    starts = sorted(set(range(0, in_f, blocksize)) | set(range(0, in_f, g)))
    for i1, i2 in zip(starts, starts[1:] + [in_f]):
        W1 = W[:, i1:i2].clone()  # (out, count): this block, updated column by column
        Err1 = torch.zeros_like(W1)  # (out, count): scaled errors, for the lazy update of later blocks
        U1 = U[i1:i2, i1:i2]  # (count, count)
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:  # a group starts here (always at i == 0, see `starts`)
                k = col // g
                scale, zero = find_params(W[:, col:col + g], bits, sym)
                scales[k], zeros[k] = scale, zero.to(torch.uint8)
                scale, zero = scale.to(dtype), zero.to(dtype)
            w = W1[:, i]  # (out,)
            q = quantize_to_codes(w, scale, zero, maxq)
            codes[:, col] = q.to(torch.uint8)
            err = (w - scale * (q - zero)) / U1[i, i]  # (out,)
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]  # (out, 1) * (1, count - i)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # lazy batch update: (out, count) @ (count, rest)

    g_idx = (torch.arange(in_f, device=W.device) // g).to(torch.int32)  # group of the k-th processed column
    if perm is not None:
        ordered_codes, ordered_g = codes, g_idx
        codes = torch.empty_like(ordered_codes)
        codes[:, perm] = ordered_codes  # back to the original column order
        g_idx = torch.empty_like(ordered_g)
        g_idx[perm] = ordered_g
    return QuantizedWeight(codes, scales, zeros, g_idx, bits, group_size, perm)
