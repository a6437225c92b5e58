"""
Train a DeepSeek-V3-style model: data, the training loop, evaluation, checkpoints (presets and the LR schedule:
config.py).

Paper: DeepSeek-V3 Technical Report (arXiv 2412.19437), §4.2 "Hyper-Parameters" (AdamW β=(0.9, 0.95),
weight decay 0.1, gradient clipping 1.0, warm-up -> constant -> cosine decay of the learning rate, MTP loss
weight λ, balance-loss α, router-bias speed γ) and §2.1.2 (the bias update after every step), §3.3 (FP8).

Simplifications vs. the real thing:
  - no batch-size warm-up (V3 ramps 3072 -> 15360 sequences over the first 469B tokens): fixed batch;
  - the LR schedule is expressed in iterations, not tokens, and λ stays constant (V3: 0.3 then 0.1);
  - the distributed machinery (DP + ZeRO-1, expert and pipeline parallelism) lives in parallel.py;
  - random windows of a small corpus instead of packed documents from 14.8T tokens.

Run:  python train.py --config small                     (2-core CPU, ~5 minutes)
      python train.py --config gpu --compile=True        (one H100/H200)
      torchrun --nproc_per_node=8 train.py --config multi-gpu --pp=2 --ep=2      (DP = the rest: 2)
      python train.py --config v3 --dry_run=True                   (per-rank memory/traffic of PP16 x EP64 x DP2)
      any field can be overridden: python train.py --config small --max_iters=100 --dim=64 --out_dir=out-x
      a wall-clock budget instead of a step count: python train.py --config small --time_budget=120
"""
import time
T_LAUNCH = time.time()   # launch: --time_budget counts from here, and the "first step" line (imports, data, compilation)
import io
import math
import os
import signal
import sys
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint as C
import data
import parallel as P
from config import (MODEL_DEFAULTS, PRESETS, TRAIN_DEFAULTS, budget_horizon, check_train, die, lr_at, parse,
                    setup_cpu, to_model_args)
from model import Transformer
from sample import generate

T_IMPORTS = time.time()
# -----------------------------------------------------------------------------
# config: defaults and presets live in config.py; --config NAME picks a preset, --key=value overrides any field


def fail(msg: str, code: int = 2):
    if int(os.environ.get("RANK", "0")) == 0:   # under torchrun every rank fails alike; one of them says why
        die("train.py", msg, code)
    sys.exit(code)


