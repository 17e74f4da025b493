"""FSDP2 sharding (``torch.distributed.fsdp.fully_shard``; Zhao et al. 2023 "PyTorch FSDP") of full fine-tuning,
LoRA and QLoRA models, and gathering their trainable parameters for checkpoints and exported adapters.

Groups (each all-gathered just before its forward and again before its backward, freed after):

* every ``NF4Linear`` alone: its packed NF4 bytes (``weight``), ``absmax`` and ``nested_absmax``;
* every decoder layer: what is left in it (norms, dense base weights of LoRA, LoRA A and B);
* the root: embeddings, final norm and lm_head (tied weights stay tied: both modules are in the root group).

Adapters are sharded with their layer, not replicated: they ride in the all-gather the layer needs anyway, their
gradients are reduce-scattered (the averaging DDP would do with an all-reduce), and the AdamW moments and master
weights of the adapters are divided by the world size too (Answer.AI's FSDP-QLoRA shards them the same way).
Trainable parameters must be fp32: the shards are the master weights. Frozen weights may be 16-bit.

Mixed precision (``MixedPrecisionPolicy``): with ``param_dtype=torch.bfloat16`` the decoder-layer and root groups
gather their floating parameters in bf16 and reduce gradients in fp32; the NF4 groups have *no* cast policy, so
they are gathered exactly as stored.

The NF4 rule (why the quantization state survives sharding bit for bit):

1. The NF4 storage tensors become frozen parameters (``requires_grad=False``) so that FSDP2 shards them, each
   along its own dim 0 (``torch.chunk`` semantics; the last shard is shorter or empty, FSDP2 pads it in its
   buffers and strips the padding when gathering). A rank's slice of ``weight`` and its slice of ``absmax`` need
   not cover the same blocks: no rank ever computes on a shard. The layer only runs on the gathered tensors, and
   an all-gather of the whole tensor is a byte copy, so any element count (not divisible by the world size, nor
   by the block size) comes back unchanged.
2. No collective ever reinterprets or converts the bytes: the NF4 groups have no ``param_dtype``, so nothing is
   cast (a bf16 cast would round an fp32 ``absmax`` or ``nested_absmax``, and bitsandbytes' workaround of storing
   packed codes as bf16 lets NaN bit patterns be canonicalised). A group mixing uint8 and fp32 tensors is
   all-gathered by FSDP2 as uint8 views of each tensor (``_fsdp_collectives.foreach_all_gather``): raw bytes.
3. The tiny replicated pieces stay buffers on every rank: ``quant_map`` (16), ``nested_quant_map`` (256) and the
   0-dim ``offset`` (FSDP2 shards dim 0, which a scalar lacks).
4. The layer's ``NF4QuantState`` is re-pointed at the gathered ``absmax``/``nested_absmax`` by a forward pre-hook
   that runs after FSDP2's own all-gather hook (FSDP2 reuses the same gathered tensor objects across
   iterations, so this rebuilds the state once, not per step).

``tests/test_fsdp_lora.py`` checks all of it on 2 and 3 CPU processes with gloo.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch
from torch import nn

from finetune_ref.qlora.nf4_linear import NF4Linear
from finetune_ref.train.distributed import DistInfo, device_for

NF4_SHARDED = ("weight", "absmax", "nested_absmax")  # sharded along dim 0; the rest of the state is replicated


def shard_model(model: nn.Module, info: DistInfo, param_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2 over ``model`` in place: one group per NF4Linear, per decoder layer, and the root (module docstring).

    Args:
        model: a ``LlamaForCausalLM`` (full fine-tuning, LoRA on a dense base, or QLoRA), trainable parameters fp32.
        param_dtype: compute dtype of the gathered floating parameters outside the NF4 groups (torch.bfloat16
            for bf16 training; None: as stored). Gradients are then reduced in fp32.

    Raises:
        ValueError: not run under torch.distributed, the model has no ``model.layers``, or a trainable parameter
            is not fp32.
    """
    if not info.enabled:
        raise ValueError("FSDP needs several processes: launch with torchrun --nproc-per-node N (N >= 2)")
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError("shard_model expects a LlamaForCausalLM-like model with model.layers")
    wrong = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad and p.dtype != torch.float32})
    if wrong:
        raise ValueError(f"trainable parameters must be fp32 for FSDP (the shards are the master weights), got "
                         f"{wrong}; param_dtype=torch.bfloat16 gives bf16 compute")
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = _mesh(device_for(info).type, info.world_size)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    shard_nf4_layers(model, info)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


