"""
FP8 mixed-precision training, the DeepSeek-V3 way (§3.3): every Linear inside the Transformer blocks runs
its three GEMMs in FP8 with fine-grained scaling; everything else stays in BF16/FP32.

How FP8 training works. A Linear y = x Wᵀ costs three matrix products per step: Fprop (y = x·Wᵀ), Dgrad
(dx = dy·W) and Wgrad (dW = dyᵀ·x). These are ~all of a transformer's FLOPs, and Hopper's tensor cores do
them twice as fast in FP8 as in BF16. FP8 has only 8 bits, so each operand is stored as FP8 values q plus
fp32 scale factors s with x ≈ q·s, and the GEMM multiplies the scales back in. The master weights, the
weight gradients and the optimizer stay in higher precision; the FP8 copies are made on the fly ("online")
from the current tensors each step, from the max-abs of each tile, so no scale history is needed.

Why E4M3 everywhere. E4M3 (4 exponent bits, 3 mantissa bits, max 448) is precise but has little range;
E5M2 has range but only 2 mantissa bits. The usual recipe (Transformer Engine) uses E5M2 for gradients
because one scale per *tensor* must cover the whole tensor's range. DeepSeek-V3 makes scales fine-grained
instead: one scale per small tile means a tile only needs to cover its own range, so the precise format
wins for all tensors, gradients included.

Why 1×128 and 128×128. Activations have outlier channels and outlier tokens; a 1×128 tile (one token,
128 channels) confines an outlier's damage to 127 neighbours. Weights are smoother, and a square 128×128
block is the same block whether W is read by rows (Fprop) or by columns (Dgrad): the weight is quantized
once and its transpose is (qᵀ, sᵀ). A scale is constant along a 128-wide stretch of the reduction dim K
for both operands, so it can be applied once per 128-chunk instead of once per product.

The promotion interval. Hopper's FP8 tensor cores accumulate with only about 14 bits of precision, which
costs ~2% relative error over K = 4096 (§3.3.2). DeepSeek-V3 therefore promotes: after every N_C = 128
elements of K the tensor core's partial sum is multiplied by (s_a · s_b) of that chunk and added to an
FP32 accumulator on the CUDA cores. Our emulated GEMM is exactly that loop: per 128-chunk, FP8 values
(exact in fp32) are multiplied and summed in fp32, scaled, and accumulated in fp32 (inside a chunk it is
more precise than the hardware: fp32, not ~14 bits). The hardware back end is cuBLAS's blockwise-scaled
FP8 GEMM behind torch._scaled_mm, which applies the scales per 128-chunk in the same way.

torch._scaled_mm layout rules (blockwise scaling: sm90, cuBLAS ≥ 12.9; probed on an H200, torch 2.11+cu130,
bench/bench_fp8.py --probe): out = (a·s_a)(b·s_b) for a (M, K) row-major and b (K, N) *column-major* FP8 (our
(N, K) row-major operand as b.t()); a's 1×128 scales (M, K/128) fp32 column-major; b's scales (K/128, N/128)
column-major for 128×128 blocks, (K/128, N) row-major for 1×128 tiles. Fprop and Dgrad are 1×128 × 128×128,
Wgrad 1×128 × 1×128 with both tiles along the tokens; all matched the emulated GEMM to 1.3e-4 (fp32 output).
Quirks, handled by zero padding in gemm_hopper: K/128 = 5 with 128×128 blocks returned garbage (K is padded to
a multiple of 4·128); M = 1 and M = 243 rows were refused while 8, 16, 32, 64, 200, 256 ran (rows padded to a
multiple of 16). The probe that picks the back end runs such awkward shapes first.

What we simplify (vs. the DeepSeek-V3 framework):
- NOTE: the input of attention's output projection wo is cached in its own dtype (BF16 under autocast), not
  the paper's E5M6; its FP8 quantization uses power-of-2 scales as in §3.3.3.
- NOTE: SwiGLU FFNs (dense, experts, shared) are one fused FP8 function that caches x and the SwiGLU inputs
  in FP8 and recomputes the SwiGLU output in backward (§3.3.3). Dispatch/combine stay BF16 (no FP8 all-to-all).
- No grouped FP8 GEMM kernel: torch 2.11 has none with blockwise scales on sm90 (`_scaled_grouped_mm` takes
  rowwise scales only), so each expert is one `_scaled_mm` on views of whole-layer buffers, which costs one
  host read of the E token counts per MoE layer. convert_to_fp8(experts=False) keeps narrow experts in BF16.
- Dimensions that are not multiples of 128 are zero-padded in the quantizers (exact, but a 64-wide layer does
  a 128-wide GEMM). Weights are quantized once per optimizer step; no delayed scaling (none needed).
- The cached 1×128 FP8 activations are re-tiled to 128×1 for Wgrad by dequantize + quantize: a second
  rounding (the paper's kernels transpose FP8 tiles directly).
- The GEMMs are cuBLAS's (not DeepGEMM); quantizers and transposes are torch.compile'd PyTorch at 10-60% of
  the copy bandwidth on an H200 (bench/bench_fp8.py, README), not fused into the GEMMs as in the paper.
- AdamW moments are BF16 with round-to-nearest; fine for β2 = 0.95 (§4.2), but a BF16 second moment stops
  decaying for β2 ≥ ~0.996 (1 − β2 falls below BF16's half-ulp), so keep β2 ≤ 0.99 with AdamWBF16.

Run: python -m pytest tests/test_fp8.py -q      (bench on an H200: python bench/bench_fp8.py)

Dimension legend: M tokens (B·T flattened), K in_features, N out_features, F hidden width of a SwiGLU FFN,
Mp/Kp/Np/Fp rounded up to a multiple of 128; B batch, T time, D model dim.
"""
import functools
import weakref
from itertools import chain
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook

import kernels

TILE = kernels.TILE
BACKENDS = ("auto", "hopper", "emulated")  # auto: hopper where its probe passes on this device, else emulated
ROW_ALIGN = 16  # the hardware path pads the rows of a to a multiple of this (see gemm_hopper)


def _k(name: str, x: Tensor):
    """The compiled kernel on a GPU, its eager reference on a CPU (compiling costs more than it saves there) and
    while an outer torch.compile traces the layer (which then fuses the reference with its neighbours)."""
    return getattr(kernels, name if x.is_cuda and not torch.compiler.is_compiling() else name + "_ref")


