"""
Benchmark of the FP8 framework on one Hopper GPU: per-GEMM TFLOP/s (Fprop/Dgrad/Wgrad) FP8 vs BF16, the
compiled quantization kernels' GB/s vs the measured copy bandwidth, Fp8Linear / Fp8SwiGLU forward+backward
time vs BF16, the activation memory each keeps for backward, and one optimizer step (fused AdamW vs AdamWBF16).
Prints markdown tables.

Run:  PYTHONUNBUFFERED=1 python bench/bench_fp8.py | tee bench_fp8.md       (H200: ~2 min)
      python bench/bench_fp8.py --probe     (layouts of blockwise torch._scaled_mm + hopper == emulated checks)
      python bench/bench_fp8.py --smoke     (convert_to_fp8 + torch.compile on a small model);  --only=gemm,quant,layers,optim
Timings are medians of CUDA-event-timed runs after warm-up, on random data (never zeros).
"""
import datetime
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fp8  # noqa: E402
import kernels as K  # noqa: E402

torch._dynamo.config.automatic_dynamic_shapes = False  # one static kernel per benchmarked shape
torch._dynamo.config.recompile_limit = 64
torch.backends.cuda.matmul.allow_tf32 = False


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def bench(fn, warmup=5, iters=30):
    """Median milliseconds of fn() over `iters` runs, each timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def table(header, rows):
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(" --- " for _ in header) + "|")
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")
    print()


def section(name, fn):
    t = time.time()
    try:
        fn()
    except Exception as e:  # keep going: one broken section must not hide the others' numbers
        print(f"**{name} failed**: {type(e).__name__}: {str(e)[:400]}\n")
    print(f"<!-- {name}: {time.time() - t:.1f} s -->\n", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------

def probe():
    """Which blockwise scale layouts torch._scaled_mm accepts here, and hopper == emulated for each GEMM."""
    dev = torch.device("cuda")
    print(f"hopper_gemms: {fp8.hopper_gemms('auto', dev)}\n")
    rows = []

    def plain_ld(qa, sa, qb, sb, out_dtype):  # the call as documented, without fp8.gemm_hopper's paddings
        return torch._scaled_mm(qa, qb.t(), scale_a=sa.t().contiguous().t(), scale_b=sb.contiguous().t(),
                                out_dtype=out_dtype)

    cases = [(M, 512, 384, "1x128 x 128x128 (raw torch._scaled_mm)", plain_ld) for M in (1, 8, 16, 32, 64)]
    for M, Kd, N in [(256, 512, 384), (200, 512, 384), (1, 512, 384), (256, 640, 384), (256, 2816, 1024)]:
        cases += [(M, Kd, N, "1x128 x 128x128 (fp8.gemm_hopper)", fp8.gemm_hopper),
                  (M, Kd, N, "1x128 x 1x128 (fp8.gemm_hopper)", fp8.gemm_hopper)]
    for M, Kd, N, combo, fn in cases:
        a, w = torch.randn(M, Kd, device=dev), torch.randn(N, Kd, device=dev) * 0.02
        qa, sa = K.quant_1x128_ref(a)
        qb, sb = K.quant_1x128_ref(w) if "x 1x128" in combo else K.quant_128x128_ref(w)
        try:
            hw = fn(qa, sa, qb, sb, torch.float32)
            em = fp8.gemm_emulated(qa, sa, qb, sb, torch.float32)
            res = f"ran, rel err vs emulated {rel_err(hw, em):.1e}"
        except Exception as e:
            res = f"{type(e).__name__}: {str(e)[:120]}"
        rows.append((f"{M}x{Kd}x{N}", combo, res))
    table(["M x K x N", "scales (a x b)", "result"], rows)
    # the whole layer, hopper vs emulated, eager and compiled
    torch.manual_seed(0)
    for name, make, D_in, D_out in [("Fp8Linear", lambda: fp8.Fp8Linear(1024, 768, device=dev), 1024, 768),
                                    ("Fp8SwiGLU", lambda: fp8.Fp8SwiGLU(*(nn.Linear(a, b, bias=False, device=dev)
                                     for a, b in ((1024, 640), (640, 1024), (1024, 640)))), 1024, 1024)]:
        m = make()
        x = torch.randn(4, 512, D_in, device=dev, requires_grad=True)
        dy = torch.randn(4, 512, D_out, device=dev)
        res = {}
        for tag, backend, compiled in [("emulated", "emulated", False), ("hopper", "hopper", False),
                                       ("hopper+compile", "hopper", True)]:
            for mod in m.modules():  # the back end is an attribute of each FP8 layer
                if hasattr(mod, "backend"):
                    mod.backend = backend
            f = torch.compile(m) if compiled else m
            x.grad = None
            m.zero_grad()
            with torch.autocast("cuda", torch.bfloat16):
                y = f(x)
            y.backward(dy)
            res[tag] = [y.float(), x.grad.float()] + [p.grad.float() for p in m.parameters()]
        for tag in ("hopper", "hopper+compile"):
            errs = ", ".join(f"{rel_err(a, b):.1e}" for a, b in zip(res[tag], res["emulated"]))
            print(f"{name} {tag} vs emulated (y, dx, dW...; bf16 outputs): {errs}")
    print()
    smoke()


def smoke():
    """Small-K Wgrad layouts, then the train.py path on a 2-layer model: bf16 vs fp8 eager vs fp8 compiled."""
    dev = torch.device("cuda")
    for nk in (1, 2, 3):  # 1x128 x 1x128 with few K blocks: an expert's Wgrad over <= 384 tokens
        a, b = torch.randn(512, 128 * nk, device=dev), torch.randn(384, 128 * nk, device=dev)
        (qa, sa), (qb, sb) = K.quant_1x128_ref(a), K.quant_1x128_ref(b)
        try:
            out = torch._scaled_mm(qa, qb.t(), scale_a=sa.t().contiguous().t(), scale_b=sb.t().contiguous(),
                                   out_dtype=torch.float32)
            res = f"ran, rel err vs emulated {rel_err(out, fp8.gemm_emulated(qa, sa, qb, sb, torch.float32)):.1e}"
        except Exception as e:
            res = f"{type(e).__name__}: {str(e)[:100]}"
        print(f"raw 1x128 x 1x128, K/128 = {nk}: {res}")
    print()
    # the train.py path: convert_to_fp8 after .to(device), then torch.compile of the whole model, bf16 autocast
    from model import ModelArgs, Transformer
    args = ModelArgs(vocab_size=8192, dim=1024, inter_dim=2816, moe_inter_dim=512, n_layers=2, n_dense_layers=1,
                     n_heads=16, n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, n_expert_groups=4,
                     n_limited_groups=2, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
                     v_head_dim=64, max_seq_len=512, original_seq_len=512, n_mtp_depth=1, init_std=0.006)
    tok = torch.randint(0, 8192, (4, 513), device=dev)
    losses = {}
    hopper = fp8.gemm_hopper

    def loud_hopper(qa, sa, qb, sb, out_dtype, out=None):  # name the operands if cuBLAS refuses them
        try:
            return hopper(qa, sa, qb, sb, out_dtype, out)
        except RuntimeError:
            print(f"gemm_hopper failed: qa {tuple(qa.shape)}, sa {tuple(sa.shape)} {sa.stride()}, qb {tuple(qb.shape)}"
                  f", sb {tuple(sb.shape)} {sb.stride()}, {out_dtype}")
            raise

    fp8.gemm_hopper = loud_hopper
    for tag, use_fp8, compiled in [("bf16", False, False), ("fp8", True, False), ("fp8+compile", True, True)]:
        torch.manual_seed(0)
        model = Transformer(args).to(dev)
        if use_fp8:
            fp8.convert_to_fp8(model)
        step = torch.compile(model) if compiled else model
        t = time.time()
        try:
            with torch.autocast("cuda", torch.bfloat16):
                _, L = step(tok[:, :-1], tok[:, 1:])
            L["loss"].backward()
        except Exception as e:
            print(f"model {tag} failed: {type(e).__name__}: {str(e)[:300]}")
            continue
        gn = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).norm().item()
        losses[tag] = (L["loss"].item(), gn)
        print(f"model {tag}: loss {L['loss'].item():.5f}, grad norm {gn:.5f}, first step {time.time() - t:.1f} s")
    fp8.gemm_hopper = hopper
    print()


# ----------------------------------------------------------------------------------------------------------

def copy_bandwidth():
    x = torch.randn(512 * 1024 * 1024 // 4 * 4, device="cuda")  # 2 GiB fp32
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x), iters=20)
    return 2 * x.numel() * 4 / ms / 1e6  # GB/s, read + write


def gemm_table(M, shapes):
    rows = []
    for Kd, N in shapes:
        flops = 2 * M * Kd * N
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(M, Kd, device="cuda", generator=g).bfloat16()
        w = (torch.randn(N, Kd, device="cuda", generator=g) * 0.02).bfloat16()
        dy = torch.randn(M, N, device="cuda", generator=g).bfloat16()
        wT, dyT, xT = w.t().contiguous(), dy.t().contiguous(), x.t().contiguous()
        # the BF16 GEMMs with the same operand layouts: a row-major, b given as (N', K') row-major and transposed
        bf = {"Fprop": lambda: x @ w.t(), "Dgrad": lambda: dy @ wT.t(), "Wgrad": lambda: dyT @ xT.t()}
        qx, sx = K.quant_1x128(x)
        qw, sw = K.quant_128x128(w)
        qdy, sdy = K.quant_1x128(dy)
        qwT, swT = qw.t().contiguous(), sw.t().contiguous()
        qdyT, sdyT = K.quant_128x1(dy)
        qxT, sxT = K.quant_128x1(x)
        f8 = {"Fprop": lambda: fp8.gemm_hopper(qx, sx, qw, sw, torch.bfloat16),
              "Dgrad": lambda: fp8.gemm_hopper(qdy, sdy, qwT, swT, torch.bfloat16),
              "Wgrad": lambda: fp8.gemm_hopper(qdyT, sdyT, qxT, sxT, torch.float32)}
        for name in ("Fprop", "Dgrad", "Wgrad"):
            tb, tf = bench(bf[name]), bench(f8[name])
            rows.append((f"{M}x{Kd}x{N}", name, f"{flops / tb / 1e9:.0f}", f"{flops / tf / 1e9:.0f}",
                         f"{tb / tf:.2f}x"))
        del x, w, dy, wT, dyT, xT, qx, qw, qdy, qwT, qdyT, qxT
    table(["M x K x N", "GEMM", "BF16 TFLOP/s", "FP8 TFLOP/s", "FP8 speed-up"], rows)
    print("Fprop/Dgrad: 1x128 x 128x128 scales, BF16 output; Wgrad: 1x128 x 1x128 (both along tokens), "
          "FP32 output (the weight gradient).\n")


def quant_table(copy_bw):
    M, Kd, N = 16384, 7168, 7168
    x = torch.randn(M, Kd, device="cuda").bfloat16()
    w = torch.randn(2 * N, Kd, device="cuda") * 0.02  # fp32 master weight, 14336 x 7168
    a, b = torch.randn(M, 2048, device="cuda").bfloat16(), torch.randn(M, 2048, device="cuda").bfloat16()
    qx, sx = K.quant_1x128(x)
    qe, se = K.quant_128x128(torch.randn(16 * 4096, Kd, device="cuda"))  # 16 experts' weights (4096, 7168), FP8
    qe, se = qe.view(16, 4096, Kd), se.view(16, 32, Kd // 128)
    MK = M * Kd
    cases = [  # name, compiled fn, eager fn, bytes moved (inputs read once + outputs written once)
        ("quant_1x128 (bf16 act)", lambda: K.quant_1x128(x), lambda: K.quant_1x128_ref(x), 2 * MK + MK + MK // 32),
        ("quant_128x1 (bf16 act, transposed out)", lambda: K.quant_128x1(x), lambda: K.quant_128x1_ref(x),
         2 * MK + MK + MK // 32),
        ("requant_128x1 (fp8 1x128 cache)", lambda: K.requant_128x1(qx, sx), lambda: K.requant_128x1_ref(qx, sx),
         2 * (MK + MK // 32)),
        ("quant_128x128 (fp32 weight 14336x7168)", lambda: K.quant_128x128(w), lambda: K.quant_128x128_ref(w),
         4 * w.numel() + w.numel()),
        ("swiglu_quant (2 bf16 in, F=2048)", lambda: K.swiglu_quant(a, b), lambda: K.swiglu_quant_ref(a, b),
         2 * 2 * a.numel() + a.numel() + a.numel() // 32),
        ("transpose_128x128 (fp8, 16 x 4096x7168)", lambda: K.transpose_128x128(qe, se),
         lambda: K.transpose_128x128_ref(qe, se), 2 * qe.numel()),
    ]
    rows = []
    for name, fc, fe, nbytes in cases:
        tc, te = bench(fc), bench(fe, warmup=2, iters=10)
        gbs = nbytes / tc / 1e6
        rows.append((name, f"{tc:.3f}", f"{gbs:.0f}", f"{gbs / copy_bw:.0%}", f"{te:.3f}"))
    table(["kernel (M=16384, K=7168)", "compiled ms", "GB/s", "% of copy BW", "eager ms"], rows)
    # experiments: other formulations of the same kernels, to see what limits inductor here
    cdt = dict(options={"coordinate_descent_tuning": True})
    variants = [
        ("1x128, row-major scales", torch.compile(q1x128_rowmajor), (x,), 2 * MK + MK + MK // 32),
        ("1x128, coordinate-descent tuned", torch.compile(K.quant_1x128_ref, **cdt), (x,), 2 * MK + MK + MK // 32),
        ("128x1, amax pass + transposed pointwise", torch.compile(q128x1_twopass), (x,), 2 * MK + MK + MK // 32),
        ("128x1, coordinate-descent tuned", torch.compile(K.quant_128x1_ref, **cdt), (x,), 2 * MK + MK + MK // 32),
        ("requant, dequant+transpose then 1x128", torch.compile(requant_viaT), (qx, sx), 2 * (MK + MK // 32)),
        ("requant, coordinate-descent tuned", torch.compile(K.requant_128x1_ref, **cdt), (qx, sx), 2 * (MK + MK // 32)),
        ("transpose, inductor's default tiling (kernels.py compiles it with 2-D tiles)",
         torch.compile(K.transpose_128x128_ref), (qe, se), 2 * qe.numel()),
    ]
    rows = []
    for name, fn, args, nbytes in variants:
        out, ref = fn(*args), {"1x128": K.quant_1x128_ref, "128x1": K.quant_128x1_ref, "requant": K.requant_128x1_ref,
                               "transpose": K.transpose_128x128_ref}[name.split(",")[0]](*args)
        same = rel_err(out[0].float(), ref[0].float()) < 1e-3 and rel_err(out[1], ref[1]) < 1e-6
        tc = bench(lambda: fn(*args))
        gbs = nbytes / tc / 1e6
        rows.append((name, f"{tc:.3f}", f"{gbs:.0f}", f"{gbs / copy_bw:.0%}", "yes" if same else "NO"))
    table(["variant", "compiled ms", "GB/s", "% of copy BW", "same result"], rows)


def q1x128_rowmajor(x):
    M, Kd = x.shape
    t = x.float().view(M, Kd // 128, 128)
    s = t.abs().amax(-1).clamp(min=K.AMAX_EPS) / 448.0
    return (t / s[..., None]).clamp(-448, 448).to(torch.float8_e4m3fn).view(M, Kd), s


def q128x1_twopass(x):
    M, N = x.shape
    s = x.float().view(M // 128, 128, N).abs().amax(1).clamp(min=K.AMAX_EPS) / 448.0  # (M/128, N)
    q = (x.t().float() / s.t().repeat_interleave(128, dim=1)).clamp(-448, 448).to(torch.float8_e4m3fn)  # (N, M)
    return q, s.t()


def requant_viaT(q, s):
    xT = K.dequant_1x128_ref(q, s).t()  # (K, M) view
    return K.quant_1x128_ref(xT)


def saved_bytes(fn, rows):
    """Bytes autograd saves for backward, counting tensors with `rows` leading rows (activations)."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn()
    return sum(t.numel() * t.element_size() for t in saved if t.dim() >= 1 and t.shape[0] == rows)


