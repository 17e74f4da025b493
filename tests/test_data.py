"""Tests for train/data.py and train/readers.py: splits, packing, JSONL masking, errors, collation, the batch iterator.

A tiny byte-level BPE tokenizer with ChatML special tokens is trained here (no chat template, so the
ChatML fallback is used). Packing is checked on hand-made token lists with exact expected tensors, and
against the model: a packed block gives each document the same logits as running it alone.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from finetune_ref.models.tokenizer import IGNORE_INDEX
from finetune_ref.train.data import (BatchIterator, build_datasets, collate, count_label_tokens, encode_conversations,
                                     iter_batches, load_examples, pack_documents)
from finetune_ref.train.readers import default_documents, holdout_split, num_held_out, read_jsonl, read_text_documents
from finetune_ref.models.tokenizer import Tokenizer

EOS = 2


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from pydoc_data.topics import topics

    corpus = "\n".join(topics[k] for k in sorted(topics)[:20])
    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([corpus], trainers.BpeTrainer(
        vocab_size=350, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    path = tmp_path_factory.mktemp("tok")
    bpe.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}))
    return Tokenizer.from_dir(path)


def _learnt(tok, example):
    return tok.decode([t for t in example["labels"].tolist() if t != IGNORE_INDEX], skip_special_tokens=False)


def _write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


# --------------------------------------------------------------------------------------------- splits
def test_default_split_is_deterministic_and_by_topic():
    from pydoc_data.topics import topics

    train, held = default_documents(0.1)
    assert len(held) == round(0.1 * len(topics)) and len(train) + len(held) == len(topics)
    assert set(train).isdisjoint(held) and (train, held) == default_documents(0.1)
    # Independent of Python's per-process string hashing: a fresh interpreter with another seed agrees.
    code = ("import json; from finetune_ref.train.readers import default_documents; "
            "print(json.dumps([len(d) for d in default_documents(0.1)[1]]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1], env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert json.loads(out.stdout) == [len(d) for d in held]


def test_holdout_split_rule():
    keys = [f"record {i}" for i in range(50)]
    train, held = holdout_split(keys, 0.1)
    assert len(held) == 5 and sorted(train + held) == list(range(50))
    # Content-keyed: reordering the records holds out the same records.
    rev_train, rev_held = holdout_split(keys[::-1], 0.1)
    assert {keys[::-1][i] for i in rev_held} == {keys[i] for i in held}
    assert num_held_out(3, 0.01) == 1 and num_held_out(3, 0.9) == 2 and num_held_out(10, 0.0) == 0
    for bad in (-0.1, 1.0, "0.1"):
        with pytest.raises(ValueError, match="eval_fraction"):
            num_held_out(10, bad)
    with pytest.raises(ValueError, match="cannot hold out part of 1"):
        num_held_out(1, 0.1)


# --------------------------------------------------------------------------------------------- packing
def test_pack_documents_exact():
    docs = [[10, 11, 12], [20, 21], [30, 31, 32, 33, 34]]
    blocks = pack_documents(docs, seq_len=4, eos_token_id=EOS)
    # stream: 10 11 12 E | 20 21 E 30 | 31 32 33 34 | (E dropped: last partial block)
    expected = [
        ([10, 11, 12, EOS], [10, 11, 12, EOS], [0, 1, 2, 3], [0, 0, 0, 0]),
        ([20, 21, EOS, 30], [20, 21, EOS, IGNORE_INDEX], [0, 1, 2, 0], [0, 0, 0, 1]),
        ([31, 32, 33, 34], [31, 32, 33, 34], [0, 1, 2, 3], [0, 0, 0, 0]),
    ]
    assert len(blocks) == 3
    for block, (ids, labels, pos, doc) in zip(blocks, expected):
        for key, want in zip(("input_ids", "labels", "position_ids", "document_ids"), (ids, labels, pos, doc)):
            assert block[key].dtype == torch.int64 and block[key].tolist() == want, key
    with pytest.raises(ValueError, match="fewer than seq_len=20"):
        pack_documents(docs, seq_len=20, eos_token_id=EOS)
    with pytest.raises(ValueError, match="seq_len must be an int >= 2"):
        pack_documents(docs, seq_len=1, eos_token_id=EOS)


def test_packing_has_no_cross_document_leakage():
    """A packed block gives every document the logits and loss it gets alone (needs models/llama.py)."""
    from finetune_ref.models.config import LlamaConfig
    from finetune_ref.models.llama import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    docs = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14, 15, 16]]
    (block,) = pack_documents(docs, seq_len=15, eos_token_id=EOS)  # 4 + 6 + 5 tokens: exactly one block
    batch = collate([block], pad_token_id=0)
    with torch.no_grad():
        packed = model(**{k: batch[k] for k in ("input_ids", "position_ids", "document_ids", "labels")},
                       num_items_in_batch=1)
        start, alone_nll = 0, 0.0
        for doc in docs:
            ids = torch.tensor([doc + [EOS]])  # (1, n)
            alone = model(ids, labels=ids, num_items_in_batch=1)
            n = ids.shape[1]
            torch.testing.assert_close(packed.logits[:, start:start + n], alone.logits, rtol=1e-5, atol=1e-5)
            alone_nll, start = alone_nll + float(alone.loss), start + n
    assert count_label_tokens(batch) == sum(len(d) for d in docs)  # every token but each document's first
    assert float(packed.loss) == pytest.approx(alone_nll, rel=1e-5)


def test_text_folder_packed_and_split(tok, tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("Second document, in a subfolder.\n" * 20)
    (tmp_path / "a.txt").write_text("First document about lists and tuples.\n" * 20)
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "notes.md").write_text("ignored")
    docs = read_text_documents(tmp_path)
    assert [d[:6] for d in docs] == ["First ", "Second"]  # sorted relative paths, recursive, empties skipped
    blocks = load_examples(tok, tmp_path, seq_len=32)
    stream = [t for d in docs for t in tok.encode(d) + [tok.eos_token_id]]
    assert len(blocks) == len(stream) // 32
    assert torch.cat([b["input_ids"] for b in blocks]).tolist() == stream[:32 * len(blocks)]
    train, held = build_datasets(tok, tmp_path, seq_len=32, eval_fraction=0.25)
    assert len(held) == round(0.25 * len(blocks)) and len(train) + len(held) == len(blocks)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(train + held, blocks))  # tail is eval
    single = tmp_path / "a.txt"  # a single file splits the same way (its end is held out)
    train, held = build_datasets(tok, single, seq_len=16)
    assert len(train) > 0 and len(held) > 0


def test_empty_or_short_text_raises(tok, tmp_path):
    with pytest.raises(ValueError, match="no text found"):
        build_datasets(tok, tmp_path, seq_len=8)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="no text found"):
        build_datasets(tok, tmp_path / "empty.txt", seq_len=8)
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(ValueError, match="fewer than seq_len=64"):
        build_datasets(tok, tmp_path / "short.txt", seq_len=64)
    with pytest.raises(ValueError, match="cannot hold out part of 1 block"):
        build_datasets(tok, tmp_path / "short.txt", seq_len=2 + len(tok.encode("tiny")) - 1)
    with pytest.raises(ValueError, match="does not exist"):
        build_datasets(tok, tmp_path / "missing.txt")
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unsupported data file"):
        build_datasets(tok, tmp_path / "data.csv")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt: not UTF-8"):
        read_text_documents(tmp_path / "latin1.txt")


# --------------------------------------------------------------------------------------------- JSONL
def test_jsonl_instruction_records_mask_the_prompt(tok, tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "Name a mutable type.", "output": "list"},
        {"instruction": "Translate", "input": "bonjour", "output": "hello", "id": 7},
        {"instruction": "Say hi", "input": "", "output": "hi"}])
    examples = load_examples(tok, path, seq_len=256)
    assert [_learnt(tok, ex) for ex in examples] == ["list<|im_end|>", "hello<|im_end|>", "hi<|im_end|>"]
    text = tok.decode(examples[1]["input_ids"], skip_special_tokens=False)
    assert text == ("<|im_start|>user\nTranslate\n\nbonjour<|im_end|>\n"
                    "<|im_start|>assistant\nhello<|im_end|>\n")
    for ex in examples:
        n = len(ex["input_ids"])
        assert ex["position_ids"].tolist() == list(range(n)) and ex["document_ids"].tolist() == [0] * n
        labelled = ex["labels"] != IGNORE_INDEX
        assert torch.equal(ex["labels"][labelled], ex["input_ids"][labelled])
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Name a mutable type."}],
                                                add_generation_prompt=True))
    assert examples[0]["labels"][:len(prompt)].tolist() == [IGNORE_INDEX] * len(prompt)
    assert examples[0]["input_ids"][:len(prompt)].tolist() == prompt


def test_jsonl_messages_records_label_every_reply(tok, tmp_path):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"},
            {"role": "assistant", "content": "2"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]
    path = _write_jsonl(tmp_path / "d.jsonl", [{"messages": conv}, "", {"messages": conv[:3]}])
    examples = load_examples(tok, path, seq_len=256)
    assert [_learnt(tok, ex) for ex in examples] == ["2<|im_end|>4<|im_end|>", "2<|im_end|>"]
    ids, labels = tok.encode_chat(conv)
    assert examples[0]["input_ids"].tolist() == ids and examples[0]["labels"].tolist() == labels


@pytest.mark.parametrize("line, message", [
    ('{"instruction": "x", "output": "y"', "invalid JSON"),
    ('["a list"]', "expected a JSON object, got list"),
    ('{"instruction": "x"}', "missing key 'output'"),
    ('{"output": "y"}', "missing key 'instruction'"),
    ('{"instruction": 3, "output": "y"}', "'instruction' must be a string, got int"),
    ('{"instruction": "x", "input": ["z"], "output": "y"}', "'input' must be a string, got list"),
    ('{"prompt": "x", "completion": "y"}', "expected keys 'messages', or 'instruction' and 'output'"),
    ('{"messages": "hi"}', "messages must be a list"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "unknown role 'robot'"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]}', "message 1 has no 'content'"),
    ('{"messages": [{"role": "user", "content": 5}]}', "content must be a string"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant message"),
    ('{"messages": [], "output": "y"}', "both 'messages' and"),
])
def test_malformed_jsonl_names_file_and_line(tok, tmp_path, line, message):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "ok", "output": "fine"}, "", line])
    with pytest.raises(ValueError) as info:
        build_datasets(tok, path, seq_len=64)
    assert str(info.value).startswith(f"{path}:3: ") and message in str(info.value)


def test_jsonl_empty_truncation_and_split(tok, tmp_path):
    with pytest.raises(ValueError, match="no records"):
        read_jsonl(_write_jsonl(tmp_path / "empty.jsonl", ["", "  "]))
    long = {"instruction": "Explain. " * 40, "output": "Because."}
    short = {"instruction": "Why?", "output": "Because " * 30}
    path = _write_jsonl(tmp_path / "d.jsonl", [short, long])
    with pytest.warns(UserWarning, match=r"of 2 records: 2 truncated to seq_len=40 \(first: .*d.jsonl:1\); "
                                         r"1 skipped .*d.jsonl:2"):
        (ex,) = load_examples(tok, path, seq_len=40)  # the long prompt leaves no reply within 40 tokens
    full_ids, full_labels = tok.encode_chat(read_jsonl(path)[0][1])
    assert len(full_ids) > 40 and ex["input_ids"].tolist() == full_ids[:40]  # right truncation
    assert ex["labels"].tolist() == full_labels[:40]
    with pytest.raises(ValueError, match="no conversation has an assistant token within seq_len=8"):
        load_examples(tok, path, seq_len=8)
    path = _write_jsonl(tmp_path / "e.jsonl", [short, {"instruction": "Why?", "output": " "}])
    with pytest.warns(UserWarning, match=r"of 2 records: 1 with an empty assistant reply \(first: .*e.jsonl:2"):
        load_examples(tok, path, seq_len=400)
    records = [{"instruction": f"question {i}", "output": f"answer {i}"} for i in range(30)]
    path = _write_jsonl(tmp_path / "many.jsonl", records)
    train, held = build_datasets(tok, path, seq_len=64, eval_fraction=0.1)
    assert (len(train), len(held)) == (27, 3)
    train2, held2 = build_datasets(tok, _write_jsonl(tmp_path / "rev.jsonl", records[::-1]), seq_len=64)
    as_text = lambda exs: sorted(tok.decode(e["input_ids"]) for e in exs)  # noqa: E731
    assert as_text(held2) == as_text(held)  # the same records are held out whatever their order
    train3, held3 = build_datasets(tok, path, seq_len=1024, eval_data=tmp_path / "d.jsonl")
    assert len(train3) == 30 and len(held3) == 2


def test_encode_conversations_names_the_conversation(tok):
    good = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    (ex,) = encode_conversations(tok, [good], seq_len=64)
    assert _learnt(tok, ex) == "a<|im_end|>"
    with pytest.raises(ValueError, match="conversation 1: message 0 has unknown role 'bot'"):
        encode_conversations(tok, [good, [{"role": "bot", "content": "x"}]], seq_len=64)


# --------------------------------------------------------------------------------------------- batches
def _examples(lengths):
    return [{"input_ids": torch.arange(1, n + 1), "labels": torch.arange(1, n + 1),
             "position_ids": torch.arange(n), "document_ids": torch.zeros(n, dtype=torch.int64)}
            for n in lengths]


def test_collate_pads_right():
    batch = collate(_examples([3, 1]), pad_token_id=9)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [1, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[1, 2, 3], [1, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    assert batch["document_ids"].tolist() == [[0, 0, 0], [0, -1, -1]]
    assert all(t.dtype == torch.int64 and t.shape == (2, 3) for t in batch.values())
    assert count_label_tokens(batch) == 2  # labels[:, 1:] that are not -100
    with pytest.raises(ValueError, match="at least one example"):
        collate([], 0)
    with pytest.raises(ValueError, match="lacks \\['labels'\\]"):
        collate([{k: v for k, v in _examples([2])[0].items() if k != "labels"}], 0)
    bad = _examples([2])[0] | {"labels": torch.zeros(3, dtype=torch.int64)}
    with pytest.raises(ValueError, match="one length"):
        collate([bad], 0)
    with pytest.raises(ValueError, match="pad_token_id"):
        collate(_examples([2]), None)
    assert [b["input_ids"].shape[0] for b in iter_batches(_examples([2] * 5), 2, 0)] == [2, 2, 1]


def first(iterator, k):
    """The next k batches, each as its rows' lengths (the examples have distinct lengths)."""
    return [next(iterator)["attention_mask"].sum(1).tolist() for _ in range(k)]


