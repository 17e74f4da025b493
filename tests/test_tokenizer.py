"""Tests for models/tokenizer.py: parity with transformers on tiny tokenizers trained here.

A byte-level BPE ``tokenizer.json`` (built like SmolLM2's: digits split, ByteLevel, ChatML specials) and a
sentencepiece BPE ``tokenizer.model`` (identity normalization, no whitespace folding, byte fallback) are trained in the test on Python's own
docs. Oracles: ``transformers.PreTrainedTokenizerFast`` / ``AutoTokenizer`` / ``LlamaTokenizer`` for ids,
text and chat rendering; ``return_assistant_tokens_mask`` with a ``{% generation %}`` template for labels.
"""

import importlib.util
import json
import warnings

import pydoc_data.topics
import pytest
import sentencepiece
import tokenizers
import torch
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

from finetune_ref.models.chat_template import CHATML_TEMPLATE
from finetune_ref.models.tokenizer import IGNORE_INDEX, Tokenizer

CORPUS = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)[:30])

TEXTS = [
    "Hello world",
    "Tabs\tand  double  spaces\n\n  indented line\n",
    "numbers 1234567 and 3.14159, x = f(y) + 2",
    "unicode: café naïve Ωμέγα 日本語 🙂",
    "special <|im_start|>user\nhi<|im_end|> inside text",
    "",
    "a",
]

# SmolLM2-like template: ChatML plus a default system prompt when the conversation has none.
SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The same, with transformers' {% generation %} marks around what the assistant must learn.
GEN_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Exercises the helpers transformers gives templates: raise_exception, tojson, loop controls, bos/eos.
FANCY_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}{% continue %}{% endif %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}"
    "[{{ m['role'] }}] {{ m['content'] | tojson }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "What is a list?"},
     {"role": "assistant", "content": "A mutable sequence."}],
    [{"role": "system", "content": "Be terse."},
     {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And 3+3?"},
     {"role": "assistant", "content": "6, as in 'six' <ok>"},
     {"role": "user", "content": "Indent it."},
     {"role": "assistant", "content": "\n  six\n"}],
    [{"role": "user", "content": "Only a question, café 🙂"}],
]


