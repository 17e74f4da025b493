"""The NF4 layout checks, the pure-PyTorch references and the backend choice (no Triton needed).

Oracles: bitsandbytes' own quantize/dequantize (bitsandbytes 0.50.2, CPU), and the project's
pure-PyTorch quantizer ``qlora/nf4.py`` (the references must equal it bit for bit).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from finetune_ref import kernels
from finetune_ref.kernels import backend
from finetune_ref.kernels.nf4_dequant import dequantize_absmax_reference, dequantize_nf4, dequantize_nf4_reference
from finetune_ref.kernels.nf4_layout import NF4_VALUES, NF4Weight, nf4_quant_map
from finetune_ref.kernels.nf4_matmul_forward import nf4_matmul, nf4_matmul_reference
from finetune_ref.kernels.nf4_matmul_backward import nf4_matmul_input_grad, nf4_matmul_input_grad_reference
from finetune_ref.kernels.testing import nf4_row_slice, quantize_with_bnb, random_nf4_weight

bnbf = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is the oracle for the NF4 layout")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ODD_SHAPES = ((1, 1), (3, 5), (65, 67), (100, 300))


def _weight(shape, double_quant, blocksize=64, seed=0) -> tuple[torch.Tensor, NF4Weight]:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return w, quantize_with_bnb(w, blocksize, double_quant)


# ---------------------------------------------------------------------------------- layout
def test_nf4_table_is_bitsandbytes_table():
    assert torch.equal(nf4_quant_map(), bnbf.get_4bit_type("nf4", device="cpu"))
    assert len(NF4_VALUES) == 16 and NF4_VALUES[7] == 0.0


@pytest.mark.parametrize("double_quant", [False, True])
def test_from_bnb_quant_state_keeps_tensors(double_quant):
    w = torch.randn(65, 67)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    nw = NF4Weight.from_quant_state(packed, state)
    assert nw.shape == (65, 67) and nw.blocksize == 64 and nw.double_quant == double_quant
    assert nw.packed is packed and nw.absmax is state.absmax
    assert nw.n_blocks == -(-65 * 67 // 64)
    if double_quant:
        assert nw.nested_absmax is state.state2.absmax and nw.nested_quant_map is state.state2.code
        assert nw.nested_blocksize == 256


def test_layout_rejects_bad_tensors():
    _, nw = _weight((10, 64), double_quant=True)
    fields = dict(packed=nw.packed, absmax=nw.absmax, shape=nw.shape, blocksize=64, quant_map=nw.quant_map,
                  nested_absmax=nw.nested_absmax, nested_quant_map=nw.nested_quant_map, offset=nw.offset)
    NF4Weight(**fields)  # the good one builds
    bad_cases = [
        (dict(packed=nw.packed.float()), TypeError, "packed must be torch.uint8"),
        (dict(packed=nw.packed[:-1]), ValueError, "packed must have 320 elements"),
        (dict(absmax=nw.absmax.float()), TypeError, "absmax must be torch.uint8"),
        (dict(blocksize=63), ValueError, "must be even"),
        (dict(blocksize=0), ValueError, "positive int"),
        (dict(shape=(10, 0)), ValueError, "positive ints"),
        (dict(offset=None), ValueError, "also needs nested_quant_map and offset"),
        (dict(quant_map=torch.zeros(15)), ValueError, "quant_map must have 16"),
        (dict(nested_absmax=None, nested_quant_map=None, offset=None), TypeError, "absmax must be torch.float32"),
        (dict(packed=torch.zeros(640, dtype=torch.uint8)[::2]), ValueError, "contiguous"),
        (dict(quant_map=nw.quant_map.to("meta")), ValueError, "one device"),
    ]
    for change, error, message in bad_cases:
        with pytest.raises(error, match=message):
            NF4Weight(**{**fields, **change})


def test_from_quant_state_rejects_fp4():
    packed, state = bnbf.quantize_4bit(torch.randn(4, 64), blocksize=64, quant_type="fp4")
    with pytest.raises(ValueError, match="quant_type must be 'nf4'"):
        NF4Weight.from_quant_state(packed, state)


def test_bits_per_weight():
    _, plain = _weight((256, 4096), double_quant=False)
    _, nested = _weight((256, 4096), double_quant=True)
    n = 256 * 4096
    maps = 16 * 4  # the NF4 table, stored once per tensor
    assert (plain.nbytes() - maps) * 8 / n == pytest.approx(4.5)
    assert (nested.nbytes() - maps - 256 * 4 - 4) * 8 / n == pytest.approx(4 + 8 / 64 + 32 / (64 * 256))


# ---------------------------------------------------------------------------------- references
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(64, 128), (3, 64), (100, 192)])
def test_reference_dequant_equals_bitsandbytes(shape, double_quant):
    # Last dims that are multiples of 64: bnb's native CPU dequantize is wrong on some others.
    w = torch.randn(shape)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    nw = NF4Weight.from_quant_state(packed, state)
    assert torch.equal(dequantize_nf4_reference(nw, torch.float32), bnbf.dequantize_4bit(packed, state))
    absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset if double_quant else state.absmax
    assert torch.equal(dequantize_absmax_reference(nw), absmax)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", ODD_SHAPES + ((7, 1000),))
def test_reference_dequant_equals_qlora_nf4(shape, double_quant, dtype):
    nf4 = pytest.importorskip("finetune_ref.qlora.nf4", reason="the project quantizer qlora/nf4.py is not written yet")
    w = torch.randn(shape)
    packed, state = nf4.quantize_nf4(w, blocksize=64, double_quant=double_quant)
    nw = NF4Weight.from_quant_state(packed, state)
    assert torch.equal(dequantize_nf4_reference(nw, dtype), nf4.dequantize_nf4(packed, state, dtype))
    # ... and the same bytes come from bitsandbytes, so the two layouts are one.
    assert torch.equal(packed, quantize_with_bnb(w, 64, double_quant).packed)


def test_reference_dequant_blocks_straddle_rows():
    # 3x5 with blocksize 2 (even, not bnb's) checked element by element against the definition.
    codes = torch.randint(0, 16, (15,), dtype=torch.uint8)
    padded = torch.cat([codes, torch.tensor([7], dtype=torch.uint8)])
    packed = ((padded[0::2] << 4) | padded[1::2]).view(-1, 1)  # (8, 1)
    absmax = torch.rand(8) + 0.5
    nw = NF4Weight(packed=packed, absmax=absmax, shape=(3, 5), blocksize=2)
    expected = torch.tensor([NF4_VALUES[c] * absmax[i // 2].item() for i, c in enumerate(codes.tolist())])
    torch.testing.assert_close(dequantize_nf4_reference(nw).view(-1), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matmuls_equal_dense_ops(dtype):
    _, nw = _weight((65, 67), double_quant=True)
    dense = dequantize_nf4_reference(nw, dtype)
    x = torch.randn(2, 3, 67).to(dtype)
    bias = torch.randn(65).to(dtype)
    assert torch.equal(nf4_matmul_reference(x, nw, bias), F.linear(x, dense, bias))
    dy = torch.randn(2, 3, 65).to(dtype)
    assert torch.equal(nf4_matmul_input_grad_reference(dy, nw), dy @ dense)


def test_reference_matmul_errors():
    _, nw = _weight((8, 64), double_quant=False)
    with pytest.raises(ValueError, match="in_features=64"):
        nf4_matmul_reference(torch.randn(2, 63), nw)
    with pytest.raises(TypeError, match="x.dtype"):
        nf4_matmul_reference(torch.randn(2, 64).double(), nw)
    with pytest.raises(TypeError, match="bias must be torch.float16"):
        nf4_matmul_reference(torch.randn(2, 64).half(), nw, torch.randn(8))
    with pytest.raises(ValueError, match="bias must be a tensor of shape"):
        nf4_matmul_reference(torch.randn(2, 64), nw, torch.randn(7))
    with pytest.raises(ValueError, match="out_features=8"):
        nf4_matmul_input_grad_reference(torch.randn(2, 9), nw)
    with pytest.raises(TypeError, match="NF4Weight"):
        dequantize_nf4_reference(nw.packed)
    with pytest.raises(TypeError, match="dtype must be one of"):
        dequantize_nf4_reference(nw, torch.float64)
    with pytest.raises(ValueError, match="2-D"):
        _, flat = _weight((128,), double_quant=False)
        nf4_matmul_reference(torch.randn(1, 128), flat)


@pytest.mark.parametrize("double_quant", [False, True])
def test_row_slices_dequantize_like_the_whole(double_quant):
    # The helper the GPU benchmark uses to check huge weights piece by piece.
    nw = random_nf4_weight((2 * 256 + 3, 3 * 64), double_quant)
    full = dequantize_nf4_reference(nw)
    for start, stop in ((0, 3), (256, 515), (0, 515)):
        assert torch.equal(dequantize_nf4_reference(nf4_row_slice(nw, start, stop)), full[start:stop])
    with pytest.raises(ValueError, match="not a multiple of"):
        nf4_row_slice(nw, 1, 5) if double_quant else nf4_row_slice(make_odd(), 1, 2)
    with pytest.raises(ValueError, match="not inside"):
        nf4_row_slice(nw, 3, 600)


def make_odd() -> NF4Weight:
    return random_nf4_weight((4, 65), double_quant=False)


# ---------------------------------------------------------------------------------- backend choice
@pytest.fixture
def clean_backend(monkeypatch):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    backend.set_backend(None)
    yield monkeypatch
    backend.set_backend(None)


def test_backend_setting_order(clean_backend):
    assert kernels.get_backend() == "auto"
    clean_backend.setenv("KERNELS_BACKEND", "torch")
    assert kernels.get_backend() == "torch"  # read at call time
    kernels.set_backend("TRITON")
    assert kernels.get_backend() == "triton"  # explicit choice beats the environment
    with kernels.use_backend("auto"):
        assert kernels.get_backend() == "auto"
    assert kernels.get_backend() == "triton"
    kernels.set_backend(None)
    assert kernels.get_backend() == "torch"


def test_backend_rejects_unknown_names(clean_backend):
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.set_backend("cuda")
    clean_backend.setenv("KERNELS_BACKEND", "fast")
    with pytest.raises(ValueError, match="KERNELS_BACKEND"):
        kernels.get_backend()


def test_resolve_backend_on_cpu(clean_backend):
    x = torch.zeros(1)
    assert kernels.resolve_backend(x) == "torch"  # auto: CPU tensors take the reference
    kernels.set_backend("torch")
    assert kernels.resolve_backend(x) == "torch"
    kernels.set_backend("triton")
    clean_backend.setenv("TRITON_INTERPRET", "0")
    if kernels.triton_available():
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            kernels.resolve_backend(x)
        clean_backend.setenv("TRITON_INTERPRET", "1")
        assert kernels.resolve_backend(x) == "triton"
    clean_backend.setattr(backend, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="not installed"):
        kernels.resolve_backend(x)


def test_dispatchers_use_reference_on_cpu(clean_backend):
    # Even with Triton installed and the interpreter on, "auto" keeps CPU tensors on PyTorch.
    clean_backend.setenv("TRITON_INTERPRET", "1")
    _, nw = _weight((9, 70), double_quant=True)
    x = torch.randn(4, 70)
    dy = torch.randn(4, 9)
    for name in ("dequantize_nf4_triton", "nf4_matmul_triton", "nf4_matmul_input_grad_triton"):
        module = {"dequantize_nf4_triton": "finetune_ref.kernels.nf4_dequant", "nf4_matmul_triton": "finetune_ref.kernels.nf4_matmul_forward",
                  "nf4_matmul_input_grad_triton": "finetune_ref.kernels.nf4_matmul_backward"}[name]
        clean_backend.setattr(f"{module}.{name}", _fail)
    assert torch.equal(dequantize_nf4(nw), dequantize_nf4_reference(nw))
    assert torch.equal(nf4_matmul(x, nw), nf4_matmul_reference(x, nw))
    assert torch.equal(nf4_matmul_input_grad(dy, nw), nf4_matmul_input_grad_reference(dy, nw))
    out = torch.empty(9, 70)
    assert dequantize_nf4(nw, out=out) is out and torch.equal(out, dequantize_nf4_reference(nw))


def _fail(*args, **kwargs):
    raise AssertionError("the Triton path was taken for CPU tensors under backend 'auto'")
