"""
The fused element-wise kernels of nanoDeepSeek, written as plain PyTorch and fused by torch.compile.

Each kernel is a small eager function `*_ref` (the readable reference, what runs on CPU) and, next to it,
its `torch.compile`d version (one fused Triton kernel per function on a GPU; for the quantizers, the part
after padding to whole tiles is what gets compiled, see the bottom of the file). There is no
hand-written Triton: inductor turns "read a tile, reduce its max, scale, cast" into a single pass over
memory, which is all a memory-bound kernel needs.

DeepSeek-V3 report sections: §3.3.2 (fine-grained quantization: 1×128 activation tiles, 128×128 weight
blocks, online max-abs scales, E4M3 everywhere), §3.3.3 (128×1 tiles for the Wgrad operands; power-of-2
scales), the SwiGLU of the FFNs (§2.1.2) fused with its FP8 quantization, and the AdamW update with BF16
moments (§3.3.3) as one pass per parameter.

Scale convention: every quantizer returns FP8 data `q` and fp32 *dequantization* scales `s` with
x ≈ q * s (s = amax / 448 per tile), i.e. the scale the FP8 GEMM multiplies its partial sums by.
Layouts are what torch._scaled_mm's blockwise mode (and our emulated GEMM) want, see fp8.py:
  1×128 (quant_1x128):    q (M, Kp) row-major,        s (M, Kp/128) column-major (stride (1, M))
  128×1 (quant_128x1):    returned *transposed*: qT (Np, Mp) row-major, sT (Np, Mp/128) column-major,
                          i.e. the 1×128 layout of xᵀ, ready to be a Wgrad operand (reduction over tokens)
  128×128 (quant_128x128): q (Np, Kp) row-major,      s (Np/128, Kp/128) row-major

Simplifications vs. the real thing:
- NOTE: shapes that are not multiples of 128 are zero-padded up to the next multiple (Kp, Np, Mp) inside the
  quantizers; the GEMM then runs on the padded operands and the caller slices the result. Zero padding is
  exact (it adds 0·0 products) but wastes work when a dimension is small (dim 64 → 128: 2× the FLOPs).
- NOTE: a tile whose max-abs is below AMAX_EPS (e.g. all zeros) gets the scale AMAX_EPS/448 instead of 0, so
  no NaN/inf scale or 0/0 can appear; its values quantize to (almost) zero, as they should.
- Out-of-range values are clamped to ±448 before the cast (CUDA's cast to e4m3fn gives NaN, not saturation).
- No fused transpose of FP8 data in registers: the 128×1 quantizer writes xᵀ with an ordinary transpose
  that inductor folds into its store.
- Only what fp8.py's training path calls lives here (and the two dequantizers the tests read FP8 back with).
  RMSNorm and RoPE have one implementation each, in model.py (train.py's torch.compile fuses them there).
- Speed: on an H200 (M=16384, K=7168) the compiled quantizers move 41% (1×128), 28% (128×1), 16% (requant
  128×1), 58% (128×128) and 33% (SwiGLU+1×128) of the measured copy bandwidth (the 1×128 figure with the
  autotuning it no longer gets, see quant_1x128 below); the paper's hand-written
  kernels do better. Inductor's 128-element segmented reductions and transposed stores are the limit, and
  the dynamic number of rows (below) costs 20-25% of the throughput of a kernel compiled for one shape.
  The weights' transposed copies (transpose_128x128) ran at ~390 GB/s in a v3-width step until compiled with 2-D
  tiles (below).

Run: python -m pytest tests/test_kernels.py -q

Dimension legend: M rows (tokens, B·T), K input features (the reduction dim of Fprop), N output features,
Mp/Kp/Np the same rounded up to a multiple of 128.
"""
import functools

import torch
import torch.nn.functional as F
from torch import Tensor

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # largest finite E4M3 value (S.1111.110 × 2^8); E4M3 has no inf
TILE = 128  # the quantization tile/block edge, and the promotion interval N_C of the FP8 GEMM (§3.3.2)
AMAX_EPS = 1e-30  # floor on a tile's max-abs: an all-zero tile gets a tiny finite scale, never 0 or NaN


# ----------------------------------------------------------------------------------------------------------
# helpers


def _pad_dim(x: Tensor, dim: int, mult: int = TILE) -> Tensor:
    """Zero-pad dimension `dim` of a 2-D tensor up to a multiple of `mult` (no copy if already a multiple)."""
    r = (-x.shape[dim]) % mult
    if r == 0:
        return x
    if x.dtype == E4M3:  # F.pad has no FP8 kernel: pad the bytes (0x00 is +0.0 in E4M3)
        return _pad_dim(x.view(torch.uint8), dim, mult).view(E4M3)
    return F.pad(x, (0, r) if dim == 1 else (0, 0, 0, r))


