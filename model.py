"""
The DeepSeek-V3 architecture in one file: MLA attention, DeepSeekMoE with auxiliary-loss-free
balancing, and Multi-Token Prediction.

Paper: DeepSeek-V3 Technical Report (arXiv 2412.19437). Sections implemented here:
  §2.1.1 Multi-head Latent Attention (MLA), eqs. (1)-(11)       -> MLA
  §2.1.2 DeepSeekMoE + auxiliary-loss-free load balancing (12)-(16)  -> Gate, MoE
         complementary sequence-wise balance loss, eqs. (17)-(20)  -> MoE.sequence_balance_loss
         node-limited (here: group-limited) routing                -> Gate
  §2.2   Multi-Token Prediction, eqs. (21)-(25)                  -> MTP, Transformer.forward / mtp_forward
  §3.2.1 a pipeline stage (a slice of the model, for dualpipe.py) -> Transformer.pipeline_stage
  §4.2   init std 0.006                                          -> Transformer._init_weights
  §4.3   YaRN long-context extension                             -> precompute_freqs_cis, MLA.softmax_scale
Names follow the official inference code (github.com/deepseek-ai/DeepSeek-V3, inference/model.py) so a
learner can diff the two: ModelArgs fields, embed/layers/norm/head, attn.wq_a/q_norm/wq_b/wkv_a/kv_norm/
wkv_b/wo, ffn.gate/experts/shared_experts, w1/w2/w3.

Simplifications vs. the real thing:
  - expert parallelism (the all-to-all around the routed experts) lives in parallel.py, behind `MoE.ep`;
  - "node-limited" routing becomes "group-limited" routing on one device (same maths, M groups of experts);
  - each expert keeps its own nn.Linear weights (official names, FP8-convertible), so the grouped GEMM
    stacks them on the fly every forward, an extra copy that one stored (E, I, D) tensor would avoid;
  - no tensor parallelism, no FP8 here (fp8.py swaps the nn.Linear layers for FP8 ones).

The API callers use: forward(tokens, targets) -> Output(logits, losses); trunk / logits (hidden states and
their logits, for speculative decoding); setup_cache / rollback_cache / clear_cache (the generation cache);
update_router_biases (after every optimizer step); set_impl (naive/absorb, latent/sdpa decoding, grouped/sorted/loop).

Run: python -m pytest tests/test_model.py   (python train.py --config small trains one)

Dimension legend (used in every shape comment):
  B batch, T tokens in this call, S cached+new key positions, D model dim (dim), V vocab
  H heads, Dn qk_nope_head_dim, Dr qk_rope_head_dim, Dv v_head_dim
  Cq q_lora_rank, Ckv kv_lora_rank (the latent c_kv that is cached)
  N tokens flattened (B*T), E routed experts, K active experts per token, G expert groups, I expert hidden
"""
import contextlib
import math
from dataclasses import dataclass, fields
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


# -----------------------------------------------------------------------------
# Config

