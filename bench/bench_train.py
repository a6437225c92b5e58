"""
Training-step benchmark: first-step (compile) time, ms/step, tokens/s, MFU, peak memory, host syncs per step,
and where the GPU time of one step goes, from torch.profiler, by component: attention, expert GEMMs, dense
GEMMs, router, dispatch/combine, optimizer (+ gradient clipping), other (element-wise, norms, losses, copies).

The step is train.py's: bf16 autocast, forward with the MTP and balance losses, backward, gradient clipping,
fused AdamW, the router-bias update. Batches are uniform random tokens (routing on real text is less even;
the time of every other part does not depend on the data).

How the profile is split: each kernel's time is charged to the operator that launched it (torch.profiler's
self device time per op). Library calls are named by their op: _grouped_mm -> expert GEMMs; mm/addmm/bmm ->
dense GEMMs, except the gate's (N, D) x (D, E) product, recognised by its shape, -> router; cuDNN / flash /
efficient attention -> attention; topk -> router; sort, index, gather, scatter, cumsum -> dispatch/combine;
the AdamW and clip_grad_norm kernels -> optimizer. Kernels that torch.compile generated are named after the
aten ops they fuse ('triton_red_fused_eq_gt_...'), and are charged by those names: comparisons with a sum
(the rank selection) or sigmoid/topk -> router; index/gather/scatter/sort -> dispatch/combine; the rest ->
other. A fused kernel that mixes two components goes to the first rule it matches; `--top=N` lists the N
most expensive kernels so that the split can be checked by eye.

Run: python bench/bench_train.py --preset=gpu [--compile=blocks|full|none] [--steps=20] [--profile=True]
     [--gate_impl=rank] [--batch_size=32] [any ModelArgs field=value]
"""
import ast, json, os, statistics, sys, time, warnings
from collections import defaultdict
from dataclasses import fields

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import ModelArgs, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_FIELDS = {f.name: f for f in fields(ModelArgs)}
DEFAULTS = dict(check=False, preset="gpu", compile="blocks", steps=20, warmup=3, profile=True, top=15, batch_size=0, seq_len=0,
                seed=0, json="", peak_tflops=989.0)


