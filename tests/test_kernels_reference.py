"""The NF4 layout as the kernels read it, the pure-PyTorch references and the backend choice (no Triton needed).

Oracles: bitsandbytes' own quantize/dequantize (bitsandbytes 0.50.2, CPU), and the project's
pure-PyTorch quantizer ``qlora/nf4.py`` (the references must equal it bit for bit).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from finetune_ref import kernels
from finetune_ref.kernels import backend, reference
from finetune_ref.kernels.reference import check_input_grad_inputs, dequantize_absmax, dequantize_nf4
from finetune_ref.qlora.nf4 import NF4_CODE_VALUES, nf4_code
from finetune_ref.qlora.quant_state import NF4QuantState
from kernel_testing import nf4_row_slice, quantize_with_bnb, random_nf4_weight

bnbf = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is the oracle for the NF4 layout")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ODD_SHAPES = ((1, 1), (3, 5), (65, 67), (100, 300))


def _weight(shape, double_quant, blocksize=64, seed=0):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return w, *quantize_with_bnb(w, blocksize, double_quant)


# ---------------------------------------------------------------------------------- layout
def test_nf4_table_is_bitsandbytes_table():
    assert torch.equal(nf4_code(), bnbf.get_4bit_type("nf4", device="cpu"))
    assert len(NF4_CODE_VALUES) == 16 and NF4_CODE_VALUES[7] == 0.0


@pytest.mark.parametrize("double_quant", [False, True])
def test_bnb_quant_state_reads_as_ours_keeping_tensors(double_quant):
    w = torch.randn(65, 67)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    ours = NF4QuantState.from_dict(state.as_dict(packed=True))
    assert ours.shape == (65, 67) and ours.blocksize == 64 and ours.nested == double_quant
    assert ours.absmax is state.absmax
    assert ours.num_blocks == -(-65 * 67 // 64)
    if double_quant:
        assert ours.nested_absmax is state.state2.absmax and torch.equal(ours.nested_quant_map, state.state2.code)
        assert ours.nested_blocksize == 256


def test_layout_rejects_bad_tensors():
    _, packed, st = _weight((10, 64), double_quant=True)
    fields = dict(shape=st.shape, dtype=st.dtype, blocksize=64, absmax=st.absmax, quant_map=st.quant_map,
                  nested_absmax=st.nested_absmax, nested_quant_map=st.nested_quant_map, offset=st.offset)
    NF4QuantState(**fields)  # the good one builds
    bad_states = [
        (dict(absmax=st.absmax.float()), TypeError, "absmax must be torch.uint8"),
        (dict(blocksize=63), ValueError, "blocksize must be one of"),
        (dict(blocksize=0), ValueError, "blocksize must be one of"),
        (dict(shape=(10, 0)), ValueError, "has no elements"),
        (dict(offset=None), ValueError, "together"),
        (dict(quant_map=torch.zeros(15)), ValueError, "quant_map must have shape"),
        (dict(nested_absmax=None, nested_quant_map=None, offset=None), TypeError, "absmax must be torch.float32"),
        (dict(quant_map=st.quant_map.to("meta")), ValueError, "one device"),
    ]
    for change, error, message in bad_states:
        with pytest.raises(error, match=message):
            NF4QuantState(**{**fields, **change})
    bad_packed = [
        (packed.float(), TypeError, "must be a uint8 tensor"),
        (packed[:-1], ValueError, "has 319 bytes but shape .* packs into 320"),
    ]
    for bad, error, message in bad_packed:
        with pytest.raises(error, match=message):
            reference.check_packed(bad, st)
    # bitsandbytes' own QuantState is not taken for ours: the error says how to convert it.
    bnb_packed, bnb_state = bnbf.quantize_4bit(torch.randn(10, 64), blocksize=64, quant_type="nf4")
    with pytest.raises(TypeError, match="NF4QuantState.from_dict"):
        dequantize_nf4(bnb_packed, bnb_state)
    pytest.importorskip("triton", reason="the contiguity check lives in the Triton module")
    from finetune_ref.kernels.nf4_dequant import nf4_pointer_args

    with pytest.raises(ValueError, match="contiguous"):  # the kernels index the tensors as flat arrays
        nf4_pointer_args(torch.zeros(640, dtype=torch.uint8)[::2], st)


def test_from_quant_state_rejects_fp4():
    packed, state = bnbf.quantize_4bit(torch.randn(4, 64), blocksize=64, quant_type="fp4")
    with pytest.raises(ValueError, match="only nf4"):
        NF4QuantState.from_dict(state.as_dict(packed=True))


def test_bits_per_weight():
    _, _, plain = _weight((256, 4096), double_quant=False)
    _, _, nested = _weight((256, 4096), double_quant=True)
    n = 256 * 4096
    maps = 16 * 4  # the NF4 table, stored once per tensor
    assert (plain.storage_nbytes(include_quant_maps=True) - maps) * 8 / n == pytest.approx(4.5)
    nbytes = nested.storage_nbytes(include_quant_maps=True)
    assert (nbytes - maps - 256 * 4 - 4) * 8 / n == pytest.approx(4 + 8 / 64 + 32 / (64 * 256))


# ---------------------------------------------------------------------------------- references
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(64, 128), (3, 64), (100, 192)])
def test_reference_dequant_equals_bitsandbytes(shape, double_quant):
    # Last dims that are multiples of 64: bnb's native CPU dequantize is wrong on some others.
    w = torch.randn(shape)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    ours = NF4QuantState.from_dict(state.as_dict(packed=True))
    assert torch.equal(dequantize_nf4(packed, ours, torch.float32), bnbf.dequantize_4bit(packed, state))
    absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset if double_quant else state.absmax
    assert torch.equal(dequantize_absmax(ours), absmax)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", ODD_SHAPES + ((7, 1000),))
def test_reference_dequant_equals_the_formula_on_qlora_nf4_data(shape, double_quant, dtype):
    from finetune_ref.qlora import nf4
    w = torch.randn(shape)
    packed, state = nf4.quantize_nf4(w, blocksize=64, double_quant=double_quant)
    # The fast byte -> pair gather against the definition, element by element: quant_map[code] * absmax[block].
    n = w.numel()
    codes = nf4.unpack_nibbles(packed, n).long()  # (n,)
    absmax = dequantize_absmax(state).repeat_interleave(64)[:n]  # (n,) fp32
    expected = (state.quant_map[codes] * absmax).to(dtype).view(shape)
    assert torch.equal(dequantize_nf4(packed, state, dtype), expected)
    # ... and the same bytes come from bitsandbytes, so the two layouts are one.
    assert torch.equal(packed, quantize_with_bnb(w, 64, double_quant)[0])


def test_reference_dequant_blocks_straddle_rows():
    # 3x45 with blocksize 32 (the smallest bitsandbytes allows): 5 blocks, each but the first starting
    # inside a row, the last partial, an odd count (a padding nibble); checked element by element.
    codes = torch.randint(0, 16, (135,), dtype=torch.uint8)
    padded = torch.cat([codes, torch.tensor([7], dtype=torch.uint8)])
    packed = ((padded[0::2] << 4) | padded[1::2]).view(-1, 1)  # (68, 1)
    absmax = torch.rand(5) + 0.5
    state = NF4QuantState(shape=(3, 45), dtype=torch.float32, blocksize=32, absmax=absmax, quant_map=nf4_code())
    expected = torch.tensor([NF4_CODE_VALUES[c] * absmax[i // 32].item() for i, c in enumerate(codes.tolist())])
    torch.testing.assert_close(dequantize_nf4(packed, state).view(-1), expected, rtol=1e-6, atol=0)


def test_pair_table_is_built_once_and_follows_its_quant_map():
    # The byte -> pair table is cached per distinct map (by its values): reused while the map is unchanged, and a
    # map changed by any route, even one autograd does not see (.data, numpy), gets its own table; a stale table
    # would dequantize silently wrong.
    _, packed, state = _weight((8, 64), double_quant=True)
    table = reference.pair_table(state.quant_map)
    assert reference.pair_table(state.quant_map.clone()) is table
    halves = table.view(torch.float32).view(16, 16, 2)  # (256,) int64 -> (512,) fp32 -> (high nibble, low, pair)
    assert torch.equal(halves[:, :, 0], state.quant_map[:, None].expand(16, 16))
    assert torch.equal(halves[:, :, 1], state.quant_map[None, :].expand(16, 16))
    before = dequantize_nf4(packed, state)
    with torch.no_grad():
        state.quant_map.mul_(2)
    assert torch.equal(dequantize_nf4(packed, state), before * 2)  # exact: a power of two
    state.quant_map.data.mul_(2)  # no version counter bump
    assert torch.equal(dequantize_nf4(packed, state), before * 4)
    state.quant_map.numpy()[:] /= 4
    assert torch.equal(dequantize_nf4(packed, state), before)
    with torch.inference_mode():
        frozen = state.quant_map.clone()
        assert torch.equal(reference.pair_table(frozen), table)
    assert torch.equal(dequantize_nf4(packed, state), before)  # a table made in inference mode, used outside it


def test_nf4_linear_traces_without_graph_breaks():
    # torch.compile (--compile) traces the CPU reference path whole: the table cache is skipped while tracing.
    from finetune_ref.qlora.nf4_linear import NF4Linear

    torch._dynamo.reset()
    layer = NF4Linear.from_linear(torch.nn.Linear(64, 32), compute_dtype=torch.float32)
    x = torch.randn(4, 64, requires_grad=True)
    assert torch._dynamo.explain(layer)(x).graph_break_count == 0
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matmuls_equal_dense_ops(dtype):
    _, packed, state = _weight((65, 67), double_quant=True)
    dense = dequantize_nf4(packed, state, dtype)
    x = torch.randn(2, 3, 67).to(dtype)
    bias = torch.randn(65).to(dtype)
    assert torch.equal(reference.nf4_matmul(x, packed, state, bias), F.linear(x, dense, bias))
    dy = torch.randn(2, 3, 65).to(dtype)
    assert torch.equal(reference.nf4_matmul_input_grad(dy, packed, state), dy @ dense)


def test_matmul_input_errors():
    # Checked where the op is entered (kernels.nf4_linear, the Triton wrappers), not in the references.
    _, packed, state = _weight((8, 64), double_quant=False)
    with pytest.raises(ValueError, match="in_features=64"):
        kernels.nf4_linear(torch.randn(2, 63), packed, state)
    with pytest.raises(TypeError, match="x.dtype"):
        kernels.nf4_linear(torch.randn(2, 64).double(), packed, state)
    with pytest.raises(TypeError, match="bias must be torch.float16"):
        kernels.nf4_linear(torch.randn(2, 64).half(), packed, state, torch.randn(8))
    with pytest.raises(ValueError, match="bias must be a tensor of shape"):
        kernels.nf4_linear(torch.randn(2, 64), packed, state, torch.randn(7))
    with pytest.raises(ValueError, match="out_features=8"):
        check_input_grad_inputs(torch.randn(2, 9), packed, state)
    with pytest.raises(TypeError, match="uint8"):
        kernels.nf4_linear(torch.randn(2, 64), packed.float(), state)
    with pytest.raises(ValueError, match="2-D"):
        flat_packed, flat = _weight((128,), double_quant=False)[1:]
        kernels.nf4_linear(torch.randn(1, 128), flat_packed, flat)


@pytest.mark.parametrize("double_quant", [False, True])
def test_row_slices_dequantize_like_the_whole(double_quant):
    # The helper the GPU benchmark uses to check huge weights piece by piece.
    packed, state = random_nf4_weight((2 * 256 + 3, 3 * 64), double_quant)
    full = dequantize_nf4(packed, state)
    for start, stop in ((0, 3), (256, 515), (0, 515)):
        assert torch.equal(dequantize_nf4(*nf4_row_slice(packed, state, start, stop)), full[start:stop])
    with pytest.raises(ValueError, match="not a multiple of"):
        nf4_row_slice(packed, state, 1, 5) if double_quant else nf4_row_slice(*make_odd(), 1, 2)
    with pytest.raises(ValueError, match="not inside"):
        nf4_row_slice(packed, state, 3, 600)


def make_odd():
    return random_nf4_weight((4, 65), double_quant=False)


def test_state_is_duck_typed():
    # The kernels never import NF4QuantState: any object with its attributes will do.
    _, packed, state = _weight((9, 70), double_quant=True)
    names = ("shape", "dtype", "blocksize", "absmax", "quant_map", "nested", "offset", "nested_absmax",
             "nested_quant_map", "nested_blocksize", "numel", "num_blocks")
    duck = type("Duck", (), {n: getattr(state, n) for n in names})()
    assert not isinstance(duck, NF4QuantState)
    assert torch.equal(dequantize_nf4(packed, duck), dequantize_nf4(packed, state))


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


def test_nf4_linear_uses_reference_on_cpu(clean_backend):
    # Even with Triton installed and the interpreter on, "auto" keeps CPU tensors on PyTorch.
    clean_backend.setenv("TRITON_INTERPRET", "1")
    _, packed, state = _weight((9, 70), double_quant=True)
    x = torch.randn(4, 70, requires_grad=True)
    dy = torch.randn(4, 9)
    clean_backend.setattr("finetune_ref.kernels.nf4_autograd._triton_kernels", _fail)
    y = kernels.nf4_linear(x, packed, state)
    assert torch.equal(y, reference.nf4_matmul(x.detach(), packed, state))
    y.backward(dy)
    assert torch.equal(x.grad, reference.nf4_matmul_input_grad(dy, packed, state))


def _fail(*args, **kwargs):
    raise AssertionError("the Triton path was taken for CPU tensors under backend 'auto'")


def _layouts(values: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same values (B, T, K) in memory layouts a model hands the op: each equal to ``values``."""
    B, T, K = values.shape
    offset = torch.empty(B * T * K + 1, dtype=values.dtype)[1:].view(B, T, K)  # contiguous, misaligned start
    offset.copy_(values)
    wide = torch.empty(B, T, 2 * K, dtype=values.dtype)
    wide[..., ::2] = values
    return {
        "transposed": values.transpose(0, 1).contiguous().transpose(0, 1),  # (B, T, K) with T outermost in memory
        "strided": wide[..., ::2],  # every other element of a wider buffer
        "permuted": values.permute(2, 0, 1).contiguous().permute(1, 2, 0),  # K outermost in memory
        "column_major": values.reshape(B * T, K).t().contiguous().t(),  # (M, K) in Fortran order
        "offset": offset,
    }


