"""
Train a DeepSeek-V3-style model: data, the training loop, evaluation, checkpoints (presets and the LR schedule:
config.py).

Paper: DeepSeek-V3 Technical Report (arXiv 2412.19437), §4.2 "Hyper-Parameters" (AdamW β=(0.9, 0.95),
weight decay 0.1, gradient clipping 1.0, warm-up -> constant -> cosine decay of the learning rate, MTP loss
weight λ, balance-loss α, router-bias speed γ) and §2.1.2 (the bias update after every step), §3.3 (FP8).

Simplifications vs. the real thing:
  - no batch-size warm-up (V3 ramps 3072 -> 15360 sequences over the first 469B tokens): fixed batch;
  - the LR schedule is expressed in iterations, not tokens, and λ stays constant (V3: 0.3 then 0.1);
  - data parallelism is a plain gradient all-reduce (no ZeRO, no expert/pipeline parallelism here);
  - random windows of a small corpus instead of packed documents from 14.8T tokens.

Run:  python train.py --config small                     (2-core CPU, ~5 minutes)
      python train.py --config gpu --compile=True        (one H100/H200)
      torchrun --nproc_per_node=8 train.py --config multi-gpu
      any field can be overridden: python train.py --config small --max_iters=100 --dim=64 --out_dir=out-x
      a wall-clock budget instead of a step count: python train.py --config small --time_budget=120
"""
import time

T_LAUNCH = time.time()   # launch: --time_budget counts from here, and the "first step" line (imports, data, compilation)

import io
import json
import math
import os
import shutil
import signal
import sys
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
from config import (MODEL_DEFAULTS, PRESETS, TRAIN_DEFAULTS, budget_horizon, check_train, die, lr_at, parse,
                    to_model_args)
from model import Transformer
from sample import generate

# -----------------------------------------------------------------------------
# config: defaults and presets live in config.py; --config NAME picks a preset, --key=value overrides any field


def fail(msg: str, code: int = 2):
    die("train.py", msg, code)


try:
    cfg = parse(sys.argv[1:], {**TRAIN_DEFAULTS, **MODEL_DEFAULTS}, PRESETS, default_preset="small")
    check_train(cfg)
    model_args = to_model_args(cfg)
except ValueError as e:   # ConfigError, or a violated model invariant
    fail(str(e))
ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
best_path = os.path.join(cfg["out_dir"], "best.pt")   # the weights with the lowest val loss so far
if cfg["resume"]:
    if not os.path.exists(ckpt_path):
        fail(f"--resume=True but there is no checkpoint at {ckpt_path}")
elif not cfg["overwrite"]:
    for path in (ckpt_path, best_path):
        if os.path.exists(path):
            fail(f"{path} exists; pass --resume=True to continue it or --overwrite=True to replace it")

# -----------------------------------------------------------------------------
# device, distributed, seed

ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
if cfg["config"] == "multi-gpu" and not ddp:
    fail("the multi-gpu preset runs under torchrun, e.g. torchrun --nproc_per_node=8 train.py --config multi-gpu")
