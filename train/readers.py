"""Reading training data: the default corpus (``pydoc_data.topics``), ``.txt`` files and folders, JSONL records
(instruction/output or chat messages), and the deterministic held-out split (``data.py`` says which rule
applies to which data)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator, Sequence

from finetune_ref.models.chat_template import validate_messages


# ---------------------------------------------------------------------------------------------------------
# Deterministic held-out split.
# ---------------------------------------------------------------------------------------------------------
def stable_hash(key: str) -> int:
    """A 64-bit hash of ``key`` that is the same in every process and on every machine (unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")


def num_held_out(n: int, eval_fraction: float, what: str = "units") -> int:
    """How many of ``n`` units to hold out: ``round(eval_fraction * n)``, at least 1 when the fraction is
    positive, and at most ``n - 1`` so training keeps one. Raises ValueError for a fraction outside [0, 1)."""
    if not isinstance(eval_fraction, (int, float)) or not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction!r}")
    if eval_fraction == 0 or n == 0:
        return 0
    if n < 2:
        raise ValueError(f"cannot hold out part of {n} {what} for evaluation: give more data, an eval_data file, "
                         "or eval_fraction=0")
    return min(max(1, round(eval_fraction * n)), n - 1)


def holdout_split(keys: Sequence[str], eval_fraction: float, what: str = "units") -> tuple[list[int], list[int]]:
    """Indices (train, eval) of units named by ``keys``: the units with the smallest ``stable_hash(key)``
    are held out (ties broken by position). Both lists are in the original order."""
    n_eval = num_held_out(len(keys), eval_fraction, what)
    ranked = sorted(range(len(keys)), key=lambda i: (stable_hash(keys[i]), i))
    held = set(ranked[:n_eval])
    return [i for i in range(len(keys)) if i not in held], sorted(held)


# ---------------------------------------------------------------------------------------------------------
# Reading data.
# ---------------------------------------------------------------------------------------------------------
def default_documents(eval_fraction: float = 0.1) -> tuple[list[str], list[str]]:
    """The default corpus: (train, eval) topic texts of ``pydoc_data.topics``, split by topic name."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    train, held = holdout_split(names, eval_fraction, what="topics")
    return [topics[names[i]] for i in train], [topics[names[i]] for i in held]


def read_text_documents(path: str | Path) -> list[str]:
    """Documents of a ``.txt`` file (one document) or a folder (every ``*.txt`` below it, recursively, in
    sorted relative-path order). Files that are empty or only whitespace are skipped.

    Raises ValueError if nothing is left, or a file is not UTF-8.
    """
    path = Path(path)
    files = sorted(path.rglob("*.txt"), key=lambda p: p.relative_to(path).as_posix()) if path.is_dir() else [path]
    documents = []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{file}: not UTF-8 text ({err.reason} at byte {err.start})") from err
        if text.strip():
            documents.append(text)
    if not documents:
        raise ValueError(f"{path}: no text found (no non-empty .txt file)")
    return documents


def record_to_messages(record: object) -> list[dict]:
    """One JSONL record as a conversation.

    ``{"messages": [{"role", "content"}, ...]}`` is used as is; ``{"instruction", "input" (optional),
    "output"}`` becomes a user turn (instruction, then a blank line and the input when there is one) and an
    assistant turn (output). Raises ValueError saying what is wrong.
    """
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        if "instruction" in record or "output" in record:
            raise ValueError("has both 'messages' and 'instruction'/'output'; use one format per record")
        messages = validate_messages(record["messages"])
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError("has no assistant message, so there is nothing to learn")
        return messages
    if "instruction" in record or "output" in record:
        for key in ("instruction", "output"):
            if key not in record:
                raise ValueError(f"missing key {key!r} (an instruction record needs 'instruction' and 'output', "
                                 "'input' is optional)")
        for key in ("instruction", "input", "output"):
            if key in record and record[key] is not None and not isinstance(record[key], str):
                raise ValueError(f"{key!r} must be a string, got {type(record[key]).__name__}")
        if record["instruction"] is None or record["output"] is None:
            raise ValueError("'instruction' and 'output' must be strings, got null")
        prompt = record["instruction"]
        if record.get("input"):
            prompt = f"{prompt}\n\n{record['input']}"
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    raise ValueError(f"expected keys 'messages', or 'instruction' and 'output'; got {sorted(record)}")


def json_lines(path: str | Path) -> Iterator[tuple[int, object]]:
    """(line number, value) for every non-blank line of a JSON-lines file (data, or a run's metrics.jsonl).

    Raises ValueError ``"<file>:<line>: invalid JSON (...)"`` for a line that is not JSON, and ``"<file>:<line>:
    not UTF-8 (...)"`` for one that is not UTF-8.
    """
    path = Path(path)
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is reported with its number
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not UTF-8 ({err.reason} at byte {err.start + 1} of the "
                                 "line); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({err.msg} at column {err.colno})") from err


def read_jsonl(path: str | Path) -> list[tuple[int, list[dict]]]:
    """(line number, conversation) for every non-blank line of a JSONL file.

    Raises ValueError ``"<file>:<line>: <what is wrong>"`` for a malformed line, and for a file with no
    records.
    """
    out = []
    for lineno, record in json_lines(path):
        try:
            out.append((lineno, record_to_messages(record)))
        except ValueError as err:
            raise ValueError(f"{path}:{lineno}: {err}") from err
    if not out:
        raise ValueError(f"{path}: no records (the file is empty)")
    return out


def data_kind(path: str | Path) -> str:
    """``"text"`` for a ``.txt`` file or a folder, ``"jsonl"`` for a ``.jsonl`` file; ValueError otherwise."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"data path {path} does not exist")
    if path.is_dir() or path.suffix == ".txt":
        return "text"
    if path.suffix == ".jsonl":
        return "jsonl"
    raise ValueError(f"{path}: unsupported data file; give a .txt file, a folder of .txt files or a .jsonl file")
