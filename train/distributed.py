"""Multi-process training on torch.distributed: process group, data sharding, DDP and FSDP2 wrapping.

Launched by ``torchrun`` (one process per device, or per CPU socket), which sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; ``init_distributed`` reads them. Without them everything here is a no-op and the
same code trains in one process.

Semantics (the same as one process with the whole global batch, up to floating-point summation order):

* Data: every rank draws the same *global* batch (``BatchIterator`` over ``batch_size * world_size``
  sequences, same seed) and keeps its own rows ``[rank * B, (rank + 1) * B)`` (``ShardedBatches``). So the data
  order does not depend on the world size, and the iterator position in a checkpoint is world-size free.
* Loss: the number of label tokens of the optimizer update is summed over ranks (``all_reduce``) and every rank
  divides its token-summed loss by that global count. DDP and FSDP2 *average* gradients over ranks, so the
  trainer multiplies each rank's loss by ``world_size``; the averaged gradient is then the gradient of
  (sum of all ranks' token losses) / (all ranks' tokens), exactly the single-process quantity. (HF transformers
  does the same when ``num_items_in_batch`` is gathered across ranks.)
* DDP (``wrap_ddp``, torch.nn.parallel.DistributedDataParallel) for every method: each rank holds the whole
  model; gradients are all-reduced in buckets during backward (only of trainable parameters, so LoRA
  communicates only A and B). 16-bit gradients are averaged in fp32 by a communication hook.
* FSDP2 (``train/fsdp.py``: ``shard_model``) for full fine-tuning, LoRA and QLoRA of models that do not fit
  one device: each decoder layer (and each NF4 layer) is one shard group, all-gathered just before its
  forward/backward and freed after; gradients are reduce-scattered and the optimizer steps on the local shards.

What works on CPU with the gloo backend (torch 2.13, checked by tests/test_distributed.py): DDP (fp32, bf16,
frozen parameters, gradient checkpointing), FSDP2 with fp32 and with bf16 ``MixedPrecisionPolicy``, and the
``torch.distributed.checkpoint.state_dict`` helpers used for unsharded checkpoints. Not used: DCP's own
``dcp.save``/``dcp.load`` format, because its ``.metadata`` file is a pickle (this project never unpickles).
Pitfall seen: ``set_model_state_dict(..., full_state_dict=True)`` replaces the values of the dict it is given
with DTensors; pass a copy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Where this process stands. The default is the single-process case."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"environment variable {name}={value!r} is not an integer; launch with torchrun, "
                         "which sets RANK, LOCAL_RANK and WORLD_SIZE") from None
    if number < 0:
        raise ValueError(f"environment variable {name}={number} must be >= 0")
    return number


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment; no-op without it.

    Args:
        backend: "gloo" (CPU) or "nccl" (CUDA); default nccl when CUDA is available, else gloo.
        timeout_s: collective timeout.

    Returns:
        ``DistInfo``; ``DistInfo()`` (rank 0 of 1) when WORLD_SIZE is unset or 1.

    Raises:
        ValueError: malformed or inconsistent RANK/WORLD_SIZE/LOCAL_RANK, or MASTER_ADDR/MASTER_PORT missing.
    """
    if os.environ.get("WORLD_SIZE") in (None, "", "1"):
        return DistInfo()
    world_size, rank = _env_int("WORLD_SIZE"), _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
    if rank >= world_size:
        raise ValueError(f"RANK={rank} must be smaller than WORLD_SIZE={world_size}")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise ValueError(f"{name} is not set; launch with torchrun (it sets the rendezvous address)")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend)


def destroy_distributed(info: DistInfo, synchronize: bool = True) -> None:
    """Tear the process group down: a barrier first (``synchronize``; skip it after an error, when another rank
    may be gone), then drop unreachable objects that hold collective work, then ``destroy_process_group``.

    Why both: a rank that tears gloo down while another still has a collective in flight, or gloo work objects
    that survive into interpreter shutdown, abort the process ("terminate called without an active exception",
    SIGABRT, seen with 2 CPU processes under load; the shutdown mechanism is described in pytorch/pytorch#179291).
    """
    if not (info.enabled and dist.is_initialized()):
        return
    try:
        if synchronize:
            dist.barrier()
    finally:
        gc.collect()
        dist.destroy_process_group()


