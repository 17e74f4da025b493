"""bitsandbytes' state-dict layout for one 4-bit (NF4) linear layer, to and from our (packed, state, bias).

bitsandbytes (``nn.Linear4bit._save_to_state_dict``) and transformers' 4-bit checkpoints store a
quantized linear ``<prefix>`` as::

    <prefix>weight                                   uint8 ((n + 1) // 2, 1)  packed NF4 codes
    <prefix>weight.absmax                            fp32 (blocks,) or uint8 (blocks,) with double quant
    <prefix>weight.quant_map                         fp32 (16,)
    <prefix>weight.nested_absmax                     fp32 (ceil(blocks / 256),)       double quant only
    <prefix>weight.nested_quant_map                  fp32 (256,)                      double quant only
    <prefix>weight.quant_state.bitsandbytes__nf4     uint8 JSON bytes (quant_type, blocksize, dtype, shape,
                                                     nested_blocksize, nested_dtype, nested_offset)
    <prefix>bias                                     optional, unquantized

These functions are the single place that knows the layout; :class:`qlora.nf4_linear.NF4Linear`'s
``state_dict()`` / ``load_state_dict()`` and whole-model save/load go through them. Loading is strict:
a weight without its quantization entries, or with only some of them, is an error, never a silent
fallback to garbage.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch

from finetune_ref.kernels.reference import check_packed  # the one packed-bytes check (also public here)
from finetune_ref.qlora.quant_state import PACKED_STATE_KEY, NF4QuantState

WEIGHT = "weight"
BIAS = "bias"
_STATE_SUFFIXES_PLAIN = ("absmax", "quant_map", PACKED_STATE_KEY)
_STATE_SUFFIXES_NESTED = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", PACKED_STATE_KEY)


def bnb_linear_keys(prefix: str = "", double_quant: bool = True, bias: bool = False) -> list[str]:
    """The state-dict keys of one 4-bit linear at ``prefix`` (e.g. ``"model.layers.0.self_attn.q_proj."``)."""
    suffixes = _STATE_SUFFIXES_NESTED if double_quant else _STATE_SUFFIXES_PLAIN
    keys = [prefix + WEIGHT] + [f"{prefix}{WEIGHT}.{s}" for s in suffixes]
    return keys + ([prefix + BIAS] if bias else [])


def to_bnb_state_dict(packed: torch.Tensor, state: NF4QuantState, bias: Optional[torch.Tensor] = None,
                      prefix: str = "") -> dict[str, torch.Tensor]:
    """One quantized linear as bitsandbytes' state-dict entries (tensors only, ready for safetensors).

    Args:
        packed: uint8 packed codes of shape ``state.packed_shape``.
        state: its :class:`NF4QuantState` (2-D shape ``(out_features, in_features)``).
        bias: optional ``(out_features,)`` bias, stored as is.
        prefix: key prefix, ending with ``"."`` unless empty.

    Returns:
        Dict of the keys listed in the module docstring. Tensors are shared, not copied.

    Raises:
        TypeError / ValueError: ``packed`` or ``bias`` do not fit ``state``, or ``state`` is not 2-D.
    """
    check_linear_state(state)
    check_packed(packed, state)
    check_bias(bias, state)
    out = {prefix + WEIGHT: packed}
    if bias is not None:
        out[prefix + BIAS] = bias
    for key, value in state.to_dict(packed=True).items():
        out[f"{prefix}{WEIGHT}.{key}"] = value
    return out


def has_bnb_weight(state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> bool:
    """True when ``state_dict`` holds a 4-bit NF4 weight at ``prefix`` (its packed JSON state is present)."""
    return f"{prefix}{WEIGHT}.{PACKED_STATE_KEY}" in state_dict


def bnb_linear_prefixes(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Prefixes of all 4-bit NF4 linears in a state dict, in key order (e.g. ``"model.layers.0.mlp.up_proj."``)."""
    tail = f"{WEIGHT}.{PACKED_STATE_KEY}"
    return [k[: -len(tail)] for k in state_dict if k.endswith(tail)]


def from_bnb_state_dict(state_dict: Mapping[str, torch.Tensor], prefix: str = ""
                        ) -> tuple[torch.Tensor, NF4QuantState, Optional[torch.Tensor]]:
    """Read one quantized linear at ``prefix`` from a bitsandbytes-layout state dict.

    Only the keys ``<prefix>weight``, ``<prefix>weight.*`` and ``<prefix>bias`` are read; other keys
    are ignored (the caller decides what is unexpected).

    Returns:
        ``(packed, state, bias)``: packed uint8 codes reshaped to ``state.packed_shape``, the state,
        and the bias or None. Tensors are not copied.

    Raises:
        ValueError: the packed weight or any quantization entry is missing, unknown entries sit under
            ``<prefix>weight.``, the weight is not 2-D, or sizes disagree.
        TypeError: an entry has the wrong dtype (e.g. a weight stored in a quant_storage other than uint8).
    """
    weight_key = prefix + WEIGHT
    sub = f"{weight_key}."
    entries = {k[len(sub):]: v for k, v in state_dict.items() if k.startswith(sub)}
    if weight_key not in state_dict:
        raise ValueError(f"4-bit checkpoint: {weight_key!r} (the packed NF4 codes) is missing"
                         + (f" but {sorted(entries)} are present" if entries else ""))
    if not entries:
        raise ValueError(f"4-bit checkpoint: {weight_key!r} has no quantization state ({weight_key}.absmax, "
                         f"{weight_key}.{PACKED_STATE_KEY}, ...); it is not a bitsandbytes 4-bit weight")
    if PACKED_STATE_KEY not in entries:
        raise ValueError(f"4-bit checkpoint: {weight_key}.{PACKED_STATE_KEY} is missing (found {sorted(entries)})")
    try:
        state = NF4QuantState.from_dict(entries)
    except (ValueError, TypeError) as e:
        raise type(e)(f"4-bit checkpoint entry {weight_key!r}: {e}") from e
    check_linear_state(state, weight_key)
    packed = state_dict[weight_key]
    check_packed(packed, state, weight_key)
    bias = state_dict.get(prefix + BIAS)
    check_bias(bias, state, prefix + BIAS)
    return packed.reshape(state.packed_shape), state, bias


def check_linear_state(state: NF4QuantState, name: str = "quantized weight") -> None:
    """Raise TypeError/ValueError unless ``state`` is an NF4QuantState of a 2-D (out, in) weight."""
    if not isinstance(state, NF4QuantState):
        raise TypeError(f"{name}: expected an NF4QuantState, got {type(state).__name__}")
    if len(state.shape) != 2:
        raise ValueError(f"{name} has shape {tuple(state.shape)}; a linear weight is 2-D (out_features, in_features)")


def check_bias(bias: Optional[torch.Tensor], state: NF4QuantState, name: str = "bias") -> None:
    """Raise TypeError/ValueError unless ``bias`` is None or a floating ``(out_features,)`` tensor."""
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {getattr(bias, 'dtype', type(bias))}")
    if tuple(bias.shape) != (state.shape[0],):
        raise ValueError(f"{name} must have shape ({state.shape[0]},), got {tuple(bias.shape)}")
