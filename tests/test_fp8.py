"""Tests for fp8.py: the emulated GEMM against float64, Fp8Linear / the fused SwiGLU against a float64
statement of the same quantized maths (tight) and against the unquantized layer (loose, the FP8 error
budget), extreme inputs, activation memory, convert_to_fp8 on the real model, AdamWBF16 against
torch.optim.AdamW, and a short FP8 training run against the FP32 one. CPU, emulated back end.

Tolerances. "Same quantized maths" compares fp32 accumulation with float64 on identical FP8 operands:
only summation rounding differs, ~1e-7·sqrt(K), so 1e-5 can only fail on a real bug. "Against the
unquantized layer": one E4M3 rounding has a relative RMS error of ≈2.5% (3 mantissa bits), a GEMM output
sees two of them (≈3.6%) and Wgrad three (the 1×128 cache is re-tiled 128×1: ≈4.4%); we allow 6%.
"""
import copy
import statistics

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import conftest
import fp8
import kernels as K
from model import MLP, Gate, Transformer


# small matmuls: a second intra-op thread buys nothing here, and on the shared 2-core machine its spinning made the
# training test take 74 s instead of 10 s (measured)
pytestmark = pytest.mark.usefixtures("one_thread")


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def tiny_args(**kw):
    # conftest's tiny model, twice as wide: feature widths of 32-128 exercise the padding to 128-wide tiles
    base = dict(dim=64, inter_dim=128, moe_inter_dim=32, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                v_head_dim=16)
    return conftest.tiny_args(**{**base, **kw})


# --- the GEMM back ends --------------------------------------------------------------------------------

@pytest.mark.parametrize("b_tiles", ["128x128", "1x128"])
def test_emulated_gemm_matches_float64_of_dequantized_operands(b_tiles):
    a, b = randn(96, 384, seed=1) * 3, randn(256, 384, seed=2) * 1e-2
    qa, sa = K.quant_1x128_ref(a)
    qb, sb = K.quant_128x128_ref(b) if b_tiles == "128x128" else K.quant_1x128_ref(b)
    deq_b = K.dequant_128x128_ref(qb, sb) if b_tiles == "128x128" else K.dequant_1x128_ref(qb, sb)
    ref = K.dequant_1x128_ref(qa, sa).double() @ deq_b.double().t()  # (96, 256)
    out = fp8.gemm_emulated(qa, sa, qb, sb, torch.float32)
    assert out.shape == (96, 256) and out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-6  # fp32 accumulation of exact FP8 products, K = 384


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="needs a Hopper GPU (sm90) for blockwise torch._scaled_mm")
def test_hopper_backend_matches_emulated():
    assert fp8.hopper_gemms("auto", torch.device("cuda")) == fp8.HopperGemms(blockwise=True, tilewise=True)
    torch.manual_seed(0)
    x = torch.randn(4, 96, 512, device="cuda", requires_grad=True)
    lin = nn.Linear(512, 384, bias=False, device="cuda")
    dy = torch.randn(4, 96, 384, device="cuda")
    res = {}
    for backend in ("hopper", "emulated"):
        x.grad = lin.weight.grad = None
        y = fp8.Fp8Linear.from_linear(lin, backend=backend)(x)
        y.backward(dy)
        res[backend] = (y, x.grad, lin.weight.grad)
    for hw, em in zip(res["hopper"], res["emulated"]):
        assert rel_err(hw, em) < 1e-3  # fp32 outputs; only the order of fp32 additions differs


def test_backend_is_a_layer_argument_not_a_module_switch():
    assert not any(hasattr(fp8, name) for name in ("BACKEND", "COMPILE_KERNELS", "_HW"))
    model = fp8.convert_to_fp8(Transformer(tiny_args()), backend="emulated")
    layers = [m for m in model.modules() if isinstance(m, (fp8.Fp8Linear, fp8.Fp8SwiGLU, fp8.Fp8Experts))]
    assert layers and all(m.backend == "emulated" for m in layers)
    assert fp8.hopper_gemms("auto", torch.device("cpu")) == fp8.EMULATED
    with pytest.raises(ValueError, match="backend"):
        fp8.convert_to_fp8(Transformer(tiny_args()), backend="fast")
    with pytest.raises(RuntimeError, match="CUDA"):
        fp8.convert_to_fp8(Transformer(tiny_args()), backend="hopper")  # on this CPU: refused, not ignored


# --- Fp8Linear -------------------------------------------------------------------------------------------

