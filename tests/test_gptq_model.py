"""Whole-model GPTQ (gptq/model.py, gptq/checkpoint.py; calibration data from cli/merge.py): layer-by-layer
calibration, RTN, save/load, calibration data.

The layer-by-layer property is checked directly: after quantization, every layer's Hessian is collected again
from the *quantized* model (plain forward hooks, same batches) and GPTQ is re-run on the *original* weight;
the codes must equal the model's bitwise. That holds only if each layer was calibrated on the outputs of the
already-quantized layers before it (and, inside a layer, of the already-quantized q/k/v, o, gate/up), and
padding positions were left out, as the paper's sequential procedure prescribes.
"""

import copy
import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from finetune_ref.train.data import collate
from finetune_ref.models.config import LlamaConfig
from finetune_ref.models.llama import LlamaForCausalLM
from finetune_ref.gptq.gptq import HessianAccumulator, gptq_quantize, rtn_quantize
from finetune_ref.gptq.format import GPTQConfig
from finetune_ref.cli.merge import calibration_batches, calibration_examples
from finetune_ref.gptq.model import gptq_dequantize_model, gptq_nbytes, gptq_quantize_model
from finetune_ref.gptq.linear import gptq_layers
from finetune_ref.gptq.checkpoint import is_gptq_dir, load_gptq_model, read_gptq_config, save_gptq_model

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-5)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides})).eval()


def ragged_examples(n=12, seed=1):
    """Examples of different lengths (so batches carry padding) and two documents each."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        T = 20 + 3 * i
        ids = torch.randint(0, TINY["vocab_size"], (T,), generator=g)
        doc = (torch.arange(T) >= T // 2).long()
        pos = torch.where(doc == 0, torch.arange(T), torch.arange(T) - T // 2)
        out.append({"input_ids": ids, "labels": ids.clone(), "position_ids": pos, "document_ids": doc})
    return out


def recollect_hessians(model, examples, batch_size):
    """name -> H of every GPTQLinear's inputs in a plain forward of the (quantized) model, padding excluded."""
    accs, handles, current = {}, [], {}
    for name, layer in gptq_layers(model):
        accs[name] = HessianAccumulator(layer.in_features)
        handles.append(layer.register_forward_pre_hook(
            lambda m, args, name=name: accs[name].add_batch(args[0][current["tokens"]])))
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            b = collate(examples[i:i + batch_size], pad_token_id=0)
            current["tokens"] = b["attention_mask"].bool()
            model(b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"],
                  document_ids=b["document_ids"])
    for h in handles:
        h.remove()
    return {name: acc.hessian() for name, acc in accs.items()}


@pytest.mark.parametrize("desc_act,bits", [(False, 4), (True, 3)])
def test_layer_by_layer_through_quantized_layers(desc_act, bits):
    original = tiny_model()
    model = copy.deepcopy(original)
    examples = ragged_examples()
    config = GPTQConfig(bits=bits, group_size=32, desc_act=desc_act)
    stats = {}
    assert gptq_quantize_model(model, calibration_batches(examples, 5), config, stats=stats) is model
    names = [name for name, _ in gptq_layers(model)]
    assert names == [f"model.layers.{i}.{n}" for i in range(2) for n in LINEARS]
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    hessians = recollect_hessians(model, examples, batch_size=5)
    real_tokens = sum(len(e["input_ids"]) for e in examples)
    for name in names:
        assert stats[name]["tokens"] == real_tokens  # padding excluded
        expected = gptq_quantize(original.get_submodule(name).weight, hessians[name], bits, 32, act_order=desc_act)
        got = model.get_submodule(name).quantized_weight()
        assert torch.equal(got.codes, expected.codes), name
        assert torch.equal(got.g_idx, expected.g_idx), name
    # GPTQ lowers the calibration objective of the model's layers as a whole.
    layers = [n for n in stats if n != "seconds"]
    assert sum(stats[n]["error_gptq"] for n in layers) < 0.9 * sum(stats[n]["error_rtn"] for n in layers)


