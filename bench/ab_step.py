"""
A/B timing of CPU training steps in ONE process, alternating: step of A, step of B, step of A, ... so that a shared,
noisy machine (other jobs come and go) slows both sides alike. Prints the median ms/step of each and B/A.

A side is a comma-separated list of key=value settings on top of the preset:
  cpu_matmul=ieee|bf16|head-bf16   float32 matmul precision (config.setup_cpu), switched before each of its steps (a
                         train.py key: the preset's unless given)
  malloc=keep|default    glibc keeps freed memory (config.setup_cpu) or hands blocks > 32 MiB back (its default)
  threads=N              torch.set_num_threads before each of its steps
  head=fused|reference   Transformer.head_loss's CPU fast path (HeadCrossEntropy) or the reference
  norm=fused|reference   RMSNorm's CPU fast path (RMSNormCPU) or F.rms_norm, switched before each of its steps
  any train.py / ModelArgs key (e.g. head_impl=reference, batch_size=32): a model of its own; both sides start from
                         the same seed, so equal settings give the same weights
Run: python bench/ab_step.py [--config small] --a=head=reference --b=head=fused [--steps=20] [--warmup=3]
NOTE: malloc settings do not switch back cleanly inside one process (memory already kept stays kept): compare
them in separate processes.
"""
import ctypes
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data as D  # noqa: E402  (needs the path above)
from config import (MODEL_DEFAULTS, PRESETS, TRAIN_DEFAULTS, ConfigError, check_train, parse, setup_cpu,
                    to_model_args)
from model import RMSNorm, Transformer

SYSTEM = dict(malloc="keep", threads=2, head="fused", norm="fused")


def side(spec: str, rest: list[str]):
    """'k=v,k=v' -> (system settings, a model and its optimizer, the config)."""
    sysset, args = dict(SYSTEM), list(rest)
    for kv in filter(None, spec.split(",")):
        k, _, v = kv.partition("=")
        if k in sysset:
            sysset[k] = int(v) if k == "threads" else v
        else:
            args.append(f"--{k}={v}")
    if sysset["malloc"] not in ("keep", "default"):
        raise ConfigError(f"malloc must be 'keep' or 'default', got {sysset['malloc']!r}")
    cfg = parse(args, {**TRAIN_DEFAULTS, **MODEL_DEFAULTS}, PRESETS, default_preset="small")
    check_train(cfg)
    margs = to_model_args(cfg)
    meta = D.prepare(cfg["data"], cfg["vocab_size"])
    margs.vocab_size = meta["vocab_size"]
    torch.manual_seed(cfg["seed"])
    model = Transformer(margs)
    model.fused_head = sysset["head"] == "fused"
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=cfg["weight_decay"]),
                             dict(params=no_decay, weight_decay=0.0)], lr=cfg["lr"],
                            betas=(cfg["beta1"], cfg["beta2"]), fused=True)   # as train.py
    sysset["cpu_matmul"] = cfg["cpu_matmul"]
    return sysset, model, opt, cfg, D.load_tokens(meta["train_bin"])


def apply(sysset):
    setup_cpu(sysset["cpu_matmul"])   # also sets malloc to keep; undone below for 'default'
    if sysset["malloc"] == "default" and sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)   # glibc's initial M_MMAP_THRESHOLD and M_TRIM_THRESHOLD
        libc.mallopt(-1, 128 * 1024)
    torch.set_num_threads(sysset["threads"])
    RMSNorm.fused_cpu = sysset["norm"] == "fused"


def main(argv):
    opts, rest = dict(a="", b="", steps="20", warmup="3"), []
    for a in argv:
        k, _, v = a.removeprefix("--").partition("=")
        if k in opts:
            opts[k] = v
        else:
            rest.append(a)
    try:
        sides = [side(opts["a"], rest), side(opts["b"], rest)]
    except ValueError as e:
        print(f"ab_step.py: error: {e}", file=sys.stderr)
        return 2
    gen = torch.Generator().manual_seed(0)
    times = [[], []]

    def step(i):
        sysset, model, opt, cfg, train = sides[i]
        apply(sysset)
        x, y = D.get_batch(train, cfg["batch_size"], cfg["seq_len"], gen)
        t0 = time.perf_counter()
        _, losses = model(x, y)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_router_biases()
        return time.perf_counter() - t0, losses["loss"].item()

    for n in range(int(opts["warmup"]) + int(opts["steps"])):
        for i in (0, 1) if n % 2 == 0 else (1, 0):   # ABBA: neither side always runs first
            dt, loss = step(i)
            if n >= int(opts["warmup"]):
                times[i].append(dt)
    ma, mb = (1e3 * statistics.median(t) for t in times)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"A [{opts['a']}]: median {ma:.1f} ms/step (min {1e3 * min(times[0]):.1f})")
    print(f"B [{opts['b']}]: median {mb:.1f} ms/step (min {1e3 * min(times[1]):.1f})")
    print(f"B/A = {mb / ma:.3f}; {opts['steps']} steps each, alternating; load average {load:.2f}; "
          f"torch {torch.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
