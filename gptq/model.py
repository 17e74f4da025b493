"""Whole-model GPTQ: calibration data, layer-by-layer quantization, and GPTQ model directories.

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

Calibration data (:func:`calibration_examples`): by default a random sample (fixed seed) of the *training*
examples that :func:`finetune.data.build_datasets` makes from the default corpus, so the held-out split never
calibrates; or the training split of a user's ``.txt`` / folder / ``.jsonl`` file (``eval_fraction=0`` to use
all of a dedicated calibration file). Packed text carries document ids and positions, and the calibration
forward uses them exactly as training does.

Files (:func:`save_gptq_model` / :func:`load_gptq_model`): ``config.json`` with a ``quantization_config``
(:class:`qlora.gptq_format.GPTQConfig`), the same object in ``quantize_config.json``, and ``model.safetensors``
holding ``<layer>.qweight/.qzeros/.scales/.g_idx`` for each quantized linear and the other tensors
(embedding, norms) dense, in fp16 by default, as GPTQ checkpoints are. HF tensor names throughout. The loader
also reads older AutoGPTQ directories whose settings live only in ``quantize_config.json``.
:func:`gptq_dequantize_model` turns the GPTQ layers back into plain ``nn.Linear`` with the same numbers, for
fast CPU generation (GPTQLinear unpacks its weight at every forward).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from finetune_ref.models.checkpoint import (SINGLE_FILE, atomic_save_safetensors, atomic_write_text, checkpoint_files, parse_dtype,
                               read_tensors)
from finetune_ref.models.config import LlamaConfig, read_config_json
from finetune_ref.models.llama import LlamaForCausalLM, build_attention_mask
from finetune_ref.gptq.gptq import HessianAccumulator, gptq_quantize, output_error, rtn_quantize
from finetune_ref.gptq.format import GPTQ_KEYS, GPTQConfig, check_gptq_tensors
from finetune_ref.gptq.linear import GPTQLinear

DEFAULT_NUM_SAMPLES = 128
DEFAULT_SEQ_LEN = 256
DEFAULT_SKIP_MODULES = ("lm_head",)
QUANTIZE_CONFIG_FILE = "quantize_config.json"  # AutoGPTQ's / GPTQModel's copy of the quantization settings
# The order of true-sequential quantization inside a decoder layer (the reference llama.py's `sequential`).
SEQUENTIAL_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                     ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


# --------------------------------------------------------------------------------------------------------
# Calibration data
# --------------------------------------------------------------------------------------------------------
def calibration_examples(tokenizer, data: str | Path | None = None, *, num_samples: int = DEFAULT_NUM_SAMPLES,
                         seq_len: int = DEFAULT_SEQ_LEN, eval_fraction: float = 0.1, seed: int = 0) -> list[dict]:
    """Up to ``num_samples`` training examples of ``build_datasets(tokenizer, data, seq_len, eval_fraction)``,
    drawn without replacement with ``seed`` and kept in their original order (all of them if there are fewer).

    Raises:
        ValueError: ``num_samples`` < 1, or no training example (data errors come from ``build_datasets``).
    """
    from finetune_ref.train.data import build_datasets

    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    train, _ = build_datasets(tokenizer, data, seq_len=seq_len, eval_fraction=eval_fraction)
    if not train:
        raise ValueError("the calibration data gave no training example; give more text or a lower seq_len")
    if num_samples >= len(train):
        return list(train)
    chosen = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:num_samples]
    return [train[i] for i in sorted(chosen.tolist())]


def _as_examples(calibration: Any) -> list[dict]:
    """Examples (dicts of 1-D int64 tensors) from a (N, T) token tensor or a list of examples."""
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2 or calibration.dtype.is_floating_point or calibration.numel() == 0:
            raise ValueError(f"calibration tokens must be a non-empty (num_samples, seq_len) integer tensor, got "
                             f"{calibration.dtype} {tuple(calibration.shape)}")
        T = calibration.shape[1]
        return [{"input_ids": row.long(), "labels": row.long(), "position_ids": torch.arange(T),
                 "document_ids": torch.zeros(T, dtype=torch.int64)} for row in calibration]
    if isinstance(calibration, (list, tuple)) and calibration and all(isinstance(e, dict) for e in calibration):
        return list(calibration)
    raise TypeError("calibration must be a (num_samples, seq_len) token tensor or a non-empty list of examples "
                    "(calibration_examples / finetune.data.build_datasets)")


# --------------------------------------------------------------------------------------------------------
# Which layers
# --------------------------------------------------------------------------------------------------------
def _matches(name: str, patterns: Iterable[str]) -> bool:
    # A pattern names a module by its full name or by a suffix of whole components ("lm_head", "mlp.down_proj").
    return any(name == p or name.endswith("." + p) for p in patterns)


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
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and not _matches(n, skip)]
    outside = [n for n in names if not n.startswith("model.layers.")]
    if outside:
        raise ValueError(f"cannot quantize {outside}: only linear layers inside model.layers are supported; add "
                         "them to skip_modules")
    if not names:
        raise ValueError("no nn.Linear left to quantize (all skipped, or already quantized)")
    return names


def gptq_layers(model: nn.Module) -> list[tuple[str, GPTQLinear]]:
    """(name, layer) of every GPTQLinear in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, GPTQLinear)]