def quantized_linear_float64(x, w, dy, pow2=False, cache_hp=False):
    """The maths Fp8Linear promises, in float64 on the same FP8 operands: y, dx, dW."""
    N, Kd = w.shape
    x2, dy2 = x.reshape(-1, Kd), dy.reshape(-1, N)
    qx, sx = K.quant_1x128_ref(x2, pow2)
    W = K.dequant_128x128_ref(*K.quant_128x128_ref(w)).double()  # (Np, Kp)
    y = (K.dequant_1x128_ref(qx, sx).double() @ W.t())[:, :N]
    dx = (K.dequant_1x128_ref(*K.quant_1x128_ref(dy2)).double() @ W)[:, :Kd]
    xT = K.quant_128x1_ref(x2, pow2) if cache_hp else K.requant_128x1_ref(qx, sx, pow2)
    dW = (K.dequant_1x128_ref(*K.quant_128x1_ref(dy2)).double() @ K.dequant_1x128_ref(*xT).double().t())[:N, :Kd]
    return y.reshape(*x.shape[:-1], N), dx.reshape(x.shape), dW


@pytest.mark.parametrize("hp", [False, True], ids=["fp8-cache", "wo-style-hp-cache-pow2"])
def test_fp8_linear_forward_and_grads(hp):
    B, T, Kd, N = 2, 100, 200, 136  # K, N not multiples of 128, M = 200 tokens not either
    x = randn(B, T, Kd, seed=3).requires_grad_()
    lin = nn.Linear(Kd, N, bias=False)
    f = fp8.Fp8Linear.from_linear(lin, pow2_scales=hp, cache_input_hp=hp)
    assert f.weight is lin.weight
    dy = randn(B, T, N, seed=4)
    y = f(x)
    y.backward(dy)
    assert y.shape == (B, T, N) and y.dtype == x.dtype and lin.weight.grad.dtype == torch.float32
    yq, dxq, dWq = quantized_linear_float64(x.detach(), lin.weight.detach(), dy, pow2=hp, cache_hp=hp)
    for name, got, want in [("y", y, yq), ("dx", x.grad, dxq), ("dW", lin.weight.grad, dWq)]:
        assert rel_err(got, want) < 1e-5, f"{name} differs from the float64 quantized reference"
    # against the unquantized linear in float64: the FP8 error budget (see module docstring)
    xd, wd = x.detach().double().requires_grad_(), lin.weight.detach().double().requires_grad_()
    (xd @ wd.t()).backward(dy.double())
    errs = dict(y=rel_err(y, xd.detach() @ wd.detach().t()), dx=rel_err(x.grad, xd.grad),
                dW=rel_err(lin.weight.grad, wd.grad))
    assert max(errs.values()) < 0.06, errs


