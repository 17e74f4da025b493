"""Full fine-tuning: every weight trainable (embeddings and lm_head included), memory accounting, export.

Precision (chosen with ``finetune train --precision``):

    fp32            fp32 weights, fp32 gradients, fp32 AdamW (torch.optim.AdamW): 4 + 4 + 8 = 16 bytes/param
    bf16-autocast   fp32 weights and optimizer, matmuls in bf16 under ``torch.autocast``: 16 bytes/param
    bf16            bf16 weights and gradients, fp32 master copy and fp32 AdamW moments
                    (``optim.adamw.MasterWeightAdamW``): 2 + 2 + 4 + 8 = 16 bytes/param, and the forward
                    and backward run at bf16 speed and activation size

so pure bf16 does not save optimizer memory over fp32; it halves activations and weight traffic. Under FSDP2
(``train.distributed.shard_model``) the bf16 setting keeps the sharded parameters in fp32 (they are the
master copy) and all-gathers them as bf16 for compute (``MixedPrecisionPolicy``), so each rank holds
(4 + 4 + 8) / world_size bytes per parameter plus one gathered bf16 block at a time.

Tied embeddings (SmolLM2: ``lm_head.weight is model.embed_tokens.weight``): one Parameter, reached twice in the
forward; autograd sums both gradient contributions into its single ``.grad`` and the optimizer, which sees the
Parameter once (``named_parameters`` de-duplicates), updates it once, so the tie survives training.

Note on the default model: SmolLM2-135M-Instruct ships as a Q4_1 GGUF, so "full fine-tuning" starts from the
dequantized 4-bit weights, not from the original bf16 checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from finetune_ref.models.checkpoint import SINGLE_FILE, atomic_save_safetensors, atomic_write_text

TRAINABLE_DTYPES = (torch.float32, torch.bfloat16)


def prepare_full_finetuning(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Make every parameter trainable and cast the model to ``dtype`` (fp32 or bf16), in place.

    Returns the model. The tie between ``lm_head`` and ``embed_tokens`` (if any) is kept: ``Module.to`` casts
    a shared Parameter once.

    Raises:
        TypeError: dtype is not float32 or bfloat16 (fp16 full fine-tuning would need loss scaling).
        ValueError: the model has no parameters.
    """
    if dtype not in TRAINABLE_DTYPES:
        raise TypeError(f"full fine-tuning supports float32 and bfloat16 weights, got {dtype}; fp16 would need "
                        "dynamic loss scaling, which this project does not implement")
    params = list(model.parameters())
    if not params:
        raise ValueError("the model has no parameters to fine-tune")
    tied_before = _is_tied(model)
    model.to(dtype)
    for p in model.parameters():
        p.requires_grad_(True)
    if tied_before and not _is_tied(model):
        raise RuntimeError("casting the model broke the tie between lm_head and embed_tokens")
    return model


def _is_tied(model: nn.Module) -> bool:
    head = getattr(model, "lm_head", None)
    inner = getattr(model, "model", None)
    emb = getattr(inner, "embed_tokens", None)
    return head is not None and emb is not None and head.weight is emb.weight


def _unique(tensors) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if hasattr(t, "to_local") else t  # a DTensor (FSDP2) counts its local shard
        key = (local.untyped_storage().data_ptr(), local.storage_offset(), local.numel())
        if key not in seen:
            seen.add(key)
            out.append(local)
    return out


def memory_breakdown(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes held right now by weights, gradients, optimizer moments and master copies (shared tensors once).

    Returns ``{"weights", "grads", "optimizer", "master", "total", "parameters"}`` (bytes, and the parameter
    count). Measured from the tensors, so it checks the 16 bytes/parameter accounting rather than restating it.
    Activations are not included (they exist only between forward and backward).
    """
    params = _unique(model.parameters())
    out = {"weights": sum(p.numel() * p.element_size() for p in params),
           "grads": sum(g.numel() * g.element_size() for g in _unique(p.grad for p in model.parameters())),
           "optimizer": 0, "master": 0, "parameters": sum(p.numel() for p in params)}
    if optimizer is not None:
        for state in optimizer.state.values():
            for name, t in state.items():
                if not isinstance(t, torch.Tensor) or name == "step":
                    continue
                local = t.to_local() if hasattr(t, "to_local") else t
                out["master" if name == "master" else "optimizer"] += local.numel() * local.element_size()
    out["total"] = out["weights"] + out["grads"] + out["optimizer"] + out["master"]
    return out


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict on CPU with HF key names, whatever the wrapping (plain, DDP, FSDP2).

    Collective under torch.distributed: every rank must call it; with FSDP2 only rank 0 receives the tensors
    (other ranks get ``{}``), as ``torch.distributed.checkpoint.state_dict.get_model_state_dict`` with
    ``full_state_dict=True, cpu_offload=True`` does.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export_full_model(model: nn.Module, out_dir: str | Path, config, is_main: bool = True,
                      dtype: torch.dtype | None = None) -> Path:
    """Write a Hugging Face directory (``config.json`` + ``model.safetensors``) of a fully fine-tuned model.

    Works for a plain, DDP-wrapped or FSDP2-sharded model (see ``full_state_dict``; call it on every rank,
    only ``is_main`` writes). ``lm_head.weight`` is omitted when ``config.tie_word_embeddings``, as
    ``models.checkpoint.save_model`` does. Files are written atomically. ``dtype`` casts floating tensors
    (default: keep the training dtype).
    """
    out_dir = Path(out_dir)
    state = full_state_dict(model)
    if not is_main:
        return out_dir
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in state.items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    config_dict = config.to_dict()
    config_dict["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    atomic_save_safetensors(state, out_dir / SINGLE_FILE, metadata={"format": "pt"})
    atomic_write_text(out_dir / "config.json", json.dumps(config_dict, indent=2) + "\n")
    return out_dir