@pytest.mark.parametrize("dtype", DTYPES)
def test_nf4_matmul_reference_is_independent_of_memory_layout(dtype):
    """Same values, same bits: forward and input gradient of the CPU reference (and the autograd op over it)."""
    _, packed, state = _weight((1536, 576), double_quant=True)  # SmolLM2 up_proj
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 24, 576, generator=g).to(dtype)
    dy = torch.randn(4, 24, 1536, generator=g).to(dtype)
    y_ref = reference.nf4_matmul(x, packed, state)
    dx_ref = reference.nf4_matmul_input_grad(dy, packed, state)
    for name, xl in _layouts(x).items():
        assert torch.equal(xl, x.reshape(xl.shape))
        assert torch.equal(reference.nf4_matmul(xl, packed, state), y_ref.reshape(*xl.shape[:-1], 1536)), name
    for name, dyl in _layouts(dy).items():
        out = reference.nf4_matmul_input_grad(dyl, packed, state)
        assert torch.equal(out, dx_ref.reshape(*dyl.shape[:-1], 576)), name
    # Through autograd (NF4Linear's path): a transposed activation and its contiguous copy, both directions.
    xt = _layouts(x)["transposed"].requires_grad_(True)
    xc = x.clone().requires_grad_(True)
    yt, yc = kernels.nf4_linear(xt, packed, state), kernels.nf4_linear(xc, packed, state)
    assert torch.equal(yt, yc)
    yt.backward(_layouts(dy)["permuted"])
    yc.backward(dy)
    assert torch.equal(xt.grad, xc.grad)
