"""
Decode speed of sample.py's paths for one sequence: no cache (recompute the prefix for every token), the MLA
latent cache in naive and absorb mode (§2.1.1), and MTP speculative decoding (§5.4.3), with the acceptance
rate per draft depth and the cache bytes per token against an MHA cache.

Model: a trained checkpoint (--out_dir=DIR), or a randomly initialised model with the ModelArgs of a preset of
config.py (--config small|gpu; --preset=NAME is the old spelling) and any ModelArgs field overridden (--dim=512 ...).
On random weights the acceptance rate means nothing (the MTP module has learnt nothing), so speculation is
slower there; the timings of the other paths do not depend on the weights. All paths decode greedily by default,
so they must produce the same tokens (checked; bf16 rounding can flip a near-tie between a 1-token and a
(D+1)-token forward).

On a GPU it also times the CUDA-graph paths: one graph per forward, one per whole step / speculative round as
main had them (each MoE forward stacks its experts' weights), with the experts' weights stacked once
(MoE.stack_experts) (--uncompiled=False skips these three), and with each step / round torch.compile'd as well
(sample.Steps(compile=True), the compile time printed; --sdpa_decode=True adds the same with SDPA instead of
model.latent_attention for the decoding attention); --profile=True adds each whole-step path's kernels per step and
per round and their GPU time (torch.profiler over the same steps run without graphs), and the slowest kernels to --log.

Run: python bench/bench_sample.py [--out_dir=out-small | --config small] [--device=cpu] [--new_tokens=64] [--threads=1]
     GPU: python bench/bench_sample.py --config gpu --device=cuda --prompt_len=128 --new_tokens=256 --no_cache=False
          [--eager_all=False: of the launch-bound eager paths only the baseline] [--compile=False] [--profile=True]
          [--log=FILE: the profile's top kernels] [--uncompiled=False] [--sdpa_decode=True]
"""
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sample  # noqa: E402  (needs the path above)
from config import MODEL_DEFAULTS, PRESETS, ConfigError, parse, to_model_args  # noqa: E402
from model import Transformer  # noqa: E402

DEFAULTS = dict(out_dir="", preset="", device="auto", dtype="auto", prompt="<|endoftext|>", prompt_len=32,
                new_tokens=64, repeats=5, temperature=0.0, draft_depth=0, seed=0, no_cache=True, threads=0,
                eager_all=True, compile=True, profile=False, log="", uncompiled=True, sdpa_decode=False)
# a preset holds training keys too (out_dir, lr, ...): the bench takes only its ModelArgs fields
MODEL_PRESETS = {name: {k: v for k, v in p.items() if k in MODEL_DEFAULTS} for name, p in PRESETS.items()}


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_paths(paths: dict, device: str, repeats: int) -> dict:
    """{label: fn} -> {label: (median wall s, median process CPU s, last result)}. One warm-up call each, then
    the paths take turns `repeats` times, so that load from other processes spreads over all of them alike."""
    out = {label: fn() for label, fn in paths.items()}
    wall, cpu = {k: [] for k in paths}, {k: [] for k in paths}
    for _ in range(repeats):
        for label, fn in paths.items():
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            out[label] = fn()
            sync(device)
            wall[label].append(time.perf_counter() - t0)
            cpu[label].append(time.process_time() - c0)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k]), out[k]) for k in paths}