world = int(os.environ.get("WORLD_SIZE", "1"))
try:
    cfg = parse(sys.argv[1:], {**TRAIN_DEFAULTS, **MODEL_DEFAULTS}, PRESETS, default_preset="small")
    check_train(cfg)
    model_args = to_model_args(cfg)
    dp = cfg["dp"] or max(1, (1 if cfg["dry_run"] else world) // (cfg["pp"] * cfg["ep"]))
    layout = P.Layout(pp=cfg["pp"], dp=dp, ep=cfg["ep"])
    P.check_layout(layout, model_args, None if cfg["dry_run"] else world, cfg["grad_accum"])
    if not cfg["dry_run"]:
        cfg["out_dir"] = C.check_out_dir(cfg["out_dir"])   # '~' expanded; a writable folder or a path to one
except ValueError as e:   # ConfigError, CheckpointError, LayoutError, or a violated model invariant
    fail(str(e))
if cfg["dry_run"]:   # accounting only: no data, no ranks, nothing written
    print(P.dry_run(model_args, layout, cfg["batch_size"], cfg["seq_len"], cfg["grad_accum"], cfg["fp8"])[0])
    sys.exit(0)
signal.signal(signal.SIGTERM, signal.default_int_handler)   # a kill is a Ctrl-C: clean up the same way
ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
if int(os.environ.get("RANK", "0")) == 0:   # one run per out_dir; data-parallel rank 0 holds the lock
    try:
        C.lock_out_dir(cfg["out_dir"])
    except C.CheckpointError as e:
        fail(str(e))
best_path = os.path.join(cfg["out_dir"], "best.pt")   # the weights with the lowest val loss so far
if cfg["resume"]:
    if not os.path.exists(ckpt_path):
        fail(f"--resume=True but there is no checkpoint at {ckpt_path}")
    try:
        saved = P.checkpoint_layout(ckpt_path)
    except Exception as e:   # truncated, random bytes, foreign: one line, as checkpoint.load says it
        fail(f"cannot load checkpoint {ckpt_path}: {C._one_line(e)}")
    if saved != layout:
        fail(f"{ckpt_path} was saved under {saved}, not {layout}: its shards cannot load here; resume with "
             f"--pp={saved.pp} --dp={saved.dp} --ep={saved.ep} on {saved.world} ranks")
elif not cfg["overwrite"]:
    for path in (ckpt_path, best_path):
        if os.path.exists(path):
            fail(f"{path} exists; pass --resume=True to continue it or --overwrite=True to replace it")

# -----------------------------------------------------------------------------
# device, distributed, seed

ddp = world > 1   # any multi-rank layout; `groups` knows who holds what (parallel.py)
if cfg["config"] == "multi-gpu" and not ddp:
    fail("the multi-gpu preset runs under torchrun, e.g. torchrun --nproc_per_node=8 train.py --config multi-gpu")
device = cfg["device"] if cfg["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
rank, groups = 0, None
if ddp:
    rank = int(os.environ["RANK"])
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    groups = P.Groups(layout, rank)
batch_rank, batch_ranks = (groups.batch_rank, groups.batch_ranks) if ddp else (0, 1)   # who reads which data
master = rank == 0
device_type = "cuda" if device.startswith("cuda") else "cpu"
if device_type == "cuda" and not torch.cuda.is_available():
    fail(f"--device={device} but CUDA is not available")
dtype = cfg["dtype"] if cfg["dtype"] != "auto" else ("bfloat16" if device_type == "cuda" else "float32")
if dtype not in ("float32", "bfloat16"):
    fail(f"--dtype must be float32, bfloat16 or auto, got {dtype!r}")
# bf16 autocast: matmuls in bf16, master weights / norms / softmax / losses in fp32 (§3.3 keeps these high)
autocast = torch.autocast(device_type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
torch.manual_seed(cfg["seed"])   # the same on every rank: identical initial weights (data differs per rank)
if device_type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
else:   # malloc keeps freed memory (vocabulary-wide tensors are not page-faulted every step); --cpu_matmul
    try:
        setup_cpu(cfg["cpu_matmul"])
    except ValueError as e:
        fail(str(e))

# -----------------------------------------------------------------------------
# data; on one process with compiled Blocks it is prepared in a forked child while this process builds the model
# and compiles the Blocks (the first step would compile them anyway): start-up takes the longer of the two


def build_model(args):
    torch.manual_seed(cfg["seed"])   # the weights are the first draw after seeding, whenever they are built
    with torch.device(device):   # drawn where it trains: on a GPU, seconds instead of the CPU's minute for 600M
        return Transformer(args)


model, compiled, startup = None, False, {"imports": T_IMPORTS - T_LAUNCH}
try:
    cache = os.path.expanduser(cfg["data_cache"]) if cfg["data_cache"] else data.CACHE_DIR
    if cfg["compile"] and device_type == "cuda" and not ddp and not cfg["fp8"]:
        import concurrent.futures
        import multiprocessing
        # fork: the child inherits the imports and needs no CUDA (this process has not started CUDA yet)
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
            t0 = time.time()
            pending = pool.submit(data.prepare, cfg["data"], cfg["vocab_size"], cache)
            model = build_model(model_args)
            startup["model"] = time.time() - t0
            if not (pending.done() and pending.exception()):   # bad input fails at once, without the compile
                model.compile_blocks()
                model.warm_up_blocks(cfg["batch_size"], cfg["seq_len"], autocast)
                compiled = True
            startup["compile (data prepared meanwhile)"] = time.time() - t0 - startup["model"]
            meta = pending.result()
            startup["waiting for the data"] = time.time() - t0 - sum(list(startup.values())[1:])
    else:
        t0 = time.time()
        meta = data.prepare(cfg["data"], cfg["vocab_size"], cache) if master else None
        startup["data"] = time.time() - t0
    if ddp:   # rank 0 prepares (and caches); the others read the cache
        obj = [meta]
        dist.broadcast_object_list(obj, src=0)
        meta = obj[0]
    B, T = cfg["batch_size"], cfg["seq_len"]
    data.check_enough(meta["train_tokens"], B, T, "train")
    data.check_enough(meta["val_tokens"], B, T, "val")
except data.DataError as e:
    fail(str(e))
except KeyboardInterrupt:
    fail("interrupted while preparing the data; nothing was written", code=130)
fingerprint = C.data_fingerprint(meta, meta["tokenizer"])   # saved in every checkpoint, checked on resume
if meta["vocab_size"] != model_args.vocab_size:
    model_args.vocab_size = meta["vocab_size"]   # the tokenizer may stop early on a tiny text
enc = data.load_tokenizer(meta["tokenizer"])
# the data position is this state; the PP ranks of one pipeline read the same batches (stage 0 needs the
# tokens, the last stage the targets)
train_gen = torch.Generator().manual_seed(cfg["seed"] + 1000 * batch_rank)
train_data, val_data = data.load_tokens(meta["train_bin"]), data.load_tokens(meta["val_bin"])

# -----------------------------------------------------------------------------
# model and optimizer

if model is None or model.embed.num_embeddings != model_args.vocab_size:   # (a tokenizer that stopped early)
    t0 = time.time()
    model, compiled = build_model(model_args), False   # (a rebuilt model is compiled below, like any other)
    startup["model"] = time.time() - t0
if cfg["fp8"]:
    from fp8 import convert_to_fp8
    convert_to_fp8(model, experts=cfg["fp8_experts"])   # Fprop/Dgrad/Wgrad of the blocks' Linears in FP8 (§3.3)
n = model.num_params()   # before sharding: the whole model's counts
has_moe = bool(model.moe_layers())   # False for an all-dense model: no router, no MaxVio to report
flops_per_token = model.flops_per_token(T)
pipe = None
if ddp:
    P.shard_experts(model, groups)   # EP: keep this rank's routed experts, dispatch tokens with all-to-all
    if layout.pp > 1:                # PP: keep stages r and PP-1-r, run DualPipe over the pipeline's ranks
        pipe = P.Pipeline(model, groups, cfg["grad_accum"])
dp_model = P.data_parallel(model, groups) if ddp and pipe is None else model   # DDP over the dense replicas
betas = (cfg["beta1"], cfg["beta2"])
if cfg["fp8"]:   # §3.3.3: BF16 moments, FP32 master weights
    from fp8 import AdamWBF16
    opt_cls, opt_kw = AdamWBF16, dict(lr=cfg["lr"], betas=betas)
else:
    # fused: one kernel for all parameters instead of ~10 ops per tensor, on CPU too (torch >= 2.4)
    opt_cls, opt_kw = torch.optim.AdamW, dict(lr=cfg["lr"], betas=betas, fused=True)
optimizer = P.Optimizer(model, groups, opt_cls, cfg["zero"], cfg["weight_decay"], **opt_kw)   # ZeRO-1 on ranks
step, best_val, best_step, stale, last_loss, ckpt = 0, float("inf"), 0, 0, None, {}   # stale: evals since the best
elapsed = 0.0   # wall seconds of earlier runs of this checkpoint (--resume), for the metrics' time axis
if cfg["resume"]:
    try:   # ranks: parallel.load_checkpoint loads their shards, weights and optimizer state
        if ddp:
            ckpt = P.load_checkpoint(cfg["out_dir"], model, optimizer, groups, device)
        else:
            ckpt = C.load(ckpt_path, device)
            C.check_resumable(ckpt, ckpt_path)
        C.check_same_data(ckpt, fingerprint, ckpt_path, os.path.join(cfg["out_dir"], "tokenizer.tiktoken"))
    except (C.CheckpointError, P.LayoutError) as e:
        fail(str(e))
    saved = ckpt["model_args"]
    if saved != asdict(model_args):
        diff = {k: (saved.get(k), v) for k, v in asdict(model_args).items() if saved.get(k) != v}
        fail(f"model config differs from the checkpoint's: {diff}")
    try:   # optimizer_state_for: a BF16/FP32 run may be resumed with --fp8=True and back
        if not ddp:
            model.load_state_dict(ckpt["model"])
            if "optimizer" in ckpt:   # weights only (hf.py import): fine-tuning starts with a fresh optimizer
                optimizer.parts[0].load_state_dict(C.optimizer_state_for(ckpt["optimizer"], cfg["fp8"]))
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        fail(f"cannot resume from {ckpt_path}: {C._one_line(e)}")
    step, best_val, last_loss = ckpt["step"], ckpt["best_val"], ckpt.get("loss")
    best_step, stale, elapsed = ckpt.get("best_step", 0), ckpt.get("stale", 0), ckpt.get("elapsed", 0.0)
    if "rng" in ckpt:
        torch.set_rng_state(ckpt["rng"]["torch"])
        train_gen.set_state(ckpt["rng"]["data"])
        if device_type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"].cpu())
if cfg["compile"] and not compiled:   # (else the warm-up above compiled them while the data was prepared)
    model.compile_blocks()   # regional: each Block compiled once and reused by every layer of its kind (model.py)
step_model = dp_model   # DDP over the dense replicas on ranks, else the model itself


# -----------------------------------------------------------------------------
# helpers: evaluation, sampling, checkpoints, MFU

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}
peak = next((v for k, v in PEAK_FLOPS.items() if k in torch.cuda.get_device_name()), None) \
    if device_type == "cuda" else None   # dense bf16 per GPU; MFU is not reported on CPU


@torch.no_grad()
@torch.compiler.set_stance("force_eager")   # compiled Blocks would compile again for eval mode; eager is enough
def evaluate(n_batches: int | None = None) -> dict:
    """Main-model CE on the same eval_iters val batches every time (a fixed generator), so evals compare."""
    model.eval()
    gen = torch.Generator().manual_seed(cfg["seed"] + 7)
    losses, loads = [], 0
    for _ in range(n_batches or cfg["eval_iters"]):   # every rank evaluates the same batches (EP/PP ranks must take part)
        x, y = data.get_batch(val_data, B, T, gen, device)
        with autocast:
            loss = pipe.forward_only(x, y) if pipe is not None else model(x, y)[1]
        losses.append(loss["ce"])
        loads = loads + model.expert_load()[0]   # with PP: this rank's MoE layers only
    model.train()
    ce = torch.stack(losses).mean().item()
    maxvio = (loads.max(dim=1).values / loads.mean(dim=1) - 1).mean().item() if has_moe else None
    return dict(val_loss=ce, val_bpb=data.bits_per_byte(ce, meta["val_tokens"], meta["val_bytes"]), maxvio=maxvio)


@torch.compiler.set_stance("force_eager")   # one-token steps: not worth compiling the Blocks for them
def sample_text(n_tokens: int) -> str:
    """A short sample from <|endoftext|> (a new play), decoded with the compressed MLA cache (sample.py)."""
    model.eval()
    gen = torch.Generator(device=device).manual_seed(cfg["seed"])
    with autocast:
        ids, _ = generate(model, [meta["eot_token"]], min(n_tokens, model_args.max_seq_len - 1), gen,
                          temperature=0.8, top_k=50)
    model.clear_cache()   # training forwards must not write into a generation cache
    model.train()
    return enc.decode([t for t in ids if t != meta["eot_token"]])


def save_checkpoint(loss: float | None):
    """checkpoint.py writes it atomically, and refuses (CheckpointError) if the weights or the loss are not finite.
    On ranks: one file per (stage pair, EP shard), ZeRO state gathered first (parallel.save_checkpoint); every rank
    checks its own shard and all agree before anyone writes (a refusal on one rank must not hang the others)."""
    rng = dict(torch=torch.get_rng_state(), data=train_gen.get_state())
    if device_type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state()
    state = dict(model_args=asdict(model_args), config=cfg, step=step, best_val=best_val, best_step=best_step,
                 stale=stale, elapsed=elapsed + time.time() - T_LAUNCH, loss=loss, data=fingerprint)
    if ddp:
        bad = C.first_non_finite(dict(model=model.state_dict(), loss=loss))
        flag = torch.tensor(float(bad is not None), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            raise C.NonFiniteError(f"{bad or 'another rank' + chr(39) + 's weights'} is not finite")
        P.save_checkpoint(cfg["out_dir"], model, optimizer, groups, dict(state, run_id=files.run_id), rng)
        files.committed(step)
        return
    files.save(dict(state, model=model.state_dict(), optimizer=optimizer.parts[0].state_dict(), rng=rng))


def save_best(ev: dict):
    """best.pt: the weights at the lowest val loss so far (sample.py loads it first), not the optimizer state;
    written like ckpt.pt (atomic, finite only).
    NOTE: not written when EP or PP shard the model (rank 0 holds only its shard; ckpt.pt's shards are complete)."""
    if master and (not ddp or (layout.ep == 1 and layout.pp == 1)):
        C.save(dict(model=model.state_dict(), model_args=asdict(model_args), step=step, data=fingerprint, **ev),
               best_path)


def end_cost() -> float:
    """Seconds one eval + sample + checkpoint takes, measured before training (--time_budget keeps it for the end
    and for each eval on the way; every real eval replaces it): 2 val batches, an 8-token sample and an in-memory
    save of the weights, after one untimed call of each (first calls pay one-time costs), scaled to eval_iters,
    sample_tokens and weights + 2 Adam moments, plus 25%. Changes no weights and no RNG state."""
    evaluate(n_batches=1)
    t0 = time.time()
    evaluate(n_batches=2)
    t1 = time.time()
    if cfg["sample_tokens"] and pipe is None:   # no sample under PP (see the end of the run)
        sample_text(1)
        t1 = time.time()
        sample_text(8)
    t2 = time.time()
    torch.save(model.state_dict(), io.BytesIO())
    t3 = time.time()
    return 1.25 * ((t1 - t0) / 2 * cfg["eval_iters"] + (t2 - t1) / 8 * cfg["sample_tokens"] + 3 * (t3 - t2))


# -----------------------------------------------------------------------------
# the training loop

# metrics and checkpoints; an --overwrite run leaves the old files alone until its first checkpoint
files = C.RunFiles(cfg["out_dir"], fingerprint["tokenizer"], run_id=ckpt.get("run_id"),
                   resume_step=step if cfg["resume"] else None, enabled=master)
log_metrics = files.log
CPU_MATMUL_NOTE = {"bf16": ", bf16-input matmuls", "head-bf16": ", bf16-input head matmuls"}   # (--cpu_matmul)
if master:
    print("config: " + " ".join(f"{k}={v}" for k, v in cfg.items()))
    print(f"data: {meta['name']}, {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens, "
          f"vocab {meta['vocab_size']}, {meta['val_bytes'] / meta['val_tokens']:.2f} val bytes/token")
    print(f"params: {n['total'] / 1e6:.2f}M total, {n['activated'] / 1e6:.2f}M activated per token; "
          f"MTP +{n['mtp'] / 1e6:.2f}M ({n['mtp_activated'] / 1e6:.2f}M activated)")
    tokens_per_step = B * T * cfg["grad_accum"] * batch_ranks
    print(f"FLOPs/token (train, incl. MTP): {flops_per_token / 1e6:.1f}M; tokens/step: {tokens_per_step:,}; "
          f"device {device}, {dtype}{', fp8' if cfg['fp8'] else ''}{', compiled' if cfg['compile'] else ''}"
          f"{CPU_MATMUL_NOTE.get(cfg['cpu_matmul'], '') if device_type == 'cpu' else ''}"
          f"{f', {torch.get_num_threads()} threads' if device_type == 'cpu' else ''}{f', {layout}' if ddp else ''}")


def train_step(it: int, horizon: int) -> torch.Tensor:
    for g in optimizer.param_groups:
        g["lr"] = lr_at(it, cfg, horizon)
    total = torch.zeros((), device=device)
    ga = cfg["grad_accum"]
    if pipe is not None:   # PP: the grad_accum micro-batches of this step go through DualPipe together
        xy = [data.get_batch(train_data, B, T, train_gen, device) for _ in range(ga)]
        with autocast:
            total += pipe.step(torch.stack([x for x, _ in xy]), torch.stack([y for _, y in xy]))["ce"]
    for i in range(ga if pipe is None else 0):
        x, y = data.get_batch(train_data, B, T, train_gen, device)
        # DDP all-reduces during the last micro-step's backward only
        with dp_model.no_sync() if dp_model is not model and i < ga - 1 else nullcontext():
            with autocast:
                _, losses = step_model(x, y)
            (losses["loss"] / ga).backward()
        total += losses["ce"].detach() / ga
    if ddp:   # gradients of the global batch, summed router loads: every replica takes the same step
        P.sync_grads(model, groups, ddp=dp_model is not model)
        dist.all_reduce(total, group=groups.replicas)
        total /= dist.get_world_size(groups.replicas)
        P.clip_grad_norm(model, groups, cfg["grad_clip"])
    else:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # §2.1.2: aux-loss-free balancing after every optimizer step; on ranks from the router loads summed over every
    # rank holding the layer (its DP x EP batch ranks and both DualPipe copies)
    model.update_router_biases(all_reduce=(lambda t: dist.all_reduce(t, group=groups.replicas)) if ddp else None)
    return total


interrupted = False


def on_sigint(signum, frame):   # Ctrl-C: finish the current step, then save and exit
    global interrupted
    interrupted = True


def stop_now() -> bool:
    """On ranks, one rank's Ctrl-C stops them all at the same step (their collectives must pair up)."""
    global interrupted
    if ddp:
        flag = torch.tensor(float(interrupted), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        interrupted = flag.item() > 0
    return interrupted


signal.signal(signal.SIGINT, on_sigint)
signal.signal(signal.SIGTERM, on_sigint)   # kill (a scheduler's preemption) saves like Ctrl-C
horizon, speed, end_s = cfg["max_iters"], [], 0.0   # the step training ends at; (steps, seconds) per log window
if cfg["time_budget"]:
    end_s, used = end_cost(), time.time() - T_LAUNCH
    if ddp:   # rank 0's clock decides for all (they must agree on whether, and when, to stop)
        t = torch.tensor([end_s, used], dtype=torch.float64, device=device)
        dist.broadcast(t, src=0)
        end_s, used = t.tolist()
    if master:
        print(f"time budget {cfg['time_budget']:g} s: {used:.1f} s used by start-up, ~{end_s:.1f} s kept for each "
              f"eval/sample/checkpoint; the LR schedule ends where the measured step time meets the budget")
    if used + end_s >= cfg["time_budget"]:
        fail(f"--time_budget={cfg['time_budget']:g} leaves no time to train: start-up took {used:.1f} s and the "
             f"final eval/sample/checkpoint needs ~{end_s:.1f} s (--time_budget=0: train max_iters steps, untimed)")
bar = tqdm(total=horizon, initial=step, disable=not master, dynamic_ncols=True, mininterval=1.0)
window, t_window, first_step = [], time.time(), step
t_loop = t_window
while step < horizon and not stop_now():
    loss = train_step(step, horizon)
    window.append(loss)
    step += 1
    if step == first_step + 1:   # the first step of this process: compilation; the optimizer state exists now
        if device_type == "cuda":
            torch.cuda.synchronize()
        state = torch.tensor(float(optimizer.local_state_bytes()), device=device)
        if ddp:
            dist.all_reduce(state, op=dist.ReduceOp.MAX)
        if master:
            tqdm.write(f"first step: {time.time() - t_window:.1f} s (compilation included), "
                       f"{time.time() - T_LAUNCH:.1f} s after launch; optimizer state {state.item() / 2**20:.2f} MiB "
                       f"on the fullest rank{' (ZeRO-1: sharded over each replica group)' if ddp and cfg['zero'] else ''}")
            tqdm.write("start-up: " + ", ".join(f"{k} {v:.1f} s" for k, v in startup.items()) +
                       f"; the first step began {t_loop - T_LAUNCH:.1f} s after launch")
    if step % cfg["log_interval"] == 0 or step % cfg["eval_interval"] == 0 or step >= horizon:
        losses = torch.stack(window).cpu()   # one host sync per log interval, not per step
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            bar.close()
            fail(f"non-finite loss at step {step - len(window) + int(bad[0]) + 1}; stopping, {files.kept()}", code=1)
        dt = (time.time() - t_window) / len(window)
        speed.append((len(window), dt * len(window)))
        if cfg["time_budget"] and len(speed) > 1:   # re-fit the horizon; the launch's first window is the warm-up
            recent = speed[1:][-50:]
            horizon = budget_horizon(step, cfg, sum(s for _, s in recent) / sum(n for n, _ in recent),
                                     T_LAUNCH + cfg["time_budget"] - time.time(), end_s)
            if ddp:   # every rank must stop at the same step: rank 0's clock decides
                h = torch.tensor(horizon, device=device)
                dist.broadcast(h, src=0)
                horizon = int(h)
            bar.total = horizon
        tok_s = B * T * cfg["grad_accum"] * batch_ranks / dt   # the whole world's tokens
        maxvio = model.expert_load()[1].mean().item() if has_moe else None
        mfu = f" | mfu {100 * flops_per_token * tok_s / world / peak:.1f}%" if peak else ""
        bar.set_postfix_str(f"loss {losses[-1]:.4f} | {dt * 1000:.0f} ms | {tok_s:,.0f} tok/s{mfu}"
                             + (f" | maxvio {maxvio:.2f}" if has_moe else ""))
        bar.update(len(window))
        log_metrics(dict(step=step, loss=losses[-1].item(), lr=optimizer.param_groups[0]["lr"], ms=dt * 1000,
                         tok_s=tok_s, maxvio=maxvio, time=round(elapsed + time.time() - T_LAUNCH, 1)))
        window, t_window, last_loss = [], time.time(), losses[-1].item()
    if step % cfg["eval_interval"] == 0 or step >= horizon:
        t_eval = time.time()
        ev = evaluate()
        if not math.isfinite(ev["val_loss"]):   # the last update broke the weights: do not save them
            bar.close()
            fail(f"non-finite loss at step {step} (validation); stopping, {files.kept()}", code=1)
        improved = ev["val_loss"] < best_val
        if improved:
            best_val, best_step, stale = ev["val_loss"], step, 0
        else:
            stale += 1
        log_metrics(dict(step=step, **ev, best=improved, time=round(elapsed + time.time() - T_LAUNCH, 1)))
        if master:
            tqdm.write(f"step {step}: val loss {ev['val_loss']:.4f} | val bpb {ev['val_bpb']:.4f}"
                       + (f" | maxvio {ev['maxvio']:.2f}" if has_moe else "")
                       + (" | best" if improved else f" | best {best_val:.4f} at {best_step}"))
        done = step >= horizon or (cfg["patience"] and stale >= cfg["patience"])
        try:   # checkpoint first: an --overwrite run commits its files there, then best.pt
            if cfg["save"] and (done or not cfg["ckpt_interval"]):   # --save=False: measure or sweep, write nothing
                save_checkpoint(last_loss)
            if cfg["save"] and improved:
                save_best(ev)
        except C.CheckpointError as e:   # non-finite weights, disk full
            bar.close()
            fail(f"step {step}: {e}; stopping, {files.kept()}", code=1)
        if cfg["time_budget"]:   # this eval's measured cost replaces the estimate
            end_s = 1.1 * (time.time() - t_eval)
        t_window = time.time()   # keep eval time out of tokens/s
        if done and step < horizon:
            tqdm.write(f"stopping early: val loss has not improved for {stale} evals (best {best_val:.4f} at step "
                       f"{best_step}, in {best_path})")
            break
    elif cfg["save"] and cfg["ckpt_interval"] and step % cfg["ckpt_interval"] == 0:
        try:
            save_checkpoint(last_loss)
        except C.CheckpointError as e:
            bar.close()
            fail(f"step {step}: {e}; stopping, {files.kept()}", code=1)
bar.close()
# --sample_tokens=0: no sample. EP: every rank generates the same text (the all-to-all needs them all);
# NOTE: no sample under PP (generation would need a pipelined decode)
if cfg["sample_tokens"] and not interrupted and pipe is None and (master or (ddp and layout.ep > 1)):
    text = sample_text(cfg["sample_tokens"])
    if master:
        print("--- sample ---\n" + text + "\n--------------")
if not interrupted:
    log_metrics(dict(step=step, elapsed=time.time() - T_LAUNCH))   # launch to the end of the run
    if master:
        print(f"done: {step} steps, {time.time() - T_LAUNCH:.1f} s from launch")
if interrupted:
    recent = torch.stack(window).cpu().tolist() if window else [last_loss]
    try:   # never save weights that went non-finite since the last check
        save_checkpoint(recent[-1] if all(x is None or math.isfinite(x) for x in recent) else math.nan)
    except C.CheckpointError as e:
        fail(f"interrupted at step {step} but not saved ({e}); {files.kept()}", code=1)
    if master:
        print(f"interrupted: saved step {step} to {ckpt_path}; continue with --resume=True", file=sys.stderr)
    sys.exit(130)
if ddp:   # every replica of a weight must end identical (same reduced gradients, same router updates)
    in_sync = P.in_sync(model, groups)
    dist.barrier()   # leave together: a gloo rank that tears down while its peer is still in a collective can abort
    dist.destroy_process_group()
    if not in_sync:
        fail("replicas of a weight ended different across ranks", code=1)
    if master:
        print(f"{layout}: every replica in sync after {step} steps")