def test_fp8_linear_under_autocast_returns_bf16_and_fp32_grads():
    x = randn(3, 40, 64, seed=5).requires_grad_()
    lin = nn.Linear(64, 96, bias=True)
    f = fp8.Fp8Linear.from_linear(lin)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = f(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert x.grad.dtype == torch.float32 and lin.weight.grad.dtype == torch.float32 and lin.bias.grad is not None
    assert rel_err(y, F.linear(x.detach(), lin.weight.detach(), lin.bias.detach())) < 0.06


@pytest.mark.parametrize("case", ["1e4", "1e-8", "zeros", "outlier-per-tile"])
def test_extreme_inputs_stay_finite_and_accurate(case):
    x = randn(256, 256, seed=6)
    if case == "1e4":
        x = x * 1e4
    elif case == "1e-8":
        x = x * 1e-8
    elif case == "zeros":
        x = torch.zeros(256, 256)
    else:
        x[:, ::128] = 1e4  # the first value of every 1×128 tile is a huge outlier
    x.requires_grad_()
    lin = nn.Linear(256, 128, bias=False)
    dy = randn(256, 128, seed=7)
    y = fp8.Fp8Linear.from_linear(lin)(x)
    y.backward(dy)
    for t in (y, x.grad, lin.weight.grad):
        assert torch.isfinite(t).all()
    if case == "zeros":
        assert (y == 0).all() and (lin.weight.grad == 0).all()
    else:  # the per-tile scales keep the relative error at the FP8 level whatever the magnitude
        assert rel_err(y, x.detach().double() @ lin.weight.detach().double().t()) < 0.06
        assert rel_err(lin.weight.grad, dy.double().t() @ x.detach().double()) < 0.06


def saved_activation_bytes(module, x):
    """Bytes that autograd keeps for backward, counting only tensors with x's M rows (activations,
    not weights or their FP8 copies)."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        module(x)
    return sum(t.numel() * t.element_size() for t in saved if t.dim() >= 1 and t.shape[0] == x.shape[0])


def test_activation_memory_fp8_cache_vs_bf16():
    M, Kd, N = 512, 1024, 384
    x = randn(M, Kd, seed=8).requires_grad_()
    lin = nn.Linear(Kd, N, bias=False)
    bf16 = saved_activation_bytes(copy.deepcopy(lin).bfloat16(), x.detach().bfloat16().requires_grad_())
    fp8_bytes = saved_activation_bytes(fp8.Fp8Linear.from_linear(lin), x)
    assert bf16 == 2 * M * Kd
    assert fp8_bytes == M * Kd + 4 * M * Kd // 128  # 1 byte per value + one fp32 scale per 128: 51.6% of BF16


# --- the fused SwiGLU FFN ---------------------------------------------------------------------------------

def quantized_swiglu_float64(x, w1, w2, w3, dy):
    """Fp8SwiGLU's maths in float64 on the same FP8 operands: forward with the exact SwiGLU inputs, backward
    from their FP8 cache (recomputation), as in _Fp8SwiGLUFn."""
    D, Fh = x.shape[-1], w1.shape[0]
    deq_a = lambda t: K.dequant_1x128_ref(*K.quant_1x128_ref(t)).double()  # noqa: E731
    deq_w = lambda w: K.dequant_128x128_ref(*K.quant_128x128_ref(w)).double()  # noqa: E731
    deq_t = lambda t: K.dequant_1x128_ref(*t).double()  # noqa: E731
    x2, dy2 = x.reshape(-1, D), dy.reshape(-1, D)
    qx = K.quant_1x128_ref(x2)
    W1, W2, W3 = deq_w(w1), deq_w(w2), deq_w(w3)
    X = deq_t(qx)
    a, b = (X @ W1.t())[:, :Fh].float(), (X @ W3.t())[:, :Fh].float()  # the GEMM outputs, fp32 like the layer
    y = (K.dequant_1x128_ref(*K.swiglu_quant_ref(a, b)).double() @ W2.t())[:, :D]
    a8, b8 = deq_a(a), deq_a(b)  # what backward sees
    dh = deq_a(dy2) @ W2  # (M, Fp)
    h = (F.silu(a8) * b8).float()
    dW2 = (deq_t(K.quant_128x1_ref(dy2)) @ deq_t(K.quant_128x1_ref(h)).t())[:D, :Fh]
    sig = torch.sigmoid(a8)
    da, db = (dh * b8 * sig * (1 + a8 * (1 - sig))).float(), (dh * F.silu(a8)).float()
    dx = (deq_a(da) @ W1 + deq_a(db) @ W3)[:, :D]
    XT = deq_t(K.requant_128x1_ref(*qx))
    dW1 = (deq_t(K.quant_128x1_ref(da)) @ XT.t())[:Fh, :D]
    dW3 = (deq_t(K.quant_128x1_ref(db)) @ XT.t())[:Fh, :D]
    return y.reshape(x.shape), dx.reshape(x.shape), dW1, dW2, dW3


def test_fp8_swiglu_forward_and_grads():
    D, Fh = 96, 200
    x = randn(2, 50, D, seed=9).requires_grad_()
    lins = [nn.Linear(D, Fh, bias=False), nn.Linear(Fh, D, bias=False), nn.Linear(D, Fh, bias=False)]
    m = fp8.Fp8SwiGLU(*lins)
    dy = randn(2, 50, D, seed=10)
    y = m(x)
    y.backward(dy)
    got = [y, x.grad] + [lin.weight.grad for lin in (lins[0], lins[1], lins[2])]
    want = quantized_swiglu_float64(x.detach(), *(lin.weight.detach() for lin in lins), dy)
    # looser than the Linear's 1e-5: a, b, h, dh, da, db are computed (fp32 here, float64 in the reference) and
    # then quantized again, so an element sitting on an FP8 rounding boundary may round the other way: one
    # E4M3 step (≤ 12.5%) on a handful of elements; measured up to 2.2e-3 relative on these small shapes. A
    # wiring error (wrong operand, scale, transpose or padding) costs ≥ 5%, so 1e-2 still catches it
    for name, g, w in zip(["y", "dx", "dW1", "dW2", "dW3"], got, want):
        assert rel_err(g, w) < 1e-2, f"{name} differs from the float64 quantized reference"
    # vs the unquantized FFN: up to five roundings stack on a path here (GEMM output, cache, re-quantized
    # SwiGLU output, gradient), measured ≈6-7%; allow 10%
    xd = x.detach().double().requires_grad_()
    w1, w2, w3 = (lin.weight.detach().double().requires_grad_() for lin in lins)
    yd = (F.silu(xd @ w1.t()) * (xd @ w3.t())) @ w2.t()
    yd.backward(dy.double())
    for g, w in zip(got, [yd, xd.grad, w1.grad, w2.grad, w3.grad]):
        assert rel_err(g, w) < 0.10


# --- the routed experts in one call ---------------------------------------------------------------------------

def make_experts(E, D, Fh, seed):
    g = torch.Generator().manual_seed(seed)
    mlps = nn.ModuleList()
    for _ in range(E):
        m = nn.Module()
        m.w1, m.w2, m.w3 = (nn.Linear(a, b, bias=False) for a, b in ((D, Fh), (Fh, D), (D, Fh)))
        for lin in (m.w1, m.w2, m.w3):
            nn.init.normal_(lin.weight, std=0.05, generator=g)
        mlps.append(m)
    return fp8.Fp8Experts(mlps, backend="emulated")


def route(N, K, weights, seed):
    """idx (N, K): K distinct experts per token, drawn with these per-expert weights (0: the expert is never
    chosen); g (N, K) gate weights; counts (E,)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.multinomial(torch.tensor(weights).expand(N, -1), K, replacement=False, generator=gen)
    g = torch.rand(N, K, generator=gen) + 0.1
    return idx, g, torch.bincount(idx.flatten(), minlength=len(weights))


def reference_moe(experts, u, g, idx):
    # model.MoE's 'loop' path: each expert's Fp8SwiGLU on the tokens that chose it, gated, added up
    y = torch.zeros_like(u)
    for e, expert in enumerate(experts):
        tok, slot = torch.where(idx == e)
        if len(tok):
            y = y.index_add(0, tok, expert(u[tok]) * g[tok, slot, None])
    return y


def grouped_vs_reference(experts, u, g, idx, counts, dy):
    res = []
    for run in (lambda u, g: experts.grouped(u, g, idx, counts), lambda u, g: reference_moe(experts, u, g, idx)):
        experts.zero_grad(set_to_none=True)
        ui, gi = u.detach().clone().requires_grad_(), g.detach().clone().requires_grad_()
        y = run(ui, gi)
        y.backward(dy)
        res.append([y, ui.grad, gi.grad] + [p.grad for p in experts.parameters()])
    return res


@pytest.mark.parametrize("weights", [[0, 0.05, 0.5, 0, 0.3, 0.15], [0.9, 0, 0, 0.1]], ids=["ragged", "mostly-empty"])
def test_fp8_experts_grouped_equals_per_expert_reference(weights):
    # ragged token counts (not multiples of 128, one over two tiles: 2 of 4 experts per token, 210 tokens) and
    # experts that get no token at all
    N, D, Fh = 210, 160, 96  # D, F not multiples of 128 either: padded widths
    experts = make_experts(len(weights), D, Fh, seed=11)
    idx, g, counts = route(N, 2 if weights[1] else 1, weights, seed=10)
    assert counts.max() > 128 and (counts == 0).any() and (counts[counts > 0] % 128 != 0).all()
    got, want = grouped_vs_reference(experts, randn(N, D, seed=12), g, idx, counts, randn(N, D, seed=13))
    for i, (a, b) in enumerate(zip(got, want)):
        if b is None:  # an expert that saw no token: no gradient, as with the per-expert path
            assert a is None, f"tensor {i}: expected no gradient"
            continue
        # the same FP8 operands and tiles (segments padded to 128 rows = per-expert padding): only the
        # order of fp32 additions may differ
        assert rel_err(a, b) < 1e-6, f"tensor {i} differs from the per-expert reference"
    assert sum(p.grad is None for p in experts.parameters()) == 3 * int((counts == 0).sum())


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="needs a Hopper GPU (sm90) for blockwise torch._scaled_mm")
def test_fp8_experts_hopper_matches_emulated():
    # 1700 tokens, 2 of 5 experts each: segments of several tiles of 128 rows, odd numbers of them included
    N, D, Fh = 1700, 256, 384
    experts = make_experts(5, D, Fh, seed=15).cuda()
    idx, g, counts = (t.cuda() for t in route(N, 2, [0.01, 0.4, 0, 0.15, 0.44], seed=16))
    u, dy = randn(N, D, seed=16).cuda(), randn(N, D, seed=17).cuda()
    res = {}
    for backend in ("hopper", "emulated"):
        for m in experts.modules():
            if hasattr(m, "backend"):
                m.backend = backend
        res[backend] = [t for t in grouped_vs_reference(experts, u, g, idx, counts, dy)[0] if t is not None]
    assert len(res["hopper"]) == len(res["emulated"]) == 3 + 3 * 4
    errs = [rel_err(hw, em) for hw, em in zip(res["hopper"], res["emulated"])]
    # fp32 GEMM outputs differ only in the order of additions, but the FFN quantizes its intermediate results
    # again (W1x, W3x, the SwiGLU output, dh, da, db), where such a difference can move an element by one FP8
    # step: the bound of test_fp8_swiglu_forward_and_grads (1e-2); a wrong operand, scale or layout costs >= 5%
    assert max(errs) < 1e-2, errs


