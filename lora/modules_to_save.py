"""Fully trained copies of whole modules beside LoRA adapters: PEFT's ``modules_to_save``.

Some modules are better trained in full than through a low-rank update, e.g. the output head or a norm when
the task changes the output distribution, or new token embeddings. PEFT's ``ModulesToSaveWrapper``
(peft/utils/other.py) keeps the frozen ``original_module`` and, per adapter, a trainable deep copy in
``modules_to_save.<adapter>``; the wrapper computes with the copy of the one active adapter that has a copy of
this module, or with the original when none has (or adapters are disabled). Several active adapters may each
bring copies of other modules, but two active copies of one module are refused (PEFT's
``AuxiliaryTrainingWrapper.check_set_adapter``: "Only one adapter can be set at a time"). In the adapter file the copy's tensors are
saved under the module's own name: ``base_model.model.<path>.<param>`` (e.g. ``base_model.model.lm_head.weight``).

Selection is PEFT's ``_set_trainable`` rule (peft/utils/other.py, from peft 0.22 on): an entry chooses the
modules whose full name equals it or ends with "." + it (``lora.config.names_module``), so "norm" chooses the final
``model.norm`` only; list ``input_layernorm`` / ``post_attention_layernorm`` for the layers' norms. PEFT before 0.22
matched a plain string suffix ("norm" also chose "input_layernorm"); a file saved that way names those modules in
its tensors, and loading it says which entries to add (``check_legacy_suffix_choice``). A module whose weight is shared with another (tied input
embedding and lm_head) is refused: training one copy would silently untie them (PEFT only warns; with
``ensure_weight_tying`` it ties the copies, which is not implemented here). LoRA layers and modules inside them
cannot be chosen.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from finetune_ref.lora.config import names_module


class ModulesToSaveWrapper(nn.Module):
    """``original_module`` (frozen) plus trainable copies per adapter in ``modules_to_save`` (see module docstring).

    Attributes:
        active_adapters: the model-wide active list (set by ``lora.inject.set_active_adapters``).
        disabled: when True, forward is the original module's.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False

    def add_copy(self, adapter_name: str) -> None:
        """A trainable deep copy of the original for ``adapter_name``."""
        if adapter_name in self.modules_to_save:
            raise ValueError(f"adapter {adapter_name!r} already has a copy of this module")
        module = copy.deepcopy(self.original_module)
        module.requires_grad_(True)
        self.modules_to_save[adapter_name] = module

    def copy_of(self, adapter_names: list[str]) -> nn.Module:
        """The copy of the one adapter among ``adapter_names`` that has one here, else the original (PEFT's
        ``check_set_adapter``; ``check_one_copy_each`` refuses two of them with copies of one module)."""
        having = [a for a in adapter_names if a in self.modules_to_save]
        return self.modules_to_save[having[0]] if having else self.original_module

    def active_module(self) -> nn.Module:
        """The module forward uses: the active adapters' copy (``copy_of``), or the original when disabled."""
        return self.original_module if self.disabled else self.copy_of(self.active_adapters)

    def forward(self, *args, **kwargs):
        return self.active_module()(*args, **kwargs)

    @property
    def weight(self) -> torch.Tensor:
        """The active module's weight (models read e.g. ``lm_head.weight`` or ``embed_tokens.weight``)."""
        return self.active_module().weight


