"""
The configuration of every entry point: training defaults, the presets, ONE command-line parser, the LR schedule.

Importing this file does nothing but define them (train.py starts training when imported), so the presets are
readable from anywhere: bench/bench_sample.py builds a preset's model from them, the tests check the parser and
the schedule on their own.

Grammar, the same for train.py, sample.py, data.py, dualpipe_demo.py and bench/bench_sample.py:
  --config NAME (or --config=NAME)   a preset (train.py and the bench: PRESETS below)
  --key=value                        any known key; the value is a Python literal (ast.literal_eval), and a bare
                                     word stays a string (--device=cuda); it must have the default's type
                                     (an int is accepted for a float); a default of None takes a string
  --flag                             the same as --flag=True, for a key whose default is a bool
Anything else (an unknown key, a wrong type, a stray word) is a ConfigError: the entry point prints one line,
`PROG: error: MESSAGE`, on stderr and exits 2 (`parse_or_exit`).

Run: python -m pytest tests/test_config.py
"""
import ast
import ctypes
import difflib
import math
import sys
from dataclasses import fields

import torch

from model import V3_ARGS, HeadCrossEntropy, ModelArgs

# -----------------------------------------------------------------------------
# train.py: defaults and presets

TRAIN_DEFAULTS = dict(
    # I/O
    out_dir="out", data=None, eval_interval=100, eval_iters=20, log_interval=1, sample_tokens=200,
    resume=False, overwrite=False, save=True,
    # checkpoints: best.pt (weights) whenever val improves; ckpt.pt (everything, for --resume) every ckpt_interval
    # steps (0: at evals), at the end and on Ctrl-C; stop after `patience` evals without improvement (0: never)
    ckpt_interval=0, patience=0,
    # data and batch: tokens per optimizer step = batch_size * seq_len * grad_accum * DP * EP ranks
    vocab_size=2048, batch_size=16, seq_len=128, grad_accum=1,
    # optimizer and schedule (§4.2): warm-up, constant, then cosine decay over the last decay_frac of steps
    max_iters=1000, lr=3e-3, min_lr=3e-4, warmup_iters=50, decay_frac=0.4, weight_decay=0.1,
    beta1=0.9, beta2=0.95, grad_clip=1.0,
    # > 0: launch to exit within this many seconds; the schedule ends where the measured step time reaches the
    # budget (max_iters only caps it), so a faster or slower machine trains more or fewer steps, same shape
    time_budget=0.0,
    # system
    device="auto", dtype="auto", compile=False, fp8=False, seed=1337,
    # CPU float32 matmuls: 'ieee' exact fp32; 'bf16' rounds their inputs to bf16 and accumulates in fp32 (oneDNN,
    # AMX/AVX512-BF16: the head's GEMMs 2.5-3x faster at one thread, a whole small-preset step slower at two);
    # 'head-bf16' does that in the output head's GEMMs only (model.HeadCrossEntropy), all else exact. Every
    # tensor, gradient and optimizer state stays fp32 (TF32's CPU cousin; unlike --dtype=bfloat16, which makes
    # activations and their gradients bf16). Ignored on a GPU.
    cpu_matmul="ieee",
    fp8_experts=True,   # with fp8: the routed experts in FP8 too (False: their GEMMs stay BF16, see fp8.convert_to_fp8)
    data_cache=None,   # folder of the prepared data (None: data_cache/ beside data.py; set it for a read-only checkout)
    # parallelism under torchrun (parallel.py): pipeline x data x expert ranks = world size (dp=0: whatever pp*ep
    # leaves); with pp > 1, grad_accum is the number of DualPipe micro-batches; zero shards the optimizer state
    # (ZeRO-1); dry_run prints the per-rank memory and communication of the layout and exits (no ranks needed)
    pp=1, dp=0, ep=1, zero=True, dry_run=False,
)
CPU_MATMUL = ("ieee", "bf16", "head-bf16")   # --cpu_matmul values (TRAIN_DEFAULTS)
MODEL_DEFAULTS = {f.name: f.default for f in fields(ModelArgs)}
PRESETS = {
    # 2.40M total / 1.74M activated params (+0.42M MTP), vocab 4096, 16 x 128 tokens per step, fp32. Launch to
    # exit fits --time_budget=290 s: the LR schedule (3e-3, decayed to 3e-5 over the last 60%) ends where the
    # measured step time meets the budget, so a faster or slower machine trains more or fewer steps (max_iters
    # caps it). Retuned 2026-12-02 (README "Small preset"): in what 290 s buy at 2 threads, vocab 4096 x 675 steps
    # reached 2.082 bits/byte, vocab 2048 x 770 steps 2.117, 8 x 128 tokens x 1010 steps (vocab 4096) 2.134; bf16
    # autocast was 0.021 worse at equal steps and no faster at 2 threads. init_std 0.02, not the paper's 0.006
    # (tuned for d=7168): at d=128, 300 steps reach 2.283 vs 2.391 bpb. bf16-input matmuls in the output head
    # only (cpu_matmul 'head-bf16'): a step 0.89-0.92x as long at 2 threads (bench/ab_step.py), 1155 steps and 2.030
    # bpb in 290 s against 951 steps and 2.050 with exact fp32 everywhere (quiet machine, 2026-12-02); 'bf16' for
    # every matmul made the whole step 1.21-1.35x slower at 2 threads
    "small": dict(
        out_dir="out-small", time_budget=290.0, max_iters=3000, eval_interval=250, eval_iters=20, vocab_size=4096,
        cpu_matmul="head-bf16",
        batch_size=16, seq_len=128, lr=3e-3, min_lr=3e-5, warmup_iters=50, decay_frac=0.6,
        dim=128, inter_dim=384, moe_inter_dim=96, n_layers=4, n_dense_layers=1, n_heads=4,
        n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, n_expert_groups=4, n_limited_groups=2,
        route_scale=1.0, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, max_seq_len=128, original_seq_len=128, n_mtp_depth=1, init_std=0.02),
    # 109M total / 53M activated (+33M MTP) on one 80-141 GB GPU, bf16 autocast, Blocks compiled (regional).
    # Sized to Shakespeare (1.54M training tokens at vocab 2048): V3's per-head widths (8 heads of 128+64 / 128),
    # 4 layers (1 dense + 3 MoE: 8 routed experts 1024 wide in 4 groups, 2 groups kept, 2 active, 1 shared),
    # residual dropout 0.2, best.pt kept, stop after 2 evals without improvement. Chosen by bench/sweep.py
    # (H200, 2026-12-02, 500 steps, 4 runs side by side; README): 4 layers / dropout 0.2 -> 2.071 bpb at 500
    # and still falling; 6 layers 2.115 (450); 6 layers / dropout 0.3 2.247 (450); 8 layers / 0.3 2.306 (350).
    # The full run (H200, 2026-12-02): best 2.032 bpb at step 550, stopped at 650 (2.053), 117 s launch to
    # exit, 45 ms/step, 31.7% MFU. The preset it replaces (631M / 147M, vocab 8192, 16 heads of 64+32 / 64,
    # 12 layers, 32 experts 512 wide, 4 active) peaked at 2.044 at step 300 and then memorized.
    "gpu": dict(
        out_dir="out-gpu", max_iters=1000, eval_interval=50, eval_iters=20, log_interval=10, compile=True,
        ckpt_interval=1000, patience=2, vocab_size=2048, batch_size=32, seq_len=1024, lr=1.5e-3, min_lr=1.5e-4,
        warmup_iters=50, decay_frac=0.6, dropout=0.2, gate_impl="rank",
        dim=1024, inter_dim=2816, moe_inter_dim=1024, n_layers=4, n_dense_layers=1, n_heads=8,
        n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, n_expert_groups=4, n_limited_groups=2,
        route_scale=2.5, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, max_seq_len=1024, original_seq_len=1024, n_mtp_depth=1, init_std=0.006,
        fp8_experts=False),  # with --fp8=True the 1024-wide routed experts stay BF16 (README: FP8 loses there)
}
PRESETS["multi-gpu"] = dict(PRESETS["gpu"], out_dir="out-multi-gpu")  # same model; run it under torchrun
# the real DeepSeek-V3 (671B + 11.6B MTP) on the paper's layout (§3.2: 2048 GPUs = PP16 x EP64 x DP2), one
# 4K sequence per micro-batch, 15360 sequences per step (§4.2's final batch): for --dry_run accounting only
PRESETS["v3"] = dict(V3_ARGS, out_dir="out-v3", batch_size=1, seq_len=4096, grad_accum=120, fp8=True,
                     pp=16, ep=64, dp=2)