def test_moe_grouped_fp8_equals_sorted_fp8_in_the_model():
    torch.manual_seed(0)
    model = fp8.convert_to_fp8(Transformer(tiny_args(n_routed_experts=8, n_expert_groups=2, n_activated_experts=2)),
                               backend="emulated")
    moe = model.layers[1].ffn
    assert isinstance(moe.experts, fp8.Fp8Experts)
    moe.gate.bias[:3] = -10.0  # experts 0-2 are never chosen: empty segments
    tok = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(1))
    res = {}
    for impl in ("grouped", "sorted"):
        model.set_impl(moe=impl)
        model.zero_grad(set_to_none=True)
        logits, L = model(tok, tok)
        L["loss"].backward()
        res[impl] = [logits] + [p.grad for p in moe.experts.parameters()]
        assert (moe.last_counts[:3] == 0).all() and (moe.last_counts[3:] > 0).sum() >= 3
    for a, b in zip(res["grouped"], res["sorted"]):
        assert (a is None) == (b is None) and (a is None or rel_err(a, b) < 1e-5)


def test_weights_are_quantized_once_per_change():
    lin = nn.Linear(256, 128, bias=False)
    f = fp8.Fp8Linear.from_linear(lin, backend="emulated")
    x = randn(64, 256, seed=14)
    calls = []
    orig = fp8._quant_stack
    fp8._quant_stack = lambda w: calls.append(1) or orig(w)
    try:
        y1 = f(x)
        f(x)
        f(x).sum().backward()  # micro-batches and evaluation between two steps: one quantization
        assert len(calls) == 1
        with torch.no_grad():
            lin.weight.mul_(-2.0)  # an optimizer step changes the weight in place
        y2 = f(x)
        assert len(calls) == 2, "a changed weight must be quantized again"
        assert rel_err(y2, -2.0 * y1) < 1e-6  # and the new FP8 copy is used (power-of-2 change: exact)
    finally:
        fp8._quant_stack = orig


