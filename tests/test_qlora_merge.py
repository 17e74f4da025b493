"""Merging QLoRA adapters (qlora/merge.py): the three bases, their errors, and ``finetune merge`` / ``quantize``.

What each variant must give, exactly (fp32, so any difference is a real error, not rounding noise):
  nf4-dequant          W = dequant(NF4) + scaling * B @ A, i.e. the unmerged QLoRA model up to fp32 rounding;
  original             W = W_orig + scaling * B @ A, and layers without an adapter are W_orig itself;
  requantize="nf4"     the merged weight quantized again; layers without an adapter keep their NF4 codes.
The variants' errors against the unmerged model are ordered: nf4-dequant is rounding-level, the others carry
a quantization error.
"""

import json
import shutil

import pytest
import torch

from finetune_ref.cli.main import main
from finetune_ref.lora import LoraConfig, load_adapters, merge_and_unload, save_adapter, unmerge_adapters
from finetune_ref.lora.base_weight import RequantizationWarning
from finetune_ref.lora.layer import LoRALinear
from finetune_ref.lora.functional import lora_delta_weight
from finetune_ref.models.loader import load_model
from finetune_ref.qlora.merge import check_original_matches, dequantize_model, merge_qlora, merge_report
from finetune_ref.qlora.bnb_config import is_quantized_dir
from finetune_ref.qlora.model import load_quantized, nf4_layers, prepare_qlora_model
from finetune_ref.qlora.nf4 import quantize_nf4
from finetune_ref.qlora.nf4_linear import NF4Linear

# One decoder layer keeps the many (re-)quantizations of these tests fast; GQA and every projection are there.
CONFIG = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=10000.0)
TARGETS = ["q_proj", "v_proj", "up_proj"]


def save_hf_tiny(path, seed=0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**{**CONFIG, **overrides})).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def fp_dir(tmp_path_factory):
    return save_hf_tiny(tmp_path_factory.mktemp("fp"))


def qlora_model(model_dir, seed=0):
    """fp32 everywhere; init_lora_weights=False gives non-zero B (a trained-looking adapter), scaled down."""
    torch.manual_seed(seed)
    model = prepare_qlora_model(model_dir, lora_config=LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                  init_lora_weights=False),
                                compute_dtype=torch.float32, adapter_dtype=torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(0.1)
    return model


def heldout(n=3, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": (ids := torch.randint(0, CONFIG["vocab_size"], (2, 16), generator=g)), "labels": ids}
            for _ in range(n)]