def test_batch_iterator_deterministic_and_resumable():
    examples = _examples(range(1, 12))  # 11 examples of distinct lengths: a batch is identified by its ids
    a = first(BatchIterator(examples, 4, pad_token_id=0, seed=3), 10)  # 3 batches per epoch: 3+ epochs
    assert a == first(BatchIterator(examples, 4, pad_token_id=0, seed=3), 10)
    assert a != first(BatchIterator(examples, 4, pad_token_id=0, seed=4), 10)
    it = BatchIterator(examples, 4, pad_token_id=0, seed=3)
    seen = sorted(n for batch in (next(it) for _ in range(3)) for n in batch["attention_mask"].sum(1).tolist())
    assert seen == list(range(1, 12))  # an epoch visits every example once; the last batch has 3
    assert it.state_dict()["epoch"] == 0 and it.state_dict()["index"] == 3
    for stop in (2, 3, 5):  # mid-epoch, at an epoch boundary, in the second epoch
        it = BatchIterator(examples, 4, pad_token_id=0, seed=3)
        first(it, stop)
        state = json.loads(json.dumps(it.state_dict()))  # survives a round trip through a checkpoint file
        resumed = BatchIterator(examples, 4, pad_token_id=0, seed=3)
        resumed.load_state_dict(state)
        assert first(resumed, 10 - stop) == a[stop:]
    with pytest.raises(ValueError, match="seed=3, this one 4"):
        BatchIterator(examples, 4, pad_token_id=0, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="num_examples"):
        BatchIterator(examples[:5], 4, pad_token_id=0, seed=3).load_state_dict(state)
    assert len(list(BatchIterator(examples, 4, pad_token_id=0, max_epochs=2))) == 6
    assert len(list(BatchIterator(examples, 4, pad_token_id=0, drop_last=True, max_epochs=1))) == 2
    with pytest.raises(ValueError, match="batch_size"):
        BatchIterator(examples, 0, pad_token_id=0)


# --------------------------------------------------------------------------------------------- real model
@pytest.mark.real_model
def test_default_data_with_smollm2_tokenizer(smollm2_dir):
    tok = Tokenizer.from_dir(smollm2_dir)
    train, held = build_datasets(tok, seq_len=256)
    assert len(train) > 300 and len(held) > 10  # 422 and 19 on CPython 3.11
    for ex in train[:50] + held[:50]:
        assert ex["input_ids"].shape == (256,)
        starts = (ex["position_ids"] == 0).nonzero().flatten().tolist()
        assert starts[0] == 0 and ex["labels"][starts[1:]].eq(IGNORE_INDEX).all()
        assert int((ex["labels"] == IGNORE_INDEX).sum()) == len(starts) - 1
        eos_before = [s - 1 for s in starts[1:]]
        assert ex["input_ids"][eos_before].eq(tok.eos_token_id).all()  # documents are joined with EOS
    batch = next(BatchIterator(train, 4, tok.pad_token_id, seed=0))
    assert batch["input_ids"].shape == (4, 256)
