"""GPTQLinear: a frozen linear layer stored in the GPTQ checkpoint layout, dequantized on the fly.

The layer holds ``qweight``, ``qzeros``, ``scales`` and ``g_idx`` as buffers under exactly those names (the
layout of :mod:`gptq.format`), so ``state_dict()`` writes what AutoGPTQ / GPTQModel / transformers
write and ``load_state_dict()`` reads it. Each forward dequantizes the weight to the input's dtype and calls
``F.linear`` (the weight-only "dequantize then matmul" of the torch kernels in AutoGPTQ and GPTQModel);
no dense copy is kept between calls. Backward recomputes the dense weight for the input gradient, so only
the packed tensors are saved for it (as NF4Linear in qlora/nf4_linear.py does): adapters can be trained
on top of a GPTQ base. The weight itself is frozen.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from finetune_ref.gptq.gptq import QuantizedWeight, check_bits, check_group_size
from finetune_ref.gptq.format import CHECKPOINT_FORMATS, GPTQ_KEYS, check_gptq_tensors, pack_gptq, unpack_gptq


def _dequantize(qweight, qzeros, scales, g_idx, bits, checkpoint_format, dtype) -> torch.Tensor:
    tensors = {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx}
    return unpack_gptq(tensors, bits, -1, checkpoint_format).dequantize(dtype)  # (out, in)


class GPTQLinearFunction(torch.autograd.Function):
    """``y = x @ dequant(W)^T + b`` with a frozen GPTQ weight; backward dequantizes W again.

    forward(x, qweight, qzeros, scales, g_idx, bits, checkpoint_format, bias): x (..., in) floating; bias (out,)
    in x's dtype or None. Returns (..., out) in x's dtype.
    """

    @staticmethod
    def forward(ctx: Any, x, qweight, qzeros, scales, g_idx, bits, checkpoint_format, bias):
        weight = _dequantize(qweight, qzeros, scales, g_idx, bits, checkpoint_format, x.dtype)  # (out, in)
        ctx.save_for_backward(qweight, qzeros, scales, g_idx)
        ctx.bits, ctx.checkpoint_format, ctx.has_bias = bits, checkpoint_format, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        qweight, qzeros, scales, g_idx = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = _dequantize(qweight, qzeros, scales, g_idx, ctx.bits, ctx.checkpoint_format, grad_out.dtype)
            grad_x = grad_out @ weight  # (..., out) @ (out, in) -> (..., in)
        if ctx.has_bias and ctx.needs_input_grad[7]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)  # (N, out) -> (out,)
        return grad_x, None, None, None, None, None, None, grad_bias


class GPTQLinear(nn.Module):
    """A linear layer whose weight is stored in the GPTQ layout; a drop-in replacement for ``nn.Linear``.

    Args:
        in_features, out_features: the layer's shape (``in * bits`` and ``out * bits`` multiples of 32).
        bits: 2, 3, 4 or 8. group_size: columns per group or -1 (informational: ``g_idx`` decides).
        checkpoint_format: "gptq" (v1: qzeros hold zero - 1) or "gptq_v2".
        bias: whether the layer has a (frozen, unquantized) bias.
        device: where the (zero-filled) buffers are allocated; fill them with :meth:`from_quantized` or
            ``load_state_dict``.

    Buffers: ``qweight`` int32 (in * bits / 32, out), ``qzeros`` int32 (n_groups, out * bits / 32),
    ``scales`` fp16 (n_groups, out), ``g_idx`` int32 (in,); parameter ``bias`` (out,) or None.

    Raises:
        ValueError: unsupported bits, group_size or format, or a shape that the layout cannot pack.
    """

    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: int = 128,
                 checkpoint_format: str = "gptq", bias: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        check_bits(bits)
        check_group_size(group_size)
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")
        for what, n in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(n, bool) or not isinstance(n, int) or n <= 0 or (n * bits) % 32:
                raise ValueError(f"GPTQLinear: {what}={n!r} must be a positive multiple of {32 // (bits & -bits)} "
                                 f"at {bits} bits (codes are packed into int32 words)")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.checkpoint_format = bits, group_size, checkpoint_format
        n_groups = 1 if group_size == -1 else -(-in_features // group_size)
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32,
                                                    device=device))
        self.register_buffer("qzeros", torch.zeros(n_groups, out_features * bits // 32, dtype=torch.int32,
                                                   device=device))
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=torch.float16, device=device))
        g = in_features if group_size == -1 else group_size
        self.register_buffer("g_idx", (torch.arange(in_features, device=device) // g).to(torch.int32))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_quantized(cls, q: QuantizedWeight, bias: Optional[torch.Tensor] = None,
                       checkpoint_format: str = "gptq") -> "GPTQLinear":
        """Pack a :class:`QuantizedWeight` (from ``gptq_quantize`` / ``rtn_quantize``) into a layer on its device.

        ``bias`` (out,) is copied unquantized, frozen, in its own dtype. Raises ValueError as :func:`pack_gptq`.
        """
        out_f, in_f = q.shape
        tensors = pack_gptq(q, checkpoint_format)
        layer = cls(in_f, out_f, q.bits, q.group_size, checkpoint_format, bias=bias is not None,
                    device=q.codes.device)
        if tensors["scales"].shape != layer.scales.shape:
            raise ValueError(f"the quantized weight has {tensors['scales'].shape[0]} groups; group_size="
                             f"{q.group_size} over {in_f} columns means {layer.scales.shape[0]}")
        layer.qweight.copy_(tensors["qweight"])
        layer.qzeros.copy_(tensors["qzeros"])
        layer.scales.copy_(tensors["scales"])
        layer.g_idx.copy_(tensors["g_idx"])
        if bias is not None:
            if tuple(bias.shape) != (out_f,):
                raise ValueError(f"bias must have shape ({out_f},), got {tuple(bias.shape)}")
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    def quantized_weight(self) -> QuantizedWeight:
        """The unpacked codes, scales, zero points and g_idx."""
        return unpack_gptq(self._tensors(), self.bits, self.group_size, self.checkpoint_format)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight (out_features, in_features) in ``dtype``."""
        return _dequantize(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.checkpoint_format,
                           dtype)

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "qzeros": self.qzeros, "scales": self.scales, "g_idx": self.g_idx}

    def _apply(self, fn, recurse: bool = True):
        # model.to(torch.bfloat16) must not cast the fp16 scales (the layout fixes their dtype); devices move.
        scales = self.scales
        result = super()._apply(fn, recurse)
        if self.scales.dtype != scales.dtype:
            self.scales = scales.to(self.scales.device)
        return result

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W^T + b``: x (..., in_features) floating -> (..., out_features) in x's dtype.

        Raises: TypeError (x not floating), ValueError (wrong last dimension).
        """
        if not x.is_floating_point():
            raise TypeError(f"GPTQLinear: input must be floating point, got {x.dtype}")
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"GPTQLinear: input last dimension must be {self.in_features}, got shape "
                             f"{tuple(x.shape)}")
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return GPTQLinearFunction.apply(x, self.qweight, self.qzeros, self.scales, self.g_idx, self.bits,
                                        self.checkpoint_format, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}, group_size={self.group_size}, checkpoint_format={self.checkpoint_format}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Check the four tensors together (shapes must agree with each other and with this layer) before any
        # is copied, so a bad checkpoint is refused whole; the number of groups may differ from the default.
        tensors = {k: state_dict[prefix + k] for k in GPTQ_KEYS if prefix + k in state_dict}
        if len(tensors) == 4:
            try:
                out_f, in_f, n_groups = check_gptq_tensors(tensors, self.bits, prefix.rstrip("."))
            except ValueError as e:
                error_msgs.append(str(e))
                return
            if (out_f, in_f) != (self.out_features, self.in_features):
                error_msgs.append(f"size mismatch for {prefix}qweight: checkpoint layer is ({out_f}, {in_f}), "
                                  f"module is ({self.out_features}, {self.in_features})")
                return
            if tensors["scales"].dtype != torch.float16:
                error_msgs.append(f"{prefix}scales must be float16 (the GPTQ layout), got {tensors['scales'].dtype}")
                return
            if n_groups != self.scales.shape[0]:
                self.scales = torch.zeros(n_groups, out_f, dtype=torch.float16, device=self.scales.device)
                self.qzeros = torch.zeros(tuple(tensors["qzeros"].shape), dtype=torch.int32, device=self.qzeros.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def gptq_layers(model: nn.Module) -> list[tuple[str, GPTQLinear]]:
    """(name, layer) of every GPTQLinear in ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, GPTQLinear)]
