"""Training examples: packed text and chat, the train / held-out datasets, padding and a resumable batch
iterator (reading the files and the split rule: ``readers.py``).

Two kinds of example, both dicts of 1-D int64 tensors ``input_ids``, ``labels``, ``position_ids`` and
``document_ids`` (labels follow the HF convention: equal to the ids, -100 where no loss is taken, and the
model shifts them, so logits at t predict ``labels[t + 1]``):

* **Packed text** (the default data, a ``.txt`` file, a folder of ``.txt`` files). Documents are tokenized,
  each followed by EOS, concatenated, and cut into blocks of exactly ``seq_len`` tokens; the last partial
  block is dropped. ``document_ids`` numbers the documents inside a block (0, 1, ...; a document's EOS
  belongs to it) and the model lets a token attend only to tokens with the same id, so nothing leaks across
  documents. ``position_ids`` restart at 0 at each document start and at the block start. A document that
  starts inside a block (not at position 0) has the label of its first token set to -100: under document
  masking nothing before it may predict it. (This is the packing with per-document masks of e.g. Krell et
  al. 2021, "Efficient sequence packing without cross-contamination".)
* **Chat / instruction** (``.jsonl``). One conversation per example, rendered with the model's chat
  template; labels only on the assistant's replies (``Tokenizer.encode_chat``). Not packed. A conversation
  longer than ``seq_len`` keeps its first ``seq_len`` tokens (right truncation; a reply cut there loses its
  tail and its end-of-turn token); one whose labelled tokens all fall past ``seq_len`` is skipped. One warning
  counts the truncated, skipped and empty-reply conversations.

Held-out splits, identical on every machine:

* default data: the topics of ``pydoc_data.topics`` (Python's reference docs, in every CPython; its text
  differs a little between Python versions) are ranked by the SHA-256 of their name and the
  ``round(eval_fraction * n)`` first are held out (8 of 79 topics at 10%);
* JSONL: the same rule over records, keyed by the SHA-256 of the record's canonical JSON (so duplicate
  records always land on the same side);
* text files: the last ``round(eval_fraction * n_blocks)`` packed blocks (documents in sorted path order),
  i.e. the end of the text, as nanoGPT does; this works for a single file as well as for a folder.

With ``eval_data`` given, all of ``data`` trains and ``eval_data`` (same formats) is the held-out set. Either
way the held-out set is capped at ``eval_tokens`` tokens (``cap_tokens``: evenly spaced sequences, the same
ones every time), so evaluating a big data set stays quick.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import torch

from finetune_ref.models.tokenizer import IGNORE_INDEX, Tokenizer
from finetune_ref.train.readers import (data_kind, default_documents, holdout_split, num_held_out, read_jsonl,
                                        read_text_documents, stable_hash)

Example = dict[str, torch.Tensor]  # 1-D int64 tensors: input_ids, labels, position_ids, document_ids
EXAMPLE_KEYS = ("input_ids", "labels", "position_ids", "document_ids")
PAD_DOCUMENT_ID = -1  # document id of padding: equal to no real document's id


# ---------------------------------------------------------------------------------------------------------
# Building examples.
# ---------------------------------------------------------------------------------------------------------
def pack_documents(documents: Sequence[Sequence[int]], seq_len: int, eos_token_id: int) -> list[Example]:
    """Pack tokenized documents into blocks of ``seq_len`` tokens (see the module docstring).

    Args:
        documents: token ids of each document, without EOS.
        seq_len: block length in tokens (>= 2).
        eos_token_id: appended after every document.
    Returns:
        ``len(stream) // seq_len`` examples, each with (seq_len,) int64 tensors.
    Raises:
        ValueError if the documents hold fewer than ``seq_len`` tokens (EOS included).
    """
    _check_seq_len(seq_len)
    stream = [t for doc in documents for t in (*doc, eos_token_id)]
    owner = [d for d, doc in enumerate(documents) for _ in range(len(doc) + 1)]
    n_blocks = len(stream) // seq_len
    if n_blocks == 0:
        raise ValueError(f"the data has {len(stream)} tokens, fewer than seq_len={seq_len} needed for one "
                         "sequence; use a smaller seq_len or more text")
    usable = n_blocks * seq_len
    input_ids = torch.tensor(stream[:usable], dtype=torch.int64).view(n_blocks, seq_len)  # (N, L)
    owner_ids = torch.tensor(owner[:usable], dtype=torch.int64).view(n_blocks, seq_len)  # (N, L)
    starts = torch.ones(n_blocks, seq_len, dtype=torch.bool)  # a document (or a block) starts here
    starts[:, 1:] = owner_ids[:, 1:] != owner_ids[:, :-1]
    document_ids = starts.cumsum(dim=1) - 1  # (N, L): 0, 1, ... within each block
    index = torch.arange(seq_len).expand(n_blocks, seq_len)  # (N, L)
    last_start = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values  # (N, L)
    position_ids = index - last_start  # (N, L): restarts at 0 at each start
    labels = input_ids.clone()
    labels[:, 1:][starts[:, 1:]] = IGNORE_INDEX  # nothing in its document precedes an in-block first token
    return [{"input_ids": input_ids[b], "labels": labels[b], "position_ids": position_ids[b],
             "document_ids": document_ids[b]} for b in range(n_blocks)]


def encode_conversations(tokenizer: Tokenizer, conversations: Sequence[list[dict]], seq_len: int,
                         sources: Sequence[str] | None = None, name: str = "conversations") -> list[Example]:
    """One example per conversation, truncated to ``seq_len`` tokens (see the module docstring).

    ``sources`` (e.g. ``"file.jsonl:12"``) prefix error messages. What was changed is reported in one warning
    (about ``len(conversations)`` ``name``):
    conversations truncated, those with an empty assistant reply (they teach only the end of a turn), and those
    skipped because no reply token is left within ``seq_len``. Raises ValueError if the template rejects a
    conversation or if no conversation keeps a labelled token.
    """
    _check_seq_len(seq_len)
    examples = []
    report: dict[str, list[str]] = {"truncated": [], "empty": [], "skipped": []}
    for k, messages in enumerate(conversations):
        where = sources[k] if sources is not None else f"conversation {k}"
        try:
            ids, labels = tokenizer.encode_chat(messages)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from err
        if any(m["role"] == "assistant" and not m["content"].strip() for m in messages):
            report["empty"].append(where)
        if len(ids) > seq_len:  # right truncation: a reply cut here loses its tail and its end-of-turn token
            report["truncated"].append(where)
            ids, labels = ids[:seq_len], labels[:seq_len]
        if all(label == IGNORE_INDEX for label in labels[1:]):  # the shifted loss would see no token
            report["skipped"].append(where)
            continue
        examples.append({"input_ids": torch.tensor(ids, dtype=torch.int64),
                         "labels": torch.tensor(labels, dtype=torch.int64),
                         "position_ids": torch.arange(len(ids), dtype=torch.int64),
                         "document_ids": torch.zeros(len(ids), dtype=torch.int64)})
    if not examples:
        raise ValueError(f"no conversation has an assistant token within seq_len={seq_len}")
    what = {"truncated": f"truncated to seq_len={seq_len}", "empty": "with an empty assistant reply",
            "skipped": f"skipped (no reply token within seq_len={seq_len})"}
    parts = [f"{len(where)} {what[key]} (first: {where[0]})" for key, where in report.items() if where]
    if parts:
        warnings.warn(f"of {len(conversations)} {name}: " + "; ".join(parts), stacklevel=2)
    return examples


def _check_seq_len(seq_len: int) -> None:
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2 (one token predicts the next), got {seq_len!r}")


def _eos(tokenizer: Tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("packing text needs an EOS token to separate documents, and this tokenizer has none; "
                         "set eos_token in tokenizer_config.json")
    return tokenizer.eos_token_id


def text_examples(tokenizer: Tokenizer, documents: list[str], seq_len: int) -> list[Example]:
    return pack_documents([tokenizer.encode(doc) for doc in documents], seq_len, _eos(tokenizer))


def _jsonl_examples(tokenizer: Tokenizer, records: list[tuple[int, list[dict]]], path: Path,
                    seq_len: int, name: str = "records") -> list[Example]:
    return encode_conversations(tokenizer, [m for _, m in records], seq_len,
                                sources=[f"{path}:{lineno}" for lineno, _ in records], name=name)


def load_examples(tokenizer: Tokenizer, path: str | Path, seq_len: int) -> list[Example]:
    """All examples of one data path (``.txt``, folder or ``.jsonl``), without any split."""
    path = Path(path)
    if data_kind(path) == "text":
        return text_examples(tokenizer, read_text_documents(path), seq_len)
    return _jsonl_examples(tokenizer, read_jsonl(path), path, seq_len)


def cap_tokens(examples: Sequence[Example], max_tokens: int | None) -> list[Example]:
    """At most ``max_tokens`` tokens' worth of ``examples`` (at least one), evenly spaced over the list so every
    part is sampled, in order; all of them when they fit or ``max_tokens`` is 0/None. Deterministic."""
    total = sum(len(e["input_ids"]) for e in examples)
    if not max_tokens or total <= max_tokens:
        return list(examples)
    n = max(1, min(len(examples), int(max_tokens * len(examples) // total)))  # the mean length sets the count
    return [examples[k * len(examples) // n] for k in range(n)]


def build_datasets(tokenizer: Tokenizer, data: str | Path | None = None, seq_len: int = 256,
                   eval_fraction: float = 0.1, eval_data: str | Path | None = None,
                   eval_tokens: int | None = None) -> tuple[list[Example], list[Example]]:
    """(train, eval) examples: ``_split``, then the held-out part capped at ``eval_tokens`` (``cap_tokens``; a
    warning says so), so that evaluating a big ``data`` does not take minutes. Arguments as ``_split``."""
    train, held = _split(tokenizer, data, seq_len, eval_fraction, eval_data)
    capped = cap_tokens(held, eval_tokens)
    if len(capped) < len(held):
        warnings.warn(f"the held-out set is capped at eval_tokens={eval_tokens}: {len(capped)} of {len(held)} "
                      "sequences, evenly spaced", stacklevel=2)
    return train, capped


def _split(tokenizer: Tokenizer, data: str | Path | None = None, seq_len: int = 256,
           eval_fraction: float = 0.1,
           eval_data: str | Path | None = None) -> tuple[list[Example], list[Example]]:
    """(train, eval) examples for the training loop.

    Args:
        tokenizer: the model's tokenizer (its EOS joins packed documents; its chat template renders JSONL).
        data: None for the default corpus (Python's reference docs), else a ``.txt`` file, a folder of
            ``.txt`` files, or a ``.jsonl`` file.
        seq_len: tokens per packed block / maximum tokens per conversation.
        eval_fraction: share held out for evaluation when ``eval_data`` is None (0 for no evaluation).
        eval_data: a separate evaluation set (same formats); then all of ``data`` trains.
    Raises:
        ValueError for missing/unsupported paths, malformed records (with file and line), empty data, or
        data too short for one sequence.
    """
    if eval_data is not None:
        train = text_examples(tokenizer, default_documents(0.0)[0], seq_len) if data is None \
            else load_examples(tokenizer, data, seq_len)
        return train, load_examples(tokenizer, eval_data, seq_len)
    if data is None:
        train_docs, eval_docs = default_documents(eval_fraction)
        return (text_examples(tokenizer, train_docs, seq_len),
                text_examples(tokenizer, eval_docs, seq_len) if eval_docs else [])
    data = Path(data)
    if data_kind(data) == "text":
        blocks = text_examples(tokenizer, read_text_documents(data), seq_len)
        n_eval = num_held_out(len(blocks), eval_fraction, what=f"block(s) of seq_len={seq_len}")
        return blocks[:len(blocks) - n_eval], blocks[len(blocks) - n_eval:]
    records = read_jsonl(data)
    keys = [json.dumps(m, sort_keys=True, ensure_ascii=False) for _, m in records]
    train_idx, eval_idx = holdout_split(keys, eval_fraction, what="record(s)")
    train = _jsonl_examples(tokenizer, [records[i] for i in train_idx], data, seq_len, "training records")
    held = _jsonl_examples(tokenizer, [records[i] for i in eval_idx], data, seq_len, "held-out records") \
        if eval_idx else []
    return train, held


# ---------------------------------------------------------------------------------------------------------
# Batches.
# ---------------------------------------------------------------------------------------------------------
def collate(examples: Sequence[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples to the longest into (B, T) int64 tensors.

    Returns ``input_ids`` (pad: ``pad_token_id``), ``attention_mask`` (1 real, 0 pad), ``labels`` (pad: -100),
    ``position_ids`` (pad: 0) and ``document_ids`` (pad: -1, no real document). Raises ValueError for an
    empty list, missing keys, or tensors that are not 1-D integer of one length per example.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    if not isinstance(pad_token_id, int) or isinstance(pad_token_id, bool):
        raise ValueError(f"pad_token_id must be an int, got {pad_token_id!r}")
    for k, ex in enumerate(examples):
        missing = [key for key in EXAMPLE_KEYS if key not in ex]
        if missing:
            raise ValueError(f"example {k} lacks {missing}; examples need {list(EXAMPLE_KEYS)}")
        shapes = {tuple(ex[key].shape) for key in EXAMPLE_KEYS}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1 or len(ex["input_ids"]) == 0:
            raise ValueError(f"example {k}: {list(EXAMPLE_KEYS)} must be non-empty 1-D tensors of one length, "
                             f"got shapes {[tuple(ex[key].shape) for key in EXAMPLE_KEYS]}")
        if any(ex[key].dtype.is_floating_point or ex[key].dtype == torch.bool for key in EXAMPLE_KEYS):
            raise ValueError(f"example {k}: tensors must be integer")
    B, T = len(examples), max(len(ex["input_ids"]) for ex in examples)
    batch = {
        "input_ids": torch.full((B, T), pad_token_id, dtype=torch.int64),
        "attention_mask": torch.zeros(B, T, dtype=torch.int64),
        "labels": torch.full((B, T), IGNORE_INDEX, dtype=torch.int64),
        "position_ids": torch.zeros(B, T, dtype=torch.int64),
        "document_ids": torch.full((B, T), PAD_DOCUMENT_ID, dtype=torch.int64),
    }
    for b, ex in enumerate(examples):
        n = len(ex["input_ids"])
        for key in EXAMPLE_KEYS:
            batch[key][b, :n] = ex[key]
        batch["attention_mask"][b, :n] = 1
    return batch


def count_label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the loss is taken on: ``labels[:, 1:] != -100`` (the model shifts, so ``labels[:, 0]`` is never
    predicted). Sum it over the micro-batches of an optimizer step to normalise gradient accumulation."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def iter_batches(examples: Sequence[Example], batch_size: int, pad_token_id: int) -> Iterator[dict]:
    """Batches in order, the last one possibly smaller (for evaluation)."""
    for start in range(0, len(examples), batch_size):
        yield collate(examples[start:start + batch_size], pad_token_id)


class BatchIterator:
    """Endless, deterministic, resumable training batches.

    Epoch ``e`` visits the examples in the order ``torch.randperm(n)`` drawn from a ``torch.Generator``
    seeded with ``stable_hash(f"{seed}:{e}")`` (so the same on every machine), in batches of ``batch_size``;
    the last smaller batch is kept unless ``drop_last``. ``state_dict()`` is ``{"epoch", "index"}`` (the next
    batch to yield) plus what must match on resume (``seed``, ``num_examples``, ``batch_size``,
    ``drop_last``); after ``load_state_dict`` the next batch is exactly the one an uninterrupted run would
    have yielded. ``max_epochs`` (None: endless) stops iteration after that many epochs.
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, pad_token_id: int, seed: int = 0,
                 drop_last: bool = False, max_epochs: int | None = None):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not examples:
            raise ValueError("BatchIterator needs at least one example")
        if drop_last and len(examples) < batch_size:
            raise ValueError(f"{len(examples)} examples make no full batch of {batch_size} (only full batches are "
                             "used): lower the batch size (finetune train --batch-size) or give more data")
        self.examples, self.batch_size, self.pad_token_id = examples, batch_size, pad_token_id
        self.seed, self.drop_last, self.max_epochs = seed, drop_last, max_epochs
        n = len(examples)
        self.batches_per_epoch = n // batch_size if drop_last else -(-n // batch_size)
        self.epoch, self.index = 0, 0
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, permutation), cached

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The permutation of example indices used in ``epoch``, (num_examples,) int64."""
        generator = torch.Generator().manual_seed(stable_hash(f"{self.seed}:{epoch}") >> 1)  # < 2**63
        return torch.randperm(len(self.examples), generator=generator)

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        if self.max_epochs is not None and self.epoch >= self.max_epochs:
            raise StopIteration
        if self._order is None or self._order[0] != self.epoch:
            self._order = (self.epoch, self.epoch_order(self.epoch))
        chosen = self._order[1][self.index * self.batch_size:(self.index + 1) * self.batch_size]
        self.index += 1
        return collate([self.examples[i] for i in chosen.tolist()], self.pad_token_id)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "num_examples": len(self.examples),
                "batch_size": self.batch_size, "drop_last": self.drop_last}

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state``. Raises ValueError if it was saved for other data or settings."""
        for key in ("seed", "num_examples", "batch_size", "drop_last"):
            mine = self.state_dict()[key]
            if state.get(key) != mine:
                raise ValueError(f"cannot resume: the saved iterator has {key}={state.get(key)!r}, this one "
                                 f"{mine!r}; resume with the same data and settings")
        epoch, index = state.get("epoch"), state.get("index")
        if not (isinstance(epoch, int) and isinstance(index, int) and epoch >= 0
                and 0 <= index <= self.batches_per_epoch):
            raise ValueError(f"cannot resume: bad position epoch={epoch!r} index={index!r}")
        self.epoch, self.index = epoch, index