# DeepSeek-V3's exact per-layer widths (dim 7168, MLA: 128 heads, q/kv latents 1536/512, head dims 128+64/128;
# dense FFN 18432, experts 2048, 8 of them active per token in 4 of 8 groups, 1 shared expert, 1 MTP module) but
# 4 layers (1 dense + 3 MoE) and 16 routed experts, so that BF16 and FP8 training both fit one 141 GB H200:
# 3.51B total / 2.45B activated (+1.04B MTP, 0.69B activated), 8,192 tokens/step, eager. H200, 2026-12-02
# (bench/bench_fp8_train.py): BF16 432-438 ms/step, 93.5 GiB peak; --fp8=True 370-379 ms/step, 71.0 GiB. lr not tuned.
PRESETS["v3-width"] = dict(
    out_dir="out-v3-width", max_iters=300, eval_interval=100, eval_iters=10, log_interval=10, compile=False,
    vocab_size=8192, batch_size=8, seq_len=1024, lr=3e-4, min_lr=3e-5, warmup_iters=20,
    dim=7168, inter_dim=18432, moe_inter_dim=2048, n_layers=4, n_dense_layers=1, n_heads=128,
    n_routed_experts=16, n_shared_experts=1, n_activated_experts=8, n_expert_groups=8, n_limited_groups=4,
    route_scale=2.5, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128, max_seq_len=1024, original_seq_len=1024, n_mtp_depth=1, init_std=0.006)


