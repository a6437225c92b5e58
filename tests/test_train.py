"""End-to-end tests of train.py as a user runs it: a subprocess per run, a tiny model, a temp out_dir."""
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import conftest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# conftest's tiny model on the command line, plus a small batch; constant LR after warm-up: resumable
TINY = [f"--{k}={v}" for k, v in {**conftest.TINY, "max_seq_len": 32, "original_seq_len": 32}.items()] + \
    ["--seq_len=32", "--batch_size=4", "--vocab_size=512", "--eval_iters=2", "--sample_tokens=8", "--decay_frac=0.0",
     "--warmup_iters=2", "--time_budget=0"]   # fixed step counts; test_time_budget_* sets its own


def run(*args, check=True):
    p = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if check:
        assert p.returncode == 0, p.stderr[-2000:]
    return p


def train_losses(out_dir):
    rows = [json.loads(l) for l in open(os.path.join(out_dir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_end_to_end_checkpoint_and_metrics(tmp_path):
    out = str(tmp_path / "out")
    p = run("--config", "small", *TINY, "--max_iters=7", "--eval_interval=3", f"--out_dir={out}")
    assert "params:" in p.stdout and "FLOPs/token" in p.stdout
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["step"] == 7 and ckpt["config"]["max_iters"] == 7 and ckpt["model_args"]["dim"] == 32
    assert {"model", "optimizer", "rng", "best_val"} <= set(ckpt)
    assert any(k.endswith("gate.bias") for k in ckpt["model"])   # router biases travel with the model
    assert os.path.exists(os.path.join(out, "tokenizer.tiktoken"))
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    evals = [r for r in rows if "val_bpb" in r]
    assert [r["step"] for r in evals] == [3, 6, 7]
    assert all(0 < r["val_bpb"] < 10 and r["val_loss"] > 0 for r in evals)
    assert sorted(train_losses(out)) == list(range(1, 8))
    # the router biases moved (aux-loss-free balancing ran after each step). Each step moves a bias by exactly
    # -γ, 0 or +γ, so an even number of steps can cancel to zero (6 did, after the CPU RoPE/attention changed the
    # rounding); 7 cannot unless some step was exactly balanced
    assert any(v.abs().sum() > 0 for k, v in ckpt["model"].items() if k.endswith("gate.bias"))


def test_best_checkpoint_and_early_stopping(tmp_path):
    # a corpus whose held-out tail shares nothing with the training text: the better the model fits the
    # training lines, the worse it does on the tail, so val loss is best at the first eval and then rises
    text = tmp_path / "split.txt"
    text.write_text("the cat sat on the mat.\n" * 900 + "QZXJ VKWP 0987 !?@#\n" * 80)
    out = str(tmp_path / "out")
    p = run("--config", "small", *TINY, "--max_iters=60", "--eval_interval=2", "--patience=2", "--eval_iters=2",
            "--batch_size=4", "--seq_len=32", "--lr=1e-2", f"--data={text}", f"--out_dir={out}")
    evals = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if "val_loss" in l]
    best = min(evals, key=lambda r: r["val_loss"])
    assert "stopping early" in p.stdout + p.stderr and evals[-1]["step"] < 60
    assert [r["step"] for r in evals if r["best"]][-1] == best["step"]
    assert evals[-1]["step"] == best["step"] + 2 * 2                      # patience 2 evals after the best
    saved = torch.load(os.path.join(out, "best.pt"), weights_only=True)
    assert saved["step"] == best["step"] and saved["val_loss"] == best["val_loss"] and "optimizer" not in saved
    last = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)   # the last state, for --resume
    assert last["step"] == evals[-1]["step"] and last["best_step"] == best["step"] and last["stale"] == 2
    assert all(r["time"] > 0 for r in evals)                              # wall time for the curve's x-axis


def test_interrupt_and_resume_gives_the_same_losses(tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    common = ["--config", "small", *TINY, "--max_iters=30", "--eval_interval=1000"]
    run(*common, f"--out_dir={full}")
    # interrupt a second run with Ctrl-C (SIGINT) part-way: it must save a checkpoint and exit 130
    proc = subprocess.Popen([sys.executable, "train.py", *common, f"--out_dir={part}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(part, "metrics.jsonl")
    t0 = time.time()
    while not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 3) and time.time() - t0 < 200:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, proc.stderr.read()
    stopped = torch.load(os.path.join(part, "ckpt.pt"), weights_only=True)["step"]
    assert 3 <= stopped < 30, f"interrupted at step {stopped}"
    run(*common, f"--out_dir={part}", "--resume=True")
    a, b = train_losses(full), train_losses(part)
    assert sorted(b) == list(range(1, 31))
    # same seed, same data position, same RNG: bit-identical losses before and after the interruption (CPU)
    assert all(a[s] == b[s] for s in range(1, 31)), [(s, a[s], b[s]) for s in range(1, 31) if a[s] != b[s]]


@pytest.mark.parametrize("args, message", [
    (["--config", "tiny"], "unknown preset"),
    (["--foo=1"], "unknown option --foo"),
    (["--dim=1.5"], "--dim must be int"),
    (["--lr=fast"], "--lr must be float"),
    (["max_iters=3"], "--key=value"),
    (["--n_expert_groups=3"], "divisible by n_expert_groups"),
    (["--data=/nonexistent/corpus.txt"], "not found"),
    (["--data={empty}"], "empty"),
    (["--data={short}"], "fewer than one batch"),
    (["--seq_len=256"], "exceeds max_seq_len"),
    (["--batch_size=0"], "--batch_size must be > 0"),
    (["--log_interval=0"], "--log_interval must be > 0"),
    (["--beta2=1.0"], "--beta2 must be in [0, 1)"),
    (["--device=foo"], "--device must be auto, cpu, cuda or cuda:N"),   # used to be a traceback at .to(device)
    (["--lr=1e999"], "--lr must be finite"),                           # used to train straight into NaN
    (["--data={short}", "--data_cache={short}/cache"], "cannot write the data cache"),
    (["--dp=2"], "= 2 ranks, but the world has 1"),          # layouts: product != world size,
    (["--ep=3"], "--ep=3 must divide n_routed_experts=8"),   # EP not dividing the experts,
    (["--pp=3"], "--pp=3 must be even"),                      # odd PP (DualPipe pairs ranks r and PP-1-r)
])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, args, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("To be, or not to be, that is the question.\n" * 30)
    out = tmp_path / "out"
    args = [a.format(empty=tmp_path / "empty.txt", short=tmp_path / "short.txt") for a in args]
    p = run(*args, f"--out_dir={out}", check=False)
    assert p.returncode == 2
    assert message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not out.exists()


def test_existing_checkpoint_is_never_overwritten(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"precious")
    p = run("--config", "small", *TINY, "--max_iters=2", f"--out_dir={out}", check=False)
    assert p.returncode == 2 and "--overwrite=True" in p.stderr
    assert (out / "ckpt.pt").read_bytes() == b"precious"
    p = run("--config", "small", *TINY, "--max_iters=2", f"--out_dir={tmp_path / 'none'}", "--resume=True", check=False)
    assert p.returncode == 2 and "no checkpoint" in p.stderr


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    out = str(tmp_path / "out")
    run("--config", "small", *TINY, "--max_iters=2", "--eval_interval=2", f"--out_dir={out}")
    # resume with an absurd learning rate: weights blow up to inf within a few steps
    p = run("--config", "small", *TINY, "--max_iters=10", "--eval_interval=1", "--lr=1e30", f"--out_dir={out}",
            "--resume=True", check=False)
    assert p.returncode == 1 and "non-finite loss at step" in p.stderr
    bad_step = int(re.search(r"at step (\d+)", p.stderr).group(1))
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] < bad_step


def test_data_parallel_two_ranks_on_cpu(tmp_path):
    # torchrun with the gloo backend: gradients are averaged and router loads summed across ranks, so both
    # ranks must end bit-identical (train.py checks and exits 1 otherwise)
    out = str(tmp_path / "out")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train.py", "--config", "small", *TINY, "--max_iters=4", "--eval_interval=4",
                        "--device=cpu", "--sample_tokens=0", f"--out_dir={out}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert "PP1 x DP2 x EP1 = 2 ranks: every replica in sync after 4 steps" in p.stdout
    assert "tokens/step: 256" in p.stdout   # 2 ranks x 4 x 32
    assert "val loss" in p.stdout and "--- sample ---" not in p.stdout   # --sample_tokens=0: evaluation, no sample
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] == 4


def test_fp8_training_with_grad_accumulation(tmp_path):
    # --fp8=True: FP8 Linears (emulated on CPU) and AdamW with BF16 moments (§3.3.3); the checkpoint keeps the
    # plain model's keys, so the FP8-trained weights load into an ordinary Transformer (sample.py does that)
    from model import ModelArgs, Transformer
    out = str(tmp_path / "out")
    run("--config", "small", *TINY, "--max_iters=3", "--eval_interval=3", "--grad_accum=2", "--fp8=True",
        f"--out_dir={out}")
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    plain = Transformer(ModelArgs(**ckpt["model_args"]))
    assert set(ckpt["model"]) == set(plain.state_dict())
    plain.load_state_dict(ckpt["model"])
    moments = [t for s in ckpt["optimizer"]["state"].values() for t in s.values() if torch.is_tensor(t) and t.dim()]
    assert moments and all(t.dtype == torch.bfloat16 for t in moments)
    assert sorted(train_losses(out)) == [1, 2, 3]


# ----------------------------------------------------------------------------- nothing a user does loses a checkpoint

@pytest.fixture(scope="module")
def QUICK(tmp_path_factory):
    """TINY on 20 KB of Macbeth: the same file every time, so its tokenizer is trained once and then cached
    (preparing the cached Shakespeare corpus still reads and hashes 5 MB: seconds per run on a busy machine)."""
    path = tmp_path_factory.mktemp("text") / "macbeth20k.txt"
    path.write_text(__import__("data").shakespeare_plays()["tragedies/macbeth.md"][:20_000])
    return ["--config", "small", *TINY, "--sample_tokens=0", f"--data={path}"]


def start(*args):
    """train.py in the background, returned once it has printed its start-up lines (the loop begins next)."""
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        if line.startswith("FLOPs/token"):
            return proc
    raise AssertionError(f"train.py exited early: {proc.wait()} {proc.stderr.read()}")


def snapshot(out):
    return {f: open(os.path.join(out, f), "rb").read() for f in ("ckpt.pt", "tokenizer.tiktoken", "metrics.jsonl")}


def test_interrupt_after_divergence_keeps_the_good_checkpoint(tmp_path, QUICK):
    # issue #11 case 1: Ctrl-C used to save whatever the weights were, NaN included, over the good checkpoint.
    # The model is all-dense (no MoE layer): its progress and eval lines used to crash on an empty expert load.
    out = str(tmp_path / "out")
    p = run(*QUICK, "--n_dense_layers=2", "--n_mtp_depth=0", "--max_iters=2", "--eval_interval=2", f"--out_dir={out}")
    assert "val loss" in p.stdout and "maxvio" not in p.stdout + p.stderr
    before = snapshot(out)
    # lr 1e30: weights ~1e31 after one update, NaN after the second; log_interval 1000: no loss check before Ctrl-C
    proc = start(*QUICK, "--n_dense_layers=2", "--n_mtp_depth=0", "--max_iters=2000", "--eval_interval=1000",
                 "--log_interval=1000", "--lr=1e30", "--warmup_iters=0", "--resume=True", f"--out_dir={out}")
    time.sleep(3.0)   # a tiny step takes 20-300 ms: many steps run before the Ctrl-C
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 1, err
    assert "not saved" in err and "is not finite" in err and "the last good checkpoint (step 2) is kept" in err, err
    assert snapshot(out) == before
    # a fresh run that diverges has no checkpoint to keep, and must not claim one
    p = run(*QUICK, "--max_iters=6", "--eval_interval=6", "--lr=1e30", "--warmup_iters=0",
            f"--out_dir={tmp_path / 'fresh'}", check=False)
    assert p.returncode == 1 and "non-finite loss at step" in p.stderr and "no checkpoint was written" in p.stderr


def test_resume_with_other_data_is_refused_and_overwrite_waits_for_its_first_checkpoint(tmp_path, QUICK):
    # issue #11 case 2: a different --data (same vocabulary size) used to resume silently with another tokenizer,
    # and an --overwrite run killed before its first checkpoint left the old ckpt.pt beside the new tokenizer
    (tmp_path / "b.txt").write_text(__import__("data").shakespeare_plays()["comedies/as-you-like-it.md"][:20_000])
    out = str(tmp_path / "out")
    run(*QUICK, "--max_iters=2", "--eval_interval=2", f"--out_dir={out}")   # on macbeth20k.txt
    before = snapshot(out)
    p = run(*QUICK, "--max_iters=4", f"--data={tmp_path / 'b.txt'}", "--resume=True", f"--out_dir={out}", check=False)
    assert p.returncode == 2 and "was trained on data macbeth20k-v512-" in p.stderr, p.stderr
    assert len(p.stderr.splitlines()) == 1 and snapshot(out) == before
    proc = start(*QUICK, "--max_iters=2000", "--eval_interval=1000", f"--data={tmp_path / 'b.txt'}",
                 "--overwrite=True", f"--out_dir={out}")
    time.sleep(1.0)
    proc.kill()   # kill -9 before the new run's first checkpoint
    proc.wait()
    assert snapshot(out) == before


def test_one_run_per_out_dir_a_killed_run_does_not_block_and_sigterm_saves(tmp_path, QUICK):
    # issue #11 case 3: two runs on one out_dir used to race (one crashed on ckpt.pt.tmp, one overwrote)
    out = str(tmp_path / "out")
    first = start(*QUICK, "--max_iters=2000", "--eval_interval=1000", f"--out_dir={out}")
    p = run(*QUICK, "--max_iters=2", "--eval_interval=2", "--overwrite=True", f"--out_dir={out}", check=False)
    assert p.returncode == 2 and f"is in use by another train.py (pid {first.pid} " in p.stderr, p.stderr
    assert len(p.stderr.splitlines()) == 1
    first.kill()   # kill -9: the lock file stays, the lock itself dies with the process
    first.wait()
    second = start(*QUICK, "--max_iters=2000", "--eval_interval=1000", f"--out_dir={out}")
    time.sleep(1.0)
    second.send_signal(signal.SIGTERM)   # a scheduler's kill saves like Ctrl-C
    err = second.communicate(timeout=120)[1]
    assert second.returncode == 130 and "interrupted: saved step" in err, err
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] >= 1
    assert sorted(os.listdir(out)) == ["ckpt.pt", "metrics.jsonl", "tokenizer.tiktoken"]   # lock released


