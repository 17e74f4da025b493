"""GPTQ, the algorithm (qlora/gptq.py): against RTN, against a straightforward reference, and its edge cases.

* On a small layer whose calibration inputs are correlated (so H = 2 X^T X / n has large off-diagonal
  terms), GPTQ's output error ||X W^T - X Q^T||^2 is clearly below round-to-nearest's on the same grid.
* With H = identity (or any diagonal H) GPTQ is RTN exactly: same codes, scales and zero points, bitwise.
* The lazy-batch / Cholesky implementation equals a direct transcription of the optimal-brain-surgeon update
  (GPTQ eq. 2-3 with H^-1 recomputed after removing each column), in float64: identical codes, for several
  block sizes, with groups and with activation order.

Tolerances: codes, zeros and scales are integers / fp16 values and are compared exactly; errors are compared
as ratios with a stated margin.
"""

import pytest
import torch

from finetune_ref.gptq.gptq import (HessianAccumulator, QuantizedWeight, find_params, gptq_quantize, output_error,
                        quantize_to_codes, rtn_quantize)


pytestmark = pytest.mark.usefixtures("one_thread")


def correlated_inputs(n, d, seed=0, dtype=torch.float32):
    """(n, d) inputs with strongly correlated features (a random mixing of a few latent factors plus noise)."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, d // 4, generator=g, dtype=torch.float64)
    mix = torch.randn(d // 4, d, generator=g, dtype=torch.float64)
    x = latent @ mix + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return x.to(dtype)


def hessian_of(x):
    acc = HessianAccumulator(x.shape[1], dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    acc.add_batch(x)
    return acc.hessian()


def assert_same_quantization(a: QuantizedWeight, b: QuantizedWeight):
    assert torch.equal(a.codes, b.codes)
    assert torch.equal(a.scales, b.scales)
    assert torch.equal(a.zeros, b.zeros)
    assert torch.equal(a.g_idx, b.g_idx)


def reference_gptq(W, H, bits, group_size, sym, act_order, damp_percent=0.01):
    """A direct transcription of the OBS update (no Cholesky, no lazy batches), in float64.

    For each column q in order: fit the group's grid when its first column comes up, quantize column q,
    spread err = (w_q - quant(w_q)) / Hinv[q, q] over the remaining columns with Hinv[q, rest], then remove
    q from Hinv (Hinv -= Hinv[:, q] Hinv[q, :] / Hinv[q, q]). Returns codes in the original column order.
    """
    W = W.double().clone()
    H = H.double().clone()
    n = W.shape[1]
    maxq = 2 ** bits - 1
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else torch.arange(n)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp_percent * torch.mean(torch.diagonal(H)) * torch.eye(n, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    g = n if group_size == -1 else group_size
    codes = torch.zeros_like(W)
    for q in range(n):
        if q % g == 0:
            scale, zero = find_params(W[:, q:q + g], bits, sym)
            scale, zero = scale.double(), zero.double()
        codes[:, q] = quantize_to_codes(W[:, q], scale, zero, maxq)
        err = (W[:, q] - scale * (codes[:, q] - zero)) / Hinv[q, q]
        W[:, q + 1:] -= err[:, None] * Hinv[q, q + 1:][None, :]
        Hinv = Hinv - Hinv[:, q:q + 1] @ Hinv[q:q + 1, :] / Hinv[q, q]
    out = torch.empty_like(codes)
    out[:, perm] = codes
    return out.to(torch.uint8)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group_size", [16, -1])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_below_rtn(bits, group_size, act_order):
    torch.manual_seed(0)
    W = torch.randn(48, 64)
    X = correlated_inputs(2048, 64)
    H = hessian_of(X)
    rtn = rtn_quantize(W, bits, group_size)
    gptq = gptq_quantize(W, H, bits, group_size, act_order=act_order)

    def err(q):
        return ((X @ W.t() - X @ q.dequantize().t()) ** 2).sum(1).mean().item()  # mean over tokens

    assert err(gptq) < 0.7 * err(rtn), (err(gptq), err(rtn))
    # output_error is the same quantity computed from H (= 2 X^T X / n): tr(dW H dW^T) / 2.
    for q in (rtn, gptq):
        assert output_error(W, q.dequantize(), H) == pytest.approx(err(q), rel=1e-4)


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("sym", [False, True])
def test_identity_hessian_gives_rtn_exactly(bits, group_size, sym):
    torch.manual_seed(1)
    W = torch.randn(24, 200) * 0.05
    rtn = rtn_quantize(W, bits, group_size, sym)
    for act_order in (False, True):
        assert_same_quantization(gptq_quantize(W, torch.eye(200), bits, group_size, sym, act_order), rtn)
    # Any diagonal H carries no error forward either. With act-order the groups are then formed in the order
    # of decreasing diag(H): RTN of the permuted columns, mapped back.
    diag = torch.diag(torch.rand(200) + 0.5)
    assert_same_quantization(gptq_quantize(W, diag, bits, group_size, sym), rtn)
    ordered = gptq_quantize(W, diag, bits, group_size, sym, act_order=True)
    rtn_perm = rtn_quantize(W[:, ordered.perm], bits, group_size, sym)
    assert torch.equal(ordered.codes[:, ordered.perm], rtn_perm.codes)
    assert torch.equal(ordered.scales, rtn_perm.scales) and torch.equal(ordered.zeros, rtn_perm.zeros)


@pytest.mark.parametrize("group_size,act_order,sym", [(-1, False, False), (16, False, False), (16, True, False),
                                                       (24, True, True)])
def test_matches_direct_obs_reference_in_float64(group_size, act_order, sym):
    torch.manual_seed(2)
    W = torch.randn(16, 96, dtype=torch.float64)
    H = hessian_of(correlated_inputs(1024, 96, seed=3, dtype=torch.float64))
    expected = reference_gptq(W, H, 4, group_size, sym, act_order)
    for blocksize in (1, 7, 32, 128):
        ours = gptq_quantize(W, H, 4, group_size, sym, act_order, blocksize=blocksize)
        assert torch.equal(ours.codes, expected), f"blocksize {blocksize}"


def test_act_order_g_idx_and_perm():
    torch.manual_seed(3)
    W = torch.randn(8, 64)
    H = hessian_of(correlated_inputs(512, 64, seed=4))
    q = gptq_quantize(W, H, 4, 16, act_order=True)
    expected_perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
    assert torch.equal(q.perm, expected_perm)
    assert torch.equal(q.g_idx[q.perm].long(), torch.arange(64) // 16)  # groups are consecutive in that order
    # Dequantize uses g_idx: every column's value is on its own group's grid.
    cols = q.dequantize()
    for i in range(64):
        g = int(q.g_idx[i])
        assert torch.equal(cols[:, i], q.scales[g] * (q.codes[:, i].float() - q.zeros[g].float()))


def test_hessian_accumulator_matches_formula_over_batches():
    x = correlated_inputs(300, 32, seed=5)
    acc = HessianAccumulator(32)
    for chunk in (x[:100].reshape(4, 25, 32), x[100:250], x[250:]):  # any leading shape
        acc.add_batch(chunk)
    assert acc.tokens == 300
    torch.testing.assert_close(acc.hessian(), 2 * x.t() @ x / 300, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="last dimension"):
        acc.add_batch(torch.randn(4, 31))
    with pytest.raises(ValueError, match="NaN"):
        acc.add_batch(torch.full((2, 32), float("nan")))
    with pytest.raises(ValueError, match="no calibration tokens"):
        HessianAccumulator(8).hessian()


def test_grid_properties():
    torch.manual_seed(6)
    w = torch.randn(64, 128)
    for bits in (3, 4, 8):
        maxq = 2 ** bits - 1
        scale, zero = find_params(w, bits)
        assert torch.equal(scale, scale.half().float())  # stored in fp16 exactly as used
        assert bool(((zero >= 0) & (zero <= maxq) & (zero == zero.round())).all())
        q = quantize_to_codes(w, scale, zero, maxq)
        deq = scale[:, None] * (q - zero[:, None])
        # Min-max grid: the error is at most half a step, plus what rounding the scale to fp16 (relative
        # 2^-11) takes off the ends of a maxq-step range.
        assert bool(((deq - w).abs() <= scale[:, None] * (0.5 + maxq * 2 ** -11) * (1 + 1e-5)).all())
    # An all-zero row stays exact; tiny weights give a positive scale (no division by zero) and round to 0.
    special = torch.stack([torch.zeros(16), torch.full((16,), 1e-9), torch.linspace(-1e-9, 1e-9, 16)])
    q = rtn_quantize(special, 4, -1)
    deq = q.dequantize()
    assert torch.equal(deq, torch.zeros(3, 16))
    assert bool((q.scales > 0).all())


def test_dead_inputs_keep_their_weights():
    torch.manual_seed(7)
    W = torch.randn(8, 32)
    X = correlated_inputs(256, 32, seed=8)
    X[:, 5] = 0  # input 5 never fires during calibration
    q = gptq_quantize(W, hessian_of(X), 4, 16)
    deq = q.dequantize()
    assert bool(torch.isfinite(deq).all())
    # Not zeroed (the reference zeroes it): still within a step of the original weight.
    assert bool(((deq[:, 5] - W[:, 5]).abs() <= q.scales[0] * 0.5 + 1e-6).all())


def test_odd_shapes_work():
    torch.manual_seed(9)
    W = torch.randn(7, 100)  # 100 columns: groups of 32, 32, 32 and a last one of 4
    H = hessian_of(correlated_inputs(400, 100, seed=10))
    for q in (rtn_quantize(W, 4, 32), gptq_quantize(W, H, 4, 32), gptq_quantize(W, H, 3, 32, act_order=True)):
        assert q.codes.shape == (7, 100) and q.scales.shape == (4, 7) and q.zeros.shape == (4, 7)
        assert torch.bincount(q.g_idx.long()).tolist() == [32, 32, 32, 4]
        assert bool(torch.isfinite(q.dequantize()).all())
    # A group larger than the block: group starts are still block starts.
    assert torch.equal(gptq_quantize(W.double(), H.double(), 4, 48, blocksize=16).codes,
                       gptq_quantize(W.double(), H.double(), 4, 48, blocksize=128).codes)


def test_bad_input_raises_clearly():
    W, H = torch.randn(4, 16), torch.eye(16)
    with pytest.raises(ValueError, match="bits must be one of"):
        gptq_quantize(W, H, bits=5)
    with pytest.raises(ValueError, match="group_size"):
        rtn_quantize(W, 4, group_size=0)
    with pytest.raises(ValueError, match="NaN or inf"):
        gptq_quantize(torch.full((4, 16), float("inf")), H)
    with pytest.raises(TypeError, match="floating"):
        rtn_quantize(torch.ones(4, 16, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\(16, 16\)"):
        gptq_quantize(W, torch.eye(15))
    with pytest.raises(ValueError, match="damp_percent"):
        gptq_quantize(W, H, damp_percent=2.0)
    with pytest.raises(ValueError, match="2-D"):
        rtn_quantize(torch.randn(16))
    singular = torch.ones(16, 16)  # rank 1: not positive definite without dampening
    with pytest.raises(ValueError, match="raise damp_percent"):
        gptq_quantize(W, singular, damp_percent=0.0)
    gptq_quantize(W, singular, damp_percent=0.01)  # dampening fixes it
    with pytest.raises(ValueError, match="fp16"):
        rtn_quantize(torch.full((2, 16), 1e7))
