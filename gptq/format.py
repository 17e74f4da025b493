"""The GPTQ checkpoint layout (AutoGPTQ / GPTQModel / transformers+optimum / vLLM): packing, unpacking, dequantize.

A quantized ``nn.Linear`` named ``p`` (weight W: (out, in)) is stored as four tensors (plus ``p.bias`` if any):

``p.qweight``  int32 (in * bits / 32, out)
    The codes, transposed to (in, out), packed along the *input* dimension. Read each column j as a bit
    stream: code k (input channel k) occupies bits [k*bits, (k+1)*bits) of the stream, least significant
    bit first, and word r of the column is stream bits [32r, 32r + 32) (bit 0 = the word's least significant
    bit). For 4 bits that is ``qweight[r, j] = sum_m codes[j, 8r + m] << 4m``: eight codes per word, the
    first in the low nibble, so codes 0,1,..,7 give 0x76543210. 2 and 8 bits: 16 and 4 codes per word.
    3 bits: 32 codes fill exactly 3 words and two codes straddle words: code 10 has its low two bits in
    bits 30-31 of word 0 and its high bit in bit 0 of word 1; code 21 has its low bit in bit 31 of word 1
    and its high two bits in bits 0-1 of word 2 (AutoGPTQ's ``pack`` writes the same bits with explicit
    shifts). Words are stored as signed int32 (two's complement of the same 32 bits).
    Needs ``in * bits`` to be a multiple of 32 (in % 8 == 0 for 4 bits, in % 32 == 0 for 3 bits).
``p.qzeros``   int32 (n_groups, out * bits / 32)
    The zero points (n_groups, out), packed the same way along the *output* dimension. Needs ``out * bits``
    to be a multiple of 32. ``checkpoint_format="gptq"`` (v1, what AutoGPTQ wrote and what transformers,
    optimum, vLLM and exllama read) stores ``(zero - 1) mod 2^bits``, a historical off-by-one; readers add 1
    back. ``"gptq_v2"`` (GPTQModel) stores the zero point itself. A zero point of 0 (asymmetric grid, a group
    with no weight below -scale/2) is stored as 2^bits - 1 in v1; this module reads it back exactly
    (``(stored + 1) mod 2^bits``), but readers that add 1 without the modulo (GPTQModel's v1->v2 conversion,
    which adds 0x11111111 to each 4-bit word, and exllama) misread those groups, and GPTQModel refuses
    asymmetric v1 files not written by itself. Symmetric grids (zero = 2^(bits-1)) and v2 have no such case,
    so :class:`GPTQConfig` defaults to v1 for symmetric and v2 for asymmetric grids.
``p.scales``   float16 (n_groups, out)
``p.g_idx``    int32 (in,)
    The group of each input channel: ``i // group_size`` (``n_groups = ceil(in / group_size)``; the last group
    may be shorter), or any map for act-order (``desc_act``) models.

Dequantize: ``W[j, i] = scales[g_idx[i], j] * (code[j, i] - zero[g_idx[i], j])``.

``config.json`` carries ``quantization_config`` (transformers' ``GPTQConfig.to_dict()`` spelling:
``quant_method: "gptq"``, ``bits``, ``group_size`` (-1 = per channel), ``desc_act``, ``sym``, ``damp_percent``,
``true_sequential``, ``static_groups``, ``checkpoint_format``) and the directory also holds the same object as
``quantize_config.json`` (AutoGPTQ's and GPTQModel's file). :class:`GPTQConfig` reads and writes both.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import torch

from finetune_ref.gptq.gptq import (DEFAULT_DAMP_PERCENT, DEFAULT_GROUP_SIZE, SCALE_DTYPE, SUPPORTED_BITS,
                                     QuantizedWeight, check_bits, check_group_size)

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
GPTQ_KEYS = ("qweight", "qzeros", "scales", "g_idx")
METHODS = ("gptq", "rtn")
QUANTIZER_NAME = "finetune-ref"


# --------------------------------------------------------------------------------------------------------
# Bit packing: little-endian bit streams of `bits`-bit codes cut into 32-bit words
# --------------------------------------------------------------------------------------------------------
def _check_packable(n: int, bits: int, what: str) -> None:
    if (n * bits) % 32 != 0:
        step = 32 // math.gcd(32, bits)
        raise ValueError(f"{what} = {n} cannot be packed at {bits} bits: the GPTQ layout packs codes into int32 "
                         f"words, so it must be a multiple of {step}; leave this layer unquantized "
                         "(skip_modules) or pick another bit width")


def _bit_positions(n: int, bits: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = torch.arange(n, device=device, dtype=torch.int64) * bits  # first stream bit of each code
    return offsets // 32, offsets % 32  # (n,) word index, (n,) shift inside the word


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes (n, m) in [0, 2^bits) along dim 0 into int32 words (n * bits / 32, m).

    See the module docstring for the bit order. Raises ValueError for an unpackable n, codes out of range,
    or a non-integer dtype.
    """
    maxq = check_bits(bits)
    if codes.dim() != 2 or codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"codes must be a 2-D integer tensor, got {codes.dtype} of shape {tuple(codes.shape)}")
    n, m = codes.shape
    _check_packable(n, bits, "the packed dimension")
    v = codes.to(torch.int64)
    if n and (int(v.min()) < 0 or int(v.max()) > maxq):
        raise ValueError(f"codes must lie in [0, {maxq}] for {bits} bits, got [{int(v.min())}, {int(v.max())}]")
    word, shift = _bit_positions(n, bits, v.device)
    words = torch.zeros(n * bits // 32, m, dtype=torch.int64, device=v.device)
    # Fields never overlap, so adding them is OR-ing them.
    words.index_add_(0, word, (v << shift[:, None]) & 0xFFFFFFFF)  # the bits that fit in the code's word
    spill = shift + bits > 32  # 3 bits only: the code's high bits continue in the next word
    if bool(spill.any()):
        words.index_add_(0, word[spill] + 1, v[spill] >> (32 - shift[spill])[:, None])
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)  # same 32 bits, signed