def main(argv):
    c = parse(argv, {**DEFAULTS, **MODEL_DEFAULTS}, MODEL_PRESETS, default_preset="small")
    if c["preset"]:   # the old spelling of --config NAME
        c = parse([a for a in argv if not a.startswith("--preset=")] + ["--config", c["preset"]],
                  {**DEFAULTS, **MODEL_DEFAULTS}, MODEL_PRESETS)
    model_opts = [a for a in argv if a.removeprefix("--").partition("=")[0] in MODEL_DEFAULTS]
    device = ("cuda" if torch.cuda.is_available() else "cpu") if c["device"] == "auto" else c["device"]
    dtype = getattr(torch, c["dtype"] if c["dtype"] != "auto" else ("bfloat16" if device == "cuda" else "float32"))
    if c["threads"]:   # one sequence of a small model is a chain of tiny ops: on a busy CPU, 1 thread can be faster
        torch.set_num_threads(c["threads"])
    torch.manual_seed(c["seed"])
    if c["out_dir"]:
        model, enc, ckpt = sample.load_checkpoint(c["out_dir"], device, dtype)
        prompt = enc.encode(c["prompt"], allowed_special={"<|endoftext|>"})
        what = f"checkpoint {c['out_dir']} (step {ckpt.get('step', '?')})"
    else:
        try:
            model = Transformer(to_model_args(c))
        except ValueError as e:   # a violated ModelArgs invariant
            raise ConfigError(str(e)) from None
        for p in model.parameters():   # parameters only; RoPE table and router bias stay fp32 (as sample.py)
            p.data = p.data.to(device=device, dtype=dtype)
        model.to(device).eval()
        prompt = torch.randint(0, model.args.vocab_size, (c["prompt_len"],)).tolist()
        what = f"random init, preset {c['config']}" + (f" + {' '.join(model_opts)}" if model_opts else "")
    a, n, cb = model.args, model.num_params(), model.cache_report()
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{what}: {n['total'] / 1e6:.1f}M params ({n['activated'] / 1e6:.1f}M activated), {a.n_layers} layers, "
          f"dim {a.dim}, {len(model.mtp)} MTP; {name}, {str(dtype).removeprefix('torch.')}, torch {torch.__version__}")
    print(f"prompt {len(prompt)} tokens, {c['new_tokens']} new tokens, temperature {c['temperature']}, "
          f"median of {c['repeats']} runs after a warm-up, paths interleaved")
    print(f"cache bytes/token: MLA {cb['mla']:,} (n_layers x (Ckv+Dr) = {a.n_layers} x ({a.kv_lora_rank}+"
          f"{a.qk_rope_head_dim})) vs MHA {cb['mha']:,} (n_layers x H x (Dn+Dr+Dv)): {cb['mha'] / cb['mla']:.1f}x "
          f"smaller; the MTP blocks add {cb['mtp']:,} when speculating")

    sampling = dict(temperature=c["temperature"], top_k=0, top_p=1.0)
    gen = torch.Generator(device=device)

    # captured on their first use (the warm-up run), replayed after: one graph per forward and a read-back per
    # token, or one graph per whole step / speculative round and a read-back per sample.READ_EVERY of them. Each
    # Steps keeps its own cache (and graphs) while the paths take turns; the later paths run on a copy whose
    # experts' weights are stacked once (MoE.stack_experts; the same values), compiled or not
    per_forward, graphed = sample.Steps(model, "graphs", whole=False), sample.Steps(model, "graphs")
    gpu, uncompiled = graphed.mode == "graphs", c["uncompiled"] or not c["compile"]
    variants = {"": graphed} if uncompiled else {}   # label -> Steps of whole steps / rounds

    def stacked(decode="latent"):
        m = copy.deepcopy(model)
        m.set_impl(decode=decode)
        for moe in m.moe_layers():
            moe.stack_experts()
        return m

    if gpu:
        fast = stacked()
        if uncompiled:
            variants[", experts stacked"] = sample.Steps(fast, "graphs")
        if c["compile"]:
            variants[", compiled"] = sample.Steps(fast, "graphs", compile=True)
        if c["compile"] and c["sdpa_decode"]:   # the decoding attention as before model.latent_attention
            variants[", compiled, SDPA decoding"] = sample.Steps(stacked("sdpa"), "graphs", compile=True)

    def run(spec=False, cache=True, impl="absorb", steps=None):
        m = steps.model if steps else model
        m.set_impl(attn=impl)
        gen.manual_seed(c["seed"])
        if spec:
            return sample.generate_speculative(m, prompt, c["new_tokens"], gen, **sampling, depth=c["draft_depth"],
                                               steps=steps)
        return sample.generate(m, prompt, c["new_tokens"], gen, **sampling, use_cache=cache, steps=steps)

    paths = {}
    if c["no_cache"]:
        paths["no cache (recompute prefix)"] = lambda: run(cache=False, impl="naive")
    if c["eager_all"]:   # --eager_all=False: of the eager paths only the baseline (GPU runs: time the graphs)
        paths["latent cache, naive"] = lambda: run(impl="naive")
    paths["latent cache, absorb"] = lambda: run()
    if c["eager_all"] or not gpu:
        paths["speculative (MTP draft), absorb"] = lambda: run(spec=True)
    if gpu and uncompiled:
        paths["CUDA graph per forward, absorb"] = lambda: run(steps=per_forward)
        paths["CUDA graph per forward, speculative"] = lambda: run(spec=True, steps=per_forward)
    if gpu:
        for name, steps in variants.items():
            paths[f"CUDA graph per step{name}, absorb"] = lambda s=steps: run(steps=s)
            paths[f"CUDA graph per round{name}, speculative"] = lambda s=steps: run(spec=True, steps=s)
            if "compiled" in name:   # the first (warm-up) run compiles and captures: timed here, once
                for label in (f"CUDA graph per step{name}, absorb", f"CUDA graph per round{name}, speculative"):
                    sync(device)
                    t0 = time.perf_counter()
                    paths[label]()
                    sync(device)
                    print(f"{label}: first run (compile + capture) {time.perf_counter() - t0:.1f} s")
    results = time_paths(paths, device, c["repeats"])
    N = c["new_tokens"]
    base_wall, base_cpu, (base_tokens, _) = results["latent cache, absorb"]
    cpu_col = device == "cpu"   # on a shared CPU the process's own CPU time is steadier than the wall clock
    print(f"\n| decode path | tokens/s | vs cache+absorb |{' tokens/CPU-s |' if cpu_col else ''} "
          f"main forwards/token | same tokens |\n|---|---|---|{'---|' if cpu_col else ''}---|---|")
    for label, (wall, cpu, (tokens, st)) in results.items():
        diff = [i for i, (x, y) in enumerate(zip(tokens, base_tokens)) if x != y]
        same = "n/a (sampling)" if c["temperature"] else ("yes" if not diff else f"no (first diff at {diff[0]})")
        print(f"| {label} | {N / wall:.1f} | {base_wall / wall:.2f}x |{f' {N / cpu:.1f} |' if cpu_col else ''} "
              f"{st['forwards'] / len(tokens):.2f} | {same} |")
    for name in variants:   # a round's cost in plain steps, against tokens per round
        plain, spec = results.get(f"CUDA graph per step{name}, absorb"), results.get(f"CUDA graph per round{name}, speculative")
        if plain and spec:
            ms = [r[0] * 1e3 / r[2][1]["forwards"] for r in (plain, spec)]
            print(f"graphs{name or ' (main)'}: speculative {plain[0] / spec[0]:.2f}x plain; {ms[0]:.3f} ms per step, "
                  f"{ms[1]:.3f} ms per round ({ms[1] / ms[0]:.2f} steps), {N / spec[2][1]['forwards']:.2f} tokens per "
                  "round (prefill and read-backs included)")
    spec = next(k for k in results if "speculative" in k)   # (greedy paths agree until bf16 rounding flips a near-tie)
    st = results[spec][2][1]
    rates = ", ".join(f"depth {k}: {y}/{x} = {y / max(x, 1):.1%}" for k, (x, y) in enumerate(zip(st["tried"], st["accepted"]), 1))
    note = "" if c["out_dir"] else "  (random weights: meaningless, the MTP module has learnt nothing)"
    print(f"\nacceptance of drafts that reached verification: {rates}{note}")
    if gpu and c["profile"]:
        profile({name.strip(", ") or "main": steps for name, steps in variants.items()}, run, c["log"])
    return 0


