"""
FP8 vs BF16 training, one command: trains a preset for a fixed number of steps in BF16 and in FP8 (§3.3) from
the same seed and the same batches, plus BF16 from a second seed (the noise yardstick), and prints a markdown
table: ms/step, tokens/s, MFU, peak memory, first-step time, and the FP8-vs-BF16 relative loss gap averaged over
the last steps next to the BF16-vs-BF16 gap between the two seeds; then the same for the held-out loss of the
trained models (mean CE on eval_iters validation batches, the same batches for every run, no dropout).

The loop is train.py's step (bf16 autocast, gradient clipping, the router-bias update after every step) without
evaluation (one at the end) or checkpoints; BF16 uses fused torch.optim.AdamW, FP8 uses convert_to_fp8 +
fp8.AdamWBF16 (BF16 moments), as `train.py --fp8=True` does. The second seed changes the initial weights only:
both BF16 runs see the same batches, so their gap is what a different initialization alone moves the loss by.

Run:  python bench/bench_fp8_train.py --config gpu --steps=300
      python bench/bench_fp8_train.py --config v3-width --steps=30 --runs=bf16,fp8 --profile=fp8
Options: --steps, --last (steps the loss gap averages over; default: the last 20%), --compile (default: the
preset's), --runs (any of bf16, bf16-seed2, fp8, in order; fp8-adamw (FP8 layers, torch's AdamW with FP32 moments)
and bf16-adamwbf16 (BF16 layers, AdamWBF16) tell the layers' effect from the optimizer's), --seeds=N (every run
once for each of the seeds --seed, --seed+1, ..., --seed+N-1, weights and batches drawn from it; prints each run's
signed gap to the BF16 run of its own seed, their mean and standard deviation, and BF16's own spread across the
seeds: on the gpu preset single pairs of 300-step runs differed by up to 15% either way, README), --profile=RUN
(one step of that run under torch.profiler: the ops with the most GPU time, then by host time), --out=FILE.json
(every run's per-step losses and times), and any train.py key (e.g. --batch_size=4, --eval_iters=40).
Timings: median step time over the steps after the first 3 (each step ends with a device sync), tokens/s from
that; MFU counts activated parameters + attention (model.flops_per_token) against the dense BF16 peak, for FP8
runs too, so the two MFU columns compare like the step times do.
"""
import datetime
import gc
import json
import os
import statistics
import sys
import time
from contextlib import nullcontext

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import fp8  # noqa: E402
from config import MODEL_DEFAULTS, PRESETS, TRAIN_DEFAULTS, die, lr_at, parse_or_exit, to_model_args  # noqa: E402
from model import Transformer  # noqa: E402

BENCH_DEFAULTS = dict(steps=300, last=0, runs="bf16,bf16-seed2,fp8", profile="", out="", seed2=4242, seeds=1)
RUNS = ("bf16", "bf16-seed2", "fp8", "fp8-adamw", "bf16-adamwbf16")
# the phases of a step whose host time is printed: a phase that takes the host longer than the GPU needs for the
# work it queues makes the GPU wait; "wait" is the host waiting for the GPU at the end (0 if the host is the bottleneck)
PHASES = ("forward", "backward", "clip", "optimizer", "other", "wait")
PEAK_BF16 = {"H100": 989e12, "H200": 989e12}  # dense BF16 FLOP/s per GPU, train.py's MFU denominator