device = cfg["device"] if cfg["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
rank, world = 0, 1
if ddp:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
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

# -----------------------------------------------------------------------------
# data

try:
    meta = data.prepare(cfg["data"], cfg["vocab_size"]) if master else None
    if ddp:   # rank 0 prepares (and caches); the others read the cache
        obj = [meta]
        dist.broadcast_object_list(obj, src=0)
        meta = obj[0]
    B, T = cfg["batch_size"], cfg["seq_len"]
    data.check_enough(meta["train_tokens"], B, T, "train")
    data.check_enough(meta["val_tokens"], B, T, "val")
except data.DataError as e:
    fail(str(e))
if meta["vocab_size"] != model_args.vocab_size:
    model_args.vocab_size = meta["vocab_size"]   # the tokenizer may stop early on a tiny text
if T > model_args.max_seq_len:
    fail(f"seq_len={T} exceeds max_seq_len={model_args.max_seq_len}")
enc = data.load_tokenizer(meta["tokenizer"])
train_gen = torch.Generator().manual_seed(cfg["seed"] + 1000 * rank)   # the data position is this state
train_data, val_data = data.load_tokens(meta["train_bin"]), data.load_tokens(meta["val_bin"])

# -----------------------------------------------------------------------------
# model and optimizer

model = Transformer(model_args).to(device)
if cfg["fp8"]:
    from fp8 import convert_to_fp8
    convert_to_fp8(model)   # Fprop/Dgrad/Wgrad of every Linear in the blocks in FP8 (§3.3); same state dict
n = model.num_params()
flops_per_token = model.flops_per_token(T)
# decay only matrices (weights, embeddings, gate centroids); norms' gains are never decayed
decay = [p for p in model.parameters() if p.dim() >= 2]
no_decay = [p for p in model.parameters() if p.dim() < 2]
groups = [dict(params=decay, weight_decay=cfg["weight_decay"]), dict(params=no_decay, weight_decay=0.0)]
betas = (cfg["beta1"], cfg["beta2"])
if cfg["fp8"]:   # §3.3.3: BF16 moments, FP32 master weights
    from fp8 import AdamWBF16
    optimizer = AdamWBF16(groups, lr=cfg["lr"], betas=betas)
else:
    # fused: one kernel for all parameters instead of ~10 ops per tensor, on CPU too (torch >= 2.4)
    optimizer = torch.optim.AdamW(groups, lr=cfg["lr"], betas=betas, fused=True)
step, best_val, best_step, stale = 0, float("inf"), 0, 0   # stale: evals since the best one
elapsed = 0.0   # wall seconds of earlier runs of this checkpoint (--resume), for the metrics' time axis
if cfg["resume"]:
    ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
    saved = ckpt["model_args"]
    if saved != asdict(model_args):
        diff = {k: (saved.get(k), v) for k, v in asdict(model_args).items() if saved.get(k) != v}
        fail(f"model config differs from the checkpoint's: {diff}")
    saved_tok = os.path.join(cfg["out_dir"], "tokenizer.tiktoken")
    if os.path.exists(saved_tok) and open(saved_tok, "rb").read() != open(meta["tokenizer"], "rb").read():
        fail(f"{saved_tok} differs from the tokenizer built for this data (--data, --vocab_size): the checkpoint's "
             "token ids would mean other text")
    model.load_state_dict(ckpt["model"])
    step, best_val = ckpt["step"], ckpt["best_val"]
    best_step, stale, elapsed = ckpt.get("best_step", 0), ckpt.get("stale", 0), ckpt.get("elapsed", 0.0)
    if "optimizer" in ckpt:   # weights only (hf.py import): fine-tuning starts with a fresh optimizer
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        train_gen.set_state(ckpt["rng"]["data"])
        if device_type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"].cpu())
if cfg["compile"]:   # regional: each Block compiled once and reused by every layer of its kind (model.py)
    model.compile_blocks()
step_model = model


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
    for _ in range(n_batches or cfg["eval_iters"]):
        x, y = data.get_batch(val_data, B, T, gen, device)
        with autocast:
            _, loss = model(x, y)
        losses.append(loss["ce"])
        loads = loads + model.expert_load()[0]
    model.train()
    ce = torch.stack(losses).mean().item()
    maxvio = (loads.max(dim=1).values / loads.mean(dim=1) - 1).mean().item()
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


def save_checkpoint():
    """Atomic: write a temp file, then rename over the old one, so a crash never leaves half a checkpoint."""
    if not master:
        return
    rng = dict(torch=torch.get_rng_state(), data=train_gen.get_state())
    if device_type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state()
    ckpt = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), model_args=asdict(model_args),
                config=cfg, step=step, best_val=best_val, best_step=best_step, stale=stale, rng=rng,
                elapsed=elapsed + time.time() - T_LAUNCH)
    atomic_save(ckpt, ckpt_path)


def atomic_save(obj, path: str):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_best(ev: dict):
    """best.pt: the weights at the lowest val loss so far (sample.py loads it first), not the optimizer state."""
    if master:
        atomic_save(dict(model=model.state_dict(), model_args=asdict(model_args), step=step, **ev), best_path)