def delta(qlora, name):
    layer = qlora.get_submodule(name)
    return lora_delta_weight(layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"])


def test_merge_variants_are_exact_and_report_their_errors(fp_dir):
    qlora = qlora_model(fp_dir)
    original = load_model(fp_dir, dtype=torch.float32)
    batches = heldout()
    before = [qlora(**b).logits.detach().clone() for b in batches]
    adapted, plain = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"
    base_nf4 = qlora.get_submodule(adapted + ".base_layer")
    untouched_nf4 = qlora.get_submodule(plain)

    merged = {}
    merged["nf4-dequant"] = merge_qlora(qlora)
    w = merged["nf4-dequant"].get_submodule(adapted).weight
    assert type(merged["nf4-dequant"].get_submodule(adapted)) is torch.nn.Linear
    assert torch.equal(w, base_nf4.dequantize(torch.float32) + delta(qlora, adapted))
    assert torch.equal(merged["nf4-dequant"].get_submodule(plain).weight, untouched_nf4.dequantize(torch.float32))

    merged["original"] = merge_qlora(qlora, base="original", original=fp_dir)
    assert torch.equal(merged["original"].get_submodule(adapted).weight,
                       original.get_submodule(adapted).weight + delta(qlora, adapted))
    assert torch.equal(merged["original"].get_submodule(plain).weight, original.get_submodule(plain).weight)

    for base in ("nf4-dequant", "original"):
        m = merge_qlora(qlora, base=base, original=fp_dir if base == "original" else None, requantize="nf4")
        merged[base + "+nf4"] = m
        layer, kept = m.get_submodule(adapted), m.get_submodule(plain)
        assert isinstance(layer, NF4Linear) and isinstance(kept, NF4Linear)
        # Unadapted layers keep the QLoRA base's codes (for "original": re-quantizing the original gives them).
        assert torch.equal(kept.weight, untouched_nf4.weight) and torch.equal(kept.absmax, untouched_nf4.absmax)
        source = base_nf4.dequantize(torch.float32) if base == "nf4-dequant" else original.get_submodule(adapted).weight
        packed, state = quantize_nf4(source + delta(qlora, adapted))
        assert torch.equal(layer.weight, packed) and torch.equal(layer.absmax, state.absmax)

    reports = {k: merge_report(qlora, m, batches) for k, m in merged.items()}
    assert reports["nf4-dequant"]["logits_max_abs"] <= 1e-5  # fp32 rounding only
    assert abs(reports["nf4-dequant"]["loss_change"]) <= 1e-6
    for k in ("original", "nf4-dequant+nf4", "original+nf4"):
        assert reports[k]["logits_max_abs"] > 100 * reports["nf4-dequant"]["logits_max_abs"], k
        assert reports[k]["logits_max_abs"] < 1.0 and abs(reports[k]["loss_change"]) < 0.05, k
    # The QLoRA model itself was not changed by any of this.
    for b, logits in zip(batches, before):
        torch.testing.assert_close(qlora(**b).logits, logits, rtol=0, atol=0)


def test_merge_into_bf16_rounds_once_and_keeps_rope_in_fp32(fp_dir):
    qlora = qlora_model(fp_dir)
    merged = merge_qlora(qlora, dtype=torch.bfloat16)
    name = "model.layers.0.mlp.up_proj"
    expected = (qlora.get_submodule(name + ".base_layer").dequantize(torch.float32) + delta(qlora, name))
    assert torch.equal(merged.get_submodule(name).weight, expected.to(torch.bfloat16))
    assert merged.model.embed_tokens.weight.dtype == torch.bfloat16
    assert merged.model.rotary_emb.inv_freq.dtype == torch.float32


def test_wrong_original_and_bad_arguments_are_errors(fp_dir, tmp_path):
    qlora = qlora_model(fp_dir)
    other = save_hf_tiny(tmp_path / "other", seed=7)
    with pytest.raises(ValueError, match="reproduces only"):
        merge_qlora(qlora, base="original", original=other)
    with pytest.raises(ValueError, match="config differs"):
        merge_qlora(qlora, base="original", original=save_hf_tiny(tmp_path / "eps", rms_norm_eps=1e-6))
    assert check_original_matches(qlora, load_model(fp_dir)) == 1.0
    with pytest.raises(ValueError, match="needs the original"):
        merge_qlora(qlora, base="original")
    with pytest.raises(ValueError, match="base must be one of"):
        merge_qlora(qlora, base="dense")
    with pytest.raises(ValueError, match="requantize must be one of"):
        merge_qlora(qlora, requantize="int8")
    with pytest.raises(ValueError, match="no LoRA adapter"):
        merge_qlora(load_quantized(fp_dir))


def test_lora_merge_on_an_nf4_base_requantizes_and_unmerge_restores_the_bytes():
    """The extension point in lora.layer: merging into an NF4 base dequantizes, adds, re-quantizes (as PEFT, with
    a RequantizationWarning); unmerging puts back the stored bytes from before the merge."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 64)
    base = NF4Linear.from_linear(linear, compute_dtype=torch.float32)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    layer = LoRALinear(base)
    layer.add_adapter("default", r=2, lora_alpha=4, init_lora_weights=False)
    layer.set_adapter("default")
    with torch.no_grad():
        layer.lora_B["default"].weight.mul_(0.1)  # an update small against W, as a trained adapter's
    d = layer.get_delta_weight("default")
    dense = base.dequantize()
    with pytest.warns(RequantizationWarning, match="kept"):
        layer.merge()
    packed, state = quantize_nf4(dense + d)
    assert layer.merged and torch.equal(base.weight, packed) and torch.equal(base.absmax, state.absmax)
    assert torch.equal(base.bias, linear.bias)  # the bias is carried over, unquantized
    layer.unmerge()
    assert not layer.merged
    assert all(torch.equal(v, original[k]) for k, v in base.state_dict().items())


def test_dequantize_model_replaces_every_nf4_layer(fp_dir):
    model = dequantize_model(load_quantized(fp_dir, dtype=torch.float32), torch.float32)
    assert not nf4_layers(model)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "layers" in n and "proj" in n)


# ---------------------------------------------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def cli_dirs(tmp_path_factory, smollm2_dir):
    """A tiny model with SmolLM2's tokenizer (so the held-out report can tokenize), a 4-bit copy, an adapter."""
    root = tmp_path_factory.mktemp("cli")
    fp = save_hf_tiny(root / "fp", vocab_size=49152)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(smollm2_dir / name, fp / name)
    q4 = root / "q4"
    assert main(["quantize", "--model", str(fp), "--out", str(q4), "--compute-dtype", "fp32"]) == 0
    assert is_quantized_dir(q4) and (q4 / "tokenizer.json").is_file()
    model = qlora_model(q4)
    save_adapter(model, root / "adapter", base_model_name_or_path=str(q4))
    from pydoc_data.topics import topics

    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(topics[k] for k in ("assert", "pass", "del", "return", "global")))
    return fp, q4, root / "adapter", corpus


