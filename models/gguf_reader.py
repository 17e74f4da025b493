"""Reading a llama.cpp GGUF file of architecture ``llama``: metadata -> HF config, tensors -> HF state dict.

``open_gguf`` checks and opens the file with ``gguf.GGUFReader``; ``read_llama_config`` turns the ``llama.*``
metadata keys into a ``LlamaConfig`` dict; ``read_llama_state_dict`` dequantizes every tensor with
``gguf.quants.dequantize``, renames it to its HF key and puts q_proj/k_proj rows back in HF's order.

Layout facts (matched against llama.cpp ``convert_hf_to_gguf.py``, ``LlamaModel.permute``, and the
GGUF spec in ``ggml/docs/gguf.md``):
* GGUF stores a tensor's dims fastest-first; ``GGUFReader`` already reverses them, so a dequantized
  linear weight comes out as (out_features, in_features), exactly like ``nn.Linear.weight``.
* llama.cpp's RoPE rotates interleaved pairs (x[2j], x[2j+1]) while HF's Llama rotates halves
  (x[j], x[j + head_dim/2]). The HF->GGUF converter therefore reorders q and k rows within each
  head: HF row ``i*(head_dim/2) + j`` becomes GGUF row ``2*j + i`` (i in {0, 1}). We undo that.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np
import torch

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


def read_field(reader, key: str, default: Any = None, *, required: bool = False) -> Any:
    """The value of metadata key ``key`` (``default`` when absent; ValueError naming it when ``required``)."""
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
    arch = read_field(reader, "general.architecture", required=True)
    if arch != "llama":
        raise ValueError(f"GGUF architecture is {arch!r}; only 'llama' is supported by this converter")
    if read_field(reader, "llama.expert_count", 0):
        raise ValueError("this GGUF is a mixture-of-experts llama (llama.expert_count > 0); not supported")

    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ValueError("GGUF tensor 'token_embd.weight' is missing")
    if "rope_freqs.weight" in tensors:
        raise ValueError("GGUF has 'rope_freqs.weight' (llama3-style RoPE scaling); converting it to HF "
                         "rope_scaling is not supported")
    vocab_size, hidden_size = (int(d) for d in tensors["token_embd.weight"].shape[::-1])  # GGUF dims are reversed

    n_layer = int(read_field(reader, "llama.block_count", required=True))
    n_embd = int(read_field(reader, "llama.embedding_length", required=True))
    n_head = int(read_field(reader, "llama.attention.head_count", required=True))
    n_head_kv = int(read_field(reader, "llama.attention.head_count_kv", n_head))
    if n_embd != hidden_size:
        raise ValueError(f"llama.embedding_length={n_embd} disagrees with token_embd.weight width {hidden_size}")
    if n_head <= 0 or n_head_kv <= 0 or n_head % n_head_kv != 0:
        raise ValueError(f"head counts are inconsistent: head_count={n_head}, head_count_kv={n_head_kv}")
    head_dim = int(read_field(reader, "llama.attention.key_length", n_embd // n_head))
    n_rot = int(read_field(reader, "llama.rope.dimension_count", head_dim))
    if n_rot != head_dim:
        raise ValueError(f"partial RoPE (rope.dimension_count={n_rot} != head_dim={head_dim}) is not supported")
    if "blk.0.ffn_gate.weight" in tensors:
        ffn_from_shape = int(tensors["blk.0.ffn_gate.weight"].shape[1])  # GGUF dims (in, out)
    else:
        ffn_from_shape = None
    n_ff = int(read_field(reader, "llama.feed_forward_length", ffn_from_shape or 0))
    if n_ff <= 0:
        raise ValueError("llama.feed_forward_length is missing and tensor 'blk.0.ffn_gate.weight' is missing too")

    rope_scaling = None
    scaling_type = read_field(reader, "llama.rope.scaling.type")
    if scaling_type not in (None, "none"):
        factor = read_field(reader, "llama.rope.scaling.factor")
        if scaling_type != "linear" or factor is None:
            raise ValueError(f"RoPE scaling {scaling_type!r} (factor {factor}) is not supported; only 'linear'")
        rope_scaling = {"rope_type": "linear", "factor": _f32(factor)}

    bos = read_field(reader, "tokenizer.ggml.bos_token_id")
    eos = read_field(reader, "tokenizer.ggml.eos_token_id")
    pad = read_field(reader, "tokenizer.ggml.padding_token_id")
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
        "max_position_embeddings": int(read_field(reader, "llama.context_length", 2048)),
        "rms_norm_eps": _f32(read_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _f32(read_field(reader, "llama.rope.freq_base", 10000.0)),
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
