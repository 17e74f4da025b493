"""Rebuilding the Hugging Face tokenizer files of a GGUF from its ``tokenizer.ggml.*`` metadata.

``build_tokenizer`` gives the byte-level BPE as a ``tokenizers.Tokenizer`` (saved as ``tokenizer.json``);
``build_tokenizer_config`` gives ``tokenizer_config.json`` (special tokens, ``chat_template``,
``model_max_length``).
"""

from __future__ import annotations

from typing import Any

from finetune_ref.models.gguf_reader import read_field

# llama.cpp token types (llama.cpp include/llama.h, enum llama_token_type).
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# Pre-tokenizers we can rebuild exactly (llama.cpp src/llama-vocab.cpp, regex per LLAMA_VOCAB_PRE_TYPE):
# "gpt-2" is the GPT-2 regex alone; "smollm" first splits every digit on its own, then the GPT-2 regex.
_SUPPORTED_PRE_TOKENIZERS = ("gpt-2", "smollm")


def build_tokenizer(reader):
    """Rebuild a ``tokenizers.Tokenizer`` (byte-level BPE) from ``tokenizer.ggml.*`` metadata.

    Control tokens (type 3) become special added tokens, user-defined ones (type 4) plain added tokens.
    Raises:
        ValueError: the tokenizer is not byte-level BPE (``tokenizer.ggml.model`` != "gpt2"), its
            pre-tokenizer is not one we can reproduce exactly, or tokens/merges are malformed.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = read_field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') is supported")
    pre = read_field(reader, "tokenizer.ggml.pre")
    if pre not in _SUPPORTED_PRE_TOKENIZERS:
        raise ValueError(f"tokenizer.ggml.pre is {pre!r}; supported pre-tokenizers: {_SUPPORTED_PRE_TOKENIZERS}")
    tokens = read_field(reader, "tokenizer.ggml.tokens", required=True)
    merges_raw = read_field(reader, "tokenizer.ggml.merges", required=True)
    token_types = read_field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
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
    bos_id = read_field(reader, "tokenizer.ggml.bos_token_id")
    eos_id = read_field(reader, "tokenizer.ggml.eos_token_id")
    for key, i in (("bos_token_id", bos_id), ("eos_token_id", eos_id)):
        if i is not None and not 0 <= i < len(tokens):
            raise ValueError(f"tokenizer.ggml.{key}={i} is outside the vocabulary (size {len(tokens)})")
    add_bos = bool(read_field(reader, "tokenizer.ggml.add_bos_token", False)) and bos_id is not None
    add_eos = bool(read_field(reader, "tokenizer.ggml.add_eos_token", False)) and eos_id is not None
    if add_bos or add_eos:
        pieces = ([tokens[bos_id]] if add_bos else []), ([tokens[eos_id]] if add_eos else [])
        specials = [(t, vocab[t]) for t in pieces[0] + pieces[1]]
        post.append(processors.TemplateProcessing(
            single=" ".join(pieces[0] + ["$A"] + pieces[1]),
            pair=" ".join(pieces[0] + ["$A"] + pieces[1] + pieces[0] + ["$B"] + pieces[1]),
            special_tokens=specials))
    tok.post_processor = processors.Sequence(post)
    return tok


def build_tokenizer_config(reader, model_max_length: int) -> dict[str, Any]:
    """``tokenizer_config.json``: special-token strings, ``chat_template``, ``model_max_length`` (ValueError for a
    special-token id outside the vocabulary)."""
    tokens = read_field(reader, "tokenizer.ggml.tokens", required=True)

    def name(key):
        i = read_field(reader, key)
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
        "add_bos_token": bool(read_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(read_field(reader, "tokenizer.ggml.add_eos_token", False)),
    }
    template = read_field(reader, "tokenizer.chat_template")
    if template is not None:
        cfg["chat_template"] = template
    return {k: v for k, v in cfg.items() if v is not None}
