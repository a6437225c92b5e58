"""Tests for kernels.py: each quantizer against the E4M3 rounding bound, layouts, extreme tiles, the
SwiGLU kernels against float64 statements of their maths, torch.compile'd == eager, and importing the
file leaves dynamo's settings alone.

E4M3 bound used throughout: a value v = x/s with |v| <= 448 is rounded to 3 mantissa bits, so the error is
at most half an ulp: |v|·2^-4 in the normal range, 2^-10 (half the smallest subnormal 2^-9) below 2^-6.
Back in x units: |x − q·s| <= max(|x|·2^-4, s·2^-10), plus fp32 rounding of the division (~1e-7 |x|).
"""
import pytest
import torch
import torch.nn.functional as F

import kernels as K


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def spread_input(M, N, seed=0):
    """Fresh random values whose magnitude changes by up to 10 orders from row to row and 128-column block
    to block, so that one global scale could never cover them."""
    g = torch.Generator().manual_seed(seed)
    mag = 10.0 ** torch.empty(M, (N + 127) // 128).uniform_(-6, 4, generator=g)  # (M, N/128)
    return torch.randn(M, N, generator=g) * mag.repeat_interleave(128, dim=1)[:, :N]


def assert_within_e4m3_bound(x, deq, s_per_elem):
    bound = torch.maximum(x.abs() * 2**-4, s_per_elem * 2**-10) + 1e-6 * x.abs() + 1e-38
    excess = ((x - deq).abs() - bound).max().item()
    assert excess <= 0, f"quantization error exceeds the E4M3 half-ulp bound by {excess:.3g}"


@pytest.mark.parametrize("pow2", [False, True])
def test_quant_1x128_shapes_layout_and_error_bound(pow2):
    M, Kd = 200, 330  # neither a multiple of 128: K is padded to 384
    x = spread_input(M, Kd)
    q, s = K.quant_1x128_ref(x, pow2)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (M, 384)
    assert s.dtype == torch.float32 and s.shape == (M, 3) and s.stride() == (1, M), "scales must be column-major"
    assert (q[:, Kd:].float() == 0).all(), "padding must quantize to zero"
    amax = F.pad(x, (0, 384 - Kd)).view(M, 3, 128).abs().amax(-1)  # (M, 3)
    if pow2:  # the smallest power of two that keeps the tile inside ±448
        assert (torch.log2(s) == torch.log2(s).round()).all() and (s >= amax / 448).all() and (s < 2 * amax / 448).all()
    else:
        torch.testing.assert_close(s, amax / 448, rtol=1e-6, atol=0)
    deq = K.dequant_1x128_ref(q, s)[:, :Kd]
    assert_within_e4m3_bound(x, deq, s.repeat_interleave(128, dim=1)[:, :Kd])


def test_quant_128x1_is_1x128_of_the_transpose():
    M, N = 300, 200  # tokens not a multiple of 128: padded to 384
    x = spread_input(M, N, seed=1)
    qT, sT = K.quant_128x1_ref(x)
    assert qT.shape == (256, 384) and sT.shape == (256, 3) and sT.stride() == (1, 256)
    q_ref, s_ref = K.quant_1x128_ref(x.t())  # tiles of xᵀ along tokens: the definition of 128×1 tiles of x
    assert torch.equal(qT[:N].float(), q_ref.float()) and torch.equal(sT[:N], s_ref)
    deq = K.dequant_1x128_ref(qT, sT)[:N, :M].t()  # (M, N)
    assert_within_e4m3_bound(x, deq, sT[:N].repeat_interleave(128, dim=1)[:, :M].t())


def test_quant_128x128_block_scales_and_transpose():
    N, Kd = 260, 200
    w = torch.randn(N, Kd) * 10.0 ** torch.empty(N, 1).uniform_(-3, 3)  # rows of very different size
    q, s = K.quant_128x128_ref(w)
    assert q.shape == (384, 256) and s.shape == (3, 2)
    deq = K.dequant_128x128_ref(q, s)[:N, :Kd]
    s_elem = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:N, :Kd]
    assert_within_e4m3_bound(w, deq, s_elem)
    # a square block is the same block for Wᵀ: Dgrad may reuse (qᵀ, sᵀ) instead of re-quantizing
    qt, st = K.quant_128x128_ref(w.t())
    assert torch.equal(qt.float(), q.t().float()) and torch.equal(st, s.t())


