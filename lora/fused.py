"""LoRA on fused projections: the frozen bases of q/k/v (and of gate/up) as one matmul (``models.fused``), and
the adapters' A matrices that read the same input as one matmul too.

Per layer, LoRA adds scaling_i * B_i(A_i x) (Hu et al. 2021, section 4.1). q_proj, k_proj and v_proj read the
same x, so their first products are one:

    x A_cat^T = x [A_q; A_k; A_v]^T     (..., sum of r)   ->  split into (..., r_q), (..., r_k), (..., r_v)
    y_i = base_i + B_i (x A_i^T) * scaling_i                    (the order of ``lora.functional.lora_forward``)

The branch is ``lora.branch.LoRABranch``: the A's stacked per call (r x in_features each: small), in backward
the input gradient through the A's again one matmul and each gradient a wide product; the adapters keep their
parameters, names and files.

The adapters may share the matmul only when they see the same input: no dropout in training (each layer draws
its own mask, as PEFT does), no per-row adapters of a mixed batch, the same active, unmerged adapters on every layer, in one dtype
(``lora.branch.shared_adapters``). Otherwise each layer adds its own adapters to its (still fused) base output (``LoRALinear.lora_output``). A group with a DoRA adapter runs unfused
altogether (``LoRAProjectionGroup.usable``).
"""

from __future__ import annotations

import torch
from torch import nn

from finetune_ref.lora.branch import lora_outputs, shared_adapters
from finetune_ref.lora.layer import LoRALinear
from finetune_ref.models.fused import GATE_UP, QKV, FusedProjections, ProjectionGroup, base_of


class LoRAProjectionGroup(ProjectionGroup):
    """A ``ProjectionGroup`` whose projections may be ``LoRALinear``s (the bases fused, the A's shared)."""

    def usable(self, owner: nn.Module) -> bool:
        # DoRA (lora.dora) saves each layer's base output for backward: a column block of the fused output
        # would keep the whole (N, sum of out_features) tensor alive, so DoRA layers run unfused.
        return not any(isinstance(m, LoRALinear) and any(m.use_dora.values())
                       for m in (getattr(owner, name) for name in self.names))

    def adapted(self, owner: nn.Module, x: torch.Tensor, outputs: list[torch.Tensor]) -> list[torch.Tensor] | None:
        modules = [getattr(owner, name) for name in self.names]
        if any(base_of(m) is not m and not isinstance(m, LoRALinear) for m in modules):
            return None  # some other wrapper: each runs alone
        lora = [i for i, m in enumerate(modules) if isinstance(m, LoRALinear)]
        outputs = list(outputs)
        names = shared_adapters([modules[i] for i in lora]) if len(lora) > 1 else None
        if names is None:
            for i in lora:
                outputs[i] = modules[i].lora_output(x, outputs[i])
            return outputs
        layers = [modules[i] for i in lora]
        results = lora_outputs(layers, names, x, [outputs[i] for i in lora])
        for i, result in zip(lora, results):
            outputs[i] = result
        return outputs


def fuse_projections(model: nn.Module, enabled: bool = True) -> int:
    """Give every Attention and MLP of ``model`` a fused q/k/v or gate/up group (``enabled``), or none.

    Call after the base is frozen (and LoRA injected or not: the groups look the projections up at each call);
    calling it again keeps the groups already stacked. Stacks the dense frozen bases' weights (their named
    parameters become views; nothing else changes). A group whose bases are trainable (full fine-tuning),
    sharded or mixed runs unfused at each call. Every ``LoRALinear`` computes its adapters with
    ``lora.branch`` while ``enabled`` (the layers of a group always do), PEFT's ops otherwise.

    Returns:
        The number of groups whose dense base weights were stacked (quantized bases stack per call instead).
    """
    stacked = 0
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.branch_backward = enabled  # the layers outside a group (o_proj, down_proj) too
        if not isinstance(module, FusedProjections):
            continue
        names = QKV if all(hasattr(module, n) for n in QKV) else GATE_UP
        if not enabled:
            module.fused_projections = None
            continue
        group = module.fused_projections
        if group is None or group.stacked_weight(group.bases(module)) is None:  # else already stacked: keep it
            group = LoRAProjectionGroup(names)
            group.fuse_(module)
            module.fused_projections = group
        stacked += group.weight is not None
    return stacked
