"""
The fused element-wise kernels of nanoDeepSeek, written as plain PyTorch and fused by torch.compile.

Each kernel is a small eager function `*_ref` (the readable reference, what runs on CPU) and, next to it,
the same function wrapped in `torch.compile` (one fused Triton kernel per function on a GPU). There is no
hand-written Triton: inductor turns "read a tile, reduce its max, scale, cast" into a single pass over
memory, which is all a memory-bound kernel needs.

DeepSeek-V3 report sections: §3.3.2 (fine-grained quantization: 1×128 activation tiles, 128×128 weight
blocks, online max-abs scales, E4M3 everywhere), §3.3.3 (128×1 tiles for the Wgrad operands; power-of-2
scales), §2.1.1 (RoPE on the decoupled key/query), SwiGLU of the FFNs (§2.1.2) and RMSNorm.

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
- NOTE: only the quantizers and the SwiGLU kernels are used by the training path (fp8.py). model.py writes its
  RMSNorm and RoPE inline (train.py's torch.compile of the model fuses them there); rmsnorm/rope here are
  the same maths as standalone kernels, checked against float64 in tests/test_kernels.py.
- Speed: on an H200 (M=16384, K=7168) the compiled quantizers move 57% (1×128), 36% (128×1), 16% (requant
  128×1), 44% (128×128) and 40% (SwiGLU+1×128) of the measured copy bandwidth; the paper's hand-written
  kernels do better. Inductor's 128-element segmented reductions and transposed stores are the limit.

Run: python -m pytest tests/test_kernels.py -q

Dimension legend: M rows (tokens, B·T), K input features (the reduction dim of Fprop), N output features,
Mp/Kp/Np the same rounded up to a multiple of 128; B batch, T time, H heads, Dr RoPE head dim.
"""
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
    return F.pad(x, (0, r) if dim == 1 else (0, 0, 0, r))


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


