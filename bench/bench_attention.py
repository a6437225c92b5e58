"""
The decoding attention of MLA's absorb mode (§2.1.1), both ways: model.latent_attention (the scores as ONE matmul of
all T*H query rows against the cached [c_kv ; k_R] rows, an fp32 softmax, a matmul with the c_kv columns) against
SDPA over the cache expanded per head (what MLA ran before), for T query positions against a static cache of S
positions masked as sample.py's CUDA graphs mask it. This sets model.LATENT_MAX_T: the largest T at which
latent_attention is used (decoding feeds 1 token, or D+1 when verifying drafts; a prompt is longer).

Each call is captured in a CUDA graph and replayed, so launch overhead is out of the numbers (as in sample.py's
graphs); 'compiled' times torch.compile'd calls for the T that decoding uses (inductor fuses the mask, the scale
and the softmax into one kernel). Also prints how far the two outputs are apart (bf16).

Run: python bench/bench_attention.py [--S=1024] [--H=8] [--C=256] [--Dr=64] [--Ts=1,2,4,8,16,32,64,256,1024]
     [--compiled_Ts=1,2]   (the gpu preset's widths: 8 heads, Ckv 256, Dr 64)
"""
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from config import parse  # noqa: E402
from model import attention, latent_attention  # noqa: E402

DEFAULTS = dict(S=1024, H=8, C=256, Dr=64, Ts=(1, 2, 4, 8, 16, 32, 64, 256, 1024), compiled_Ts=(1, 2), calls=20,
                repeats=15)


def sdpa_decode(q, kv, C, mask, scale):
    """MLA's absorb path through SDPA: q (B, T, H, C+Dr), kv (B, S, C+Dr) -> (B, T, H, C)."""
    B, T, H, Dqk = q.shape
    S = kv.size(1)
    k, v = kv[:, None].expand(B, H, S, Dqk), kv[:, None, :, :C].expand(B, H, S, C)
    return attention(q.transpose(1, 2), k, v, mask, False, scale).transpose(1, 2)


def time_graph(fn, args, calls: int, repeats: int) -> float:
    """Median µs per call: `calls` calls captured in one CUDA graph, replayed `repeats` times (on a CPU, a dry run:
    the calls timed by the wall clock)."""
    if not torch.cuda.is_available():
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn(*args)
            times.append((time.perf_counter() - t0) * 1e6 / calls)
        return statistics.median(times)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn(*args)   # warm-up (and compilation) off the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn(*args)
    graph.replay()
    times = []
    for _ in range(repeats):
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        graph.replay()
        t1.record()
        torch.cuda.synchronize()
        times.append(t0.elapsed_time(t1) * 1e3 / calls)
    return statistics.median(times)


def main(argv):
    c = parse(argv, DEFAULTS)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    S, H, C, Dr = c["S"], c["H"], c["C"], c["Dr"]
    Ts, compiled_Ts = c["Ts"], c["compiled_Ts"]
    scale = (128 + Dr) ** -0.5
    name = torch.cuda.get_device_name() if dev == "cuda" else "CPU (a dry run: no graphs)"
    print(f"{name}, torch {torch.__version__}, bf16; B=1, H={H}, Ckv={C}, Dr={Dr}, static "
          f"cache of S={S} positions; median of {c['repeats']} replays of {c['calls']} calls in one CUDA graph")
    print("\n| T | SDPA µs | latent_attention µs | latent / SDPA | compiled SDPA µs | compiled latent µs | "
          "rel. diff (bf16) |\n|---|---|---|---|---|---|---|")
    g = torch.Generator(device=dev).manual_seed(0)
    for T in Ts:
        q = torch.randn(1, T, H, C + Dr, device=dev, generator=g).bfloat16()     # (B, T, H, Ckv+Dr)
        kv = torch.randn(1, S, C + Dr, device=dev, generator=g).bfloat16()       # (B, S, Ckv+Dr)
        pos = S - T + torch.arange(T, device=dev)                                 # the last T positions
        mask = torch.arange(S, device=dev) <= pos[:, None]                        # (T, S), as write_cache_static
        args = (q, kv, C, mask, scale)
        ref, out = sdpa_decode(*args).double(), latent_attention(*args).double()
        diff = ((out - ref).norm() / ref.norm()).item()
        row = [time_graph(sdpa_decode, args, c["calls"], c["repeats"]),
               time_graph(latent_attention, args, c["calls"], c["repeats"])]
        if T in compiled_Ts:
            row += [time_graph(torch.compile(f, dynamic=False), args, c["calls"], c["repeats"])
                    for f in (sdpa_decode, latent_attention)]
        cells = [f"{row[0]:.1f}", f"{row[1]:.1f}", f"{row[1] / row[0]:.2f}"] + \
            ([f"{row[2]:.1f}", f"{row[3]:.1f}"] if len(row) > 2 else ["", ""])
        print(f"| {T} | {' | '.join(cells)} | {diff:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
