"""Whole-model GPTQ: layer-by-layer quantization of a model in memory (and RTN, its baseline).

Quantizing (GPTQ paper, section 5 and the reference ``llama.py``'s ``llama_sequential``): the calibration
sequences are embedded once, then the decoder layers are processed in order. For each layer the inputs are
the outputs of the *already quantized* earlier layers, so each layer's quantization also corrects for the
error the layers before it made. Inside a layer, with ``true_sequential`` (default) the linear layers are
quantized in four steps, q/k/v, o, gate/up, down, each step's Hessians collected from inputs that went
through the steps before it; q/k/v share one input and hence one Hessian, as do gate/up. Collecting a step's
inputs stops the layer's forward as soon as they are seen (a forward pre-hook raises), so the cost is about
three layer forwards per layer, plus one to produce the next layer's inputs. Padding positions never enter a
Hessian. ``lm_head`` (tied to the embedding in SmolLM2) stays unquantized, as in the paper and in GPTQ
checkpoints on the Hub.

Calibration data is the caller's: a (N, T) token tensor, or batches as ``train.data.collate`` makes them
(``input_ids`` with ``attention_mask``, ``position_ids`` and ``document_ids``), so packed text calibrates with
the document ids and positions training uses. ``finetune merge --requantize gptq4`` draws them from the
training split (``cli/merge.py``, ``calibration_examples``). Directories (saving, loading): :mod:`gptq.checkpoint`.
:func:`gptq_dequantize_model` turns the GPTQ layers back into plain ``nn.Linear`` with the
same numbers, for fast CPU generation (GPTQLinear unpacks its weight at every forward).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from finetune_ref.models.loader import dequantize_linears, module_matches
from finetune_ref.models.llama import LlamaForCausalLM, build_attention_mask
from finetune_ref.gptq.gptq import HessianAccumulator, gptq_quantize, output_error, rtn_quantize
from finetune_ref.gptq.format import GPTQ_KEYS, GPTQConfig
from finetune_ref.gptq.linear import GPTQLinear, gptq_layers

DEFAULT_SKIP_MODULES = ("lm_head",)
BATCH_KEYS = ("input_ids", "attention_mask", "position_ids", "document_ids")
# The order of true-sequential quantization inside a decoder layer (the reference llama.py's `sequential`).
SEQUENTIAL_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                     ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


# --------------------------------------------------------------------------------------------------------
# Calibration data
# --------------------------------------------------------------------------------------------------------
def _as_batches(calibration: Any, batch_size: int) -> list[dict]:
    """(B, T) int64 ``input_ids``, ``attention_mask`` (0 at padding), ``position_ids``, ``document_ids`` per
    batch, from a (N, T) token tensor (cut into batches of ``batch_size`` rows) or a list of batches (a missing
    key gets what a row of real tokens, one document, would have)."""
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2 or calibration.dtype.is_floating_point or calibration.numel() == 0:
            raise ValueError(f"calibration tokens must be a non-empty (num_samples, seq_len) integer tensor, got "
                             f"{calibration.dtype} {tuple(calibration.shape)}")
        calibration = [{"input_ids": rows} for rows in calibration.long().split(batch_size)]  # (B, T) each
    if not (isinstance(calibration, (list, tuple)) and calibration
            and all(isinstance(b, dict) and "input_ids" in b for b in calibration)):
        raise TypeError("calibration must be a (num_samples, seq_len) token tensor or a non-empty list of batches "
                        "(dicts of (B, T) input_ids and optionally attention_mask, position_ids, document_ids, as "
                        "train.data.collate makes them)")
    batches = []
    for i, b in enumerate(calibration):
        ids = b["input_ids"]
        if ids.dim() != 2 or ids.dtype.is_floating_point or ids.numel() == 0:
            raise ValueError(f"calibration batch {i}: input_ids must be a non-empty (B, T) integer tensor, got "
                             f"{ids.dtype} {tuple(ids.shape)}")
        B, T = ids.shape
        full = {"input_ids": ids, "attention_mask": torch.ones(B, T, dtype=torch.int64),
                "position_ids": torch.arange(T).repeat(B, 1), "document_ids": torch.zeros(B, T, dtype=torch.int64)}
        full.update({k: b[k] for k in BATCH_KEYS if k in b})
        wrong = [k for k in BATCH_KEYS if tuple(full[k].shape) != (B, T) or full[k].dtype.is_floating_point]
        if wrong:
            raise ValueError(f"calibration batch {i}: {wrong} must be ({B}, {T}) integer tensors like input_ids")
        batches.append(full)
    return batches


# --------------------------------------------------------------------------------------------------------
# Which layers
# --------------------------------------------------------------------------------------------------------
def target_linear_names(model: nn.Module, skip_modules: Iterable[str] = DEFAULT_SKIP_MODULES) -> list[str]:
    """Names of the ``nn.Linear`` modules GPTQ replaces: all but ``skip_modules``, in model order.

    Raises:
        ValueError: the model carries LoRA adapters (merge them first), a target lies outside the decoder
            layers (only ``model.layers.N.*`` linears can be calibrated here), or none is left.
    """
    skip = tuple(skip_modules)
    if any(type(m).__name__ == "LoRALinear" for m in model.modules()):
        raise ValueError("the model carries LoRA adapters; merge them first (lora.merge_and_unload or "
                         "qlora.merge.merge_qlora), then quantize")
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and not module_matches(n, skip)]
    outside = [n for n in names if not n.startswith("model.layers.")]
    if outside:
        raise ValueError(f"cannot quantize {outside}: only linear layers inside model.layers are supported; add "
                         "them to skip_modules")
    if not names:
        raise ValueError("no nn.Linear left to quantize (all skipped, or already quantized)")
    return names


# --------------------------------------------------------------------------------------------------------
# Quantizing a model
# --------------------------------------------------------------------------------------------------------
class _StopForward(Exception):
    """Raised by a forward pre-hook once every input a calibration step needs has been seen."""


def _embed_batches(model: LlamaForCausalLM, batches: list[dict]) -> list[dict]:
    """Per batch: the hidden states entering layer 0 and what every layer's forward needs (as LlamaModel)."""
    device = model.model.embed_tokens.weight.device
    out = []
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        T = b["input_ids"].shape[1]
        h = model.model.embed_tokens(b["input_ids"])  # (B, T, hidden)
        cos, sin = model.model.rotary_emb(b["position_ids"], h.dtype)
        mask = build_attention_mask(T, T, b["attention_mask"], b["document_ids"], device)
        out.append({"h": h, "cos": cos, "sin": sin, "mask": mask, "tokens": b["attention_mask"].bool()})
    return out