def test_weights_are_quantized_again_after_a_fused_optimizer_step():
    # torch's fused AdamW (train.py's optimizer on a GPU; CPU has it too) writes the parameters without bumping
    # their version counters: a cache keyed on the version alone kept the first step's FP8 weights for the whole
    # run. After each step the FP8 model must compute exactly what a freshly converted copy of its weights does.
    cases = [("emulated", "cpu")]
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0):
        cases.append(("hopper", "cuda"))
    for backend, device in cases:
        torch.manual_seed(0)
        with torch.device(device):
            model = Transformer(tiny_args(dim=256, inter_dim=256, moe_inter_dim=128))
        fp8.convert_to_fp8(model, backend=backend)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
        tok = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(15)).to(device)
        for _ in range(2):
            model(tok, tok)[1]["loss"].backward()
            opt.step()
            opt.zero_grad()
            fresh = copy.deepcopy(model)  # the same weights, empty caches
            for m in fresh.modules():
                if isinstance(m, fp8.CachedFp8Weights):
                    m.fp8_key = None
            with torch.no_grad():
                assert torch.equal(model(tok).logits, fresh(tok).logits), backend


@pytest.mark.parametrize("stack_max", [fp8.STACK_MAX, 0])
def test_a_step_quantizes_all_fp8_weights_in_one_call_per_shape_as_each_alone(monkeypatch, stack_max):
    # after an optimizer step the FP8 copies of every converted layer are made again: matrices of one shape are
    # stacked and quantized (and transposed) together, and must equal each weight quantized alone; matrices over
    # STACK_MAX elements (here: all, with stack_max 0) are quantized alone and their FP8 copies stacked
    monkeypatch.setattr(fp8, "STACK_MAX", stack_max)
    torch.manual_seed(0)
    model = fp8.convert_to_fp8(Transformer(tiny_args()), backend="emulated")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tok = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(17))
    model(tok, tok)[1]["loss"].backward()
    alone = K.quant_128x128_ref
    calls = []
    monkeypatch.setattr(K, "quant_128x128_ref", lambda w, *a: calls.append(w.shape) or alone(w, *a))
    old = {m: m.fp8_fwd for m in model.modules() if isinstance(m, fp8.Fp8Linear) and m.fp8_fwd is not None}
    opt.step()
    mods = [m for m in model.modules() if isinstance(m, fp8.CachedFp8Weights) and m.fp8_fwd is not None]
    shapes = {(*ws[0].shape, r) for m in mods for ws, r in m.fp8_groups()}
    n = sum(len(ws) for m in mods for ws, _ in m.fp8_groups())
    assert len(shapes) == 7 and len(mods) == 21 and n == 49
    assert len(calls) == (7 if stack_max else n)  # 7 calls, where one per weight made 49
    assert all(m.fp8_fwd is not f for m, f in old.items())
    for m in mods:
        for (ws, r), (q, s), (qT, sT) in zip(m.fp8_groups(), m.fp8_fwd, m.fp8_bwd):
            ref = [alone(w.detach()) for w in ws]
            q_ref = torch.stack([a for a, _ in ref]).view(q.shape)
            s_ref = torch.stack([b for _, b in ref]).view(s.shape)
            assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)
            assert torch.equal(qT.view(torch.uint8), q_ref.view(torch.uint8).transpose(1, 2))
            assert torch.equal(sT, s_ref.transpose(1, 2))