def unpack_codes(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 words (n * bits / 32, m) -> uint8 codes (n, m) (int16 never needed).

    Every int32 word pattern is a valid packing, so ``pack_codes(unpack_codes(w)) == w`` bitwise.
    """
    maxq = check_bits(bits)
    if words.dim() != 2 or words.dtype != torch.int32:
        raise ValueError(f"packed words must be a 2-D int32 tensor, got {words.dtype} of shape {tuple(words.shape)}")
    if (words.shape[0] * 32) % bits:
        raise ValueError(f"{words.shape[0]} int32 words do not hold a whole number of {bits}-bit codes")
    n = words.shape[0] * 32 // bits
    u = words.to(torch.int64) & 0xFFFFFFFF  # (rows, m) unsigned view of the 32 bits
    word, shift = _bit_positions(n, bits, u.device)
    v = u[word] >> shift[:, None]  # (n, m): the code's low bits at the bottom
    spill = shift + bits > 32
    if bool(spill.any()):
        v[spill] |= u[word[spill] + 1] << (32 - shift[spill])[:, None]
    return (v & maxq).to(torch.uint8)


# --------------------------------------------------------------------------------------------------------
# One layer: QuantizedWeight <-> qweight / qzeros / scales / g_idx
# --------------------------------------------------------------------------------------------------------
def _check_format(checkpoint_format: str) -> None:
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")


def pack_gptq(q: QuantizedWeight, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """``{"qweight", "qzeros", "scales", "g_idx"}`` of a quantized weight, in the GPTQ layout.

    Raises:
        ValueError: in_features * bits or out_features * bits not a multiple of 32 (the message says which), an
            unknown checkpoint_format, or scales that are not fp16 values.
    """
    _check_format(checkpoint_format)
    maxq = check_bits(q.bits)
    out_f, in_f = q.shape
    _check_packable(in_f, q.bits, "in_features")
    _check_packable(out_f, q.bits, "out_features")
    scales = q.scales.to(SCALE_DTYPE)
    if not torch.equal(scales.float(), q.scales.float()):
        raise ValueError("scales are not exactly representable in fp16 (quantize with gptq.gptq, which rounds them)")
    zeros = q.zeros.to(torch.int64)
    if checkpoint_format == "gptq":
        zeros = (zeros - 1) & maxq  # v1 stores zero - 1 (mod 2^bits)
    return {
        "qweight": pack_codes(q.codes.t(), q.bits),  # (out, in) -> (in, out) -> (in * bits / 32, out)
        "qzeros": pack_codes(zeros.t(), q.bits).t().contiguous(),  # (groups, out) -> (groups, out * bits / 32)
        "scales": scales.contiguous(),
        "g_idx": q.g_idx.to(torch.int32).contiguous(),
    }


def check_gptq_tensors(tensors: Mapping[str, torch.Tensor], bits: int, name: str = "layer") -> tuple[int, int, int]:
    """Validate a layer's GPTQ tensors; return (out_features, in_features, n_groups). Raises ValueError naming
    the tensor and what was expected."""
    check_bits(bits)
    missing = [k for k in GPTQ_KEYS if k not in tensors]
    if missing:
        raise ValueError(f"{name}: missing GPTQ tensors {missing} (a GPTQ layer needs {list(GPTQ_KEYS)})")
    qweight, qzeros, scales, g_idx = (tensors[k] for k in GPTQ_KEYS)
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(f"{name}.qweight must be 2-D int32, got {qweight.dtype} {tuple(qweight.shape)}")
    in_f, out_f = qweight.shape[0] * 32 // bits, qweight.shape[1]
    if (qweight.shape[0] * 32) % bits:
        raise ValueError(f"{name}.qweight has {qweight.shape[0]} rows, not a whole number of {bits}-bit codes")
    if not scales.is_floating_point() or scales.dim() != 2 or scales.shape[1] != out_f or scales.shape[0] < 1:
        raise ValueError(f"{name}.scales must be floating (n_groups, {out_f}), got {scales.dtype} "
                         f"{tuple(scales.shape)}")
    n_groups = scales.shape[0]
    if qzeros.dtype != torch.int32 or tuple(qzeros.shape) != (n_groups, out_f * bits // 32):
        raise ValueError(f"{name}.qzeros must be int32 ({n_groups}, {out_f * bits // 32}), got {qzeros.dtype} "
                         f"{tuple(qzeros.shape)}")
    if g_idx.dtype.is_floating_point or tuple(g_idx.shape) != (in_f,):
        raise ValueError(f"{name}.g_idx must be an integer ({in_f},) tensor, got {g_idx.dtype} {tuple(g_idx.shape)}")
    if in_f and (int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups):
        raise ValueError(f"{name}.g_idx values must lie in [0, {n_groups}), got [{int(g_idx.min())}, "
                         f"{int(g_idx.max())}]")
    if not bool(torch.isfinite(scales).all()):
        raise ValueError(f"{name}.scales holds NaN or inf")
    return out_f, in_f, n_groups


def unpack_gptq(tensors: Mapping[str, torch.Tensor], bits: int, group_size: int,
                checkpoint_format: str = "gptq", name: str = "layer") -> QuantizedWeight:
    """The :class:`QuantizedWeight` stored in a layer's GPTQ tensors (inverse of :func:`pack_gptq`).

    ``group_size`` is informational (from the config); ``g_idx`` decides the grouping. Raises ValueError as
    :func:`check_gptq_tensors`.
    """
    _check_format(checkpoint_format)
    check_group_size(group_size)
    maxq = check_bits(bits)
    check_gptq_tensors(tensors, bits, name)
    codes = unpack_codes(tensors["qweight"], bits).t().contiguous()  # (in, out) -> (out, in)
    zeros = unpack_codes(tensors["qzeros"].t().contiguous(), bits).t()  # (groups, out)
    if checkpoint_format == "gptq":
        zeros = ((zeros.to(torch.int64) + 1) & maxq).to(torch.uint8)  # undo v1's zero - 1
    return QuantizedWeight(codes, tensors["scales"].float(), zeros.contiguous(), tensors["g_idx"].to(torch.int32),
                           bits, group_size)


def dequantize_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                    bits: int, checkpoint_format: str = "gptq", dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The dense (out, in) weight of a GPTQ layer, in ``dtype`` (default: the scales' dtype, fp16).

    ``W[j, i] = scales[g_idx[i], j] * (code[j, i] - zero[g_idx[i], j])``, in fp32, rounded once to ``dtype``.
    Raises ValueError for inconsistent tensors (see :func:`check_gptq_tensors`).
    """
    tensors = {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx}
    q = unpack_gptq(tensors, bits, -1, checkpoint_format)
    return q.dequantize(scales.dtype if dtype is None else dtype)


# --------------------------------------------------------------------------------------------------------
# quantization_config / quantize_config.json
# --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GPTQConfig:
    """GPTQ settings, and the ``quantization_config`` object of a GPTQ checkpoint.

    Attributes:
        bits: 2, 3, 4 (default) or 8.
        group_size: input columns per (scale, zero) group, default 128; -1 = one group per output row.
        sym: symmetric grid (zero = 2^(bits-1)); default False (asymmetric, with zero points).
        desc_act: activation order (columns by decreasing diag(H)); default False.
        damp_percent: Hessian dampening as a fraction of its mean diagonal; default 0.01.
        true_sequential: inside a decoder layer, quantize q/k/v, then o, then gate/up, then down, each with
            inputs that went through the already-quantized ones; default True.
        checkpoint_format: "gptq" (v1: the widest reader support) or "gptq_v2" (GPTQModel's). Default (None):
            "gptq" for a symmetric grid, "gptq_v2" for an asymmetric one, because v1 cannot carry a zero point
            of 0 through GPTQModel's v1->v2 conversion and GPTQModel refuses asymmetric v1 files from other
            quantizers (checked with gptqmodel 7.3.6; see the module docstring).
        method: "gptq" (default) or "rtn" (round to nearest on the same grid: the baseline). Stored under
            ``meta`` (the layout is the same).
    """

    bits: int = 4
    group_size: int = DEFAULT_GROUP_SIZE
    sym: bool = False
    desc_act: bool = False
    damp_percent: float = DEFAULT_DAMP_PERCENT
    true_sequential: bool = True
    checkpoint_format: Optional[str] = None
    method: str = "gptq"

    def __post_init__(self) -> None:
        if self.checkpoint_format is None:
            object.__setattr__(self, "checkpoint_format", "gptq" if self.sym is True else "gptq_v2")
        check_bits(self.bits)
        check_group_size(self.group_size)
        for field in ("sym", "desc_act", "true_sequential"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"GPTQConfig.{field} must be true/false, got {getattr(self, field)!r}")
        if isinstance(self.damp_percent, bool) or not isinstance(self.damp_percent, (int, float)) \
                or not 0 <= self.damp_percent <= 1:
            raise ValueError(f"GPTQConfig.damp_percent must be a number in [0, 1], got {self.damp_percent!r}")
        _check_format(self.checkpoint_format)
        if self.method not in METHODS:
            raise ValueError(f"GPTQConfig.method must be one of {METHODS}, got {self.method!r}")
        if self.method == "rtn" and self.desc_act:
            raise ValueError("desc_act (activation order) needs calibration data; RTN has none: set desc_act=False")

    def to_dict(self) -> dict[str, Any]:
        """The ``quantization_config`` / ``quantize_config.json`` object."""
        return {
            "quant_method": "gptq",
            "bits": self.bits,
            "group_size": self.group_size,
            "desc_act": self.desc_act,
            "sym": self.sym,
            "damp_percent": self.damp_percent,
            "true_sequential": self.true_sequential,
            "static_groups": False,
            "checkpoint_format": self.checkpoint_format,
            "lm_head": False,
            "meta": {"quantizer": [QUANTIZER_NAME], "method": self.method},
        }

    @classmethod
    def from_dict(cls, d: Any) -> "GPTQConfig":
        """Read a ``quantization_config`` (or ``quantize_config.json``) object.

        Raises:
            ValueError: not GPTQ, an unsupported bit width or checkpoint format, static groups, a quantized
                lm_head, or a malformed field (named).
        """
        if not isinstance(d, dict):
            raise ValueError(f"quantization_config must be a JSON object, got {type(d).__name__}")
        method = d.get("quant_method", "gptq")
        if method != "gptq":
            raise ValueError(f"quantization_config.quant_method is {method!r}, not 'gptq'")
        if d.get("static_groups", False):
            raise ValueError("quantization_config.static_groups=true is not supported")
        if d.get("lm_head", False):
            raise ValueError("quantization_config.lm_head=true (a quantized output head) is not supported")
        # "format" is GPTQModel's older spelling of checkpoint_format.
        fmt = d.get("checkpoint_format", d.get("format", "gptq"))
        meta = d.get("meta") if isinstance(d.get("meta"), dict) else {}
        try:
            return cls(bits=d.get("bits", 4), group_size=d.get("group_size", DEFAULT_GROUP_SIZE),
                       sym=d.get("sym", True), desc_act=d.get("desc_act", False),
                       damp_percent=d.get("damp_percent", DEFAULT_DAMP_PERCENT),
                       true_sequential=d.get("true_sequential", True), checkpoint_format=fmt,
                       method=meta.get("method", "gptq") if meta.get("method") in METHODS else "gptq")
        except ValueError as e:
            raise ValueError(f"quantization_config: {e}") from e


__all__ = ["CHECKPOINT_FORMATS", "GPTQ_KEYS", "GPTQConfig", "SUPPORTED_BITS", "check_gptq_tensors", "dequantize_gptq",
           "pack_codes", "pack_gptq", "unpack_codes", "unpack_gptq"]
