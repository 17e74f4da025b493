"""Model shapes for the memory estimator: published Llama shapes (presets), reading a ``config.json``, the linears
of a decoder layer and the parameter count of ``models/llama.py``'s model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune_ref.models.config import LlamaConfig

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Published shapes (the config.json of each checkpoint on the Hugging Face hub; LLaMA-65B: Touvron et al. 2023,
# table 2, FFN size from the released weights). Parameter counts are checked against transformers in the tests.
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
PRESETS: dict[str, dict[str, Any]] = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama-2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama-2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE),
    "llama-3.1-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                          num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                          rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE),
    "llama-65b": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=64, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
                         rope_theta=100000.0, tie_word_embeddings=True),
}
DEFAULT_PRESET = "smollm2-135m"  # the shape of the project's embedded default model


def preset_config(name: str) -> LlamaConfig:
    """The ``LlamaConfig`` of a preset. Raises ValueError listing the presets for an unknown name."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return LlamaConfig(**PRESETS[name])


def load_config(model: str | Path) -> LlamaConfig:
    """A ``LlamaConfig`` from a model directory (its ``config.json``) or a ``config.json`` path.

    Raises:
        FileNotFoundError: no such file; ValueError: not a supported Llama config (the field is named).
    """
    path = Path(model)
    return LlamaConfig.from_json_file(path / "config.json" if path.is_dir() else path)


def shape_from(model: str | Path | None, preset: str | None) -> tuple[LlamaConfig, str]:
    """(config, name) of ``--model`` (a directory or config.json) if given, else of ``--preset`` (default: the
    embedded model's shape). Raises as ``load_config`` / ``preset_config``."""
    if model is not None:
        try:
            return load_config(model), str(model)
        except FileNotFoundError as e:  # said as the flag the path came from
            raise FileNotFoundError(f"--model {model}: {e} (give a model directory or its config.json)") from None
    name = preset or DEFAULT_PRESET
    return preset_config(name), name


def linear_shapes(c: LlamaConfig) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each linear of one decoder layer (models/llama.py Attention, MLP)."""
    h, i, q, kv = c.hidden_size, c.intermediate_size, c.num_attention_heads * c.head_dim, \
        c.num_key_value_heads * c.head_dim
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}


def parameter_count(c: LlamaConfig) -> int:
    """Parameters of ``LlamaForCausalLM(c)`` (a tied lm_head counted once; no biases unless configured)."""
    per_layer = sum(o * i for o, i in linear_shapes(c).values()) + 2 * c.hidden_size
    if c.attention_bias:
        per_layer += sum(linear_shapes(c)[n][0] for n in LINEAR_NAMES[:4])
    if c.mlp_bias:
        per_layer += sum(linear_shapes(c)[n][0] for n in LINEAR_NAMES[4:])
    embeddings = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    return embeddings + c.num_hidden_layers * per_layer + c.hidden_size