# --------------------------------------------------------------------------------------------------------
# Quantizing a model
# --------------------------------------------------------------------------------------------------------
class _StopForward(Exception):
    """Raised by a forward pre-hook once every input a calibration step needs has been seen."""


def _embed_batches(model: LlamaForCausalLM, examples: list[dict], batch_size: int) -> list[dict]:
    """Per batch: the hidden states entering layer 0 and what every layer's forward needs (as LlamaModel)."""
    from finetune_ref.train.data import collate

    device = model.model.embed_tokens.weight.device
    batches = []
    for i in range(0, len(examples), batch_size):
        b = {k: v.to(device) for k, v in collate(examples[i:i + batch_size], pad_token_id=0).items()}
        B, T = b["input_ids"].shape
        h = model.model.embed_tokens(b["input_ids"])  # (B, T, hidden)
        cos, sin = model.model.rotary_emb(b["position_ids"], h.dtype)
        mask = build_attention_mask(T, T, b["attention_mask"], b["document_ids"], device)
        batches.append({"h": h, "cos": cos, "sin": sin, "mask": mask, "tokens": b["attention_mask"].bool()})
    return batches


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
        calibration: ``config.method == "gptq"``: examples (:func:`calibration_examples`) or a (N, T) token
            tensor. Ignored (may be None) for "rtn".
        config: bits, group size, symmetric or not, act order, dampening, true-sequential, format, method.
        blocksize: GPTQ's lazy-batch width. batch_size: calibration sequences per forward.
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
        raise TypeError(f"config must be a qlora.gptq_format.GPTQConfig, got {type(config).__name__}")
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

    examples = _as_examples(calibration)
    batches = _embed_batches(model, examples, batch_size)
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


# --------------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------------
def _read_config_json(model_dir: Path) -> dict[str, Any]:
    return read_config_json(model_dir / "config.json")


def _gptq_entry(model_dir: Path) -> Optional[dict]:
    """The GPTQ settings object: ``config.json``'s ``quantization_config`` if it is GPTQ, else (older AutoGPTQ
    directories) ``quantize_config.json`` when config.json has no quantization_config at all."""
    q = _read_config_json(model_dir).get("quantization_config")
    if q is not None:
        return q if isinstance(q, dict) and q.get("quant_method") == "gptq" else None
    path = model_dir / QUANTIZE_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    return d if isinstance(d, dict) and d.get("quant_method", "gptq") == "gptq" and "bits" in d else None


