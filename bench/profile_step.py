"""
Where one CPU training step goes: torch.profiler over a preset's training steps, every op attributed to a part
of the model (router, dispatch/combine, attention, expert MLPs, MTP, optimizer, ...) in forward AND backward,
and the time between ops (Python, the dispatcher, the autograd engine) reported as its own row.

How ops are attributed. Forward hooks on chosen modules open a record_function label (`## attention`, `## moe`,
`## router`, ...); an op belongs to the part of its labels (inside `## mtp` everything is MTP; inside `## moe`
the innermost MoE label decides). A backward op is found through its autograd node's sequence number, which
equals that of the forward op that created it, so backward time lands in the same part as its forward.
"between ops" = a phase's wall time minus the time of its top-level ops: Python and framework overhead.
The profiler itself slows each op by a few microseconds, so the profiled step is longer than a plain one; the
script times the same steps without the profiler first and prints both.

Run: python bench/profile_step.py [--config small] [--threads=2] [--steps=5] [--warmup=5] [--top=15] [--detail=N]
     [any train.py/ModelArgs --key=value, e.g. --moe_impl=sorted --batch_size=32]
"""
import os
import statistics
import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data as D  # noqa: E402  (needs the path above)
from config import MODEL_DEFAULTS, PRESETS, TRAIN_DEFAULTS, check_train, parse, setup_cpu, to_model_args
from model import MoE, Transformer

OPTS = dict(threads=2, steps=5, warmup=5, top=15, detail=0)
PARTS = ["embedding", "attention (MLA)", "norms", "dense MLP", "router", "dispatch/combine", "expert MLPs",
         "head + loss", "MTP", "optimizer", "data", "other"]
EXPERT_OPS = {"aten::_grouped_mm", "aten::silu", "aten::mul", "aten::linear", "aten::mm", "aten::matmul",
              "aten::addmm", "aten::bmm"}


def label_modules(model: Transformer):
    """Forward hooks that wrap chosen modules (and two MoE methods) in record_function labels."""
    stack = []

    def enter(name):
        rf = record_function(name)
        rf.__enter__()
        stack.append(rf)

    def leave(*_):
        stack.pop().__exit__(None, None, None)

    def hook(mod, name):
        mod.register_forward_pre_hook(lambda *_: enter(name))
        mod.register_forward_hook(leave)

    hook(model.embed, "## embedding")
    # the head and its loss: Transformer.head_loss (a hook on model.head would send it down the unfused path)
    head_loss = model.head_loss

    def labelled_head_loss(*a, **kw):
        with record_function("## head + loss"):
            return head_loss(*a, **kw)
    model.head_loss = labelled_head_loss
    hook(model.norm, "## norms")
    # MTP: from the first module's forward to the end of Transformer.forward, so its head and loss count too
    mtp_open = []

    def open_mtp(*_):
        if not mtp_open:
            enter("## mtp")
            mtp_open.append(True)

    def close_mtp(*_):
        if mtp_open:
            leave()
            mtp_open.clear()
    for m in model.mtp:
        m.register_forward_pre_hook(open_mtp)
    model.register_forward_hook(close_mtp)
    for block in model.layers:
        hook(block.attn_norm, "## norms")
        hook(block.ffn_norm, "## norms")
        hook(block.attn, "## attention (MLA)")
        if isinstance(block.ffn, MoE):
            moe = block.ffn
            hook(moe, "## moe")
            hook(moe.gate, "## router")
            if moe.shared_experts is not None:
                hook(moe.shared_experts, "## expert MLPs")
            for method, name in (("sort_by_expert", "## dispatch/combine"), ("sequence_balance_loss", "## router"),
                                 ("routed_grouped", "## routed"), ("routed_sorted", "## routed"),
                                 ("routed_loop", "## routed")):
                def wrapped(*a, _f=getattr(moe, method), _n=name, **kw):
                    with record_function(_n):
                        return _f(*a, **kw)
                setattr(moe, method, wrapped)
        else:
            hook(block.ffn, "## dense MLP")


