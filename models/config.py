"""The Llama configuration, read from a Hugging Face ``config.json``.

One dataclass holds every shape and constant the model needs. ``LlamaConfig.from_dict`` accepts both the
transformers 4.x spelling (``rope_theta`` + ``rope_scaling``) and the 5.x spelling (``rope_parameters``, which
carries ``rope_theta`` inside it), and refuses settings this minimal model does not implement, naming the field,
instead of silently computing something else.

Reference: transformers ``models/llama/configuration_llama.py`` and ``modeling_rope_utils.py``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

# rope_type values we implement: "default" (plain RoPE, Su et al. 2021) and "llama3" (the frequency-dependent
# scaling of Llama 3.1, transformers modeling_rope_utils._compute_llama3_parameters).
SUPPORTED_ROPE_TYPES = ("default", "llama3")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")

# config.json fields of other architectures that would change what the model computes; this Llama has none of
# them, so a config that turns one on is refused (naming the field) instead of being run as plain Llama.
_ONE = (None, 0, 1, 1.0, False)
UNSUPPORTED_FIELDS = {
    "num_experts": ("mixture-of-experts layers", lambda v: v not in _ONE),           # Qwen-MoE, OLMoE
    "num_local_experts": ("mixture-of-experts layers", lambda v: v not in _ONE),     # Mixtral
    "n_routed_experts": ("mixture-of-experts layers", lambda v: v not in _ONE),      # DeepSeek
    "partial_rotary_factor": ("RoPE on part of each head", lambda v: v not in _ONE),  # Phi, GPT-NeoX
    "attn_logit_softcapping": ("attention logit soft-capping", lambda v: v is not None),     # Gemma 2
    "final_logit_softcapping": ("final logit soft-capping", lambda v: v is not None),
    "use_qk_norm": ("normalised queries and keys", lambda v: bool(v)),
    "layer_types": ("per-layer attention types", lambda v: any(t != "full_attention" for t in v or [])),
}
# Fields whose transformers LlamaConfig default is used when config.json lacks them (``filled_defaults``):
# the ones that change the computation and are not derived from others (head_dim, num_key_value_heads are).
DEFAULTED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "max_position_embeddings", "rms_norm_eps", "rope_theta", "tie_word_embeddings",
                    "attention_bias", "mlp_bias")


def read_config_json(path: str | Path) -> dict[str, Any]:
    """The raw JSON object of a ``config.json``. Raises FileNotFoundError / ValueError naming the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no config.json at {path}")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return d


