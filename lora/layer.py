"""``LoRALinear``: a frozen base layer plus named LoRA adapters (Hu et al. 2021, section 4.1).

    h = x W^T + b + sum over active adapters of scaling * B(A(dropout(x)))
    x: (..., in_features),  A: (r, in_features),  B: (out_features, r),  h: (..., out_features)

The math is in ``lora.functional`` (plain functions on tensors: ``lora_scaling``, ``lora_forward``,
``lora_delta_weight``, ``merged_weight``, ``init_lora_weights_``); this module holds the parameters and the
bookkeeping around them.

``LoRALinear`` holds several named adapters (``nn.ModuleDict``s keyed by adapter name, as PEFT does, so that
state-dict keys are ``<module>.lora_A.<adapter>.weight``), a list of active ones, and the list of those merged
into the base weight. The base is any module with ``in_features``, ``out_features`` and a forward; merging reaches
its weight only through ``lora.base_weight`` (a dense floating ``weight``, or the base's own ``dequantize()`` and
``requantize_(weight)``, as ``qlora.nf4_linear.NF4Linear`` has).
"""

from __future__ import annotations

import torch
from torch import nn

from finetune_ref.lora.branch import lora_outputs, shared_adapters
from finetune_ref.lora.base_weight import (dense_weight, quantized_snapshot, restore_snapshot, warn_requantization,
                                           write_dense_weight)
from finetune_ref.lora.dora import (DoraMagnitude, dora_forward, dora_init_magnitude, dora_merge_factor,
                                    dora_merged, dora_unmerged)
from finetune_ref.lora.init import is_mutating_init, rewrite_base_for_init
from finetune_ref.lora.tuner_layer import AdapterLayerMixin, check_adapter_name
from finetune_ref.lora.functional import (add_update, init_lora_weights_, lora_delta_weight, lora_forward, lora_scaling,
                                         merged_weight)

def _base_device(base_layer: nn.Module) -> torch.device:
    for tensor in (*base_layer.parameters(), *base_layer.buffers()):
        return tensor.device
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------------------