def test_without_true_sequential_a_layer_is_calibrated_on_its_unquantized_self():
    original = tiny_model()
    examples = ragged_examples(6)
    seq = gptq_quantize_model(copy.deepcopy(original), calibration_batches(examples), GPTQConfig(group_size=32))
    flat = gptq_quantize_model(copy.deepcopy(original), calibration_batches(examples),
                               GPTQConfig(group_size=32, true_sequential=False))
    codes = {name: [dict(gptq_layers(m))[name].quantized_weight().codes for m in (seq, flat)]
             for name, _ in gptq_layers(seq)}
    for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):  # same inputs either way
        a, b = codes[f"model.layers.0.{n}"]
        assert torch.equal(a, b), n
    a, b = codes["model.layers.0.self_attn.o_proj"]  # its input came through quantized q/k/v only in `seq`
    assert not torch.equal(a, b)


def test_rtn_model_is_per_layer_rtn():
    original = tiny_model()
    model = gptq_quantize_model(copy.deepcopy(original), None, GPTQConfig(group_size=64, method="rtn", sym=True))
    for name, layer in gptq_layers(model):
        expected = rtn_quantize(original.get_submodule(name).weight, 4, 64, sym=True)
        assert torch.equal(layer.quantized_weight().codes, expected.codes)
        assert torch.equal(layer.dequantize(), expected.dequantize())
    size = gptq_nbytes(model)
    # 4 bits per weight plus per 64-weight group one fp16 scale and one 4-bit zero, plus 4 bytes of g_idx per input.
    assert size["parameters"] == 2 * (64 * 64 * 2 + 64 * 32 * 2 + 64 * 128 * 3)
    assert 4 + 20 / 64 < size["bits_per_parameter"] < 4.9