@dataclasses.dataclass
class LlamaConfig:
    """Shapes and constants of a Llama-style decoder.

    Defaults are those of transformers' ``LlamaConfig`` where one exists. ``head_dim`` defaults to
    ``hidden_size // num_attention_heads``; ``num_key_value_heads`` defaults to ``num_attention_heads`` (no GQA).
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None means plain RoPE; otherwise a dict with "rope_type" ("default" or "llama3") and its parameters.
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    initializer_range: float = 0.02  # std of the normal init of a freshly built (random) model
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    torch_dtype: str | None = None  # the dtype the checkpoint was saved in; informational

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field when a value is impossible or unsupported."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"config field {name!r} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads}) for grouped-query attention")
        if self.head_dim % 2 != 0:
            raise ValueError(f"config field 'head_dim' must be even for rotary embeddings, got {self.head_dim}")
        if not (self.rms_norm_eps > 0 and math.isfinite(self.rms_norm_eps)):
            raise ValueError(f"config field 'rms_norm_eps' must be a positive number, got {self.rms_norm_eps!r}")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ValueError(f"config field 'rope_theta' must be a positive number, got {self.rope_theta!r}")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise ValueError(
                    f"config field 'rope_scaling' has rope_type {rope_type!r}; this model implements "
                    f"{SUPPORTED_ROPE_TYPES} only")
            if rope_type == "llama3":
                missing = [k for k in LLAMA3_ROPE_KEYS if k not in self.rope_scaling]
                if missing:
                    raise ValueError(f"config field 'rope_scaling' (llama3) lacks {missing}")

    @property
    def rope_type(self) -> str:
        if self.rope_scaling is None:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        """Build from a Hugging Face config dict (4.x or 5.x spelling).

        Raises:
            ValueError: the model type, activation or a setting is not supported (the message names the field).
        """
        d = dict(d)
        model_type = d.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"config field 'model_type' is {model_type!r}; only 'llama' is supported")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config field 'hidden_act' is {d['hidden_act']!r}; Llama's SwiGLU needs 'silu'")
        if d.get("pretraining_tp", 1) != 1:
            raise ValueError("config field 'pretraining_tp' must be 1 (tensor-parallel slicing is not implemented)")
        if d.get("attention_dropout", 0.0) not in (0, 0.0):
            raise ValueError("config field 'attention_dropout' must be 0.0 (attention dropout is not implemented)")
        if d.get("use_sliding_window") and d.get("sliding_window") is not None:
            raise ValueError(f"config field 'sliding_window' is {d['sliding_window']} with use_sliding_window true; "
                             "sliding-window attention is not implemented (this model attends to every position)")
        for name, (what, unsupported) in UNSUPPORTED_FIELDS.items():
            if name in d and unsupported(d[name]):
                raise ValueError(f"config field {name!r} is {d[name]!r}: {what}, which this Llama does not implement")
        _check_types(d)
        # transformers 5.x folds rope_theta and the scaling into one dict, "rope_parameters".
        rope_parameters = d.pop("rope_parameters", None)
        if rope_parameters is not None:
            rope_parameters = dict(rope_parameters)
            if "rope_theta" in rope_parameters:
                d["rope_theta"] = rope_parameters.pop("rope_theta")
            rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
            d["rope_scaling"] = None if rope_type == "default" else rope_parameters
        elif d.get("rope_scaling") is not None:
            rope_type = d["rope_scaling"].get("rope_type", d["rope_scaling"].get("type", "default"))
            if rope_type == "default":
                d["rope_scaling"] = None
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})

    @staticmethod
    def filled_defaults(d: dict[str, Any]) -> dict[str, Any]:
        """The ``DEFAULTED_FIELDS`` a config.json dict lacks, with the default ``from_dict`` gives them (those of
        transformers' LlamaConfig)."""
        rope = d.get("rope_parameters") or {}
        defaults = {f.name: f.default for f in dataclasses.fields(LlamaConfig)}
        return {k: defaults[k] for k in DEFAULTED_FIELDS if k not in d and not (k == "rope_theta" and k in rope)}

    @classmethod
    def from_json_file(cls, path: str | Path) -> "LlamaConfig":
        """Read a ``config.json``. Raises FileNotFoundError / ValueError with the path in the message."""
        return cls.from_dict(read_config_json(path))

    def to_dict(self) -> dict[str, Any]:
        """The Hugging Face spelling: 4.x keys (``rope_theta``, ``rope_scaling``) and 5.x ``rope_parameters``.

        Both spellings carry ``rope_theta`` explicitly: transformers 5.24 otherwise fills a missing one from a
        previously loaded config in the same process (seen in our parity tests).
        """
        d = dataclasses.asdict(self)
        rope = {"rope_type": self.rope_type, **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
        d["rope_parameters"] = rope
        if self.rope_scaling is not None:
            d["rope_scaling"] = rope
        d["model_type"] = "llama"
        d["architectures"] = ["LlamaForCausalLM"]
        d["hidden_act"] = "silu"
        return d


def _check_types(d: dict[str, Any]) -> None:
    """Numbers must be JSON numbers and flags JSON booleans: ``"hidden_size": "576"`` is refused by name, not
    compared as a string later."""
    for f in dataclasses.fields(LlamaConfig):
        if f.name not in d or d[f.name] is None:
            continue
        value, kind = d[f.name], str(f.type)
        if kind.startswith("bool"):
            ok, expected = isinstance(value, bool), "true or false"
        elif kind.startswith("int") and "list" not in kind:
            ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif kind.startswith("float"):
            ok, expected = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        elif kind.startswith("dict"):
            ok, expected = isinstance(value, dict), "an object or null"
        else:
            continue
        if not ok:
            quoted = " (write it without quotes)" if isinstance(value, str) else ""
            raise ValueError(f"config field {f.name!r} must be {expected}, got {value!r}{quoted}")


def describe_filled_defaults(model_dir: str | Path) -> str | None:
    """One line naming the fields ``model_dir``'s config.json lacks and the defaults used for them, or None."""
    path = Path(model_dir) / "config.json"
    filled = LlamaConfig.filled_defaults(read_config_json(path)) if path.is_file() else {}
    if not filled:
        return None
    return (f"{path} lacks {', '.join(filled)}: using transformers' LlamaConfig defaults "
            + ", ".join(f"{k}={v}" for k, v in filled.items()))


def check_context(model_dir: "str | Path | LlamaConfig", tokens: int, what: str, fix=None) -> None:
    """Refuse ``tokens`` positions beyond the context (``max_position_embeddings``) of ``model_dir``'s config.json
    (or of a ``LlamaConfig`` given instead): RoPE would still run, but on positions the model never saw in
    training, silently degrading every result (transformers warns; here it is an error, since a reference run
    should not do it by accident).

    Raises:
        ValueError: ``what`` (e.g. "seq_len=4096"), the context, and ``fix(context)`` (default: "use at most N").
    """
    given = isinstance(model_dir, LlamaConfig)
    path = None if given else Path(model_dir) / "config.json"
    context = (model_dir if given else LlamaConfig.from_json_file(path)).max_position_embeddings
    if tokens > context:
        raise ValueError(f"{what} is beyond the model's context of {context} tokens"
                         + ("" if given else f" (max_position_embeddings in {path})") + "; "
                         + (fix(context) if fix else f"use at most {context}"))
