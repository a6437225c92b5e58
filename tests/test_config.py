"""Tests for config.py: the one command-line parser of every entry point, the presets, the LR schedule."""
import math
import os
import subprocess
import sys

import pytest
import torch

import config
from config import MODEL_DEFAULTS, PRESETS, TRAIN_DEFAULTS, ConfigError, budget_horizon, lr_at, parse

DEFAULTS = dict(n=3, lr=0.5, name="x", path=None, flag=False, sizes=(1, 2))
TRAIN = {**TRAIN_DEFAULTS, **MODEL_DEFAULTS}


def test_values_are_literals_of_the_defaults_type():
    cfg = parse(["--n=7", "--lr=2", "--name=out-x", "--path=/tmp/a b", "--flag=True", "--sizes=(3, 4)"], DEFAULTS)
    assert cfg == dict(n=7, lr=2.0, name="out-x", path="/tmp/a b", flag=True, sizes=(3, 4))
    assert type(cfg["lr"]) is float                      # an int is accepted for a float, and becomes one
    assert parse([], DEFAULTS) == DEFAULTS and parse([], DEFAULTS) is not DEFAULTS
    assert parse(["--flag"], DEFAULTS)["flag"] is True   # a bare --flag switches a bool on (dualpipe's --exec)
    assert parse(["--name="], DEFAULTS)["name"] == ""     # an empty string (dualpipe's --svg= turns the SVG off)
    assert parse(["--name='3'"], DEFAULTS)["name"] == "3"  # a quoted literal stays a string


@pytest.mark.parametrize("argv, message", [
    (["--bogus=1"], "unknown option --bogus"),
    (["--nn=1"], "unknown option --nn (did you mean --n?)"),
    (["--n=1.5"], "--n must be int, got '1.5'"),
    (["--n=True"], "--n must be int"),                    # bool is not int here, though Python says it is
    (["--lr=fast"], "--lr must be float, got 'fast'"),
    (["--flag=1"], "--flag must be bool"),
    (["--path=3"], "--path must be str"),                 # a None default takes a string, and only a string
    (["--n"], "--n needs a value, e.g. --n=3"),
    (["n=3"], "arguments look like --key=value, got 'n=3'"),
    (["--config", "small"], "unknown option --config"),   # no presets for this entry point
])
def test_bad_arguments_raise_one_line(argv, message):
    with pytest.raises(ConfigError) as e:
        parse(argv, DEFAULTS)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_presets_both_spellings_and_precedence():
    for argv in (["--config", "gpu"], ["--config=gpu"], ["--dim=8", "--config", "gpu", "--dim=64"]):
        cfg = parse(argv, TRAIN, PRESETS, default_preset="small")
        assert cfg["config"] == "gpu" and cfg["n_layers"] == PRESETS["gpu"]["n_layers"]
    assert cfg["dim"] == 64                               # the command line beats the preset, wherever it stands
    cfg = parse([], TRAIN, PRESETS, default_preset="small")
    assert cfg["config"] == "small" and cfg["dim"] == PRESETS["small"]["dim"]
    assert cfg["weight_decay"] == TRAIN_DEFAULTS["weight_decay"]   # not in the preset: the default
    with pytest.raises(ConfigError, match="unknown preset 'tiny'; choose one of: small, gpu, multi-gpu"):
        parse(["--config", "tiny"], TRAIN, PRESETS)
    with pytest.raises(ConfigError, match="--config needs a preset name"):
        parse(["--config"], TRAIN, PRESETS)


def test_every_preset_is_a_valid_config():
    for name, preset in PRESETS.items():
        assert set(preset) <= set(TRAIN), f"preset {name} has unknown keys {set(preset) - set(TRAIN)}"
        cfg = parse([], TRAIN, PRESETS, default_preset=name)
        config.check_train(cfg)
        config.to_model_args(cfg)                         # ModelArgs checks its invariants