def to_model_args(cfg: dict) -> ModelArgs:
    """The ModelArgs fields of a config (ModelArgs checks its own invariants: ValueError)."""
    return ModelArgs(**{k: cfg[k] for k in MODEL_DEFAULTS})


# -----------------------------------------------------------------------------
# the parser

class ConfigError(ValueError):
    """A bad command line; the message is one line meant for the user."""


def parse(argv: list[str], defaults: dict, presets: dict | None = None, default_preset: str | None = None) -> dict:
    """argv -> {key: value} for every key of `defaults`. With `presets`, --config NAME picks one (default:
    default_preset), whose values override the defaults; the command line overrides both. A preset may hold
    only keys of `defaults`. The chosen preset's name is returned as cfg['config']."""
    argv, preset, overrides = list(argv), default_preset, {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" and presets is not None:   # the two-word spelling: --config NAME
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a preset name: " + ", ".join(presets))
            preset, i = argv[i + 1], i + 2
            continue
        key, eq, raw = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not key:
            raise ConfigError(f"arguments look like --key=value, got {arg!r}")
        if key == "config" and presets is not None:
            preset = raw
        elif key not in defaults:
            close = difflib.get_close_matches(key, defaults, n=1)
            raise ConfigError(f"unknown option --{key}" + (f" (did you mean --{close[0]}?)" if close else ""))
        elif not eq:
            if type(defaults[key]) is not bool:
                raise ConfigError(f"--{key} needs a value, e.g. --{key}={defaults[key]!r}")
            overrides[key] = True     # a bare --flag switches a boolean on
        else:
            overrides[key] = cast(key, raw, defaults[key])
        i += 1
    cfg = dict(defaults)
    if presets is not None:
        if preset is not None and preset not in presets:
            raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(presets)}")
        cfg.update(presets.get(preset, {}))
        cfg["config"] = preset
    cfg.update(overrides)
    return cfg


def cast(key: str, raw: str, default):
    """A command-line string as a value of the default's type (None takes a string)."""
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw   # a bare word such as --device=cuda or --out_dir=out-x is a string
    want = type(default) if default is not None else str
    if want is float and type(value) is int:
        value = float(value)
    if type(value) is not want:
        raise ConfigError(f"--{key} must be {want.__name__}, got {raw!r}")
    return value


def parse_or_exit(prog: str, argv: list[str], defaults: dict, presets: dict | None = None,
                  default_preset: str | None = None) -> dict:
    try:
        return parse(argv, defaults, presets, default_preset)
    except ConfigError as e:
        die(prog, str(e))


def die(prog: str, msg: str, code: int = 2):
    print(f"{prog}: error: {msg}", file=sys.stderr)
    sys.exit(code)


# -----------------------------------------------------------------------------
# train.py's checks and LR schedule

POSITIVE = ("batch_size", "seq_len", "grad_accum", "max_iters", "eval_interval", "eval_iters", "log_interval",
            "lr", "grad_clip", "pp", "ep")
NON_NEGATIVE = ("sample_tokens", "warmup_iters", "min_lr", "weight_decay", "ckpt_interval", "patience", "dp",
                "time_budget")


def check_device(device: str) -> None:
    """--device of train.py and sample.py: auto, cpu, cuda or cuda:N, and only a CUDA device that exists."""
    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device={device} but CUDA is not available here (use --device=cpu)")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device={device} but there are only {torch.cuda.device_count()} CUDA devices")


def check_cpu_matmul(value: str) -> None:
    if value not in CPU_MATMUL:
        raise ConfigError(f"--cpu_matmul must be one of {', '.join(CPU_MATMUL)}, got {value!r}")


