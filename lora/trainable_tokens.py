"""Training only some rows of an embedding: PEFT's ``trainable_token_indices`` (peft/tuners/trainable_tokens/).

To teach a model new tokens (added to the vocabulary, or reserved ones put to use) the rows E[i] of those
tokens must change, but training the whole embedding (``modules_to_save``) costs V x D parameters and their
optimizer state. PEFT's ``TrainableTokensLayer`` keeps E frozen and trains only the chosen rows:

    trainable_tokens_delta: (k, D)   the *values* of rows ``token_indices`` (k of them), initialised to E[indices]
                                     (despite its name, not a difference)
    E' = E.index_copy(0, indices, delta)               (V, D), a new tensor each forward
    h = F.embedding(ids, E')                            ids: (...),  h: (..., D)

so only the looked-up rows in ``indices`` get a gradient. A head tied to the embedding (SmolLM2's lm_head) is
wrapped too and computes F.linear(x, E'), with the *same* delta (PEFT wraps the tied head with ``tied_adapter``,
sharing its parameters): both sides keep seeing one matrix. Merging writes the rows into E (index_copy);
unmerging writes back the original rows, kept as buffers (``trainable_tokens_original``). Several adapters may
be active only with disjoint indices (PEFT's ``_check_overlapping_tokens``).

In PEFT's adapter file the rows are ``base_model.model.<embedding>.token_adapter.trainable_tokens_delta``
(nothing for the tied head: it shares them); the config field is ``trainable_token_indices``: a list of indices
for the input embedding, or {module name: indices}.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from finetune_ref.lora.config import check_token_indices, names_module
from finetune_ref.lora.tuner_layer import check_adapter_name


def tokens_weight(weight: torch.Tensor, indices: list[int], values: list[torch.Tensor]) -> torch.Tensor:
    """E with rows ``indices[j]`` replaced by ``values[j]`` (one (k_j, D) tensor per adapter, applied in turn),
    a new (V, D) tensor (PEFT's ``get_merged_weights``)."""
    for idx, rows in zip(indices, values):
        index = torch.tensor(idx, device=weight.device)  # (k,)
        weight = weight.index_copy(0, index, rows.to(weight))
    return weight


class TrainableTokensLayer(nn.Module):
    """An nn.Embedding (or, tied to one, its output head nn.Linear) with some rows trained, per adapter.

    Args:
        base_layer: nn.Embedding; or the nn.Linear head sharing its weight, with ``tied_to`` the embedding's layer.
        tied_to: the embedding's ``TrainableTokensLayer``; this layer then owns nothing and mirrors its adapters,
            active/merged state and ``disabled`` (held outside the module tree: counted, saved and stepped once).
    """

    def __init__(self, base_layer: nn.Module, tied_to: "TrainableTokensLayer | None" = None):
        super().__init__()
        if tied_to is None and not isinstance(base_layer, nn.Embedding):
            raise TypeError(f"trainable_token_indices needs an nn.Embedding, got {type(base_layer).__name__}")
        if tied_to is not None and (not isinstance(base_layer, nn.Linear) or base_layer.weight is not tied_to.weight):
            raise TypeError("a tied trainable-tokens head must be an nn.Linear sharing the embedding's weight")
        self.base_layer = base_layer
        self.__dict__["tied_to"] = tied_to
        if tied_to is None:
            self.trainable_tokens_delta = nn.ParameterDict()
            self.trainable_tokens_original = nn.Module()  # non-persistent buffers, one per adapter
            self.token_indices: dict[str, list[int]] = {}
            self.active_adapters: list[str] = []
            self.merged_adapters: list[str] = []
            self.disabled = False
            self.shared_weight_with: list[str] = []
            self.requantization_drift = None  # the base is never quantized (lora.adapters.merge_adapters reads it)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def source(self) -> "TrainableTokensLayer":
        return self.tied_to if self.tied_to is not None else self

    @property
    def adapter_names(self) -> list[str]:
        return list(self.source.trainable_tokens_delta.keys())

    @property
    def merged(self) -> bool:
        return bool(self.source.merged_adapters)

    def add_adapter(self, adapter_name: str, token_indices: list[int]) -> None:
        """Rows ``token_indices`` of E become trainable for ``adapter_name``, starting from their values.

        Raises:
            ValueError: a tied head (add to the embedding), a taken name, or indices outside [0, V) or repeated.
        """
        if self.tied_to is not None:
            raise ValueError("add trainable tokens to the embedding; its tied head follows")
        check_adapter_name(adapter_name)
        if adapter_name in self.trainable_tokens_delta:
            raise ValueError(f"adapter {adapter_name!r} already exists on this layer")
        check_token_indices(token_indices, self.base_layer.num_embeddings)
        original = self.weight.detach()[list(token_indices)].clone()  # (k, D)
        self.token_indices[adapter_name] = list(token_indices)
        self.trainable_tokens_delta[adapter_name] = nn.Parameter(original.clone())
        self.trainable_tokens_original.register_buffer(adapter_name, original, persistent=False)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged into the base weight; unmerge before deleting")
        del self.trainable_tokens_delta[adapter_name]
        delattr(self.trainable_tokens_original, adapter_name)
        del self.token_indices[adapter_name]
        if adapter_name in self.active_adapters:
            self.active_adapters.remove(adapter_name)

    def set_adapter(self, adapter_names: str | list[str], strict: bool = True) -> None:
        """Make exactly these adapters active (``LoRALinear.set_adapter``'s rules; a tied head follows)."""
        if self.tied_to is not None:
            return
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.trainable_tokens_delta]
        if strict and unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; this layer has {self.adapter_names}")
        if self.merged and set(names) != set(self.active_adapters):
            raise ValueError(f"cannot switch adapters while {self.merged_adapters} are merged; unmerge first")
        self.active_adapters = list(dict.fromkeys(names))

    def _check_disjoint(self, names: list[str]) -> None:
        seen: set[int] = set()
        for name in dict.fromkeys(self.source.merged_adapters + names):
            overlap = seen & set(self.source.token_indices[name])
            if overlap:
                raise ValueError(f"adapters {names} train the same token rows {sorted(overlap)[:5]}; only adapters "
                                 "with disjoint trainable_token_indices can be active or merged together")
            seen |= set(self.source.token_indices[name])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        src = self.source
        names = [n for n in src.active_adapters if n in src.trainable_tokens_delta and n not in src.merged_adapters]
        if src.disabled or not names:
            return self.base_layer(x)
        self._check_disjoint(names)
        weight = tokens_weight(self.weight, [src.token_indices[n] for n in names],
                               [src.trainable_tokens_delta[n] for n in names])  # (V, D)
        if isinstance(self.base_layer, nn.Embedding):
            return F.embedding(x, weight, padding_idx=self.base_layer.padding_idx)
        return F.linear(x, weight)  # the tied head: logits with the same rows

    # ---- merge / unmerge: write the rows into E, and the originals back ----

    @torch.no_grad()
    def merged_base_weight(self, adapter_names: list[str]) -> torch.Tensor:
        return tokens_weight(self.weight.detach(), [self.token_indices[n] for n in adapter_names],
                             [self.trainable_tokens_delta[n] for n in adapter_names])

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = True,
              allow_shared_weight: bool = True) -> list[str]:
        if self.tied_to is not None:
            return []  # the embedding's merge writes the shared weight
        names = list(self.active_adapters) if adapter_names is None else list(adapter_names)
        names = [n for n in dict.fromkeys(names) if n not in self.merged_adapters]
        if not names:
            return []
        self._check_disjoint(names)
        new_weight = self.merged_base_weight(names)
        if safe_merge and not torch.isfinite(new_weight).all():
            raise ValueError(f"merging adapter(s) {names} gives non-finite weights; the base weight was left unchanged")
        self.weight.copy_(new_weight)
        self.merged_adapters.extend(names)
        return names

    @torch.no_grad()
    def unmerge(self) -> list[str]:
        if self.tied_to is not None or not self.merged_adapters:
            return []
        names = list(reversed(self.merged_adapters))
        for name in names:
            index = torch.tensor(self.token_indices[name], device=self.weight.device)
            self.weight.index_copy_(0, index, getattr(self.trainable_tokens_original, name).to(self.weight))
        self.merged_adapters.clear()
        return names

    def extra_repr(self) -> str:
        if self.tied_to is not None:
            return "tied to the input embedding's trainable tokens"
        return f"token_indices={self.token_indices}, active={self.active_adapters}, merged={self.merged_adapters}"