def test_meaningless_values_are_rejected():
    cfg = parse([], TRAIN, PRESETS, default_preset="small")
    for key, bad, message in (("batch_size", 0, "--batch_size must be > 0"),
                              ("min_lr", -1e-3, "--min_lr must be >= 0"),
                              ("decay_frac", 1.5, "--decay_frac must be in [0, 1]"),
                              ("beta2", 1.0, "--beta2 must be in [0, 1)"),
                              # these passed the checks, then crashed (device) or trained into NaN (lr)
                              ("lr", float("inf"), "--lr must be finite"),
                              ("grad_clip", float("nan"), "--grad_clip must be finite"),
                              ("device", "foo", "--device must be auto, cpu, cuda or cuda:N, got 'foo'"),
                              ("device", "meta", "--device must be auto, cpu, cuda or cuda:N")):
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
            config.check_train({**cfg, key: bad})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_cuda_is_rejected():
    with pytest.raises(ConfigError, match="CUDA is not available"):
        config.check_device("cuda:0")


def test_parse_or_exit_prints_one_line_and_exits_2():
    code = "import config; config.parse_or_exit('prog.py', ['--nope=1'], dict(yes=1))"
    root = os.path.dirname(os.path.abspath(config.__file__))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert p.returncode == 2 and p.stderr == "prog.py: error: unknown option --nope\n" and p.stdout == ""


# --- the LR schedule (§4.2): warm-up, constant, cosine decay over the last decay_frac ---------------------------

def test_lr_schedule_shape():
    cfg = dict(lr=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=100, decay_frac=0.4)
    lrs = [lr_at(it, cfg) for it in range(101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)   # linear warm-up, (it+1)/warmup
    assert all(b > a for a, b in zip(lrs[:9], lrs[1:10]))
    assert all(v == 1e-3 for v in lrs[10:61])                                # constant until 60% of the run
    assert lrs[80] == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * 0.5)) * 9e-4)   # cosine half-way
    assert all(b < a for a, b in zip(lrs[60:100], lrs[61:101]))              # strictly decaying
    assert lrs[100] == pytest.approx(1e-4) and lr_at(500, cfg) == pytest.approx(1e-4)   # then held at min_lr


def test_lr_schedule_edges():
    base = dict(lr=2.0, min_lr=0.5, max_iters=10)
    # train.py asks for it = 0..max_iters-1
    assert [lr_at(i, dict(base, warmup_iters=0, decay_frac=0.0)) for i in range(10)] == [2.0] * 10  # no decay
    full = [lr_at(i, dict(base, warmup_iters=0, decay_frac=1.0)) for i in range(11)]
    assert full[0] == 2.0 and full[10] == pytest.approx(0.5) and full == sorted(full, reverse=True)
    # warm-up longer than the run: still linear, never above lr
    assert [lr_at(i, dict(base, warmup_iters=20, decay_frac=0.4)) for i in (0, 9)] == [0.1, 1.0]


def test_lr_schedule_follows_a_horizon():
    # --time_budget: the same shape, stretched to end at `horizon` instead of max_iters (which it must ignore)
    cfg = dict(lr=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=100, decay_frac=0.4)
    assert [lr_at(it, cfg, horizon=250) for it in range(251)] == \
        [lr_at(it, dict(cfg, max_iters=250)) for it in range(251)]
    assert lr_at(149, cfg, horizon=250) == 1e-3 and lr_at(249, cfg, horizon=250) < 1.1e-4


def test_budget_horizon_counts_the_evals_still_due_and_the_end():
    cfg = dict(eval_interval=100, max_iters=10**6)
    # 50 s left at 0.1 s/step with a 2 s end: 480 steps; evals at 100..400 (4 of them, 2 s each) cost 80 more
    assert budget_horizon(0, cfg, sec_per_step=0.1, sec_left=50.0, sec_per_eval=2.0) == 400
    assert budget_horizon(0, dict(cfg, eval_interval=10**6), 0.1, 50.0, 2.0) == 480     # no eval on the way
    assert budget_horizon(0, dict(cfg, max_iters=300), 0.1, 50.0, 2.0) == 300           # max_iters caps it
    assert budget_horizon(123, cfg, 0.1, 1.0, 2.0) == 123                               # late: stop now
    # time for many more steps than max_iters: the evals past max_iters are not due (the gpu preset on an H200:
    # 45 ms steps, 3.2 s evals, 111 s left at step 20 once stopped the run there, counting 49 evals instead of 19)
    assert budget_horizon(20, dict(cfg, max_iters=1000, eval_interval=50), 0.045, 111.0, 3.2) == 1000