@dataclass
class ModelArgs:
    # vocabulary and trunk
    vocab_size: int = 4096          # V
    dim: int = 256                  # d, the residual stream width
    inter_dim: int = 1024           # hidden width of the dense SwiGLU FFN (first layers)
    moe_inter_dim: int = 256        # hidden width of one expert
    n_layers: int = 4               # L transformer blocks of the main model
    n_dense_layers: int = 1         # first layers use a dense FFN instead of MoE (3 in V3)
    n_heads: int = 4                # n_h
    # MoE (§2.1.2)
    n_routed_experts: int = 16      # N_r
    n_shared_experts: int = 1       # N_s
    n_activated_experts: int = 4    # K_r, routed experts per token
    n_expert_groups: int = 4        # G, groups for group-limited routing (nodes in the paper)
    n_limited_groups: int = 2       # M, groups a token may route to
    route_scale: float = 1.0        # routed_scaling_factor multiplying the gates (2.5 in V3)
    # MLA (§2.1.1)
    q_lora_rank: int = 128          # d'_c, query latent (0 = no query compression, as in V2-Lite)
    kv_lora_rank: int = 64          # d_c, KV latent: the only per-token state we cache (with k_R)
    qk_nope_head_dim: int = 32      # d_h, per-head dim of the compressed ("no position") part
    qk_rope_head_dim: int = 16      # d^R_h, decoupled RoPE key/query dim
    v_head_dim: int = 32            # per-head value dim
    # positions: RoPE + YaRN (§4.3)
    max_seq_len: int = 256          # longest sequence (also the RoPE table length)
    original_seq_len: int = 256     # context the model was pre-trained at; YaRN kicks in beyond it
    rope_theta: float = 10000.0     # RoPE base
    rope_factor: float = 40.0       # YaRN s
    beta_fast: int = 32             # YaRN β (high-frequency end of the ramp)
    beta_slow: int = 1              # YaRN α (low-frequency end of the ramp)
    mscale: float = 1.0             # YaRN attention temperature coefficient (sqrt(1/t) = 0.1·mscale·ln s + 1)
    # training-only (not in the official inference ModelArgs)
    n_mtp_depth: int = 1            # D, number of MTP modules (§2.2)
    mtp_lambda: float = 0.3         # λ, MTP loss weight (0.3 early, 0.1 later in V3)
    aux_alpha: float = 1e-4         # α, sequence-wise balance loss weight (eq. 17)
    bias_update_speed: float = 1e-3 # γ, router bias step of aux-loss-free balancing
    init_std: float = 0.006         # std of every weight's normal init (§4.2)
    dropout: float = 0.0            # residual dropout on each attention/FFN output (NOTE: not in V3; small data)
    # implementation switches (same maths, different speed)
    attn_impl: str = "naive"        # 'naive' materializes per-head K/V; 'absorb' attends in the latent space
    moe_impl: str = "grouped"       # 'grouped' one grouped GEMM; 'sorted' one matmul per expert; 'loop' reference
    gate_impl: str = "topk"         # router selection: 'topk' reference; 'rank' compares all pairs (fast compiled, few E)

    def __post_init__(self):
        def check(ok, msg):
            if not ok:
                raise ValueError(f"invalid ModelArgs: {msg}")
        for f in fields(self):
            if f.type in ("int", int) and not isinstance(getattr(self, f.name), int):
                raise ValueError(f"invalid ModelArgs: {f.name} must be an int, got {getattr(self, f.name)!r}")
        for name in ("vocab_size", "dim", "inter_dim", "n_layers", "n_heads", "kv_lora_rank",
                     "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_seq_len", "original_seq_len"):
            check(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        check(0 <= self.n_dense_layers <= self.n_layers, "n_dense_layers must be in [0, n_layers]")
        check(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        check(self.q_lora_rank >= 0 and self.n_mtp_depth >= 0, "q_lora_rank and n_mtp_depth must be >= 0")
        check(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim must be even (RoPE rotates pairs)")
        for f in fields(self):   # a NaN or inf setting only shows up later, as a NaN loss
            v = getattr(self, f.name)
            check(not isinstance(v, float) or math.isfinite(v), f"{f.name} must be finite, got {v}")
        check(self.rope_theta > 1, f"rope_theta must be > 1 (the RoPE base), got {self.rope_theta}")
        check(self.rope_factor >= 1 and self.mscale >= 0, f"need rope_factor >= 1 (YaRN s) and mscale >= 0, got "
              f"{self.rope_factor} and {self.mscale}")
        check(0 < self.beta_slow < self.beta_fast, f"need 0 < beta_slow < beta_fast (YaRN's ramp), got "
              f"{self.beta_slow} and {self.beta_fast}")
        check(self.init_std > 0, f"init_std must be > 0, got {self.init_std}")
        for name in ("mtp_lambda", "aux_alpha", "bias_update_speed"):
            check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        check(self.attn_impl in ("naive", "absorb"), f"attn_impl must be 'naive' or 'absorb', got {self.attn_impl!r}")
        check(self.gate_impl in ("topk", "rank"), f"gate_impl must be 'topk' or 'rank', got {self.gate_impl!r}")
        check(self.moe_impl in ("grouped", "sorted", "loop"),
              f"moe_impl must be 'grouped', 'sorted' or 'loop', got {self.moe_impl!r}")
        if self.n_dense_layers < self.n_layers or self.n_mtp_depth > 0:  # some block is an MoE block
            E, G, M, K = self.n_routed_experts, self.n_expert_groups, self.n_limited_groups, self.n_activated_experts
            check(E > 0 and self.moe_inter_dim > 0, "MoE layers need n_routed_experts > 0 and moe_inter_dim > 0")
            check(G >= 1 and E % G == 0, f"n_routed_experts ({E}) must be divisible by n_expert_groups ({G})")
            check(1 <= M <= G, f"n_limited_groups ({M}) must be in [1, n_expert_groups={G}]")
            check(G == 1 or E // G >= 2, "each expert group needs >= 2 experts (groups are scored by their top-2)")
            check(1 <= K <= M * (E // G), f"n_activated_experts ({K}) must be in [1, n_limited_groups*experts_per_group"
                  f"={M * (E // G)}]")
            check(self.n_shared_experts >= 0 and self.route_scale > 0, "need n_shared_experts >= 0, route_scale > 0")


# -----------------------------------------------------------------------------
# RMSNorm and RoPE with YaRN

def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    # bf16/fp16 -> fp32 for numerically touchy maths (norms, rotations, logits); fp64 stays fp64 for tests
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    fused_cpu = True   # RMSNormCPU on eager CPU (False: F.rms_norm, for benchmarks: bench/ab_step.py)

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # norm in (at least) fp32 whatever the input dtype (bf16 sums of squares lose digits), cast back after
        xf = at_least_fp32(x)
        if self.fused_cpu and x.device.type == "cpu" and not torch.compiler.is_compiling():   # same maths, fewer ops
            return RMSNormCPU.apply(xf, self.weight.to(xf.dtype), self.eps).to(x.dtype)
        return F.rms_norm(xf, (x.size(-1),), self.weight.to(xf.dtype), self.eps).to(x.dtype)


class RMSNormCPU(torch.autograd.Function):
    """y = x / rms(x) · w with a hand-written backward, for eager CPU: F.rms_norm runs there as ~5 separate ops
    forward and ~10 backward (pow, mean, rsqrt, muls and their gradients); this keeps x̂ = x / rms(x) and 1/rms
    and returns dx = (g·w − x̂ · mean(g·w · x̂)) / rms, dw = Σ g · x̂ (measured on (2048, 128) fp32 forward +
    backward: 6.0 -> 1.4-1.6 ms, one thread). x (..., D), w (D,)."""

    @staticmethod
    def forward(ctx, x, w, eps: float):
        r = torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True).add_(eps))        # (..., 1) 1/rms
        xn = x * r                                                            # (..., D)
        ctx.save_for_backward(xn, w, r)
        return xn * w

    @staticmethod
    def backward(ctx, g):
        xn, w, r = ctx.saved_tensors
        gw = (g * xn).reshape(-1, xn.size(-1)).sum(0)                          # (D,)
        gx = g * w                                                            # (..., D)
        gx = (gx - xn * (gx * xn).mean(dim=-1, keepdim=True)).mul_(r)
        return gx, gw, None


def precompute_freqs_cis(args: ModelArgs) -> torch.Tensor:
    """RoPE rotation table for positions 0..max_seq_len-1, as (cos, sin): (max_seq_len, Dr/2, 2) fp32.

    YaRN (§4.3, Peng et al. 2023): when max_seq_len exceeds the pre-training context, frequencies that
    rotate fewer than beta_slow times over the original context are divided by s (interpolated), those
    rotating more than beta_fast times are kept (extrapolated), with a linear ramp in between.
    """
    dim, base, s = args.qk_rope_head_dim, args.rope_theta, args.rope_factor
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))  # (Dr/2,) radians per position
    if args.max_seq_len > args.original_seq_len:
        # pair index whose wavelength fits `rot` full turns into the original context
        def pair_for(rot):
            return dim * math.log(args.original_seq_len / (rot * 2 * math.pi)) / (2 * math.log(base))
        low = max(math.floor(pair_for(args.beta_fast)), 0)
        high = min(math.ceil(pair_for(args.beta_slow)), dim - 1)
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
        freqs = freqs / s * ramp + freqs * (1 - ramp)  # ramp=0: keep (high freq), ramp=1: interpolate
    angles = torch.outer(torch.arange(args.max_seq_len, dtype=torch.float64), freqs)  # (max_seq_len, Dr/2)
    return torch.stack([angles.cos(), angles.sin()], dim=-1).float()  # (max_seq_len, Dr/2, 2)


def apply_rotary_emb_ref(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0,x1),(x2,x3),... of the last dim, as the official code's complex multiply.

    x: (B, T, H, Dr); freqs_cis: (T, Dr/2, 2). NOTE: Llama's "rotate-half" pairs (x_i, x_{i+Dr/2}) instead:
    a different function for the same weights, so checkpoints would not interchange.
    """
    xp = at_least_fp32(x).unflatten(-1, (-1, 2))           # (B, T, H, Dr/2, 2)
    x0, x1 = xp[..., 0], xp[..., 1]                        # (B, T, H, Dr/2) each
    cos = freqs_cis[:, None, :, 0]                         # (T, 1, Dr/2)
    sin = freqs_cis[:, None, :, 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)  # (B, T, H, Dr/2, 2)
    return out.flatten(-2).to(x.dtype)                     # (B, T, H, Dr)


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """The same rotation. On the CPU in eager mode as one complex multiply, the official code's form: 4 ops
    forward instead of 10 (measured 3.7x faster forward+backward for a (16, 128, 4, 16) query, one thread).
    torch.compile handles complex numbers poorly, so compiled code and GPUs take the real form above."""
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return apply_rotary_emb_ref(x, freqs_cis)
    xc = torch.view_as_complex(at_least_fp32(x).unflatten(-1, (-1, 2)).contiguous())  # (B, T, H, Dr/2) complex
    rot = torch.view_as_complex(at_least_fp32(freqs_cis))[:, None]  # (T, 1, Dr/2): cos + i·sin
    return torch.view_as_real(xc * rot).flatten(-2).to(x.dtype)  # (B, T, H, Dr)


# -----------------------------------------------------------------------------
# Multi-head Latent Attention (§2.1.1)

# MLA's query/key dim (Dn+Dr) differs from its value dim (Dv), which FlashAttention-2 does not support. Measured on
# an H200 at MLA's shapes (B=4, H=16, T=2048, qk 192, v 128, causal): cuDNN 0.21 ms forward / 1.17 ms fwd+bwd, the
# memory-efficient kernel PyTorch would otherwise pick 0.74 / 7.2 ms; so ask for cuDNN first. On CPU only the math /
# flash-CPU kernels exist; the list changes nothing.
SDPA_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                 SDPBackend.MATH]


def attention(q, k, v, mask, causal: bool, scale: float) -> torch.Tensor:
    """softmax(q·kᵀ·scale + mask) v with q (B, H, T, Dqk), k (B, H, S, Dqk), v (B, H, S, Dv) -> (B, H, T, Dv).
    mask: None or (T, S) bool, True = may attend; causal: the top-left-aligned causal mask instead."""
    if q.device.type == "cpu" and not torch.compiler.is_compiling():
        return attention_cpu(q, k, v, mask, causal, scale)
    with sdpa_kernel(SDPA_BACKENDS, set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


def attention_cpu(q, k, v, mask, causal: bool, scale: float) -> torch.Tensor:
    """The same maths as three plain ops. For MLA's shapes (value dim != query dim) CPU SDPA falls back to its
    'math' kernel: ~10 ops with a NaN-safe softmax; here one baddbmm applies scale and mask at once
    (measured ~20% less time forward+backward at the small preset's shapes, one thread).
    Under bf16 autocast the scores and their softmax stay fp32, as in FlashAttention (CPU autocast would round
    the scores to bf16 and run softmax and its backward in bf16); only the probabilities-times-values product
    runs in bf16."""
    B, H, T, Dqk = q.shape
    S, Dv = k.size(2), v.size(3)
    q3, k3, v3 = q.reshape(B * H, T, Dqk), k.reshape(B * H, S, Dqk), v.reshape(B * H, S, Dv)
    if causal:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()        # (T, S)
    with torch.autocast("cpu", enabled=False):
        q3, k3 = at_least_fp32(q3), at_least_fp32(k3)
        if mask is None:
            scores = torch.bmm(q3, k3.transpose(1, 2)) * scale                   # (B*H, T, S)
        else:   # additive mask: 0 where allowed, -inf elsewhere (a row always keeps its own position)
            bias = torch.zeros(T, S, dtype=q3.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
            scores = torch.baddbmm(bias, q3, k3.transpose(1, 2), alpha=scale)    # (B*H, T, S)
        probs = scores.softmax(dim=-1)                                           # (B*H, T, S)
    return torch.bmm(probs.to(v3.dtype), v3).view(B, H, T, Dv)                  # (B, H, T, Dv)


# latent_attention serves calls of at most this many query positions (decoding: 1, or D+1 when verifying drafts);
# longer ones (a prompt) take SDPA, whose fused kernels do not materialize the (H*T, S) scores. Measured on an H200
# at the gpu preset's widths over a 1024-position cache (bench/bench_attention.py): latent_attention takes 0.35x
# SDPA's time at T=1, 0.39x at 64, 0.68x at 256, 1.6x at 1024
LATENT_MAX_T = 64


def latent_attention(q, kv, n_values: int, mask, scale: float) -> torch.Tensor:
    """Absorbed MLA over the latent cache, without SDPA: q (B, T, H, Ckv+Dr) against the cached rows kv (B, S, Ckv+Dr)
    = [c_kv ; k_R] of every position, which are the keys, and whose first Ckv columns are the values -> (B, T, H, Ckv).
    Every head reads the same keys (multi-query attention), so the scores are ONE matmul over all T*H query rows,
    where SDPA needs a per-head (B, H, S, .) view of the cache: on the H200 that is its memory-efficient kernel,
    ~60 us per layer for one token over a 1024-position cache, against 8.5 us for this, compiled (README
    "Generation"). mask: None or (T, S) bool.
    As the official inference code: the scores in the working dtype, their softmax in fp32."""
    B, T, H, Dqk = q.shape
    scores = q.reshape(B, T * H, Dqk) @ kv.transpose(1, 2)                # (B, T*H, S), row t*H+h
    scores = at_least_fp32(scores) * scale
    if mask is not None:   # query position t's mask for each of its H rows
        scores = scores.masked_fill(~mask.repeat_interleave(H, dim=0), float("-inf"))
    probs = scores.softmax(dim=-1).to(kv.dtype)                            # (B, T*H, S)
    return (probs @ kv[..., :n_values]).view(B, T, H, n_values)            # (B, T, H, Ckv)


class MLA(nn.Module):
    """Attention whose keys and values are rebuilt from a small per-token latent c_kv (plus one shared
    RoPE key k_R), so a generation cache needs only (Ckv + Dr) numbers per token instead of 2·H·Dh."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.kv_lora_rank = args.n_heads, args.kv_lora_rank
        self.dn, self.dr, self.dv = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        H, qk = args.n_heads, args.qk_nope_head_dim + args.qk_rope_head_dim
        if args.q_lora_rank == 0:
            self.wq = nn.Linear(args.dim, H * qk, bias=False)           # eq. (6)-(7) without compression
        else:
            self.wq_a = nn.Linear(args.dim, args.q_lora_rank, bias=False)   # W^DQ, eq. (6)
            self.q_norm = RMSNorm(args.q_lora_rank)
            self.wq_b = nn.Linear(args.q_lora_rank, H * qk, bias=False)     # [W^UQ ; W^QR] stacked per head
        # W^DKV and W^KR in one matmul: the latent c_kv and the decoupled key k_R, eqs. (1) and (3)
        self.wkv_a = nn.Linear(args.dim, args.kv_lora_rank + self.dr, bias=False)
        self.kv_norm = RMSNorm(args.kv_lora_rank)
        # [W^UK ; W^UV] per head, eqs. (2) and (5): (H*(Dn+Dv), Ckv)
        self.wkv_b = nn.Linear(args.kv_lora_rank, H * (self.dn + self.dv), bias=False)
        self.wo = nn.Linear(H * self.dv, args.dim, bias=False)             # W^O, eq. (11)
        # eq. (10): scores / sqrt(Dn + Dr); YaRN multiplies by mscale² (the "temperature" of §4.3)
        self.softmax_scale = (self.dn + self.dr) ** -0.5
        if args.max_seq_len > args.original_seq_len:
            mscale = 0.1 * args.mscale * math.log(args.rope_factor) + 1.0
            self.softmax_scale *= mscale * mscale
        self.attn_impl = args.attn_impl
        self.decode_impl = "latent"   # absorb mode with a cache, T <= LATENT_MAX_T: 'latent' (latent_attention) or 'sdpa'
        # the generation cache (Transformer.setup_cache): per position the row [c_kv ; k_R], (B, S_max, Ckv+Dr)
        self.latent_cache = None

    @property
    def kv_cache(self):   # (B, S_max, Ckv): the cached c_kv, a view of latent_cache
        return None if self.latent_cache is None else self.latent_cache[..., :self.kv_lora_rank]

    @property
    def pe_cache(self):   # (B, S_max, Dr): the cached k_R
        return None if self.latent_cache is None else self.latent_cache[..., self.kv_lora_rank:]

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        H, Dn, Dr, Dv, C = self.n_heads, self.dn, self.dr, self.dv, self.kv_lora_rank
        # queries: low-rank, normed latent, then up-projected per head
        q = self.wq(x) if hasattr(self, "wq") else self.wq_b(self.q_norm(self.wq_a(x)))  # (B, T, H*(Dn+Dr))
        q = q.view(B, T, H, Dn + Dr)
        q_nope, q_pe = q.split([Dn, Dr], dim=-1)          # (B, T, H, Dn), (B, T, H, Dr)
        q_pe = apply_rotary_emb(q_pe, freqs_cis)          # eq. (8): q^R = RoPE(W^QR c_q), per head
        # keys/values: the latent c_kv (normed) and ONE rope key for all heads
        kv = self.wkv_a(x)                                # (B, T, Ckv+Dr)
        c_kv, k_pe = kv.split([C, Dr], dim=-1)            # (B, T, Ckv), (B, T, Dr)
        c_kv = self.kv_norm(c_kv)
        k_pe = apply_rotary_emb(k_pe.unsqueeze(2), freqs_cis).squeeze(2)  # eq. (3): (B, T, Dr)

        latent = None   # (B, S, Ckv+Dr): the cached rows [c_kv ; k_R] of every position, when generating
        if isinstance(start_pos, torch.Tensor):   # static shapes for CUDA graphs (sample.py); see below
            latent, mask = self.write_cache_static(torch.cat([c_kv, k_pe], dim=-1), start_pos)
            causal = False
        else:
            end = start_pos + T
            if self.latent_cache is not None:   # generation: cache only what eq. (1)/(3) produce, then read it all back
                self.latent_cache[:B, start_pos:end] = torch.cat([c_kv, k_pe], dim=-1)
                latent = self.latent_cache[:B, :end]                         # (B, S, Ckv+Dr)
            else:
                assert start_pos == 0, "start_pos > 0 needs a cache (call model.setup_cache first)"
            # causal mask for queries at positions start_pos..end-1 against keys 0..S-1; SDPA's is_causal
            # aligns the top-left corner, which is only right when there is no cached prefix
            mask = None
            if start_pos > 0 and T > 1:
                mask = torch.ones(T, end, dtype=torch.bool, device=x.device).tril(diagonal=start_pos)  # (T, S)
            causal = start_pos == 0 and T > 1
        if latent is not None:
            c_kv, k_pe = latent.split([C, Dr], dim=-1)    # (B, S, Ckv), (B, S, Dr)
        S = c_kv.size(1)

        wkv_b = self.wkv_b.weight.view(H, Dn + Dv, C)     # (H, Dn+Dv, Ckv): W^UK rows then W^UV rows per head
        if self.attn_impl == "naive":
            # materialize per-head keys and values from the latent: eqs. (2), (4), (5)
            kv = self.wkv_b(c_kv).view(B, S, H, Dn + Dv)  # (B, S, H, Dn+Dv)
            k_nope, v = kv.split([Dn, Dv], dim=-1)        # (B, S, H, Dn), (B, S, H, Dv)
            k = torch.cat([k_nope, k_pe[:, :, None, :].expand(B, S, H, Dr)], dim=-1)  # (B, S, H, Dn+Dr)
            qh = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)                    # (B, H, T, Dn+Dr)
            o = attention(qh, k.transpose(1, 2), v.transpose(1, 2), mask, causal, self.softmax_scale)  # (B, H, T, Dv)
            o = o.transpose(1, 2)                                                     # (B, T, H, Dv)
        else:
            # "absorb": q_nope·(W^UK c) = (W^UKᵀ q_nope)·c, so fold W^UK into the query and score against
            # the latent directly; likewise apply W^UV after the weighted sum of latents. Attention becomes
            # multi-query attention over (Ckv+Dr)-dim keys shared by all heads: nothing per head is built.
            q_lat = torch.einsum("bthd,hdc->bthc", q_nope, wkv_b[:, :Dn].to(q_nope.dtype))  # (B, T, H, Ckv)
            q = torch.cat([q_lat, q_pe], dim=-1)                                           # (B, T, H, Ckv+Dr)
            if latent is not None and T <= LATENT_MAX_T and self.decode_impl == "latent":   # decoding
                if causal:   # a short prompt at position 0: is_causal as a mask
                    mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril()    # (T, S)
                o_lat = latent_attention(q, latent, C, mask, self.softmax_scale)             # (B, T, H, Ckv)
            else:
                latent = torch.cat([c_kv, k_pe], dim=-1) if latent is None else latent     # (B, S, Ckv+Dr)
                k = latent[:, None].expand(B, H, S, C + Dr)                                # (B, H, S, Ckv+Dr)
                v = c_kv[:, None].expand(B, H, S, C)                                       # (B, H, S, Ckv)
                o_lat = attention(q.transpose(1, 2), k, v, mask, causal, self.softmax_scale).transpose(1, 2)
            o = torch.einsum("bthc,hdc->bthd", o_lat, wkv_b[:, Dn:].to(o_lat.dtype))      # (B, T, H, Dv)
        return self.wo(o.flatten(2))                       # (B, T, D)

    def write_cache_static(self, rows, start_pos: torch.Tensor):
        """The cache step with every shape fixed, so that one CUDA graph serves every position: the T new rows
        [c_kv ; k_R] (B, T, Ckv+Dr) go to positions start_pos..start_pos+T-1 (start_pos a (1,) device tensor, not a
        Python int), and the queries attend over the WHOLE cache (B, S_max, ...) with the positions after their own
        masked out: the same attention as reading back only [:end], at S_max/end times the (small) cost for one token."""
        B, T = rows.shape[:2]
        pos = start_pos + torch.arange(T, device=rows.device)                  # (T,) absolute positions
        self.latent_cache[:B].index_copy_(1, pos, rows.to(self.latent_cache.dtype))
        S = self.latent_cache.size(1)
        mask = torch.arange(S, device=pos.device) <= pos[:, None]              # (T, S_max) causal, in absolute positions
        return self.latent_cache[:B], mask                                     # (B, S_max, Ckv+Dr), mask


# -----------------------------------------------------------------------------
# Feed-forward: dense SwiGLU, experts, gate, MoE (§2.1.2)

class MLP(nn.Module):
    """SwiGLU FFN: w2(silu(w1 x) * w3 x). Used for the dense layers, each expert and the shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)   # gate projection
        self.w2 = nn.Linear(inter_dim, dim, bias=False)   # down projection
        self.w3 = nn.Linear(dim, inter_dim, bias=False)   # up projection

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def rank_desc(x: torch.Tensor) -> torch.Tensor:
    """Rank of each entry along the last dim in descending order (0 = largest), ties to the lower index:
    rank_i = #{j : x_j > x_i} + #{j < i : x_j = x_i}. x (..., n) -> (..., n) long, from (..., n, n) compares."""
    xi, xj = x.unsqueeze(-1), x.unsqueeze(-2)                                # (..., n, 1), (..., 1, n)
    j_before_i = torch.ones(x.size(-1), x.size(-1), dtype=torch.bool, device=x.device).tril(-1)  # (n, n): j < i
    return ((xj > xi) | ((xj == xi) & j_before_i)).sum(dim=-1)             # (..., n)


class Gate(nn.Module):
    """Sigmoid router with a selection-only bias (aux-loss-free balancing) and group-limited top-k.

    Not an nn.Linear on purpose: the paper keeps the gate in higher precision, and fp8.py converts
    exactly the nn.Linear layers.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.topk, self.n_groups, self.topk_groups = args.n_activated_experts, args.n_expert_groups, args.n_limited_groups
        self.route_scale, self.gamma = args.route_scale, args.bias_update_speed
        self.impl = args.gate_impl
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim))   # centroids e_i, (E, D)
        # b_i of eq. (16): a buffer, not a parameter: it is moved by the load rule below, never by gradients
        self.register_buffer("bias", torch.zeros(args.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor):
        """x: (N, D) -> gates (N, K) fp32, expert ids (N, K) long, unbiased affinities s (N, E) fp32."""
        s = at_least_fp32(F.linear(x, self.weight)).sigmoid()     # eq. (15): s_i = sigmoid(u·e_i), (N, E)
        # eq. (16): the bias is used for *selection* only, and selection passes no gradient (indices)
        select = self.select_rank if self.impl == "rank" else self.select_topk
        idx = select(s.detach() + self.bias)                # (N, K)
        g = s.gather(1, idx)                                # eq. (13): gates from the *unbiased* affinities
        g = g / g.sum(dim=-1, keepdim=True) * self.route_scale  # normalized over the selected, times 2.5 in V3
        return g, idx, s

    def select_topk(self, biased: torch.Tensor) -> torch.Tensor:
        """Reference: group-limited top-K with torch.topk. biased (N, E) -> expert ids (N, K), best first."""
        if self.n_groups > 1:
            N = biased.size(0)
            grouped = biased.view(N, self.n_groups, -1)                     # (N, G, E/G)
            group_score = grouped.topk(2, dim=-1).values.sum(dim=-1)        # sum of top-2 per group, (N, G)
            keep = group_score.topk(self.topk_groups, dim=-1).indices       # (N, M)
            drop = torch.ones_like(group_score, dtype=torch.bool).scatter_(1, keep, False)  # (N, G)
            # -inf, so an expert of a dropped group can never be chosen, however few experts remain
            biased = grouped.masked_fill(drop[:, :, None], float("-inf")).flatten(1)  # (N, E)
        return biased.topk(self.topk, dim=-1).indices      # (N, K)

    def select_rank(self, biased: torch.Tensor) -> torch.Tensor:
        """The same choice as select_topk without torch.topk, for few experts (32 here): rank each score by
        counting the scores above it, keep ranks < K. Only comparisons and sums over (N, E, E), which
        torch.compile fuses into a couple of kernels, where topk is 3 library calls of ~250 µs each on
        (32768, 32) scores (issue #13's profile). Ties go to the lower index (topk leaves them unspecified)."""
        N, E = biased.shape
        if self.n_groups > 1:
            grouped = biased.view(N, self.n_groups, -1)                     # (N, G, E/G)
            top2 = torch.where(rank_desc(grouped) < 2, grouped, 0.0).sum(dim=-1)  # sum of top-2 per group, (N, G)
            drop = rank_desc(top2) >= self.topk_groups                      # (N, G)
            biased = grouped.masked_fill(drop[:, :, None], float("-inf")).flatten(1)  # (N, E)
        rank = rank_desc(biased)                                            # (N, E): 0 = best
        k = torch.arange(self.topk, device=biased.device)                   # (K,)
        e = torch.arange(E, device=biased.device)                           # (E,)
        # the expert whose rank is k, for k < K: exactly one per k, so a sum picks it out
        return ((rank[:, :, None] == k) * e[:, None]).sum(dim=1)           # (N, K), best first, as topk

    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor):
        """Aux-loss-free balancing: b_i += γ·sign(mean_load − load_i), with counts (E,) this step's tokens."""
        load = counts.float()
        self.bias += self.gamma * torch.sign(load.mean() - load)


class Permute(torch.autograd.Function):
    """y = x[perm] for a permutation perm with inverse inv. Autograd would differentiate x[perm] as a
    scatter-add into zeros (index_put with accumulate: atomics); a permutation's gradient is the inverse
    permutation, a plain gather. index_select, not x[perm]: the same rows, but CPU advanced indexing runs a
    generic kernel, 2.5-5x slower on (4096, 128) fp32 rows (one thread; it cost the small preset ~4% of a step)."""

    @staticmethod
    def forward(ctx, x, perm, inv):
        ctx.save_for_backward(inv)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad):
        inv, = ctx.saved_tensors
        return grad.index_select(0, inv), None, None