def read_gptq_config(model_dir: str | Path) -> Optional[GPTQConfig]:
    """The GPTQ settings of a model directory (see :func:`_gptq_entry`), or None for a checkpoint that is not
    GPTQ. Raises ValueError for a malformed GPTQ entry, FileNotFoundError without config.json."""
    q = _gptq_entry(Path(model_dir))
    return None if q is None else GPTQConfig.from_dict(q)


def is_gptq_dir(model_dir: str | Path) -> bool:
    """True when the directory declares a GPTQ checkpoint (``quant_method: "gptq"`` in config.json's
    ``quantization_config``, or an AutoGPTQ ``quantize_config.json``)."""
    return _gptq_entry(Path(model_dir)) is not None


def save_gptq_model(model: LlamaForCausalLM, out_dir: str | Path, config: GPTQConfig,
                    dtype: torch.dtype | str = torch.float16) -> Path:
    """Write a GPTQ model directory: ``config.json`` (+ ``quantization_config``), ``quantize_config.json``,
    ``model.safetensors`` (GPTQ tensors as they are; other floating tensors in ``dtype``, fp16 by default;
    ``lm_head.weight`` omitted when tied). Each file is written atomically. Returns the directory.

    Raises:
        ValueError: the model has no GPTQLinear, or a layer's bits / group size / format differ from ``config``.
    """
    dtype = parse_dtype(dtype)
    layers = gptq_layers(model)
    if not layers:
        raise ValueError("the model has no GPTQLinear layer; run gptq_quantize_model first")
    for name, layer in layers:
        if (layer.bits, layer.group_size, layer.checkpoint_format) != (config.bits, config.group_size,
                                                                       config.checkpoint_format):
            raise ValueError(f"{name} is {layer.bits}-bit, group_size {layer.group_size}, format "
                             f"{layer.checkpoint_format}; the config says {config.bits}, {config.group_size}, "
                             f"{config.checkpoint_format}")
    packed = {f"{name}.{key}" for name, _ in layers for key in GPTQ_KEYS}
    state = {k: (v if k in packed or not v.is_floating_point() else v.to(dtype)).detach().cpu().contiguous()
             for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    out_dir = Path(out_dir)
    hf_config = model.config.to_dict()
    hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    hf_config["quantization_config"] = config.to_dict()
    atomic_save_safetensors(state, out_dir / SINGLE_FILE, metadata={"format": "pt"})
    atomic_write_text(out_dir / QUANTIZE_CONFIG_FILE, json.dumps(config.to_dict(), indent=2) + "\n")
    atomic_write_text(out_dir / "config.json", json.dumps(hf_config, indent=2) + "\n")
    return out_dir


def load_gptq_model(model_dir: str | Path, dtype: torch.dtype | str = torch.float32) -> LlamaForCausalLM:
    """Build a ``LlamaForCausalLM`` with GPTQLinear layers from a GPTQ model directory (ours, or AutoGPTQ /
    GPTQModel output for a Llama with the same tensor names, v1 or v2 format, no ``lm_head`` quantization).

    Args:
        model_dir: directory with ``config.json`` (GPTQ ``quantization_config``) and safetensors weights.
        dtype: dtype of the dense tensors and biases (the GPTQ layers dequantize to their input's dtype).
    Raises:
        FileNotFoundError: missing directory or files. ValueError: not a GPTQ checkpoint, missing, unexpected,
        or wrongly shaped tensors (named), unreadable files. TypeError: unsupported dtype.
    """
    dtype = parse_dtype(dtype)
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    qconfig = read_gptq_config(model_dir)
    if qconfig is None:
        raise ValueError(f"{model_dir} has no GPTQ quantization_config (config.json) or quantize_config.json; "
                         "load it with models.checkpoint.load_model (16/32-bit) or qlora.model.load_quantized (NF4)")
    config = LlamaConfig.from_json_file(model_dir / "config.json")
    files = checkpoint_files(model_dir)
    tensors = read_tensors(files, list(files))
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    quantized = sorted({k[:-len(".qweight")] for k in tensors if k.endswith(".qweight")})
    if not quantized:
        raise ValueError(f"{model_dir} declares GPTQ but holds no '*.qweight' tensor")
    for name in quantized:
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{model_dir} has GPTQ tensors for {name!r}, which is not a module of this model") \
                from None
        if type(linear) is not nn.Linear:
            raise ValueError(f"{name} is a {type(linear).__name__}, not a linear layer; it cannot be GPTQ")
        own = {k: tensors.pop(f"{name}.{k}") for k in GPTQ_KEYS if f"{name}.{k}" in tensors}
        out_f, in_f, _ = check_gptq_tensors(own, qconfig.bits, name)
        if (out_f, in_f) != (linear.out_features, linear.in_features):
            raise ValueError(f"{name}: the checkpoint layer is ({out_f}, {in_f}), the config implies "
                             f"({linear.out_features}, {linear.in_features})")
        has_bias = f"{name}.bias" in tensors
        if has_bias != (linear.bias is not None):
            raise ValueError(f"{name}: bias {'present' if has_bias else 'missing'} in the checkpoint but the config "
                             f"says {'a' if linear.bias is not None else 'no'} bias")
        layer = GPTQLinear(in_f, out_f, qconfig.bits, qconfig.group_size, qconfig.checkpoint_format, bias=has_bias)
        if has_bias:
            own["bias"] = tensors.pop(f"{name}.bias").to(dtype)
        layer.load_state_dict(own, strict=True)
        model.set_submodule(name, layer)
    expected = {k: v.shape for k, v in model.state_dict().items()
                if not any(k.startswith(name + ".") for name in quantized)}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
        tensors.pop("lm_head.weight", None)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{model_dir} does not match its config: missing tensors {missing[:10]}, unexpected "
                         f"tensors {unexpected[:10]}")
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise ValueError(f"tensor {name!r} in {model_dir} has shape {tuple(tensors[name].shape)}, the config "
                             f"implies {tuple(shape)}")
    dense = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}
    model.load_state_dict(dense, strict=False, assign=True)  # the GPTQ layers are already filled
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb.reset_inv_freq("cpu")
    return model.eval()