# ----------------------------------------------------------------------------------------------------------
# the two GEMM back ends: out (M, N) = a (M, Kp) · b (N, Kp)ᵀ, a scaled 1×128, b scaled 128×128 or 1×128


class HopperGemms(NamedTuple):
    """Which scale combinations run on the hardware (the rest run emulated)."""
    blockwise: bool  # a 1×128 · b 128×128: Fprop and Dgrad
    tilewise: bool  # a 1×128 · b 1×128, both tiled along the reduction dim: Wgrad


EMULATED = HopperGemms(False, False)


def gemm_emulated(qa: Tensor, sa: Tensor, qb: Tensor, sb: Tensor, out_dtype: torch.dtype,
                  out: Tensor | None = None) -> Tensor:
    """Blockwise-scaled FP8 GEMM in plain PyTorch, accumulating in fp32 with promotion every 128 of K.
    qa (M, Kp) e4m3, sa (M, Kp/128); qb (N, Kp) e4m3, sb (N/128, Kp/128) [128×128] or (N, Kp/128) [1×128].
    With `out` (M, N) the result is written there."""
    M, Kp = qa.shape
    N = qb.shape[0]
    sb_rows = sb if sb.shape[0] == N else sb.repeat_interleave(TILE, dim=0)  # (N, Kp/128): scale of b's row n
    a, b = qa.float(), qb.float()  # FP8 values are exact in fp32
    acc = torch.zeros(M, N, dtype=torch.float32, device=qa.device)
    for k in range(Kp // TILE):
        c = slice(k * TILE, (k + 1) * TILE)
        part = a[:, c] @ b[:, c].t()  # (M, N): the products of one 128-chunk of K, summed in fp32
        acc.addcmul_(part, sa[:, k, None] * sb_rows[None, :, k])  # promote: scale the chunk, add in fp32
    return acc.to(out_dtype) if out is None else out.copy_(acc)


def _pad_cols(q: Tensor, n: int) -> Tensor:
    # zero columns appended to FP8 data (padding through uint8: 0x00 is +0.0 in E4M3)
    return F.pad(q.view(torch.uint8), (0, n)).view(q.dtype)


def gemm_hopper(qa: Tensor, sa: Tensor, qb: Tensor, sb: Tensor, out_dtype: torch.dtype,
                out: Tensor | None = None) -> Tensor:
    """The same product on cuBLAS's blockwise FP8 GEMM (sm90). Same arguments as gemm_emulated; qa and qb
    may be row slices (qa) or column slices (both, Wgrad) of larger row-major tensors."""
    M, nk = sa.shape
    blocks = sb.shape[0] != qb.shape[0]  # b in 128×128 blocks (else 1×128 tiles)
    if blocks and nk % 4:  # with K/128 = 5 cuBLAS returned garbage (128×128 scales): zero-pad K to a multiple of 512
        r = -nk % 4
        qa, qb = _pad_cols(qa, r * TILE), _pad_cols(qb, r * TILE)
        sa, sb = F.pad(sa, (0, r), value=1.0), F.pad(sb, (0, r), value=1.0)
    if M % ROW_ALIGN:  # M = 1 and M = 243 were refused (8, 16, 200, 256 ran): pad with zero rows
        assert out is None, "gemm_hopper(out=...) needs rows padded by the caller"
        r = -M % ROW_ALIGN
        qa = F.pad(qa.view(torch.uint8), (0, 0, 0, r)).view(qa.dtype)
        sa = F.pad(sa, (0, 0, 0, r), value=1.0)
    sa = sa.t().contiguous().t()  # (M, K/128) column-major, stride (1, M) (no copy if it already is)
    # b's scales as torch wants them: 1×128 tiles (N, K/128) -> (K/128, N) row-major; 128×128 blocks
    # (N/128, K/128) -> its transpose (K/128, N/128), column-major. No copy for what our quantizers make.
    sb = sb.contiguous().t() if blocks else sb.t().contiguous()
    if out is not None:
        return torch._scaled_mm(qa, qb.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype, out=out)
    return torch._scaled_mm(qa, qb.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype)[:M]


@functools.cache
def _probe_hopper(idx: int) -> HopperGemms:
    """Run both scale combinations once on awkward shapes (rows not a multiple of 16, K/128 = 5) and compare
    with the emulated GEMM; any refusal or mismatch -> emulated. Cached: one probe per device and process."""
    if torch.cuda.get_device_capability(idx) < (9, 0) or not hasattr(torch, "_scaled_mm"):
        return EMULATED
    g = torch.Generator(device=f"cuda:{idx}").manual_seed(0)
    ok = []
    for quant_b in (kernels.quant_128x128_ref, kernels.quant_1x128_ref):
        good = True
        for M in (243, 5, 256):
            a = torch.randn(M, 640, device=f"cuda:{idx}", generator=g)
            b = torch.randn(384, 640, device=f"cuda:{idx}", generator=g)
            (qa, sa), (qb, sb) = kernels.quant_1x128_ref(a), quant_b(b)
            try:
                hw = gemm_hopper(qa, sa, qb, sb, torch.float32)
            except (RuntimeError, NotImplementedError):
                good = False
                break
            ref = gemm_emulated(qa, sa, qb, sb, torch.float32)
            good = good and bool(((hw - ref).norm() / ref.norm()) < 1e-3)  # fp32: only summation order differs
        ok.append(good)
    return HopperGemms(*ok)


def hopper_gemms(backend: str, device: torch.device) -> HopperGemms:
    """What runs on the hardware for a layer with this back end on this device (probed once per device)."""
    if backend == "emulated" or device.type != "cuda":
        if backend == "hopper":
            raise RuntimeError(f"backend='hopper' needs a CUDA device, got {device}")
        return EMULATED
    hw = _probe_hopper(device.index if device.index is not None else torch.cuda.current_device())
    if backend == "hopper" and not hw.blockwise:
        raise RuntimeError("backend='hopper' but blockwise torch._scaled_mm does not work on this device")
    return hw


# The hardware GEMM as an operator torch.compile keeps whole (a custom op: its output's shape is all the compiler
# needs to know), so that an FP8 layer traced into a compiled Block does not break the graph: the quantizers
# around the GEMM are traced and fused with their neighbours, the GEMM itself is cuBLAS's.
@torch.library.custom_op("nanodeepseek::fp8_gemm_hopper", mutates_args=())
def _gemm_hopper_op(qa: Tensor, sa: Tensor, qb: Tensor, sb: Tensor, out_dtype: torch.dtype) -> Tensor:
    return gemm_hopper(qa, sa, qb, sb, out_dtype).contiguous()


@_gemm_hopper_op.register_fake
def _(qa: Tensor, sa: Tensor, qb: Tensor, sb: Tensor, out_dtype: torch.dtype) -> Tensor:
    return qa.new_empty(qa.shape[0], qb.shape[0], dtype=out_dtype)


def fp8_gemm(qa: Tensor, sa: Tensor, qb: Tensor, sb: Tensor, out_dtype: torch.dtype, hw: HopperGemms,
             out: Tensor | None = None) -> Tensor:
    """a·bᵀ on the hardware where `hw` says it works for these scales, else emulated."""
    ok = hw.tilewise if sb.shape[0] == qb.shape[0] else hw.blockwise  # b in 1×128 tiles (Wgrad) or 128×128 blocks
    if ok and out is None:
        return _gemm_hopper_op(qa, sa, qb, sb, out_dtype)
    return (gemm_hopper if ok else gemm_emulated)(qa, sa, qb, sb, out_dtype, out)


# ----------------------------------------------------------------------------------------------------------
# FP8 weights, made once per optimizer step: the forward of every micro-batch and the evaluation in between reuse
# one quantization (and its transposed copy, which Dgrad reads). The cache must notice every change of a weight,
# and it is made eagerly, never inside a compiled graph (a graph reads the FP8 copies as its inputs):
# - after every step of a torch.optim.Optimizer (torch calls a global hook) for the weights that optimizer holds.
#   Torch's fused optimizers (`torch.optim.AdamW(fused=True)`, what train.py uses on a GPU) write the parameters
#   without bumping their version counters -- keyed on the version alone, the cache once served the first step's
#   FP8 weights for a whole run (the FP8 layers never trained, and the GPU loss curve looked *better* than BF16's);
# - before the forward of a converted model (a pre-hook convert_to_fp8 adds) and in an FP8 layer's eager forward,
#   when a weight's version or address has changed (a checkpoint load, `p.mul_()`, `model.to()`).
_live = weakref.WeakSet()  # the FP8 modules whose cache was ever made (a cache never used stays empty)


@functools.cache
def _refresh_after_optimizer_steps() -> None:
    def refresh(opt, args, kwargs):
        held = {id(p) for g in opt.param_groups for p in g["params"]}
        _quantize([m for m in list(_live) if any(id(w) in held for w in m.fp8_weights())])
    register_optimizer_step_post_hook(refresh)  # registered once per process, at the first FP8 cache made


STACK_MAX = 2 ** 22  # weights up to this many elements are stacked in fp32 and quantized in one call (_quant_stack)


def _quant_stack(ws: list[Tensor]) -> tuple[Tensor, Tensor]:
    """E matrices (N, K) -> q (E, Np, Kp) e4m3, s (E, Np/128, Kp/128), each in its own 128×128 blocks. Small ones
    are stacked first and quantized by one call (a compiled kernel's call costs the host ~0.1 ms, more than the GPU
    needs to copy a 1024×1024 weight); large ones are quantized where they lie and stacked in FP8 (1 byte per
    value to copy, where stacking the fp32 weights would move 4)."""
    N, K = ws[0].shape
    if ws[0].numel() > STACK_MAX:
        qs = [_k("quant_128x128", w)(w) for w in ws]
        return torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])
    w = torch.stack(ws)  # (E, N, K)
    if N % TILE or K % TILE:
        w = F.pad(w, (0, -K % TILE, 0, -N % TILE))  # each matrix padded alone: no block spans two of them
    E, Np, Kp = w.shape
    q, s = _k("quant_128x128", w)(w.view(E * Np, Kp))
    return q.view(E, Np, Kp), s.view(E, Np // TILE, Kp // TILE)


def _quantize(mods: list["CachedFp8Weights"]) -> None:
    """Make the FP8 caches of these modules: each matrix of `fp8_groups()` in 128×128 blocks (Fprop's operand) and
    its blocks transposed (Dgrad's). Matrices of one shape are quantized and transposed together, whichever module
    they belong to, so refreshing a model after an optimizer step is a few calls per weight shape, not a few per
    layer: with one call per layer the host took longer than the GPU's whole step (gpu preset, README)."""
    jobs = {}  # (N, K, r, dtype, device) -> [(module, index of its matrix, weights)]
    for m in mods:
        groups = m.fp8_groups()
        m.fp8_fwd, m.fp8_bwd = [None] * len(groups), [None] * len(groups)
        for j, (ws, r) in enumerate(groups):
            jobs.setdefault((*ws[0].shape, r, ws[0].dtype, ws[0].device), []).append((m, j, ws))
    for (N, K, r, _, dev), items in jobs.items():
        with torch.no_grad(), torch.autocast(dev.type, enabled=False):  # FP8 has no autocast
            q, s = _quant_stack([w.detach() for *_, ws in items for w in ws])  # (n, Np, Kp), (n, Np/128, Kp/128)
            q, s = q.view(-1, r * q.shape[1], q.shape[2]), s.view(-1, r * s.shape[1], s.shape[2])  # r rows each
            qT, sT = _k("transpose_128x128", q)(q, s)  # Wᵀ's blocks
        a = 0
        for m, j, ws in items:
            e = len(ws) // r
            m.fp8_fwd[j], m.fp8_bwd[j] = (q[a:a + e], s[a:a + e]), (qT[a:a + e], sT[a:a + e])
            a += e
    for m in mods:
        ws = m.fp8_weights()
        m.fp8_key, m.fp8_hw = m.fp8_version(), hopper_gemms(m.backend, ws[0].device)
        _live.add(m)  # (here, not in __init__: a deep copy of the module is a new one)
    if mods:
        _refresh_after_optimizer_steps()


class CachedFp8Weights:
    """Mixin of the FP8 modules below: FP8 copies of the module's weights (`fp8_weights()`, grouped into the
    matrices the GEMMs read by `fp8_groups()`), made by _quantize, read by the forward through fp8_cache. `fp8_fwd`
    [(q, s) per matrix group] is what Fprop reads, `fp8_bwd` the transposed blocks Dgrad reads, `fp8_hw` what the
    layer's back end runs on the hardware of the weights' device."""
    fp8_key = fp8_fwd = fp8_bwd = fp8_hw = None

    def fp8_groups(self) -> list[tuple[list[Tensor], int]]:
        """[(weights, r)]: each group is E = len(weights) / r matrices of r weights stacked along the rows."""
        raise NotImplementedError

    def fp8_weights(self) -> list[Tensor]:
        return [w for ws, _ in self.fp8_groups() for w in ws]

    def fp8_version(self) -> tuple:
        return tuple((w._version, w.data_ptr(), w.dtype) for w in self.fp8_weights())

    @torch.compiler.disable  # eager, also where a compiled graph calls it (a layer never run before)
    def refresh_fp8(self, force: bool = False) -> None:
        if force or self.fp8_version() != self.fp8_key:
            _quantize([self])

    def fp8_cache(self) -> list[Tensor]:
        """q, s of each matrix, then of each transpose: checked eagerly; inside a compiled graph read as they are
        (the hooks above keep them current), made there only if they never were."""
        if self.fp8_fwd is None or not torch.compiler.is_compiling():
            self.refresh_fp8()
        return [t for q_s in (*self.fp8_fwd, *self.fp8_bwd) for t in q_s]


def _swiglu_groups(mlps) -> list[tuple[list[Tensor], int]]:
    """W1 and W3 of each FFN stacked along the rows (they read the same x; W3 starts at row Fp): (E, 2Fp, Dp);
    W2 of each: (E, Dp, Fp)."""
    return [([w for m in mlps for w in (m.w1.weight, m.w3.weight)], 2), ([m.w2.weight for m in mlps], 1)]


# ----------------------------------------------------------------------------------------------------------
# GEMMs over row segments: a Linear or one FFN is one segment of any number of rows; the routed experts of a
# layer are one segment each, every (token, expert) pair sorted by expert and each expert's rows padded with zero
# rows to a multiple of 128 (DeepGEMM's "contiguous" layout). Each whole operand is quantized once: a 1×128 tile
# lies in one row and a 128×1 tile (Wgrad) never crosses a segment, so the tiles are those of each expert alone.
# Per expert runs one GEMM on views of the shared buffers, into slices of one output (nothing for an empty one).
# Slicing cannot give one layout: cuBLAS wants an expert's 1×128 scales (rows, K/128) column-major with leading
# dim `rows`, so the scales of the a operands are rearranged segment by segment in one scatter (_segment_scales).


class Segments(NamedTuple):  # the experts' segments (None where a GEMM is one segment: a Linear, one FFN)
    bounds: list[tuple[int, int]]  # (first row, rows) of each expert, on the host
    row_start: Tensor  # (M,) first row of the segment each row is in, on the device
    row_count: Tensor  # (M,) rows of that segment


def _segment_scales(s: Tensor, seg: Segments) -> list[Tensor]:
    """1×128 scales s (M, nk) -> per segment a (rows, nk) view with stride (1, rows)."""
    M, nk = s.shape
    start, rows = seg.row_start[:, None], seg.row_count[:, None]  # (M, 1) each
    local = torch.arange(M, device=s.device)[:, None] - start  # (M, 1): row index inside its segment
    dest = start * nk + torch.arange(nk, device=s.device) * rows + local  # (M, nk): where s[r, k] goes
    flat = s.new_empty(M * nk).index_copy_(0, dest.flatten(), s.flatten())  # segment after segment, each (nk, rows)
    return [flat[a * nk:(a + r) * nk].view(nk, r).t() for a, r in seg.bounds]


def _grouped(qa: Tensor, sa: Tensor, qb: Tensor, sb: Tensor, seg: Segments | None, dtype: torch.dtype,
             hw: HopperGemms) -> Tensor:
    """out (M, Nb) = the rows of segment e times b[e]ᵀ: qa (M, Kp) 1×128, qb (E, Nb, Kp) 128×128 blocks."""
    if seg is None:  # one segment (a Linear, one FFN): any number of rows
        return fp8_gemm(qa, sa, qb[0], sb[0], dtype, hw)
    out = qa.new_empty(qa.shape[0], qb.shape[1], dtype=dtype)  # (M, Nb)
    for e, ((a, r), sa_e) in enumerate(zip(seg.bounds, _segment_scales(sa, seg))):
        if r:
            fp8_gemm(qa[a:a + r], sa_e, qb[e], sb[e], dtype, hw, out=out[a:a + r])
    return out


def _grouped_wgrad(dy: Tensor, qxT: Tensor, sxT: Tensor, seg: Segments | None, hw: HopperGemms) -> Tensor:
    """dW[e] = dy[rows of e]ᵀ · x[rows of e] in fp32, (E, Np, Kp): dy (M, N) and xᵀ (qxT (Kp, Mp), sxT) tiled
    128×1 along the tokens; an expert's operands are column slices of the whole, its tiles are whole tiles."""
    qdyT, sdyT = _k("quant_128x1", dy)(dy)  # (Np, Mp), (Np, Mp/128)
    if seg is None:
        return fp8_gemm(qdyT, sdyT, qxT, sxT, torch.float32, hw)[None]
    dw = dy.new_empty(len(seg.bounds), qdyT.shape[0], qxT.shape[0], dtype=torch.float32)  # (E, Np, Kp)
    for e, (a, r) in enumerate(seg.bounds):
        if r:
            t = slice(a // TILE, (a + r) // TILE)
            fp8_gemm(qdyT[:, a:a + r], sdyT[:, t], qxT[:, a:a + r], sxT[:, t], torch.float32, hw, out=dw[e])
    return dw


# ----------------------------------------------------------------------------------------------------------
# the FP8 Linear: Fprop, Dgrad and Wgrad of y = x Wᵀ


class _Fp8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, qw: Tensor, sw: Tensor, qwT: Tensor, swT: Tensor,
                out_dtype: torch.dtype, hw: HopperGemms, pow2: bool, cache_hp: bool) -> Tensor:
        # qw (1, Np, Kp), sw (1, Np/128, Kp/128): W quantized once per optimizer step; qwT, swT its transpose
        N, K = weight.shape
        x2 = x.reshape(-1, K)  # (M, K)
        qx, sx = _k("quant_1x128", x2)(x2, pow2)  # (M, Kp), (M, Kp/128)
        y = _grouped(qx, sx, qw, sw, None, out_dtype, hw)[:, :N]  # Fprop: (M, N)
        # the activation cache: x in FP8 (1 byte + 4/128 bytes of scale per value), or x itself (wo's input)
        ctx.save_for_backward(*((x2,) if cache_hp else (qx, sx)), qwT, swT)
        ctx.meta = (x.shape, x.dtype, weight.dtype, hw, pow2, cache_hp)
        return y.reshape(*x.shape[:-1], N)  # (..., N)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x_shape, x_dtype, w_dtype, hw, pow2, cache_hp = ctx.meta
        *xs, qwT, swT = ctx.saved_tensors
        N, K = dy.shape[-1], x_shape[-1]
        dy2 = dy.reshape(-1, N)  # (M, N)
        dx = dw = None
        with torch.autocast(dy.device.type, enabled=False):
            if ctx.needs_input_grad[0]:  # Dgrad, dx = dy·W: dy 1×128 along N, W's cached transposed blocks
                qdy, sdy = _k("quant_1x128", dy2)(dy2)  # (M, Np), (M, Np/128)
                dx = _grouped(qdy, sdy, qwT, swT, None, x_dtype, hw)[:, :K].reshape(x_shape)  # (..., K)
            if ctx.needs_input_grad[1]:  # Wgrad, dW = dyᵀ·x in fp32: both tiled 128×1 along the tokens
                if cache_hp:
                    qxT, sxT = _k("quant_128x1", xs[0])(xs[0], pow2)  # (Kp, Mp), (Kp, Mp/128)
                else:
                    qxT, sxT = _k("requant_128x1", xs[0])(*xs, pow2)  # 1×128 cache re-tiled 128×1
                dw = _grouped_wgrad(dy2, qxT, sxT, None, hw)[0, :N, :K].to(w_dtype)  # (N, K)
        return dx, dw, *[None] * 8


def _out_dtype(x: Tensor) -> torch.dtype:
    dev = x.device.type  # under autocast a Linear returns the autocast dtype (BF16), else x's dtype
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"FP8 backend must be one of {BACKENDS}, got {backend!r}")
    return backend