def _write_json(path, obj):
    path.write_text(json.dumps(obj), encoding="utf-8")


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """A byte-level BPE tokenizer.json (SmolLM2 pipeline) with ChatML specials and a tokenizer_config."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS], trainer=trainer)
    path = tmp_path_factory.mktemp("bpe")
    tok.save(str(path / "tokenizer.json"))
    _write_json(path / "tokenizer_config.json", {
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
        "unk_token": {"content": "<|endoftext|>", "special": True, "__type": "AddedToken"},
        "chat_template": SMOL_TEMPLATE, "clean_up_tokenization_spaces": False,
        "tokenizer_class": "PreTrainedTokenizerFast"})
    return path


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    """A 512-piece sentencepiece BPE tokenizer.model (byte fallback, whitespace kept as is)."""
    path = tmp_path_factory.mktemp("sp")
    (path / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(path / "corpus.txt"), model_prefix=str(path / "tokenizer"), vocab_size=512, model_type="bpe",
        normalization_rule_name="identity", remove_extra_whitespaces=False, byte_fallback=True, minloglevel=2)
    (path / "corpus.txt").unlink()
    (path / "tokenizer.vocab").unlink()
    return path


def _hf_fast(path, template=None):
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"),
                                              bos_token="<|im_start|>", eos_token="<|im_end|>",
                                              unk_token="<|endoftext|>", pad_token="<|im_end|>")
    hf.chat_template = template
    return hf


# --------------------------------------------------------------------------------------------- plain text
def test_bpe_encode_decode_match_transformers(bpe_dir):
    ours = Tokenizer.from_dir(bpe_dir)
    for hf in (_hf_fast(bpe_dir), transformers.AutoTokenizer.from_pretrained(str(bpe_dir))):
        for text in TEXTS:
            ids = ours.encode(text)
            assert ids == hf.encode(text, add_special_tokens=False), text
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert ours.decode(ours.encode(TEXTS[3])) == TEXTS[3]  # byte-level BPE round-trips any text


def test_bpe_special_token_ids(bpe_dir):
    tok = Tokenizer.from_dir(bpe_dir)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 2, 0)
    assert tok.vocab_size == 400 and tok.bos_token == "<|im_start|>" and tok.eos_token == "<|im_end|>"
    assert tok.special_token_ids == {0, 1, 2}
    assert tok.encode("hi", add_bos=True, add_eos=True) == [1, *tok.encode("hi"), 2]
    assert tok.encode("<|im_end|>") == [2]
    assert tok.decode(torch.tensor([1, *tok.encode("hi"), 2])) == "hi"


def test_ids_fall_back_to_config_files(bpe_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((bpe_dir / "tokenizer.json").read_bytes())
    tok = Tokenizer.from_dir(tmp_path)  # nothing but tokenizer.json: no special ids, ChatML template
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (None, None, None)
    assert not tok.has_model_chat_template and tok.chat_template == CHATML_TEMPLATE
    with pytest.raises(ValueError, match="no eos token"):
        tok.encode("x", add_eos=True)
    _write_json(tmp_path / "config.json", {"bos_token_id": 1, "eos_token_id": 0})
    _write_json(tmp_path / "generation_config.json", {"eos_token_id": [2, 0]})
    tok = Tokenizer.from_dir(tmp_path)  # generation_config wins over config; a list gives its first id
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)  # pad falls back to eos
    (tmp_path / "chat_template.jinja").write_text(SMOL_TEMPLATE, encoding="utf-8")
    assert Tokenizer.from_dir(tmp_path).chat_template == SMOL_TEMPLATE


def test_sentencepiece_matches_transformers_llama(sp_dir):
    pytest.importorskip("google.protobuf", reason="transformers needs protobuf to convert a tokenizer.model")
    ours = Tokenizer.from_dir(sp_dir)
    hf = transformers.LlamaTokenizer.from_pretrained(str(sp_dir))
    assert (ours.bos_token_id, ours.eos_token_id, ours.unk_token_id) == (1, 2, 0)
    assert ours.vocab_size == len(hf) == 512
    texts = [t for t in TEXTS if not t[:1].isspace()] + ["<s>[INST] hi [/INST] ok</s>", "a<s>b", "x </s>\ny"]
    for text in texts:
        ids = ours.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False), text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), text


def test_sentencepiece_plain_text_is_sentencepiece(sp_dir):
    ours = Tokenizer.from_dir(sp_dir)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    for text in TEXTS[:4] + ["  leading spaces"]:
        assert ours.encode(text) == sp.encode(text)
        assert ours.decode(ours.encode(text)) == sp.decode(sp.encode(text)) == text
    # Documented divergence: transformers' converted LlamaTokenizer drops sentencepiece's extra "▁" before
    # text that already starts with a space; we keep the model's own tokenization.
    assert ours.encode(" lead")[:2] == [sp.piece_to_id("▁")] * 2


# --------------------------------------------------------------------------------------------- chat
@pytest.mark.parametrize("template", [SMOL_TEMPLATE, GEN_TEMPLATE, FANCY_TEMPLATE, None])
def test_chat_rendering_matches_transformers(bpe_dir, tmp_path, template):
    (tmp_path / "tokenizer.json").write_bytes((bpe_dir / "tokenizer.json").read_bytes())
    config = json.loads((bpe_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    _write_json(tmp_path / "tokenizer_config.json", config)
    ours = Tokenizer.from_dir(tmp_path)
    hf = _hf_fast(bpe_dir, template if template is not None else CHATML_TEMPLATE)
    for messages in CONVERSATIONS:
        for gen in (False, True):
            text = ours.apply_chat_template(messages, add_generation_prompt=gen)
            assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours.encode(text) == hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen,
                                                               return_dict=False)


def test_encode_chat_labels_match_transformers_assistant_mask(bpe_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((bpe_dir / "tokenizer.json").read_bytes())
    config = json.loads((bpe_dir / "tokenizer_config.json").read_text())
    _write_json(tmp_path / "tokenizer_config.json", {**config, "chat_template": GEN_TEMPLATE})
    ours = Tokenizer.from_dir(tmp_path)
    hf = _hf_fast(bpe_dir, GEN_TEMPLATE)
    for messages in CONVERSATIONS:
        ids, labels = ours.encode_chat(messages)
        out = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert ids == out["input_ids"]
        assert labels == [t if m else IGNORE_INDEX for t, m in zip(ids, out["assistant_masks"])]


def test_encode_chat_labels_sentencepiece(sp_dir, tmp_path):
    """A Llama-2-like template on the sentencepiece tokenizer: response = " answer</s>"."""
    pytest.importorskip("google.protobuf", reason="transformers needs protobuf to convert a tokenizer.model")
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] "
                "+ ' [/INST]' }}{% else %}{% generation %}{{ ' ' + m['content'] + eos_token }}{% endgeneration %}"
                "{% endif %}{% endfor %}")
    (tmp_path / "tokenizer.model").write_bytes((sp_dir / "tokenizer.model").read_bytes())
    _write_json(tmp_path / "tokenizer_config.json", {"bos_token": "<s>", "eos_token": "</s>",
                                                     "chat_template": template})
    ours = Tokenizer.from_dir(tmp_path)
    hf = transformers.LlamaTokenizer.from_pretrained(str(sp_dir))
    hf.chat_template = template
    messages = [{"role": "user", "content": "Name a type."}, {"role": "assistant", "content": "The list."},
                {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "A tuple."}]
    ids, labels = ours.encode_chat(messages)
    out = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == out["input_ids"]
    assert labels == [t if m else IGNORE_INDEX for t, m in zip(ids, out["assistant_masks"])]
    assert ours.decode([t for t in labels if t != IGNORE_INDEX], skip_special_tokens=False) == \
        "The list.</s> A tuple.</s>"


def test_encode_chat_prompt_masked_response_labelled(bpe_dir):
    tok = Tokenizer.from_dir(bpe_dir)  # SMOL_TEMPLATE: adds a default system prompt; no generation marks
    messages = CONVERSATIONS[1]
    ids, labels = tok.encode_chat(messages)
    assert ids == tok.encode(tok.apply_chat_template(messages))
    learnt = [t for t in labels if t != IGNORE_INDEX]
    assert tok.decode(learnt, skip_special_tokens=False) == \
        "4<|im_end|>6, as in 'six' <ok><|im_end|>\n  six\n<|im_end|>"
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(ids, labels))
    ids, labels = tok.encode_chat(CONVERSATIONS[2])  # no assistant turn: nothing to learn
    assert set(labels) == {IGNORE_INDEX}
    # The assistant first, without a generation header available: labels start at its content.
    ids, labels = tok.encode_chat([{"role": "assistant", "content": "Hello there"}])
    assert tok.decode([t for t in labels if t != IGNORE_INDEX], skip_special_tokens=False) == \
        "Hello there<|im_end|>"
    ids8, labels8 = tok.encode_chat(messages, max_len=8)
    full_ids, full_labels = tok.encode_chat(messages)
    assert (ids8, labels8) == (full_ids[:8], full_labels[:8])


@pytest.mark.parametrize("messages, match", [
    ("hello", "must be a list"),
    ([], "empty"),
    (["hi"], "message 0 must be a dict"),
    ([{"role": "user"}], "no 'content'"),
    ([{"content": "x"}], "no 'role'"),
    ([{"role": "robot", "content": "x"}], "unknown role 'robot'"),
    ([{"role": "user", "content": ["x"]}], "content must be a string"),
])
def test_malformed_messages_raise(bpe_dir, messages, match):
    tok = Tokenizer.from_dir(bpe_dir)
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template(messages)
    with pytest.raises(ValueError, match=match):
        tok.encode_chat(messages)


def test_template_errors_raise_value_error(bpe_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((bpe_dir / "tokenizer.json").read_bytes())
    _write_json(tmp_path / "tokenizer_config.json", {"chat_template": FANCY_TEMPLATE, "bos_token": "<|im_start|>",
                                                     "eos_token": "<|im_end|>"})
    tok = Tokenizer.from_dir(tmp_path)
    # The sandbox blocks attribute escapes; raise_exception surfaces as a ValueError with its message.
    _write_json(tmp_path / "tokenizer_config.json", {"chat_template": "{{ raise_exception('no system') }}"})
    with pytest.raises(ValueError, match="no system"):
        Tokenizer.from_dir(tmp_path).apply_chat_template(CONVERSATIONS[0])
    _write_json(tmp_path / "tokenizer_config.json", {"chat_template": "{{ messages.__class__.__mro__ }}"})
    with pytest.raises(ValueError, match="rejected"):
        Tokenizer.from_dir(tmp_path).apply_chat_template(CONVERSATIONS[0])
    _write_json(tmp_path / "tokenizer_config.json", {"chat_template": "{% for m in messages %}"})
    with pytest.raises(ValueError, match="syntax error"):
        Tokenizer.from_dir(tmp_path)
    # Not prefix-stable: the last message is rendered differently from the others.
    _write_json(tmp_path / "tokenizer_config.json", {"chat_template":
                "{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}{% endfor %}"})
    with pytest.raises(ValueError, match="prefix-stable"):
        Tokenizer.from_dir(tmp_path).encode_chat(CONVERSATIONS[0])
    assert tok.apply_chat_template(CONVERSATIONS[0]).startswith("<|im_start|>[user] \"What")


def test_bad_inputs_raise(bpe_dir, tmp_path):
    tok = Tokenizer.from_dir(bpe_dir)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([5, -100])
    with pytest.raises(TypeError, match="must be a str"):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match="max_len"):
        tok.encode_chat(CONVERSATIONS[0], max_len=0)
    with pytest.raises(ValueError, match="not a directory"):
        Tokenizer.from_dir(tmp_path / "missing")
    with pytest.raises(ValueError, match="neither tokenizer.json nor tokenizer.model"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((bpe_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("[1, 2", encoding="utf-8")
    with pytest.raises(ValueError, match="invalid JSON"):
        Tokenizer.from_dir(tmp_path)
    _write_json(tmp_path / "tokenizer_config.json", {"eos_token_id": 1, "bos_token": 7})
    assert Tokenizer.from_dir(tmp_path).bos_token_id is None  # a non-string token entry is ignored


# --------------------------------------------------------------------------------------------- real model
@pytest.mark.real_model
def test_smollm2_matches_autotokenizer(request):
    """Our Tokenizer on the converted SmolLM2 directory equals transformers.AutoTokenizer on it."""
    if importlib.util.find_spec("finetune_ref.models.default_model") is None:
        pytest.skip("models/default_model.py (the SmolLM2 converter behind fixture smollm2_dir) is not there yet")
    path = request.getfixturevalue("smollm2_dir")
    ours = Tokenizer.from_dir(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoTokenizer.from_pretrained(str(path))
    assert (ours.bos_token_id, ours.eos_token_id, ours.vocab_size) == (1, 2, 49152)
    for text in TEXTS + [CORPUS[:5000]]:
        ids = ours.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    for messages in CONVERSATIONS:
        for gen in (False, True):
            text = ours.apply_chat_template(messages, add_generation_prompt=gen)
            assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        ids, labels = ours.encode_chat(messages)
        assert ids == hf.apply_chat_template(messages, tokenize=True, return_dict=False)