def profile(variants: dict, run, log: str):
    """Each whole-step variant's plain steps and speculative rounds under torch.profiler, run WITHOUT graphs (the
    same kernels a replay launches, from the host): kernels and GPU-busy time per step / round; the kernels that
    take most of a round's time go to `log`."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile as torch_profile
    print("\n| whole-step variant | kernels per plain step | GPU µs per step | kernels per round | GPU µs per round |"
          "\n|---|---|---|---|---|")
    lines = []
    for name, steps in variants.items():
        row = []
        for spec in (False, True):
            steps.mode = "static"   # the step / round functions run eagerly (compiled code included), no replay
            run(spec=spec, steps=steps)   # warm
            torch.cuda.synchronize()
            with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                _, st = run(spec=spec, steps=steps)
                torch.cuda.synchronize()
            steps.mode = "graphs"
            kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
            n = st["forwards"]   # plain: one per token; speculative: one per round (plus the prefill, ignored)
            row += [f"{len(kernels) / n:.0f}", f"{sum(e.device_time_total for e in kernels) / n:.0f}"]
            by_name = {}
            for e in kernels:
                by_name[e.name] = by_name.get(e.name, 0.0) + e.device_time_total
            top = sorted(by_name.items(), key=lambda kv: -kv[1])[:15]
            lines.append(f"== {name}, {'round' if spec else 'step'}: {len(kernels)} kernels over {n} forwards")
            lines += [f"  {t / n:8.1f} us/forward  {k[:150]}" for k, t in top]
        print(f"| {name} | {' | '.join(row)} |")
    if log:
        with open(log, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (ConfigError, sample.SampleError) as e:
        print(f"bench_sample.py: error: {e}", file=sys.stderr)
        sys.exit(2)
