"""NF4 inputs from the edges: quantization constants in 16 bits, settings of the wrong type, already-packed
input, and blocks too small for bitsandbytes' scaling rule.

Oracle: bitsandbytes' ``QuantState.from_dict`` reads the offset as ``float32(nested_offset)``; dequantized
values are compared bitwise (a 16-bit offset is exactly representable in fp32, so nothing may change).
"""

import json

import pytest
import torch

from finetune_ref.kernels.reference import dequantize_nf4
from finetune_ref.qlora.bnb_format import from_bnb_state_dict, to_bnb_state_dict
from finetune_ref.qlora.nf4 import quantize_nf4
from finetune_ref.qlora.nf4_linear import NF4Linear
from finetune_ref.qlora.quant_state import PACKED_STATE_KEY, NF4QuantState


def nested_state():
    torch.manual_seed(0)
    return quantize_nf4(torch.randn(16, 64), blocksize=64, double_quant=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quant_state_reads_16bit_offset_as_float32(dtype):
    packed, state = nested_state()
    offset16 = state.offset.to(dtype)
    as_fp32 = offset16.float()
    fields = dict(shape=state.shape, dtype=state.dtype, blocksize=state.blocksize, absmax=state.absmax,
                  quant_map=state.quant_map, nested_absmax=state.nested_absmax,
                  nested_quant_map=state.nested_quant_map)
    # 1. The constructor.
    built = NF4QuantState(**fields, offset=offset16)
    assert built.offset.dtype == torch.float32 and built.offset.shape == () and torch.equal(built.offset, as_fp32)
    # 2. from_dict, unpacked (bitsandbytes' QuantState.as_dict(packed=False) layout), offset as a 16-bit tensor.
    unpacked = {**state.to_dict(packed=False), "nested_offset": offset16}
    read = NF4QuantState.from_dict(unpacked)
    assert read.offset.dtype == torch.float32 and torch.equal(read.offset, as_fp32)
    # 3. A 4-bit checkpoint whose JSON lacks nested_offset and stores it as its own 16-bit tensor entry.
    entries = to_bnb_state_dict(packed, state, prefix="proj.")
    meta = json.loads(bytes(entries[f"proj.weight.{PACKED_STATE_KEY}"].tolist()))
    del meta["nested_offset"]
    entries[f"proj.weight.{PACKED_STATE_KEY}"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    entries["proj.weight.nested_offset"] = offset16.reshape(1)
    _, from_file, _ = from_bnb_state_dict(entries, "proj.")
    assert torch.equal(from_file.offset, as_fp32)
    layer = NF4Linear(torch.zeros_like(packed), state, compute_dtype=torch.float32)
    layer.load_state_dict({k.removeprefix("proj."): v for k, v in entries.items()})
    assert layer.offset.dtype == torch.float32 and torch.equal(layer.offset, as_fp32)
    # The values: what bitsandbytes dequantizes with the same 16-bit offset.
    bnbF = pytest.importorskip("bitsandbytes.functional")
    qs = bnbF.QuantState.from_dict({**unpacked, "dtype": "float32", "shape": list(state.shape)}, device="cpu")
    assert qs.offset.dtype == torch.float32 and torch.equal(qs.offset, as_fp32)
    absmax_bnb = bnbF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    assert torch.equal(dequantize_nf4(packed, read), dequantize_nf4(packed, built))
    ours_absmax = state.nested_quant_map[state.absmax.long()] * state.nested_absmax[0] + as_fp32
    assert torch.equal(ours_absmax, absmax_bnb)


@pytest.mark.parametrize("bad, error, match", [
    (torch.tensor([1, 2], dtype=torch.float16), TypeError, "one floating-point number"),
    (torch.tensor(3, dtype=torch.int32), TypeError, "one floating-point number"),
    (torch.tensor(float("nan"), dtype=torch.bfloat16), ValueError, "finite"),
    (float("inf"), ValueError, "finite"),
    ("0.5", TypeError, "finite number"),
    (True, TypeError, "finite number"),
])
def test_quant_state_still_refuses_malformed_offsets(bad, error, match):
    _, state = nested_state()
    unpacked = {**state.to_dict(packed=False), "nested_offset": bad}
    with pytest.raises(error, match=match):
        NF4QuantState.from_dict(unpacked)


# ---- settings and inputs that would pass a loose check

def test_float_blocksize_gets_one_clear_message():
    from finetune_ref.models.config import LlamaConfig
    from finetune_ref.models.llama import LlamaForCausalLM
    from finetune_ref.qlora.model import quantize_model

    w = torch.randn(4, 64)
    with pytest.raises(ValueError, match=r"blocksize must be an int, .*got 64\.0 \(float\); pass 64$"):
        quantize_nf4(w, blocksize=64.0)
    with pytest.raises(ValueError, match=r"blocksize must be an int, .*got True \(bool\)"):
        quantize_nf4(w, blocksize=True)
    with pytest.raises(ValueError, match=r"blocksize must be one of .*got 48"):
        quantize_nf4(w, blocksize=48)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=1, num_key_value_heads=1))
    with pytest.raises(ValueError, match=r"got 64\.0 \(float\); pass 64"):
        quantize_model(model, blocksize=64.0)
    _, state = quantize_nf4(w, double_quant=False)
    with pytest.raises(ValueError, match=r"got 64\.0 \(float\)"):
        NF4QuantState(shape=state.shape, dtype=state.dtype, blocksize=64.0, absmax=state.absmax,
                      quant_map=state.quant_map)