def test_resume_errors_are_one_line_and_fp32_resumes_with_fp8(tmp_path, QUICK):
    out = tmp_path / "out"
    run(*QUICK, "--max_iters=2", "--eval_interval=2", f"--out_dir={out}")
    good = (out / "ckpt.pt").read_bytes()
    (out / "ckpt.pt").write_bytes(good[:len(good) // 2])   # truncated; random bytes and foreign dicts: test_checkpoint
    p = run(*QUICK, "--max_iters=3", "--resume=True", f"--out_dir={out}", check=False)
    assert p.returncode == 2 and "cannot load checkpoint" in p.stderr and len(p.stderr.splitlines()) == 1, p.stderr
    (out / "ckpt.pt").write_bytes(good)
    (out / "ckpt.pt.tmp").write_bytes(b"half a checkpoint: a disk filled up or a kill -9 while saving")
    run(*QUICK, "--max_iters=3", "--eval_interval=3", "--fp8=True", "--resume=True", f"--out_dir={out}")
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 3 and not (out / "ckpt.pt.tmp").exists()


@pytest.mark.parametrize("out_dir, message", [   # more cases (empty, unwritable) in test_checkpoint.py
    ("{file}/sub", "is a file, not a folder"),
    ("~/x", "no checkpoint at {home}/x/ckpt.pt"),   # '~' is expanded, not a folder named '~'
])
def test_bad_out_dir_one_line_exit_2(tmp_path, QUICK, out_dir, message):
    (tmp_path / "file").write_text("x")
    home = tmp_path / "home"
    home.mkdir()
    p = subprocess.run([sys.executable, "train.py", *QUICK, "--resume=True", "--out_dir=" + out_dir.format(
        file=tmp_path / "file")], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HOME": str(home)})
    assert p.returncode == 2 and message.format(home=home) in p.stderr and len(p.stderr.splitlines()) == 1, p.stderr
    assert os.listdir(home) == [] and not os.path.exists(os.path.join(ROOT, "~"))


def test_ctrl_c_while_preparing_data_is_one_line_and_leaves_nothing(tmp_path, QUICK):
    # text without spaces trains its tokenizer slowly enough to interrupt; --data_cache moves the cache
    rng = __import__("random").Random(0)
    lines = ["".join(rng.choice("abcdefghij") for _ in range(10_000)) for _ in range(20)]   # 10 KB lines
    (tmp_path / "t.txt").write_text("\n".join(lines) + "\n")
    err = open(tmp_path / "err", "w+")
    proc = subprocess.Popen([sys.executable, "train.py", *QUICK, f"--data={tmp_path / 't.txt'}", "--vocab_size=4096",
                             f"--data_cache={tmp_path / 'cache'}", f"--out_dir={tmp_path / 'out'}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=err)
    t0 = time.time()
    while "training the tokenizer" not in (tmp_path / "err").read_text() and time.time() - t0 < 120:
        assert proc.poll() is None, (tmp_path / "err").read_text()
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    last = (tmp_path / "err").read_text().strip().splitlines()[-1]
    assert last.endswith("train.py: error: interrupted while preparing the data; nothing was written"), last
    assert os.listdir(tmp_path / "cache") == [] and not (tmp_path / "out").exists()


def torchrun(*args, nproc=2):
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                        "train.py", "--config", "small", *TINY, "--device=cpu", "--sample_tokens=0", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_expert_parallel_run_saves_and_resumes_exactly(tmp_path):
    # 2 ranks, EP=2: each rank holds half the routed experts (a shard file each), ZeRO-1 shards the dense
    # optimizer state; 3 steps, save, resume to 6 == 6 steps straight, bit for bit (CPU, same layout)
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    torchrun("--ep=2", "--max_iters=6", "--eval_interval=6", f"--out_dir={full}")
    p = torchrun("--ep=2", "--max_iters=3", "--eval_interval=3", f"--out_dir={part}")
    assert "PP1 x DP1 x EP2 = 2 ranks: every replica in sync after 3 steps" in p.stdout
    assert sorted(os.listdir(part)) == ["ckpt-pp0-ep1.pt", "ckpt.pt", "metrics.jsonl", "tokenizer.tiktoken"]
    shards = [torch.load(os.path.join(part, f), weights_only=True) for f in ("ckpt.pt", "ckpt-pp0-ep1.pt")]
    experts = [{k for k in c["model"] if ".experts." in k} for c in shards]
    assert experts[0] and len(experts[0]) == len(experts[1])   # each shard: its 2 of the 4 experts per layer
    from model import ModelArgs, Transformer
    from parallel import consolidate
    Transformer(ModelArgs(**shards[0]["model_args"])).load_state_dict(consolidate(part))   # all keys, right shapes
    torchrun("--ep=2", "--max_iters=6", "--eval_interval=6", f"--out_dir={part}", "--resume=True")
    a, b = train_losses(full), train_losses(part)
    assert sorted(b) == list(range(1, 7)) and all(a[s] == b[s] for s in range(1, 7)), (a, b)
    # a layout that cannot load these shards: one line, exit 2, nothing touched
    before = open(os.path.join(part, "ckpt.pt"), "rb").read()
    p = run("--config", "small", *TINY, "--max_iters=8", f"--out_dir={part}", "--resume=True", check=False)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "was saved under PP1 x DP1 x EP2 = 2 ranks" in p.stderr
    assert open(os.path.join(part, "ckpt.pt"), "rb").read() == before


def test_dry_run_needs_no_ranks_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    p = run("--config", "small", *TINY, "--dry_run=True", "--pp=2", "--ep=2", "--dp=2", "--grad_accum=4",
            f"--out_dir={out}")
    assert "dry run: PP2 x DP2 x EP2 = 8 ranks" in p.stdout and "EP all-to-all" in p.stdout
    assert len([l for l in p.stdout.splitlines() if l.split()[:1] in (["0"], ["1"])]) == 4   # 2 tables x 2 ranks
    assert not out.exists()


def test_time_budget_fits_the_schedule_to_the_clock(tmp_path):
    # --time_budget: the run stops by itself (max_iters only caps it), its LR schedule has decayed to min_lr by
    # the last step (the horizon followed the measured step time), the final eval and checkpoint are at that
    # step, and launch -> last checkpoint fits the budget. The budget is twice what a 10-step run takes here,
    # launch to exit, so the test means the same on a fast and on a loaded machine: more than 10 steps must fit.
    t0 = time.time()
    run("--config", "small", *TINY, "--max_iters=10", "--eval_interval=10", f"--out_dir={tmp_path / 'ten'}")
    budget = round(2 * (time.time() - t0)) + 1
    out = str(tmp_path / "out")
    p = run("--config", "small", *TINY, f"--time_budget={budget}", "--max_iters=1000000", "--eval_interval=1000000",
            "--decay_frac=0.5", "--lr=1e-3", "--min_lr=1e-4", f"--out_dir={out}")
    assert f"time budget {budget} s" in p.stdout
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    steps = [r for r in rows if "loss" in r]
    last = steps[-1]["step"]
    assert 10 < last < 1000000, last
    assert [r["step"] for r in rows if "val_bpb" in r] == [last]
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] == last
    assert rows[-1]["elapsed"] <= budget * 1.1, (rows[-1]["elapsed"], budget)
    lrs = [r["lr"] for r in steps]
    assert lrs[-1] < 1e-4 + 0.1 * (1e-3 - 1e-4), lrs[-5:]           # the decay reached its end ...
    assert max(lrs) == 1e-3 and lrs.index(1e-3) < last // 2        # ... after a constant phase at the peak


def test_plot_curve_draws_every_eval(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import plot_curve
    import xml.etree.ElementTree as ET
    rows = [dict(step=s, loss=1.0, time=s / 10) for s in range(1, 40)]
    rows += [dict(step=s, val_bpb=b, val_loss=b, time=s / 10 + 1) for s, b in ((10, 2.5), (20, 2.1), (30, 2.2))]
    src, dst = tmp_path / "m.jsonl", tmp_path / "c.svg"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    plot_curve.main([str(src), str(dst)])
    dots = [e for e in ET.parse(dst).iter() if e.tag.endswith("circle")]
    assert len(dots) == 2 * 3 and sum(d.get("fill") == "#d62728" for d in dots) == 2   # best marked in both panels
    assert "best 2.1000 at step 20" in dst.read_text()


def test_profile_step_attributes_the_whole_step():
    # bench/profile_step.py on the tiny model: every part of a V3 step gets its own row, and the rows (ops plus the
    # time between them) add up to the profiled step's wall time, so no part of the step goes unreported
    p = subprocess.run([sys.executable, "bench/profile_step.py", "--config", "small", *TINY, "--threads=1",
                        "--steps=2", "--warmup=1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = {l.split(" | ")[0].strip("| *"): l.split(" | ") for l in p.stdout.splitlines() if l.startswith("| ")}
    for part in ("attention (MLA)", "router", "dispatch/combine", "expert MLPs", "head + loss", "MTP", "optimizer"):
        assert float(rows[part][4]) > 0, part
    parts = [float(r[4]) for name, r in rows.items() if name not in ("part", "---", "step")]
    assert abs(sum(parts) - float(rows["step"][4])) < 0.02 * float(rows["step"][4]) + 0.5, (sum(parts), rows["step"])


def test_ab_step_times_both_sides_and_refuses_bad_settings():
    # bench/ab_step.py on the tiny model: both sides time their steps (reference vs fused head and norm, ieee vs bf16
    # matmuls) and the ratio is theirs; an unknown setting value is one line and exit 2
    cmd = [sys.executable, "bench/ab_step.py", "--config", "small", *TINY, "--steps=2", "--warmup=1"]
    p = subprocess.run([*cmd, "--a=head=reference,norm=reference,threads=1,cpu_matmul=ieee",
                        "--b=threads=1,cpu_matmul=bf16"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    ms = [float(l.split("median ")[1].split(" ms")[0]) for l in p.stdout.splitlines() if l.startswith(("A [", "B ["))]
    ratio = float(p.stdout.split("B/A = ")[1].split(";")[0])
    assert len(ms) == 2 and min(ms) > 0 and abs(ratio - ms[1] / ms[0]) < 0.01 * ratio, p.stdout   # printed rounded
    bad = subprocess.run([*cmd, "--a=malloc=huge"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("ab_step.py: error: malloc"), bad.stderr


def test_sweep_runs_side_by_side_and_tabulates_their_evals(tmp_path, capsys):
    # bench/sweep.py: two train.py processes at once; the table's best and final val bpb are each run's own evals
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import sweep
    out = tmp_path / "sw"
    common = " ".join(TINY) + " --max_iters=4 --eval_interval=2 --device=cpu"
    assert sweep.main(["--config=small", "--seconds=280", f"--out={out}", f"--common={common}",
                       "--run=--dropout=0.0", "--run=--dropout=0.5 --lr=0.01"]) == 0
    table = capsys.readouterr().out
    bests = []
    for i in range(2):
        evals = [json.loads(l) for l in open(out / f"run{i}" / "metrics.jsonl") if "val_bpb" in l]
        assert [e["step"] for e in evals] == [2, 4]
        best = min(evals, key=lambda e: e["val_bpb"])
        row = next(l for l in table.splitlines() if l.startswith(f"| run{i} |"))
        assert f"{best['val_bpb']:.4f} ({best['step']})" in row and f"{evals[-1]['val_bpb']:.4f} (4)" in row
        assert row.endswith("| exit 0 |")
        bests.append(best["val_bpb"])
    assert bests[0] != bests[1]                                   # two different configurations really ran
    assert not any((out / f"run{i}" / f).exists() for i in range(2) for f in ("ckpt.pt", "best.pt"))  # --save=False
    assert json.load(open(out / "summary.json"))["runs"][1]["overrides"] == "--dropout=0.5 --lr=0.01"


def test_sweep_checks_every_run_before_starting_any(tmp_path):
    p = subprocess.run([sys.executable, "bench/sweep.py", "--config=small", f"--out={tmp_path / 'sw'}",
                        "--run=--dropout=0.1", "--run=--dropuot=0.2"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "unknown option --dropuot" in p.stderr, p.stderr
    assert not (tmp_path / "sw").exists()


def test_bench_fp8_train_scores_every_model_on_the_same_held_out_batches():
    # bench_fp8_train.evaluate: the CE of eval_iters batches of the data it is given, drawn by one fixed generator
    # (the same for every run and seed) in eval mode (no dropout, so two calls agree exactly), then back to train
    # mode; other data gives another score
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import bench_fp8_train
    import data
    from model import Transformer
    torch.manual_seed(0)
    model = Transformer(conftest.tiny_args(dropout=0.5)).train()
    val = torch.randint(0, 64, (500,), generator=torch.Generator().manual_seed(3)).numpy()
    cfg = dict(eval_iters=3, batch_size=2, seq_len=16)
    score = bench_fp8_train.evaluate(model, val, cfg, "cpu", contextlib.nullcontext())
    assert model.training and score == bench_fp8_train.evaluate(model, val, cfg, "cpu", contextlib.nullcontext())
    gen, want = torch.Generator().manual_seed(7), []
    model.eval()
    with torch.no_grad():
        for _ in range(3):
            x, y = data.get_batch(val, 2, 16, gen)
            want.append(model(x, y)[1]["ce"])
    assert abs(score - torch.stack(want).mean().item()) < 1e-6 * score
    other = torch.randint(0, 64, (500,), generator=torch.Generator().manual_seed(4)).numpy()
    assert bench_fp8_train.evaluate(model.train(), other, cfg, "cpu", contextlib.nullcontext()) != score


def test_bench_fp8_train_repeats_runs_over_seeds_and_summarizes_the_gaps():
    # bench/bench_fp8_train.py --seeds=2: every run once per seed, and the summary's signed gaps are each FP8 run's
    # loss against the BF16 run of its own seed (the table's numbers), so one unlucky pair cannot decide the verdict
    p = subprocess.run([sys.executable, "bench/bench_fp8_train.py", "--config=small", "--device=cpu", *TINY,
                        "--steps=3", "--seeds=2", "--runs=bf16,fp8-adamw", "--compile=False"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [l.split(" | ") for l in p.stdout.splitlines() if l.startswith(("| bf16 |", "| fp8-adamw |"))]
    main, host = [r for r in rows if len(r) == 12], [r for r in rows if len(r) == 9]  # the two tables
    loss = {(r[0].strip("| "), int(r[1])): float(r[8]) for r in main}
    val = {(r[0].strip("| "), int(r[1])): float(r[10]) for r in main}  # held-out CE of each trained model
    # the host's time per phase: on a CPU nothing runs behind the host, so the phases add up to the step
    assert len(host) == 4 and all(abs(sum(map(float, r[2:8])) - float(r[8].strip(" |"))) < 0.05 * float(r[8].strip(" |"))
                                  for r in host), host
    assert sorted(loss) == [("bf16", 1337), ("bf16", 1338), ("fp8-adamw", 1337), ("fp8-adamw", 1338)]
    assert loss["bf16", 1337] != loss["bf16", 1338]  # the seed really changes the run
    assert val["bf16", 1337] != val["bf16", 1338] and all(2 < v < 9 for v in val.values()), val  # ln(512) = 6.2
    for what, score in (("training loss", loss), ("val loss", val)):
        line = next(l for l in p.stdout.splitlines() if l.startswith(f"{what}: fp8-adamw vs BF16 of the same seed:"))
        gaps = [float(g.strip(" %")) for g in line.split("seed:")[1].split(";")[0].split(",")]
        want = [100 * (score["fp8-adamw", s] - score["bf16", s]) / score["bf16", s] for s in (1337, 1338)]
        assert all(abs(g - w) < 0.01 for g, w in zip(gaps, want)), (what, gaps, want)
    bad = subprocess.run([sys.executable, "bench/bench_fp8_train.py", "--config=small", "--device=cpu", "--seeds=0"], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--seeds must be >= 1" in bad.stderr