def _collect_hessians(layer: nn.Module, prefix: str, names: list[str], batches: list[dict]) -> dict[str, Any]:
    """Run ``layer`` over the batches until every module in ``names`` has seen its input; return name ->
    HessianAccumulator (modules fed the very same tensor share one accumulator)."""
    modules = {n: layer.get_submodule(n[len(prefix):]) for n in names}
    accs: dict[str, HessianAccumulator] = {}
    current: dict[str, Any] = {}

    def hook_for(name):
        def hook(module, args):
            x = args[0]
            owner = next((n for n, t in current["inputs"] if t is x), None)
            if owner is None:
                acc = accs.setdefault(name, HessianAccumulator(x.shape[-1], device=x.device))
                acc.add_batch(x[current["tokens"]])  # (B, T, in)[mask] -> (n real tokens, in)
                current["inputs"].append((name, x))
            elif accs.setdefault(name, accs[owner]) is not accs[owner]:
                raise RuntimeError(f"{name} shared its input with {owner} in one batch but not in another")
            current["seen"].add(name)
            if len(current["seen"]) == len(modules):
                raise _StopForward
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in modules.items()]
    try:
        for b in batches:
            current.update(inputs=[], seen=set(), tokens=b["tokens"])
            try:
                layer(b["h"], b["cos"], b["sin"], b["mask"])
            except _StopForward:
                pass
            if len(current["seen"]) != len(modules):
                never = sorted(set(modules) - current["seen"])
                raise RuntimeError(f"the forward of {prefix.rstrip('.')} never called {never}")
    finally:
        for handle in handles:
            handle.remove()
    return accs


def _replace(model: nn.Module, name: str, q, config: GPTQConfig) -> None:
    linear = model.get_submodule(name)
    bias = None if linear.bias is None else linear.bias.detach()
    try:
        layer = GPTQLinear.from_quantized(q, bias, config.checkpoint_format)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from e
    model.set_submodule(name, layer)


