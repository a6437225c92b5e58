"""Tests for dualpipe.py (schedules, the simulator against Table 2, the overlap model, both executors) and
dualpipe_demo.py (its table, picture and command line).

Run: python -m pytest tests/test_dualpipe.py   (~25 s on 2 CPU cores, 17 s of it the two torchrun launches)
"""
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import dualpipe as dp
import dualpipe_demo as demo
from dualpipe_harness import check_against_reference, tiny_setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = [(2, 4), (2, 8), (4, 8), (4, 10), (4, 16), (6, 12), (6, 18), (8, 16), (8, 20), (8, 30), (8, 40), (10, 20),
         (16, 32), (16, 50)]
# costs where Table 2 is exact (B - W = F and W <= F, zero p2p latency; dualpipe.py's docstring); F&B may be < F + B
EXACT = [dp.Costs(1, 2, 1, 3), dp.Costs(1, 2, 1, 2.5), dp.Costs(2, 3, 1, 5), dp.Costs(2, 3, 1, 4),
         dp.Costs(1.5, 3, 1.5, 4.5)]


# ----------------------------------------------------------------------------- schedules

@pytest.mark.parametrize("name", list(dp.SCHEDULES))
@pytest.mark.parametrize("pp,nmb", SIZES)
def test_every_microbatch_runs_once_in_a_valid_order(name, pp, nmb):
    dirs = (0, 1) if name == "dualpipe" else (0,)
    for r, ops in enumerate(dp.SCHEDULES[name](pp, nmb)):
        seen = {"F": [], "B": [], "W": []}   # B collects every backward (B, BW, the BW half of FB)
        for op in ops:
            for o in op.halves():
                k = "B" if o.kind in ("B", "BW") else o.kind
                if k == "B":
                    assert (o.d, o.mb) in seen["F"], f"rank {r}: backward of {o} before its forward"
                if k == "W":
                    assert (o.d, o.mb) in seen["B"], f"rank {r}: W of {o} before its B"
                seen[k].append((o.d, o.mb))
        per_dir = nmb // len(dirs)
        everything = sorted((d, m) for d in dirs for m in range(per_dir))
        assert sorted(seen["F"]) == everything and sorted(seen["B"]) == everything
        split = sorted((o.d, o.mb) for o in ops if o.kind == "B")
        assert sorted(seen["W"]) == split, f"rank {r}: every split B needs exactly one W"
        stages = {dp.stage_of(pp, r, o.d) for op in ops for o in op.halves()}
        assert stages == ({r, pp - 1 - r} if name == "dualpipe" else {r})


@pytest.mark.parametrize("pp,nmb", [(2, 4), (4, 8), (8, 20), (8, 26), (10, 40)])
def test_dualpipe_phase_counts_match_the_official_step(pp, nmb):
    # op counts per rank implied by the official 8 phases (h = distance to the nearer end of the pipeline):
    # W's: step 3 + step 7 + step 8; FB pairs: 2 * step 4 (minus the un-overlapped first pair of the middle
    # ranks) + step 5; split B's = W's; the first ops are step 1's near-direction forwards.
    half = pp // 2
    for r, ops in enumerate(dp.schedule_dualpipe(pp, nmb)):
        h, near = min(r, pp - 1 - r), int(r >= half)
        step4, step5 = nmb // 2 - pp + h + 1, half - h - 1
        kinds = [op.kind for op in ops]
        assert kinds.count("W") == kinds.count("B") == (half - h - 1) * 2 + h + 1
        assert kinds.count("FB") == 2 * step4 - (h == half - 1) + step5
        warm = 2 * (half - h - 1) + 1
        assert ops[:warm] == [dp.Op("F", near, i) for i in range(warm)]
        assert all(k == "W" for k in kinds[-(h + 1):]), "step 8 ends every rank with h+1 W's"


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="even"):
        dp.schedule_dualpipe(5, 20)
    with pytest.raises(ValueError, match="2\\*PP"):
        dp.schedule_dualpipe(8, 14)
    with pytest.raises(ValueError, match="even number"):
        dp.schedule_dualpipe(4, 9)
    broken = dp.schedule_1f1b(4, 8)
    broken[1] = broken[1][1:] + broken[1][:1]   # rank 1 starts with mb 1: it needs mb 0's gradient first
    with pytest.raises(RuntimeError, match="deadlock"):
        dp.simulate(broken)