def log_metrics(record: dict):
    if master:
        with open(os.path.join(cfg["out_dir"], "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


def end_cost() -> float:
    """Seconds one eval + sample + checkpoint takes, measured before training (--time_budget keeps it for the end
    and for each eval on the way; every real eval replaces it): 2 val batches, an 8-token sample and an in-memory
    save of the weights, after one untimed call of each (first calls pay one-time costs), scaled to eval_iters,
    sample_tokens and weights + 2 Adam moments, plus 25%. Changes no weights and no RNG state."""
    evaluate(n_batches=1)
    t0 = time.time()
    evaluate(n_batches=2)
    t1 = time.time()
    if cfg["sample_tokens"]:
        sample_text(1)
        t1 = time.time()
        sample_text(8)
    t2 = time.time()
    torch.save(model.state_dict(), io.BytesIO())
    t3 = time.time()
    return 1.25 * ((t1 - t0) / 2 * cfg["eval_iters"] + (t2 - t1) / 8 * cfg["sample_tokens"] + 3 * (t3 - t2))


# -----------------------------------------------------------------------------
# the training loop

if master:
    os.makedirs(cfg["out_dir"], exist_ok=True)
    if not cfg["resume"] and os.path.exists(os.path.join(cfg["out_dir"], "metrics.jsonl")):
        os.remove(os.path.join(cfg["out_dir"], "metrics.jsonl"))   # --overwrite=True: a fresh log
    shutil.copy(meta["tokenizer"], os.path.join(cfg["out_dir"], "tokenizer.tiktoken"))   # sample.py needs it
    print("config: " + " ".join(f"{k}={v}" for k, v in cfg.items()))
    print(f"data: {meta['name']}, {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens, "
          f"vocab {meta['vocab_size']}, {meta['val_bytes'] / meta['val_tokens']:.2f} val bytes/token")
    print(f"params: {n['total'] / 1e6:.2f}M total, {n['activated'] / 1e6:.2f}M activated per token; "
          f"MTP +{n['mtp'] / 1e6:.2f}M ({n['mtp_activated'] / 1e6:.2f}M activated)")
    tokens_per_step = B * T * cfg["grad_accum"] * world
    print(f"FLOPs/token (train, incl. MTP): {flops_per_token / 1e6:.1f}M; tokens/step: {tokens_per_step:,}; "
          f"device {device}, {dtype}{', fp8' if cfg['fp8'] else ''}{', compiled' if cfg['compile'] else ''}"
          f"{f', {world} ranks' if ddp else ''}")


def train_step(it: int, horizon: int) -> torch.Tensor:
    for g in optimizer.param_groups:
        g["lr"] = lr_at(it, cfg, horizon)
    total = torch.zeros((), device=device)
    for _ in range(cfg["grad_accum"]):
        x, y = data.get_batch(train_data, B, T, train_gen, device)
        with autocast:
            _, losses = step_model(x, y)
        (losses["loss"] / cfg["grad_accum"]).backward()
        total += losses["ce"].detach() / cfg["grad_accum"]
    if ddp:   # data parallel: average gradients so every rank takes the same step
        for p in model.parameters():
            if p.grad is None:   # an expert no token picked on this rank
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
        dist.all_reduce(total, op=dist.ReduceOp.AVG)
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # §2.1.2: aux-loss-free balancing after every optimizer step; with DDP from the router loads summed over ranks
    model.update_router_biases(all_reduce=dist.all_reduce if ddp else None)
    return total


interrupted = False


def on_sigint(signum, frame):   # Ctrl-C: finish the current step, then save and exit
    global interrupted
    interrupted = True


signal.signal(signal.SIGINT, on_sigint)
horizon, speed, end_s = cfg["max_iters"], [], 0.0   # the step training ends at; (steps, seconds) per log window
if cfg["time_budget"]:
    end_s = end_cost()
    used = time.time() - T_LAUNCH
    if master:
        print(f"time budget {cfg['time_budget']:g} s: {used:.1f} s used by start-up, ~{end_s:.1f} s kept for each "
              f"eval/sample/checkpoint; the LR schedule ends where the measured step time meets the budget")
    if used + end_s >= cfg["time_budget"]:
        fail(f"--time_budget={cfg['time_budget']:g} leaves no time to train: start-up took {used:.1f} s and the "
             f"final eval/sample/checkpoint needs ~{end_s:.1f} s")
bar = tqdm(total=horizon, initial=step, disable=not master, dynamic_ncols=True, mininterval=1.0)
window, t_window, last_good, first_step = [], time.time(), step, step
while step < horizon and not interrupted:
    loss = train_step(step, horizon)
    window.append(loss)
    step += 1
    if step == first_step + 1 and master:   # the first step of this process: compilation
        if device_type == "cuda":
            torch.cuda.synchronize()
        tqdm.write(f"first step: {time.time() - t_window:.1f} s (compilation included), "
                   f"{time.time() - T_LAUNCH:.1f} s after launch")
    if step % cfg["log_interval"] == 0 or step % cfg["eval_interval"] == 0 or step >= horizon:
        losses = torch.stack(window).cpu()   # one host sync per log interval, not per step
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            bar.close()
            fail(f"non-finite loss at step {step - len(window) + int(bad[0]) + 1}; stopping, the last good "
                 f"checkpoint (step {last_good}) is kept in {cfg['out_dir']}", code=1)
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
        tok_s = B * T * cfg["grad_accum"] * world / dt
        maxvio = model.expert_load()[1].mean().item()
        mfu = f" | mfu {100 * flops_per_token * tok_s / world / peak:.1f}%" if peak else ""
        bar.set_postfix_str(f"loss {losses[-1]:.4f} | {dt * 1000:.0f} ms | {tok_s:,.0f} tok/s{mfu} | maxvio {maxvio:.2f}")
        bar.update(len(window))
        log_metrics(dict(step=step, loss=losses[-1].item(), lr=optimizer.param_groups[0]["lr"], ms=dt * 1000,
                         tok_s=tok_s, maxvio=maxvio, time=round(elapsed + time.time() - T_LAUNCH, 1)))
        window, t_window = [], time.time()
    if step % cfg["eval_interval"] == 0 or step >= horizon:
        t_eval = time.time()
        ev = evaluate()
        if not math.isfinite(ev["val_loss"]):   # the last update broke the weights: do not save them
            bar.close()
            fail(f"non-finite loss at step {step} (validation); stopping, the last good checkpoint "
                 f"(step {last_good}) is kept in {cfg['out_dir']}", code=1)
        improved = ev["val_loss"] < best_val
        if improved:
            best_val, best_step, stale = ev["val_loss"], step, 0
            if cfg["save"]:
                save_best(ev)
        else:
            stale += 1
        log_metrics(dict(step=step, **ev, best=improved, time=round(elapsed + time.time() - T_LAUNCH, 1)))
        if master:
            tqdm.write(f"step {step}: val loss {ev['val_loss']:.4f} | val bpb {ev['val_bpb']:.4f} | "
                       f"maxvio {ev['maxvio']:.2f}{' | best' if improved else f' | best {best_val:.4f} at {best_step}'}")
        done = step >= horizon or (cfg["patience"] and stale >= cfg["patience"])
        if cfg["save"] and (done or not cfg["ckpt_interval"]):   # --save=False: measure or sweep, write nothing
            save_checkpoint()
            last_good = step
        if cfg["time_budget"]:   # this eval's measured cost replaces the estimate
            end_s = 1.1 * (time.time() - t_eval)
        t_window = time.time()   # keep eval time out of tokens/s
        if done and step < horizon:
            tqdm.write(f"stopping early: val loss has not improved for {stale} evals (best {best_val:.4f} at step "
                       f"{best_step}, in {best_path})")
            break
    elif cfg["save"] and cfg["ckpt_interval"] and step % cfg["ckpt_interval"] == 0:
        save_checkpoint()
        last_good = step
        t_window = time.time()   # keep eval time out of tokens/s
bar.close()
if master and cfg["sample_tokens"] and not interrupted:   # --sample_tokens=0: no sample
    print("--- sample ---\n" + sample_text(cfg["sample_tokens"]) + "\n--------------")
if not interrupted:
    log_metrics(dict(step=step, elapsed=time.time() - T_LAUNCH))   # launch to the end of the run
    if master:
        print(f"done: {step} steps, {time.time() - T_LAUNCH:.1f} s from launch")
if interrupted:
    save_checkpoint()
    if master:
        print(f"interrupted: saved step {step} to {ckpt_path}; continue with --resume=True", file=sys.stderr)
    sys.exit(130)
if ddp:   # every rank must end with the same weights (same averaged gradients, same router updates)
    check = torch.stack([p.detach().double().sum() for p in model.parameters()] +
                        [m.gate.bias.double().sum() for m in model.moe_layers()])
    ranks = [torch.zeros_like(check) for _ in range(world)]
    dist.all_gather(ranks, check)
    in_sync = all(torch.equal(r, ranks[0]) for r in ranks)
    dist.destroy_process_group()
    if not in_sync:
        fail("data-parallel ranks ended with different weights", code=1)
    if master:
        print(f"{world} data-parallel ranks in sync after {step} steps")