@torch.no_grad()
def gptq_quantize_model(model: LlamaForCausalLM, calibration: Any = None, config: GPTQConfig = GPTQConfig(), *,
                        blocksize: int = 128, batch_size: int = 8,
                        skip_modules: Iterable[str] = DEFAULT_SKIP_MODULES, stats: Optional[dict] = None,
                        progress: Optional[Callable[[str], None]] = None) -> LlamaForCausalLM:
    """Replace, in place, every linear layer of the decoder by a :class:`GPTQLinear` (GPTQ or RTN).

    Args:
        model: our ``LlamaForCausalLM`` (any float dtype, CPU or GPU; calibration runs where it lives).
        calibration: ``config.method == "gptq"``: a list of batches (dicts of (B, T) ``input_ids`` and
            optionally ``attention_mask``, ``position_ids``, ``document_ids``: ``train.data.collate``'s output;
            positions where ``attention_mask`` is 0 never enter a Hessian), or a (N, T) token tensor. Ignored
            (may be None) for "rtn".
        config: bits, group size, symmetric or not, act order, dampening, true-sequential, format, method.
        blocksize: GPTQ's lazy-batch width. batch_size: rows of a token tensor per forward (batches are run as
            given).
        skip_modules: linears left dense (full names or name suffixes); ``lm_head`` by default.
        stats: if given, filled with ``{layer name: {"error_gptq", "error_rtn", "energy", "tokens"}}`` (the
            layer objective tr(dW H dW^T)/2 for GPTQ's and RTN's result and tr(W H W^T)/2, all on the
            calibration inputs; "gptq" only) and ``"seconds"``.
        progress: called with one line per decoder layer.
    Returns:
        ``model``.
    Raises:
        TypeError / ValueError: bad calibration data or config, LoRA adapters present, a layer the GPTQ layout
            cannot pack (named), or a singular Hessian (raise ``config.damp_percent``).
    """
    if not isinstance(config, GPTQConfig):
        raise TypeError(f"config must be a gptq.format.GPTQConfig, got {type(config).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    start = time.perf_counter()
    targets = target_linear_names(model, skip_modules)
    was_training = model.training
    model.eval()
    if config.method == "rtn":
        for name in targets:
            weight = model.get_submodule(name).weight
            try:
                q = rtn_quantize(weight, config.bits, config.group_size, config.sym)
            except ValueError as e:
                raise ValueError(f"{name}.weight: {e}") from e
            _replace(model, name, q, config)
        if stats is not None:
            stats["seconds"] = time.perf_counter() - start
        model.train(was_training)
        return model

    batches = _embed_batches(model, _as_batches(calibration, batch_size))
    target_set = set(targets)
    last = max(int(n.split(".")[2]) for n in targets)  # later layers need no calibration inputs
    for idx, layer in enumerate(model.model.layers[:last + 1]):
        t0 = time.perf_counter()
        prefix = f"model.layers.{idx}."
        mine = [n for n in targets if n.startswith(prefix)]
        ordered = [[prefix + s for s in group if prefix + s in target_set] for group in SEQUENTIAL_GROUPS]
        extra = [n for n in mine if not any(n in g for g in ordered)]
        steps = [g for g in ordered if g] + ([extra] if extra else [])
        if not config.true_sequential and steps:
            steps = [[n for g in steps for n in g]]
        for step in steps:
            accs = _collect_hessians(layer, prefix, step, batches)
            for name in step:
                weight = model.get_submodule(name).weight.detach()
                H = accs[name].hessian()
                try:
                    q = gptq_quantize(weight, H, config.bits, config.group_size, config.sym, config.desc_act,
                                      config.damp_percent, blocksize)
                except ValueError as e:
                    raise ValueError(f"{name}: {e}") from e
                if stats is not None:
                    rtn = rtn_quantize(weight, config.bits, config.group_size, config.sym)
                    stats[name] = {"error_gptq": output_error(weight, q.dequantize(), H),
                                   "error_rtn": output_error(weight, rtn.dequantize(), H),
                                   "energy": output_error(weight, torch.zeros_like(weight), H),
                                   "tokens": accs[name].tokens}
                _replace(model, name, q, config)
        if idx < last:
            for b in batches:  # the next layer sees this layer's quantized outputs
                b["h"] = layer(b["h"], b["cos"], b["sin"], b["mask"])
        if progress is not None and mine:
            line = f"layer {idx}: {len(mine)} linear(s) quantized in {time.perf_counter() - t0:.1f} s"
            if stats is not None:
                g = sum(stats[n]["error_gptq"] for n in mine)
                r = sum(stats[n]["error_rtn"] for n in mine)
                line += f", output error GPTQ/RTN = {g / r:.3f}" if r > 0 else ""
            progress(line)
    if stats is not None:
        stats["seconds"] = time.perf_counter() - start
    model.train(was_training)
    return model


def gptq_dequantize_model(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Replace, in place, every GPTQLinear by an ``nn.Linear`` holding its dequantized weight (frozen), in
    ``dtype`` (default: the model's embedding dtype). The numbers are those GPTQLinear computes with; the point
    is speed: GPTQLinear unpacks its weight at every forward, which dominates token-by-token generation on a
    CPU. Returns ``model``."""
    emb = getattr(getattr(model, "model", None), "embed_tokens", None)
    dtype = dtype or (emb.weight.dtype if emb is not None else torch.float32)
    return dequantize_linears(model, gptq_layers(model), dtype)


def gptq_nbytes(model: nn.Module) -> dict[str, float]:
    """Bytes of the GPTQ tensors of ``model`` and bits per quantized weight (qweight + qzeros + scales + g_idx)."""
    layers = gptq_layers(model)
    weights = sum(m.in_features * m.out_features for _, m in layers)
    nbytes = sum(getattr(m, k).numel() * getattr(m, k).element_size() for _, m in layers for k in GPTQ_KEYS)
    return {"parameters": weights, "bytes": nbytes, "bits_per_parameter": 8 * nbytes / weights if weights else 0.0}


__all__ = ["SEQUENTIAL_GROUPS", "gptq_dequantize_model", "gptq_nbytes", "gptq_quantize_model", "target_linear_names"]