def run(cfg: dict, tag: str, device: str, profile: bool) -> dict:
    """Train cfg for cfg['steps'] steps as `tag` (one of RUNS); returns the measurements."""
    use_fp8, bf16_moments = tag.startswith("fp8"), tag in ("fp8", "bf16-adamwbf16")
    torch.manual_seed(cfg["seed2"] if tag == "bf16-seed2" else cfg["seed"])
    args = to_model_args(cfg)
    meta = data.prepare(cfg["data"], cfg["vocab_size"])
    args.vocab_size = meta["vocab_size"]
    cuda = device.startswith("cuda")
    base = 0  # memory held before this run: its peak is counted from there (with --seeds, the gpu preset's peaks
    if cuda:  # grew by ~1.1 GiB per earlier run, H200, 2026-12-02)
        gc.collect()  # what earlier runs left in reference cycles
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with torch.device(device):  # initialized on the GPU: a 4.5B-parameter model takes minutes on the CPU
        model = Transformer(args)
    if use_fp8:
        fp8.convert_to_fp8(model, experts=cfg["fp8_experts"])
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [dict(params=decay, weight_decay=cfg["weight_decay"]), dict(params=no_decay, weight_decay=0.0)]
    betas = (cfg["beta1"], cfg["beta2"])
    opt = fp8.AdamWBF16(groups, lr=cfg["lr"], betas=betas) if bf16_moments else \
        torch.optim.AdamW(groups, lr=cfg["lr"], betas=betas, fused=cuda)
    if cfg["compile"]:
        model.compile_blocks()  # as train.py: each Block compiled, its FP8 layers traced into its graph (fp8.py)
    train_data, val_data = data.load_tokens(meta["train_bin"]), data.load_tokens(meta["val_bin"])
    gen = torch.Generator().manual_seed(cfg["seed"] + 1000)  # the same batches for every run
    B, T, A = cfg["batch_size"], cfg["seq_len"], cfg["grad_accum"]
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16)

    host = {k: [] for k in PHASES}  # the host's seconds in each phase of every step (see PHASES)

    def step(it):
        clock = [time.perf_counter()]

        def lap(phase):  # no sync: where the host spends its time, the GPU running behind it (or waiting)
            clock.append(time.perf_counter())
            host[phase].append(clock[-1] - clock[-2])
        for g in opt.param_groups:
            g["lr"] = lr_at(it, cfg)
        total = torch.zeros((), device=device)
        fwd = bwd = 0.0
        for _ in range(A):
            t0 = time.perf_counter()
            x, y = data.get_batch(train_data, B, T, gen, device)
            with autocast:
                _, losses = model(x, y)
            t1 = time.perf_counter()
            (losses["loss"] / A).backward()
            total += losses["ce"].detach() / A
            fwd, bwd = fwd + t1 - t0, bwd + time.perf_counter() - t1
        clock.append(clock[0] + fwd + bwd)
        host["forward"].append(fwd)
        host["backward"].append(bwd)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        lap("clip")
        opt.step()  # (with FP8 layers it also makes the FP8 weights: fp8.py's hook after every optimizer step)
        lap("optimizer")
        opt.zero_grad(set_to_none=True)
        model.update_router_biases()
        lap("other")
        total = total.item()  # waits for the GPU: the step is done
        lap("wait")
        return total

    losses, times, prof_table = [], [], None
    prof_it = min(5, cfg["steps"] - 1) if profile else -1
    for it in range(cfg["steps"]):
        prof = None
        if it == prof_it:
            from torch.profiler import ProfilerActivity, profile as torch_profile
            prof = torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
        t = time.perf_counter()
        with prof or nullcontext():
            loss = step(it)
        times.append(time.perf_counter() - t)
        losses.append(loss)
        if prof is not None:
            ka = prof.key_averages()
            prof_table = ka.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=40,
                                  max_name_column_width=70)
            if cuda:  # and where the host's time goes (a GPU that waits for the host shows here, not above)
                prof_table += "\nthe same step by host time (CPU total, nested ranges included):\n" + ka.table(
                    sort_by="cpu_time_total", row_limit=25, max_name_column_width=70)
        if it % 50 == 0 or it == cfg["steps"] - 1:
            print(f"  {tag} step {it + 1}/{cfg['steps']}: loss {loss:.4f}, {times[-1] * 1000:.0f} ms", flush=True)
    val = evaluate(model, val_data, cfg, device, autocast)
    n = model.num_params()
    keep = [i for i in range(len(times)) if i != prof_it]  # the profiled step ran slower
    keep = keep[3:] if len(keep) > 6 else keep[1:] or keep
    ms = 1000 * statistics.median(times[i] for i in keep)
    tok_s = B * T * A / (ms / 1000)
    peak = next((v for k, v in PEAK_BF16.items() if k in torch.cuda.get_device_name()), None) if cuda else None
    res = dict(tag=tag, ms=ms, tok_s=tok_s, mfu=model.flops_per_token(T) * tok_s / peak if peak else None,
               peak_gib=(torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else float("nan"), first_s=times[0],
               losses=losses, val=val, times=times, params=n, profile=prof_table,
               host_ms={k: 1000 * statistics.median(v[i] for i in keep) for k, v in host.items()})
    print(f"  {tag}: {ms:.0f} ms/step, {tok_s:,.0f} tokens/s, peak {res['peak_gib']:.1f} GiB, "
          f"first step {times[0]:.1f} s, val loss {val:.4f}", flush=True)
    del model, opt
    if cuda:
        torch.cuda.empty_cache()
    return res


@torch.no_grad()
def evaluate(model, val_data, cfg: dict, device: str, autocast) -> float:
    """Mean CE of the trained model on eval_iters held-out batches, drawn by one fixed generator: every run (every
    seed too) is scored on the same tokens, so the val gaps compare models alone. Eval mode: no dropout."""
    model.eval()
    gen = torch.Generator().manual_seed(7)
    ces = []
    for _ in range(cfg["eval_iters"]):
        x, y = data.get_batch(val_data, cfg["batch_size"], cfg["seq_len"], gen, device)
        with autocast:
            ces.append(model(x, y)[1]["ce"].float())
    model.train()
    return torch.stack(ces).mean().item()


def rel_gap(a: list[float], b: list[float], last: int, signed: bool = False) -> float:
    """(mean(a) − mean(b)) / mean(b) over the last `last` steps, its absolute value unless signed."""
    ma, mb = statistics.mean(a[-last:]), statistics.mean(b[-last:])
    return (ma - mb) / mb if signed else abs(ma - mb) / mb


def seed_summary(res: dict, last: int) -> list[str]:
    """Lines: for each run but BF16, its signed gap to the BF16 run of the same seed, per seed, mean and standard
    deviation; and BF16's own spread across the seeds (their standard deviation over their mean). Once for the
    training loss (mean of the last `last` steps), once for the held-out loss of the trained models."""
    seeds = sorted({s for _, s in res})
    lines = []
    scores = (("training loss", lambda r: statistics.mean(r["losses"][-last:])), ("val loss", lambda r: r["val"]))
    for what, score in scores:
        bf = [score(res["bf16", s]) for s in seeds]
        lines.append(f"{what}: BF16 across seeds {', '.join(map(str, seeds))}: {', '.join(f'{b:.4f}' for b in bf)}; "
                     f"spread (sd / mean) {100 * statistics.stdev(bf) / statistics.mean(bf):.2f}%")
        for tag in dict.fromkeys(t for t, _ in res):
            if tag != "bf16":
                g = [100 * (score(res[tag, s]) - score(res["bf16", s])) / score(res["bf16", s]) for s in seeds]
                lines.append(f"{what}: {tag} vs BF16 of the same seed: {', '.join(f'{x:+.2f}%' for x in g)}; "
                             f"mean {statistics.mean(g):+.2f}%, sd {statistics.stdev(g):.2f}% "
                             f"(standard error of the mean {statistics.stdev(g) / len(g) ** 0.5:.2f}%)")
    return lines


def main():
    cfg = parse_or_exit("bench_fp8_train.py", sys.argv[1:], {**TRAIN_DEFAULTS, **MODEL_DEFAULTS, **BENCH_DEFAULTS},
                        PRESETS, "gpu")
    device = cfg["device"] if cfg["device"] != "auto" else "cuda"
    if device.startswith("cuda") and not torch.cuda.is_available():
        die("bench_fp8_train.py", "needs a CUDA GPU (--device=cpu runs it slowly, as a smoke test)")
    tags = cfg["runs"].split(",")
    if not tags or any(t not in RUNS for t in tags):
        die("bench_fp8_train.py", f"--runs takes {', '.join(RUNS)}; got {cfg['runs']!r}")
    if cfg["steps"] < 1 or cfg["last"] < 0:
        die("bench_fp8_train.py", f"--steps must be >= 1 and --last >= 0, got {cfg['steps']} and {cfg['last']}")
    if cfg["seeds"] < 1:
        die("bench_fp8_train.py", f"--seeds must be >= 1, got {cfg['seeds']}")
    seeds = [cfg["seed"] + i for i in range(cfg["seeds"])]
    cfg["max_iters"] = cfg["steps"]  # the LR schedule (warm-up, constant, decay) spans the benchmark
    last = cfg["last"] or max(1, cfg["steps"] // 5)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    cmd = "python bench/bench_fp8_train.py " + " ".join(sys.argv[1:])
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    print(f"# {cmd}\n{name}, torch {torch.__version__}, {datetime.date.today()}; "
          f"preset {cfg['config']}, {cfg['steps']} steps of {cfg['batch_size'] * cfg['seq_len'] * cfg['grad_accum']:,} "
          f"tokens, compile={cfg['compile']}\n", flush=True)
    res = {(t, s): run(dict(cfg, seed=s), t, device, t in cfg["profile"].split(",")) for s in seeds for t in tags}
    n = next(iter(res.values()))["params"]
    print(f"\nparameters: {n['total'] / 1e9:.2f}B total, {n['activated'] / 1e9:.2f}B activated "
          f"(+{n['mtp'] / 1e9:.2f}B MTP, {n['mtp_activated'] / 1e9:.2f}B activated)\n")
    for r in res.values():
        if r["profile"]:
            print(f"one {r['tag']} step under torch.profiler (step 6):\n\n```\n{r['profile']}\n```\n")
    print("| run | seed | ms/step | tokens/s | MFU | peak memory | first step | vs BF16 speed | "
          f"loss, mean of last {last} | loss gap vs BF16 | val loss | val gap vs BF16 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (tag, seed), r in res.items():
        base = res.get(("bf16", seed))
        speed = f"{r['tok_s'] / base['tok_s']:.2f}x" if base else "-"
        gap = f"{100 * rel_gap(r['losses'], base['losses'], last):.3f}%" if base and r is not base else "-"
        vgap = f"{100 * abs(r['val'] - base['val']) / base['val']:.3f}%" if base and r is not base else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
        print(f"| {tag} | {seed} | {r['ms']:.0f} | {r['tok_s']:,.0f} | {mfu} | {r['peak_gib']:.1f} GiB | "
              f"{r['first_s']:.1f} s | {speed} | {statistics.mean(r['losses'][-last:]):.4f} | {gap} | "
              f"{r['val']:.4f} | {vgap} |")
    print("\nhost time per step phase (ms, medians; no sync inside a step: the GPU runs behind the host, and "
          "'wait' is what is left of the GPU's work when the host is done; other = zero_grad + router-bias update)\n")
    print("| run | seed | " + " | ".join(PHASES) + " | step |")
    print("| --- | --- | " + " | ".join("---" for _ in PHASES) + " | --- |")
    for (tag, seed), r in res.items():
        print(f"| {tag} | {seed} | " + " | ".join(f"{r['host_ms'][k]:.1f}" for k in PHASES) + f" | {r['ms']:.1f} |")
    one = {t: r for (t, s), r in res.items() if s == seeds[0]}
    if "bf16" in one and "fp8" in one and "bf16-seed2" in one:
        g8 = rel_gap(one["fp8"]["losses"], one["bf16"]["losses"], last)
        gs = rel_gap(one["bf16-seed2"]["losses"], one["bf16"]["losses"], last)
        print(f"\nFP8 vs BF16 loss gap {100 * g8:.3f}% (paper: < 0.25%); BF16 seed spread {100 * gs:.3f}%: "
              f"FP8 is {'within' if g8 <= max(gs, 0.0025) else 'OUTSIDE'} max(0.25%, seed spread)")
        v8, vs = (abs(one[t]["val"] - one["bf16"]["val"]) / one["bf16"]["val"] for t in ("fp8", "bf16-seed2"))
        print(f"val loss: FP8 vs BF16 gap {100 * v8:.3f}%; BF16 seed spread {100 * vs:.3f}%: "
              f"FP8 is {'within' if v8 <= max(vs, 0.0025) else 'OUTSIDE'} max(0.25%, seed spread)")
    if len(seeds) > 1 and "bf16" in tags:
        print("\n" + "\n".join(seed_summary(res, last)))
    if cfg["out"]:
        with open(cfg["out"], "w") as f:
            json.dump(dict(command=cmd, device=name, torch=torch.__version__,
                           date=str(datetime.date.today()), cfg=cfg,
                           runs={f"{t}/seed{sd}": {k: v for k, v in r.items() if k != "profile"}
                                 for (t, sd), r in res.items()}), f)


if __name__ == "__main__":
    main()