@torch.no_grad()
def gptq_dequantize_model(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Replace, in place, every GPTQLinear by an ``nn.Linear`` holding its dequantized weight (frozen), in
    ``dtype`` (default: the model's embedding dtype). The numbers are those GPTQLinear computes with; the point
    is speed: GPTQLinear unpacks its weight at every forward, which dominates token-by-token generation on a
    CPU. Returns ``model``."""
    emb = getattr(getattr(model, "model", None), "embed_tokens", None)
    dtype = dtype or (emb.weight.dtype if emb is not None else torch.float32)
    for name, layer in gptq_layers(model):
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        linear.weight = nn.Parameter(layer.dequantize(dtype), requires_grad=False)  # (out, in)
        if layer.bias is not None:
            linear.bias = nn.Parameter(layer.bias.detach().to(dtype).clone(), requires_grad=False)
        model.set_submodule(name, linear)
    return model


def gptq_nbytes(model: nn.Module) -> dict[str, float]:
    """Bytes of the GPTQ tensors of ``model`` and bits per quantized weight (qweight + qzeros + scales + g_idx)."""
    layers = gptq_layers(model)
    weights = sum(m.in_features * m.out_features for _, m in layers)
    nbytes = sum(getattr(m, k).numel() * getattr(m, k).element_size() for _, m in layers for k in GPTQ_KEYS)
    return {"parameters": weights, "bytes": nbytes, "bits_per_parameter": 8 * nbytes / weights if weights else 0.0}


__all__ = ["DEFAULT_NUM_SAMPLES", "DEFAULT_SEQ_LEN", "QUANTIZE_CONFIG_FILE", "SEQUENTIAL_GROUPS",
           "calibration_examples", "gptq_dequantize_model", "gptq_layers", "gptq_nbytes", "gptq_quantize_model",
           "is_gptq_dir", "load_gptq_model", "read_gptq_config", "save_gptq_model", "target_linear_names"]