def layer_table():
    rows, mem = [], []
    M = 16384
    for Kd, N in [(7168, 7168), (7168, 2048), (2048, 7168)]:
        torch.manual_seed(0)
        lin = nn.Linear(Kd, N, bias=False, device="cuda")  # fp32 master weight
        f = fp8.Fp8Linear.from_linear(lin)
        lin_bf = nn.Linear(Kd, N, bias=False, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(M, Kd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)

        def step(mod, autocast=True):
            with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
                y = mod(x)
            y.backward(dy)

        t_amp, t_bf = bench(lambda: step(lin)), bench(lambda: step(lin_bf, False))
        t_f8 = bench(lambda: step(f))
        rows.append((f"Linear {M}x{Kd}x{N}", f"{t_amp:.2f}", f"{t_bf:.2f}", f"{t_f8:.2f}",
                     f"{t_amp / t_f8:.2f}x", f"{t_bf / t_f8:.2f}x"))
        with torch.autocast("cuda", torch.bfloat16):
            b16, b8 = saved_bytes(lambda: lin(x), M), saved_bytes(lambda: f(x), M)
        mem.append((f"Linear {M}x{Kd}x{N}", f"{b16 / 2**20:.0f}", f"{b8 / 2**20:.0f}", f"{1 - b8 / b16:.1%}"))
        del lin, f, lin_bf, x, dy
    # a DeepSeek-V3 expert / shared expert shape: D=7168, F=2048
    D, Fh = 7168, 2048
    torch.manual_seed(0)
    make = lambda dtype: [nn.Linear(a, b, bias=False, device="cuda", dtype=dtype)  # noqa: E731
                          for a, b in ((D, Fh), (Fh, D), (D, Fh))]

    class MLP(nn.Module):  # model.MLP
        def __init__(self, w1, w2, w3):
            super().__init__()
            self.w1, self.w2, self.w3 = w1, w2, w3

        def forward(self, x):
            return self.w2(F.silu(self.w1(x)) * self.w3(x))

    lins = make(torch.float32)
    mlp, m8, mlp_bf = MLP(*lins), fp8.Fp8SwiGLU(*lins), MLP(*make(torch.bfloat16))
    mlp_c, mlp_bf_c = torch.compile(mlp), torch.compile(mlp_bf)
    x = torch.randn(M, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(M, D, device="cuda", dtype=torch.bfloat16)

    def step(mod, autocast=True):
        with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            y = mod(x)
        y.backward(dy)

    t_amp, t_bf = bench(lambda: step(mlp_c)), bench(lambda: step(mlp_bf_c, False))
    t_f8 = bench(lambda: step(m8))
    rows.append((f"SwiGLU FFN M={M} D={D} F={Fh}", f"{t_amp:.2f}", f"{t_bf:.2f}", f"{t_f8:.2f}",
                 f"{t_amp / t_f8:.2f}x", f"{t_bf / t_f8:.2f}x"))
    with torch.autocast("cuda", torch.bfloat16):
        b16, b8 = saved_bytes(lambda: mlp(x), M), saved_bytes(lambda: m8(x), M)
    mem.append((f"SwiGLU FFN M={M} D={D} F={Fh}", f"{b16 / 2**20:.0f}", f"{b8 / 2**20:.0f}", f"{1 - b8 / b16:.1%}"))
    table(["forward+backward, ms", "BF16 autocast (fp32 master)", "BF16 weights", "FP8",
           "speed-up vs autocast", "vs BF16 weights"], rows)
    print("BF16 columns: nn.Linear (FFN: torch.compile'd) on bf16 input; FP8: Fp8Linear / Fp8SwiGLU with fp32 "
          "master weights under autocast, run eagerly (their own compiled kernels, cuBLAS GEMMs; inside a compiled "
          "Block they are traced and their quantizers fused with the neighbouring ops instead).\n")
    table(["activations saved for backward", "BF16 MiB", "FP8 MiB", "saved"], mem)


def optim_table(bw):
    """One optimizer step over v3-width-like parameters (~1.1B): torch's fused AdamW (FP32 moments, 28 bytes per
    parameter moved) vs fp8.AdamWBF16 (BF16 moments, 20 bytes). The step's time includes the host's launches."""
    shapes = [(2048, 7168)] * 48 + [(7168, 2048)] * 24 + [(24576, 1536), (32768, 512), (1536, 7168), (576, 7168),
                                                           (7168, 16384), (8192, 7168)] * 2 + [(7168,)] * 10
    g = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.randn(s, device="cuda", generator=g) * 0.02 for s in shapes]
    n = sum(p.numel() for p in params)
    rows = []
    for name, make, nbytes in (
            ("torch AdamW fused (fp32 moments)", lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True), 28),
            ("fp8.AdamWBF16 (BF16 moments)", lambda ps: fp8.AdamWBF16(ps, lr=1e-4), 20)):
        ps = [nn.Parameter(p.clone()) for p in params]
        for p in ps:
            p.grad = torch.randn(p.shape, device="cuda", generator=g) * 1e-3
        opt = make(ps)
        ms = bench(opt.step, warmup=3, iters=10)
        rows.append((name, f"{ms:.2f}", f"{n * nbytes / ms / 1e6:.0f}", f"{n * nbytes / ms / 1e6 / bw:.0%}"))
        del ps, opt
    table([f"optimizer step, {n / 1e9:.2f}B parameters", "ms", "GB/s", "of copy bandwidth"], rows)


def main():
    if not torch.cuda.is_available():
        sys.exit("bench_fp8.py needs a CUDA GPU (the CPU path is exercised by tests/test_fp8.py)")
    props = torch.cuda.get_device_properties(0)
    print(f"# FP8 benchmark\n\n{props.name}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"{datetime.date.today()}, command: `python bench/bench_fp8.py {' '.join(sys.argv[1:])}`\n")
    if "--probe" in sys.argv:
        section("probe", probe)
        return
    if "--smoke" in sys.argv:
        section("smoke", smoke)
        return
    only = next((a.split("=", 1)[1].split(",") for a in sys.argv if a.startswith("--only=")), None)
    bw = copy_bandwidth()
    print(f"device copy bandwidth (2 GiB, read + write): {bw:.0f} GB/s\n")
    if only is None or "gemm" in only:
        section("gemm", lambda: gemm_table(16384, [(7168, 7168), (2048, 7168), (7168, 2048)]))
    if only is None or "quant" in only:
        section("quant", lambda: quant_table(bw))
    if only is None or "layers" in only:
        section("layers", layer_table)
    if only is None or "optim" in only:
        section("optim", lambda: optim_table(bw))


if __name__ == "__main__":
    main()