def token_targets(model: nn.Module, spec: list[int] | dict[str, list[int]] | None,
                  lora_targets: list[str]) -> dict[str, tuple[list[int], list[str]]]:
    """{embedding name: (token ids, names of tied heads still to wrap)} for a config's trainable_token_indices:
    a list means the input embedding (``get_input_embeddings()``, else the module named ``embed_tokens``), a dict
    names modules by PEFT's suffix rule (the name, or "." + it, ends the full name).

    Raises:
        ValueError: no such embedding, a token id outside the vocabulary, an embedding that also carries LoRA, or
            a tied head (a module holding the same weight Parameter) that is not a plain nn.Linear.
    """
    if spec is None:
        return {}
    modules = {n: m for n, m in model.named_modules() if n and ".base_layer" not in n}
    def named(key):  # noqa: E306
        return [n for n in modules if names_module([key], n)]
    if isinstance(spec, dict):
        chosen = {}
        for key, indices in spec.items():
            if not named(key):
                raise ValueError(f"trainable_token_indices names {key!r}, which matches no module of the model")
            chosen.update({n: indices for n in named(key)})
    else:
        get_input = getattr(model, "get_input_embeddings", None)
        embedding = get_input() if callable(get_input) else None
        found = [n for n, m in modules.items() if embedding is not None and m is embedding] or named("embed_tokens")
        if not found:
            raise ValueError("trainable_token_indices: the model has no input embedding (get_input_embeddings() or a "
                             "module named embed_tokens); name it: {module name: token ids}")
        chosen = {found[0]: spec}
    result = {}
    for name, indices in chosen.items():
        module = modules[name]
        base = module.base_layer if isinstance(module, TrainableTokensLayer) else module
        if name in lora_targets or not isinstance(base, nn.Embedding):
            raise ValueError(f"trainable_token_indices: {name} is not a plain nn.Embedding (or it is also in "
                             "target_modules); train its rows or give it LoRA, not both")
        check_token_indices(indices, base.num_embeddings)
        tied = []
        for head_name, head in modules.items():
            if head is module or head is base or getattr(head, "weight", None) is not base.weight:
                continue
            if isinstance(head, TrainableTokensLayer):
                continue  # tied by an earlier adapter
            if type(head) is not nn.Linear:
                raise ValueError(f"trainable_token_indices on {name}: its weight is shared with {head_name} "
                                 f"({type(head).__name__}), which cannot follow the trained rows")
            tied.append(head_name)
        result[name] = (list(indices), tied)
    return result