class MoE(nn.Module):
    """h' = Σ_shared FFN_s(u) + Σ_routed g_i FFN_i(u) (eq. 12; the residual u is added by Block)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_routed, self.topk, self.alpha = args.n_routed_experts, args.n_activated_experts, args.aux_alpha
        self.impl = args.moe_impl
        self.gate = Gate(args)
        self.experts = nn.ModuleList(MLP(args.dim, args.moe_inter_dim) for _ in range(args.n_routed_experts))
        # N_s shared experts are one MLP of N_s times the width (the same function, one matmul)
        self.shared_experts = MLP(args.dim, args.n_shared_experts * args.moe_inter_dim) if args.n_shared_experts else None
        # tokens routed to each expert since the last bias update (summed over grad-accumulation micro-steps)
        self.register_buffer("load", torch.zeros(args.n_routed_experts, dtype=torch.long), persistent=False)
        self.last_counts = None     # (E,) tokens per expert in the last forward, for logging
        self.balance_loss = None    # scalar from the last training forward (eq. 17)
        self.ep = None              # parallel.ExpertParallel when the routed experts are sharded over ranks
        self.stacked = None         # {w1, w2, w3: (E, out, in)} whose slices ARE the experts' weights (stack_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        u = x.reshape(B * T, D)                              # (N, D)
        g, idx, s = self.gate(u)                             # (N, K), (N, K), (N, E)
        flat = idx.flatten()                                 # (N*K,)
        # tokens per expert; scatter_add (not bincount) keeps the shape static for torch.compile
        counts = torch.zeros(self.n_routed, dtype=torch.long, device=u.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))  # (E,)
        self.last_counts = counts.detach()
        if self.training and torch.is_grad_enabled():
            self.load += counts      # only real training steps move the router bias (not eval, not no_grad)
            self.balance_loss = self.sequence_balance_loss(s.view(B, T, -1), idx.view(B, T, -1))
        if self.ep is not None:     # expert parallelism: self.experts holds this rank's shard only
            y = self.ep(self, u, g, idx)                     # (N, D)
        else:
            route = {"grouped": self.routed_grouped, "sorted": self.routed_sorted, "loop": self.routed_loop}[self.impl]
            y = route(u, g, idx, counts)                     # (N, D)
        if self.shared_experts is not None:
            y = y + self.shared_experts(u)
        return y.view(B, T, D)

    def sort_by_expert(self, u, idx):
        """Sort the N·K (token, expert) pairs by expert: each expert's tokens become one contiguous slice."""
        order = idx.flatten().argsort(stable=True)          # (N*K,) pairs grouped by expert
        tok = order // self.topk                             # (N*K,) source token of each sorted pair
        return order, tok, u[tok]                            # ..., (N*K, D) gathered, expert-contiguous

    def routed_sorted(self, u, g, idx, counts):
        """One matmul per weight per expert over its contiguous slice; no token dropped, no wasted compute.
        Works with any Linear (fp8.py's too). NOTE: the split sizes must be known on the host, one
        device->host sync per MoE layer; routed_grouped avoids it."""
        order, tok, xs = self.sort_by_expert(u, idx)
        outs = [self.experts[e](chunk) for e, chunk in enumerate(xs.split(counts.tolist())) if chunk.numel()]
        ys = at_least_fp32(torch.cat(outs)) * g.flatten()[order, None]  # (N*K, D) gated
        return torch.zeros_like(u).index_add_(0, tok, ys.to(u.dtype))

    def routed_grouped(self, u, g, idx, counts):
        """The fast path: all experts in ONE grouped GEMM per weight (torch._grouped_mm), with the expert
        boundaries given as device-side offsets: no host sync, static shapes (torch.compile captures it).
        Tokens move by ONE permutation each way (permute_by_expert / unpermute_and_combine), whose backward
        is the inverse permutation: gathers only, no scatter-add (atomics) as index_add_ would need.
        The per-expert weights are stacked on the fly: (E, I, D), one extra read of the expert weights."""
        if hasattr(self.experts, "grouped"):   # fp8.Fp8Experts: dispatch, experts and combine in one FP8 call
            return self.experts.grouped(u, g, idx, counts).to(u.dtype)
        dt = torch.get_autocast_dtype(u.device.type) if torch.is_autocast_enabled(u.device.type) else u.dtype
        if dt == torch.bfloat16 and u.device.type == "cpu" and not torch.compiler.is_compiling():
            dt = torch.float32   # eager CPU: a bf16 _grouped_mm is a slow generic loop (it made a bf16 step 1.4x slower)
        # fall back for float64 (tests), old torch, and fp32 under torch.compile (the eager CPU kernel takes
        # fp32, the shape-checking meta kernel that compile traces with wants bf16)
        if dt == torch.float64 and torch.compiler.is_compiling():
            return self.routed_dense(u, g, idx)   # compiled float64 (tests): no host sync, no recompiles
        if dt not in (torch.float32, torch.bfloat16) or \
                not hasattr(torch, "_grouped_mm") or (dt == torch.float32 and torch.compiler.is_compiling()):
            return self.routed_sorted(u, g, idx, counts)
        xs, order, inv = self.permute_by_expert(u.to(dt), idx)   # (N*K, D) expert-contiguous
        offs = counts.cumsum(0).to(torch.int32)              # (E,) end row of each expert's slice

        stacked = None if torch.is_grad_enabled() else self.stacked   # (training must reach each expert's weight)

        def gmm(x, name):   # x (N*K, in) @ W_e.T for each expert's rows -> (N*K, out)
            w = stacked[name] if stacked else torch.stack([getattr(e, name).weight for e in self.experts])
            w = w.to(dt)                                     # (E, out, in)
            return torch._grouped_mm(x, w.transpose(1, 2), offs=offs)
        h = F.silu(gmm(xs, "w1")) * gmm(xs, "w3")            # (N*K, I) SwiGLU
        return self.unpermute_and_combine(gmm(h, "w2"), order, inv, g).to(u.dtype)   # (N, D)

    @torch.no_grad()
    def stack_experts(self):
        """Make the routed experts' weights slices of one (E, out, in) tensor per weight, for inference: no-grad
        forwards then read it as it is instead of stacking E matrices per weight on every call (at batch 1 that
        copy is most of a decoding step's memory traffic). Values unchanged; in-place updates of the weights
        (load_state_dict, optimizers) reach the stack, re-assigning a weight's .data (a dtype cast) does not:
        cast first."""
        if self.ep is not None or hasattr(self.experts, "grouped"):
            return   # sharded or FP8 experts keep their own layout
        self.stacked = {}
        for name in ("w1", "w2", "w3"):
            self.stacked[name] = torch.stack([getattr(e, name).weight for e in self.experts])   # (E, out, in)
            for e, w in zip(self.experts, self.stacked[name]):
                getattr(e, name).weight.data = w

    def permute_by_expert(self, u, idx):
        """Copy each token once per chosen expert, in expert order: xs[r] = u[order[r] // K]. Returns xs
        (N*K, D), order (N*K,) and its inverse inv (order[inv[p]] = p)."""
        N, K = idx.shape
        order = idx.flatten().argsort(stable=True)                           # (N*K,) pairs grouped by expert
        inv = torch.empty_like(order).scatter_(0, order, torch.arange(N * K, device=idx.device))  # (N*K,)
        copies = u.unsqueeze(1).expand(N, K, u.size(1)).reshape(N * K, -1)   # (N*K, D) row n*K+k = u[n]
        return Permute.apply(copies, order, inv), order, inv

    def unpermute_and_combine(self, ys, order, inv, g):
        """ys (N*K, D) in expert order -> (N, D) = Σ_k g[n, k] ys of (n, k): the permutation back, then a
        weighted sum over each token's K rows (a reduction, no scatter). Sums in fp32."""
        N, K = g.shape
        yk = Permute.apply(ys, inv, order).view(N, K, -1)                    # (N, K, D) token order
        return (at_least_fp32(yk) * g[:, :, None]).sum(dim=1)                # (N, D) fp32

    def routed_dense(self, u, g, idx):
        """Every expert on every token, weighted by its gate (0 where not chosen): E/K times the expert FLOPs, but
        static shapes and no host sync, so torch.compile traces it whole where _grouped_mm cannot run (float64)."""
        w = torch.zeros(g.size(0), self.n_routed, dtype=g.dtype, device=g.device).scatter(1, idx, g)  # (N, E)
        return sum(at_least_fp32(e(u)) * w[:, i, None] for i, e in enumerate(self.experts)).to(u.dtype)

    def routed_loop(self, u, g, idx, counts):
        """Reference: for each expert, gather its tokens, run it, scatter-add the gated output."""
        y = torch.zeros_like(u)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(idx == e)                # tokens choosing e, and at which of their K slots
            if tok.numel():
                y.index_add_(0, tok, (at_least_fp32(expert(u[tok])) * g[tok, slot, None]).to(u.dtype))
        return y

    def sequence_balance_loss(self, s: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """eqs. (17)-(20): α Σ_i f_i P_i per sequence, averaged over the batch. s: (B, T, E), idx: (B, T, K)."""
        B, T, E = s.shape
        if self.alpha == 0:
            return s.new_zeros(())
        chosen = F.one_hot(idx, E).sum(dim=2).to(s.dtype)       # (B, T, E) 1 where expert i is in token t's top-K
        f = chosen.sum(dim=1) * E / (self.topk * T)          # eq. (18): (B, E), no gradient (a count)
        P = (s / s.sum(dim=-1, keepdim=True)).mean(dim=1)    # eq. (19)-(20): (B, E), carries the gradient
        return self.alpha * (f * P).sum(dim=-1).mean()


# -----------------------------------------------------------------------------
# Block, MTP module, Transformer

class Output(NamedTuple):
    """What Transformer.forward returns, always: `logits, losses = model(tokens, targets)`."""
    logits: torch.Tensor        # (B, T, V) fp32
    losses: dict | None         # None without targets; else loss, ce, mtp, mtp_k, balance (see forward)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token CE over positions whose target is not -1. logits (B, T, V), targets (B, T)."""
    if logits.device.type == "cpu" and not torch.compiler.is_compiling():
        return SoftmaxCrossEntropy.apply(logits.flatten(0, 1), targets.flatten())
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)


