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

torch._scaled_mm layout rules (blockwise scaling: sm90, cuBLAS ≥ 12.9; probed on an H200 with torch
2.11+cu130 by bench/bench_fp8.py --probe). out = (a·s_a)(b·s_b) for a (M, K) row-major FP8 and b (K, N)
*column-major* FP8: pass our (N, K) row-major operand as b.t(). The 1×128 scales of a are (M, K/128) fp32
column-major (stride (1, M)). b's scales are (K/128, N/128) column-major for 128×128 blocks (our row-major
(N/128, K/128) transposed), or (K/128, N) row-major for 1×128 tiles of b's rows. Fprop and Dgrad use
1×128 × 128×128; Wgrad uses 1×128 × 1×128, both tiles along the tokens (its reduction dim). All three matched
the emulated GEMM to 1.3e-4 (fp32 output). Quirks seen, handled by zero padding in gemm_hopper: with
K/128 = 5 the 128×128 call returned garbage (and refused scales whose leading dim was padded to 4), so K is
padded to a multiple of 4·128; M = 1 and M = 243 rows were refused (CUBLAS_STATUS_NOT_SUPPORTED) while 8, 16,
32, 64, 200 and 256 ran, so rows are padded to a multiple of 16 (our reading: the column-major scales' leading
dim must be 16-byte aligned). The probe that picks the back end runs such awkward shapes first.

What we simplify (vs. the DeepSeek-V3 framework):
- NOTE: the input of attention's output projection wo is cached in its own dtype (BF16 under autocast)
  instead of the paper's custom E5M6 format; its FP8 quantization uses power-of-2 scales as in §3.3.3.
- NOTE: SwiGLU FFNs (dense, experts, shared) run as one fused FP8 function that caches x and the SwiGLU
  inputs in FP8 and recomputes the SwiGLU output in backward (§3.3.3); MoE experts run one GEMM each
  (no grouped FP8 GEMM), and dispatch/combine stay in BF16 (no FP8 all-to-all).
- Dimensions that are not multiples of 128 are zero-padded to 128 in the quantizers (exact, but a 64-wide
  layer does a 128-wide GEMM), and further on the hardware path (above). See kernels.py.