@pytest.mark.parametrize("pow2", [False, True])
def test_requant_128x1_adds_at_most_one_more_rounding(pow2):
    x = spread_input(256, 256, seed=2)
    q, s = K.quant_1x128_ref(x, pow2)
    deq1 = K.dequant_1x128_ref(q, s)
    qT, sT = K.requant_128x1_ref(q, s, pow2)
    assert qT.shape == (256, 256) and sT.shape == (256, 2)
    deq2 = K.dequant_1x128_ref(qT, sT).t()
    # second rounding measured against the values it was given: the same E4M3 bound
    assert_within_e4m3_bound(deq1, deq2, sT.repeat_interleave(128, dim=1).t())


def test_extreme_tiles_give_finite_scales_and_values():
    x = torch.randn(256, 512)
    x[:128, :128] = 0.0  # an all-zero tile/block
    x[128:, :128] *= 1e-8  # tiny values
    x[:, 128:256] *= 1e4  # large values
    x[:, 256:384] = torch.randn(256, 128) * 1e-3
    x[:, 256] = 3e4  # one huge outlier in every 1×128 tile of this column block
    for q, s in [K.quant_1x128_ref(x), K.quant_128x1_ref(x), K.quant_128x128_ref(x), K.quant_1x128_ref(x, True)]:
        assert torch.isfinite(s).all() and (s > 0).all(), "a scale must be finite and positive, zeros included"
        assert torch.isfinite(q.float()).all()
    q, s = K.quant_1x128_ref(x)
    deq = K.dequant_1x128_ref(q, s)
    assert (deq[:128, :128] == 0).all(), "a zero tile must dequantize to exactly zero"
    torch.testing.assert_close(deq[:, 256], x[:, 256], rtol=1e-6, atol=0)  # the max maps to ±448 exactly
    assert_within_e4m3_bound(x, deq, s.repeat_interleave(128, dim=1))


def test_swiglu_quant_and_backward():
    a, b, dh = torch.randn(200, 200), torch.randn(200, 200), torch.randn(200, 200)
    q, s = K.swiglu_quant_ref(a, b)
    q2, s2 = K.quant_1x128_ref(F.silu(a) * b)  # same values, two separate passes
    assert torch.equal(q.float(), q2.float()) and torch.equal(s, s2)
    # backward reads [a | b] from the FP8 cache: compare with float64 autograd on those (dequantized) values
    qab, sab = K.quant_1x128_ref(torch.cat([a, b], dim=1))  # (200, 512): each of a, b padded 200 -> 256
    ad, bd = (t.double().requires_grad_() for t in K.dequant_1x128_ref(qab, sab).chunk(2, dim=1))
    h = F.silu(ad) * bd
    h.backward(F.pad(dh, (0, 56)).double())
    dab = K.swiglu_bwd_ref(qab, sab, F.pad(dh, (0, 56)))
    assert dab.shape == (200, 512) and rel_err(dab, torch.cat([ad.grad, bd.grad], dim=1)) < 1e-6  # fp32 vs float64
    # the recomputed output, quantized 128×1 in the same pass == recompute, then quantize
    hT, shT = K.swiglu_quant_128x1_ref(qab, sab)
    a32, b32 = K.dequant_1x128_ref(qab, sab).chunk(2, dim=1)
    hT2, shT2 = K.quant_128x1_ref(F.silu(a32) * b32)
    assert hT.shape == (256, 256) and torch.equal(hT.float(), hT2.float()) and torch.equal(shT, shT2)


