"""NF4 + double quantization against bitsandbytes (byte-exact expected) and torchao's NF4Tensor (known to differ).

Compared, for each weight: the packed bytes (bitsandbytes) or the 4-bit codes (torchao, which packs the same
way but stores no padding), the stored absmax (8-bit codes under double quantization), the nested absmax and
offset, the absmax each side dequantizes with, and the dequantized weight. Against bitsandbytes the
dequantization is compared twice: with its pure-PyTorch path (what its CPU backend computes where its
native kernel is right) and with its public ``dequantize_4bit`` on the edge class where the native CPU kernel
is wrong (last dimension even and not a multiple of the blocksize).
"""

from __future__ import annotations

import torch

from finetune_ref.kernels.reference import dequantize_absmax, dequantize_nf4
from finetune_ref.parity import oracles
from finetune_ref.parity.metrics import divergence, dtype_name
from finetune_ref.parity.report import Row, make_row
from finetune_ref.qlora.nf4 import quantize_nf4, unpack_nibbles

# (shape, blocksize): odd counts, blocks straddling rows, 1-D, > 256 blocks, a non-default blocksize
BNB_CASES = [((65, 67), 64), ((7,), 64), ((300, 257), 128), ((64, 128), 64), ((128, 96), 64)]
# Shapes where bitsandbytes' public dequantize_4bit runs its native CPU kernel (even last dim): (128, 96) is
# the edge class it gets wrong, (64, 128) one it gets right. (An odd last dim falls back to the pure path.)
NATIVE_CASES = {(64, 128), (128, 96)}
# torchao needs numel divisible by blocksize * scaler blocksize (64 * 256)
TORCHAO_CASES = [((128, 128), 64), ((256, 192), 64)]


def _row(check, case, peer, ours, theirs, must_be_bitwise=False) -> Row:
    return make_row(check, case, peer, dtype_name(theirs.dtype), divergence(ours, theirs), must_be_bitwise)


def against_bnb(w: torch.Tensor, blocksize: int, case: str, native: bool) -> list[Row]:
    """Rows for ``w`` quantized by us and by bitsandbytes with double quantization."""
    packed, state = quantize_nf4(w, blocksize, double_quant=True)
    packed_ref, qs = oracles.bnb_quantize_nf4(w, blocksize, double_quant=True)
    rows = [
        _row("nf4.packed", case, "bnb", packed, packed_ref, True),
        _row("nf4.absmax_codes", case, "bnb", state.absmax, qs.absmax, True),
        _row("nf4.nested_absmax", case, "bnb", state.nested_absmax, qs.state2.absmax, True),
        _row("nf4.offset", case, "bnb", state.offset, qs.offset, True),
        _row("nf4.absmax", case, "bnb", dequantize_absmax(state), oracles.bnb_absmax(qs), True),
        _row("nf4.dequantized", case, "bnb", dequantize_nf4(packed, state), oracles.bnb_dequantize_pure(packed_ref, qs),
             True),
    ]
    if native:
        rows.append(_row("nf4.dequantized_native", case, "bnb", dequantize_nf4(packed, state),
                         oracles.bnb_dequantize_native(packed_ref, qs).reshape(w.shape)))
    return rows


def against_torchao(w: torch.Tensor, blocksize: int, case: str) -> list[Row]:
    """Rows for ``w`` quantized by us (bitsandbytes' format) and by torchao's NF4Tensor."""
    packed, state = quantize_nf4(w, blocksize, double_quant=True)
    t = oracles.torchao_nf4(w, blocksize)
    ours_deq = dequantize_nf4(packed, state)
    return [
        _row("nf4.codes", case, "torchao", unpack_nibbles(packed, w.numel()),
             unpack_nibbles(t.quantized_data, w.numel())),
        _row("nf4.absmax", case, "torchao", dequantize_absmax(state), oracles.torchao_absmax(t)),
        _row("nf4.dequantized", case, "torchao", ours_deq, t.get_original_weight()),
    ]


def check_nf4(peers: set[str], dtype: torch.dtype, real_weights: dict[str, torch.Tensor]) -> list[Row]:
    """NF4 rows on tiny random shapes and on the real model's weights given (name -> tensor)."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    if "bnb" in peers:
        for shape, blocksize in BNB_CASES:
            w = (0.05 * torch.randn(shape, generator=gen)).to(dtype)
            rows += against_bnb(w, blocksize, f"{shape} bs{blocksize}", shape in NATIVE_CASES)
        for name, w in real_weights.items():
            rows += against_bnb(w.to(dtype), 64, f"SmolLM2 {name}", native=True)
    if "torchao" in peers:
        for shape, blocksize in TORCHAO_CASES:
            w = (0.05 * torch.randn(shape, generator=gen)).to(dtype)
            rows += against_torchao(w, blocksize, f"{shape} bs{blocksize}")
        for name, w in real_weights.items():
            if w.numel() % (64 * 256) == 0:
                rows += against_torchao(w.to(dtype), 64, f"SmolLM2 {name}")
    return rows
