"""The one model loader: a ``LlamaForCausalLM`` from a Hugging Face directory, with a hook for quantized layers.

:func:`load_model` is the only code that builds a ``LlamaForCausalLM`` from a directory. The NF4 loader
(``qlora.model.load_quantized``) and the GPTQ loader (``gptq.checkpoint.load_gptq_model``) are this function plus
a :class:`LinearBuilder`, which says how to build some of the linear layers. In order, it:

1. reads ``config.json`` and builds the model on the meta device (no memory is allocated);
2. asks the builder, for every ``nn.Linear``, which checkpoint tensors it is made of, and compares all the
   expected names with the checkpoint's, naming every missing and unexpected one before any weight is read
   (with tied embeddings, ``lm_head.weight`` may be present and must equal ``model.embed_tokens.weight``);
3. reads one decoder layer at a time, then the rest (embeddings, final norm, head), and refuses a NaN or inf
   in any floating tensor, naming it. Each file is opened for the group and closed again, and nothing read is
   kept as a view of the file's memory map, so the pages read do not stay resident. The builder's layers are built as soon as their tensors are read; every other tensor
   is shape-checked and copied in ``dtype``. Peak memory: the model being built plus one decoder layer as
   stored (an NF4 model is never whole in 16/32-bit);
4. restores the tied head, rebuilds the RoPE buffer, and refuses to return anything left on the meta device.

A bad checkpoint raises one error naming the tensor or file; no half-loaded model is returned.
:func:`dequantize_linears` is the way back, from a builder's layers to plain ``nn.Linear``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Optional, Set

import torch
from torch import nn

from .checkpoint import check_finite_tensors, checkpoint_files, parse_dtype, read_tensors
from .config import LlamaConfig
from .llama import LlamaForCausalLM


def module_matches(name: str, patterns: Iterable[str]) -> bool:
    """True when a pattern names module ``name`` in full or as a suffix of whole components ("lm_head",
    "mlp.down_proj"): the rule of transformers' ``llm_int8_skip_modules`` and of GPTQ's skip lists."""
    return any(name == p or name.endswith("." + p) for p in patterns)


class LinearBuilder:
    """How :func:`load_model` builds some of the model's ``nn.Linear`` layers itself (quantized layers).

    The loader asks about every ``nn.Linear`` of the meta-built model, in module order:

    ``keys(name, linear, present) -> list of tensor names, or None``
        ``None``: not this builder's layer; the loader fills ``<name>.weight`` (and ``.bias``) like any other
        tensor, in the load dtype. Otherwise: the checkpoint tensors this layer is made of, all named
        ``<name>.*`` (NF4: ``weight``, ``weight.absmax``, ...; GPTQ: ``qweight``, ``qzeros``, ``scales``,
        ``g_idx``). ``linear`` is the meta ``nn.Linear`` (``in_features``, ``out_features``, ``bias``);
        ``present`` holds every tensor name of the checkpoint, for a builder that recognises its layers by
        their entries (GPTQ's ``qweight``).
    ``build(name, linear, tensors) -> nn.Module``
        The module replacing ``linear``, from ``tensors``: exactly the names ``keys`` gave, read from the file.
        They may be views of its memory map: keep copies, never the tensors themselves. Check them against
        ``linear`` and raise ValueError naming the tensor.
    ``hint(missing, unexpected) -> str or None``
        Optional: a sentence for the loader's error when the checkpoint's names do not match.

    This base class builds no layer: every linear is dense.
    """

    def keys(self, name: str, linear: nn.Linear, present: Set[str]) -> Optional[list[str]]:
        return None

    def build(self, name: str, linear: nn.Linear, tensors: dict[str, torch.Tensor]) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} claimed {name} but cannot build it")

    def hint(self, missing: list[str], unexpected: list[str]) -> Optional[str]:
        return None


def load_model(model_dir: str | Path, dtype: torch.dtype | str = torch.float32, *,
               linear_builder: Optional[LinearBuilder] = None,
               on_layer: Optional[Callable[[nn.Module], None]] = None) -> LlamaForCausalLM:
    """Build a ``LlamaForCausalLM`` from a Hugging Face directory (the steps are in the module docstring).

    Args:
        model_dir: directory with ``config.json`` and ``model.safetensors`` (or a sharded index).
        dtype: float32, bfloat16 or float16 (or 'fp32'/'bf16'/'fp16'); every floating tensor not built by
            ``linear_builder`` is cast to it.
        linear_builder: builds some linear layers itself (:class:`LinearBuilder`); None: all dense.
        on_layer: called with each decoder layer as soon as it is loaded (e.g. to shard it across processes
            before the next one is read, so a process never holds all of the model).

    Returns:
        The model in eval mode, on the CPU.

    Raises:
        FileNotFoundError: directory, config or a weight file is missing.
        ValueError: unsupported config field; missing, unexpected or wrongly-shaped tensors (all named);
            unreadable file; a tied ``lm_head`` claimed by the builder; what the builder raises.
        TypeError: unsupported dtype.
    """
    dtype = parse_dtype(dtype)
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    builder = LinearBuilder() if linear_builder is None else linear_builder
    config = LlamaConfig.from_json_file(model_dir / "config.json")
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    files = checkpoint_files(model_dir)
    present = set(files)
    built: dict[str, list[str]] = {}  # linear name -> the tensors the builder makes it from
    for name, module in model.named_modules():
        keys = builder.keys(name, module, present) if type(module) is nn.Linear else None
        if keys is not None:
            if not all(k.startswith(name + ".") for k in keys):
                raise ValueError(f"{type(builder).__name__}: the tensors of {name} must be named {name}.*: {keys}")
            built[name] = list(keys)
    if config.tie_word_embeddings and "lm_head" in built:
        raise ValueError("lm_head is tied to the input embedding and cannot be quantized; keep it in skip_modules")
    _check_keys(model_dir, model, built, present, builder)

    # One group per decoder layer, then everything else: at most one layer's tensors as stored are alive at once.
    groups: dict[str, list[str]] = {}
    for name in files:
        groups.setdefault(_group_of(name), []).append(name)
    for group in sorted(groups, key=lambda g: (g == "", int(g.split(".")[2]) if g else 0)):
        tensors = read_tensors(files, groups[group])
        check_finite_tensors(tensors, model_dir)
        for name in [n for n in built if _group_of(n + ".") == group]:
            own = {k: tensors.pop(k) for k in built[name]}
            model.set_submodule(name, builder.build(name, model.get_submodule(name), own))
            del own
        _assign_plain(model, tensors, dtype, config.tie_word_embeddings, model_dir)
        del tensors
        if group and on_layer is not None:
            on_layer(model.get_submodule(group[:-1]))
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # assigning the embedding broke the tie; restore it
    model.model.rotary_emb.reset_inv_freq("cpu")
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:  # cannot happen after _check_keys; a guard against silently uninitialised weights
        raise ValueError(f"{model_dir}: tensors {leftover[:5]} were not loaded")
    return model.eval()


def _group_of(tensor_name: str) -> str:
    """"model.layers.3." for a tensor of decoder layer 3, "" for the rest (embeddings, final norm, head)."""
    parts = tensor_name.split(".")
    return ".".join(parts[:3]) + "." if tensor_name.startswith("model.layers.") and len(parts) > 3 else ""


def _check_keys(model_dir: Path, model: nn.Module, built: dict[str, list[str]], present: set[str],
                builder: LinearBuilder) -> None:
    """Raise naming every missing and unexpected tensor (tied ``lm_head.weight`` allowed; compared when read)."""
    expected = set(model.state_dict())
    for name, keys in built.items():
        expected -= {name + ".weight", name + ".bias"}
        expected |= set(keys)
    if model.config.tie_word_embeddings:
        expected.discard("lm_head.weight")
        present = present - {"lm_head.weight"}
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if not missing and not unexpected:
        return
    hint = builder.hint(missing, unexpected)
    raise ValueError(f"checkpoint {model_dir} does not match its config: missing tensors {missing[:8]}"
                     f"{' ...' if len(missing) > 8 else ''} ({len(missing)}), unexpected tensors {unexpected[:8]}"
                     f"{' ...' if len(unexpected) > 8 else ''} ({len(unexpected)})" + (f"; {hint}" if hint else ""))


def _assign_plain(model: nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype, tied: bool,
                  model_dir: Path) -> None:
    """Put the tensors no builder took (embeddings, norms, dense linears) into the meta model, in ``dtype``."""
    head = tensors.pop("lm_head.weight", None) if tied else None
    for name, t in tensors.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        current = getattr(module, attr)
        if tuple(t.shape) != tuple(current.shape):
            raise ValueError(f"tensor {name!r} in {model_dir} has shape {tuple(t.shape)}, the config implies "
                             f"{tuple(current.shape)}")
        # A copy even when the dtype already matches: a view of the file's memory map would keep every page of
        # the file touched so far resident.
        t = t.to(dtype, copy=True) if t.is_floating_point() else t.clone()
        if isinstance(current, nn.Parameter):
            setattr(module, attr, nn.Parameter(t, requires_grad=current.requires_grad))
        else:
            module.register_buffer(attr, t)
    if head is not None and not torch.equal(head.to(dtype), model.model.embed_tokens.weight):
        raise ValueError("config says tie_word_embeddings=true but the checkpoint's lm_head.weight differs from "
                         "model.embed_tokens.weight; set tie_word_embeddings=false in config.json")


@torch.no_grad()
def dequantize_linears(model: nn.Module, layers: Iterable[tuple[str, nn.Module]],
                       dtype: Optional[torch.dtype] = None) -> nn.Module:
    """The way back from a builder's layers: replace, in place, each ``(name, layer)`` of ``model`` (a quantized
    linear with ``dequantize(dtype)``, ``in_features``, ``out_features``, ``bias``: NF4Linear, GPTQLinear) by a
    frozen ``nn.Linear`` holding its dequantized weight, in ``dtype`` (None: the layer's default). Returns
    ``model``."""
    for name, layer in list(layers):
        weight = layer.dequantize(dtype)  # (out, in)
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if layer.bias is not None:
            linear.bias = nn.Parameter(layer.bias.detach().to(weight.dtype).clone(), requires_grad=False)
        model.set_submodule(name, linear)
    return model
