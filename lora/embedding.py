"""LoRA on an input embedding (``nn.Embedding``), as PEFT's ``lora.Embedding`` (peft/tuners/lora/layer.py).

An embedding is a lookup E[ids] into E: (num_embeddings V, embedding_dim D), i.e. a linear layer applied to
one-hot rows. Hu et al. 2021 (section 4.1) adapt it with the same rank-r update; the reference implementation
(microsoft/LoRA loralib/layers.py ``Embedding``) and PEFT keep the factors in the transposed orientation:

    lora_embedding_A: (r, V)    init zeros                 (the opposite of a linear layer's LoRA, where B = 0)
    lora_embedding_B: (D, r)    init N(0, 1), nn.Embedding's default init
    h = E[ids] + scaling * F.embedding(ids, A^T) @ B^T     ids: (...),  h: (..., D)
    dE = scaling * (B @ A)^T                               (V, D), what merging adds to E (section 4.2)

No dropout is applied (PEFT stores ``lora_dropout`` but its Embedding.forward does not use it: dropping a
looked-up row of A^T would drop the whole token's update). The lookup uses the base's ``padding_idx`` (no
gradient into that row of A), as PEFT's ``_embed`` does.

An input embedding tied to the output head (``lm_head.weight is embed_tokens.weight``, as in SmolLM2) is
either refused or, with PEFT's ``ensure_weight_tying``, tied through ``TiedLoRAHead``: the head computes
with the same factors transposed (lora_A = B^T (r, D), lora_B = A^T (V, r), peft/tuners/lora/model.py
``_create_and_replace`` with ``tied_adapter``), so head and embedding keep seeing the same dE. PEFT makes the
head's A/B separate Parameters over the same storage (each gets only its own path's gradient and the optimizer
steps both); here the head reads the embedding's Parameters, so the one gradient is the sum of the two paths'.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from finetune_ref.lora.functional import lora_forward, lora_scaling, merged_weight
from finetune_ref.lora.init import is_mutating_init
from finetune_ref.lora.tuner_layer import AdapterLayerMixin, check_adapter_name


def lora_embedding_forward(ids: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                           padding_idx: int | None = None) -> torch.Tensor:
    """scaling * F.embedding(ids, A^T) @ B^T: (...) int ids, A (r, V), B (D, r) -> (..., D) in A's dtype.

    The order of operations (lookup in A^T, matmul with B^T, then * scaling) is PEFT's Embedding.forward.
    """
    after_A = F.embedding(ids, lora_A.T, padding_idx=padding_idx)  # (..., r): rows of A^T (V, r)
    return (after_A @ lora_B.T) * scaling  # (..., r) @ (r, D) -> (..., D)


def lora_embedding_delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """dE = scaling * (B @ A)^T in fp32, shape (V, D) like the embedding weight (peft ``get_delta_weight``)."""
    return (lora_B.float() @ lora_A.float()).T * scaling  # (D, r) @ (r, V) -> (D, V) -> (V, D)


@torch.no_grad()
def init_lora_embedding_weights_(lora_A: torch.Tensor, lora_B: torch.Tensor, init_lora_weights: bool | str) -> None:
    """PEFT's Embedding.update_layer then reset_lora_parameters: A, B ~ N(0, 1) (drawn A first, as PEFT does,
    so the same seed gives the same B); then for True / "gaussian": A = 0, B ~ N(0, 1) again (a no-op adapter).
    False keeps both random (not a no-op; for tests)."""
    if init_lora_weights not in (True, False, "gaussian"):
        raise ValueError(f"init_lora_weights={init_lora_weights!r} is not supported on an embedding: use True, "
                         "False or 'gaussian'")
    lora_A.normal_()
    lora_B.normal_()
    if init_lora_weights is not False:
        nn.init.zeros_(lora_A)
        nn.init.normal_(lora_B)


class LoRAEmbedding(AdapterLayerMixin, nn.Module):
    """A frozen ``nn.Embedding`` plus named LoRA adapters (see the module docstring).

    Attributes mirror ``LoRALinear`` (r, lora_alpha, scaling, lora_dropout, use_rslora, active_adapters,
    merged_adapters, disabled, shared_weight_with), with the factors in ``nn.ParameterDict``s named as PEFT's,
    so state-dict keys are ``<module>.lora_embedding_A.<adapter>``.

    Raises:
        TypeError: base_layer is not an nn.Embedding, or uses max_norm (it renormalises E in place) or sparse
            gradients.
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        if not isinstance(base_layer, nn.Embedding):
            raise TypeError(f"LoRAEmbedding wraps an nn.Embedding, got {type(base_layer).__name__}")
        if base_layer.max_norm is not None or base_layer.sparse:
            raise TypeError("LoRA on an nn.Embedding with max_norm or sparse=True is not supported")
        self.base_layer = base_layer
        self.num_embeddings: int = base_layer.num_embeddings
        self.embedding_dim: int = base_layer.embedding_dim
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}  # recorded for the config; not applied (see module docstring)
        self.use_rslora: dict[str, bool] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled: bool = False
        self.shared_weight_with: list[str] = []
        self.base_snapshot = None  # the base is never quantized: nothing to restore besides W - dE
        self.requantization_drift = None

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def _adapter_keys(self) -> nn.ParameterDict:  # lora.tuner_layer.AdapterLayerMixin's tables
        return self.lora_embedding_A

    def _adapter_tables(self) -> tuple:
        return (self.lora_embedding_A, self.lora_embedding_B, self.r, self.lora_alpha, self.scaling, self.lora_dropout,
                self.use_rslora)

    def add_adapter(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    use_rslora: bool = False, init_lora_weights: bool | str = True,
                    dtype: torch.dtype = torch.float32, use_dora: bool = False) -> None:
        """Create adapter ``adapter_name``: A (r, V), B (D, r) made in fp32, initialised, cast to ``dtype``.

        Raises:
            ValueError: name taken or invalid; use_dora (DoRA on embeddings is not implemented here); an init
                that rewrites the base (pissa/olora); r, lora_alpha or lora_dropout out of range.
        """
        check_adapter_name(adapter_name)
        if adapter_name in self.lora_embedding_A:
            raise ValueError(f"adapter {adapter_name!r} already exists on this layer")
        if use_dora:
            raise ValueError("use_dora on an embedding (PEFT's DoraEmbeddingVariant) is not supported: leave "
                             "embed_tokens out of target_modules or turn DoRA off")
        if is_mutating_init(init_lora_weights):
            raise ValueError(f"init_lora_weights={init_lora_weights!r} on an embedding is not supported: leave "
                             "embed_tokens out of target_modules")
        scaling = lora_scaling(r, lora_alpha, use_rslora)
        if not 0.0 <= float(lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        device = self.base_layer.weight.device
        lora_A = torch.empty(r, self.num_embeddings, device=device)
        lora_B = torch.empty(self.embedding_dim, r, device=device)
        init_lora_embedding_weights_(lora_A, lora_B, init_lora_weights)
        self.lora_embedding_A[adapter_name] = nn.Parameter(lora_A.to(dtype))
        self.lora_embedding_B[adapter_name] = nn.Parameter(lora_B.to(dtype))
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = scaling
        self.lora_dropout[adapter_name] = float(lora_dropout)
        self.use_rslora[adapter_name] = use_rslora

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(...) int ids -> (..., D) in the base weight's dtype."""
        result = self.base_layer(ids)
        if self.disabled:
            return result
        result_dtype = result.dtype
        for name in self.unmerged_names():
            result = result + lora_embedding_forward(ids, self.lora_embedding_A[name], self.lora_embedding_B[name],
                                                     self.scaling[name], self.base_layer.padding_idx)
        return result.to(result_dtype)

    # ---- merge / unmerge (Hu et al. 2021, section 4.2) ----

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        self._check_exists([adapter_name])
        return lora_embedding_delta_weight(self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name],
                                           self.scaling[adapter_name])

    @torch.no_grad()
    def merged_base_weight(self, adapter_names: list[str]) -> torch.Tensor:
        self._check_exists(adapter_names)
        return merged_weight(self.base_layer.weight, [self.get_delta_weight(n) for n in adapter_names])

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = True,
              allow_shared_weight: bool = False) -> list[str]:
        """E <- E + dE for the given adapters (default: the active ones), fp32, rounded once; as
        ``LoRALinear.merge`` (a tied head through ``TiedLoRAHead`` shares E, so it is merged with it)."""
        names = list(self.active_adapters) if adapter_names is None else list(adapter_names)
        self._check_exists(names)
        names = [n for n in dict.fromkeys(names) if n not in self.merged_adapters]
        if not names:
            return []
        if self.shared_weight_with and not allow_shared_weight:
            raise ValueError(f"this embedding's weight is shared with {self.shared_weight_with}; merging would "
                             "change them too. Use lora.merge_adapters(model)")
        new_weight = self.merged_base_weight(names)
        if safe_merge and not torch.isfinite(new_weight).all():
            raise ValueError(f"merging adapter(s) {names} gives non-finite weights; the base weight was left unchanged")
        self.base_layer.weight.copy_(new_weight)
        self.merged_adapters.extend(names)
        return names

    @torch.no_grad()
    def unmerge(self) -> list[str]:
        """E <- E - the merged updates (fp32, rounded once); returns the names unmerged."""
        if not self.merged_adapters:
            return []
        names = list(reversed(self.merged_adapters))
        weight = self.base_layer.weight
        weight.copy_(merged_weight(weight, [self.get_delta_weight(n) for n in names], sign=-1))
        self.merged_adapters.clear()
        return names

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}: r={self.r[n]}, alpha={self.lora_alpha[n]}" for n in self.r)
        return f"adapters={{{adapters}}}, active={self.active_adapters}, merged={self.merged_adapters}"


