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