def setup_cpu(cpu_matmul: str = "ieee") -> None:
    """Process-wide CPU settings of train.py and the benchmarks (call before building the model).

    1. glibc malloc hands every freed block above its mmap threshold (at most 32 MiB) back to the kernel, so a
       vocabulary-wide tensor, (2048, 4096) fp32 = 32 MiB of logits, softmax or gradient, is mapped afresh and
       page-faulted page by page on every use: measured (one thread, 2026-12-02) a softmax over it 28 -> 9.6 ms, an
       elementwise multiply 16.5 -> 5.0 ms with freed memory kept in the process (mallopt below; the environment
       variables MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ do the same). Other C libraries: left alone.
    2. cpu_matmul='bf16': oneDNN float32 matmuls with bf16-rounded inputs and fp32 accumulation (see TRAIN_DEFAULTS);
       'head-bf16': only in the output head's GEMMs (HeadCrossEntropy)."""
    check_cpu_matmul(cpu_matmul)
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 1 << 30)   # M_MMAP_THRESHOLD: blocks below 1 GiB come from the heap, reused
            libc.mallopt(-1, 1 << 31)   # M_TRIM_THRESHOLD: keep up to 2 GiB of freed heap instead of returning it
        except (OSError, AttributeError):   # musl or no libc.so.6: nothing to tune
            pass
    if hasattr(torch.backends.mkldnn, "matmul"):   # torch >= 2.9
        torch.backends.mkldnn.matmul.fp32_precision = "bf16" if cpu_matmul == "bf16" else "ieee"
        HeadCrossEntropy.matmul_precision = "bf16" if cpu_matmul == "head-bf16" else "ieee"
    elif cpu_matmul != "ieee":
        raise ConfigError(f"--cpu_matmul={cpu_matmul} needs torch >= 2.9 (this is {torch.__version__})")


def check_train(cfg: dict) -> None:
    """A value of the right type can still be meaningless (a zero batch, a negative or infinite learning rate,
    a device that does not exist). Model fields are ModelArgs' own business (ModelArgs.__post_init__)."""
    for key in TRAIN_DEFAULTS:
        if isinstance(cfg[key], float) and not math.isfinite(cfg[key]):
            raise ConfigError(f"--{key} must be finite, got {cfg[key]}")
    check_device(cfg["device"])
    check_cpu_matmul(cfg["cpu_matmul"])
    if cfg["seq_len"] > cfg["max_seq_len"]:   # checked here, before minutes of data preparation
        raise ConfigError(f"seq_len={cfg['seq_len']} exceeds max_seq_len={cfg['max_seq_len']}")
    for key in POSITIVE:
        if not cfg[key] > 0:
            raise ConfigError(f"--{key} must be > 0, got {cfg[key]}")
    for key in NON_NEGATIVE:
        if not cfg[key] >= 0:
            raise ConfigError(f"--{key} must be >= 0, got {cfg[key]}")
    if not 0 <= cfg["decay_frac"] <= 1:
        raise ConfigError(f"--decay_frac must be in [0, 1], got {cfg['decay_frac']}")
    for key in ("beta1", "beta2"):
        if not 0 <= cfg[key] < 1:
            raise ConfigError(f"--{key} must be in [0, 1), got {cfg[key]}")


def lr_at(it: int, cfg: dict, horizon: int | None = None) -> float:
    """§4.2: linear warm-up, constant, then cosine decay to min_lr over the last decay_frac of training, which
    ends at step `horizon` (max_iters; under --time_budget the step the measured speed reaches, see below)."""
    horizon = cfg["max_iters"] if horizon is None else horizon
    if it < cfg["warmup_iters"]:
        return cfg["lr"] * (it + 1) / cfg["warmup_iters"]
    decay_start = int(horizon * (1 - cfg["decay_frac"]))
    if it < decay_start:
        return cfg["lr"]
    progress = min(1.0, (it - decay_start) / max(1, horizon - decay_start))
    return cfg["min_lr"] + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg["lr"] - cfg["min_lr"])


def budget_horizon(step: int, cfg: dict, sec_per_step: float, sec_left: float, sec_per_eval: float) -> int:
    """--time_budget: the step at which training must stop so that the evals still due (every eval_interval
    steps) and the final eval/sample/checkpoint fit in the sec_left seconds the budget has left, at the
    measured sec_per_step. Never before `step`, never past max_iters."""
    left = sec_left - sec_per_eval                               # the end of the run: one more eval, checkpoint
    # only the evals before max_iters are due: counting those of steps past it could leave no time for any step
    horizon = min(cfg["max_iters"], step + int(left / sec_per_step))
    evals_due = max(0, (horizon - 1) // cfg["eval_interval"] - step // cfg["eval_interval"])
    return min(cfg["max_iters"], step + max(0, int((left - evals_due * sec_per_eval) / sec_per_step)))