def is_top(ev) -> bool:
    """An op called from Python (its parent is one of our labels), not one that another op called."""
    return not ev.name.startswith("## ") and ev.cpu_parent is not None and ev.cpu_parent.name.startswith("## ")


def part_of(ev) -> str:
    """The part of the model a forward op belongs to, from the labels around it."""
    while not is_top(ev) and ev.cpu_parent is not None:
        ev = ev.cpu_parent
    labels, p = [], ev.cpu_parent
    while p is not None:
        if p.name.startswith("## "):
            labels.append(p.name[3:])
        p = p.cpu_parent
    if "mtp" in labels:
        return "MTP"
    if "moe" in labels:
        inner = next((l for l in labels if l in ("router", "dispatch/combine", "expert MLPs", "routed")), None)
        if inner == "routed":   # inside routed_*: the GEMMs and SwiGLU are the experts, the rest moves tokens
            return "expert MLPs" if ev.name in EXPERT_OPS else "dispatch/combine"
        return inner or ("dispatch/combine" if ev.name == "aten::add" else "router")
    outer = [l for l in labels if l in PARTS]
    return outer[-1] if outer else ("head + loss" if ev.name.startswith("aten::cross_entropy")
                                    or ev.name.startswith("aten::log_softmax") else "other")


def main(argv):
    opts = dict(OPTS)
    rest = []
    for a in argv:
        k, _, v = a.removeprefix("--").partition("=")
        if k in opts:
            opts[k] = int(v)
        else:
            rest.append(a)
    try:
        cfg = parse(rest, {**TRAIN_DEFAULTS, **MODEL_DEFAULTS}, PRESETS, default_preset="small")
        check_train(cfg)
        args = to_model_args(cfg)
    except ValueError as e:   # ConfigError, or a violated model invariant
        print(f"profile_step.py: error: {e}", file=sys.stderr)
        return 2
    setup_cpu(cfg["cpu_matmul"])   # as train.py on a CPU: malloc keeps freed memory, --cpu_matmul
    torch.set_num_threads(opts["threads"])
    torch.manual_seed(cfg["seed"])
    meta = D.prepare(cfg["data"], cfg["vocab_size"])
    args.vocab_size = meta["vocab_size"]
    model = Transformer(args)
    B, T = cfg["batch_size"], cfg["seq_len"]
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=cfg["weight_decay"]),
                             dict(params=no_decay, weight_decay=0.0)], lr=cfg["lr"],
                            betas=(cfg["beta1"], cfg["beta2"]), fused=True)   # as train.py
    dtype = "bfloat16" if cfg["dtype"] == "bfloat16" else "float32"   # as train.py on a CPU (auto: fp32)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    train = D.load_tokens(meta["train_bin"])
    gen = torch.Generator().manual_seed(cfg["seed"])

    def step():
        with record_function("## phase data"):
            x, y = D.get_batch(train, B, T, gen)
        with record_function("## phase forward"), autocast:
            _, losses = model(x, y)
        with record_function("## phase backward"):
            losses["loss"].backward()
        with record_function("## phase optimizer"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.update_router_biases()

    for _ in range(opts["warmup"]):
        step()
    plain = []
    for _ in range(opts["steps"]):
        t0 = time.perf_counter()
        step()
        plain.append(time.perf_counter() - t0)
    label_modules(model)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(opts["steps"]):
            step()
    report(prof, dict(opts, dtype=dtype + (", bf16 matmuls" if cfg["cpu_matmul"] == "bf16" else "")), plain, cfg, args)
    return 0


def report(prof, opts, plain, cfg, args):
    events = [e for e in prof.events() if e.thread == prof.events()[0].thread]
    ms = lambda e: (e.time_range.end - e.time_range.start) / 1e3  # noqa: E731  (profiler times are in us)
    # forward part of every autograd sequence number. Ops that create no autograd node (views) carry the number
    # the next node will take, so the LAST forward op with a number is the one that made its node.
    fwd_part, phase_of = {}, {}
    for e in events:
        p = e
        while p.cpu_parent is not None:
            p = p.cpu_parent
        phase_of[id(e)] = p.name.removeprefix("## phase ") if p.name.startswith("## phase") else "other"
    for e in events:
        if phase_of[id(e)] == "forward" and e.sequence_nr >= 0 and not e.name.startswith("## "):
            fwd_part[e.sequence_nr] = part_of(e)
    # top-level ops: the outermost non-label event under each phase
    per = defaultdict(lambda: defaultdict(float))   # part -> phase -> ms
    by_op = defaultdict(lambda: defaultdict(float))  # part -> top-level op name -> ms
    calls = defaultdict(int)                         # part -> top-level ops (forward + backward + other)
    busy = defaultdict(float)                        # phase -> ms inside ops
    wall = defaultdict(float)
    n_ops = defaultdict(int)
    for e in events:
        if e.name.startswith("## phase"):
            wall[phase_of[id(e)]] += ms(e)
            continue
        if not is_top(e):
            continue
        phase = phase_of[id(e)]
        busy[phase] += ms(e)
        n_ops[phase] += 1
        if phase == "forward":
            part = part_of(e)
        elif phase == "backward":
            part = fwd_part.get(e.sequence_nr, "other") if e.sequence_nr >= 0 else "other"
        else:
            part = {"optimizer": "optimizer", "data": "data"}.get(phase, "other")
        per[part][phase] += ms(e)
        by_op[part][e.name] += ms(e)
        calls[part] += 1
    n = opts["steps"]
    total = sum(wall.values()) / n
    print(f"preset {cfg['config']}: {B_T(cfg)} tokens/step, {opts['threads']} threads, {opts['dtype']}, torch {torch.__version__}; "
          f"{n} steps after {opts['warmup']} warm-up")
    print(f"plain step (no profiler): median {1e3 * statistics.median(plain):.1f} ms; profiled: {total:.1f} ms/step\n")
    print("| part | forward ms | backward ms | other ms | total ms | share | ops |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for part in PARTS:
        f, b = per[part]["forward"] / n, per[part]["backward"] / n
        o = sum(v for k, v in per[part].items() if k not in ("forward", "backward")) / n
        if f + b + o:
            rows.append((part, f, b, o, calls[part] // n))
    gaps = {ph: (wall[ph] - busy[ph]) / n for ph in wall}
    rows.append(("between ops (Python, dispatcher, autograd engine)", gaps.get("forward", 0),
                 gaps.get("backward", 0), gaps.get("optimizer", 0) + gaps.get("data", 0), ""))
    for part, f, b, o, c in rows:
        print(f"| {part} | {f:.1f} | {b:.1f} | {o:.1f} | {f + b + o:.1f} | {100 * (f + b + o) / total:.0f}% | {c} |")
    print(f"| **step** | {wall['forward'] / n:.1f} | {wall['backward'] / n:.1f} | "
          f"{(wall['optimizer'] + wall['data']) / n:.1f} | {total:.1f} | 100% | {sum(calls.values()) // n} |")
    print(f"\ntop-level ops per step: forward {n_ops['forward'] // n}, backward {n_ops['backward'] // n}, "
          f"optimizer {n_ops['optimizer'] // n}")
    if opts["detail"]:   # --detail=N: the N largest top-level ops of every part
        for part in PARTS:
            ops = sorted(by_op[part].items(), key=lambda kv: -kv[1])[:opts["detail"]]
            if ops:
                print(f"  {part}: " + ", ".join(f"{k.split(': ')[-1]} {v / n:.1f}" for k, v in ops))
    print(f"\ntop {opts['top']} ops by self time (all phases, per step):")
    for a in sorted(prof.key_averages(), key=lambda a: -a.self_cpu_time_total)[:opts["top"]]:
        if not a.key.startswith("## "):
            print(f"  {a.key:60s} {a.self_cpu_time_total / 1e3 / n:7.2f} ms  {a.count // n:5d} calls")


def B_T(cfg):
    return cfg["batch_size"] * cfg["seq_len"]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