class TiedLoRAHead(nn.Module):
    """An output head tied to a ``LoRAEmbedding`` (PEFT's ``ensure_weight_tying``): head(x) + the embedding's
    adapters read transposed, scaling * (dropout(x) B) A, i.e. x dE^T. Adapter state (active, merged, disabled)
    is the embedding's: its weight is the head's, so merging the embedding merges the head.

    The embedding is held outside the module tree (it is already the model's ``embed_tokens``), so the head
    owns no parameters of its own and the factors are counted, saved and stepped once.
    """

    def __init__(self, base_layer: nn.Module, embedding: LoRAEmbedding):
        super().__init__()
        if base_layer.weight is not embedding.base_layer.weight:
            raise ValueError("TiedLoRAHead needs a head whose weight is the embedding's weight")
        self.base_layer = base_layer
        self.__dict__["embedding"] = embedding  # not a submodule: see the class docstring

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def source(self) -> LoRAEmbedding:
        """The layer whose adapters this head mirrors."""
        return self.embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        emb = self.embedding
        if emb.disabled:
            return result
        result_dtype = result.dtype
        for name in emb.unmerged_names():
            lora_A = emb.lora_embedding_B[name].T  # (r, D): the head's lora_A in PEFT's file
            lora_B = emb.lora_embedding_A[name].T  # (V, r): the head's lora_B
            x_lora = x if x.dtype == lora_A.dtype else x.to(lora_A.dtype)
            result = result + lora_forward(x_lora, lora_A, lora_B, emb.scaling[name], emb.lora_dropout[name],
                                           self.training)
        return result.to(result_dtype)