# ----------------------------------------------------------------------------- simulator vs Table 2

@pytest.mark.parametrize("c", EXACT, ids=lambda c: f"F{c.F}B{c.B}W{c.W}FB{c.FB}")
@pytest.mark.parametrize("pp,nmb", SIZES)
def test_bubble_params_activations_match_table2(c, pp, nmb):
    for name, build in dp.SCHEDULES.items():
        tl = dp.simulate(build(pp, nmb), c)
        bubble, params, act = dp.table2(name, pp, c)
        assert max(tl.bubble) == pytest.approx(bubble, abs=1e-9), (name, tl.bubble)
        assert max(tl.params) == params and max(tl.peak_act) == act, (name, tl.params, tl.peak_act)


def test_deviations_at_other_costs():
    # 1F1B's formula holds for any costs; ZB1P follows (PP-1)*max(F+B-2W, F, B-W); Table 2's
    # formulas themselves miss when B - W != F or W > F (reported by `python dualpipe_demo.py --B=...`).
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        F, W, extra = (float(v) for v in torch.randint(1, 9, (3,), generator=g) / 4)
        c = dp.Costs(F, W + extra, W, F + W + extra)
        pp = int(torch.randint(1, 5, (1,), generator=g)) * 2
        nmb = 2 * pp + 2 * int(torch.randint(0, 4, (1,), generator=g))
        assert max(dp.simulate(dp.schedule_1f1b(pp, nmb), c).bubble) == pytest.approx((pp - 1) * (c.F + c.B))
        assert max(dp.simulate(dp.schedule_zb1p(pp, nmb), c).bubble) == pytest.approx(
            (pp - 1) * max(c.F + c.B - 2 * c.W, c.F, c.B - c.W))
    c = dp.Costs(1, 1.5, 1, 2.5)     # W = F but B - W < F: both zero-bubble formulas are too optimistic
    assert max(dp.simulate(dp.schedule_zb1p(8, 20), c).bubble) > dp.table2("zb1p", 8, c)[0]
    assert max(dp.simulate(dp.schedule_dualpipe(8, 20), c).bubble) > dp.table2("dualpipe", 8, c)[0]


@pytest.mark.parametrize("pp", [4, 8])
def test_dualpipe_bubble_does_not_grow_with_microbatches(pp):
    for c in (dp.Costs(), dp.Costs(1, 2.5, 1, 3.5)):
        bubbles = {max(dp.simulate(dp.schedule_dualpipe(pp, n), c).bubble) for n in range(2 * pp, 6 * pp + 1, 2)}
        assert len(bubbles) == 1, bubbles


# ----------------------------------------------------------------------------- overlap model

def test_overlap_hides_all_to_all():
    c = dp.Costs(a2a=0.5)                                  # each all-to-all = half a forward chunk
    serial, overlapped = dp.pair_time(c, False)[0], dp.pair_time(c, True)[0]
    assert serial == pytest.approx(c.FB + 4 * c.a2a)     # 8 pieces one after another
    assert overlapped == pytest.approx(c.FB)              # every a2a hides behind the other chunk's compute
    big = dp.Costs(a2a=2.0)                                # communication-bound: only part can hide
    assert big.FB < dp.pair_time(big, True)[0] < dp.pair_time(big, False)[0]
    for overlap in (False, True):                          # each stream runs one piece at a time
        pieces = sorted(dp.pair_time(big, overlap)[1], key=lambda p: (p[0], p[3]))
        assert all(a[0] != b[0] or a[4] <= b[3] + 1e-12 for a, b in zip(pieces, pieces[1:]))
    on = dp.simulate(dp.schedule_dualpipe(8, 20), c)
    off = dp.simulate(dp.schedule_dualpipe(8, 20), dp.Costs(a2a=0.5, overlap=False))
    assert on.makespan < off.makespan


# ----------------------------------------------------------------------------- executors

GEMMS = (torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default) + \
    ((torch.ops.aten._grouped_mm.default,) if hasattr(torch.ops.aten, "_grouped_mm") else ())   # MoE fast path