def quant_1x128_ref(x: Tensor, pow2: bool = False) -> tuple[Tensor, Tensor]:
    """x (M, K) any float dtype -> q (M, Kp) e4m3, s (M, Kp/128) fp32 column-major; one scale per token
    per 128 channels, so an outlier only coarsens the 127 values that share its tile (§3.3.2)."""
    x = _pad_dim(x, 1)  # (M, Kp)
    M, Kp = x.shape
    t = x.float().view(M, Kp // TILE, TILE)  # (M, Kp/128, 128)
    s = _scale_from_amax(t.abs().amax(dim=-1), pow2)  # (M, Kp/128)
    q = _to_e4m3(t / s.unsqueeze(-1)).view(M, Kp)  # (M, Kp)
    return q, _col_major(s)


def quant_128x1_ref(x: Tensor, pow2: bool = False) -> tuple[Tensor, Tensor]:
    """x (M, N) -> the 128×1 (along tokens) quantization of x, returned as xᵀ in 1×128 layout:
    qT (Np, Mp) e4m3, sT (Np, Mp/128) fp32 column-major. Wgrad reduces over tokens, so both of its
    operands need tiles that run along M (§3.3.2, Fig. 6)."""
    x = _pad_dim(_pad_dim(x, 0), 1)  # (Mp, Np)
    Mp, Np = x.shape
    t = x.float().view(Mp // TILE, TILE, Np)  # (Mp/128, 128, Np)
    s = _scale_from_amax(t.abs().amax(dim=1), pow2)  # (Mp/128, Np)
    q = _to_e4m3(t / s.unsqueeze(1)).view(Mp, Np)  # (Mp, Np)
    return q.t().contiguous(), s.t()  # (Np, Mp), (Np, Mp/128) with strides (1, Np): column-major for free


def quant_128x128_ref(w: Tensor, pow2: bool = False) -> tuple[Tensor, Tensor]:
    """w (N, K) -> q (Np, Kp) e4m3, s (Np/128, Kp/128) fp32 row-major; one scale per 128×128 block.
    A block is square, so the quantization of wᵀ is just (q.t(), s.t()) — Dgrad reuses it."""
    w = _pad_dim(_pad_dim(w, 0), 1)  # (Np, Kp)
    Np, Kp = w.shape
    t = w.float().view(Np // TILE, TILE, Kp // TILE, TILE)  # (Np/128, 128, Kp/128, 128)
    s = _scale_from_amax(t.abs().amax(dim=(1, 3)), pow2)  # (Np/128, Kp/128)
    q = _to_e4m3(t / s[:, None, :, None]).view(Np, Kp)  # (Np, Kp)
    return q, s


def dequant_1x128_ref(q: Tensor, s: Tensor) -> Tensor:
    """q (M, Kp) e4m3, s (M, Kp/128) -> fp32 (M, Kp)."""
    M, Kp = q.shape
    return (q.float().view(M, Kp // TILE, TILE) * s.unsqueeze(-1)).view(M, Kp)  # (M, Kp)


def dequant_128x128_ref(q: Tensor, s: Tensor) -> Tensor:
    """q (Np, Kp) e4m3, s (Np/128, Kp/128) -> fp32 (Np, Kp)."""
    Np, Kp = q.shape
    t = q.float().view(Np // TILE, TILE, Kp // TILE, TILE)  # (Np/128, 128, Kp/128, 128)
    return (t * s[:, None, :, None]).view(Np, Kp)  # (Np, Kp)


def requant_128x1_ref(q: Tensor, s: Tensor, pow2: bool = False) -> tuple[Tensor, Tensor]:
    """Re-tile a cached 1×128 FP8 activation (q (M, Kp), s (M, Kp/128)) as 128×1 along tokens for Wgrad:
    dequantize and quantize again in one pass -> qT (Kp, Mp), sT (Kp, Mp/128). With pow2 scales on both
    sides most values survive exactly; with arbitrary scales this adds a second rounding (§3.3.3)."""
    return quant_128x1_ref(dequant_1x128_ref(q, s), pow2)


# ----------------------------------------------------------------------------------------------------------
# the model's element-wise ops: RMSNorm, SwiGLU (+ quantized output), RoPE


def rmsnorm_ref(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """x (..., D), weight (D,) -> (..., D) in x's dtype; statistics in fp32 (the paper keeps norms in
    high precision, §3.3)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)  # (..., D)
    return (y * weight.float()).to(x.dtype)


def swiglu_ref(a: Tensor, b: Tensor) -> Tensor:
    """SwiGLU's element-wise part: silu(a) * b with a = x W1ᵀ (gate), b = x W3ᵀ (up); (..., F) -> (..., F)."""
    return (F.silu(a.float()) * b.float()).to(a.dtype)


def swiglu_quant_ref(a: Tensor, b: Tensor, pow2: bool = False) -> tuple[Tensor, Tensor]:
    """silu(a) * b quantized 1×128 in the same pass: the SwiGLU output only ever feeds W2's FP8 GEMM, so it
    never needs to exist in BF16. a, b (M, F) -> q (M, Fp) e4m3, s (M, Fp/128)."""
    return quant_1x128_ref(F.silu(a.float()) * b.float(), pow2)


def swiglu_bwd_ref(a: Tensor, b: Tensor, dy: Tensor) -> tuple[Tensor, Tensor]:
    """Backward of y = silu(a)·b, recomputing silu from the cached inputs (§3.3.3 caches SwiGLU's inputs and
    recomputes its output). a, b, dy (M, F) -> da, db (M, F) in a's dtype."""
    af, bf, g = a.float(), b.float(), dy.float()
    sig = torch.sigmoid(af)
    silu = af * sig
    da = g * bf * sig * (1 + af * (1 - sig))  # d silu(a)/da = σ(a)(1 + a(1 − σ(a)))
    return da.to(a.dtype), (g * silu).to(b.dtype)


def rope_ref(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding on *interleaved* pairs (x0,x1),(x2,x3),... — the official DeepSeek-V3 layout, the
    real form of multiplying by the complex number freqs_cis = cos + i·sin.
    x (B, T, H, Dr), cos/sin (T, Dr/2) -> (B, T, H, Dr) in x's dtype."""
    B, T, H, Dr = x.shape
    xp = x.float().view(B, T, H, Dr // 2, 2)  # (B, T, H, Dr/2, 2)
    x0, x1 = xp[..., 0], xp[..., 1]  # (B, T, H, Dr/2) each
    c, s = cos.view(1, T, 1, Dr // 2), sin.view(1, T, 1, Dr // 2)  # (1, T, 1, Dr/2) each
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)  # (B, T, H, Dr/2, 2)
    return out.view(B, T, H, Dr).to(x.dtype)


def apply_rope(x: Tensor, freqs_cis: Tensor, compiled: bool = False) -> Tensor:
    """Entry taking model.py's table: freqs_cis (T, Dr/2, 2) holding (cos, sin), or the official code's
    complex (T, Dr/2). The split into cos/sin happens outside the kernel (inductor has no complex codegen)."""
    fr = torch.view_as_real(freqs_cis) if freqs_cis.is_complex() else freqs_cis  # (T, Dr/2, 2)
    return (rope if compiled else rope_ref)(x, fr[..., 0].contiguous(), fr[..., 1].contiguous())


# ----------------------------------------------------------------------------------------------------------
# the compiled versions: torch.compile is lazy, so nothing is compiled until a kernel is first called
# (on a GPU: ~1–2 s per kernel and shape family; on a 2-core CPU ~20 s, so the CPU path uses the *_ref).

# coordinate-descent tuning of the generated reduction: 0.193 -> 0.148 ms (44% -> 57% of copy bandwidth) for
# M=16384, K=7168 on an H200; it did not help quant_128x1, so only the 1×128 quantizer uses it
quant_1x128 = torch.compile(quant_1x128_ref, options={"coordinate_descent_tuning": True})
quant_128x1 = torch.compile(quant_128x1_ref)
quant_128x128 = torch.compile(quant_128x128_ref)
requant_128x1 = torch.compile(requant_128x1_ref)
dequant_1x128 = torch.compile(dequant_1x128_ref)
dequant_128x128 = torch.compile(dequant_128x128_ref)
rmsnorm = torch.compile(rmsnorm_ref)
swiglu = torch.compile(swiglu_ref)
swiglu_quant = torch.compile(swiglu_quant_ref)
swiglu_bwd = torch.compile(swiglu_bwd_ref)
rope = torch.compile(rope_ref)