@pytest.mark.parametrize("tied", [True, False])
def test_save_load_round_trip(tmp_path, tied):
    model = tiny_model(tie_word_embeddings=tied)
    config = GPTQConfig(group_size=32, checkpoint_format="gptq")
    gptq_quantize_model(model, torch.randint(0, 128, (4, 24)), config)
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        logits = model(ids).logits
    save_gptq_model(model, tmp_path / "fp32", config, dtype="fp32")
    loaded = load_gptq_model(tmp_path / "fp32")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)  # fp32 dense parts: bitwise the same model
    for (name, a), (_, b) in zip(gptq_layers(model), gptq_layers(loaded)):
        for key in ("qweight", "qzeros", "scales", "g_idx"):
            assert torch.equal(getattr(a, key), getattr(b, key)), f"{name}.{key}"

    out = save_gptq_model(model, tmp_path / "fp16", config)  # default: dense tensors in fp16, as GPTQ files are
    assert is_gptq_dir(out) and read_gptq_config(out) == config
    saved = json.loads((out / "config.json").read_text())
    assert saved["quantization_config"] == config.to_dict() and saved["torch_dtype"] == "float16"
    assert json.loads((out / "quantize_config.json").read_text()) == config.to_dict()
    with safe_open(out / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.0.self_attn.q_proj.qweight").dtype == torch.int32
        assert f.get_tensor("model.layers.0.self_attn.q_proj.scales").dtype == torch.float16
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float16
    assert "model.layers.1.mlp.down_proj.g_idx" in keys and "model.layers.1.mlp.down_proj.weight" not in keys
    assert ("lm_head.weight" in keys) != tied
    dense = gptq_dequantize_model(load_gptq_model(tmp_path / "fp32"))  # same numbers, plain nn.Linear
    assert not gptq_layers(dense) and type(dense.model.layers[0].mlp.down_proj) is nn.Linear
    with torch.no_grad():
        assert torch.equal(dense(ids).logits, logits)
    loaded16 = load_gptq_model(out, dtype="bf16")
    assert loaded16.model.embed_tokens.weight.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(loaded16(ids).logits.float(), logits, rtol=0, atol=0.05)  # bf16 rounding


def test_load_refuses_bad_directories(tmp_path):
    from safetensors.torch import load_file, save_file

    model = gptq_quantize_model(tiny_model(), None, GPTQConfig(group_size=32, method="rtn"))
    out = save_gptq_model(model, tmp_path / "m", GPTQConfig(group_size=32, method="rtn"))
    tensors = load_file(out / "model.safetensors")
    del tensors["model.layers.1.self_attn.o_proj.qzeros"]
    save_file(tensors, out / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.layers.1.self_attn.o_proj: missing GPTQ tensors \['qzeros'\]"):
        load_gptq_model(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 8
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError):
        load_gptq_model(out)
    del cfg["quantization_config"]
    (out / "config.json").write_text(json.dumps(cfg))
    assert read_gptq_config(out) == GPTQConfig(group_size=32, method="rtn")  # AutoGPTQ's quantize_config.json
    (out / "quantize_config.json").unlink()
    with pytest.raises(ValueError, match="no GPTQ quantization_config"):
        load_gptq_model(out)
    assert not is_gptq_dir(out)


def test_bad_settings_raise_clearly():
    with pytest.raises(ValueError, match=r"gate_proj.*out_features = 100 .* multiple of 8"):
        gptq_quantize_model(tiny_model(intermediate_size=100), None, GPTQConfig(group_size=32, method="rtn"))
    with pytest.raises(ValueError, match="only linear layers inside model.layers"):
        gptq_quantize_model(tiny_model(tie_word_embeddings=False), None, GPTQConfig(method="rtn"), skip_modules=())
    with pytest.raises(TypeError, match="calibration must be"):
        gptq_quantize_model(tiny_model(), None, GPTQConfig())
    with pytest.raises(TypeError, match="GPTQConfig"):
        gptq_quantize_model(tiny_model(), None, {"bits": 4})
    from finetune_ref import lora

    with_lora = tiny_model()
    lora.inject_lora(with_lora, lora.LoraConfig(r=2, target_modules="all-linear"))
    with pytest.raises(ValueError, match="merge them first"):
        gptq_quantize_model(with_lora, None, GPTQConfig(method="rtn"))
    with pytest.raises(ValueError, match="no GPTQLinear"):
        save_gptq_model(tiny_model(), "/nonexistent/never-written", GPTQConfig())
    model = gptq_quantize_model(tiny_model(), None, GPTQConfig(group_size=32, method="rtn"))
    with pytest.raises(ValueError, match="group_size 32"):
        save_gptq_model(model, "/nonexistent/never-written", GPTQConfig(group_size=128))


@pytest.mark.real_model
def test_smollm2_calibration_and_two_layers(smollm2_dir, tmp_path):
    """The default calibration data (training split of the default corpus) and GPTQ on two real layers."""
    from finetune_ref.train.data import build_datasets
    from finetune_ref.models.loader import load_model
    from finetune_ref.models.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(smollm2_dir)
    calib = calibration_examples(tokenizer, num_samples=8, seq_len=128)
    assert len(calib) == 8 and all(e["input_ids"].shape == (128,) for e in calib)
    assert all(torch.equal(a["input_ids"], b["input_ids"])
               for a, b in zip(calib, calibration_examples(tokenizer, num_samples=8, seq_len=128)))  # seeded
    train, held = build_datasets(tokenizer, None, seq_len=128)
    held_rows = {tuple(e["input_ids"].tolist()) for e in held}
    assert not any(tuple(e["input_ids"].tolist()) in held_rows for e in calib)  # never the held-out split
    text = tmp_path / "calib.txt"
    text.write_text("A short user calibration file. " * 200)
    user = calibration_examples(tokenizer, text, num_samples=1000, seq_len=64, eval_fraction=0.0)
    assert len(user) >= 10 and all(e["input_ids"].shape == (64,) for e in user)

    model = load_model(smollm2_dir, dtype=torch.float32)
    skip = [f"model.layers.{i}.{n}" for i in range(2, model.config.num_hidden_layers) for n in LINEARS]
    stats = {}
    gptq_quantize_model(model, calibration_batches(calib), GPTQConfig(), skip_modules=["lm_head", *skip], stats=stats)
    assert len(gptq_layers(model)) == 14
    for name, s in stats.items():
        if name != "seconds":
            assert s["error_gptq"] < s["error_rtn"], (name, s)  # real activations: GPTQ wins on every layer
    with torch.no_grad():
        assert bool(torch.isfinite(model(calib[0]["input_ids"][None]).logits).all())