class CountGemms(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in GEMMS:
            self.n += 1
            self.flops += 2 * args[-2].numel() * args[-1].shape[-1]   # (M, K) @ (K, N) or (E, K, N) grouped
        return func(*args, **(kwargs or {}))


def test_b_then_w_equals_full_backward_without_recomputation(one_thread):
    model, tokens, targets = tiny_setup(2, 2)

    def last_stage_after_forward(mb):
        ws = dp.make_workers("zb1p", model, 2, [0, 1], tokens, targets)
        ws[0].forward(0, mb)
        ws[1].inbox[("act", 0, mb)] = ws[0].outbox.pop(("act", 0, mb))
        ws[1].forward(0, mb)
        return ws[1]

    full, split = last_stage_after_forward(0), last_stage_after_forward(0)
    with CountGemms() as c_bw:
        full.backward(0, 0, split=False)
    with CountGemms() as c_b:
        split.backward(0, 0, split=True)
    st = split.stages[0]
    waiting = [n for n, m in st.named_modules() if isinstance(m, nn.Linear) and m.weight.grad is not None]
    assert not waiting and st.norm.weight.grad is not None, waiting   # every Linear's dW (experts too) waits for W
    assert torch.equal(split.outbox[("grad", 0, 0)], full.outbox[("grad", 0, 0)])
    with CountGemms() as c_w:
        split.backward_weight(0, 0)
    assert (c_b.n + c_w.n, c_b.flops + c_w.flops) == (c_bw.n, c_bw.flops)     # the same GEMMs, none twice
    assert c_w.flops > 0.3 * c_bw.flops                                      # W really holds the dW GEMMs
    for (n, p), q in zip(full.stages[0].named_parameters(), st.parameters()):
        # fp32, one micro-batch: same products summed in another order at most -> within a few ulps
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("name,pp,nmb", [("dualpipe", 2, 4)] + [(n, 4, 8) for n in dp.SCHEDULES])
def test_virtual_ranks_equal_sequential_training(name, pp, nmb, one_thread):
    model, tokens, targets = tiny_setup(pp, nmb, seed=pp)
    losses, grads = dp.run_virtual(name, model, pp, tokens, targets)
    dl, dg = check_against_reference(model, losses, grads, tokens, targets)
    # loss: the same fp32 ops on the same inputs -> bitwise equal. grads: accumulated in another order and
    # (DualPipe) summed over two copies, so fp32 rounding differs: the official examples' 1e-13-style bound.
    assert dl == 0.0 and dg < 1e-12, (dl, dg)
    assert {n for n, p in model.named_parameters() if p.grad is not None} == set(grads)   # none missing


@pytest.mark.parametrize("nproc,nmb", [(2, 4), (4, 8)])
def test_real_ranks_over_gloo(nproc, nmb):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "dualpipe_demo.py", "--ranks", f"--nmb={nmb}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}   # gloo on CPU
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    for name in ("1F1B", "ZB1P", "DualPipe"):
        assert f"PASS {name} on {nproc} ranks (gloo), {nmb} micro-batches" in p.stdout, p.stdout


# ----------------------------------------------------------------------------- command line and picture

def test_cli_table_and_svg(tmp_path, capsys):
    svg = tmp_path / "t.svg"
    assert demo.main(["--pp=4", "--nmb=8", "--B=2.5", "--FB=3.5", f"--svg={svg}"]) == 0
    out = capsys.readouterr().out
    assert "  8   20  DualPipe              6.00       6.00      2/2              9/9" in out   # the default size
    assert "deviates from Table 2" in out                      # B - W != F at the user's costs
    root = ET.parse(svg).getroot()                             # well-formed SVG
    rects = root.findall("{http://www.w3.org/2000/svg}rect")
    n_ops = sum(len(ops) for n in dp.SCHEDULES for ops in dp.SCHEDULES[n](4, 8))
    assert len(rects) > n_ops


@pytest.mark.parametrize("argv", [["--pp=3"], ["--nmb=7"], ["--bogus=1"], ["--pp=x"], ["--ranks"], ["--pp"]])
def test_cli_misuse_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("dualpipe_demo.py: error: ") and err.count("\n") == 1
