"""What every layer carrying named adapters shares: which adapters exist, which are active, which are merged.

``LoRALinear`` (lora/layer.py) and ``LoRAEmbedding`` (lora/embedding.py) differ in their parameters and math but
keep the same bookkeeping, as PEFT's layers share ``BaseTunerLayer`` (peft/tuners/tuners_utils.py): an adapter
name keys every per-adapter table, ``active_adapters`` lists the names added in forward (in order),
``merged_adapters`` those whose update is inside the base weight. A layer names its tables through two hooks:

    _adapter_keys()    the table whose keys are the adapters this layer carries (e.g. ``lora_A``)
    _adapter_tables()  every per-adapter table (ModuleDicts, ParameterDicts, plain dicts) that delete_adapter
                       clears; a table may lack a name (e.g. DoRA's magnitudes exist for DoRA adapters only)
"""

from __future__ import annotations

import re

from torch import nn

_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_\-]+")


def check_adapter_name(name: object) -> str:
    """Adapter names become ModuleDict keys: letters, digits, '_' and '-' only (no '.')."""
    if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name) or hasattr(nn.ModuleDict, name):
        raise ValueError(f"invalid adapter name {name!r}: use letters, digits, '_' or '-' (e.g. 'default'), "
                         "and not a ModuleDict attribute such as 'keys' or 'items'")
    return name


class AdapterLayerMixin:
    """Adapter bookkeeping for an nn.Module that sets ``active_adapters`` and ``merged_adapters`` (lists of names)
    in its constructor and implements ``_adapter_keys`` and ``_adapter_tables``."""

    active_adapters: list[str]
    merged_adapters: list[str]

    def _adapter_keys(self):
        raise NotImplementedError

    def _adapter_tables(self) -> tuple:
        raise NotImplementedError

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def adapter_names(self) -> list[str]:
        return list(self._adapter_keys().keys())

    def unmerged_names(self) -> list[str]:
        """Active adapters on this layer whose update is not inside the base weight (added in forward)."""
        keys = self._adapter_keys()
        return [n for n in self.active_adapters if n in keys and n not in self.merged_adapters]

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter from every table. Raises ValueError if it does not exist or is merged."""
        self._check_exists([adapter_name])
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged into the base weight; unmerge before deleting")
        for table in self._adapter_tables():
            if adapter_name in table:
                del table[adapter_name]
        if adapter_name in self.active_adapters:
            self.active_adapters.remove(adapter_name)

    def set_adapter(self, adapter_names: str | list[str], strict: bool = True) -> None:
        """Make exactly these adapters active (their updates are summed in forward, in this order).

        Args:
            strict: require every name to exist on this layer. ``lora.adapters.set_adapter`` passes False:
                the model-wide active list is copied to every layer, and a layer skips the names it does not
                carry (an adapter may target only some layers), as PEFT does.

        Raises:
            ValueError: unknown name (strict); or an adapter is merged (switching then would leave the merged
                update in W while another adapter is said to be active: unmerge first).
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            check_adapter_name(name)
        if strict:
            self._check_exists(names)
        if self.merged and set(names) != set(self.active_adapters):
            raise ValueError(f"cannot switch adapters while {self.merged_adapters} are merged into the base "
                             "weight; unmerge first")
        self.active_adapters = list(dict.fromkeys(names))

    def _check_exists(self, names: list[str]) -> None:
        keys = self._adapter_keys()
        unknown = [n for n in names if n not in keys]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; this layer has {self.adapter_names}")
