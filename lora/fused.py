"""LoRA on fused projections: the frozen bases of q/k/v (and of gate/up) as one matmul (``models.fused``), and
the adapters' A matrices that read the same input as one matmul too.

Per layer, LoRA adds scaling_i * B_i(A_i x) (Hu et al. 2021, section 4.1). q_proj, k_proj and v_proj read the
same x, so their first products are one:

    x A_cat^T = x [A_q; A_k; A_v]^T     (..., sum of r)   ->  split into (..., r_q), (..., r_k), (..., r_v)
    y_i = base_i + B_i (x A_i^T) * scaling_i                    (the order of ``lora.functional.lora_forward``)

``torch.cat`` of the named ``lora_A.<adapter>.weight`` parameters is differentiable, so their gradients land on
them as before; in backward the input gradient through the A's is again one matmul. The A's are stacked per call
(r x in_features each: small) and the adapters keep their parameters, names and files.

The adapters may share the matmul only when they see the same input: no dropout in training (each layer draws
its own mask, as PEFT does), no per-row adapters of a mixed batch, the same active, unmerged adapters on every layer, in one dtype. Otherwise each layer adds its own
adapters to its (still fused) base output (``LoRALinear.lora_output``). A group with a DoRA adapter runs unfused
altogether (``LoRAProjectionGroup.usable``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from finetune_ref.lora.functional import add_update, lora_up
from finetune_ref.lora.layer import LoRALinear
from finetune_ref.models.fused import GATE_UP, QKV, FusedProjections, ProjectionGroup, base_of


def shared_input_lora(x: torch.Tensor, results: list[torch.Tensor], lora_As: list[torch.Tensor],
                      lora_Bs: list[torch.Tensor], scalings: list[float],
                      dtypes: list[torch.dtype] | None = None) -> list[torch.Tensor]:
    """results_i + scaling_i * B_i(A_i x) for layers reading the same x, the A's applied as one matmul.

    Args:
        x: (..., in_features), in the adapters' dtype.
        results: each layer's running output (..., out_i).
        lora_As: (r_i, in_features) each.  lora_Bs: (out_i, r_i) each.  scalings: one float per layer.
        dtypes: the last adapter: each sum cast to this dtype as it is added (``lora.functional.add_update``).
    """
    ranks = [a.shape[0] for a in lora_As]
    mids = F.linear(x, torch.cat(lora_As)).split(ranks, dim=-1)  # (..., sum r_i) -> (..., r_i) each
    updates = [lora_up(mid, lora_B, scaling) for mid, lora_B, scaling in zip(mids, lora_Bs, scalings)]
    if dtypes is None:
        return [result + update for result, update in zip(results, updates)]
    return [add_update(result, update, dtype) for result, update, dtype in zip(results, updates, dtypes)]


def shared_adapters(layers: list[LoRALinear]) -> list[str] | None:
    """The adapters the layers would all add to the same input in the same order, or None when they cannot
    share the A matmul (see the module docstring)."""
    shared = None
    for layer in layers:
        if layer.disabled or layer.row_adapters is not None:
            return None
        names = [n for n in layer.active_adapters if n in layer.lora_A and n not in layer.merged_adapters]
        if any(layer.use_dora[n] or (layer.training and layer.lora_dropout[n] > 0.0) for n in names):
            return None
        if shared is not None and names != shared:
            return None
        shared = names
    for name in shared or []:
        if len({layer.lora_A[name].weight.dtype for layer in layers}) != 1:
            return None
    return shared


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
        dtypes = [outputs[i].dtype for i in lora]
        results = [outputs[i] for i in lora]
        for name in names:
            layers = [modules[i] for i in lora]
            lora_As = [m.lora_A[name].weight for m in layers]  # (r, in) each
            x_lora = x if x.dtype == lora_As[0].dtype else x.to(lora_As[0].dtype)
            results = shared_input_lora(x_lora, results, lora_As, [m.lora_B[name].weight for m in layers],
                                        [m.scaling[name] for m in layers], dtypes if name == names[-1] else None)
        for i, result, dtype in zip(lora, results, dtypes):
            outputs[i] = result.to(dtype)  # as LoRALinear.lora_output: back in the base output's dtype
        return outputs


def fuse_projections(model: nn.Module, enabled: bool = True) -> int:
    """Give every Attention and MLP of ``model`` a fused q/k/v or gate/up group (``enabled``), or none.

    Call after the base is frozen (and LoRA injected or not: the groups look the projections up at each call);
    calling it again keeps the groups already stacked. Stacks the dense frozen bases' weights (their named parameters become views; nothing else changes). A group
    whose bases are trainable (full fine-tuning), sharded or mixed runs unfused at each call.

    Returns:
        The number of groups whose dense base weights were stacked (quantized bases stack per call instead).
    """
    stacked = 0
    for module in model.modules():
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
