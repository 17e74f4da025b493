"""Per-rank memory of FSDP2 training (``train/fsdp.py``): ``finetune memory --parallel fsdp --world-size N``.

Starts from the one-process estimate of the same step (``train/memory.py``, per rank: the batch size is per
rank) and changes what FSDP2 changes (Zhao et al. 2023, "PyTorch FSDP", section 3; Rajbhandari et al. 2020,
"ZeRO", section 5: stage 3 divides parameters, gradients and optimizer states by the number of ranks):

    weights, quant_constants     the frozen base, sharded: / N (full fine-tuning: the fp32 shards, 4 B/param / N)
    lora_parameters              the trainable shards are the fp32 master weights: 4 B/param / N
    master_weights               0 (the fp32 shards are the master copy; FSDP2 gathers them in the compute dtype)
    optimizer_states             / N
    gradients                    sharded, reduced in fp32: 4 B per trainable parameter / N, plus one layer's
                                 unsharded gradient in the compute dtype while it is reduce-scattered (workspace)
    gathered (new row)           what is all-gathered whole at once: the root group (embeddings, final norm, head),
                                 kept unsharded from forward through backward, plus two decoder layers (the one
                                 running and the one prefetched); NF4 layers are gathered as stored
    activations, logits          unchanged: each rank runs its own rows of the global batch

Not modelled: the collectives' staging buffers (a copy of one group's shards), NCCL's own memory, and the
padding of each shard to a whole row (under 1 row per tensor per rank).
"""

from __future__ import annotations

import dataclasses

from finetune_ref.models.config import LlamaConfig
from finetune_ref.train.memory import estimate_memory, nf4_bytes
from finetune_ref.train.memory_settings import DTYPE_BYTES, MemoryEstimate, MemorySettings
from finetune_ref.train.memory_shapes import linear_shapes

BACKWARD_PHASES = ("backward (lm_head)", "backward (last layer)", "backward (first layer)")


def estimate_memory_fsdp(config: LlamaConfig, settings: MemorySettings, world_size: int) -> MemoryEstimate:
    """Per-rank estimate of one steady-state step sharded over ``world_size`` ranks (module docstring).

    Raises:
        ValueError: ``world_size`` < 1, or invalid settings (as ``estimate_memory``).
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"--world-size must be a positive integer, got {world_size!r}")
    s, c, n_ranks = settings, config, world_size
    one = estimate_memory(c, s)
    e = DTYPE_BYTES[s.dtype]
    full, L, H = s.method == "full", c.num_hidden_layers, c.hidden_size
    linear_numels = [o * i for o, i in linear_shapes(c).values()]
    trainable = one.trainable_parameters
    if full:
        weights = one.parameters * 4 // n_ranks  # the fp32 shards (the master copy)
        layer_trainable = sum(linear_numels) + 2 * H
        layer_bytes = layer_trainable * e
    else:
        weights = one.weights // n_ranks
        layer_trainable = trainable // L
        if s.method == "qlora":
            layer_bytes = sum(sum(nf4_bytes(x, s.blocksize, s.double_quant)) for x in linear_numels)
        else:
            layer_bytes = sum(linear_numels) * e
        layer_bytes += 2 * H * e + layer_trainable * e  # the norms and the adapters, gathered in the compute dtype
    root = (c.vocab_size * H * (1 if c.tie_word_embeddings else 2) + H) * e
    gathered = root + 2 * layer_bytes
    static = {"weights": weights, "quant_constants": one.quant_constants // n_ranks,
              "lora_parameters": 0 if full else trainable * 4 // n_ranks,
              "optimizer_states": one.optimizer_states // n_ranks, "master_weights": 0}
    phases = {}
    for name, parts in one.phases.items():
        # the gradients that exist at this moment, sharded in fp32 (scaled from the one-process count)
        grads = parts["gradients"] * 4 // (DTYPE_BYTES[s.adapter_dtype or s.dtype] if not full else e) // n_ranks
        in_flight = layer_trainable * e if name in BACKWARD_PHASES else 0
        phases[name] = {**parts, **static, "gradients": grads, "workspace": parts["workspace"] + in_flight,
                        "gathered": 0 if name == "optimizer step" else gathered}
    totals = {name: sum(parts.values()) for name, parts in phases.items()}
    peak_phase = max(totals, key=totals.get)
    return dataclasses.replace(
        one, **static, gradients=trainable * 4 // n_ranks, workspace=max(p["workspace"] for p in phases.values()),
        pageable=one.pageable // n_ranks, peak=totals[peak_phase], peak_phase=peak_phase,
        live_at_peak=phases[peak_phase], phases=phases, gathered=gathered)
