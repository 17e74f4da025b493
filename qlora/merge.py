"""Merging a QLoRA adapter, three ways, each with its error against the unmerged QLoRA model.

A QLoRA adapter was trained against the *dequantized* NF4 weights W_nf4 (QLoRA, Dettmers et al. 2023, eq. 5-6:
``Y = X doubleDequant(c1, c2, W_nf4) + X L1 L2``), so merging it exactly means W_nf4 + scaling * B @ A. Choices:

``base="nf4-dequant"`` (default)
    W_nf4 (dequantized, fp32) + dW, rounded once to ``dtype``. Equal to the unmerged QLoRA model up to
    float rounding: the weights the adapter was trained against.
``base="original"``
    W_orig + dW, with W_orig the 16/32-bit checkpoint the NF4 base was quantized from. The adapter never saw
    W_orig, so the result differs from the QLoRA model by the base's quantization error W_orig - W_nf4 (it may
    be better or worse on the task; the report measures it). The checkpoint is checked to really be that
    base: re-quantizing it must reproduce the NF4 codes (``min_code_agreement``).
``requantize="nf4"``
    the merged weight quantized back to NF4 with the base's settings, for a 4-bit deployment. With the
    nf4-dequant base this is what PEFT's ``merge_and_unload`` on a bitsandbytes 4-bit model gives (same
    bytes; layers without an adapter keep their codes), and it can erase the adapter: W_nf4 sits exactly on the
    NF4 grid, so an update smaller than half a step rounds straight back to the old codes (on SmolLM2 after 30
    updates, 3e-7 of the codes changed and the held-out gain was lost; docs/qlora.md, "Merging a QLoRA adapter").
    Quantizing ``original`` + update instead keeps most of the gain.

:func:`merge_report` measures, on held-out batches, the largest absolute logit difference and the held-out
loss change of a merged model against the unmerged QLoRA model.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from finetune_ref.lora.adapters import merge_and_unload, set_adapter
from finetune_ref.lora.base_weight import RequantizationDrift, requantization_drift, warn_requantization
from finetune_ref.lora.inject import (embedding_layers, get_active_adapters, get_lora_configs, inject_lora,
                                      lora_layers, token_layers)
from finetune_ref.models.checkpoint import parse_dtype
from finetune_ref.models.loader import dequantize_linears, load_model
from finetune_ref.models.llama import LlamaForCausalLM
from finetune_ref.qlora.model import nf4_layers, quantize_model
from finetune_ref.qlora.nf4 import quantize_nf4, unpack_nibbles

MERGE_BASES = ("nf4-dequant", "original")
REQUANTIZE_CHOICES = ("none", "nf4")


def dequantize_model(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Replace, in place, every NF4Linear (LoRA base layers included) by an ``nn.Linear`` with its dequantized
    weight (frozen), in ``dtype`` (default: each layer's original dtype). Returns ``model``."""
    return dequantize_linears(model, nf4_layers(model), dtype)


def _model_dtype(model: nn.Module) -> torch.dtype:
    emb = getattr(getattr(model, "model", None), "embed_tokens", None)
    return emb.weight.dtype if emb is not None else torch.float32


