"""One LoRA layer and one QLoRA layer against PEFT (+ bitsandbytes ``Linear4bit`` for QLoRA).

The same base weight and the same adapter weights (PEFT's, made non-zero with ``init_lora_weights=False``,
copied into ours) see the same input and the same upstream gradient. Compared: the output, the input
gradient, the gradient of every adapter tensor, and (LoRA) the weight after ``merge_and_unload``.
Variants: plain, rsLoRA, a GQA-shaped k/v projection (out = kv_heads * head_dim < in), dropout with the
same seed on both sides, and every LoRA option our ``LoraConfig`` has that PEFT names the same way (e.g.
``use_dora``) when it is there.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from finetune_ref.lora import LoraConfig, inject_lora, lora_layers, merge_and_unload
from finetune_ref.parity import oracles
from finetune_ref.parity.metrics import divergence, dtype_name
from finetune_ref.parity.report import Row, make_row
from finetune_ref.qlora.nf4_linear import NF4Linear

HIDDEN, KV_OUT = 128, 64  # in_features; a GQA k/v projection's out_features (2 of 4 heads of 32)


class _Holder(nn.Module):
    """A model of one linear layer named ``proj``, for PEFT's ``get_peft_model``."""

    def __init__(self, layer: nn.Module, loaded_in_4bit: bool = False):
        super().__init__()
        self.proj = layer
        self.is_loaded_in_4bit = loaded_in_4bit  # PEFT dispatches bitsandbytes layers on this flag

    def forward(self, x):
        return self.proj(x)


def lora_variants() -> dict[str, dict]:
    """Variant name -> (LoRA kwargs, out_features); options our LoraConfig lacks are left out."""
    variants = {"plain": (dict(r=8, lora_alpha=16), HIDDEN),
                "rslora": (dict(r=8, lora_alpha=16, use_rslora=True), HIDDEN),
                "gqa-kv": (dict(r=4, lora_alpha=12), KV_OUT),
                "dropout": (dict(r=8, lora_alpha=16, lora_dropout=0.25), HIDDEN)}
    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    if "use_dora" in fields:
        variants["dora"] = (dict(r=8, lora_alpha=16, use_dora=True), HIDDEN)
    return variants


def _forward_backward(model: nn.Module, x: torch.Tensor, grad_y: torch.Tensor, seed: int):
    """Output, input gradient and {adapter tensor name: gradient} for one forward/backward."""
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # the dropout mask
    y = model(x)
    y.backward(grad_y.to(y.dtype))
    grads = {n.removeprefix(oracles.PEFT_PREFIX): p.grad for n, p in model.named_parameters() if p.requires_grad}
    return y.detach(), x.grad, grads


def _compare(prefix: str, case: str, peer: str, ours, theirs, must_be_bitwise: bool) -> list[Row]:
    (y, gx, grads), (y_ref, gx_ref, grads_ref) = ours, theirs
    if set(grads) != set(grads_ref):
        raise AssertionError(f"{prefix} {case}: trainable tensors differ: {sorted(grads)} vs {sorted(grads_ref)}")
    rows = [make_row(f"{prefix}.forward", case, peer, dtype_name(y_ref.dtype), divergence(y, y_ref),
                     must_be_bitwise),
            make_row(f"{prefix}.grad_input", case, peer, dtype_name(gx_ref.dtype), divergence(gx, gx_ref),
                     must_be_bitwise)]
    for name in sorted(grads_ref):
        part = name.split(".")[-3] if name.endswith(".weight") else name.split(".")[-2]  # lora_A / lora_B / ...
        rows.append(make_row(f"{prefix}.grad_{part}", case, peer, dtype_name(grads_ref[name].dtype),
                             divergence(grads[name], grads_ref[name]), must_be_bitwise))
    return rows


def _inputs(dtype: torch.dtype, out_features: int):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, HIDDEN, generator=g).to(dtype)  # (batch, tokens, in)
    grad_y = torch.randn(2, 5, out_features, generator=g)  # (batch, tokens, out)
    return x, grad_y


def check_lora_layer(dtype: torch.dtype) -> list[Row]:
    """LoRA on an nn.Linear of ``dtype`` (adapters in fp32, as PEFT's autocast_adapter_dtype) against PEFT."""
    rows = []
    for name, (kwargs, out_features) in lora_variants().items():
        torch.manual_seed(0)
        base = _Holder(nn.Linear(HIDDEN, out_features, bias=False).to(dtype))
        pm = oracles.peft_lora(base, target_modules=["proj"], **kwargs)
        ours = copy.deepcopy(base)
        inject_lora(ours, LoraConfig(target_modules=["proj"], **kwargs))
        oracles.copy_peft_adapter_into(ours, pm)
        train = kwargs.get("lora_dropout", 0) > 0
        pm.train(train)
        ours.train(train)
        x, grad_y = _inputs(dtype, out_features)
        case = f"{name} r{kwargs['r']} ({out_features}x{HIDDEN})"
        # fp32 without dropout or DoRA: the same operations in the same order, so bitwise is the claim.
        exact = dtype == torch.float32 and name in ("plain", "rslora", "gqa-kv")
        rows += _compare("lora", case, "peft", _forward_backward(ours, x, grad_y, 5),
                         _forward_backward(pm, x, grad_y, 5), exact)
        with torch.no_grad():
            merged = merge_and_unload(ours).proj.weight
            merged_ref = pm.merge_and_unload().proj.weight
        rows.append(make_row("lora.merged_weight", case, "peft", dtype_name(dtype), divergence(merged, merged_ref)))
    return rows


def check_qlora_layer(compute_dtype: torch.dtype) -> list[Row]:
    """QLoRA (NF4 + double quant base, fp32 adapters) against PEFT on bitsandbytes' Linear4bit."""
    torch.manual_seed(0)
    linear = nn.Linear(HIDDEN, HIDDEN, bias=False)  # in_features a multiple of 64: bnb's native kernel is right
    theirs = _Holder(oracles.bnb_linear4bit(linear, compute_dtype), loaded_in_4bit=True)
    pm = oracles.peft_lora(theirs, target_modules=["proj"], r=8, lora_alpha=16)
    ours = _Holder(NF4Linear.from_linear(linear, compute_dtype=compute_dtype))
    inject_lora(ours, LoraConfig(target_modules=["proj"], r=8, lora_alpha=16))
    oracles.copy_peft_adapter_into(ours, pm)
    if not lora_layers(ours):
        raise AssertionError("no LoRA layer injected")
    x, grad_y = _inputs(compute_dtype, HIDDEN)
    case = f"nf4+dq bs64 r8 ({HIDDEN}x{HIDDEN}) compute {dtype_name(compute_dtype)}"
    return _compare("qlora", case, "peft+bnb", _forward_backward(ours, x, grad_y, 5),
                    _forward_backward(pm, x, grad_y, 5), False)
