"""LoRA hyper-parameters, and their translation to and from PEFT's ``adapter_config.json``.

A LoRA adapter on a linear layer W (out_features, in_features) adds a rank-r update (Hu et al. 2021, section 4.1):

    h = x W^T + scaling * (x A^T) B^T,   A: (r, in_features),  B: (out_features, r)
    scaling = lora_alpha / r             (Hu et al. 2021, section 4.1: "scale dW x by alpha / r")
    scaling = lora_alpha / sqrt(r)       (rsLoRA, Kalajdzievski 2023, "A Rank Stabilization Scaling Factor")

``LoraConfig`` holds r, lora_alpha, dropout, which modules to adapt and how to initialise; the field names and
defaults are those of ``peft.LoraConfig`` (peft/tuners/lora/config.py) so that a config written here is read by
PEFT and the other way round. Plain LoRA, DoRA (``use_dora``, Liu et al. 2024; ``lora.dora``)
and modules_to_save (``lora.modules_to_save``) are supported; a PEFT config that asks for anything else (lora_bias,
fan_in_fan_out, layers_to_transform, ...) is refused with a ValueError naming the option
instead of being loaded as something it is not.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

from finetune_ref.lora.init import is_mutating_init

# PEFT's spelling of "every linear layer of the blocks" (peft/utils/constants.py INCLUDE_LINEAR_LAYERS_SHORTHAND).
ALL_LINEAR = "all-linear"

# The init schemes of PEFT's LoraLayer.reset_lora_parameters that touch only A and B:
#   True        A ~ kaiming_uniform(a=sqrt(5)) (nn.Linear's default), B = 0  -> the adapter starts as a no-op
#   "gaussian"  A ~ N(0, (1/r)^2), B = 0
#   False       A and B both kaiming_uniform(a=sqrt(5)): NOT a no-op; for tests that need B != 0
_INIT_SCHEMES = (True, False, "gaussian")
# Inits that also rewrite the base weight (lora/init.py): "pissa", "pissa_niter_K" and "olora". A file saved
# with one of them in its config is refused on load: its adapter is only right on the rewritten base (ours are
# saved converted to a plain LoRA on the original base, with init_lora_weights True).

# PEFT config keys that do not change what a saved LoRA adapter computes (bookkeeping, or options of init
# schemes whose result is already in the saved weights): read and ignored.
_PEFT_IGNORED_KEYS = frozenset({
    "auto_mapping", "peft_version", "revision", "inference_mode", "megatron_core", "qalora_group_size",
    "loftq_config", "eva_config", "corda_config", "lora_ga_config", "layers_pattern", "runtime_config",
})

# PEFT fields we map one-to-one onto LoraConfig fields.
_PEFT_KNOWN_KEYS = frozenset({
    "peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "use_rslora",
    "init_lora_weights", "rank_pattern", "alpha_pattern", "bias", "base_model_name_or_path", "task_type",
    "use_dora", "modules_to_save", "ensure_weight_tying", "trainable_token_indices",
})


@dataclasses.dataclass
class LoraConfig:
    """What to adapt and how. Field names and defaults follow ``peft.LoraConfig`` (peft 0.22).

    Attributes:
        r: rank of the update (int >= 1).
        lora_alpha: numerator of the scaling (> 0); PEFT's default 8 gives scaling 1 at r = 8.
        lora_dropout: probability in [0, 1) of zeroing an element of the adapter's *input* in train mode
            (inverted dropout: survivors are scaled by 1 / (1 - p)). The base path is never dropped out.
        target_modules: which modules get an adapter. A list of names, each matching a module whose full
            name equals it or ends with "." + it (e.g. ["q_proj", "v_proj"]); or a string, matched with
            ``re.fullmatch`` against full module names; or "all-linear" (every linear layer except the output
            head, see ``lora.inject``). A list may also contain "all-linear" next to extra names, e.g.
            ["all-linear", "lm_head"] to adapt the head as well; it is written out as the explicit list.
        exclude_modules: names (same suffix rule as a list target) or a regex string of modules to skip.
        use_rslora: scaling = lora_alpha / sqrt(r) instead of lora_alpha / r.
        use_dora: DoRA (Liu et al. 2024): a trainable magnitude per output feature times the normalised
            direction W + scaling * B A (``lora.dora``); on a 4-bit base this is QDoRA.
        modules_to_save: names of modules trained in full, as copies saved with the adapter
            (``lora.modules_to_save``): the full name or its trailing dotted parts (``names_module``), e.g.
            ["lm_head", "norm"] ("norm" is the final norm only; "input_layernorm" each layer's); None: none.
        ensure_weight_tying: when a targeted embedding is tied to the output head, give the head the same adapter
            (``lora.embedding.TiedLoRAHead``, PEFT's option of that name); without it such a target is refused.
        trainable_token_indices: rows of an embedding trained directly (``lora.trainable_tokens``): a list of
            token ids of the input embedding, or {module name: token ids}; None: none.
        init_lora_weights: True (default), "gaussian" or False, see ``_INIT_SCHEMES`` above; or "pissa",
            "pissa_niter_K", "olora" (lora/init.py: part of W moves into the adapter; not with use_dora).
        rank_pattern / alpha_pattern: {regex: value} overriding r / lora_alpha for the modules whose full name
            matches ``(.*\\.)?(regex)$``; the first matching key (in dict order) wins, as in PEFT's
            ``get_pattern_key`` (peft/utils/other.py).
        bias: only "none" is supported (no bias is trained).
        base_model_name_or_path: informational; written to adapter_config.json.
        task_type: PEFT task type written to adapter_config.json ("CAUSAL_LM" makes ``PeftModel.from_pretrained``
            return a PeftModelForCausalLM); informational here.

    Raises:
        ValueError / TypeError on construction when a field is out of range or of the wrong type.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: list[str] | None = None
    ensure_weight_tying: bool = False
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    init_lora_weights: bool | str = True
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    bias: str = "none"
    base_model_name_or_path: str | None = None
    task_type: str | None = "CAUSAL_LM"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field; raise ValueError/TypeError naming the field and the fix."""
        check_rank(self.r, "r")
        check_alpha(self.lora_alpha, "lora_alpha")
        if not isinstance(self.lora_dropout, numbers.Real) or isinstance(self.lora_dropout, bool):
            raise TypeError(f"lora_dropout must be a float in [0, 1), got {self.lora_dropout!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.target_modules is None:
            raise ValueError("target_modules is required: a list of module-name suffixes such as "
                             "['q_proj', 'v_proj'], a regex string, or 'all-linear'")
        for field in ("target_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, field)
            if value is None or isinstance(value, str):
                continue
            if isinstance(value, (set, tuple)):
                value = sorted(value) if isinstance(value, set) else list(value)
                setattr(self, field, value)
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise TypeError(f"{field} must be a list of non-empty strings or a regex string, got {value!r}")
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("target_modules is an empty list: name at least one module (e.g. ['q_proj'])")
        for field in ("use_rslora", "use_dora", "ensure_weight_tying"):
            if not isinstance(getattr(self, field), bool):
                raise TypeError(f"{field} must be True or False, got {getattr(self, field)!r}")
        if not is_mutating_init(self.init_lora_weights) and (self.init_lora_weights not in _INIT_SCHEMES or (
                isinstance(self.init_lora_weights, int) and not isinstance(self.init_lora_weights, bool))):
            raise ValueError(f"init_lora_weights must be one of True, False, 'gaussian', 'pissa', "
                             f"'pissa_niter_K', 'olora', got {self.init_lora_weights!r}")
        if self.use_dora and is_mutating_init(self.init_lora_weights):
            raise ValueError(f"use_dora with init_lora_weights={self.init_lora_weights!r} is not supported: the "
                             "conversion to a plain LoRA adapter on saving has no DoRA form")
        for field, check in (("rank_pattern", check_rank), ("alpha_pattern", check_alpha)):
            pattern = getattr(self, field)
            if not isinstance(pattern, dict):
                raise TypeError(f"{field} must be a dict {{regex: value}}, got {type(pattern).__name__}")
            for key, value in pattern.items():
                if not isinstance(key, str) or not key:
                    raise TypeError(f"{field} keys must be non-empty regex strings, got {key!r}")
                check(value, f"{field}[{key!r}]")
        if self.bias != "none":
            raise ValueError(f"bias={self.bias!r} is not supported: only 'none' (no bias is trained)")
        tokens = self.trainable_token_indices
        if tokens is not None:
            if isinstance(tokens, dict):
                if not tokens or not all(isinstance(k, str) and k for k in tokens):
                    raise ValueError(f"trainable_token_indices as a dict maps module names to token ids, got {tokens!r}")
                self.trainable_token_indices = {k: check_token_indices(v) for k, v in tokens.items()}
            else:
                self.trainable_token_indices = check_token_indices(tokens)

    # ---- PEFT adapter_config.json ----

    def to_peft_dict(self, target_modules: list[str] | str | None = None) -> dict[str, Any]:
        """The JSON object PEFT's ``LoraConfig.from_pretrained`` reads.

        Args:
            target_modules: what to write as target_modules; pass the explicit module list when this config
                used "all-linear" (PEFT itself writes the expanded list). Default: ``self.target_modules``.
        """
        targets = self.target_modules if target_modules is None else target_modules
        if uses_all_linear(targets):
            raise ValueError("'all-linear' must be expanded to the list of adapted modules before saving; "
                             "pass target_modules=<the module names> (lora.peft_format.save_adapter does this)")
        return {
            "peft_type": "LORA",
            "task_type": self.task_type,
            "base_model_name_or_path": self.base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": float(self.lora_dropout),
            "target_modules": targets,
            "exclude_modules": self.exclude_modules,
            "use_rslora": self.use_rslora,
            "init_lora_weights": self.init_lora_weights,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "bias": self.bias,
            "fan_in_fan_out": False,
            "use_dora": self.use_dora,
            "lora_bias": False,
            "modules_to_save": self.modules_to_save,
            "ensure_weight_tying": self.ensure_weight_tying,
            "trainable_token_indices": self.trainable_token_indices,
            "layers_to_transform": None,
            "layers_pattern": None,
            "inference_mode": True,
        }

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any]) -> "LoraConfig":
        """Read a PEFT ``adapter_config.json`` object.

        Raises:
            ValueError: not a LoRA config, or it uses a PEFT feature this implementation does not have (the
                key is named), so that the adapter is never loaded as something it is not.
        """
        if not isinstance(d, dict):
            raise TypeError(f"adapter config must be a JSON object, got {type(d).__name__}")
        if d.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"peft_type is {d.get('peft_type')!r}; only 'LORA' adapters can be loaded")
        unsupported = []
        for key, value in d.items():
            if key in _PEFT_KNOWN_KEYS or key in _PEFT_IGNORED_KEYS:
                continue
            # Any other PEFT option is harmless only while it is off (None / False / empty / PEFT default).
            if value in (None, False, "none", "", {}, []):
                continue
            unsupported.append(f"{key}={value!r}")
        if d.get("bias", "none") != "none":
            unsupported.append(f"bias={d['bias']!r}")
        if unsupported:
            raise ValueError("this adapter uses PEFT features that lora/ does not implement: "
                             + ", ".join(sorted(unsupported)) + ". Only plain LoRA and DoRA (bias='none') are supported")
        init = d.get("init_lora_weights", True)
        if init not in _INIT_SCHEMES:
            # Other inits (pissa, olora, loftq, ...) change the base weights too; the adapter alone is not enough.
            raise ValueError(f"init_lora_weights={init!r}: this adapter is only right on the base weights its "
                             "initialisation rewrote, which are not in the file. Save it from PEFT with "
                             "path_initial_model_for_weight_conversion (a plain LoRA on the original base), or "
                             "load it on the rewritten base with PEFT; only True, False and 'gaussian' adapters "
                             "load here")
        return cls(
            r=d.get("r", 8),
            lora_alpha=d.get("lora_alpha", 8),
            lora_dropout=d.get("lora_dropout", 0.0) or 0.0,
            target_modules=d.get("target_modules"),
            exclude_modules=d.get("exclude_modules"),
            use_rslora=bool(d.get("use_rslora", False)),
            use_dora=bool(d.get("use_dora", False)),
            modules_to_save=d.get("modules_to_save"),
            ensure_weight_tying=bool(d.get("ensure_weight_tying", False)),
            trainable_token_indices=d.get("trainable_token_indices"),
            init_lora_weights=init,
            rank_pattern=dict(d.get("rank_pattern") or {}),
            alpha_pattern=dict(d.get("alpha_pattern") or {}),
            bias="none",
            base_model_name_or_path=d.get("base_model_name_or_path"),
            task_type=d.get("task_type"),
        )


def check_token_indices(indices: object, num_embeddings: int | None = None) -> list[int]:
    """A non-empty list of distinct ints in [0, num_embeddings); raise ValueError naming the problem."""
    if not isinstance(indices, (list, tuple)) or not indices or \
            not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise ValueError(f"trainable_token_indices must be a non-empty list of token ids, got {indices!r}")
    if len(set(indices)) != len(indices):
        raise ValueError(f"trainable_token_indices {list(indices)} repeats a token id")
    bad = [i for i in indices if i < 0 or (num_embeddings is not None and i >= num_embeddings)]
    if bad:
        raise ValueError(f"trainable_token_indices {bad[:5]} are outside the vocabulary [0, {num_embeddings})")
    return list(indices)


def check_rank(r: Any, name: str = "r") -> None:
    """Raise unless r is an int >= 1 (bools rejected)."""
    if not isinstance(r, int) or isinstance(r, bool):
        raise TypeError(f"{name} must be a positive int, got {r!r}")
    if r < 1:
        raise ValueError(f"{name} must be >= 1, got {r}")


def check_alpha(alpha: Any, name: str = "lora_alpha") -> None:
    """Raise unless alpha is a finite real number > 0 (bools rejected)."""
    if not isinstance(alpha, numbers.Real) or isinstance(alpha, bool):
        raise TypeError(f"{name} must be a positive number, got {alpha!r}")
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {alpha}")


def names_module(keys: list[str] | tuple[str, ...], name: str) -> bool:
    """PEFT's rule for a list of module names (target_modules, modules_to_save, trainable_token_indices): an entry
    names the module whose full name equals it or ends with "." + it, a whole name component; "norm" names
    ``model.norm`` but not ``model.layers.0.input_layernorm`` (peft/tuners/tuners_utils.py
    check_target_module_exists; peft/utils/other.py _is_valid_match, which modules_to_save uses from peft 0.22 on:
    before, a plain string suffix chose ``input_layernorm`` too)."""
    return any(name == key or name.endswith("." + key) for key in keys)


def uses_all_linear(target_modules: list[str] | str | None) -> bool:
    """True when ``target_modules`` is "all-linear" or a list containing it (in any letter case, as PEFT)."""
    if isinstance(target_modules, str):
        return target_modules.lower() == ALL_LINEAR
    return isinstance(target_modules, list) and any(t.lower() == ALL_LINEAR for t in target_modules)