def device_for(info: DistInfo) -> torch.device:
    """The device this rank computes on: its CUDA device under nccl, else the CPU."""
    return torch.device("cuda", info.local_rank) if info.backend == "nccl" else torch.device("cpu")


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sum each number over ranks (float64; exact for token counts below 2^53). Identity in one process."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device_for(info))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank if ``flag`` is True on any rank (e.g. one rank got Ctrl-C)."""
    if not info.enabled:
        return flag
    return all_reduce_sum([1.0 if flag else 0.0], info)[0] > 0


# ---------------------------------------------------------------------------------------------------------
# Data: each rank's rows of one global batch.
# ---------------------------------------------------------------------------------------------------------
def shard_batch(batch: dict[str, torch.Tensor], info: DistInfo) -> dict[str, torch.Tensor]:
    """Rows ``[rank * B, (rank + 1) * B)`` of a global batch of ``world_size * B`` rows.

    Raises:
        ValueError: the number of rows is not a multiple of the world size (build the batch iterator with
            ``drop_last=True`` and a global batch of ``batch_size * world_size``).
    """
    if not info.enabled:
        return batch
    rows = batch["input_ids"].shape[0]
    if rows % info.world_size:
        raise ValueError(f"a global batch of {rows} sequences cannot be split evenly over {info.world_size} "
                         "ranks; use drop_last=True with a global batch size divisible by the world size")
    per_rank = rows // info.world_size
    lo = info.rank * per_rank
    return {k: v[lo:lo + per_rank] for k, v in batch.items()}


class ShardedBatches:
    """Wraps an iterator of global batches (e.g. ``BatchIterator``): yields this rank's rows of each.

    ``state_dict``/``load_state_dict`` are the wrapped iterator's, so checkpoints hold the global position.
    """

    def __init__(self, global_batches, info: DistInfo):
        self.global_batches, self.info = global_batches, info

    def __iter__(self) -> "ShardedBatches":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return shard_batch(next(self.global_batches), self.info)

    def state_dict(self) -> dict:
        return self.global_batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.global_batches.load_state_dict(state)


# ---------------------------------------------------------------------------------------------------------
# Models.
# ---------------------------------------------------------------------------------------------------------
def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 shards in place, so its model is already the model)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def _fp32_allreduce_hook(process_group, bucket):
    """DDP communication hook: average a 16-bit gradient bucket in fp32, round once back to 16 bits."""
    buffer = bucket.buffer()
    world = dist.get_world_size(process_group)
    wide = buffer.to(torch.float32).div_(world)
    future = dist.all_reduce(wide, group=process_group, async_op=True).get_future()

    def back_to_bucket_dtype(fut):
        buffer.copy_(fut.value()[0])
        return buffer

    return future.then(back_to_bucket_dtype)


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """DistributedDataParallel over this rank's device; identity in one process.

    All ranks must hold identical initial weights (DDP broadcasts rank 0's at construction anyway).
    """
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [info.local_rank] if info.backend == "nccl" else None
    # forward_sync_buffers=False: the only buffers (RoPE frequencies) are constants, and a broadcast per forward
    # would make evaluation a collective on every rank.
    ddp = DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)
    if any(p.requires_grad and p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters()):
        ddp.register_comm_hook(None, _fp32_allreduce_hook)
    return ddp


def is_sharded(model: nn.Module) -> bool:
    """True if ``model`` was sharded with FSDP2 (its parameters are DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Inside, backward does (``enabled``) or does not communicate gradients: DDP ``no_sync`` / FSDP2
    ``set_requires_gradient_sync``. Gradient accumulation syncs only on the last micro-batch."""
    from torch.nn.parallel import DistributedDataParallel

    if enabled:
        yield
    elif isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 module back in its sharded state; no-op for other models.

    FSDP2 keeps the root's parameters unsharded after a forward (the backward usually follows at once). After a
    forward without backward (evaluation) they stay unsharded, and ``named_parameters`` then yields the
    unsharded tensors, which the optimizer does not know: checkpointing would fail. Call this after evaluation.
    """
    if "torch.distributed.fsdp" not in sys.modules:
        return  # FSDP never imported: no module can be sharded (and evaluation stays import-free)
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t