class LoRALinear(AdapterLayerMixin, nn.Module):
    """A frozen base layer plus named LoRA adapters: y = base(x) + sum over active adapters of scaling*B(A(drop(x))).

    Args:
        base_layer: any module with int ``in_features``, ``out_features`` and forward (..., in) -> (..., out):
            nn.Linear, or a frozen quantized linear. Kept as ``self.base_layer`` (PEFT's name), so the base
            weight's state-dict key becomes ``<module>.base_layer.weight``.

    Attributes:
        lora_A / lora_B: ``nn.ModuleDict`` adapter name -> bias-free nn.Linear with weight (r, in) / (out, r).
        r, lora_alpha, scaling, lora_dropout, use_rslora, use_dora: dicts keyed by adapter name.
        lora_magnitude_vector: ``nn.ModuleDict`` adapter name -> ``lora.dora.DoraMagnitude`` (weight (out,)),
            for the DoRA adapters only (Liu et al. 2024, section 4; see ``lora.dora``).
        active_adapters: names whose update is added in forward (in this order); names this layer does not
            carry are skipped (the list is model-wide).
        merged_adapters: names whose update is currently inside the base weight.
        disabled: when True, forward is the base layer alone.

    Raises:
        TypeError: base_layer is not an nn.Module with positive int in_features/out_features.
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        if not isinstance(base_layer, nn.Module):
            raise TypeError(f"base_layer must be an nn.Module, got {type(base_layer).__name__}")
        for attr in ("in_features", "out_features"):
            value = getattr(base_layer, attr, None)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise TypeError(f"{type(base_layer).__name__} cannot carry LoRA: it needs a positive int "
                                f"'{attr}' (found {value!r}); LoRALinear wraps linear layers")
        if isinstance(base_layer, LoRALinear):
            raise TypeError("base_layer is already a LoRALinear; add another adapter to it with add_adapter")
        self.base_layer = base_layer
        self.in_features: int = base_layer.in_features
        self.out_features: int = base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.use_dora: dict[str, bool] = {}
        self.lora_magnitude_vector = nn.ModuleDict()
        # DoRA's merge factor m / ||W0 + dW||_c per merged DoRA adapter, kept for unmerge: after merging, W0 is
        # gone from the weight, so the factor cannot be recomputed (peft DoraLinearVariant caches it the same way).
        self._dora_merge_factors: dict[str, torch.Tensor] = {}
        # (A0, B0) of adapters made by PiSSA/OLoRA, which moved s B0 A0 out of the base weight: saving converts
        # the adapter to a plain LoRA on the original weight with them (lora.init.converted_lora).
        self.initial_lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled: bool = False
        # Other modules sharing the base weight (set by lora.inject_lora, e.g. ["model.embed_tokens"] for a
        # tied lm_head): merging in place would change them too, so merge() refuses while this is non-empty.
        self.shared_weight_with: list[str] = []
        # A quantized base's stored tensors from before its first merge (unmerge restores them exactly), and the
        # drift of the last merge into it (lora.base_weight.requantization_drift); None for a dense base.
        self.base_snapshot: dict[str, torch.Tensor] | None = None
        self.requantization_drift = None
        # A mixed batch's per-row adapters (``lora.mixed.RowAdapters``, set by ``lora.mixed.set_row_adapters``):
        # while set, each row gets its own adapter instead of the active ones.
        self.row_adapters = None
        # Compute the adapters with ``lora.branch`` (their gradients as wide products; set with the fused
        # projections by ``lora.fused.fuse_projections``); False: PEFT's ops, bitwise (``lora.functional``).
        self.branch_backward: bool = False

    # ---- convenience views of the base, as PEFT's BaseTunerLayer offers ----

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (not the merged LoRA update unless an adapter is merged)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    # ---- the tables ``lora.tuner_layer.AdapterLayerMixin`` keeps (merged, adapter_names, set/delete_adapter) ----

    def _adapter_keys(self) -> nn.ModuleDict:
        return self.lora_A

    def _adapter_tables(self) -> tuple:
        return (self.lora_A, self.lora_B, self.lora_magnitude_vector, self.initial_lora, self.r, self.lora_alpha,
                self.scaling, self.lora_dropout, self.use_rslora, self.use_dora)

    # ---- adapters ----

    def add_adapter(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    use_rslora: bool = False, init_lora_weights: bool | str = True,
                    dtype: torch.dtype = torch.float32, use_dora: bool = False) -> None:
        """Create adapter ``adapter_name`` (A: (r, in), B: (out, r), in ``dtype``, on the base's device).

        The new adapter is not activated (call ``set_adapter``), as in PEFT's ``add_adapter``. A and B are
        created in fp32, initialised, then cast to ``dtype``, so an initialisation is the same in every dtype up
        to that cast. With ``use_dora`` the magnitude m = ||W + s B A||_c is computed from those fp32 A and B
        and the dense (dequantized) base weight, then cast to ``dtype`` too (``lora.dora.dora_init_magnitude``).

        Raises:
            ValueError: the name exists or is invalid; r, lora_alpha or lora_dropout out of range.
            TypeError: dtype is not a floating dtype.
        """
        check_adapter_name(adapter_name)
        if adapter_name in self.lora_A:
            raise ValueError(f"adapter {adapter_name!r} already exists on this layer; delete it first or pick "
                             "another name")
        scaling = lora_scaling(r, lora_alpha, use_rslora)
        if not 0.0 <= float(lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"adapter dtype must be a floating torch.dtype, got {dtype!r}")
        device = _base_device(self.base_layer)
        lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        if is_mutating_init(init_lora_weights):
            # PiSSA / OLoRA (lora.init): the base becomes W - s B0 A0, as PEFT's pissa_init / olora_init do.
            init_A, init_B = rewrite_base_for_init(self.base_layer, init_lora_weights, r, scaling,
                                                   merged=bool(self.merged_adapters), use_dora=use_dora)
            with torch.no_grad():
                lora_A.weight.copy_(init_A)
                lora_B.weight.copy_(init_B)
            self.initial_lora[adapter_name] = (init_A.to(dtype), init_B.to(dtype))
        else:
            init_lora_weights_(lora_A.weight, lora_B.weight, init_lora_weights, r)
        if not isinstance(use_dora, bool):
            raise TypeError(f"use_dora must be True or False, got {use_dora!r}")
        if use_dora:
            magnitude = dora_init_magnitude(dense_weight(self.base_layer), lora_A.weight, lora_B.weight, scaling)
            self.lora_magnitude_vector[adapter_name] = DoraMagnitude(magnitude.to(torch.float32)).to(dtype)
        self.use_dora[adapter_name] = use_dora
        self.lora_A[adapter_name] = lora_A.to(dtype)
        self.lora_B[adapter_name] = lora_B.to(dtype)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = scaling
        self.lora_dropout[adapter_name] = float(lora_dropout)
        self.use_rslora[adapter_name] = use_rslora

    # ---- forward ----

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """(..., in_features) -> (..., out_features) in the base output's dtype."""
        return self.lora_output(x, self.base_layer(x, *args, **kwargs))

    def lora_output(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """The base's output ``result`` plus the active adapters' updates of x (``lora.fused`` computes the
        base outputs of several layers in one matmul, then calls this)."""
        if self.disabled:
            return result
        result_dtype = result.dtype
        if self.row_adapters is not None:
            if not self.row_adapters.empty:
                result = result + self.row_adapters.delta(x)
            return result.to(result_dtype)
        if self.branch_backward and (names := shared_adapters([self])) is not None:
            return lora_outputs([self], names, x, [result])[0]
        pending = [n for n in self.active_adapters if n in self.lora_A and n not in self.merged_adapters]
        for name in pending:  # not on this layer, or already inside the base weight: skipped
            lora_A = self.lora_A[name].weight  # (r, in)
            lora_B = self.lora_B[name].weight  # (out, r)
            x_lora = x if x.dtype == lora_A.dtype else x.to(lora_A.dtype)
            if self.use_dora[name]:
                # As PEFT (layer.py Linear.forward), the running result is DoRA's base_result: an adapter
                # before it in the active list is rescaled with the base, exactly as merging in turn does.
                result = result + dora_forward(x_lora, result, dense_weight(self.base_layer), self.bias,
                                               self.lora_magnitude_vector[name].weight, lora_A, lora_B,
                                               self.scaling[name], self.lora_dropout[name], self.training)
                continue
            # Adding an fp32 update to a 16-bit result promotes to fp32; the last one is cast back to the base
            # output's dtype as it is added (add_update: bitwise PEFT's add, then .to()).
            update = lora_forward(x_lora, lora_A, lora_B, self.scaling[name], self.lora_dropout[name], self.training)
            result = add_update(result, update, result_dtype) if name == pending[-1] else result + update
        return result.to(result_dtype)

    # ---- merge / unmerge (Hu et al. 2021, section 4.2) ----

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """scaling * B @ A for one adapter, fp32, (out_features, in_features)."""
        self._check_exists([adapter_name])
        return lora_delta_weight(self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight,
                                 self.scaling[adapter_name])

    @torch.no_grad()
    def merged_base_weight(self, adapter_names: list[str]) -> torch.Tensor:
        """What W would become if ``adapter_names`` were merged (new tensor, W's dtype); W is not touched."""
        self._check_exists(adapter_names)
        weight = dense_weight(self.base_layer)
        if not any(self.use_dora[n] for n in adapter_names):
            return merged_weight(weight, [self.get_delta_weight(n) for n in adapter_names])
        return self._dora_merged_weight(weight, adapter_names)[0]

    def _unmerged_weight(self) -> torch.Tensor:
        """The base weight with every merged adapter taken out again (fp32); W itself when none is merged."""
        acc = dense_weight(self.base_layer).detach().float()  # (out, in)
        for name in reversed(self.merged_adapters):
            delta = self.get_delta_weight(name)
            acc = dora_unmerged(acc, delta, self._dora_merge_factors[name]) if self.use_dora[name] else acc - delta
        return acc

    def _dora_merged_weight(self, weight: torch.Tensor, names: list[str]) -> tuple[torch.Tensor, dict]:
        """W after merging ``names`` in turn (plain: W + dW; DoRA: f * (W + dW), f from the unmerged W as
        peft DoraLinearVariant.merge_safe computes it), in fp32, rounded once; and the DoRA factors used."""
        unmerged = self._unmerged_weight() if any(self.use_dora[n] for n in names) else None
        acc = weight.detach().float()  # (out, in)
        factors = {}
        for name in names:
            delta = self.get_delta_weight(name)
            if self.use_dora[name]:
                factors[name] = dora_merge_factor(unmerged, delta, self.lora_magnitude_vector[name].weight.float())
                acc = dora_merged(acc, delta, factors[name])
            else:
                acc = acc + delta
        return acc.to(weight.dtype), factors

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = True,
              allow_shared_weight: bool = False) -> list[str]:
        """W <- W + sum of scaling * B @ A over the given adapters (default: the active ones).

        Computed in fp32 and rounded once. Adapters already merged are skipped (merging twice merges once).

        Args:
            safe_merge: check that the merged weight is finite before writing it; when it is not, raise
                and leave W and ``merged_adapters`` unchanged. (PEFT's default is False; ours is True because
                the check costs one pass over W.)
            allow_shared_weight: merge even though ``shared_weight_with`` names other modules holding the same
                weight (they change too). ``lora.adapters.merge_adapters(model, untie_tied=True)`` unties
                instead.

        Returns:
            The names merged by this call.

        Raises:
            ValueError: unknown adapter; non-finite merged weight (with safe_merge); shared (tied) weight.
            TypeError: the base has no dense floating weight (see ``dense_weight``).
        """
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names must be a list of names, got the string {adapter_names!r}")
        names = list(self.active_adapters) if adapter_names is None else list(adapter_names)
        self._check_exists(names)
        names = [n for n in dict.fromkeys(names) if n not in self.merged_adapters]
        if not names:
            return []
        weight = dense_weight(self.base_layer)
        if self.shared_weight_with and not allow_shared_weight:
            raise ValueError(f"this layer's weight is shared with {self.shared_weight_with} (tied embeddings); "
                             "merging would change them too. Use lora.merge_adapters(model, untie_tied=True)")
        new_weight, factors = self._dora_merged_weight(weight, names)
        if safe_merge and not torch.isfinite(new_weight).all():
            raise ValueError(f"merging adapter(s) {names} gives non-finite weights (NaN/inf, or overflow of "
                             f"{weight.dtype}); the base weight was left unchanged. The adapter is broken or "
                             "its update is too large for this dtype")
        snapshot = self.base_snapshot if self.merged_adapters else quantized_snapshot(self.base_layer)
        # In place for a dense base (the Parameter survives); re-quantized for a quantized one, with a warning.
        self.requantization_drift = write_dense_weight(self.base_layer, new_weight)
        self.base_snapshot = snapshot
        self._dora_merge_factors.update(factors)
        if self.requantization_drift is not None:
            warn_requantization(self.requantization_drift, stacklevel=4)  # 4: past torch.no_grad's wrapper
        self.merged_adapters.extend(names)
        return names

    @torch.no_grad()
    def unmerge(self) -> list[str]:
        """W <- W - the merged updates (fp32, rounded once); returns the names unmerged ([] if none).

        Exact in fp32 up to rounding; in bf16/fp16 within one ulp of max(|W|, |W + dW|) per element. A quantized
        base gets back its stored tensors from before the first merge, bit for bit (re-quantizing W - dW would
        change about half the codes).
        """
        if not self.merged_adapters:
            return []
        names = list(reversed(self.merged_adapters))
        if self.base_snapshot is not None:
            restore_snapshot(self.base_layer, self.base_snapshot)
        elif any(self.use_dora[n] for n in names):
            write_dense_weight(self.base_layer, self._unmerged_weight().to(dense_weight(self.base_layer).dtype))
        else:
            weight = dense_weight(self.base_layer)
            deltas = [self.get_delta_weight(n) for n in names]
            write_dense_weight(self.base_layer, merged_weight(weight, deltas, sign=-1))
        for name in names:
            self._dora_merge_factors.pop(name, None)
        self.base_snapshot, self.requantization_drift = None, None
        self.merged_adapters.clear()
        return names

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}: r={self.r[n]}, alpha={self.lora_alpha[n]}{', dora' if self.use_dora[n] else ''}"
                             for n in self.lora_A)
        return (f"in_features={self.in_features}, out_features={self.out_features}, adapters={{{adapters}}}, "
                f"active={self.active_adapters}, merged={self.merged_adapters}")