def wrappers(model: nn.Module) -> list[tuple[str, ModulesToSaveWrapper]]:
    """(full name, wrapper) for every ModulesToSaveWrapper, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]


def find_modules_to_save(model: nn.Module, names: list[str], candidates: list[tuple[str, nn.Module]]) -> list[str]:
    """Full names chosen by ``names`` (``names_module``) among ``candidates`` ((name, module) outside LoRA
    layers); a chosen module inside another chosen one is left to the outer copy.

    Raises:
        ValueError: nothing matches, a match is a LoRA layer, or its parameters are shared with another module.
    """
    from finetune_ref.lora.layer import LoRALinear

    chosen = [(n, m) for n, m in candidates if names_module(names, n) and
              not any(n.startswith(other + ".") for other, _ in candidates if other != n and
                      names_module(names, other))]
    if not chosen:
        raise ValueError(f"modules_to_save {','.join(names)} names no module of the model: an entry is a module's "
                         "full name or its trailing dotted parts (e.g. lm_head, norm, input_layernorm)")
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for p in module._parameters.values():
            if p is not None:
                owners.setdefault(id(p), []).append(name)
    for name, module in chosen:
        if isinstance(module, LoRALinear):
            raise ValueError(f"{name} carries LoRA adapters; it cannot also be in modules_to_save")
        for p in module.parameters():
            others = [o for o in owners.get(id(p), []) if o != name and not o.startswith(name + ".")]
            if others:
                raise ValueError(f"modules_to_save: {name} shares its weights with {others} (tied embeddings); "
                                 "training a copy of one would silently untie them. Leave it out, adapt the tied pair "
                                 "with LoRA instead (embed_tokens in target_modules, with ensure_weight_tying), or "
                                 "untie the model first (load it with tie_word_embeddings=False)")
    return [n for n, _ in chosen]


def modules_to_save_of(model: nn.Module, names: list[str] | None, candidates: list[tuple[str, nn.Module]],
                       targets: list[str]) -> list[str]:
    """The modules ``names`` (a config's modules_to_save) choose among ``candidates``, none of them in ``targets``
    (the modules the same config adapts).

    Raises:
        ValueError: an entry names nothing, a tied or adapted module, or a module also in ``targets``.
    """
    if not names:
        return []
    saved = find_modules_to_save(model, names, candidates)
    both = sorted(set(saved) & set(targets))
    if both:
        raise ValueError(f"{len(both)} module(s) are in both target_modules and modules_to_save (first: {both[0]}); "
                         "a module is either adapted or trained in full: leave it out of one of them")
    return saved


def check_disjoint_copies(model: nn.Module, adapters: dict[str, list[str] | None]) -> None:
    """Before adapters are loaded to compute together (``adapters``: each one's modules_to_save entries, keyed by
    how the user named it, e.g. its directory): refuse two that hold copies of one module (``check_one_copy_each``).
    """
    from finetune_ref.lora.inject import candidate_modules

    candidates = candidate_modules(model)
    owners: dict[str, list[str]] = {}
    for adapter, names in adapters.items():
        for module in find_modules_to_save(model, names, candidates) if names else []:
            owners.setdefault(module, []).append(adapter)
    _refuse_shared_copies(owners)


def check_one_copy_each(model: nn.Module, active: list[str]) -> None:
    """Refuse activating ``active`` together when two of them hold trained copies of one module."""
    _refuse_shared_copies({module: [n for n in active if n in wrapper.modules_to_save]
                           for module, wrapper in wrappers(model)})


def _refuse_shared_copies(owners: dict[str, list[str]]) -> None:
    """``owners``: module -> the adapters with a copy of it. Only one copy can compute (PEFT refuses two as well:
    AuxiliaryTrainingWrapper.check_set_adapter)."""
    for module, having in owners.items():
        if len(having) > 1:
            raise ValueError(f"adapters {having} each hold a trained copy of {module} (modules_to_save), and only "
                             "one copy can compute: use them one at a time, or merge one into the base first")


def check_legacy_suffix_choice(names: list[str], candidates: list[tuple[str, nn.Module]], keys: list[str],
                               prefix: str) -> None:
    """Refuse an adapter file whose copies PEFT before 0.22 chose by a plain string suffix ("norm" ->
    ``model.layers.0.input_layernorm``), saying which entries to add; ``keys``: the file's tensor names
    (``prefix`` + module name + "." + parameter).

    Raises:
        ValueError: the file holds a copy of a module that an entry ends with but no longer names.
    """
    copies = [k for k in keys if "lora_" not in k]  # a copy's tensors: the module's own names (no adapter keys)

    def saved(name: str) -> bool:
        return any(k.startswith(f"{prefix}{name}.") for k in copies)

    hit = [n for n, _ in candidates if any(n.endswith(k) for k in names) and not names_module(names, n) and saved(n)]
    if not hit:
        return
    add = []
    for last in dict.fromkeys(n.rsplit(".", 1)[-1] for n in hit):  # the modules' own names, e.g. input_layernorm
        named = [n for n, _ in candidates if names_module([last], n)]
        # the short name if it picks only modules the file holds, else the full names (e.g. only some layers')
        add += [last] if all(saved(n) for n in named) else [n for n in hit if n.rsplit(".", 1)[-1] == last]
    raise ValueError(f"the adapter's modules_to_save {names} chose {len(hit)} module(s) by a plain name suffix, as "
                     f"PEFT before 0.22 did (first: {hit[0]}); an entry now names whole name components only. Add "
                     f"{', '.join(repr(a) for a in add)} to modules_to_save in its adapter_config.json to load it")