def _all_kernels(x, w, a, b, dy):
    q1 = K.quant_1x128_ref(x)
    return (q1, K.quant_128x1_ref(x, True), K.quant_128x128_ref(w), K.requant_128x1_ref(*q1),
            K.swiglu_quant_ref(a, b), K.swiglu_quant_128x1_ref(*q1), K.swiglu_bwd_ref(*q1, dy),
            K.transpose_128x128_ref(*(t[None] for t in K.quant_128x128_ref(w))))


def _inputs(device):
    g = torch.Generator().manual_seed(3)
    shapes = [(200, 200), (200, 300), (64, 200), (64, 200), (200, 128)]
    return [torch.randn(*s, generator=g).to(device) for s in shapes]


def _assert_same(out, ref):
    for o, r in zip(torch.utils._pytree.tree_leaves(out), torch.utils._pytree.tree_leaves(ref)):
        assert o.dtype == r.dtype and o.shape == r.shape and o.stride() == r.stride()
        if o.dtype == torch.float8_e4m3fn:  # a division rounded differently may move a value by one FP8 step
            assert (o.float() != r.float()).float().mean() < 1e-3 and rel_err(o.float(), r.float()) < 1e-3
        else:
            assert rel_err(o, r) < 1e-5, "compiled kernel differs from its eager reference"


def test_compiled_kernels_match_eager_cpu():
    # ONE compile (about 15-30 s on a 2-core CPU) covering every kernel, instead of one per kernel
    args = _inputs("cpu")
    _assert_same(torch.compile(_all_kernels)(*args), _all_kernels(*args))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_kernels_match_eager_cuda():
    args = _inputs("cuda")
    x, w, a, b, dy = args
    out = (K.quant_1x128(x), K.quant_128x1(x, True), K.quant_128x128(w), K.requant_128x1(*K.quant_1x128(x)),
           K.swiglu_quant(a, b), K.swiglu_quant_128x1(*K.quant_1x128(x)), K.swiglu_bwd(*K.quant_1x128(x), dy),
           K.transpose_128x128(*(t[None] for t in K.quant_128x128(w))))
    _assert_same(out, _all_kernels(*args))
    # the optimizer's update: compiled (one kernel for every parameter shape) == eager
    states = []
    for update in (K.adamw_bf16, K.adamw_bf16_ref):
        g = torch.Generator(device="cuda").manual_seed(5)
        w, grad = torch.randn(300, 70, device="cuda", generator=g), torch.randn(300, 70, device="cuda", generator=g)
        m, v = (torch.randn(300, 70, device="cuda", generator=g) * 0.1).bfloat16(), torch.rand(300, 70, device="cuda", generator=g).bfloat16()
        step, lr_wd = torch.zeros((), device="cuda"), torch.tensor([1e-2, 0.1], device="cuda")
        for _ in range(3):
            update(w, grad, m, v, step, lr_wd, 0.9, 0.95, 1e-8)
        states.append((w, m.float(), v.float(), step))
    for o, r in zip(*states):
        assert rel_err(o, r) < 1e-5


def test_compiled_quantizer_serves_every_token_count_with_one_kernel():
    # the training path calls the quantizers with a new number of rows for every expert at every step;
    # kernels._compile makes the rows dynamic, so new token counts reuse one compiled graph (a recompile per
    # count would exhaust dynamo's recompile_limit and fall back to eager code)
    from torch._dynamo.utils import counters
    g = torch.Generator().manual_seed(4)
    before = counters["stats"]["unique_graphs"]
    for M in (300, 517, 1000, 129):  # ragged and not multiples of 128
        x = torch.randn(M, 256, generator=g).bfloat16()
        _assert_same(K.quant_1x128(x), K.quant_1x128_ref(x))
    assert counters["stats"]["unique_graphs"] - before <= 1  # static shapes: 2 (one fixed, then automatic dynamic)


def test_import_leaves_dynamo_settings_alone():
    import importlib
    before = torch._dynamo.config.get_config_copy()
    importlib.reload(K)  # runs the module's top level again
    assert torch._dynamo.config.get_config_copy() == before