- Weights are re-quantized every forward (no caching across micro-batches); no delayed scaling (none needed).
- The cached 1×128 FP8 activations are re-tiled to 128×1 for Wgrad by dequantize + quantize, which adds
  a second rounding (the paper's custom kernels transpose FP8 tiles directly).
- The GEMMs are cuBLAS's (not DeepGEMM); the quantizers are torch.compile'd PyTorch, which reached 16-58% of
  the copy bandwidth on an H200 (bench/bench_fp8.py), so they cost ~20% of an FP8 Linear's time.
- No FP8 grouped GEMM: the routed experts of an FP8 model run one after another (model.MoE's sorted path),
  one Fp8SwiGLU call per expert, where the BF16 model runs them all in one torch._grouped_mm. On the gpu
  preset (32 small experts per layer) this makes FP8 training ~5-7× slower than BF16 (see README).
- AdamW moments are BF16 with round-to-nearest; this is fine for β2 = 0.95 (§4.2) but a BF16 second moment
  stops decaying for β2 ≥ ~0.996 (1 − β2 falls below BF16's half-ulp), so keep β2 ≤ 0.99 with AdamWBF16.

Run: python -m pytest tests/test_fp8.py -q      (bench on an H200: python bench/bench_fp8.py)

Dimension legend: M tokens (B·T flattened), K in_features, N out_features, F hidden width of a SwiGLU FFN,
Mp/Kp/Np/Fp rounded up to a multiple of 128; B batch, T time, D model dim.
"""
import math
from itertools import chain

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import kernels

TILE = kernels.TILE
BACKEND = "auto"  # 'auto' (hopper if it works on this device, else emulated) | 'hopper' | 'emulated'
ROW_ALIGN = 16  # the hardware path pads the rows of a to a multiple of this (see gemm_hopper)
COMPILE_KERNELS = True  # on CUDA use kernels' torch.compile'd versions (on CPU the eager *_ref: compiling costs more)
_HW: dict[int, tuple[bool, bool]] = {}  # cuda device index -> what hopper_support returns


def _k(name: str, x: Tensor):
    """The compiled kernel on a GPU, its eager reference on a CPU."""
    return getattr(kernels, name if (x.is_cuda and COMPILE_KERNELS) else name + "_ref")


# ----------------------------------------------------------------------------------------------------------
# the two GEMM back ends: out (M, N) = a (M, Kp) · b (N, Kp)ᵀ, a scaled 1×128, b scaled 128×128 or 1×128


def gemm_emulated(qa: Tensor, sa: Tensor, qb: Tensor, sb: Tensor, out_dtype: torch.dtype) -> Tensor:
    """Blockwise-scaled FP8 GEMM in plain PyTorch, accumulating in fp32 with promotion every 128 of K.
    qa (M, Kp) e4m3, sa (M, Kp/128); qb (N, Kp) e4m3, sb (N/128, Kp/128) [128×128] or (N, Kp/128) [1×128]."""
    M, Kp = qa.shape
    N = qb.shape[0]
    sb_rows = sb if sb.shape[0] == N else sb.repeat_interleave(TILE, dim=0)  # (N, Kp/128): scale of b's row n
    a, b = qa.float(), qb.float()  # FP8 values are exact in fp32
    out = torch.zeros(M, N, dtype=torch.float32, device=qa.device)
    for k in range(Kp // TILE):
        c = slice(k * TILE, (k + 1) * TILE)
        part = a[:, c] @ b[:, c].t()  # (M, N): the products of one 128-chunk of K, summed in fp32
        out.addcmul_(part, sa[:, k, None] * sb_rows[None, :, k])  # promote: scale the chunk, add in fp32
    return out.to(out_dtype)


def _pad_cols(q: Tensor, n: int) -> Tensor:
    # zero columns appended to FP8 data (padding through uint8: 0x00 is +0.0 in E4M3)
    return F.pad(q.view(torch.uint8), (0, n)).view(q.dtype)


def gemm_hopper(qa: Tensor, sa: Tensor, qb: Tensor, sb: Tensor, out_dtype: torch.dtype) -> Tensor:
    """The same product on cuBLAS's blockwise FP8 GEMM (sm90). Same arguments as gemm_emulated."""
    M, nk = sa.shape
    if nk % 4:  # with K/128 = 5 cuBLAS returned garbage (128×128 scales): zero-pad K to a multiple of 512
        r = -nk % 4
        qa, qb = _pad_cols(qa, r * TILE), _pad_cols(qb, r * TILE)
        sa, sb = F.pad(sa, (0, r), value=1.0), F.pad(sb, (0, r), value=1.0)
    if M % ROW_ALIGN:  # M = 1 and M = 243 were refused (8, 16, 200, 256 ran): pad with zero rows
        r = -M % ROW_ALIGN
        qa = F.pad(qa.view(torch.uint8), (0, 0, 0, r)).view(qa.dtype)
        sa = F.pad(sa, (0, 0, 0, r), value=1.0)
    sa = sa.t().contiguous().t()  # (M, K/128) column-major (no copy if the quantizer made it so)
    if sb.shape[0] == qb.shape[0]:  # 1×128 tiles of b: (N, K/128) -> (K/128, N) row-major
        sb = sb.t().contiguous()
    else:  # 128×128 blocks: (N/128, K/128) -> its transpose (K/128, N/128), column-major
        sb = sb.contiguous().t()
    return torch._scaled_mm(qa, qb.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype)[:M]


@torch.compiler.disable
def _probe_hopper(idx: int) -> tuple[bool, bool]:
    """Run both scale combinations once on awkward shapes (rows not a multiple of 4, K/128 = 5) through
    gemm_hopper's paddings and compare with the emulated GEMM; any refusal or mismatch -> emulated."""
    if torch.cuda.get_device_capability(idx) < (9, 0) or not hasattr(torch, "_scaled_mm"):
        return False, False
    g = torch.Generator(device=f"cuda:{idx}").manual_seed(0)
    ok = []
    for quant_b in (kernels.quant_128x128_ref, kernels.quant_1x128_ref):
        good = True
        for M in (243, 5):
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
    return ok[0], ok[1]


def hopper_support(device: torch.device) -> tuple[bool, bool]:
    """(1×128·128×128 i.e. Fprop/Dgrad, 1×128·1×128 i.e. Wgrad) run on the hardware here? Honours BACKEND;
    probed once per device."""
    if BACKEND == "emulated" or device.type != "cuda":
        return False, False
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _HW:
        _HW[idx] = _probe_hopper(idx)
    if BACKEND == "hopper" and not _HW[idx][0]:
        raise RuntimeError("fp8.BACKEND='hopper' but blockwise torch._scaled_mm does not work on this device")
    return _HW[idx]


def fp8_gemm(qa: Tensor, sa: Tensor, qb: Tensor, sb: Tensor, out_dtype: torch.dtype,
             hw: tuple[bool, bool]) -> Tensor:
    """a·bᵀ on the hardware where hopper_support says it works for these scales, else emulated."""
    ok = hw[1] if sb.shape[0] == qb.shape[0] else hw[0]  # b in 1×128 tiles (Wgrad) or 128×128 blocks
    return (gemm_hopper if ok else gemm_emulated)(qa, sa, qb, sb, out_dtype)


# ----------------------------------------------------------------------------------------------------------
# the three GEMMs of a Linear, shared by the Linear and the fused SwiGLU FFN below


def _dgrad(dy: Tensor, qw: Tensor, sw: Tensor, K: int, dtype: torch.dtype, hw: tuple) -> Tensor:
    """dx = dy·W: dy (M, N) quantized 1×128 along N; W read through its transposed 128×128 blocks."""
    qdy, sdy = _k("quant_1x128", dy)(dy)  # (M, Np), (M, Np/128)
    return fp8_gemm(qdy, sdy, qw.t().contiguous(), sw.t(), dtype, hw)[:, :K]  # (M, K)


def _wgrad(dy: Tensor, qxT: Tensor, sxT: Tensor, N: int, K: int, hw: tuple) -> Tensor:
    """dW = dyᵀ·x in fp32: both operands tiled 128×1 along the tokens, the dim Wgrad reduces over."""
    qdyT, sdyT = _k("quant_128x1", dy)(dy)  # (Np, Mp), (Np, Mp/128)
    return fp8_gemm(qdyT, sdyT, qxT, sxT, torch.float32, hw)[:N, :K]  # (N, K)


class _Fp8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, out_dtype: torch.dtype, hw: tuple[bool, bool],
                pow2: bool, cache_hp: bool) -> Tensor:
        N, K = weight.shape
        x2 = x.reshape(-1, K)  # (M, K)
        qx, sx = _k("quant_1x128", x2)(x2, pow2)  # (M, Kp), (M, Kp/128)
        qw, sw = _k("quant_128x128", weight)(weight)  # (Np, Kp), (Np/128, Kp/128)
        y = fp8_gemm(qx, sx, qw, sw, out_dtype, hw)[:, :N]  # Fprop: (M, N)
        # the activation cache: x in FP8 (1 byte + 4/128 bytes of scale per value), or x itself (wo's input)
        ctx.save_for_backward(*((x2,) if cache_hp else (qx, sx)), qw, sw)
        ctx.meta = (x.shape, x.dtype, weight.dtype, hw, pow2, cache_hp)
        return y.reshape(*x.shape[:-1], N)  # (..., N)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x_shape, x_dtype, w_dtype, hw, pow2, cache_hp = ctx.meta
        *xs, qw, sw = ctx.saved_tensors
        N, K = dy.shape[-1], x_shape[-1]
        dy2 = dy.reshape(-1, N)  # (M, N)
        dx = dw = None
        with torch.autocast(dy.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                dx = _dgrad(dy2, qw, sw, K, x_dtype, hw).reshape(x_shape)  # (..., K)
            if ctx.needs_input_grad[1]:
                if cache_hp:
                    qxT, sxT = _k("quant_128x1", xs[0])(xs[0], pow2)  # (Kp, Mp), (Kp, Mp/128)
                else:
                    qxT, sxT = _k("requant_128x1", xs[0])(*xs, pow2)  # 1×128 cache re-tiled 128×1
                dw = _wgrad(dy2, qxT, sxT, N, K, hw).to(w_dtype)  # (N, K)
        return dx, dw, None, None, None, None


def _out_dtype(x: Tensor) -> torch.dtype:
    dev = x.device.type  # under autocast a Linear returns the autocast dtype (BF16), else x's dtype
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class Fp8Linear(nn.Linear):
    """Drop-in nn.Linear whose Fprop/Dgrad/Wgrad run in FP8 E4M3 with 1×128 / 128×128 scaling.
    Same `weight` Parameter (kept in its dtype, fp32 = the master weight), same init, same state_dict."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None,
                 pow2_scales: bool = False, cache_input_hp: bool = False):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.pow2_scales, self.cache_input_hp = pow2_scales, cache_input_hp

    @classmethod
    def from_linear(cls, lin: nn.Linear, **kw) -> "Fp8Linear":
        new = cls(lin.in_features, lin.out_features, bias=False, device="meta", **kw)
        new.weight, new.bias = lin.weight, lin.bias  # the very same Parameters: optimizers and views still hold
        return new

    # Opaque to a torch.compile of the whole model (train.py --compile=True): the graph breaks around the
    # layer, which runs its own compiled kernels and cuBLAS's FP8 GEMM. Traced into, this frame was compiled
    # again for each new guard (8 times in 6 steps of a small model) until dynamo's recompile limit ran out.
    @torch.compiler.disable
    def forward(self, x: Tensor) -> Tensor:
        out_dtype = _out_dtype(x)
        with torch.autocast(x.device.type, enabled=False):  # we choose every dtype ourselves
            y = _Fp8LinearFn.apply(x, self.weight, out_dtype, hopper_support(x.device), self.pow2_scales,
                                   self.cache_input_hp)
        return y if self.bias is None else y + self.bias.to(y.dtype)  # in y's dtype, as nn.Linear under autocast

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fp8=e4m3, pow2_scales={self.pow2_scales}, cache_hp={self.cache_input_hp}"


# ----------------------------------------------------------------------------------------------------------
# the fused SwiGLU FFN: y = W2 (silu(W1 x) ⊙ W3 x), caching x, W1x and W3x in FP8 and recomputing the rest


class _Fp8SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, out_dtype: torch.dtype,
                hw: tuple[bool, bool]) -> Tensor:
        F_, D = w1.shape
        x2 = x.reshape(-1, D)  # (M, D)
        qx, sx = _k("quant_1x128", x2)(x2)  # (M, Dp), (M, Dp/128)
        (qw1, sw1), (qw2, sw2), (qw3, sw3) = (_k("quant_128x128", w)(w) for w in (w1, w2, w3))
        # W1 and W3 read the same x: stack them and run one GEMM of twice the width
        qw13, sw13 = torch.cat([qw1, qw3]), torch.cat([sw1, sw3])  # (2Fp, Dp), (2Fp/128, Dp/128)
        Fp = qw1.shape[0]
        ab = fp8_gemm(qx, sx, qw13, sw13, out_dtype, hw)  # (M, 2Fp): [W1 x | W3 x]
        a, b = ab[:, :F_], ab[:, Fp:Fp + F_]  # gate pre-activation and up projection, (M, F) each
        qh, sh = _k("swiglu_quant", a)(a, b)  # silu(a)·b, born in FP8: (M, Fp), (M, Fp/128)
        y = fp8_gemm(qh, sh, qw2, sw2, out_dtype, hw)[:, :D]  # (M, D)
        qab, sab = _k("quant_1x128", ab)(ab)  # SwiGLU inputs cached in FP8 (§3.3.3); its output is not
        ctx.save_for_backward(qx, sx, qab, sab, qw13, sw13, qw2, sw2)
        ctx.meta = (x.shape, x.dtype, w1.dtype, hw, F_)
        return y.reshape(x.shape)  # (..., D)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x_shape, x_dtype, w_dtype, hw, F_ = ctx.meta
        qx, sx, qab, sab, qw13, sw13, qw2, sw2 = ctx.saved_tensors
        D, Fp = x_shape[-1], qw2.shape[1]
        dy2 = dy.reshape(-1, D)  # (M, D)
        with torch.autocast(dy.device.type, enabled=False):
            # padded width Fp throughout: the padding columns of a and b are zero, so are h, da and db there
            ab = _k("dequant_1x128", qab)(qab, sab)  # (M, 2Fp)
            a, b = ab[:, :Fp], ab[:, Fp:]
            h = _k("swiglu", a)(a, b)  # the SwiGLU output, recomputed (M, Fp)
            dh = _dgrad(dy2, qw2, sw2, Fp, torch.float32, hw)  # W2's Dgrad (M, Fp)
            hT, shT = _k("quant_128x1", h)(h)  # (Fp, Mp), (Fp, Mp/128)
            dw2 = _wgrad(dy2, hT, shT, D, F_, hw)  # W2's Wgrad (D, F)
            dab = torch.cat(_k("swiglu_bwd", a)(a, b, dh), dim=1)  # [da | db] (M, 2Fp)
            dx = _dgrad(dab, qw13, sw13, D, x_dtype, hw)  # dx = da·W1 + db·W3 in one GEMM, K = 2Fp: (M, D)
            qxT, sxT = _k("requant_128x1", qx)(qx, sx)  # x re-tiled 128×1 for the Wgrad
            dw13 = _wgrad(dab, qxT, sxT, 2 * Fp, D, hw)  # [dW1 ; dW3] (2Fp, D)
        dw1, dw3 = dw13[:F_], dw13[Fp:Fp + F_]
        return dx.reshape(x_shape), dw1.to(w_dtype), dw2.to(w_dtype), dw3.to(w_dtype), None, None


class Fp8SwiGLU(nn.Module):
    """model.MLP in FP8: the same w1/w2/w3 children (Fp8Linear, so the same state_dict keys), one fused
    autograd function for the whole FFN."""

    def __init__(self, w1: nn.Linear, w2: nn.Linear, w3: nn.Linear):
        super().__init__()
        self.w1, self.w2, self.w3 = (Fp8Linear.from_linear(w) for w in (w1, w2, w3))

    @torch.compiler.disable  # opaque to an outer torch.compile, as Fp8Linear.forward
    def forward(self, x: Tensor) -> Tensor:
        out_dtype = _out_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            return _Fp8SwiGLUFn.apply(x, self.w1.weight, self.w2.weight, self.w3.weight, out_dtype,
                                      hopper_support(x.device))


# ----------------------------------------------------------------------------------------------------------
# converting a model


def _is_swiglu(m: nn.Module) -> bool:
    # model.MLP (dense FFN, each expert, the shared experts): exactly three plain Linears w1, w2, w3
    names = {n for n, _ in m.named_children()}
    return names == {"w1", "w2", "w3"} and all(type(c) is nn.Linear and c.bias is None for c in m.children())


def convert_to_fp8(model: nn.Module, fused_swiglu: bool = True) -> nn.Module:
    """Swap, in place, the nn.Linear layers that DeepSeek-V3 runs in FP8: every projection inside
    model.layers and model.mtp (attention wq/wq_a/wq_b/wkv_a/wkv_b/wo, the SwiGLU w1/w2/w3 of dense FFNs,
    routed and shared experts, MTP's eh_proj). Left in BF16/FP32: the embedding, the output head, the MoE
    gate (not an nn.Linear), the norms and attention's softmax math. Parameters are the same objects, so
    names, state_dict keys and optimizer references are unchanged. Call after model.to(device), before
    torch.compile (the hardware probe must run eagerly). Returns the model."""
    roots = [getattr(model, n) for n in ("layers", "mtp") if isinstance(getattr(model, n, None), nn.Module)]
    for parent in [m for r in roots for m in r.modules()]:
        for name, child in list(parent.named_children()):
            if fused_swiglu and _is_swiglu(child):
                setattr(parent, name, Fp8SwiGLU(child.w1, child.w2, child.w3))
            elif type(child) is nn.Linear:
                # §3.3.3: the input of the linear after attention is kept in higher precision with
                # power-of-2 scales (attention's backward reads it too)
                hp = name == "wo"
                setattr(parent, name, Fp8Linear.from_linear(child, pow2_scales=hp, cache_input_hp=hp))
    p = next(model.parameters(), None)
    if p is not None and p.is_cuda:
        hopper_support(p.device)  # probe now, eagerly, and cache the answer
    return model


# ----------------------------------------------------------------------------------------------------------
# low-precision optimizer state (§3.3.3): AdamW with BF16 moments and FP32 master weights


class AdamWBF16(torch.optim.Optimizer):
    """torch.optim.AdamW's update (decoupled weight decay, bias correction) with exp_avg and exp_avg_sq
    stored in BF16 (half the optimizer memory). FP32 parameters are their own master weights; a BF16/FP16
    parameter gets an FP32 master copy in its state, and the parameter is a rounded copy of it."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            ps = [p for p in group["params"] if p.grad is not None]
            for p in ps:
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    if p.dtype != torch.float32:
                        st["master"] = p.detach().float()
                st["step"] += 1  # per parameter: an expert that saw no token has no grad and keeps its count
            if not ps:
                continue
            # one _foreach_ kernel per line for the whole group instead of one kernel per parameter
            sts = [self.state[p] for p in ps]
            ws = [st.get("master", p) for st, p in zip(sts, ps)]  # the FP32 weights the update is applied to
            gs = [p.grad.float() for p in ps]
            # the moments are updated in fp32 from their BF16 copies, then stored back in BF16
            ms = [st["exp_avg"].float() for st in sts]
            vs = [st["exp_avg_sq"].float() for st in sts]
            torch._foreach_lerp_(ms, gs, 1 - b1)  # m = β1 m + (1-β1) g
            torch._foreach_mul_(vs, b2)
            torch._foreach_addcmul_(vs, gs, gs, value=1 - b2)  # v = β2 v + (1-β2) g²
            torch._foreach_copy_([st["exp_avg"] for st in sts], ms)
            torch._foreach_copy_([st["exp_avg_sq"] for st in sts], vs)
            torch._foreach_mul_(ws, 1 - lr * wd)  # decoupled weight decay
            denom = torch._foreach_sqrt(vs)  # sqrt(v / (1-β2^t)) + eps, with each parameter's own t
            torch._foreach_div_(denom, [math.sqrt(1 - b2 ** st["step"]) for st in sts])
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(ws, ms, denom, [-lr / (1 - b1 ** st["step"]) for st in sts])
            for w, p in zip(ws, ps):
                if w is not p:
                    p.copy_(w)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts floating state to the parameter's dtype on load: undo it for the BF16 moments and
        # keep FP32 masters of low-precision parameters at full precision
        saved = {i: s["master"] for i, s in state_dict["state"].items() if "master" in s}
        super().load_state_dict(state_dict)
        ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = dict(zip(ids, chain.from_iterable(g["params"] for g in self.param_groups)))
        for i, p in params.items():
            st = self.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    st[key] = st[key].to(torch.bfloat16)
            if i in saved:
                st["master"] = saved[i].to(device=p.device, dtype=torch.float32)
