"""Whole-model NF4 (qlora/model.py): quantize while loading, save/load in transformers+bitsandbytes' layout.

Oracle: transformers loading the same tiny random checkpoint with a ``BitsAndBytesConfig`` (NF4, double
quant) on CPU. Both sides quantize the same tensors with the same rules, so packed bytes, absmax, nested
absmax, offset and the JSON quant state are compared exactly, and logits (fp32 compute) with zero tolerance
except where noted. Every ``in_features`` is a multiple of 64, where bitsandbytes' native CPU dequantize is
right (it is wrong e.g. for (128, 96): tests/test_nf4.py::test_bnb_native_cpu_dequantize_bug_is_documented), and ``support_avx512bf16_for_cpu = False`` keeps
bitsandbytes from repacking weights on AVX512-BF16 CPUs.
"""

import json
import shutil
import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file

import finetune_ref.models.loader as loader
from finetune_ref.cli.main import main
from finetune_ref.lora import LoraConfig
from finetune_ref.models.config import LlamaConfig as OurConfig
from finetune_ref.models.llama import LlamaForCausalLM as OurLlama
from finetune_ref.qlora.bnb_config import BnbQuantizationConfig
from finetune_ref.qlora.model import (load_quantized, nf4_layers, prepare_qlora_model, quantize_model, quantized_nbytes,
                                      save_quantized)
from finetune_ref.qlora.nf4_linear import NF4Linear
from finetune_ref.parity import oracles

LINEAR_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj", "mlp.down_proj")
TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=10000.0)


def hf_tiny(seed=0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides})).eval()


def hf_load_4bit(path, double_quant=True, dtype=torch.float32):
    """transformers + bitsandbytes 4-bit load on CPU, fp32 compute, AVX512-BF16 repacking off."""
    return oracles.hf_4bit(path, torch.float32, dtype, double_quant=double_quant)


@pytest.fixture(scope="module")
def fp_dir(tmp_path_factory):
    """A tiny random Llama saved by transformers in fp32."""
    path = tmp_path_factory.mktemp("fp")
    hf_tiny().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_4bit_dir(tmp_path_factory, fp_dir):
    """The same model quantized by transformers+bitsandbytes and saved (the 4-bit layout we must read)."""
    path = tmp_path_factory.mktemp("hf4")
    hf_load_4bit(fp_dir).save_pretrained(path)
    return path


def input_ids(seed=1, shape=(2, 12)):
    return torch.randint(0, TINY["vocab_size"], shape, generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def assert_same_nf4_state(ours, ref_state_dict, prefix):
    """Our NF4Linear's bitsandbytes entries equal the reference state dict's, bytes and JSON."""
    mine = ours.state_dict()
    for key, value in mine.items():
        assert torch.equal(value, ref_state_dict[prefix + key]), prefix + key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_while_loading_equals_transformers_bitsandbytes(fp_dir, dtype):
    ours = load_quantized(fp_dir, compute_dtype=torch.float32, dtype=dtype)
    ref = hf_load_4bit(fp_dir, dtype=dtype)
    ref_state = ref.state_dict()
    names = [n for n, _ in nf4_layers(ours)]
    assert names == [f"model.layers.{i}.{n}" for i in range(2) for n in LINEAR_NAMES]  # not embeddings/lm_head
    for name, layer in nf4_layers(ours):
        assert layer.compute_dtype == torch.float32 and layer.quant_state.dtype == dtype
        assert_same_nf4_state(layer, ref_state, name + ".")
    assert ours.model.embed_tokens.weight.dtype == dtype and ours.lm_head.weight is ours.model.embed_tokens.weight
    if dtype == torch.float32:  # fp32 everywhere: the same operations in the same order, bit for bit
        torch.testing.assert_close(logits(ours, input_ids()), logits(ref, input_ids()), rtol=0, atol=0)


def test_our_4bit_directory_loads_in_transformers_with_the_same_logits(fp_dir, tmp_path):
    ours = load_quantized(fp_dir, compute_dtype=torch.float32, dtype=torch.float32)
    out = save_quantized(ours, tmp_path / "q")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_use_double_quant"] is True
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"
    keys = set(load_file(out / "model.safetensors"))
    assert "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4" in keys
    assert "lm_head.weight" not in keys  # tied
    ref = hf_load_4bit(out)
    import bitsandbytes as bnb

    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in ref.modules()) == 14
    torch.testing.assert_close(logits(ref, input_ids()), logits(ours, input_ids()), rtol=0, atol=0)