def preset(name: str) -> dict:
    """train.py's PRESETS[name] (ModelArgs fields and batch_size/seq_len), read from its source."""
    for path in ("config.py", "train.py"):
        p = os.path.join(ROOT, path)
        if not os.path.exists(p):
            continue
        for node in ast.parse(open(p).read()).body:
            if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "PRESETS":
                for key, call in zip(node.value.keys, node.value.values):
                    if ast.literal_eval(key) == name:
                        return {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    raise SystemExit(f"error: no preset {name!r}")


def classify(name: str, shapes, E: int) -> str:
    """name: 'launching op + kernel name'; shapes: the op's input shapes."""
    n = name.lower()
    if "grouped_mm" in n:
        return "expert GEMMs"
    if n.split()[0] in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"):
        dims = [s for s in (shapes or []) if s]
        return "router" if any(len(s) == 2 and E in s for s in dims) else "dense GEMMs"
    if any(k in n for k in ("cudnn", "flash", "efficient_attention", "scaled_dot_product", "fmha")):
        return "attention"
    if any(k in n for k in ("adam", "foreach", "clip", "optimizer")):
        return "optimizer"
    if "topk" in n or "sigmoid" in n or ("_eq_" in n and "_gt_" in n):
        return "router"
    if any(k in n for k in ("sort", "index", "gather", "scatter", "cumsum")):
        return "dispatch/combine"
    return "other"


def check(args: ModelArgs, dev: str, B: int = 4, T: int = 256) -> bool:
    """The fast paths against their references on this device, on fresh random inputs:
    rank vs topk selection (exact: both only compare), and the grouped MoE with one-permutation dispatch vs
    the per-expert loop, loss and every gradient by relative norm error."""
    from model import Gate
    ok = True
    gate = Gate(args).to(dev)
    for _ in range(3):
        biased = torch.rand(32768, args.n_routed_experts, device=dev) + 0.1 * torch.randn(args.n_routed_experts, device=dev)
        same = torch.equal(gate.select_topk(biased), gate.select_rank(biased))
        ok &= same
    print(f"check: rank selection == topk selection on 3 x (32768, {args.n_routed_experts}) random scores: {same}")
    small = ModelArgs(**{**args.__dict__, "dim": 256, "inter_dim": 512, "moe_inter_dim": 128, "n_layers": 3,
                         "vocab_size": 512, "init_std": 0.02})
    torch.manual_seed(0)
    model = Transformer(small).to(dev)
    x = torch.randint(0, 512, (B, T + 1), device=dev)
    grads = {}
    for moe, gate_impl in (("grouped", "rank"), ("loop", "topk")):
        model.set_impl(moe=moe)
        for m in model.moe_layers():
            m.gate.impl = gate_impl
        model.zero_grad()
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):   # CUDA's _grouped_mm is bf16
            _, losses = model(x[:, :-1], x[:, 1:])
        losses["loss"].backward()
        grads[moe] = (losses["loss"].item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (lf, gf), (lr, gr) = grads["grouped"], grads["loop"]
    worst = max(((gf[n] - gr[n]).norm() / gr[n].norm()).item() for n in gr)
    # fp32 on CPU: rounding only (~1e-6). bf16 on CUDA: both paths round their operands to bf16 (8 bits of
    # mantissa) but in different places (the loop casts each expert's slice), so ~1e-2 per gradient
    tol = 3e-2 if dev == "cuda" else 1e-4
    good = abs(lf - lr) / abs(lr) < tol / 10 and worst < tol
    ok &= good
    print(f"check: grouped+permute vs loop on {dev}: loss rel err {abs(lf - lr) / abs(lr):.1e}, "
          f"worst gradient rel err {worst:.1e} (tol {tol:g}): {good}")
    return ok


def main(argv):
    cfg, model_kw = dict(DEFAULTS), {}
    for a in argv:
        k, _, v = a.removeprefix("--").partition("=")
        try:
            v = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            pass
        if k in cfg:
            cfg[k] = v
        elif k in MODEL_FIELDS:
            model_kw[k] = v
        else:
            raise SystemExit(f"error: unknown option --{k}")
    p = preset(cfg["preset"])
    args = ModelArgs(**{**{k: v for k, v in p.items() if k in MODEL_FIELDS}, **model_kw})
    B, T = cfg["batch_size"] or p.get("batch_size", 16), cfg["seq_len"] or p.get("seq_len", 128)
    torch.manual_seed(cfg["seed"])
    dev = "cuda" if torch.cuda.is_available() else "cpu"   # CPU: a smoke test of this script, not a benchmark
    if cfg["check"]:
        return check(args, dev)
    torch.backends.cuda.matmul.allow_tf32 = True
    model = Transformer(args).to(dev)
    decay = [q for q in model.parameters() if q.dim() >= 2]
    no_decay = [q for q in model.parameters() if q.dim() < 2]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=0.1), dict(params=no_decay, weight_decay=0.0)],
                            lr=1e-4, betas=(0.9, 0.95), fused=dev == "cuda")
    t_setup = time.perf_counter()
    if cfg["compile"] == "blocks":
        model.compile_blocks()
        step_model = model
    elif cfg["compile"] == "full":
        step_model = torch.compile(model)
    else:
        step_model = model
    gen = torch.Generator(device=dev).manual_seed(cfg["seed"])

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def step():
        x = torch.randint(0, args.vocab_size, (B, T + 1), device=dev, generator=gen)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            _, losses = step_model(x[:, :-1], x[:, 1:])
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_router_biases()
        return losses["ce"].detach()

    first = []
    for i in range(cfg["warmup"]):
        t0 = time.perf_counter()
        step()
        sync()
        first.append(time.perf_counter() - t0)
    # host syncs inside one step: CUDA's sync debug mode warns on every synchronizing call
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if dev == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        step()
        if dev == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message).splitlines()[0] for w in caught   # (the mode's own "prototype feature" notice is no sync)
             if "synchroniz" in str(w.message).lower() and "prototype" not in str(w.message)]
    sync()
    times = []
    for _ in range(cfg["steps"]):
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1000
    n = model.num_params()
    fpt = model.flops_per_token(T)
    tok_s = B * T / (ms / 1000)
    mfu = fpt * tok_s / (cfg["peak_tflops"] * 1e12)
    res = dict(preset=cfg["preset"], compile=cfg["compile"], gate_impl=args.gate_impl, B=B, T=T,
               total_M=round(n["total"] / 1e6, 1), active_M=round(n["activated"] / 1e6, 1),
               first_step_s=round(first[0], 1), second_step_s=round(first[1], 2) if len(first) > 1 else None,
               ms_step=round(ms, 1), ms_min=round(min(times) * 1000, 1), tok_s=round(tok_s), mfu=round(100 * mfu, 1),
               peak_GiB=round(torch.cuda.max_memory_allocated() / 2**30, 1) if dev == "cuda" else 0, host_syncs=len(syncs),
               loss=round(loss.item(), 3), device=torch.cuda.get_device_name() if dev == "cuda" else "cpu", torch=torch.__version__)
    print(f"{cfg['preset']} ({res['total_M']}M total / {res['active_M']}M active), B={B} T={T}, compile={cfg['compile']}, "
          f"gate={args.gate_impl}: first step {first[0]:.1f} s; {ms:.1f} ms/step (min {min(times) * 1000:.1f}), "
          f"{tok_s:,.0f} tokens/s, MFU {100 * mfu:.1f}% ({fpt / 1e9:.2f} GFLOP/token vs {cfg['peak_tflops']:.0f} TFLOP/s), "
          f"peak {res['peak_GiB']} GiB, host syncs in a step: {len(syncs)}")
    for s in syncs[:5]:
        print("   sync:", s[:160])

    if cfg["profile"]:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            for _ in range(2):
                step()
            sync()
        from torch.autograd import DeviceType
        parts, kernels, steps = defaultdict(float), defaultdict(float), 2
        for ev in prof.events():   # each kernel is listed under the (innermost) op that launched it
            # ... and under the runtime call that launched it (cudaLaunchKernel...): count it once, by its op
            if ev.device_type != DeviceType.CPU or ev.name.startswith(("cuda", "cu")):
                continue
            for k in ev.kernels:
                part = classify(f"{ev.name} {k.name}", ev.input_shapes, args.n_routed_experts)
                t = k.duration / steps / 1000          # ms per step
                parts[part] += t
                kernels[(part, ev.name if ev.name.startswith("aten::") else k.name)] += t
        # every kernel, memcpy and memset on the GPU timeline (not the user-annotation spans that kineto also puts
        # there, e.g. '## Call CompiledFxGraph ##', which cover many kernels each)
        launched = sum(ev.device_time_total for ev in prof.events()
                       if ev.device_type == DeviceType.CUDA and not ev.is_user_annotation) / steps / 1000
        if launched > sum(parts.values()):   # kernels whose launching op the profiler did not record
            parts["other"] += launched - sum(parts.values())
        busy = max(sum(parts.values()), 1e-9)
        order = ["attention", "expert GEMMs", "dense GEMMs", "router", "dispatch/combine", "optimizer", "other"]
        print(f"\nGPU time of one step by component (torch.profiler, GPU busy {busy:.1f} ms of {ms:.1f} ms/step):")
        print(f"| component | ms/step | share |\n| --- | --- | --- |")
        for k in order:
            print(f"| {k} | {parts[k]:.1f} | {100 * parts[k] / busy:.0f}% |")
        print(f"| **total (GPU busy)** | **{busy:.1f}** | ms/step {ms:.1f}, {tok_s:,.0f} tokens/s, MFU {100 * mfu:.1f}% |")
        print(f"\ntop {cfg['top']} ops/kernels by GPU time per step:")
        for (part, key), t in sorted(kernels.items(), key=lambda kv: -kv[1])[:cfg["top"]]:
            print(f"  {t:7.2f} ms  {part:16s} {key[:110]}")
        res["breakdown_ms"] = {k: round(parts[k], 2) for k in order}
        res["gpu_busy_ms"] = round(busy, 1)
    if cfg["json"]:
        with open(cfg["json"], "a") as f:
            f.write(json.dumps(res) + "\n")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
