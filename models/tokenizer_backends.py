"""The two tokenizer backends behind ``models.tokenizer.Tokenizer``: the same five operations over each library.

* ``tokenizers`` for a ``tokenizer.json`` (byte-level BPE such as SmolLM2/GPT-2, Llama-3, ...). Encoding
  and decoding are the library's own, so ids are identical to ``transformers.PreTrainedTokenizerFast``.
* ``sentencepiece`` for a ``tokenizer.model`` (Llama-2 style). Plain text is encoded by sentencepiece
  itself (the tokenizer the model was trained with); special tokens written in the text (``<s>``,
  ``</s>``, ``<unk>``) are split out first as ``transformers`` does, and text that follows a special token
  gets no dummy-prefix space (``transformers`` >= 5 ``LlamaTokenizer``, ``legacy=False``). One known
  difference: for text that *starts* with a space, sentencepiece (and we) emit an extra ``▁`` piece that
  the converted ``transformers`` tokenizer drops.

Each backend offers ``vocab_size``, ``special_tokens()``, ``mark_special(content)``, ``token_to_id``,
``id_to_token``, ``encode_with_offsets(text)`` and ``decode(ids, skip_special_tokens)``.
"""

from __future__ import annotations

import re
from pathlib import Path

import sentencepiece
import tokenizers


class TokenizersBackend:
    """A ``tokenizer.json`` loaded with the ``tokenizers`` library."""

    def __init__(self, path: Path):
        try:
            self.tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # the Rust side raises a plain Exception on malformed files
            raise ValueError(f"{path}: not a valid tokenizer.json ({err})") from err

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def special_tokens(self) -> dict[str, int]:
        return {t.content: i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}

    def mark_special(self, content: str) -> None:
        # transformers registers the tokens named in tokenizer_config.json as special added tokens, which
        # makes them match as one token in text and get skipped by decode(skip_special_tokens=True).
        if content not in self.special_tokens():
            self.tok.add_special_tokens([tokenizers.AddedToken(content, special=True, normalized=False)])

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tok.id_to_token(token_id)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tok.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated sentencepiece model (varint runs past the end)")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def _without_dummy_prefix(model_proto: bytes) -> bytes:
    """The serialized sentencepiece ModelProto with ``normalizer_spec.add_dummy_prefix = False``.

    sentencepiece re-serializes a NormalizerSpec with a flag changed (``SentencePieceNormalizer``) but
    not a whole ModelProto, and we do not want the protobuf package at run time. ModelProto's top-level
    fields are all length-delimited (sentencepiece_model.proto: 1 pieces, 2 trainer_spec,
    3 normalizer_spec, 4 self_test_data, 5 denormalizer_spec), so we copy every field but 3 and append
    the new field 3; protobuf accepts fields in any order.
    """
    spec = sentencepiece.SentencePieceNormalizer(
        model_proto=model_proto, add_dummy_prefix=False
    ).serialized_normalizer_spec()
    out, pos = bytearray(), 0
    while pos < len(model_proto):
        tag, start = _read_varint(model_proto, pos)
        if tag & 7 != 2:
            raise ValueError(f"unexpected sentencepiece model layout (field {tag >> 3}, wire type {tag & 7})")
        length, start = _read_varint(model_proto, start)
        if tag >> 3 != 3:
            out += model_proto[pos:start + length]
        pos = start + length
    return bytes(out + _varint((3 << 3) | 2) + _varint(len(spec)) + spec)


class SentencePieceBackend:
    """A ``tokenizer.model`` loaded with ``sentencepiece``."""

    def __init__(self, path: Path):
        proto = path.read_bytes()
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
        except RuntimeError as err:
            raise ValueError(f"{path}: not a valid sentencepiece model ({err})") from err
        # A second processor for text that follows a special token: no dummy "▁" before it.
        self.sp_no_prefix = sentencepiece.SentencePieceProcessor(model_proto=_without_dummy_prefix(proto))
        # Control pieces (<s>, </s>) and <unk> are the special tokens; sentencepiece never matches them
        # in text, so we split them out ourselves (user-defined pieces it does match on its own).
        n = self.sp.get_piece_size()
        self._special = {self.sp.id_to_piece(i): i for i in range(n)
                         if self.sp.is_control(i) or self.sp.is_unknown(i)}
        self._split_re: re.Pattern | None = None

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    def mark_special(self, content: str) -> None:
        token_id = self.token_to_id(content)
        if token_id is None:
            raise ValueError(f"special token {content!r} is not in the sentencepiece vocabulary; a tokenizer "
                             "with added tokens needs a tokenizer.json")
        self._special[content] = token_id
        self._split_re = None

    def token_to_id(self, token: str) -> int | None:
        token_id = self.sp.piece_to_id(token)
        # piece_to_id answers unk_id for unknown pieces; only "<unk>" itself really maps there.
        return None if token_id == self.sp.unk_id() and token != self.sp.id_to_piece(token_id) else token_id

    def id_to_token(self, token_id: int) -> str | None:
        return self.sp.id_to_piece(token_id) if 0 <= token_id < self.vocab_size else None

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        if self._split_re is None:  # longest first, so "<s>" never shadows a longer token it prefixes
            alternatives = sorted(self._special, key=len, reverse=True)
            self._split_re = re.compile("|".join(re.escape(s) for s in alternatives))
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        pos = 0
        for match in [*self._split_re.finditer(text), None]:
            end = match.start() if match else len(text)
            if end > pos:
                # Only text at the very start of the input gets sentencepiece's dummy prefix.
                sp = self.sp if pos == 0 else self.sp_no_prefix
                out = sp.encode(text[pos:end], return_type="offset_mapping")  # char offsets
                ids += out["ids"]
                offsets += [(pos + a, pos + b) for a, b in out["offsets"]]
            if match:
                ids.append(self._special[match.group()])
                offsets.append((match.start(), match.end()))
                pos = match.end()
        return ids, offsets

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        special_ids = {i: s for s, i in self._special.items()}
        if skip_special_tokens:
            return self.sp.decode([i for i in ids if i not in special_ids])
        # sentencepiece drops control pieces when decoding, so decode the runs between them separately;
        # a run after a special token keeps its leading space (no dummy prefix to strip there).
        parts, run, run_start = [], [], 0
        for k, token_id in enumerate([*ids, None]):
            if token_id is None or token_id in special_ids:
                if run:
                    parts.append((self.sp if run_start == 0 else self.sp_no_prefix).decode(run))
                if token_id is not None:
                    parts.append(special_ids[token_id])
                run, run_start = [], k + 1
            else:
                run.append(token_id)
        return "".join(parts)