def test_packed_uint8_input_is_named_not_cast():
    packed, _ = quantize_nf4(torch.randn(8, 64))
    with pytest.raises(TypeError) as info:
        quantize_nf4(packed)
    message = str(info.value)
    assert "already-quantized codes" in message and "dequantize_nf4" in message
    assert ".float()" not in message  # casting the bytes to float would quantize the codes as numbers


# ---- blocks below bitsandbytes' 1e-38 floor

TINY_SCALES = (1e-37, 1e-38, 5e-39, 1e-39, 3e-40, 1e-40, 1e-44, 0.0, 1.0)


def tiny_blocks(blocksize: int = 64, tail: float | None = None) -> torch.Tensor:
    """One block per scale, its largest |value| exactly the scale (a subnormal for the small ones)."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for s in TINY_SCALES:
        b = torch.randn(blocksize, generator=g)
        rows.append(b / b.abs().max() * s)
    flat = torch.cat(rows)
    if tail is not None:  # a partial last block of 10 elements
        b = torch.randn(10, generator=g)
        flat = torch.cat([flat, b / b.abs().max() * tail])
    return flat


def block_max(flat: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    return torch.stack([c.abs().max() for c in flat.split(blocksize)])


@pytest.mark.parametrize("double_quant", [False, True])
def test_subnormal_blocks_default_is_bitsandbytes_and_loses_them(double_quant):
    bnbF = pytest.importorskip("bitsandbytes.functional")
    w = tiny_blocks()
    packed, state = quantize_nf4(w, double_quant=double_quant)
    ref_packed, ref_state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    assert torch.equal(packed.view(-1), ref_packed.view(-1))
    assert torch.equal(state.absmax, ref_state.absmax)
    if not double_quant:  # the documented loss: 1e-40 and 1e-44 blocks come back as zeros
        back = block_max(dequantize_nf4(packed, state))
        assert back[TINY_SCALES.index(1e-40)] == 0 and back[TINY_SCALES.index(1e-44)] == 0
        assert back[TINY_SCALES.index(1e-39)] < 0.2 * 1e-39


@pytest.mark.parametrize("tail", [None, 2e-41, 0.0, 0.5])
def test_scale_floor_none_reproduces_the_max_element_of_every_block(tail):
    w = tiny_blocks(tail=tail)
    packed, state = quantize_nf4(w, double_quant=False, scale_floor=None)
    back = dequantize_nf4(packed, state)
    assert torch.equal(block_max(back), block_max(w))  # exactly, subnormals and zero blocks included
    # Blocks at or above the floor get bitsandbytes' bytes in both modes.
    default, _ = quantize_nf4(w, double_quant=False)
    normal = [i for i, s in enumerate(TINY_SCALES) if s >= 1e-38]
    for i in normal:
        assert torch.equal(packed.view(-1)[32 * i:32 * (i + 1)], default.view(-1)[32 * i:32 * (i + 1)]), i
    with pytest.raises(ValueError, match="scale_floor"):
        quantize_nf4(w, scale_floor=1e-30)