def softmax_nll(z: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits z (N, V), targets tgt (N, 1) (>= 0) -> (p = softmax(z) (N, V), -log p[tgt] (N,)) from the one softmax,
    with the exact log-sum-exp form where p[target] underflowed (loss > ~87 nats) or the logits hold a NaN."""
    p = torch.softmax(z, dim=-1)                                    # (N, V)
    nll = -p.gather(1, tgt).squeeze(1).log()                        # (N,)
    if not torch.isfinite(nll).all():
        nll = torch.logsumexp(z, dim=-1) - z.gather(1, tgt).squeeze(1)
    return p, nll


class SoftmaxCrossEntropy(torch.autograd.Function):
    """The same loss on the CPU, from one softmax: -log p[target] forward, (p - onehot) / n backward. F.cross_entropy
    runs log_softmax there, ~3x slower than softmax at (2048, 2048) fp32, and its backward is a second vocabulary-
    wide pass of the same kind (one thread: 26-31 ms forward+backward, this 14-17 ms; two per small-preset step).
    logits (N, V) fp32/fp64, targets (N,) long, -1 = ignore -> scalar."""

    @staticmethod
    def forward(ctx, logits, targets):
        valid = targets >= 0                                        # (N,)
        tgt = targets.clamp(min=0)[:, None]                         # (N, 1)
        p, nll = softmax_nll(logits, tgt)                           # (N, V), (N,)
        n = valid.sum()
        ctx.save_for_backward(p, tgt, valid, n)
        return nll.where(valid, 0).sum() / n

    @staticmethod
    def backward(ctx, grad):
        p, tgt, valid, n = ctx.saved_tensors
        scale = (grad / n) * valid[:, None]                         # (N, 1): 0 on ignored rows
        g = p * scale                                               # (N, V)
        return g.scatter_add_(1, tgt, -scale), None                 # minus the one-hot at each target


@contextlib.contextmanager
def mkldnn_fp32_precision(precision: str):
    """CPU float32 matmuls at `precision` ('ieee' exact, 'bf16' bf16-rounded inputs) inside the block only."""
    if precision == "ieee" or not hasattr(torch.backends.mkldnn, "matmul"):   # (the knob needs torch >= 2.9)
        yield
        return
    saved = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = precision
    try:
        yield
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = saved


class HeadCrossEntropy(torch.autograd.Function):
    """The output head and its CE loss in one pass over chunks of rows, and with gradients wanted their gradients
    too: logits = h Wᵀ, p = softmax, loss = mean -log p[target], G = (p - onehot) / n, dh = G W, dW = Gᵀ h. The
    CPU fast path of Transformer.head_loss; the reference is Transformer.logits then cross_entropy (same maths).
    Why: at the small preset's (2048, 4096) logits every vocabulary-wide pass (softmax, its gradient, the GEMMs
    reading it) streams 32 MiB through memory; a chunk of 256 rows (4 MiB) stays in the cache from the logits to
    dh and dW. backward only scales the saved dh and dW by the loss's gradient (plus, if a caller differentiated
    the returned logits too, their own gradient). h (N, D), weight (V, D), targets (N,) long (-1 = ignore),
    keep_logits: also return the logits (N, V) (else an empty tensor) -> (loss scalar, logits).
    matmul_precision 'bf16' (config.setup_cpu, --cpu_matmul=head-bf16): its three GEMMs per chunk round their fp32
    inputs to bf16 and accumulate in fp32 (oneDNN; 2.6-4.0x faster at two threads, measured for one 256-row chunk
    on the 2-core CPU, 2026-12-02), while every other matmul of the step stays exact."""
    CHUNK = 256
    matmul_precision = "ieee"

    @staticmethod
    def forward(ctx, h, weight, targets, keep_logits: bool):
        with mkldnn_fp32_precision(HeadCrossEntropy.matmul_precision):
            return HeadCrossEntropy._forward(ctx, h, weight, targets, keep_logits)

    @staticmethod
    def _forward(ctx, h, weight, targets, keep_logits: bool):
        ctx.set_materialize_grads(False)
        N, V = h.size(0), weight.size(0)
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        valid = targets >= 0                                                    # (N,)
        n = valid.sum()
        logits = h.new_empty(N, V) if keep_logits else h.new_empty(0)
        gh = torch.empty_like(h) if want_grad else None                         # (N, D)
        gw = torch.zeros_like(weight) if want_grad else None                    # (V, D)
        total = h.new_zeros(())
        for s in range(0, N, HeadCrossEntropy.CHUNK):
            e = min(N, s + HeadCrossEntropy.CHUNK)
            hc, tgt, ok = h[s:e], targets[s:e].clamp(min=0)[:, None], valid[s:e]   # (c, D), (c, 1), (c,)
            z = torch.mm(hc, weight.t(), out=logits[s:e]) if keep_logits else hc @ weight.t()   # (c, V)
            p, nll = softmax_nll(z, tgt)                                        # (c, V), (c,)
            total += nll.where(ok, 0).sum()
            if want_grad:
                scale = ok[:, None].to(p.dtype) / n                            # (c, 1): 0 on ignored rows
                g = p.mul_(scale).scatter_add_(1, tgt, -scale)                  # (c, V) = (p - onehot) / n
                torch.mm(g, weight, out=gh[s:e])                                # (c, D)
                gw.addmm_(g.t(), hc)                                            # (V, D)
        ctx.save_for_backward(gh, gw, h, weight)
        if not keep_logits:
            ctx.mark_non_differentiable(logits)
        return total / n, logits

    @staticmethod
    def backward(ctx, g_loss, g_logits):
        gh, gw, h, weight = ctx.saved_tensors
        dh = gh * g_loss if g_loss is not None else torch.zeros_like(h)
        dw = gw * g_loss if g_loss is not None else torch.zeros_like(weight)
        if g_logits is not None:   # a caller's own loss on the returned logits
            dh = dh.addmm_(g_logits, weight)
            dw = dw.addmm_(g_logits.t(), h)
        return dh, dw, None, None


class Block(nn.Module):
    """Pre-norm block: x + MLA(norm(x)), then + FFN(norm(x)). Dense FFN for the first n_dense_layers.

    forward(x (B, T, D), freqs_cis (T, Dr/2, 2) rows for these positions) -> (B, T, D): the only inputs a
    pipeline stage needs to hand over (dualpipe.py runs Blocks as stages).
    """

    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.attn = MLA(args)
        self.ffn = MLP(args.dim, args.inter_dim) if layer_id < args.n_dense_layers else MoE(args)
        self.attn_norm = RMSNorm(args.dim)
        self.ffn_norm = RMSNorm(args.dim)
        # NOTE: V3 trains on 14.8T tokens and needs no dropout; a few MB of text, seen many times, does
        # (nanoGPT's regularizer, on the branch outputs before they join the residual). Off in eval().
        self.drop = nn.Dropout(args.dropout)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), freqs_cis, start_pos))
        return x + self.drop(self.ffn(self.ffn_norm(x)))


class MTP(nn.Module):
    """One Multi-Token Prediction module (§2.2, eqs. 21-23): predicts token i+k+1 from h_{k-1,i} and t_{i+k}.

    Follows the released checkpoint (layer 61, as vLLM/transformers read it): the projection input is
    [enorm(Emb(t_{i+k})) ; hnorm(h_{k-1,i})] -- embedding FIRST, the paper's eq. (21) writes the other
    order, which is only a permutation of eh_proj's columns -- and the module ends with its own RMSNorm
    before the shared output head. Embedding and head are the main model's (shared, not copied).
    """

    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.enorm = RMSNorm(args.dim)
        self.hnorm = RMSNorm(args.dim)
        self.eh_proj = nn.Linear(2 * args.dim, args.dim, bias=False)   # M_k ∈ R^{d×2d}
        self.block = Block(layer_id, args)
        self.norm = RMSNorm(args.dim)

    def forward(self, h_prev, emb_next, freqs_cis, start_pos: int = 0):
        """h_prev: (B, T, D) state of depth k-1 (depth 1: the main model's final-normed h); emb_next: (B, T, D)
        = Emb(t_{i+k}). Returns h^k = TRM_k(h'^k) (B, T, D), the block's output, NOT normed: eq. (22)'s h^k is
        what depth k+1 receives (its own hnorm is eq. (21)'s RMSNorm), and self.norm belongs to the head side
        (eq. 23; the checkpoint's shared_head.norm) -- apply it with head_input() only where logits are made."""
        h = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))  # eq. (21): (B, T, D)
        # the residual stream in the main blocks' dtype, the embedding's (under autocast eh_proj returns bf16)
        return self.block(h.to(emb_next.dtype), freqs_cis, start_pos)                   # eq. (22): (B, T, D)

    def head_input(self, h_k: torch.Tensor) -> torch.Tensor:
        return self.norm(h_k)                                                           # eq. (23): Head(RMSNorm(h^k))


class Transformer(nn.Module):
    fused_head = True   # head_loss's CPU fast path (False: the reference, for benchmarks: bench/ab_step.py)

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim)
        self.head = nn.Linear(args.dim, args.vocab_size, bias=False)  # not tied to embed (V3 unties them)
        # MTP blocks are numbered after the main layers (layer 61 in V3), so they are MoE blocks
        self.mtp = nn.ModuleList(MTP(args.n_layers + k, args) for k in range(args.n_mtp_depth))
        self.register_buffer("freqs_cis", precompute_freqs_cis(args), persistent=False)  # (max_seq_len, Dr/2, 2)
        if self.embed.weight.device.type != "meta":   # meta tensors hold no values (and normal_ on meta is slow)
            self.apply(self._init_weights)

    def _init_weights(self, module):
        # §4.2: every learnable matrix drawn from N(0, 0.006); norms start at 1, router bias at 0
        if isinstance(module, (nn.Linear, nn.Embedding, Gate)):
            nn.init.normal_(module.weight, mean=0.0, std=self.args.init_std)

    # --- forward ---------------------------------------------------------------

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, start_pos: int = 0) -> "Output":
        """tokens (B, T) int64 -> Output(logits (B, T, V) fp32 for every position, losses).

        losses is None without targets. With targets (B, T) (targets[:, t] = tokens[:, t+1], -1 = ignore) it is
        a dict: 'ce' main next-token loss, 'mtp' = λ/D Σ_k CE_k (eq. 25), 'mtp_k' the per-depth CE_k, 'balance'
        the sequence-wise balance losses summed over MoE layers, and 'loss' their sum (what backward uses).
        The final-normed hidden states (the input of MTP depth 1) come from `trunk`, the logits of any hidden
        states from `logits`: sample.py's speculative decoding calls those two instead.
        """
        T = tokens.size(1)
        h = self.trunk(tokens, start_pos)                       # (B, T, D)
        if targets is None:
            return Output(self.logits(h), None)                 # (B, T, V)

        assert targets.shape == h.shape[:2], f"targets {tuple(targets.shape)} != tokens {tuple(h.shape[:2])}"
        logits, ce = self.head_loss(h, targets)                 # (B, T, V), scalar
        # MTP (eq. 21-25): depth k at position i sees t_{i+k} and predicts t_{i+k+1} = targets[i+k]. The last k
        # positions have no t_{i+k}: they read a wrapped-around token and their target is ignored (-1); causal
        # attention keeps them from reaching earlier positions, so the loss is that of the T-k valid positions.
        # Every depth thus keeps the main blocks' (B, T) shape and a compiled MoE Block serves it unchanged.
        # NOTE: those k positions still route through the MTP block's experts (in its load and balance loss).
        mtp_k, h_k = [], h
        for k in range(1, len(self.mtp) + 1):
            if T - k <= 0:
                break
            _, h_k = self.mtp_forward(k, h_k, tokens.roll(-k, dims=1), start_pos, with_logits=False)  # (B, T, D)
            valid = torch.arange(T, device=targets.device) < T - k                        # (T,)
            mtp_k.append(self.head_loss(self.mtp[k - 1].head_input(h_k), targets.roll(-k, dims=1).where(valid, -1),
                                        keep_logits=False)[1])
        mtp = self.args.mtp_lambda / len(self.mtp) * sum(mtp_k) if mtp_k else ce.new_zeros(())
        moes = [m for m in self.moe_layers() if m.balance_loss is not None]
        balance = sum(m.balance_loss for m in moes) if moes else ce.new_zeros(())
        for m in moes:
            m.balance_loss = None   # consumed: never let a stale graph leak into the next step
        return Output(logits, dict(loss=ce + mtp + balance, ce=ce, mtp=mtp, mtp_k=mtp_k, balance=balance))

    def trunk(self, x: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """tokens (B, T) int64 -> final-normed hidden states (B, T, D): embedding, every Block, final norm.

        A pipeline stage (`pipeline_stage`) is a slice of this model and runs the same code: without the
        embedding (not the first stage) x is the previous stage's (B, T, D) output; without the final norm (not
        the last stage) the last Block's output is returned unnormed.
        """
        if self.embed is not None:
            assert x.dtype == torch.long, f"tokens must be int64, got {x.dtype}"
            x = self.embed(x)                                   # (B, T, D)
        T = x.size(1)
        assert isinstance(start_pos, torch.Tensor) or start_pos + T <= self.args.max_seq_len, \
            f"sequence of {start_pos + T} positions exceeds max_seq_len={self.args.max_seq_len}"   # (no sync for a tensor)
        freqs = self.rope_rows(start_pos, T)                   # (T, Dr/2, 2)
        for layer in self.layers:
            x = layer(x, freqs, start_pos)                     # (B, T, D)
        return self.norm(x) if self.norm is not None else x

    def rope_rows(self, start_pos, T: int) -> torch.Tensor:
        """RoPE rows (T, Dr/2, 2) of positions start_pos..start_pos+T-1; start_pos an int, or a (1,) device
        tensor for static-shape decoding (MLA.write_cache_static)."""
        if isinstance(start_pos, torch.Tensor):
            return self.freqs_cis.index_select(0, start_pos + torch.arange(T, device=start_pos.device))
        return self.freqs_cis[start_pos:start_pos + T]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """final-normed hidden states (B, T, D) -> logits (B, T, V) in (at least) fp32, through the shared head."""
        return at_least_fp32(self.head(h))

    def head_loss(self, h: torch.Tensor, targets: torch.Tensor, keep_logits: bool = True):
        """final-normed hidden states (B, T, D) and targets (B, T) -> (logits (B, T, V) or None, mean CE): the
        reference is `logits` then `cross_entropy`; eager CPU fp32/fp64 (no autocast, a plain nn.Linear head) takes
        HeadCrossEntropy, the same numbers chunk by chunk (measured: README "Small preset"), unless the head has hooks."""
        # a head with hooks runs as the module: dualpipe.py's zero-bubble split defers its dW through them
        fused = self.fused_head and h.device.type == "cpu" and not torch.compiler.is_compiling() \
            and type(self.head) is nn.Linear and not (self.head._forward_hooks or self.head._forward_pre_hooks) \
            and not torch.is_autocast_enabled("cpu") and h.dtype == self.head.weight.dtype in (torch.float32, torch.float64)
        if not fused:
            logits = self.logits(h)
            return (logits if keep_logits else None), cross_entropy(logits, targets)
        loss, logits = HeadCrossEntropy.apply(h.flatten(0, 1), self.head.weight, targets.flatten(), keep_logits)
        return (logits.view(*h.shape[:2], -1) if keep_logits else None), loss

    def mtp_forward(self, k: int, h_prev: torch.Tensor, next_tokens: torch.Tensor, start_pos: int = 0,
                    with_logits: bool = True):
        """MTP depth k (1-based): h_prev (B, T, D) from depth k-1 at positions start_pos.., next_tokens (B, T) the
        tokens one step further. Returns its logits (B, T, V) (None if not with_logits: training makes them with
        its loss, head_loss) and its states h_k (B, T, D), the input of depth k+1. Training (forward) and
        speculative decoding (sample.py) both call it."""
        freqs = self.rope_rows(start_pos, next_tokens.size(1))
        module = self.mtp[k - 1]
        h_k = module(h_prev, self.embed(next_tokens), freqs, start_pos)   # eqs. (21)-(22), chained un-normed
        return (self.logits(module.head_input(h_k)) if with_logits else None), h_k   # eq. (23): own norm, shared head

    def pipeline_stage(self, s: int, pp: int) -> "Transformer":
        """Stage s of a pp-stage pipeline (dualpipe.py): a Transformer holding THIS model's own modules (no copy)
        for its share of the Blocks, plus the embedding on stage 0 and the final norm and head on the last.
        Its `trunk` runs the stage; the last stage's forward(x, targets) gives the loss. No MTP modules.
        NOTE: only the last stage collects balance losses (its own MoE layers): run pipelines with aux_alpha=0."""
        n = len(self.layers)
        stage = Transformer.__new__(Transformer)
        nn.Module.__init__(stage)
        stage.args = self.args
        stage.embed = self.embed if s == 0 else None
        stage.layers = nn.ModuleList(self.layers[s * n // pp:(s + 1) * n // pp])
        stage.norm, stage.head = (self.norm, self.head) if s == pp - 1 else (None, None)
        stage.mtp = nn.ModuleList()
        stage.register_buffer("freqs_cis", self.freqs_cis, persistent=False)   # (max_seq_len, Dr/2, 2)
        return stage

    # --- generation cache: the model owns it; callers set it up, roll it back, clear it ------------------

    def setup_cache(self, batch_size: int, max_len: int | None = None):
        """Allocate the MLA cache in every block (main and MTP): only c_kv (Ckv) and k_R (Dr) per token, side by
        side in one (B, S, Ckv+Dr) tensor (MLA.latent_cache), whose rows are absorbed attention's keys."""
        max_len = max_len or self.args.max_seq_len
        p = self.embed.weight
        for attn in self.attn_modules():
            attn.latent_cache = torch.zeros(batch_size, max_len, attn.kv_lora_rank + attn.dr, dtype=p.dtype,
                                            device=p.device)

    def compile_blocks(self, **kwargs):
        """Regional compilation: torch.compile each Block (main and MTP) in place rather than the whole model.
        Blocks of one kind share one compiled graph (their parameters are inputs of the graph, not constants),
        so a 12-layer model compiles about as fast as one dense and one MoE block; the embedding, the head and
        the losses run eagerly between them."""
        for block in [*self.layers, *(m.block for m in self.mtp)]:
            block.compile(**kwargs)

    def warm_up_blocks(self, batch_size: int, seq_len: int, autocast=None):
        """Run every Block (forward and backward) once on random activations of a training step's shape, under the
        step's autocast: after compile_blocks, this compiles the graphs the first step would (train.py does it
        while the data is prepared). It leaves no trace: the RNG states (dropout), the routers' token counts and
        balance losses, and the gradients are put back as they were."""
        dev = self.embed.weight.device
        cuda = dev.type == "cuda"
        rng = torch.get_rng_state(), torch.cuda.get_rng_state(dev) if cuda else None
        loads, grads = [m.load.clone() for m in self.moe_layers()], {p: p.grad for p in self.parameters()}
        self.zero_grad(set_to_none=True)
        x = torch.randn(batch_size, seq_len, self.args.dim, device=dev, requires_grad=True)
        freqs = self.rope_rows(0, seq_len)
        with autocast or contextlib.nullcontext():   # each Block gets what the first step gives it: fp32, needs grad
            outs = [blk(x, freqs, 0) for blk in [*self.layers, *(m.block for m in self.mtp)]]
        sum(o.float().square().mean() for o in outs).backward()
        for p, g in grads.items():
            p.grad = g
        for m, load in zip(self.moe_layers(), loads):
            m.load.copy_(load)
            m.balance_loss = None
        torch.set_rng_state(rng[0])
        if cuda:
            torch.cuda.set_rng_state(rng[1], dev)
            torch.cuda.synchronize(dev)

    def rollback_cache(self, start: int, end: int, depth: int = 0):
        """Forget cache positions start..end-1 of the main model's blocks (depth 0) or of MTP depth k. The cache
        is positional, so moving the position back alone would do; zeroing the slots makes it identical to a
        cache that never saw them (sample.py's speculative decoding drops rejected drafts with it)."""
        attns = [b.attn for b in self.layers] if depth == 0 else [self.mtp[depth - 1].block.attn]
        for m in attns:
            m.latent_cache[:, start:end].zero_()

    def cache_report(self) -> dict:
        """Bytes per token of the latent cache that setup_cache allocates (measured on the real buffers): 'mla' for
        the main blocks, 'mtp' for the MTP blocks, against 'mha', the per-head keys (Dn+Dr) and values (Dv) that
        an ordinary multi-head attention cache would hold, all at the parameters' dtype."""
        a, nbytes = self.args, self.embed.weight.element_size()
        self.setup_cache(1, 1)
        per_layer = [m.kv_cache[0, 0].numel() + m.pe_cache[0, 0].numel() for m in self.attn_modules()]
        self.clear_cache()
        mha = a.n_layers * a.n_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim) * nbytes
        return dict(mla=sum(per_layer[:a.n_layers]) * nbytes, mtp=sum(per_layer[a.n_layers:]) * nbytes, mha=mha,
                    dtype_bytes=nbytes)

    def clear_cache(self):
        for attn in self.attn_modules():
            attn.latent_cache = None

    def attn_modules(self):
        return [m for m in self.modules() if isinstance(m, MLA)]

    def set_impl(self, attn: str | None = None, moe: str | None = None, decode: str | None = None):
        """Switch every MLA between 'naive'/'absorb' (and its decoding between 'latent'/'sdpa') and every MoE between
        'grouped'/'sorted'/'loop' (same maths)."""
        assert attn in (None, "naive", "absorb") and moe in (None, "grouped", "sorted", "loop")
        assert decode in (None, "latent", "sdpa")
        for m in self.modules():
            if isinstance(m, MLA) and attn:
                m.attn_impl = attn
            if isinstance(m, MLA) and decode:
                m.decode_impl = decode
            if isinstance(m, MoE) and moe:
                m.impl = moe

    # --- aux-loss-free balancing and load statistics ---------------------------

    def moe_layers(self):
        return [m for m in self.modules() if isinstance(m, MoE)]

    @torch.no_grad()
    def update_router_biases(self, all_reduce: Callable[[torch.Tensor], object] | None = None):
        """§2.1.2: call after every optimizer step. Each MoE layer moves its router bias by ±γ from the tokens it
        routed since the last call (MoE.load, all micro-steps of the step), then starts counting afresh.
        Data parallel: pass an in-place sum over the ranks (torch.distributed.all_reduce): the loads of all
        layers are summed in one collective, so every rank applies the same update from the global load.
        No host sync: a layer that routed nothing has load == mean == 0, and sign(0) leaves its bias alone."""
        moes = self.moe_layers()
        if not moes:
            return
        loads = torch.stack([m.load for m in moes])          # (n_moe_layers, E) token counts
        if all_reduce is not None:
            all_reduce(loads)
        for moe, load in zip(moes, loads):
            moe.gate.update_bias(load)
            moe.load.zero_()

    @torch.no_grad()
    def expert_load(self):
        """(n_moe_layers, E) tokens per expert in the last forward, and MaxVio per layer:
        max_load / mean_load − 1 (Wang et al. 2024; 0 = perfectly balanced)."""
        counts = [m.last_counts for m in self.moe_layers() if m.last_counts is not None]
        if not counts:   # an all-dense model (or no forward yet): no layer to report
            return torch.zeros(0, self.args.n_routed_experts), torch.zeros(0)
        counts = torch.stack(counts).float()                                    # (n_moe_layers, E)
        return counts, counts.max(dim=1).values / counts.mean(dim=1) - 1

    # --- accounting -----------------------------------------------------------

    def num_params(self) -> dict:
        """Total and activated parameter counts, main model and MTP separately (works on the meta device).
        Activated = what one token multiplies through: all but the (E − K) unchosen routed experts per MoE
        layer. The embedding and head are counted (the paper's 37B activated includes them)."""
        def count(mod):
            return sum(p.numel() for p in mod.parameters())
        mtp_params = count(self.mtp)
        total = count(self) - mtp_params
        a = self.args
        expert = 3 * a.dim * a.moe_inter_dim
        idle = (a.n_routed_experts - a.n_activated_experts) * expert
        n_moe_main = a.n_layers - a.n_dense_layers
        return dict(total=total, activated=total - idle * n_moe_main,
                    mtp=mtp_params, mtp_activated=mtp_params - idle * a.n_mtp_depth)

    def flops_per_token(self, seq_len: int, with_mtp: bool = True) -> float:
        """Training FLOPs per token (forward + backward = 3 × forward): 6 × activated matmul weights
        (embedding lookup excluded, head included) + attention scores and weighted sums. Causal attention
        touches on average (seq_len+1)/2 keys per query, which is what flash-style kernels compute."""
        a, n = self.args, self.num_params()
        matmul = n["activated"] - self.embed.weight.numel()
        layers = a.n_layers
        if with_mtp:
            matmul += n["mtp_activated"]
            layers += a.n_mtp_depth
        keys = (seq_len + 1) / 2
        attn = layers * 2 * a.n_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim) * keys
        return 6 * matmul + 3 * attn


# the real DeepSeek-V3 (671B) config, for accounting on the meta device and as a reference
V3_ARGS = dict(vocab_size=129280, dim=7168, inter_dim=18432, moe_inter_dim=2048, n_layers=61, n_dense_layers=3,
               n_heads=128, n_routed_experts=256, n_shared_experts=1, n_activated_experts=8, n_expert_groups=8,
               n_limited_groups=4, route_scale=2.5, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
               qk_rope_head_dim=64, v_head_dim=128, max_seq_len=4096 * 4, original_seq_len=4096,
               rope_factor=40, mscale=1.0, n_mtp_depth=1)