def _tiles_1x128(x: Tensor) -> Tensor:
    # (M, Kp) -> (M, Kp/128, 128): a view, one row of 128 per tile
    return x.view(x.shape[0], x.shape[1] // TILE, TILE)


def _scale_from_amax(amax: Tensor, pow2: bool) -> Tensor:
    """Dequantization scale s = amax/448 per tile; with pow2 it is rounded *up* to a power of two, so that
    x/s still fits in E4M3 and multiplying by s (or 1/s) is exact — no rounding error when a tensor is
    re-scaled or re-tiled (§3.3.3 uses such "round scaled" factors for the 1×128 → 128×1 conversion)."""
    s = amax.float().clamp(min=AMAX_EPS) / E4M3_MAX
    if pow2:
        s = torch.exp2(torch.ceil(torch.log2(s)))
    return s


def _to_e4m3(x: Tensor) -> Tensor:
    # clamp first: the division can land a hair above 448 through rounding, and CUDA casts overflow to NaN
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def _col_major(s: Tensor) -> Tensor:
    # same values, column-major strides (1, rows): each K-block's scales are contiguous, as cuBLAS wants
    return s.t().contiguous().t()


# ----------------------------------------------------------------------------------------------------------
# quantization: 1×128 (activations, output gradients), 128×1 (Wgrad operands), 128×128 (weights)
#
# Each quantizer is two parts. The public `*_ref(x)` pads x to whole tiles and views it as tiles (cheap
# glue: no copy unless a dimension is ragged); its `core` (`_q_*`) does the real pass over memory on the
# tiled view and is what gets compiled. Keeping the padding and reshaping out of the compiled part keeps
# the compiled part's sizes simple: a number of rows (dynamic, see below) times static tile sizes.


def _q_1x128(t: Tensor, pow2: bool) -> tuple[Tensor, Tensor]:
    # t (M, Kp/128, 128) -> q (M, Kp) e4m3, s (M, Kp/128) fp32 column-major
    tf = t.float()
    s = _scale_from_amax(tf.abs().amax(dim=-1), pow2)  # (M, Kp/128)
    return _to_e4m3(tf / s.unsqueeze(-1)).flatten(1), _col_major(s)


def quant_1x128_ref(x: Tensor, pow2: bool = False, core=_q_1x128) -> tuple[Tensor, Tensor]:
    """x (M, K) any float dtype -> q (M, Kp) e4m3, s (M, Kp/128) fp32 column-major; one scale per token
    per 128 channels, so an outlier only coarsens the 127 values that share its tile (§3.3.2)."""
    return core(_tiles_1x128(_pad_dim(x, 1)), pow2)


def _q_128x1(t: Tensor, pow2: bool) -> tuple[Tensor, Tensor]:
    # t (Mp/128, 128, Np) -> qT (Np, Mp) e4m3, sT (Np, Mp/128) fp32 column-major
    tf = t.float()
    s = _scale_from_amax(tf.abs().amax(dim=1), pow2)  # (Mp/128, Np)
    q = _to_e4m3(tf / s.unsqueeze(1)).flatten(0, 1)  # (Mp, Np)
    return q.t().contiguous(), s.t()  # (Np, Mp), (Np, Mp/128) with strides (1, Np): column-major for free


def quant_128x1_ref(x: Tensor, pow2: bool = False, core=_q_128x1) -> tuple[Tensor, Tensor]:
    """x (M, N) -> the 128×1 (along tokens) quantization of x, returned as xᵀ in 1×128 layout:
    qT (Np, Mp) e4m3, sT (Np, Mp/128) fp32 column-major. Wgrad reduces over tokens, so both of its
    operands need tiles that run along M (§3.3.2, Fig. 6)."""
    x = _pad_dim(_pad_dim(x, 0), 1)  # (Mp, Np)
    return core(x.view(x.shape[0] // TILE, TILE, x.shape[1]), pow2)


def _q_128x128(t: Tensor, pow2: bool) -> tuple[Tensor, Tensor]:
    # t (Np/128, 128, Kp/128, 128) -> q (Np, Kp) e4m3, s (Np/128, Kp/128) fp32
    tf = t.float()
    s = _scale_from_amax(tf.abs().amax(dim=(1, 3)), pow2)  # (Np/128, Kp/128)
    return _to_e4m3(tf / s[:, None, :, None]).flatten(0, 1).flatten(1), s


def quant_128x128_ref(w: Tensor, pow2: bool = False, core=_q_128x128) -> tuple[Tensor, Tensor]:
    """w (N, K) -> q (Np, Kp) e4m3, s (Np/128, Kp/128) fp32 row-major; one scale per 128×128 block.
    A block is square, so the quantization of wᵀ is just (q.t(), s.t()) — Dgrad reuses it."""
    w = _pad_dim(_pad_dim(w, 0), 1)  # (Np, Kp)
    Np, Kp = w.shape
    return core(w.view(Np // TILE, TILE, Kp // TILE, TILE), pow2)


def _dq_1x128(q: Tensor, s: Tensor) -> Tensor:
    # q (M, Kp/128, 128), s (M, Kp/128) -> fp32 (M, Kp)
    return (q.float() * s.unsqueeze(-1)).flatten(1)


def dequant_1x128_ref(q: Tensor, s: Tensor, core=_dq_1x128) -> Tensor:
    """q (M, Kp) e4m3, s (M, Kp/128) -> fp32 (M, Kp). The tests' way back; training dequantizes inside
    swiglu_bwd and the requantizers only."""
    return core(_tiles_1x128(q), s)


def dequant_128x128_ref(q: Tensor, s: Tensor) -> Tensor:
    """q (Np, Kp) e4m3, s (Np/128, Kp/128) -> fp32 (Np, Kp). Not on the training path (weights are never
    dequantized there); the tests' way back from FP8 to numbers."""
    Np, Kp = q.shape
    return (q.float().view(Np // TILE, TILE, Kp // TILE, TILE) * s[:, None, :, None]).view(Np, Kp)


def transpose_128x128_ref(q: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """Weights quantized in 128×128 blocks, q (E, Np, Kp) e4m3 and s (E, Np/128, Kp/128), as the blocks of their
    transposes (E, Kp, Np), (E, Kp/128, Np/128) row-major, the operand of Dgrad: a square block is the same block
    of Wᵀ. Compiled it is one tiled pass; eager PyTorch copied transposed 1-byte data at ~270 GB/s on an H200."""
    qT = q.view(torch.uint8).transpose(1, 2).contiguous()  # through uint8: a plain byte copy
    return qT.view(q.dtype), s.transpose(1, 2).contiguous()


def _rq_128x1(q: Tensor, s: Tensor, pow2: bool) -> tuple[Tensor, Tensor]:
    # q (Mp/128, 128, Kp/128, 128), s (Mp/128, 128, Kp/128) -> qT (Kp, Mp), sT (Kp, Mp/128)
    x = (q.float() * s.unsqueeze(-1)).flatten(2)  # (Mp/128, 128, Kp): dequantized, tiled along tokens
    return _q_128x1(x, pow2)


def requant_128x1_ref(q: Tensor, s: Tensor, pow2: bool = False, core=_rq_128x1) -> tuple[Tensor, Tensor]:
    """Re-tile a cached 1×128 FP8 activation (q (M, Kp), s (M, Kp/128)) as 128×1 along tokens for Wgrad:
    dequantize and quantize again in one pass -> qT (Kp, Mp), sT (Kp, Mp/128). With pow2 scales on both
    sides most values survive exactly; with arbitrary scales this adds a second rounding (§3.3.3)."""
    q, s = _pad_dim(q, 0), _pad_dim(s, 0)  # (Mp, Kp), (Mp, Kp/128): padded rows are 0 · 0
    (Mp, Kp), nk = q.shape, s.shape[1]
    return core(q.view(Mp // TILE, TILE, nk, TILE), s.view(Mp // TILE, TILE, nk), pow2)


# ----------------------------------------------------------------------------------------------------------
# SwiGLU's element-wise part: its output quantized in the same pass (forward), and in backward, from the inputs
# [a | b] cached in FP8, the recomputed output quantized 128×1 for W2's Wgrad, and the input gradients [da | db]


def _swiglu_q(a: Tensor, b: Tensor, pow2: bool) -> tuple[Tensor, Tensor]:
    # a, b (M, Fp/128, 128) -> silu(a)·b quantized 1×128
    return _q_1x128(F.silu(a.float()) * b.float(), pow2)


def swiglu_quant_ref(a: Tensor, b: Tensor, pow2: bool = False, core=_swiglu_q) -> tuple[Tensor, Tensor]:
    """silu(a) * b quantized 1×128 in the same pass: the SwiGLU output only ever feeds W2's FP8 GEMM, so it
    never needs to exist in BF16. a, b (M, F) -> q (M, Fp) e4m3, s (M, Fp/128)."""
    a, b = _pad_dim(a, 1), _pad_dim(b, 1)  # (M, Fp) each; padding is zero and silu(0)·0 = 0
    return core(_tiles_1x128(a), _tiles_1x128(b), pow2)


def _swiglu_q128x1(q: Tensor, s: Tensor, pow2: bool) -> tuple[Tensor, Tensor]:
    # q (Mp/128, 128, 2Fp/128, 128), s (Mp/128, 128, 2Fp/128) -> hT (Fp, Mp), shT (Fp, Mp/128)
    a, b = (q.float() * s.unsqueeze(-1)).flatten(2).chunk(2, dim=-1)  # (Mp/128, 128, Fp) each
    return _q_128x1(F.silu(a) * b, pow2)


def swiglu_quant_128x1_ref(q: Tensor, s: Tensor, pow2: bool = False, core=_swiglu_q128x1) -> tuple[Tensor, Tensor]:
    """The SwiGLU output recomputed in backward from its inputs [a | b] cached in FP8 (q (M, 2Fp), s (M, 2Fp/128),
    1×128) and quantized 128×1 along the tokens for W2's Wgrad, in one pass: hT (Fp, Mp), shT (Fp, Mp/128)."""
    q, s = _pad_dim(q, 0), _pad_dim(s, 0)  # (Mp, 2Fp), (Mp, 2Fp/128): padded rows are 0 · 0
    (Mp, n), nk = q.shape, s.shape[1]
    return core(q.view(Mp // TILE, TILE, nk, TILE), s.view(Mp // TILE, TILE, nk), pow2)


def _swiglu_bwd(q: Tensor, s: Tensor, dh: Tensor) -> Tensor:
    # q (M, 2Fp/128, 128), s (M, 2Fp/128), dh (M, Fp) -> [da | db] (M, 2Fp)
    a, b = _dq_1x128(q, s).chunk(2, dim=1)  # (M, Fp) each
    g, sig = dh.float(), torch.sigmoid(a)
    da = g * b * sig * (1 + a * (1 - sig))  # d silu(a)/da = σ(a)(1 + a(1 − σ(a)))
    return torch.cat([da, g * a * sig], dim=1).to(dh.dtype)  # db = dh · silu(a)


def swiglu_bwd_ref(q: Tensor, s: Tensor, dh: Tensor, core=_swiglu_bwd) -> Tensor:
    """Backward of h = silu(a)·b from its inputs [a | b] cached in FP8 (q (M, 2Fp), s (M, 2Fp/128)), §3.3.3:
    dh (M, Fp) -> [da | db] (M, 2Fp) in dh's dtype, the one operand of the fused W1/W3 Dgrad and Wgrad."""
    return core(_tiles_1x128(q), s, dh)


# ----------------------------------------------------------------------------------------------------------
# the optimizer's update (§3.3.3: BF16 moments, FP32 master weights), one pass over memory per parameter


def adamw_bf16_ref(w: Tensor, g: Tensor, m: Tensor, v: Tensor, step: Tensor, lr_wd: Tensor,
                   b1: float, b2: float, eps: float) -> None:
    """One torch.optim.AdamW step, in place: w the fp32 (master) weight, g its gradient, m and v the moments
    stored in BF16 (updated in fp32, stored rounded), step a 0-d fp32 count (incremented here), lr_wd (2,)
    fp32 [lr, weight decay]. lr and the step are tensors, so a new learning rate is not a new compiled kernel.
    Reads 4+4+2+2 and writes 4+2+2 bytes per parameter, where a chain of _foreach_ passes moved ~5× that."""
    step.add_(1)
    gf = g.float()
    mf = torch.lerp(m.float(), gf, 1 - b1)  # m = β1 m + (1-β1) g
    vf = v.float() * b2 + (1 - b2) * gf * gf  # v = β2 v + (1-β2) g²
    m.copy_(mf)
    v.copy_(vf)
    lr, wd = lr_wd[0], lr_wd[1]
    denom = (vf / (1 - b2 ** step)).sqrt() + eps  # sqrt(v / (1-β2^t)) + eps
    w.mul_(1 - lr * wd).sub_(lr / (1 - b1 ** step) * mf / denom)  # decoupled decay, then the Adam step


# ----------------------------------------------------------------------------------------------------------
# the compiled versions: torch.compile is lazy, so nothing is compiled until a kernel is first called
# (on a GPU: ~1–2 s per kernel and variant; on a 2-core CPU ~20 s, so the CPU path uses the *_ref).
#
# One model calls each kernel with many shapes: every weight has its own (N, K), every expert its own token
# count each step. Compiled for fixed shapes, each new token count would be a recompile, and dynamo gives up
# after recompile_limit (8) of them and runs the eager code (what first happened to
# `train.py --config gpu --fp8=True`). Fully dynamic shapes (dynamic=True) are no better: on an H200 the
# quantizers ran 2-4× slower (every size, strides included, unknown when the kernel is generated), and
# torch 2.11's inductor failed an assertion on the symbolic size M + (-M mod 128) when the padding was
# compiled in. So the split DeepGEMM makes too (N and K fixed when a kernel is compiled, M a runtime value):
# the number of rows (tokens, or tiles of 128 tokens) is dynamic, every other size is static. `_compile`
# marks dim 0 of every input dynamic and the rest static (weights: all static), detaches the inputs
# (requires_grad is part of a compiled graph's guard), and raises the recompile limit, only while one of
# these kernels runs (importing this file changes no global setting), for the variants that remain different
# kernels: each feature width, the input dtype (BF16 activations, FP32 weights), pow2 on or off, a
# contiguous input or a column slice of a wider one.
RECOMPILE_LIMIT = 64


def _compile(fn, dynamic_rows: bool = True, **options):
    compiled = torch.compile(fn, options=options or None)

    @functools.wraps(fn)
    def run(*args):
        args = [a.detach() if isinstance(a, Tensor) else a for a in args]
        for a in args:
            if isinstance(a, Tensor):
                if dynamic_rows:
                    torch._dynamo.maybe_mark_dynamic(a, 0)
                for d in range(1 if dynamic_rows else 0, a.dim()):
                    torch._dynamo.mark_static(a, d)
        with torch._dynamo.config.patch(recompile_limit=max(RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)):
            return compiled(*args)
    return run


def _with_core(ref, core):
    """ref's glue around a compiled core: same signature and results as ref."""
    return functools.update_wrapper(functools.partial(ref, core=core), ref)


# No autotuning: coordinate-descent tuning made quant_1x128 faster (0.193 -> 0.148 ms for M=16384, K=7168 on an
# H200, compiled for that one shape) but runs again for every width and dtype at the first FP8 step, which took
# 97 s on the v3-width preset with it (bench/bench_fp8_train.py, 2026-12-01); README gives the time without it.
quant_1x128 = _with_core(quant_1x128_ref, _compile(_q_1x128))
quant_128x1 = _with_core(quant_128x1_ref, _compile(_q_128x1))
quant_128x128 = _with_core(quant_128x128_ref, _compile(_q_128x128, dynamic_rows=False))  # weights
requant_128x1 = _with_core(requant_128x1_ref, _compile(_rq_128x1))
swiglu_quant = _with_core(swiglu_quant_ref, _compile(_swiglu_q))
# dynamic E: one kernel per weight shape. Tiled in 2-D (inductor's prefer_nd_tiling: each program a tile of rows ×
# columns): with the default tiling a v3-width step's 44 transposes took 16.9 ms of GPU time (~390 GB/s; H200,
# bench/bench_fp8_train.py --profile=fp8, 2026-12-02), with 2-D tiles none is among its 40 largest entries (< 4 ms)
transpose_128x128 = _compile(transpose_128x128_ref, **{"triton.prefer_nd_tiling": True})
swiglu_quant_128x1 = _with_core(swiglu_quant_128x1_ref, _compile(_swiglu_q128x1))
swiglu_bwd = _with_core(swiglu_bwd_ref, _compile(_swiglu_bwd))


_adamw = torch.compile(adamw_bf16_ref)


def adamw_bf16(w: Tensor, g: Tensor, m: Tensor, v: Tensor, step: Tensor, lr_wd: Tensor,
               b1: float, b2: float, eps: float) -> None:
    """adamw_bf16_ref compiled: each parameter flattened to 1-D with a dynamic length (one kernel for all shapes),
    b1, b2 and eps constants of the kernel. In a v3-width step (H200, 2026-12-02) its 263 launches took 23.7 ms
    of GPU time for 3.51B parameters (~3.0 TB/s, 70% of copy bandwidth). The host's cost per call matters as
    much: with the floats dynamic too (dynamic=True) a call took ~2× as long on a CPU, and the GPU waited."""
    flat = [t.view(-1) for t in (w, g, m, v)]
    for t in flat:
        torch._dynamo.maybe_mark_dynamic(t, 0)
    _adamw(*flat, step, lr_wd, b1, b2, eps)
