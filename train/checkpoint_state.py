"""What a training checkpoint holds besides files: the trainable parameters by name, every rank's RNG states as
tensors, and the model's and optimizer's state unsharded and keyed by parameter name (so a checkpoint does not
depend on the world size)."""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from finetune_ref.train.distributed import DistInfo, is_sharded, unwrap_model


# ---------------------------------------------------------------------------------------------------------
# Names of trainable parameters (tied weights once) and RNG states as tensors.
# ---------------------------------------------------------------------------------------------------------
def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """{name: parameter} of the trainable parameters, a tied parameter once under its first name.

    Names are those of the unwrapped model (a DDP wrapper's ``module.`` prefix is not part of them; FSDP2 keeps
    the original names), i.e. Hugging Face key names.
    """
    return {name: p for name, p in unwrap_model(model).named_parameters() if p.requires_grad}


def describe(p: torch.Tensor) -> dict:
    return {"shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch.")}


def rng_state_tensors() -> dict[str, torch.Tensor]:
    """This process's RNG states (torch CPU and current CUDA device, Python ``random``, NumPy) as tensors."""
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    out = {
        "torch_cpu": torch.get_rng_state(),
        "python_state": torch.tensor(internal, dtype=torch.int64),  # 624 words + position
        "python_meta": torch.tensor([version], dtype=torch.int64),
        "python_gauss": torch.tensor([float("nan") if gauss is None else gauss], dtype=torch.float64),
        "numpy_keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        "numpy_meta": torch.tensor([np_pos, np_has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([np_gauss], dtype=torch.float64),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["torch_cuda"] = torch.cuda.get_rng_state()
    if np_name != "MT19937":
        raise ValueError(f"unsupported NumPy bit generator {np_name!r} in the legacy global RNG")
    return out


def set_rng_state_tensors(states: dict[str, torch.Tensor]) -> None:
    """Inverse of ``rng_state_tensors``. Raises ValueError if an entry is missing."""
    missing = {"torch_cpu", "python_state", "python_meta", "python_gauss", "numpy_keys", "numpy_meta",
               "numpy_gauss"} - set(states)
    if missing:
        raise ValueError(f"the checkpoint's RNG state lacks {sorted(missing)}")
    torch.set_rng_state(states["torch_cpu"].to(torch.uint8))
    gauss = float(states["python_gauss"][0])
    random.setstate((int(states["python_meta"][0]), tuple(int(x) for x in states["python_state"].tolist()),
                     None if gauss != gauss else gauss))
    pos, has_gauss = (int(x) for x in states["numpy_meta"].tolist())
    np.random.set_state(("MT19937", states["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss,
                         float(states["numpy_gauss"][0])))
    if "torch_cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["torch_cuda"].to(torch.uint8))


def gather_rng(info: DistInfo) -> dict[str, torch.Tensor]:
    """Every rank's RNG tensors as ``{"rank<r>/<name>": tensor}`` (complete on rank 0)."""
    mine = rng_state_tensors()
    if not info.enabled:
        return {f"rank0/{k}": v for k, v in mine.items()}
    device = torch.device("cuda", torch.cuda.current_device()) if info.backend == "nccl" else torch.device("cpu")
    out = {}
    for name in sorted(mine):  # every rank has the same entries (same build, same devices)
        local = mine[name].to(device)
        parts = [torch.empty_like(local) for _ in range(info.world_size)]
        dist.all_gather(parts, local)
        out.update({f"rank{r}/{name}": t.cpu() for r, t in enumerate(parts)})
    return out


# ---------------------------------------------------------------------------------------------------------
# Model and optimizer state, unsharded, keyed by parameter name.
# ---------------------------------------------------------------------------------------------------------
def dcp_state_dict():
    """``torch.distributed.checkpoint.state_dict``, imported when first needed (FSDP2 models only)."""
    from torch.distributed.checkpoint import state_dict

    return state_dict


def full_options(**kw):
    return dcp_state_dict().StateDictOptions(full_state_dict=True, **kw)


# Sharded (FSDP2) models go through torch.distributed.checkpoint.state_dict, which gathers and re-shards. Plain and
# DDP models (every rank holds all of it) use the parameters and optimizer.state_dict() directly: DCP resolves
# every state-dict key as an attribute path, which fails on layers that store several tensors under one weight
# (NF4Linear's ``weight.absmax``, bitsandbytes' layout).
def gather_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded trainable parameters on CPU (rank 0 gets them; other FSDP2 ranks may get ``{}``). Collective."""
    names = trainable_parameters(model)
    if not is_sharded(model):
        return {k: p.detach().cpu() for k, p in names.items()}
    from finetune_ref.train.fsdp import gather_full

    return gather_full(model, set(names), rank0_only=True)


def gather_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state dict with parameter names instead of indices, unsharded, on CPU. Collective."""
    if is_sharded(model):
        return dcp_state_dict().get_optimizer_state_dict(model, optimizer, options=full_options(cpu_offload=True))
    names = optimizer_param_names(model, optimizer)
    flat = [n for group in names for n in group]  # torch numbers parameters group after group
    osd = optimizer.state_dict()
    return {"state": {flat[i]: entry for i, entry in osd["state"].items()},
            "param_groups": [{**g, "params": names[k]} for k, g in enumerate(osd["param_groups"])]}


def set_local_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, osd: dict) -> None:
    params = trainable_parameters(model)
    with torch.no_grad():
        for name, value in model_state.items():
            params[name].copy_(value)
    flat = [n for group in optimizer_param_names(model, optimizer) for n in group]
    index = {n: i for i, n in enumerate(flat)}
    optimizer.load_state_dict({"state": {index[n]: entry for n, entry in osd["state"].items()},
                               "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                                                for g in osd["param_groups"]]})


def flatten_optimizer(osd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for pname, entry in osd.get("state", {}).items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{pname}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(pname, {})[key] = value
    groups = []
    for g in osd.get("param_groups", []):
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()})
    return tensors, {"param_groups": groups, "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[str, dict] = {}
    for key, value in tensors.items():
        _, rest = key.split("/", 1)
        pname, name = rest.rsplit("/", 1)
        state.setdefault(pname, {})[name] = value
    for pname, entry in meta.get("scalars", {}).items():
        state.setdefault(pname, {}).update(entry)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def optimizer_param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    by_id = {id(p): name for name, p in unwrap_model(model).named_parameters()}
    try:
        return [[by_id[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    except KeyError:
        raise ValueError("the optimizer holds a tensor that is not a parameter of the model") from None