def test_transformers_4bit_directory_loads_into_ours_and_resaves_identically(hf_4bit_dir, tmp_path):
    ours = load_quantized(hf_4bit_dir, compute_dtype=torch.float32, dtype=torch.float32)
    ref = hf_load_4bit(hf_4bit_dir)
    torch.testing.assert_close(logits(ours, input_ids()), logits(ref, input_ids()), rtol=0, atol=0)
    out = save_quantized(ours, tmp_path / "again")
    theirs, mine = load_file(hf_4bit_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(mine) == set(theirs)
    for key in theirs:
        assert mine[key].dtype == theirs[key].dtype and torch.equal(mine[key], theirs[key]), key
    their_config = json.loads((hf_4bit_dir / "config.json").read_text())["quantization_config"]
    my_config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert my_config == their_config


def test_blocksize_and_double_quant_settings_round_trip_and_conflicts_are_errors(fp_dir, tmp_path):
    # blocksize 32 (not 128): bitsandbytes' native CPU dequantize is wrong when in_features (64 here) is not a
    # multiple of the blocksize (tests/test_nf4.py), so a 128 block would make transformers, not us, differ.
    ours = load_quantized(fp_dir, blocksize=32, double_quant=False, compute_dtype=torch.float32, dtype=torch.float32)
    assert all(layer.blocksize == 32 and not layer.double_quant for _, layer in nf4_layers(ours))
    out = save_quantized(ours, tmp_path / "plain")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bnb_4bit_use_double_quant"] is False
    ref = hf_load_4bit(out, double_quant=False)
    torch.testing.assert_close(logits(ref, input_ids()), logits(ours, input_ids()), rtol=0, atol=0)
    big = save_quantized(load_quantized(fp_dir, blocksize=128, compute_dtype=torch.float32, dtype=torch.float32),
                         tmp_path / "b128")
    again = load_quantized(big, compute_dtype=torch.float32, dtype=torch.float32)
    assert all(layer.blocksize == 128 and layer.double_quant for _, layer in nf4_layers(again))
    with pytest.raises(ValueError, match="double_quant=False"):
        load_quantized(out, double_quant=True)
    with pytest.raises(ValueError, match="blocksize 128"):
        load_quantized(big, blocksize=64)
    with pytest.raises(ValueError, match="blocksize must be one of"):
        load_quantized(fp_dir, blocksize=48)


def _copy_dir(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_checkpoint(path, fn):
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_loading_is_strict(hf_4bit_dir, tmp_path):
    key = "model.layers.1.mlp.up_proj.weight"
    for i, suffix in enumerate([".nested_absmax", ".absmax", ".quant_state.bitsandbytes__nf4", ".quant_map"]):
        bad = _copy_dir(hf_4bit_dir, tmp_path / f"missing{i}")
        _edit_checkpoint(bad, lambda t: t.pop(key + suffix))
        with pytest.raises(ValueError, match="lacks quantization entries") as info:
            load_quantized(bad)
        assert key + suffix in str(info.value)
    extra = _copy_dir(hf_4bit_dir, tmp_path / "extra")
    _edit_checkpoint(extra, lambda t: t.update({"model.layers.0.mlp.extra": torch.zeros(2)}))
    with pytest.raises(ValueError, match="unexpected tensors .*model.layers.0.mlp.extra"):
        load_quantized(extra)
    no_config = _copy_dir(hf_4bit_dir, tmp_path / "noconfig")
    config = json.loads((no_config / "config.json").read_text())
    del config["quantization_config"]
    (no_config / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no quantization_config"):
        load_quantized(no_config)
    for field, value, message in [("bnb_4bit_quant_type", "fp4", "only 'nf4'"),
                                  ("quant_method", "gptq", "only 'bitsandbytes'"),
                                  ("bnb_4bit_quant_storage", "bfloat16", "only 'uint8'")]:
        config = json.loads((hf_4bit_dir / "config.json").read_text())
        config["quantization_config"][field] = value
        bad = _copy_dir(hf_4bit_dir, tmp_path / f"cfg_{field}")
        (bad / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=message):
            load_quantized(bad)
    shape = _copy_dir(hf_4bit_dir, tmp_path / "shape")
    config = json.loads((shape / "config.json").read_text())
    config["intermediate_size"] = 192
    (shape / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="shape"):
        load_quantized(shape)


def test_non_finite_weight_is_named(fp_dir, tmp_path):
    bad = _copy_dir(fp_dir, tmp_path / "nan")
    _edit_checkpoint(bad, lambda t: t["model.layers.1.self_attn.o_proj.weight"].__setitem__((3, 4), float("nan")))
    with pytest.raises(ValueError, match="model.layers.1.self_attn.o_proj.weight"):
        load_quantized(bad)


def test_loading_reads_one_layer_at_a_time_and_keeps_no_file_tensor(fp_dir, monkeypatch):
    """Peak memory: never the whole model in 16/32-bit. Each read is one decoder layer (or the rest), and no
    tensor read from the file (a view of its memory map) survives in the model."""
    reads, refs = [], []
    original = loader.read_tensors

    def spy(files, names):
        out = original(files, names)
        reads.append(sorted(names))
        refs.extend(weakref.ref(t) for t in out.values())
        return out

    monkeypatch.setattr(loader, "read_tensors", spy)
    model = load_quantized(fp_dir, dtype=torch.float32)
    assert len(reads) == TINY["num_hidden_layers"] + 1
    for i in range(TINY["num_hidden_layers"]):
        assert all(n.startswith(f"model.layers.{i}.") for n in reads[i])
    assert not any(n.startswith("model.layers.") for n in reads[-1])
    assert all(r() is None for r in refs), "a tensor read from the checkpoint is still referenced"
    assert model.model.embed_tokens.weight.dtype == torch.float32


def build_our_model(hidden, intermediate, layers=1, seed=0):
    torch.manual_seed(seed)
    config = OurConfig(vocab_size=64, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=True)
    return OurLlama(config)


@pytest.mark.parametrize("double_quant,nominal", [(True, 4.127 / 8), (False, 4.5 / 8)])
def test_measured_bytes_per_parameter(double_quant, nominal):
    model = quantize_model(build_our_model(512, 1536), double_quant=double_quant)
    report = quantized_nbytes(model)
    assert report["parameters"] == 4 * 512 * 512 + 3 * 512 * 1536
    # Measured: every byte of packed codes, absmax, nested absmax, offset and both maps of each layer.
    assert report["bytes_per_parameter"] == pytest.approx(nominal, rel=0.01)
    assert nf4_layers(model)[0][1].quant_state.bits_per_parameter() == pytest.approx(nominal * 8, abs=1e-3)


def test_in_memory_quantization_equals_quantize_while_loading(fp_dir):
    from finetune_ref.models.loader import load_model

    dense = load_model(fp_dir, dtype=torch.float32)
    quantized = quantize_model(dense, compute_dtype=torch.float32)
    loaded = load_quantized(fp_dir, compute_dtype=torch.float32, dtype=torch.float32)
    for (name, a), (_, b) in zip(nf4_layers(quantized), nf4_layers(loaded)):
        for key, value in a.state_dict().items():
            assert torch.equal(value, b.state_dict()[key]), f"{name}.{key}"
    with pytest.raises(ValueError, match="tied"):
        quantize_model(load_model(fp_dir), skip_modules=())
    with pytest.raises(ValueError, match="LoRA"):
        quantize_model(prepare_qlora_model(fp_dir, lora_config=LoraConfig(target_modules=["q_proj"])))


def test_prepare_qlora_model_dtypes_and_a_training_step(fp_dir):
    model = prepare_qlora_model(fp_dir, lora_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    layers = nf4_layers(model)
    assert len(layers) == 14 and all(layer.compute_dtype == torch.bfloat16 for _, layer in layers)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16  # dtype defaults to compute_dtype
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if n in trainable)
    before = {n: layer.weight.clone() for n, layer in layers}
    ids = input_ids()
    model.train()
    out = model(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    optimizer.step()
    assert all(torch.equal(layer.weight, before[n]) for n, layer in layers)  # the 4-bit base is frozen
    # B starts at zero, so only B has a gradient on the first step (dL/dA = scaling * B^T ...).
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in lora_b)
    assert all(p.abs().sum() > 0 for p in lora_b)  # the step moved every B off zero


def test_quantization_config_parsing():
    assert BnbQuantizationConfig.from_dict(BnbQuantizationConfig().to_dict()) == BnbQuantizationConfig()
    with pytest.raises(ValueError, match="8-bit"):
        BnbQuantizationConfig.from_dict({"quant_method": "bitsandbytes", "load_in_8bit": True})
    with pytest.raises(ValueError, match="JSON object"):
        BnbQuantizationConfig.from_dict(["nf4"])


def test_cli_quantize_writes_a_4bit_directory(fp_dir, tmp_path, capsys):
    out = tmp_path / "cli4"
    assert main(["quantize", "--model", str(fp_dir), "--out", str(out), "--compute-dtype", "fp32"]) == 0
    assert "bytes/parameter" in capsys.readouterr().out
    loaded = load_quantized(out, compute_dtype=torch.float32, dtype=torch.float32)
    direct = load_quantized(fp_dir, compute_dtype=torch.float32, dtype=torch.float32)
    torch.testing.assert_close(logits(loaded, input_ids()), logits(direct, input_ids()), rtol=0, atol=0)
    assert isinstance(loaded.model.layers[0].mlp.down_proj, NF4Linear)
    assert main(["quantize", "--model", str(out), "--out", str(tmp_path / "again")]) == 2
    assert "already 4-bit" in capsys.readouterr().err