def test_fp8_layers_compile_into_the_block_graph_and_read_current_weights():
    # An FP8 layer is traced into a compiled Block (fullgraph=True raises at any graph break) and reads its FP8
    # weights as graph inputs, made again (eagerly) after each optimizer step -- torch's fused AdamW included, which
    # bumps no version counter -- without a recompile. After each step the compiled model must compute what an
    # eager copy of its weights does. aot_eager runs the traced graph without code generation: cheap on a CPU.
    torch.manual_seed(0)
    model = Transformer(tiny_args(dim=256, inter_dim=256, n_layers=2, n_dense_layers=2, n_mtp_depth=0))
    fp8.convert_to_fp8(model, backend="emulated")
    twin = copy.deepcopy(model)  # eager; loads the compiled model's weights after each step
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    for blk in model.layers:
        blk.compile(backend=counter, fullgraph=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    tok = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(16))
    for step in range(3):
        model(tok, tok)[1]["loss"].backward()
        opt.step()
        opt.zero_grad()
        twin.load_state_dict(model.state_dict())
        with torch.no_grad():
            # the same FP8 operands, summed in another order by the traced graph (measured ~1e-6 on gradients);
            # the FP8 weights of the step before differ by > 1% (AdamW at lr 1e-2)
            assert rel_err(model(tok).logits, twin(tok).logits) < 1e-5, step
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)  # changed outside an optimizer step: the converted model's forward pre-hook notices
        twin.load_state_dict(model.state_dict())
        assert rel_err(model(tok).logits, twin(tok).logits) < 1e-5
    assert counter.frame_count == 2, "one graph for training, one without grad, shared by both Blocks, each compiled once"


# --- converting the model ---------------------------------------------------------------------------------

def test_convert_to_fp8_swaps_exactly_the_paper_layers():
    torch.manual_seed(0)
    model = Transformer(tiny_args())
    linears = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    before = {k: v for k, v in model.state_dict().items()}
    tok = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(1))
    ref = model(tok).logits
    fp8.convert_to_fp8(model)
    fp8_lin = {n for n, m in model.named_modules() if isinstance(m, fp8.Fp8Linear)}
    assert fp8_lin == linears - {"head"}, "every Linear in layers/mtp, and only those, runs in FP8"
    assert type(model.head) is nn.Linear and type(model.embed) is nn.Embedding
    assert all(type(m.ffn.gate) is Gate for m in model.layers[1:])
    assert sum(isinstance(m, fp8.Fp8SwiGLU) for m in model.modules()) == 1 + 2 * 5  # dense + (4 routed + shared) x 2
    assert [n for n, m in model.named_modules() if getattr(m, "cache_input_hp", False)] == \
        ["layers.0.attn.wo", "layers.1.attn.wo", "mtp.0.block.attn.wo"]
    after = model.state_dict()
    assert list(after) == list(before) and all(after[k] is before[k] or torch.equal(after[k], before[k]) for k in after)
    model.load_state_dict(before)  # checkpoints interchange
    out = model(tok).logits
    assert rel_err(out, ref) < 0.05  # logits through a few FP8 layers vs fp32
    model.set_impl(attn="absorb")  # absorb reads attn.wkv_b.weight directly: still a plain Parameter
    assert rel_err(model(tok).logits, ref) < 0.05


def test_fp8_model_trains_under_bf16_autocast():
    # train.py's step: autocast around the forward; the FP8 layers (and their weight quantization) opt out of it
    torch.manual_seed(0)
    model = fp8.convert_to_fp8(Transformer(tiny_args()), backend="emulated")
    tok = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, L = model(tok, tok)
    L["loss"].backward()
    assert torch.isfinite(logits).all() and torch.isfinite(L["loss"])
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.layers[1].ffn.experts.parameters())


def test_convert_to_fp8_can_leave_the_routed_experts_in_bf16():
    torch.manual_seed(0)
    model = fp8.convert_to_fp8(Transformer(tiny_args()), experts=False)
    routed = {n for n, m in model.named_modules() if ".ffn.experts." in n}
    assert routed and all(type(m) in (nn.Linear, MLP) for n, m in model.named_modules() if n in routed)
    assert all(type(m.ffn.experts) is nn.ModuleList for m in model.layers[1:])
    assert isinstance(model.layers[1].ffn.shared_experts, fp8.Fp8SwiGLU) and isinstance(model.layers[0].ffn, fp8.Fp8SwiGLU)
    tok = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(1))
    model(tok, tok).losses["loss"].backward()  # the BF16 grouped path runs the experts
    assert model.layers[1].ffn.experts[0].w1.weight.grad is not None


# --- the optimizer ----------------------------------------------------------------------------------------