@functools.cache
def _mesh(device_type: str, world_size: int):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (world_size,))


def shard_nf4_layers(module: nn.Module, info: DistInfo) -> None:
    """Shard every NF4Linear in ``module`` not sharded yet, each as its own FSDP2 group gathered as stored (rules
    1-4). ``shard_model`` calls it; the QLoRA loader may call it on each decoder layer as soon as it is quantized
    (``qlora.model.load_quantized(on_layer=...)``), so that a process keeps only its share of the NF4 model while
    loading instead of all of it."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    mesh = _mesh(device_for(info).type, info.world_size)
    as_stored = MixedPrecisionPolicy(cast_forward_inputs=False)  # rule 2: NF4 storage is gathered as bytes
    for layer in [m for m in module.modules() if isinstance(m, NF4Linear) and not isinstance(m, FSDPModule)]:
        nf4_storage_as_parameters(layer)
        fully_shard(layer, mesh=mesh, mp_policy=as_stored)
        layer.register_forward_pre_hook(_refresh_quant_state)  # after FSDP2's (prepended) all-gather hook
        _refresh_quant_state(layer, ())  # the state now holds the shards: the whole tensors can be freed


def nf4_storage_as_parameters(layer: NF4Linear) -> None:
    """Turn the layer's packed bytes, ``absmax`` and ``nested_absmax`` buffers into frozen parameters, same
    tensors, same names (rule 1). ``NF4Linear``'s state dict is unchanged (it writes bitsandbytes' keys itself)."""
    for name in NF4_SHARDED:
        tensor = layer._buffers.pop(name, None)
        layer._non_persistent_buffers_set.discard(name)
        if tensor is not None:
            layer.register_parameter(name, nn.Parameter(tensor, requires_grad=False))


def _refresh_quant_state(layer: NF4Linear, args) -> None:
    """Rule 4: point the cached quant state at the tensors the layer holds now (the gathered ones)."""
    state = layer._quant_state
    current = {name: getattr(layer, name) for name in ("absmax", "nested_absmax") if getattr(state, name) is not None}
    if any(getattr(state, name) is not t for name, t in current.items()):
        layer._quant_state = dataclasses.replace(state, **current)


def _dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "full_tensor")


@torch.no_grad()
def gather_full(model: nn.Module, names: set[str] | None = None, rank0_only: bool = False) -> dict[str, torch.Tensor]:
    """{name: whole tensor} of the parameters ``names`` (default: the trainable ones), gathered from their FSDP2
    shards in ``named_parameters`` order (the same on every rank), on CPU; with ``rank0_only`` the other ranks
    take part but keep nothing (return ``{}``). Collective.

    Tensor by tensor (``DTensor.full_tensor``, an all-gather of one tensor) rather than
    ``torch.distributed.checkpoint.state_dict.get_model_state_dict``, which resolves every state-dict key as an
    attribute path and fails on NF4Linear's bitsandbytes keys (``weight.absmax``)."""
    import torch.distributed as dist

    keep = not rank0_only or not dist.is_initialized() or dist.get_rank() == 0
    out = {}
    for name, p in model.named_parameters():
        if (name in names) if names is not None else p.requires_grad:
            whole = (p.full_tensor() if _dtensor(p) else p).detach()
            if keep:
                out[name] = whole.cpu().clone()
    return out


@torch.no_grad()
def scatter_full(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors into the parameters of the same names: each rank keeps its own shard (the placement
    FSDP2 chose). The inverse of ``gather_full``; every rank passes the same ``state``."""
    from torch.distributed.tensor import distribute_tensor

    params = dict(model.named_parameters())
    for name, value in state.items():
        p = params[name]
        if _dtensor(p):
            mine = distribute_tensor(value.to(p.dtype), p.device_mesh, p.placements, src_data_rank=None).to_local()
            p.to_local().copy_(mine)
        else:
            p.copy_(value)


@contextlib.contextmanager
def gathered_trainable(model: nn.Module):
    """Inside, every trainable parameter of an FSDP2 model is its whole tensor (gathered, on every rank), so code
    that reads the model (e.g. ``lora.save_adapter``) sees ordinary tensors. Collective; no forward inside.
    A no-op for models that are not sharded."""
    whole = gather_full(model)
    swapped = []
    for name, value in whole.items():
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        if _dtensor(module._parameters[leaf]):
            swapped.append((module, leaf, module._parameters[leaf]))
            module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    try:
        yield model
    finally:
        for module, leaf, original in swapped:
            module._parameters[leaf] = original
