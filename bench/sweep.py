"""
Several training runs at once on one GPU, then a table of their held-out curves: how the gpu preset was chosen.

A model of ~100M parameters leaves most of an H200 idle between its kernels, and the held-out loss of a run
does not depend on how fast it went, so N configurations trained side by side (N processes of train.py sharing
the GPU) answer "which one generalizes best" in about the time of the slowest one. Their ms/step are not
meaningful (they share the GPU): time the chosen one alone with bench/bench_train.py.

Each run is `python train.py --config NAME COMMON RUN --out_dir=OUT/runK --save=False --sample_tokens=0`,
its output in OUT/runK/log.txt and its evals in OUT/runK/metrics.jsonl. The data of every vocab_size the runs
use is prepared once before they start (parallel runs would each train the same tokenizer). A run still going
at the deadline (--seconds) is killed (SIGKILL: --save=False would still write a checkpoint on SIGTERM); its
evals so far are in the table, marked "killed".

Run: python bench/sweep.py --config=gpu --seconds=200 --out=sweep --common="--max_iters=500" \
        --run="--dropout=0.2" --run="--dropout=0.3 --n_layers=4"
"""
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
from config import MODEL_DEFAULTS, PRESETS, TRAIN_DEFAULTS, ConfigError, parse  # noqa: E402


def summary(out_dir: str) -> dict:
    """Best and final val bits/byte of one run's metrics.jsonl (and when they happened)."""
    path = os.path.join(out_dir, "metrics.jsonl")
    evals = [r for r in map(json.loads, open(path)) if "val_bpb" in r] if os.path.exists(path) else []
    if not evals:
        return dict(evals=0)
    best = min(evals, key=lambda r: r["val_bpb"])
    last = evals[-1]
    return dict(evals=len(evals), best_bpb=best["val_bpb"], best_step=best["step"], final_bpb=last["val_bpb"],
                final_step=last["step"], curve=[(r["step"], round(r["val_bpb"], 4)) for r in evals])


def fail(msg: str):
    print(f"sweep.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


def main(argv):
    opts, runs = dict(config="gpu", seconds=200.0, out="sweep", common=""), []
    for a in argv:
        k, _, v = a.removeprefix("--").partition("=")
        if k == "run":
            runs.append(v)
        elif k in opts:
            try:
                opts[k] = type(opts[k])(v)
            except ValueError:
                fail(f"--{k} must be {type(opts[k]).__name__}, got {v!r}")
        else:
            fail(f"unknown option {a!r} (see the docstring)")
    if not runs:
        fail("give at least one --run=\"--key=value ...\"")
    defaults = {**TRAIN_DEFAULTS, **MODEL_DEFAULTS}
    cfgs = []
    for r in runs:   # check every command line before starting anything
        try:
            cfgs.append(parse(["--config", opts["config"], *shlex.split(opts["common"]), *shlex.split(r)],
                              defaults, PRESETS))
        except ConfigError as e:
            fail(f"run {r!r}: {e}")
    for v in sorted({c["vocab_size"] for c in cfgs}):
        data.prepare(cfgs[0]["data"], v, cfgs[0]["data_cache"] or data.CACHE_DIR)
    os.makedirs(opts["out"], exist_ok=True)
    procs, t0 = [], time.time()
    for i, r in enumerate(runs):
        d = os.path.join(opts["out"], f"run{i}")
        os.makedirs(d, exist_ok=True)
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", opts["config"], *shlex.split(opts["common"]),
               *shlex.split(r), f"--out_dir={d}", "--save=False", "--sample_tokens=0", "--overwrite=True"]
        log = open(os.path.join(d, "log.txt"), "w")
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), log))
        print(f"run{i}: {r}", flush=True)
    status = {}
    while len(status) < len(procs):
        time.sleep(1)
        for i, (p, log) in enumerate(procs):
            if i in status:
                continue
            if p.poll() is not None:
                status[i] = f"exit {p.returncode}"
            elif time.time() - t0 > opts["seconds"]:
                p.kill()
                p.wait()
                status[i] = "killed"
            if i in status:
                log.close()
                print(f"run{i}: {status[i]} after {time.time() - t0:.0f} s", flush=True)
    rows = []
    for i, r in enumerate(runs):
        s = dict(run=f"run{i}", overrides=r, status=status[i], **summary(os.path.join(opts["out"], f"run{i}")))
        rows.append(s)
    with open(os.path.join(opts["out"], "summary.json"), "w") as f:
        json.dump(dict(config=opts["config"], common=opts["common"], seconds=opts["seconds"], runs=rows), f, indent=1)
    print(f"\n{opts['config']} + {opts['common']!r}, runs side by side on one device, {time.time() - t0:.0f} s")
    print("| run | overrides | best val bpb (step) | final val bpb (step) | final / best | status |")
    print("| --- | --- | --- | --- | --- | --- |")
    for s in rows:
        if s["evals"]:
            print(f"| {s['run']} | `{s['overrides']}` | {s['best_bpb']:.4f} ({s['best_step']}) | "
                  f"{s['final_bpb']:.4f} ({s['final_step']}) | {s['final_bpb'] / s['best_bpb']:.3f} | {s['status']} |")
        else:
            print(f"| {s['run']} | `{s['overrides']}` | - | - | - | {s['status']} (no eval) |")
    for s in rows:
        if s["evals"]:
            print(f"{s['run']} curve: " + " ".join(f"{st}:{b}" for st, b in s["curve"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