@torch.no_grad()
def merge_qlora(model: LlamaForCausalLM, *, base: str = "nf4-dequant",
                original: str | Path | LlamaForCausalLM | None = None, requantize: str = "none",
                dtype: torch.dtype | str | None = None, adapter_names: Optional[Sequence[str]] = None,
                untie_tied: bool = False, min_code_agreement: float = 0.999) -> LlamaForCausalLM:
    """Merge the (active) LoRA adapters of a QLoRA model into a new plain or 4-bit model; ``model`` is unchanged.

    Args:
        model: a model with NF4 base layers and LoRA adapters (``qlora.model.prepare_qlora_model``, or
            ``load_quantized`` + ``lora.load_adapter``).
        base: "nf4-dequant" (the dequantized NF4 weights; default) or "original" (a 16/32-bit checkpoint).
        original: with base="original": the checkpoint directory (or a loaded ``LlamaForCausalLM``).
        requantize: "none" (a dense model) or "nf4" (quantize the merged linear layers back to NF4 with the
            base's blocksize and double-quant setting).
        dtype: dtype of the result's dense tensors (default: the QLoRA model's embedding dtype). Merging itself
            is done in fp32 and rounded once.
        adapter_names: adapters to merge (default: the active ones).
        untie_tied: as ``lora.merge_and_unload`` (an adapter on a tied lm_head).
        min_code_agreement: with base="original", the share of NF4 codes that re-quantizing the original must
            reproduce in every layer (1.0 = all; a different checkpoint agrees on far fewer).

    Returns:
        The merged ``LlamaForCausalLM`` (eval mode): dense, or with NF4 linear layers when requantize="nf4".

    Raises:
        ValueError: unknown base/requantize; base="original" without ``original`` or with a checkpoint that
            does not match the NF4 base (config, shapes or codes); a model without adapters or NF4 layers.
        TypeError: unsupported dtype.

    Warns:
        RequantizationWarning: with requantize="nf4", the fraction of the merged update the NF4 weights kept
            (``lora.base_weight.RequantizationDrift``; ``finetune merge`` prints the same line).
    """
    if base not in MERGE_BASES:
        raise ValueError(f"base must be one of {MERGE_BASES}, got {base!r}")
    if requantize not in REQUANTIZE_CHOICES:
        raise ValueError(f"requantize must be one of {REQUANTIZE_CHOICES}, got {requantize!r}")
    if base == "original" and original is None:
        raise ValueError("base='original' needs the original 16/32-bit checkpoint (original=DIR)")
    if base != "original" and original is not None:
        raise ValueError("original= is only used with base='original'")
    if not lora_layers(model):
        raise ValueError("the model carries no LoRA adapter to merge")
    quantized = nf4_layers(model)
    if not quantized:
        raise ValueError("the model has no NF4 layer; for a LoRA model on a dense base use lora.merge_and_unload")
    dtype = _model_dtype(model) if dtype is None else parse_dtype(dtype)
    names = get_active_adapters(model) if adapter_names is None else list(adapter_names)
    settings = quantized[0][1]
    quantized_names = [n.removesuffix(".base_layer") for n, _ in quantized]

    if base == "nf4-dequant" and requantize == "nf4":
        # PEFT's 4-bit merge: adapted layers are dequantized, merged and re-quantized with their own settings
        # (lora.layer.write_dense_weight -> NF4Linear.requantize_); other layers keep their codes.
        merged = merge_and_unload(copy.deepcopy(model), names, untie_tied=untie_tied)
        return _to_dtype(merged, dtype).eval()
    if base == "nf4-dequant":
        merged = dequantize_model(copy.deepcopy(model), torch.float32)
    else:
        merged = _original_with_adapters(model, original, names, min_code_agreement)
    deltas = adapter_deltas(merged, names) if requantize == "nf4" else {}
    merged = _to_dtype(merge_and_unload(merged, names, untie_tied=untie_tied), dtype)  # fp32 merge, one rounding
    if requantize == "nf4":
        skip = [n for n, m in merged.named_modules() if type(m) is nn.Linear and n not in quantized_names]
        quantize_merged(merged, deltas, blocksize=settings.blocksize, double_quant=settings.double_quant,
                        compute_dtype=settings.compute_dtype, skip_modules=skip, stacklevel=5)
    return merged.eval()