@pytest.mark.real_model  # reads the converted SmolLM2 directory's tokenizer
def test_cli_merge_qlora_variants(cli_dirs, tmp_path, capsys):
    fp, q4, adapter, corpus = cli_dirs
    data = ["--data", str(corpus), "--seq-len", "32", "--eval-fraction", "0.3", "--report-batches", "2"]
    assert main(["merge", "--model", str(q4), "--adapter", str(adapter), "--out", str(tmp_path / "m1"), *data]) == 0
    out = capsys.readouterr().out
    assert "nf4-dequant base" in out and "logits max-abs" in out
    assert float(out.split("logits max-abs ")[1].split(",")[0]) <= 1e-4
    merged = load_model(tmp_path / "m1")
    assert not nf4_layers(merged) and (tmp_path / "m1" / "tokenizer.json").is_file()

    assert main(["merge", "--model", str(q4), "--adapter", str(adapter), "--out", str(tmp_path / "m2"),
                 "--base", "original", "--original", str(fp), "--requantize", "nf4", *data]) == 0
    out = capsys.readouterr().out
    assert "re-quantized (nf4)" in out
    # The drift it prints is the library's warning, measured once (lora.base_weight.requantization_drift).
    model = load_quantized(q4, compute_dtype="fp32", dtype="fp32")
    load_adapters(model, [adapter], adapter_dtype=torch.float32)
    with pytest.warns(RequantizationWarning) as record:
        merge_qlora(model, base="original", original=fp, dtype="fp32", requantize="nf4")
    assert f"warning: {record[0].message}" in out
    assert json.loads((tmp_path / "m2" / "config.json").read_text())["quantization_config"]["load_in_4bit"]
    assert len(nf4_layers(load_quantized(tmp_path / "m2"))) == 7

    # A 16/32-bit --model with --base: quantized as in training, then merged (the same result as from q4).
    assert main(["merge", "--model", str(fp), "--adapter", str(adapter), "--out", str(tmp_path / "m3"),
                 "--base", "nf4-dequant", "--report-batches", "0"]) == 0
    a, b = load_model(tmp_path / "m1"), load_model(tmp_path / "m3")
    assert all(torch.equal(p, b.state_dict()[k]) for k, p in a.state_dict().items())

    assert main(["merge", "--model", str(q4), "--adapter", str(adapter), "--out", str(tmp_path / "m4"),
                 "--base", "original"]) == 2
    assert "needs --original" in capsys.readouterr().err
    assert main(["merge", "--model", str(q4), "--adapter", str(adapter), "--out", str(tmp_path / "m5"),
                 "--original", str(fp)]) == 2
    assert "only used with --base original" in capsys.readouterr().err


def test_merge_and_unload_on_a_qlora_model_is_the_requantized_merge(fp_dir):
    qlora = qlora_model(fp_dir)
    expected = merge_qlora(qlora, requantize="nf4")
    plain = merge_and_unload(qlora)  # lora's own merge, through the NF4 accessor
    for (name, a), (_, b) in zip(nf4_layers(plain), nf4_layers(expected)):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.absmax, b.absmax), name
    assert unmerge_adapters(plain) == []