def _regression_run(opt_cls, steps, p_dtype=torch.float32, **kw):
    torch.manual_seed(0)
    X, Y = torch.randn(256, 32), torch.randn(256, 8)
    net = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 8)).to(p_dtype)
    opt = opt_cls(net.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, **kw)
    losses = []
    for _ in range(steps):
        loss = F.mse_loss(net(X.to(p_dtype)).float(), Y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return net, opt, losses


def test_adamw_bf16_tracks_torch_adamw():
    net_ref, _, l_ref = _regression_run(torch.optim.AdamW, 30)
    net, opt, l = _regression_run(fp8.AdamWBF16, 30)
    # the only difference is BF16 rounding of m and v (relative 2^-9 per step). Measured after 30 steps:
    # parameters 0.3% apart, losses 0.01%; Adam's normalization amplifies such differences slowly (2% after
    # 100 steps at this lr), so bound at 30 steps: parameters 1%, losses 0.1%
    assert max(abs(a - b) / b for a, b in zip(l, l_ref)) < 1e-3
    w_ref = torch.cat([p.flatten() for p in net_ref.parameters()])
    w = torch.cat([p.flatten() for p in net.parameters()])
    assert rel_err(w, w_ref) < 0.01
    st = opt.state[next(net.parameters())]
    assert st["exp_avg"].dtype == torch.bfloat16 and st["exp_avg_sq"].dtype == torch.bfloat16 and "master" not in st


def test_adamw_bf16_master_weights_for_bf16_params():
    _, _, l_ref = _regression_run(torch.optim.AdamW, 60)
    net, opt, l = _regression_run(fp8.AdamWBF16, 60, p_dtype=torch.bfloat16)
    for p in net.parameters():
        assert opt.state[p]["master"].dtype == torch.float32 and torch.equal(p, opt.state[p]["master"].bfloat16())
    assert abs(l[-1] - l_ref[-1]) / l_ref[-1] < 0.05  # BF16 forward/backward, FP32 master updates


def test_adamw_bf16_state_dict_round_trip_is_exact():
    for p_dtype in (torch.float32, torch.bfloat16):
        net, opt, _ = _regression_run(fp8.AdamWBF16, 5, p_dtype=p_dtype)
        net2, sd = copy.deepcopy(net), copy.deepcopy(opt.state_dict())
        opt2 = fp8.AdamWBF16(net2.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
        opt2.load_state_dict(sd)
        st2 = opt2.state[next(net2.parameters())]
        assert st2["exp_avg"].dtype == torch.bfloat16
        assert "master" not in st2 or st2["master"].dtype == torch.float32
        X = torch.randn(64, 32).to(p_dtype)
        for n, o in ((net, opt), (net2, opt2)):
            for _ in range(3):
                o.zero_grad()
                n(X).float().square().mean().backward()
                o.step()
        assert all(torch.equal(a, b) for a, b in zip(net.parameters(), net2.parameters()))


def _reference_adamw_bf16(params, grads_per_step, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, wd=0.1):
    """The per-parameter update (kernels.adamw_bf16_ref, one parameter at a time; None: no gradient, no update)
    on copies of params: what AdamWBF16's buckets must equal."""
    ws = [p.detach().clone() for p in params]
    sts = [(torch.zeros_like(w, dtype=torch.bfloat16), torch.zeros_like(w, dtype=torch.bfloat16), torch.zeros(()))
           for w in ws]
    for grads in grads_per_step:
        for w, g, (m, v, step) in zip(ws, grads, sts):
            if g is not None:
                K.adamw_bf16_ref(w, g, m, v, step, torch.tensor([lr, wd]), *betas, eps)
    return ws


def test_adamw_bf16_updates_each_bucket_in_one_kernel_as_the_per_parameter_update_does(monkeypatch):
    # odd sizes (gaps of the 64-element alignment), two groups, and buckets small enough to split group 0
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(33, 17), nn.Linear(17, 50), nn.Linear(50, 3))
    params = list(net.parameters())
    monkeypatch.setattr(fp8.AdamWBF16, "BUCKET", 1024)
    monkeypatch.setattr(fp8.AdamWBF16, "ALONE", 800)  # W1 (850 elements) is updated where it lies
    w1_storage = params[2].data_ptr()
    opt = fp8.AdamWBF16([dict(params=params[:4]), dict(params=params[4:])], lr=1e-2, betas=(0.9, 0.95),
                        weight_decay=0.1)
    calls = []
    monkeypatch.setattr(K, "adamw_bf16_ref", lambda w, *a: calls.append(w.numel()) or REF(w, *a))
    grads_per_step = [[randn(*p.shape, seed=10 * s + i) for i, p in enumerate(params)] for s in range(4)]
    grads_per_step[2][3] = None  # b1 skips step 3: its bucket (the third) then updates parameter by parameter
    ref = _reference_adamw_bf16(params, grads_per_step)
    for s, grads in enumerate(grads_per_step):
        for p, g in zip(params, grads):
            p.grad = g
        calls.clear()
        opt.step()
        if s < 2:  # buckets [W0, b0] (561 + 15 gap, 17 + 47), [W1] alone, [b1] (50 + 14), [W2, b2]: a kernel each
            assert sorted(calls) == [64, 256, 640, 850]
            assert params[0].untyped_storage().data_ptr() == params[1].untyped_storage().data_ptr()
            assert params[2].data_ptr() == w1_storage
    # the same numbers as the reference (elementwise the same operations: only the order of the parameters differs)
    assert max(rel_err(p, r) for p, r in zip(params, ref)) < 1e-6
    assert opt.state[params[3]]["step"].item() == 3 and opt.state[params[0]]["step"].item() == 4
    assert all(p.grad is not None for p in params[2:])  # Parameters kept: p.grad and the model still see them


def test_adamw_bf16_notices_a_parameter_moved_out_of_its_bucket():
    # model.to(), p.data = ...: the bucket is laid out again from the current values (else p would stop training)
    torch.manual_seed(0)
    net = nn.Linear(20, 10)
    opt = fp8.AdamWBF16(net.parameters(), lr=1e-2, weight_decay=0.1)
    grads = [[randn(10, 20, seed=s), randn(10, seed=s + 100)] for s in range(3)]
    ref = _reference_adamw_bf16(list(net.parameters()), grads, betas=(0.9, 0.95))
    for s, gs in enumerate(grads):
        if s == 1:
            net.weight.data = net.weight.data.clone()  # the weight leaves its bucket, keeping its values
        for p, g in zip(net.parameters(), gs):
            p.grad = g
        opt.step()
    assert max(rel_err(p, r) for p, r in zip(net.parameters(), ref)) < 1e-6


REF = K.adamw_bf16_ref


# --- a short training run ------------------------------------------------------------------------------------

def bigram_batch(step, B=8, T=64, V=64):
    """A fresh batch per step from one fixed random bigram chain (4 successors per token): learnable but not
    memorizable, so the loss settles near a floor (ln 4 ≈ 1.39 plus what 30 steps leave unlearned)."""
    succ = torch.randint(0, V, (V, 4), generator=torch.Generator().manual_seed(0))  # (V, 4)
    g = torch.Generator().manual_seed(100 + step)
    seq = [torch.randint(0, V, (B,), generator=g)]
    for _ in range(T):
        seq.append(succ[seq[-1], torch.randint(0, 4, (B,), generator=g)])
    data = torch.stack(seq, dim=1)  # (B, T+1)
    return data[:, :-1], data[:, 1:]


def test_fp8_training_tracks_fp32():
    def run(use_fp8, steps=30):
        torch.manual_seed(0)
        model = Transformer(tiny_args())
        if use_fp8:  # the whole recipe: FP8 linears + fused SwiGLU, BF16 optimizer moments
            fp8.convert_to_fp8(model)
        opt = (fp8.AdamWBF16 if use_fp8 else torch.optim.AdamW)(model.parameters(), lr=1e-2, betas=(0.9, 0.95),
                                                                weight_decay=0.1)
        losses = []
        for step in range(steps):
            _, L = model(*bigram_batch(step))
            opt.zero_grad()
            L["loss"].backward()
            opt.step()
            model.update_router_biases()
            losses.append(L["ce"].item())
        return losses

    l32, l8 = run(False), run(True)
    assert l32[-1] < 0.5 * l32[0], "the task must be learnable for the comparison to mean anything"
    mean_rel = abs(statistics.mean(l8) - statistics.mean(l32)) / statistics.mean(l32)
    last_rel = abs(statistics.mean(l8[-10:]) - statistics.mean(l32[-10:])) / statistics.mean(l32[-10:])
    print(f"FP8 vs FP32 loss: mean over the run {mean_rel:.3%} apart, last 10 steps {last_rel:.3%}")
    # measured: 0.22% over the run, 0.88% over the last 10 steps (single steps differ by up to ~2.5%: FP8
    # noise moves the trajectory and the router). The paper's < 0.25% is for long runs; we bound a 30-step
    # run of a tiny model at 0.5% (whole run) and 2% (last 10 steps)
    assert mean_rel < 0.005 and last_rel < 0.02


def test_fp8_model_is_causal():
    # no FP8 tile or scale may reach across tokens: 1×128 activation tiles lie inside one token's row, and the
    # experts' padded segments only regroup rows. Changing tokens from position 40 on must leave every logit
    # before 40 unchanged (a scale shared across rows would leak a later token's magnitude backwards): bit-identical
    # for the emulated GEMM; on a Hopper GPU within 1e-3 of the logits' scale (cuBLAS may pick another kernel
    # when an expert's row count changes). dim 256: two full 128-wide tiles per row, so the real tiling runs.
    cases = [("emulated", "cpu")]
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0):
        cases.append(("hopper", "cuda"))
    for backend, device in cases:
        for experts in (True, False):
            torch.manual_seed(0)
            with torch.device(device):
                model = Transformer(tiny_args(dim=256, inter_dim=512, moe_inter_dim=128)).eval()
            fp8.convert_to_fp8(model, backend=backend, experts=experts)
            g = torch.Generator().manual_seed(1)
            tok = torch.randint(0, 64, (2, 64), generator=g)
            tok2 = tok.clone()
            tok2[:, 40:] = torch.randint(0, 64, (2, 24), generator=g)
            with torch.no_grad():
                a, b = model(tok.to(device)).logits, model(tok2.to(device)).logits
            before, after = (a[:, :40] - b[:, :40]).abs().max(), (a[:, 40:] - b[:, 40:]).abs().max()
            assert before <= (0 if backend == "emulated" else 1e-3 * a.abs().max()), (backend, experts, before)
            assert after > 0.1  # the change itself is seen