class Fp8Linear(CachedFp8Weights, nn.Linear):
    """Drop-in nn.Linear whose Fprop/Dgrad/Wgrad run in FP8 E4M3 with 1×128 / 128×128 scaling.
    Same `weight` Parameter (kept in its dtype, fp32 = the master weight), same init, same state_dict.
    backend: 'auto' | 'hopper' | 'emulated' (see hopper_gemms). Traced by an outer torch.compile as plain ops
    around one opaque GEMM (no graph break)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None,
                 pow2_scales: bool = False, cache_input_hp: bool = False, backend: str = "auto"):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.pow2_scales, self.cache_input_hp = pow2_scales, cache_input_hp
        self.backend = _check_backend(backend)

    @classmethod
    def from_linear(cls, lin: nn.Linear, **kw) -> "Fp8Linear":
        new = cls(lin.in_features, lin.out_features, bias=False, device="meta", **kw)
        new.weight, new.bias = lin.weight, lin.bias  # the very same Parameters: optimizers and views still hold
        return new

    def fp8_groups(self) -> list[tuple[list[Tensor], int]]:
        return [([self.weight], 1)]

    def forward(self, x: Tensor) -> Tensor:
        out_dtype, cache = _out_dtype(x), self.fp8_cache()
        with torch.autocast(x.device.type, enabled=False):  # we choose every dtype ourselves
            y = _Fp8LinearFn.apply(x, self.weight, *cache, out_dtype, self.fp8_hw, self.pow2_scales,
                                   self.cache_input_hp)
        return y if self.bias is None else y + self.bias.to(y.dtype)  # in y's dtype, as nn.Linear under autocast

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", fp8=e4m3, pow2_scales={self.pow2_scales}, "
                                       f"cache_hp={self.cache_input_hp}, backend={self.backend}")


# ----------------------------------------------------------------------------------------------------------
# the fused SwiGLU FFN, y = W2 (silu(W1 x) ⊙ W3 x), for one FFN or for all routed experts of a layer at once.
# Caches x and the SwiGLU inputs (W1x, W3x) in FP8 and recomputes the SwiGLU output in backward (§3.3.3).


class _Fp8SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, seg: Segments | None, out_dtype: torch.dtype, hw: HopperGemms, F_: int,
                qw13: Tensor, sw13: Tensor, qw2: Tensor, sw2: Tensor, qw13T: Tensor, sw13T: Tensor, qw2T: Tensor,
                sw2T: Tensor, *weights: Tensor) -> Tensor:
        # qw13 (E, 2Fp, Dp), qw2 (E, Dp, Fp) and their block scales (the cache of the E FFNs' weights), then their
        # transposes; weights: w1, w2, w3 of each FFN (for their gradients). seg None: one FFN on all rows.
        D = x.shape[-1]
        x2 = x.reshape(-1, D)  # (M, D)
        Fp = qw2.shape[2]
        qx, sx = _k("quant_1x128", x2)(x2)  # (M, Dp), (M, Dp/128)
        ab = _grouped(qx, sx, qw13, sw13, seg, out_dtype, hw)  # (M, 2Fp): [W1 x | W3 x], one GEMM per FFN
        a, b = ab[:, :F_], ab[:, Fp:Fp + F_]  # gate pre-activation and up projection, (M, F) each
        qh, sh = _k("swiglu_quant", a)(a, b)  # silu(a)·b, born in FP8: (M, Fp), (M, Fp/128)
        y = _grouped(qh, sh, qw2, sw2, seg, out_dtype, hw)[:, :D]  # (M, D)
        qab, sab = _k("quant_1x128", ab)(ab)  # SwiGLU inputs cached in FP8 (§3.3.3); its output is not
        ctx.save_for_backward(qx, sx, qab, sab, qw13T, sw13T, qw2T, sw2T)
        ctx.meta = (x.shape, x.dtype, weights[0].dtype, seg, hw, F_)
        return y.reshape(x.shape)  # (..., D)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x_shape, x_dtype, w_dtype, seg, hw, F_ = ctx.meta
        qx, sx, qab, sab, qw13T, sw13T, qw2T, sw2T = ctx.saved_tensors  # (E, Dp, 2Fp), (E, Fp, Dp): transposes
        D, Fp = x_shape[-1], qw2T.shape[1]
        dy2 = dy.reshape(-1, D)  # (M, D)
        with torch.autocast(dy.device.type, enabled=False):
            # padded width Fp throughout: the padding columns of a and b are zero, so are h, da and db there
            hT, shT = _k("swiglu_quant_128x1", qab)(qab, sab)  # the SwiGLU output, recomputed: (Fp, Mp), 128×1
            qdy, sdy = _k("quant_1x128", dy2)(dy2)  # (M, Dp), (M, Dp/128)
            dh = _grouped(qdy, sdy, qw2T, sw2T, seg, dy.dtype, hw)  # W2's Dgrad (M, Fp)
            dw2 = _grouped_wgrad(dy2, hT, shT, seg, hw)  # W2's Wgrad (E, Dp, Fp)
            dab = _k("swiglu_bwd", qab)(qab, sab, dh)  # [da | db] (M, 2Fp)
            qdab, sdab = _k("quant_1x128", dab)(dab)  # (M, 2Fp), (M, 2Fp/128)
            dx = _grouped(qdab, sdab, qw13T, sw13T, seg, x_dtype, hw)[:, :D]  # da·W1 + db·W3, one GEMM (K = 2Fp)
            qxT, sxT = _k("requant_128x1", qx)(qx, sx)  # x re-tiled 128×1 for the Wgrad
            dw13 = _grouped_wgrad(dab, qxT, sxT, seg, hw)  # [dW1 ; dW3] (E, 2Fp, Dp)
        grads = []
        for e, (_, r) in enumerate(seg.bounds if seg is not None else [(0, 1)]):
            # an expert that saw no token gets no gradient (as with nn.Linear)
            grads += [dw13[e, :F_, :D].to(w_dtype), dw2[e, :D, :F_].to(w_dtype),
                      dw13[e, Fp:Fp + F_, :D].to(w_dtype)] if r else [None] * 3
        return (dx.reshape(x_shape), *[None] * 12, *grads)


class Fp8SwiGLU(CachedFp8Weights, nn.Module):
    """model.MLP in FP8: the same w1/w2/w3 children (Fp8Linear, so the same state_dict keys), one fused
    autograd function for the whole FFN (traced by an outer torch.compile, as Fp8Linear)."""

    def __init__(self, w1: nn.Linear, w2: nn.Linear, w3: nn.Linear, backend: str = "auto"):
        super().__init__()
        self.w1, self.w2, self.w3 = (Fp8Linear.from_linear(w, backend=backend) for w in (w1, w2, w3))
        self.backend = _check_backend(backend)

    def fp8_groups(self) -> list[tuple[list[Tensor], int]]:
        return _swiglu_groups([self])

    def fp8_weights(self) -> list[Tensor]:
        return [self.w1.weight, self.w2.weight, self.w3.weight]

    def forward(self, x: Tensor) -> Tensor:
        out_dtype, cache, ws = _out_dtype(x), self.fp8_cache(), self.fp8_weights()
        with torch.autocast(x.device.type, enabled=False):
            return _Fp8SwiGLUFn.apply(x, None, out_dtype, self.fp8_hw, ws[0].shape[0], *cache, *ws)


class Fp8Experts(CachedFp8Weights, nn.ModuleList):
    """model.MoE.experts in FP8: the same Fp8SwiGLU children (experts[e](x) runs expert e alone: the readable
    per-expert reference), plus `grouped`, which runs all of them on expert-sorted tokens in one call."""

    def __init__(self, experts: nn.ModuleList, backend: str = "auto"):
        super().__init__(Fp8SwiGLU(m.w1, m.w2, m.w3, backend) for m in experts)
        self.backend = _check_backend(backend)

    def fp8_groups(self) -> list[tuple[list[Tensor], int]]:
        return _swiglu_groups(list(self))  # all experts' weights, (E, ...) each

    def fp8_weights(self) -> list[Tensor]:
        return [w for m in self for w in m.fp8_weights()]

    @torch.compiler.disable  # it reads the E token counts on the host: the graph breaks around it
    def grouped(self, u: Tensor, g: Tensor, idx: Tensor, counts: Tensor) -> Tensor:
        """u (N, D) tokens, g and idx (N, K) gate weights and chosen experts, counts (E,) pairs per expert ->
        (N, D) fp32 = Σ_k g[n, k]·FFN_idx[n,k](u[n]). The (token, expert) pairs are laid out sorted by expert,
        each expert's segment padded with zero rows to whole 128-row tiles. Reads the E counts on the host once."""
        (N, K), E, dev = idx.shape, len(self), u.device
        ws = self.fp8_weights()
        cache = self.fp8_cache()  # weights quantized (once per step) before the host read below, which waits for the GPU
        flat, ar = idx.flatten(), torch.arange(N * K, device=dev)  # expert of each pair; pair numbers
        order = flat.argsort(stable=True)  # pairs sorted by expert
        padded = (counts + TILE - 1) // TILE * TILE  # (E,) each segment rounded up to whole 128-row tiles
        ends = padded.cumsum(0)
        shift = (ends - padded) - (counts.cumsum(0) - counts)  # (E,) padded start − sorted start of each expert
        pos = torch.empty_like(order).index_copy_(0, order, ar + shift[flat[order]])  # (N*K,) row of each pair
        sizes = padded.tolist()  # the one host read per layer: segment bounds for slicing
        M, starts = sum(sizes), [sum(sizes[:e]) for e in range(E)]
        seg = Segments(list(zip(starts, sizes)), torch.repeat_interleave(ends - padded, padded, output_size=M),
                       torch.repeat_interleave(padded, padded, output_size=M))
        row_pair = torch.full((M,), N * K, device=dev).index_copy_(0, pos, ar)  # pair of each row; N*K: padding
        out_dtype = _out_dtype(u)
        xp = _Gather.apply(u.to(out_dtype), torch.where(row_pair < N * K, row_pair // K, N), pos.view(N, K), True)  # (M, D)
        with torch.autocast(dev.type, enabled=False):
            yp = _Fp8SwiGLUFn.apply(xp, seg, out_dtype, self.fp8_hw, ws[0].shape[0], *cache, *ws)  # (M, D)
        yk = _Gather.apply(yp, pos, row_pair, False)  # (N*K, D) back in token order, padding rows dropped
        return (yk.view(N, K, -1).float() * g[:, :, None]).sum(dim=1)  # (N, D), summed in fp32


def _take(x: Tensor, i: Tensor, pad: bool) -> Tensor:
    # x[i]; with pad, the index len(x) reads a row of zeros (a padding row of the expert segments)
    return (torch.cat([x, x.new_zeros(1, x.shape[1])]) if pad else x)[i]


class _Gather(torch.autograd.Function):
    """y = x[i] with a gather as backward (autograd's is a scatter-add): `back` (rows of x, k) holds the rows of
    y each row of x went to, dx = Σ_j dy[back[:, j]]. Padding rows read zeros: y's if to_padded, else dx's."""

    @staticmethod
    def forward(ctx, x: Tensor, i: Tensor, back: Tensor, to_padded: bool) -> Tensor:
        ctx.save_for_backward(back)
        ctx.to_padded = to_padded
        return _take(x, i, to_padded)

    @staticmethod
    def backward(ctx, dy: Tensor):
        back, = ctx.saved_tensors
        dx = _take(dy, back.flatten(), not ctx.to_padded).view(*back.shape, dy.shape[1])
        return (dx.sum(dim=1) if back.dim() == 2 else dx), None, None, None


# ----------------------------------------------------------------------------------------------------------
# converting a model


def _is_swiglu(m: nn.Module) -> bool:
    # model.MLP (dense FFN, each expert, the shared experts): exactly three plain Linears w1, w2, w3
    names = {n for n, _ in m.named_children()}
    return names == {"w1", "w2", "w3"} and all(type(c) is nn.Linear and c.bias is None for c in m.children())


def convert_to_fp8(model: nn.Module, backend: str = "auto", experts: bool = True) -> nn.Module:
    """Swap, in place, the nn.Linear layers that DeepSeek-V3 runs in FP8: every projection inside
    model.layers and model.mtp (attention wq/wq_a/wq_b/wkv_a/wkv_b/wo, the SwiGLU w1/w2/w3 of dense FFNs,
    routed and shared experts, MTP's eh_proj). Left in BF16/FP32: the embedding, the output head, the MoE
    gate (not an nn.Linear), the norms and attention's softmax math. Parameters are the same objects, so
    names, state_dict keys and optimizer references are unchanged. A MoE's `experts` list becomes an
    Fp8Experts (model.MoE's 'grouped' path then runs the experts in one FP8 call). backend: 'auto' (the
    hardware GEMM where its probe passes, else emulated), 'hopper' (error if it does not work here) or
    'emulated' (plain-PyTorch GEMM, any device); stored on each layer. Call after model.to(device), before
    torch.compile (the hardware probe runs eagerly). experts=False keeps the routed experts in BF16 (model.MoE's
    grouped GEMM), a deviation for narrow experts, where no FP8 GEMM beat BF16 on an H200 (README). Returns the
    model."""
    _check_backend(backend)

    made = []  # the FP8 modules whose forward the model calls (not the w1/w2/w3 inside an Fp8SwiGLU)

    def convert(parent: nn.Module):
        for name, child in parent.named_children():
            new = None
            if name == "experts" and type(child) is nn.ModuleList and all(map(_is_swiglu, child)):
                if experts:
                    new = Fp8Experts(child, backend)
            elif _is_swiglu(child):
                new = Fp8SwiGLU(child.w1, child.w2, child.w3, backend)
            elif type(child) is nn.Linear:
                # §3.3.3: the input of the linear after attention is kept in higher precision with
                # power-of-2 scales (attention's backward reads it too)
                hp = name == "wo"
                new = Fp8Linear.from_linear(child, pow2_scales=hp, cache_input_hp=hp, backend=backend)
            else:
                convert(child)
            if new is not None:
                setattr(parent, name, new)
                made.append(new)
    for n in ("layers", "mtp"):
        if isinstance(getattr(model, n, None), nn.Module):
            convert(getattr(model, n))
    p = next(model.parameters(), None)
    if p is not None and p.device.type != "meta":
        hopper_gemms(backend, p.device)  # probe now, eagerly (and fail now for 'hopper' where it cannot run)
        _quantize(made)  # the caches the forward reads, made now (a compiled graph reads them as they are)
    if not hasattr(model, "_fp8_refresh_hook"):
        model._fp8_refresh_hook = model.register_forward_pre_hook(_refresh_model_caches)
    return model


@torch.compiler.disable  # eager even under a compiled model (then the graph breaks once, before the forward)
def _refresh_model_caches(model: nn.Module, args) -> None:
    """Before each forward of a converted model: make again the FP8 copies whose weights changed outside an
    optimizer step (a checkpoint load, `p.mul_()`, `model.to()`), which a compiled Block would not notice."""
    _quantize([m for m in model.modules() if isinstance(m, CachedFp8Weights) and m.fp8_fwd is not None
               and m.fp8_version() != m.fp8_key])


# ----------------------------------------------------------------------------------------------------------
# low-precision optimizer state (§3.3.3): AdamW with BF16 moments and FP32 master weights


class _Bucket(NamedTuple):
    """FP32 parameters laid out in one flat buffer (each `p.data` a view of it, 64-element aligned, zero gaps), and
    their moments in two flat BF16 buffers, so that one kernel updates them all. While every parameter took every
    step they share one step count, `step`."""
    params: list[Tensor]
    ptrs: list[int]  # each parameter's data_ptr when laid out: another means the bucket was undone (p.data = ...)
    pads: list[int]  # zero elements after each parameter (alignment)
    flat: Tensor  # (n,) fp32: the parameters
    m: Tensor  # (n,) bf16
    v: Tensor  # (n,) bf16
    step: Tensor | None  # 0-d fp32, shared by the parameters' states (None: each has its own)
    zeros: Tensor  # (ALIGN,) the gaps' gradients


class AdamWBF16(torch.optim.Optimizer):
    """torch.optim.AdamW's update (decoupled weight decay, bias correction) with exp_avg and exp_avg_sq
    stored in BF16 (half the optimizer memory). FP32 parameters are their own master weights; a BF16/FP16
    parameter gets an FP32 master copy in its state, and the parameter is a rounded copy of it.

    The update is one fused pass (kernels.adamw_bf16, compiled on a GPU) per *bucket* of parameters: at the first
    step the FP32 parameters of a group are moved, in order, into flat buffers of up to BUCKET elements (each
    parameter's `.data` becomes a view of its bucket: same values, same Parameter objects) and their moments
    into matching flat BF16 buffers; a step concatenates the bucket's gradients (one copy) and updates the whole
    bucket in one kernel launch. A parameter of more than ALONE elements is a bucket of its own, left where it is.
    One launch per parameter instead made the host the bottleneck of a small model's step (the gpu preset's 167
    parameters: README). The per-parameter update on views of the buffers stays the reference (and the path of
    low-precision parameters): it runs where a parameter of a bucket has no gradient this step (torch's rule: no
    update, its step count stays) and from then on for that bucket, whose parameters no longer share one step
    count. A parameter moved out of its bucket (`p.data = ...`, `model.to()`) is
    noticed at the next step, and the bucket is laid out again from the current values."""
    BUCKET = 2 ** 27  # elements (512 MiB of FP32): bounds the concatenated gradients' transient memory
    ALONE = 2 ** 22  # a parameter larger than this is a bucket alone, updated in place (one launch is cheap for it)
    ALIGN = 64  # elements: every parameter's view starts 256-byte aligned, as compiled kernels expect

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self._buckets: dict[int, list[_Bucket]] = {}  # per param group (its index)

    def _init_state(self, p: Tensor) -> dict:
        st = self.state[p]
        if not st:
            st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)  # a tensor: see kernels
            st["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16, memory_format=torch.contiguous_format)
            st["exp_avg_sq"] = torch.zeros_like(st["exp_avg"])
            if p.dtype != torch.float32:
                st["master"] = p.detach().float()
        return st

    @torch.no_grad()
    def _lay_out(self, params: list[Tensor]) -> _Bucket:
        """Move params (FP32, one device) and their states into flat buffers; each becomes a view of them."""
        sts = [self._init_state(p) for p in params]
        if len(params) == 1 and params[0].numel() > self.ALONE and params[0].is_contiguous():
            p, st = params[0], sts[0]  # a large parameter is updated where it lies: no copy of its gradient
            return _Bucket(params, [p.data_ptr()], [0], p.detach().view(-1), st["exp_avg"].view(-1),
                           st["exp_avg_sq"].view(-1), st["step"], p.new_zeros(0))
        sizes = [p.numel() for p in params]
        pads = [-n % self.ALIGN for n in sizes]
        n, dev = sum(sizes) + sum(pads), params[0].device
        flat = torch.zeros(n, device=dev)
        m, v = torch.zeros(n, device=dev, dtype=torch.bfloat16), torch.zeros(n, device=dev, dtype=torch.bfloat16)
        steps = {float(st["step"]) for st in sts}  # (a host read, once per lay-out)
        step = torch.full((), steps.pop(), device=dev) if len(steps) == 1 else None  # else: each keeps its own
        o = 0
        for p, st, k, pad in zip(params, sts, sizes, pads):
            view = slice(o, o + k)
            flat[view].copy_(p.detach().reshape(-1))
            m[view].copy_(st["exp_avg"].reshape(-1))
            v[view].copy_(st["exp_avg_sq"].reshape(-1))
            p.data = flat[view].view_as(p)
            st["exp_avg"], st["exp_avg_sq"] = m[view].view_as(p), v[view].view_as(p)
            if step is not None:
                st["step"] = step
            o += k + pad
        return _Bucket(params, [p.data_ptr() for p in params], pads, flat, m, v, step, flat.new_zeros(self.ALIGN))

    def _group_buckets(self, i: int, group: dict) -> list[_Bucket]:
        """The group's buckets, laid out at its first step, and again where a parameter has left its bucket."""
        buckets = self._buckets.get(i)
        if buckets is not None and all(q == p.data_ptr() for b in buckets for p, q in zip(b.params, b.ptrs)):
            return buckets
        fp32 = [p for p in group["params"] if p.dtype == torch.float32 and not p.is_sparse]
        buckets, run, size = [], [], 0
        for p in fp32 + [None]:  # runs of consecutive parameters on one device, up to BUCKET elements each
            if run and (p is None or p.device != run[0].device or size + p.numel() > self.BUCKET
                        or max(p.numel(), run[0].numel()) > self.ALONE):
                buckets.append(self._lay_out(run))
                run, size = [], 0
            if p is not None:
                run.append(p)
                size += p.numel() + -p.numel() % self.ALIGN
        self._buckets[i] = buckets
        return buckets

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for i, group in enumerate(self.param_groups):
            (b1, b2), eps = group["betas"], group["eps"]
            lr_wd = {}
            for dev in {p.device for p in group["params"] if p.grad is not None}:
                # lr changes every step: a device tensor, not a constant of the kernel, filled on the device
                # (torch.tensor(..., device=) would wait for the GPU to finish the backward)
                lr_wd[dev] = torch.full((2,), group["lr"], device=dev)
                lr_wd[dev][1].fill_(group["weight_decay"])
            alone = [p for p in group["params"] if p.grad is not None and p.dtype != torch.float32]
            buckets = self._group_buckets(i, group)
            for k, b in enumerate(buckets):
                grads = [p.grad for p in b.params]
                if b.step is not None and all(g is not None for g in grads):  # the fast path: one kernel
                    g = grads[0].reshape(-1) if len(grads) == 1 and not b.pads[0] else \
                        torch.cat([t for gr, pad in zip(grads, b.pads) for t in (gr.reshape(-1), b.zeros[:pad])])
                    _update(b.flat)(b.flat, g, b.m, b.v, b.step, lr_wd[b.flat.device], b1, b2, eps)
                    continue
                if b.step is not None:  # a parameter skips this step: from now on each keeps its own count
                    for p in b.params:
                        self.state[p]["step"] = b.step.clone()
                    buckets[k] = b = b._replace(step=None)
                alone += [p for p in b.params if p.grad is not None]
            for p in alone:  # the reference: one parameter at a time
                st = self._init_state(p)
                w = st.get("master", p.detach())  # detach shares p's storage and version counter
                _update(w)(w, p.grad.detach().contiguous(), st["exp_avg"], st["exp_avg_sq"], st["step"],
                           lr_wd[p.device], b1, b2, eps)
                if "master" in st:
                    p.copy_(w)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts floating state to the parameter's dtype on load: undo it for the BF16 moments, keep FP32
        # masters of low-precision parameters at full precision, and keep the step an fp32 tensor on the device
        saved = {i: s["master"] for i, s in state_dict["state"].items() if "master" in s}
        super().load_state_dict(state_dict)
        self._buckets = {}  # laid out again, from the loaded state, at the next step
        ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = dict(zip(ids, chain.from_iterable(g["params"] for g in self.param_groups)))
        for i, p in params.items():
            st = self.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    st[key] = st[key].to(torch.bfloat16)
            if "step" in st:  # an int in checkpoints written before the step became a tensor
                st["step"] = torch.as_tensor(st["step"], dtype=torch.float32).to(p.device)
            if i in saved:
                st["master"] = saved[i].to(device=p.device, dtype=torch.float32)


def _update(w: Tensor):
    return kernels.adamw_bf16 if w.is_cuda else kernels.adamw_bf16_ref