@torch.no_grad()
def adapter_deltas(model: nn.Module, adapter_names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Each LoRA layer's merged update (sum of scaling * B @ A over ``adapter_names``, fp32, (out, in)), by the
    name its base layer has after ``merge_and_unload``; for ``quantize_merged``'s drift."""
    deltas = {}
    for name, layer in lora_layers(model):
        own = [layer.get_delta_weight(n) for n in adapter_names if n in layer.adapter_names]
        if own:
            deltas[name] = sum(own[1:], own[0])
    return deltas


def quantize_merged(merged: LlamaForCausalLM, deltas: dict[str, torch.Tensor], stacklevel: int = 3,
                    **quantize_kwargs) -> RequantizationDrift:
    """``quantize_model(merged, **quantize_kwargs)`` after a merge, warning with the fraction of the merged
    updates ``deltas`` (``adapter_deltas``, taken before the merge) that the NF4 weights kept.

    Returns the drift summed over the adapted layers (``lora.base_weight.RequantizationDrift``); it is also the
    ``RequantizationWarning``'s ``.drift``, which ``finetune merge`` prints.
    """
    intended = {name: merged.get_submodule(name).weight for name in deltas}  # (out, in) each, before quantizing
    quantize_model(merged, **quantize_kwargs)
    drift = RequantizationDrift(0, 0.0, 0.0, 0.0, 0.0)
    for name, delta in deltas.items():
        layer = merged.get_submodule(name)
        if callable(getattr(layer, "dequantize", None)):  # skipped layers stay dense: nothing re-quantized there
            drift = drift + requantization_drift(intended.pop(name), layer.dequantize(torch.float32), delta)
    if drift.layers:
        warn_requantization(drift, stacklevel)
    return drift


def _to_dtype(model: LlamaForCausalLM, dtype: torch.dtype) -> LlamaForCausalLM:
    # nn.Module.to(dtype) casts floating tensors only, NF4Linear keeps its packed codes and fp32 state, and the
    # RoPE inverse frequencies stay fp32 (models.rope.RotaryEmbedding._apply).
    return model.to(dtype)


def _original_with_adapters(model: LlamaForCausalLM, original, names: list[str],
                            min_code_agreement: float) -> LlamaForCausalLM:
    """The original checkpoint (fp32) carrying copies of ``model``'s adapters, after checking it is the base."""
    orig = load_model(original, dtype=torch.float32) if isinstance(original, (str, Path)) else \
        copy.deepcopy(original).float()
    if not isinstance(orig, LlamaForCausalLM):
        raise TypeError(f"original must be a directory or a LlamaForCausalLM, got {type(original).__name__}")
    ours, theirs = model.config.to_dict(), orig.config.to_dict()
    differ = sorted(k for k in ours if k != "torch_dtype" and ours.get(k) != theirs.get(k))
    if differ:
        raise ValueError(f"the original checkpoint's config differs from the QLoRA model's in {differ}")
    check_original_matches(model, orig, min_code_agreement)
    layers = dict(lora_layers(model))
    for name, config in get_lora_configs(model).items():
        dtype = next(layer.lora_A[name].weight.dtype for layer in layers.values() if name in layer.lora_A)
        inject_lora(orig, config, adapter_name=name, adapter_dtype=dtype, strict_patterns=False)
        for layer_name, layer in lora_layers(orig):
            if name in layer.lora_A:
                layer.lora_A[name].weight.copy_(layers[layer_name].lora_A[name].weight)
                layer.lora_B[name].weight.copy_(layers[layer_name].lora_B[name].weight)
                if name in layer.lora_magnitude_vector:  # DoRA's m (lora.dora)
                    layer.lora_magnitude_vector[name].weight.copy_(
                        layers[layer_name].lora_magnitude_vector[name].weight)
        embeddings = dict(embedding_layers(model) + token_layers(model))  # never quantized: LoRA on embed_tokens
        for layer_name, layer in embedding_layers(orig) + token_layers(orig):  # (lora.embedding), trained rows
            for table in ("lora_embedding_A", "lora_embedding_B", "trainable_tokens_delta"):
                if name in getattr(layer, table, {}):
                    getattr(layer, table)[name].copy_(getattr(embeddings[layer_name], table)[name])
    set_adapter(orig, names)
    return orig


def check_original_matches(model: nn.Module, original: nn.Module, min_code_agreement: float = 0.999) -> float:
    """Check that each NF4 layer of ``model`` is the quantization of the same layer of ``original``.

    The original weight is cast to the NF4 state's dtype and quantized with the layer's settings; the share of
    4-bit codes equal to the stored ones must be at least ``min_code_agreement`` in every layer (exactly 1.0
    when the NF4 base was made from this checkpoint; unrelated weights agree on far fewer).

    Returns:
        The smallest agreement over the layers.

    Raises:
        ValueError: a layer is missing or misshapen in ``original``, or agrees on too few codes (named).
    """
    worst = 1.0
    for name, layer in nf4_layers(model):
        plain = name.removesuffix(".base_layer")
        try:
            target = original.get_submodule(plain)
        except AttributeError:
            raise ValueError(f"the original checkpoint has no module {plain}") from None
        target = getattr(target, "base_layer", target)
        weight = getattr(target, "weight", None)
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (layer.out_features, layer.in_features):
            raise ValueError(f"{plain}: the original weight is not a dense ({layer.out_features}, "
                             f"{layer.in_features}) tensor")
        state = layer.quant_state
        packed, _ = quantize_nf4(weight.detach().to(state.dtype), blocksize=state.blocksize,
                                 double_quant=state.nested)
        n = state.numel
        agreement = float((unpack_nibbles(packed, n) == unpack_nibbles(layer.weight, n)).float().mean())
        if agreement < min_code_agreement:
            raise ValueError(f"{plain}: re-quantizing the original weight reproduces only {agreement:.2%} of the NF4 "
                             f"codes (need {min_code_agreement:.2%}); this is not the checkpoint the 4-bit base was "
                             "quantized from (or it was quantized in another dtype or blocksize)")
        worst = min(worst, agreement)
    return worst


@torch.no_grad()
def merge_report(reference: nn.Module, merged: nn.Module, batches: Iterable[dict]) -> dict[str, float]:
    """Error of a merged model against the unmerged QLoRA model on held-out batches.

    Args:
        reference: the unmerged QLoRA model. merged: the result of :func:`merge_qlora`.
        batches: dicts with ``input_ids`` and ``labels`` (B, T) and optional ``attention_mask``,
            ``position_ids``, ``document_ids`` (``train.data.iter_batches``).

    Returns:
        ``logits_max_abs``: max |logits_merged - logits_reference| over real (non-padding) positions, fp32;
        ``loss_reference`` / ``loss_merged``: held-out mean NLL in nats per label token;
        ``loss_change``: loss_merged - loss_reference; ``tokens``: label tokens evaluated.

    Raises:
        ValueError: the batches hold no label token.
    """
    keys = ("input_ids", "attention_mask", "position_ids", "document_ids", "labels")
    modes = (reference.training, merged.training)
    reference.eval()
    merged.eval()
    max_abs, nll_ref, nll_merged, tokens = 0.0, 0.0, 0.0, 0
    try:
        for batch in batches:
            inputs = {k: batch[k] for k in keys if k in batch}
            out_ref = reference(**inputs, num_items_in_batch=1)  # loss = summed NLL
            out_merged = merged(**inputs, num_items_in_batch=1)
            diff = (out_merged.logits.float() - out_ref.logits.float()).abs()  # (B, T, V)
            if "attention_mask" in batch:
                diff = diff[batch["attention_mask"].bool()]  # (real tokens, V)
            if diff.numel():
                max_abs = max(max_abs, float(diff.max()))
            nll_ref += float(out_ref.loss)
            nll_merged += float(out_merged.loss)
            tokens += int((batch["labels"][:, 1:] != -100).sum())
    finally:
        reference.train(modes[0])
        merged.train(modes[1])
    if tokens == 0:
        raise ValueError("merge_report: the batches hold no label token")
    loss_ref, loss_merged = nll_ref / tokens, nll_merged / tokens
    if not (math.isfinite(loss_ref) and math.isfinite(loss_merged)):
        raise ValueError(f"merge_report: non-finite held-out loss (reference {loss_ref}, merged {loss_merged})")
    return {"logits_max_abs": max_abs, "loss_reference": loss_ref, "loss_merged": loss_merged,
            "loss_change": loss_merged - loss_ref, "tokens": tokens}


__all__ = ["MERGE_BASES", "REQUANTIZE_CHOICES", "adapter_deltas", "check_original_matches", "dequantize_model",
           "merge_qlora", "merge_report", "quantize_merged"]
