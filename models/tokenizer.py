"""Tokenizer: one small interface over a Hugging Face ``tokenizer.json`` or a sentencepiece ``tokenizer.model``.

What the fine-tuning code needs from a tokenizer is small: text -> ids, ids -> text, the bos/eos/pad ids,
the vocabulary size, and a chat template rendered exactly as ``transformers`` renders it, plus the labels
for supervised chat fine-tuning (loss on the assistant's replies only). This file provides that and
nothing else, on top of two well-kept libraries:

* ``tokenizers`` for a ``tokenizer.json``, ``sentencepiece`` for a ``tokenizer.model``; how each is driven,
  and the one known difference from ``transformers``, is in ``models.tokenizer_backends``.
* Chat templates (Jinja2, rendered as ``transformers.utils.chat_template_utils`` does; ChatML when a model
  has none) are in ``models.chat_template``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import jinja2

from finetune_ref.models.chat_template import CHATML_TEMPLATE, compile_chat_template, validate_messages
from finetune_ref.models.tokenizer_backends import SentencePieceBackend, TokenizersBackend

IGNORE_INDEX = -100  # label value that PyTorch's cross_entropy (and HF models) skip

# transformers' `clean_up_tokenization_spaces` post-processing of decoded text (off for modern models,
# honoured only when tokenizer_config.json turns it on).
_CLEANUP_REPLACEMENTS = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
    (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)


# ---------------------------------------------------------------------------------------------------------
# Reading the model directory's JSON files (all optional).
# ---------------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json stores a special token as a string or as a serialized AddedToken dict.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _first_id(value: Any) -> int | None:
    # config.json / generation_config.json hold an int, or a list of ints (several eos ids): take the first.
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class Tokenizer:
    """Text <-> token ids, special-token ids and chat templating for one model.

    Build it with :meth:`from_dir`. Attributes: ``bos_token_id``, ``eos_token_id``, ``pad_token_id``,
    ``unk_token_id`` (``int`` or ``None``; ``pad_token_id`` falls back to ``eos_token_id`` when the model
    defines no pad token, which is harmless because padded positions are masked out and carry label -100),
    ``vocab_size`` (number of ids including added tokens, i.e. max id + 1), ``chat_template`` (the Jinja
    source in use: the model's, or :data:`CHATML_TEMPLATE` when it has none; ``has_model_chat_template``
    says which).
    """

    def __init__(self, backend, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, unk_token: str | None = None,
                 bos_token_id: int | None = None, eos_token_id: int | None = None,
                 pad_token_id: int | None = None, unk_token_id: int | None = None, chat_template: str | None = None,
                 clean_up_tokenization_spaces: bool = False):
        """Use :meth:`from_dir`. ``backend`` is a private loader object; a ``*_token`` string (from
        tokenizer_config.json) wins over the matching ``*_token_id`` fallback. Raises ValueError for a token
        not in the vocabulary, an id outside it, or a chat template with a syntax error."""
        self._backend = backend
        self.vocab_size = backend.vocab_size
        ids = {}
        for name, token, fallback_id in (("bos", bos_token, bos_token_id), ("eos", eos_token, eos_token_id),
                                         ("pad", pad_token, pad_token_id), ("unk", unk_token, unk_token_id)):
            if token is not None:
                token_id = backend.token_to_id(token)
                if token_id is None:  # transformers would grow the vocabulary; for fine-tuning that is a bug
                    raise ValueError(f"{name}_token {token!r} is not in the vocabulary")
                backend.mark_special(token)
            else:
                token_id = fallback_id
            if token_id is not None and not 0 <= token_id < self.vocab_size:
                raise ValueError(f"{name}_token_id {token_id} is outside the vocabulary [0, {self.vocab_size})")
            ids[name] = token_id
        self.bos_token_id: int | None = ids["bos"]
        self.eos_token_id: int | None = ids["eos"]
        self.pad_token_id: int | None = ids["pad"] if ids["pad"] is not None else ids["eos"]
        self.unk_token_id: int | None = ids["unk"]
        # The variables a template sees: the special tokens the model defines (not the pad fallback).
        self._template_tokens = {f"{name}_token": backend.id_to_token(token_id)
                                 for name, token_id in ids.items() if token_id is not None}
        self.special_token_ids = frozenset(backend.special_tokens().values())
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.has_model_chat_template = chat_template is not None
        self.chat_template = chat_template if chat_template is not None else CHATML_TEMPLATE
        self._template = compile_chat_template(self.chat_template)

    # -- construction -----------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load the tokenizer in a model directory.

        Uses ``tokenizer.json`` when present, else ``tokenizer.model``. Special tokens come from
        ``tokenizer_config.json`` (``bos_token``, ``eos_token``, ``pad_token``, ``unk_token``); ids the
        config does not name come from ``generation_config.json`` then ``config.json``
        (``*_token_id``), then from the sentencepiece model's own ids. The chat template is
        ``chat_template.jinja`` if present (it wins, as in transformers), else ``tokenizer_config.json``'s
        ``chat_template`` (a string, or a list of ``{"name", "template"}`` where "default" is used).

        Raises ValueError if the directory has neither tokenizer file, or a file is malformed.
        """
        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"{path} is not a directory; pass the model directory holding tokenizer.json "
                             "or tokenizer.model")
        if (path / "tokenizer.json").is_file():
            backend = TokenizersBackend(path / "tokenizer.json")
        elif (path / "tokenizer.model").is_file():
            backend = SentencePieceBackend(path / "tokenizer.model")
        else:
            raise ValueError(f"{path} has neither tokenizer.json nor tokenizer.model")
        config = _read_json(path / "tokenizer_config.json")
        fallbacks = [_read_json(path / "generation_config.json"), _read_json(path / "config.json")]
        if isinstance(backend, SentencePieceBackend):
            sp = backend.sp
            fallbacks.append({"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(),
                              "pad_token_id": sp.pad_id(), "unk_token_id": sp.unk_id()})

        def fallback_id(name: str) -> int | None:
            for source in fallbacks:
                token_id = _first_id(source.get(f"{name}_token_id"))
                if token_id is not None and token_id >= 0:  # sentencepiece says -1 for "none"
                    return token_id
            return None

        template = config.get("chat_template")
        if isinstance(template, list):  # several named templates: use the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        if template is not None and not isinstance(template, str):
            raise ValueError(f"{path / 'tokenizer_config.json'}: chat_template must be a string")
        return cls(backend,
                   bos_token=_token_content(config.get("bos_token")),
                   eos_token=_token_content(config.get("eos_token")),
                   pad_token=_token_content(config.get("pad_token")),
                   unk_token=_token_content(config.get("unk_token")),
                   bos_token_id=fallback_id("bos"), eos_token_id=fallback_id("eos"),
                   pad_token_id=fallback_id("pad"), unk_token_id=fallback_id("unk"), chat_template=template,
                   clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)))

    # -- plain text -------------------------------------------------------------------------------------
    def token(self, token_id: int | None) -> str | None:
        """The token string of an id (``None`` for ``None``)."""
        return None if token_id is None else self._backend.id_to_token(token_id)

    @property
    def bos_token(self) -> str | None:
        return self.token(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return self.token(self.eos_token_id)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of ``text`` (no bos/eos added) and each token's ``(start, end)`` character span in it."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._backend.encode_with_offsets(text)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of ``text``. Special-token strings in the text become their ids (as in transformers).

        Raises TypeError for non-str text, ValueError if bos/eos is asked for but the model has none.
        """
        ids = self.encode_with_offsets(text)[0]
        for wanted, token_id, name in ((add_bos, self.bos_token_id, "bos"), (add_eos, self.eos_token_id, "eos")):
            if wanted and token_id is None:
                raise ValueError(f"add_{name}=True but this tokenizer has no {name} token")
        return ([self.bos_token_id] if add_bos else []) + ids + ([self.eos_token_id] if add_eos else [])

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (a list of ints or a 1-D integer tensor).

        Raises ValueError for ids outside ``[0, vocab_size)`` (e.g. a -100 label left in).
        """
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        ids = list(ids)
        for token_id in ids:
            if not isinstance(token_id, int) or isinstance(token_id, bool):
                raise TypeError(f"ids must be ints, got {type(token_id).__name__}")
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(f"token id {token_id} is outside the vocabulary [0, {self.vocab_size}); "
                                 f"drop label padding ({IGNORE_INDEX}) before decoding")
        text = self._backend.decode(ids, skip_special_tokens)
        if self.clean_up_tokenization_spaces:
            for old, new in _CLEANUP_REPLACEMENTS:
                text = text.replace(old, new)
        return text

    # -- chat -------------------------------------------------------------------------------------------
    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         tools=None, documents=None, **self._template_tokens)
        except jinja2.TemplateError as err:  # raise_exception(...) in the template, or a template bug
            raise ValueError(f"the chat template rejected the conversation: {err}") from err

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """Render a conversation to text with the model's chat template (ChatML if it has none).

        ``messages``: list of ``{"role": "system"|"user"|"assistant"|"tool", "content": str}``.
        ``add_generation_prompt`` appends the header that opens an assistant turn. Same string as
        ``transformers``' ``apply_chat_template(..., tokenize=False)``. Raises ValueError for malformed
        messages, unknown roles, or a template that raises.
        """
        return self._render(validate_messages(messages), add_generation_prompt)

    def encode_chat(self, messages: list[dict], max_len: int | None = None) -> tuple[list[int], list[int]]:
        """Token ids of a rendered conversation and labels for supervised fine-tuning.

        ``input_ids`` are the ids of the whole rendered conversation (equal to tokenizing
        :meth:`apply_chat_template`'s output). ``labels[t]`` is ``input_ids[t]`` on assistant-response
        tokens, up to and including the end-of-turn token (the last special token of the turn, e.g.
        ``<|im_end|>``; ChatML's newline after it is not learnt), and ``IGNORE_INDEX`` (-100) elsewhere
        (system/user/tool text, template headers, the assistant header "<|im_start|>assistant\\n").

        How: the conversation is rendered prefix by prefix (messages[:1], messages[:2], ...); each
        message's text is what its prefix adds to the previous one. For an assistant message the header
        is what ``add_generation_prompt=True`` adds to the previous prefix; the rest is the response. If
        the template does not produce a header that way, the response starts where the message content
        does. A token is labelled when its characters overlap a response span.

        ``max_len``: keep the first ``max_len`` tokens (right truncation). Returns two lists of equal
        length. Raises ValueError for malformed messages or a template whose renderings of successive
        prefixes are not prefixes of each other (then per-message spans are undefined).
        """
        messages = validate_messages(messages)
        if max_len is not None and (not isinstance(max_len, int) or max_len < 1):
            raise ValueError(f"max_len must be a positive int or None, got {max_len!r}")
        spans: list[tuple[int, int]] = []  # [start, end) character spans of assistant responses
        previous = ""
        for k, message in enumerate(messages):
            current = self._render(messages[:k + 1], add_generation_prompt=False)
            if not current.startswith(previous):
                raise ValueError(f"the chat template is not prefix-stable: rendering messages[:{k + 1}] does not "
                                 f"start with the rendering of messages[:{k}], so turns cannot be located")
            if message["role"] == "assistant":
                start = None
                if k > 0:
                    header = self._render(messages[:k], add_generation_prompt=True)
                    if header.startswith(previous) and current.startswith(header):
                        start = len(header)
                if start is None:  # no usable generation prompt: the response starts at its content
                    found = current.find(message["content"].strip(), len(previous))
                    if found < 0:
                        raise ValueError(f"cannot find assistant message {k}'s content in the rendered template")
                    start = found
                spans.append((start, len(current)))
            previous = current
        ids, offsets = self._backend.encode_with_offsets(previous)
        labels = [IGNORE_INDEX] * len(ids)
        for span_start, span_end in spans:
            # Tokens overlapping the span, as transformers' return_assistant_tokens_mask does: a token that
            # merges the header's newline with a reply's leading whitespace is learnt, not dropped.
            inside = [t for t, (a, b) in enumerate(offsets) if b > span_start and a < span_end]
            special = [t for t in inside if ids[t] in self.special_token_ids]
            last = special[-1] if special else (inside[-1] if inside else -1)
            for t in inside:
                if t <= last:  # the template's separator after the end-of-turn token is not the response
                    labels[t] = ids[t]
        if max_len is not None:
            ids, labels = ids[:max_len], labels[:max_len]
        return ids, labels
