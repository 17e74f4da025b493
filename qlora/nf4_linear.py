"""NF4Linear: a frozen NF4-quantized linear layer, the base layer QLoRA adapters sit on.

QLoRA (Dettmers et al. 2023), section 3, eq. (5)-(6): the base weight is stored as NF4 with double
quantization and dequantized on the fly to the compute dtype (bf16 by default) for each matmul:
``Y = X_bf16 @ doubleDequant(c1, c2, W_nf4)^T``. The matmul is the kernels' autograd op
(``kernels/nf4_autograd.py``: ``NF4MatmulFunction``; Triton's fused kernels for CUDA tensors, the PyTorch
reference otherwise). Only the input gradient flows through the base (the weight is frozen), and it is
computed by dequantizing again in backward, so the only tensor kept for backward is the packed 4-bit
weight: no dequantized copy stays alive between forward and backward, as in bitsandbytes' ``MatMul4Bit``
(``autograd/_functions.py``).

The quantization state's tensors are non-persistent buffers (so ``.to(device)``, FSDP and friends move
them), and the :class:`NF4QuantState` over them is built once: at construction, ``load_state_dict`` and
``requantize_``, and again in ``_apply`` only when a device move replaced the buffers. ``forward``
re-validates nothing; it asserts that the input is floating with ``in_features`` features.

Dtypes: the input is cast to ``compute_dtype``, the matmul and bias add run there, and the output
is cast back to the input dtype (as ``bnb.nn.Linear4bit`` and ``nn.Linear`` do), so the layer is a
drop-in replacement for ``nn.Linear``. The bias is kept in its own dtype (a frozen Parameter) and
cast per call; it is not quantized.

State dict: ``state_dict()`` writes bitsandbytes' keys (``weight``, ``weight.absmax``,
``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map``,
``weight.quant_state.bitsandbytes__nf4``, ``bias``) through :mod:`qlora.bnb_format`, and
``load_state_dict()`` reads them strictly.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

import torch
from torch import nn

from finetune_ref.kernels.backend import resolve_backend
from finetune_ref.kernels.nf4_autograd import NF4MatmulFunction
from finetune_ref.qlora.bnb_format import check_bias, check_linear_state, from_bnb_state_dict, to_bnb_state_dict
from finetune_ref.kernels.reference import check_packed
from finetune_ref.kernels.reference import dequantize_nf4
from finetune_ref.qlora.nf4 import quantize_nf4
from finetune_ref.models.checkpoint import SUPPORTED_DTYPES
from finetune_ref.qlora.quant_state import NF4QuantState

_STATE_BUFFERS = ("absmax", "quant_map", "offset", "nested_absmax", "nested_quant_map")


class NF4Linear(nn.Module):
    """A linear layer whose weight is frozen NF4 (+ double quantization); see the module docstring.

    Args:
        weight: uint8 packed NF4 codes, ``((out * in + 1) // 2, 1)`` (from :func:`qlora.nf4.quantize_nf4`).
        quant_state: its :class:`NF4QuantState`; ``quant_state.shape`` must be ``(out_features, in_features)``.
        bias: optional floating ``(out_features,)`` tensor, kept frozen (``requires_grad=False``).
        compute_dtype: dtype of the matmul: torch.bfloat16 (default), torch.float16 or torch.float32.

    Attributes:
        in_features, out_features (int), blocksize (int), double_quant (bool), compute_dtype,
        weight (the packed uint8 buffer), bias (Parameter or None), quant_state (the cached
        :class:`NF4QuantState`, whose tensors are this module's buffers).

    Raises:
        TypeError / ValueError: inconsistent weight, state or bias, or an unsupported compute dtype.
    """

    def __init__(self, weight: torch.Tensor, quant_state: NF4QuantState, bias: Optional[torch.Tensor] = None,
                 compute_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        if compute_dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"NF4Linear: compute_dtype must be one of {SUPPORTED_DTYPES}, got {compute_dtype}")
        check_linear_state(quant_state, "NF4Linear")
        check_packed(weight, quant_state, "NF4Linear weight")
        check_bias(bias, quant_state, "NF4Linear bias")
        self.out_features, self.in_features = quant_state.shape
        self.compute_dtype = compute_dtype
        self.register_buffer("weight", weight.reshape(quant_state.packed_shape))
        self._set_state(quant_state)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype = torch.bfloat16) -> "NF4Linear":
        """Quantize an ``nn.Linear`` (its weight in fp32, bf16 or fp16) into an NF4Linear on the same device.

        The linear is not modified. Its bias is copied unquantized.

        Raises:
            TypeError: ``linear`` is not an ``nn.Linear``, or its weight dtype is unsupported.
            ValueError: unsupported blocksize, or non-finite weights.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"NF4Linear.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        packed, state = quantize_nf4(linear.weight.detach(), blocksize=blocksize, double_quant=double_quant)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(packed, state, bias, compute_dtype=compute_dtype)

    @classmethod
    def from_bnb_state_dict(cls, state_dict: Mapping[str, torch.Tensor], prefix: str = "",
                            compute_dtype: torch.dtype = torch.bfloat16) -> "NF4Linear":
        """Build an NF4Linear from bitsandbytes-layout entries at ``prefix`` (strict; see :mod:`qlora.bnb_format`)."""
        packed, state, bias = from_bnb_state_dict(state_dict, prefix)
        return cls(packed, state, bias, compute_dtype=compute_dtype)

    # ------------------------------------------------------------------------------ state
    def _set_state(self, state: NF4QuantState) -> None:
        self.blocksize, self.double_quant = state.blocksize, state.nested
        tensors = state.tensors()
        for name in _STATE_BUFFERS:
            # Non-persistent: _save_to_state_dict writes them under bitsandbytes' key names.
            self.register_buffer(name, tensors.get(name), persistent=False)
        self._quant_state = state  # its tensors are the buffers just registered

    @property
    def quant_state(self) -> NF4QuantState:
        """The quantization state over this module's buffers (built once, not per call; see the module docstring)."""
        return self._quant_state

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dequantized weight ``(out_features, in_features)`` in ``dtype`` (default: the original dtype)."""
        return dequantize_nf4(self.weight, self._quant_state, dtype=dtype)

    def dequantize_into(self, out: torch.Tensor) -> torch.Tensor:
        """Write the dequantized weight into ``out`` ((out_features, in_features), in out's dtype: rows of the
        workspace that stacks q/k/v or gate/up for one matmul, models/fused.py); returns ``out``."""
        return dequantize_nf4(self.weight, self._quant_state, out=out)

    def matmul_backend(self, x: torch.Tensor) -> str:
        """The NF4 implementation a call on x would use: "triton" (fused kernels) or "torch" (the reference)."""
        return resolve_backend(x, self.weight)

    @torch.no_grad()
    def requantize_(self, weight: torch.Tensor) -> None:
        """Replace the stored weight by the NF4 quantization of ``weight`` (out, in), with this layer's blocksize
        and double quantization. Merging LoRA into a 4-bit base goes through here (``lora.layer.write_dense_weight``),
        as PEFT's ``bnb.Linear4bit.merge`` does; it is lossy, so unmerging does not restore the original codes."""
        packed, state = quantize_nf4(weight, blocksize=self.blocksize, double_quant=self.double_quant)
        self.load_state_dict(to_bnb_state_dict(packed, state, self.bias), strict=True)

    def _apply(self, fn, recurse: bool = True):
        # model.to(torch.bfloat16) / .half() would cast the fp32 absmax, maps and offset and corrupt
        # the state. Let devices move but keep the state's dtypes (and exact values).
        before = {name: self._buffers[name] for name in _STATE_BUFFERS if self._buffers.get(name) is not None}
        result = super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        buffers = {name: self._buffers[name] for name in self._quant_state.tensors()}
        if any(buffers[name] is not t for name, t in self._quant_state.tensors().items()):
            # A device move made new tensors: the state is rebuilt over them (and checked) once, here.
            self._quant_state = dataclasses.replace(self._quant_state, **buffers)
        return result

    # ------------------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W^T + b``: x (..., in_features) floating -> (..., out_features) in x's dtype.

        Raises:
            TypeError: x is not floating point.
            ValueError: x's last dimension is not ``in_features``.
        """
        if not x.is_floating_point():
            raise TypeError(f"NF4Linear: input must be floating point, got {x.dtype}")
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"NF4Linear: input last dimension must be {self.in_features}, got shape {tuple(x.shape)}")
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        x_c = x.to(self.compute_dtype)
        # The inputs of the op were checked when the layer was built; only the backend is chosen per call
        # (kernels.set_backend / KERNELS_BACKEND: Triton for CUDA tensors when installed, else the reference).
        out = NF4MatmulFunction.apply(x_c, self.weight, self._quant_state, bias, resolve_backend(x_c, self.weight))
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}, compute_dtype={self.compute_dtype}")

    # ------------------------------------------------------------------------------ state dict (bitsandbytes layout)
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        entries = to_bnb_state_dict(self.weight, self._quant_state, self.bias, prefix)
        for key, value in entries.items():
            destination[key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        mine = [k for k in state_dict if k.startswith(prefix)]
        weight_keys = [k for k in mine if k == prefix + "weight" or k.startswith(prefix + "weight.")]
        if not weight_keys:
            missing_keys.append(prefix + "weight")
        else:
            try:
                packed, state, bias = from_bnb_state_dict(state_dict, prefix)
            except (ValueError, TypeError) as e:
                error_msgs.append(str(e))
                return
            if tuple(state.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"size mismatch for {prefix}weight: checkpoint shape {tuple(state.shape)}, "
                                  f"module shape {(self.out_features, self.in_features)}")
                return
            device = self.weight.device
            self.weight = packed.to(device).clone()
            self._set_state(state.to(device))
        bias_key = prefix + "bias"
        if self.bias is not None:
            if bias_key not in state_dict:
                missing_keys.append(bias_key)
            elif tuple(state_dict[bias_key].shape) != tuple(self.bias.shape):
                error_msgs.append(f"size mismatch for {bias_key}: checkpoint shape "
                                  f"{tuple(state_dict[bias_key].shape)}, module shape {tuple(self.bias.shape)}")
            else:
                with torch.no_grad():
                    self.bias.copy_(state_dict[bias_key])
        if strict:
            allowed = set(weight_keys) | ({bias_key} if self.bias is not None else set())
            unexpected_keys.extend(k for k in mine if k not in allowed)
