"""
DualPipe, DeepSeek-V3's bidirectional pipeline schedule (§3.2.1, Figure 5, Table 2), small enough to watch on a laptop.

The official code (github.com/deepseek-ai/DualPipe) needs CUDA + NCCL and has no timing and no picture. Here the
schedule is an explicit list of ops per rank, next to the 1F1B and ZB1P baselines, and then it is
  1. simulated: per-op costs + data dependencies -> timeline, bubble, activation peak, parameter copies (Table 2);
  2. overlapped: in an F&B pair one micro-batch's all-to-all hides behind the other's attention/MLP (Figure 4);
  3. drawn: the timeline as an SVG (ranks x time), like the paper's Figure 5;
  4. executed for real, on virtual ranks in one process or on real ranks over torch.distributed (gloo / NCCL),
     with Blocks of model.py as stages, and checked against ordinary non-pipelined forward/backward.

Ops and costs (Table 2's symbols: F forward chunk, B *full* backward chunk, W weight-grad chunk, F&B pair):
  F   forward of one micro-batch through one stage                              cost F
  B   backward for the stage input only (Zero Bubble's split; weights later)     cost B - W
  W   the deferred weight-gradient half of an earlier B                          cost W
  BW  full backward: input and weight gradients at once (1F1B's "B")             cost B
  FB  an F of one micro-batch overlapped with the BW of another (DualPipe)       cost F&B
Bubble, as measured here: makespan (time 0 to the end of the last op on any rank) minus a rank's busy time (the
sum of its op costs; an FB pair counts once, at cost F&B), for the worst rank. This reproduces Table 2 exactly
(tests: 14 (PP, N) pairs x 5 cost sets) when B-W = F and W <= F, as in the paper's figure (F=1, B=2, W=1, F&B=3),
with zero p2p latency; other costs deviate and we print the deviation rather than hide it (ZB1P, for instance,
becomes (PP-1)·max(F+B-2W, F, B-W); try `python dualpipe.py --B=1.5`). A p2p latency adds to every bubble.
Activations: micro-batch-stage activations alive on a rank (F adds one, BW or W frees it; in an FB both are alive).
B/W split cost: B + W run exactly the GEMMs of one BW (counted in the tests); what ZB pays is memory, each Linear's
input and output gradient held from B until its W.

Simplifications vs. the real thing:
  - costs are constants per op kind: uniform stages, no embedding/head imbalance, no jitter;
  - on CPU an FB pair runs its F, then its BW; the overlap lives in the two-stream cost model (pair_time), with
    4 pieces per chunk (attention, dispatch, MLP, combine) instead of Figure 4's finer split (PP sends, W);
  - W is deferred for nn.Linear weights (dW = g^T x from the saved input and the output grad caught by a hook);
    norm weights, the MoE gate and the embedding get their (cheap) gradients inside B; the experts run on
    model.py's 'sorted' MoE path (nn.Linear calls), as its 'grouped' GEMM would compute their dW inside B;
  - p2p message order comes from the simulated timeline (one global order that both ends of every link follow)
    instead of the official code's hand-paired batched sends; no rank_mapping, no sub-groups; no DualPipeV;
  - the real-rank flag is --ranks, not --run: torchrun's own parser would take --run for its --run-path.
Run: python dualpipe.py [--pp=4 --nmb=12 --B=1.5 --exec]  |  torchrun --nproc_per_node=4 dualpipe.py --ranks

Legend: PP ranks (= stages), N micro-batches, r rank, s stage, d direction (0 enters at rank 0, 1 at rank PP-1),
mb micro-batch index inside its direction; tensors: Bm micro-batch size, T tokens, D model dim, V vocab.
"""
import ast
import copy
import os
import sys
from collections import deque
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# 1. Schedules: one list of ops per rank, in program order

class Op(NamedTuple):
    kind: str       # 'F' | 'B' | 'W' | 'BW' | 'FB'
    d: int          # direction (of the F half for an FB)
    mb: int         # micro-batch index inside direction d
    bd: int = -1    # FB only: direction of the backward half
    bmb: int = -1   # FB only: micro-batch of the backward half

    def halves(self) -> list["Op"]:
        # an FB pair is an F and a full backward that run together; any other op is itself
        return [Op("F", self.d, self.mb), Op("BW", self.bd, self.bmb)] if self.kind == "FB" else [self]


Schedule = list[list[Op]]


def stage_of(pp: int, rank: int, d: int) -> int:
    # direction 0 runs stage r on rank r; direction 1 runs the same model mirrored: stage PP-1-r on rank r
    return rank if d == 0 else pp - 1 - rank


rank_of = stage_of   # the mirror is its own inverse: the rank holding stage s of direction d


def _check(pp: int, nmb: int, dual: bool) -> None:
    if pp < 2 or (dual and pp % 2):
        raise ValueError(f"need PP >= 2{' and even (DualPipe pairs rank r with PP-1-r)' if dual else ''}, got {pp}")
    if nmb < 1 or (dual and (nmb % 2 or nmb < 2 * pp)):
        raise ValueError(f"DualPipe needs an even number of micro-batches >= 2*PP = {2 * pp}, got {nmb}" if dual
                         else f"need >= 1 micro-batch, got {nmb}")


def _one_direction(pp: int, nmb: int, split: bool) -> Schedule:
    _check(pp, nmb, dual=False)
    sched = []
    for r in range(pp):
        warm = min(pp - 1 - r, nmb)                     # warm-up: rank r runs PP-1-r forwards before its 1st B
        ops = [Op("F", 0, i) for i in range(warm)]
        for i in range(nmb):                            # steady state: one F, one backward (cool-down: no F)
            if warm + i < nmb:
                ops.append(Op("F", 0, warm + i))
            ops.append(Op("B" if split else "BW", 0, i))
            if split and i >= r:
                ops.append(Op("W", 0, i - r))
        ops += [Op("W", 0, i) for i in range(max(nmb - r, 0), nmb)] if split else []   # the r held-back W's
        sched.append(ops)
    return sched


def schedule_1f1b(pp: int, nmb: int) -> Schedule:
    """1F1B (PipeDream-Flush): rank r warms up with PP-1-r forwards, then alternates one F and one full backward."""
    return _one_direction(pp, nmb, split=False)


def schedule_zb1p(pp: int, nmb: int) -> Schedule:
    """ZB1P (ZB-H1 of Qi et al. 2023, "Zero Bubble Pipeline Parallelism"): 1F1B's order with the backward split
    into B (input grads, on the critical path) and W (weight grads, free to move). Rank r keeps its W's r
    micro-batches behind its B's and plays the last r of them after its final B, exactly where 1F1B waits for
    gradients from the ranks below. Peak activations stay PP (a micro-batch is freed by its W)."""
    return _one_direction(pp, nmb, split=True)


def schedule_dualpipe(pp: int, nmb: int) -> Schedule:
    """DualPipe (§3.2.1): the 8 phases of the official DualPipe.step, for every rank.

    Micro-batches 0..N/2-1 (direction 0) enter at rank 0 and flow to rank PP-1; micro-batches N/2..N-1
    (direction 1) enter at rank PP-1 and flow to rank 0. Both directions run the SAME model: direction 1 sees
    the ranks mirrored, so rank r holds stage r (for direction 0) and a copy of stage PP-1-r (for direction 1),
    Table 2's "2x parameters"; the two copies' gradients are summed after the step. On rank r, 'near' is the
    direction whose micro-batches arrive first (0 on the first half of the ranks, 1 on the second), 'far' the
    other one; h = min(r, PP-1-r) is the distance to the nearer end of the pipeline.
    """
    _check(pp, nmb, dual=True)
    half, per_dir, sched = pp // 2, nmb // 2, []
    for r in range(pp):
        h = min(r, pp - 1 - r)
        near, far, middle = int(r >= half), int(r < half), h == half - 1
        nf, nb, wq, ops = [0, 0], [0, 0], deque(), []       # next F / B micro-batch per direction, W queue

        def f(d: int) -> None:
            ops.append(Op("F", d, nf[d]))
            nf[d] += 1

        def b(d: int, split: bool) -> None:                  # split: B now, its W later (FIFO, like the official)
            ops.append(Op("B" if split else "BW", d, nb[d]))
            if split:
                wq.append((d, nb[d]))
            nb[d] += 1

        def w() -> None:                                    # the weight grads of the oldest split B
            ops.append(Op("W", *wq.popleft()))

        def fb(fd: int, bd: int) -> None:                    # overlapped pair: its backward is never split
            ops.append(Op("FB", fd, nf[fd], bd, nb[bd]))
            nf[fd] += 1
            nb[bd] += 1

        # Step 1: nF0 -- warm-up forwards of the near direction; ranks nearer the middle start later, with fewer
        for _ in range((half - h - 1) * 2):
            f(near)
        # Step 2: nF0F1 -- the far direction's first micro-batches arrive: alternate near and far forwards
        for _ in range(h + 1):
            f(near)
            f(far)
        # Step 3: nB1W1F1 -- the first far backwards arrive; split them (zero bubble) and fill with their W's
        for _ in range(half - h - 1):
            b(far, split=True)
            w()
            f(far)
        # Step 4 (main): nF0B1F1B0 -- steady state, all overlapped F&B pairs: F(near)+B(far), F(far)+B(near)
        for i in range(per_dir - pp + h + 1):
            if i == 0 and middle:   # the official code does not overlap this first pair on the middle ranks
                f(near)
                b(far, split=False)
            else:
                fb(near, far)
            fb(far, near)
        # Step 5: nB1F1B0 -- the near direction has no forwards left: B(far), then F(far)+B(near) pairs
        for _ in range(half - h - 1):
            b(far, split=False)
            fb(far, near)
        # Step 6: nB1B0 -- cool-down: 2(h+1) backwards, far and near in turn; the second half are split (B now,
        # W later) so that their W's can fill the waits of steps 7 and 8
        for k in range(2 * (h + 1)):
            b((far, near)[k % 2], split=k >= h + 1)
        # Step 7: nWB0 -- the last near backwards, each after a deferred W that fills its wait
        for _ in range(half - h - 1):
            w()
            b(near, split=True)
        # Step 8: nW -- the trailing W's
        for _ in range(h + 1):
            w()
        assert not wq and nf == [per_dir] * 2 and nb == [per_dir] * 2, (r, nf, nb, len(wq))
        sched.append(ops)
    return sched


SCHEDULES = {"1f1b": schedule_1f1b, "zb1p": schedule_zb1p, "dualpipe": schedule_dualpipe}
NAMES = {"1f1b": "1F1B", "zb1p": "ZB1P", "dualpipe": "DualPipe"}


def table2(name: str, pp: int, c: "Costs") -> tuple[float, int, int]:
    """Table 2 of the paper: (bubble, parameter copies, activations in micro-batch-stage units)."""
    if name == "1f1b":
        return (pp - 1) * (c.F + c.B), 1, pp
    if name == "zb1p":
        return (pp - 1) * (c.F + c.B - 2 * c.W), 1, pp
    return (pp // 2 - 1) * (c.FB + c.B - 3 * c.W), 2, pp + 1


# -----------------------------------------------------------------------------
# 2. Costs, the F&B overlap model, and the simulator

@dataclass
class Costs:
    F: float = 1.0        # forward chunk (compute)
    B: float = 2.0        # full backward chunk (compute)
    W: float = 1.0        # its weight-gradient part
    FB: float = 3.0       # an F&B pair (compute of both; Table 2's F&B)
    p2p: float = 0.0      # latency of one activation / gradient hop to a neighbouring rank
    a2a: float = 0.0      # one MoE all-to-all (dispatch or combine) of one chunk; 0 = not modelled
    overlap: bool = True  # F&B pairs run compute and all-to-all on two streams (False: one after the other)

    def of(self, kind: str) -> float:
        comm = 2 * self.a2a   # a chunk's forward dispatches and combines; its input-backward does the transposes
        return {"F": self.F + comm, "B": self.B - self.W + comm, "W": self.W, "BW": self.B + comm,
                "FB": pair_time(self, self.overlap)[0]}[kind]


def pair_time(c: Costs, overlap: bool = True) -> tuple[float, list[tuple[int, str, str, float, float]]]:
    """Time of one F&B pair, and its pieces (stream 0 compute / 1 all-to-all, chunk 'F'|'B', name, start, end).

    A chunk is attention -> dispatch -> MLP -> combine; its backward runs them in reverse. Overlapped (§3.2.1,
    Figure 4), the compute stream plays attn(F) mlp(B) mlp(F) attn(B) while the comm stream plays
    combine(B) dispatch(F) dispatch(B) combine(F): each all-to-all of one micro-batch hides behind a compute
    piece of the other. Serialized, all eight pieces run one after another.
    NOTE: attention and MLP are taken as equal halves of a chunk's compute.
    """
    f, b, a = c.F / 2, (c.FB - c.F) / 2, c.a2a
    chunk = {"F": [("attn", 0, f), ("dispatch", 1, a), ("mlp", 0, f), ("combine", 1, a)],
             "B": [("combine", 1, a), ("mlp", 0, b), ("dispatch", 1, a), ("attn", 0, b)]}
    order = ([("F", 0), ("B", 0), ("B", 1), ("F", 1), ("F", 2), ("B", 2), ("B", 3), ("F", 3)] if overlap else
             [("F", i) for i in range(4)] + [("B", i) for i in range(4)])
    free, ready, last, pieces = [0.0, 0.0], {"F": 0.0, "B": 0.0}, 0.0, []
    for ch, i in order:
        name, stream, cost = chunk[ch][i]
        t0 = max(free[stream], ready[ch], 0.0 if overlap else last)   # own stream, own chunk's previous piece
        free[stream] = ready[ch] = last = t0 + cost
        pieces.append((stream, ch, name, t0, t0 + cost))
    return max(free), pieces


@dataclass
class Timeline:
    spans: list[list[tuple[Op, float, float]]]   # per rank, in program order: (op, start, end)
    makespan: float
    bubble: list[float]      # per rank: makespan - busy time
    peak_act: list[int]      # per rank: most micro-batch-stage activations alive at once
    params: list[int]        # per rank: stage copies held


def _deps(op: Op, rank: int, pp: int) -> tuple[list[tuple[tuple, bool]], list[tuple]]:
    """(events the op needs, each with 'crosses a link'), (events it produces); event = (F|B|W, d, mb, stage)."""
    need, make = [], []
    for o in op.halves():
        s = stage_of(pp, rank, o.d)
        if o.kind == "F":
            if s > 0:
                need.append((("F", o.d, o.mb, s - 1), True))       # activation from the previous stage
            make.append(("F", o.d, o.mb, s))
        elif o.kind in ("B", "BW"):
            need.append((("F", o.d, o.mb, s), False))
            if s < pp - 1:
                need.append((("B", o.d, o.mb, s + 1), True))       # output gradient from the next stage
            make.append(("B", o.d, o.mb, s))
        else:
            need.append((("B", o.d, o.mb, s), False))              # W needs its own B's output gradients
            make.append(("W", o.d, o.mb, s))
    return need, make


def simulate(sched: Schedule, c: Costs = Costs()) -> Timeline:
    """Play every rank's op list in order: an op starts once its rank is free and its inputs have arrived.
    Raises RuntimeError if the schedule deadlocks (some rank waits for an event that never comes)."""
    pp = len(sched)
    done: dict[tuple, float] = {}
    spans: list[list[tuple[Op, float, float]]] = [[] for _ in range(pp)]
    free, ptr = [0.0] * pp, [0] * pp
    while any(ptr[r] < len(sched[r]) for r in range(pp)):
        progressed = False
        for r in range(pp):
            while ptr[r] < len(sched[r]):
                op = sched[r][ptr[r]]
                need, make = _deps(op, r, pp)
                if any(e not in done for e, _ in need):
                    break
                t0 = max([free[r]] + [done[e] + (c.p2p if hop else 0.0) for e, hop in need])
                free[r] = t1 = t0 + c.of(op.kind)
                done.update((e, t1) for e in make)
                spans[r].append((op, t0, t1))
                ptr[r] += 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"schedule deadlocks: ranks stuck at ops {[s[p] for s, p in zip(sched, ptr)]}")
    makespan = max(free)
    peak = []
    for ops in sched:
        alive = top = 0
        for op in ops:
            alive += op.kind in ("F", "FB")
            top = max(top, alive)                                   # inside an FB both micro-batches are alive
            alive -= op.kind in ("BW", "W", "FB")
        peak.append(top)
    return Timeline(spans, makespan, [makespan - sum(t1 - t0 for _, t0, t1 in sp) for sp in spans], peak,
                    [len({stage_of(pp, r, o.d) for op in ops for o in op.halves()}) for r, ops in enumerate(sched)])


# -----------------------------------------------------------------------------
# 3. The picture: ranks x time, one colour per op kind and direction (the paper's Figure 5 style)

COLORS = {("F", 0): "#f6b26b", ("F", 1): "#ffe08a", ("BW", 0): "#6aa84f", ("BW", 1): "#b6d7a8",
          ("B", 0): "#3d85c6", ("B", 1): "#9fc5e8", ("W", 0): "#8e7cc3", ("W", 1): "#cdc3ea"}
CSS = ("rect{stroke:#fff;stroke-width:.5} text{font-size:9px;text-anchor:middle} .s{font-size:7px} "
       ".l{font-size:10px;text-anchor:start} .h{font-size:11px;text-anchor:start;font-weight:bold} "
       ".fb{fill:none;stroke:#000;stroke-width:1.2}" + "".join(f" .{k}{d}{{fill:{c}}}" for (k, d), c in COLORS.items()))


def _box(x: float, y: float, w: float, h: float, cls: str, label: object = "", small: bool = False) -> str:
    s = f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:g}" class="{cls}"/>'
    if label != "" and w >= 8:
        cls = ' class="s"' if small else ""
        s += f'<text x="{x + w / 2:.1f}" y="{y + h / 2 + 3:.1f}"{cls}>{label}</text>'
    return s


def _text(x: float, y: float, s: str, cls: str = "l") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" class="{cls}">{s}</text>'


def svg_figure(panels: list[tuple[str, Timeline]], pair: Costs | None = None, width: float = 1300.0) -> str:
    """Timelines on one shared time scale (so bubbles compare by length), then a close-up of one F&B pair."""
    x0, row, y = 52.0, 18.0, 8.0
    scale = (width - x0 - 10) / max(tl.makespan for _, tl in panels)
    out = [f"<style>{CSS}</style>", '<rect width="100%" height="100%" style="fill:#fff;stroke:none"/>']
    legend = [("F", "forward F"), ("BW", "full backward"), ("B", "input backward B"), ("W", "weight backward W")]
    for i, ((kind, what), d) in enumerate((k, d) for k in legend for d in (0, 1)):
        out += [_box(x0 + 145 * i, y, 14, 12, f"{kind}{d}"), _text(x0 + 145 * i + 18, y + 10, f"{what} ({('&gt;', '&lt;')[d]})")]
    out.append(_text(x0, y + 28, "direction 0 (&gt;) enters at rank 0, direction 1 (&lt;) at the last rank; number = micro-batch "
                                 "in its direction; framed = overlapped F&amp;B pair (F on top, full backward below)"))
    y += 40
    for title, tl in panels:
        out.append(_text(x0, y + 11, f"{title}: makespan {tl.makespan:g}, bubble {max(tl.bubble):g}", "h"))
        y += 16
        for r, spans in enumerate(tl.spans):
            out.append(_text(4, y + 12, f"rank {r}"))
            for op, t0, t1 in spans:
                x, w = x0 + t0 * scale, (t1 - t0) * scale
                if op.kind == "FB":
                    fo, bo = op.halves()
                    out += [_box(x, y, w, row / 2, f"F{fo.d}", fo.mb, True),
                            _box(x, y + row / 2, w, row / 2, f"BW{bo.d}", bo.mb, True), _box(x, y, w, row, "fb")]
                else:
                    out.append(_box(x, y, w, row, f"{op.kind}{op.d}", op.mb))
            y += row + 2
        y += 14
    if pair is not None:   # one F&B pair on its two streams: what the overlap hides
        ps = 600 / pair_time(pair, False)[0]
        for overlap in (False, True):
            t, pieces = pair_time(pair, overlap)
            out.append(_text(x0, y + 11, f"one F&amp;B pair, {'overlapped' if overlap else 'serialized'}: {t:g} "
                                         f"(F={pair.F:g}, F&amp;B compute={pair.FB:g}, all-to-all {pair.a2a:g} each)", "h"))
            y += 16
            for stream in (0, 1):
                out.append(_text(4, y + 12, ("compute", "all-to-all")[stream]))
                out += [_box(x0 + t0 * ps, y, (t1 - t0) * ps, row, "F0" if ch == "F" else "BW0", f"{name} ({ch})")
                        for st, ch, name, t0, t1 in pieces if st == stream and t1 > t0]
                y += row + 2
            y += 8
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{y + 6:.0f}" '
            f'font-family="sans-serif">' + "".join(out) + "</svg>\n")


# -----------------------------------------------------------------------------
# 4. Executor: the same schedules run for real, on model.py's Blocks

class Stage(nn.Module):
    """Stage s of PP: [embedding] + its share of the Blocks + [final norm + head]. Holds the model's own modules
    (no copy); the executor deep-copies a Stage for every rank that runs it."""

    def __init__(self, model: nn.Module, s: int, pp: int):
        super().__init__()
        n = len(model.layers)
        self.embed = model.embed if s == 0 else None
        self.layers = nn.ModuleList(model.layers[s * n // pp:(s + 1) * n // pp])
        self.norm, self.head = (model.norm, model.head) if s == pp - 1 else (None, None)
        self.register_buffer("freqs_cis", model.freqs_cis, persistent=False)   # (max_seq_len, Dr/2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: tokens (Bm, T) on stage 0, else hidden states (Bm, T, D) -> (Bm, T, D), or logits (Bm, T, V) last."""
        h = self.embed(x) if self.embed is not None else x        # (Bm, T, D)
        freqs = self.freqs_cis[:h.size(1)]                          # (T, Dr/2, 2), positions 0..T-1 as the model
        for layer in self.layers:
            h = layer(h, freqs)                                     # (Bm, T, D)
        return self.head(self.norm(h)) if self.head is not None else h   # (Bm, T, V) | (Bm, T, D)


def stage_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # model.Transformer.forward's cross-entropy, op for op, so the pipelined loss is bitwise the reference's
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)


class Worker:
    """One pipeline rank: its stage copies (one per direction it serves, by d) and its micro-batches in flight.
    Messages are ('act' | 'grad', d, mb): ops put tensors in `outbox`, the transport fills `inbox`."""

    def __init__(self, rank: int, pp: int, stages: dict[int, Stage], names: dict[int, list[str]],
                 tokens: torch.Tensor, targets: torch.Tensor):
        self.rank, self.pp, self.stages, self.names = rank, pp, stages, names
        self.tokens, self.targets = tokens, targets                  # (N, Bm, T) each, all micro-batches
        self.per_dir = len(tokens) // len(stages)                    # micro-batches per direction
        self.inbox: dict[tuple, torch.Tensor] = {}
        self.outbox: dict[tuple, torch.Tensor] = {}
        self.live: dict[tuple[int, int], tuple] = {}                # (d, mb) -> (stage input, output|loss, records)
        self.losses: dict[int, torch.Tensor] = {}                    # global micro-batch -> loss
        self.records: list | None = None
        for st in stages.values():
            for m in st.modules():
                if isinstance(m, nn.Linear):
                    m.register_forward_hook(self._record_linear)

    def _record_linear(self, mod: nn.Linear, inp: tuple, out: torch.Tensor) -> None:
        """W needs, per Linear call, its input x and the gradient g of its output (dW = g^T x, Zero Bubble's
        WeightGradStore). Keep x now; a tensor hook catches g when B's backward passes through this output."""
        if self.records is None or not torch.is_grad_enabled():
            return
        x = inp[0].detach()
        rec = [mod, x, x._version, None]
        out.register_hook(lambda g: rec.__setitem__(3, g))
        self.records.append(rec)

    def run(self, op: Op) -> None:
        # NOTE: an FB pair runs its F, then its BW; on GPUs the two overlap on two streams (modelled in pair_time)
        for o in op.halves():
            if o.kind == "F":
                self.forward(o.d, o.mb)
            elif o.kind == "W":
                self.backward_weight(o.d, o.mb)
            else:
                self.backward(o.d, o.mb, split=o.kind == "B")

    def forward(self, d: int, mb: int) -> None:
        s, g = stage_of(self.pp, self.rank, d), d * self.per_dir + mb
        x = None if s == 0 else self.inbox.pop(("act", d, mb)).requires_grad_()   # (Bm, T, D) from stage s-1
        self.records = []
        out = self.stages[d](self.tokens[g] if s == 0 else x)                     # (Bm, T, D) | (Bm, T, V)
        records, self.records = self.records, None
        if s == self.pp - 1:
            out = stage_loss(out, self.targets[g])
            self.losses[g] = out.detach()
        else:
            self.outbox[("act", d, mb)] = out.detach()           # on the wire: the values, never the graph
        self.live[(d, mb)] = (x, out, records)

    def backward(self, d: int, mb: int, split: bool) -> None:
        """BW (split=False): input and weight gradients now. B (split=True): input gradients now (the next rank
        waits for them), every nn.Linear's weight gradient later in W. The other parameters (norms, MoE gate,
        embedding: cheap, no big GEMM) get theirs here."""
        x, out, records = self.live.pop((d, mb))
        grad = None if stage_of(self.pp, self.rank, d) == self.pp - 1 else self.inbox.pop(("grad", d, mb))
        later = {id(p) for rec in records for p in (rec[0].weight, rec[0].bias) if p is not None} if split else set()
        params = [p for p in self.stages[d].parameters() if p.requires_grad and id(p) not in later]
        # inputs=: accumulate .grad of exactly these leaves; autograd skips every GEMM that leads elsewhere (the
        # deferred dW's), so B + W do the GEMMs of one BW, no recomputation (tests/test_dualpipe.py counts them)
        torch.autograd.backward(out, grad, inputs=([x] if x is not None else []) + params)   # grad: (Bm, T, D)
        if x is not None:
            self.outbox[("grad", d, mb)] = x.grad               # dL/d(stage input), (Bm, T, D), to stage s-1
        if split:
            self.live[(d, mb)] = (None, None, records)          # the graph is freed; W needs only (x, g) pairs

    def backward_weight(self, d: int, mb: int) -> None:
        for mod, x, version, g in self.live.pop((d, mb))[2]:
            assert g is not None and x._version == version, "a Linear input was changed in place, or got no grad"
            g2, x2 = g.reshape(-1, g.size(-1)), x.reshape(-1, x.size(-1))       # (Bm*T, out), (Bm*T, in)
            for p, dp in ((mod.weight, g2.t() @ x2), (mod.bias, g2.sum(0))):   # dW = g^T x (out, in); db (out,)
                if p is not None:
                    p.grad = dp if p.grad is None else p.grad + dp

    def grads(self) -> dict[str, torch.Tensor]:
        # by model parameter name; a rank's two stages (r, PP-1-r) never share a name, copies meet across ranks
        return {n: p.grad for d, st in self.stages.items() for n, p in zip(self.names[d], st.parameters())
                if p.grad is not None}


def make_workers(name: str, model: nn.Module, pp: int, ranks: list[int], tokens: torch.Tensor,
                 targets: torch.Tensor) -> dict[int, Worker]:
    """Each rank gets deep copies of its stages: one per direction (DualPipe: stages r and PP-1-r)."""
    stages = [Stage(model, s, pp) for s in range(pp)]
    pname = {id(p): n for n, p in model.named_parameters()}
    dirs = (0, 1) if name == "dualpipe" else (0,)
    return {r: Worker(r, pp, {d: copy.deepcopy(stages[stage_of(pp, r, d)]) for d in dirs},
                      {d: [pname[id(p)] for p in stages[stage_of(pp, r, d)].parameters()] for d in dirs},
                      tokens, targets) for r in ranks}


def program(sched: Schedule) -> list[tuple[int, tuple]]:
    """All ranks' actions, (rank, ('op', Op) | ('send', dst, msg) | ('recv', src, msg)), in ONE global order: the
    simulated timeline at the paper's costs, each message at the end of the op that made it, on both ends.
    Each rank runs its own sub-list, so both ends of every link see its messages in the same order (NCCL
    matches sends and recvs by order, not tag), and as every send/recv pair sits at one point of a single
    global sequence, no ranks can wait on each other in a cycle: no deadlock, with or without buffering."""
    pp, events = len(sched), []
    for r, spans in enumerate(simulate(sched).spans):
        for i, (op, t0, t1) in enumerate(spans):
            events.append(((t0, 1, r, i), r, ("op", op)))
            for j, (kind, d, mb, s) in enumerate(_deps(op, r, pp)[1]):
                if kind == "W" or (kind, s) in (("F", pp - 1), ("B", 0)):
                    continue   # W stays home; the last stage's output is the loss, the first's input the tokens
                dst, msg = (rank_of(pp, s + 1, d), ("act", d, mb)) if kind == "F" else (rank_of(pp, s - 1, d), ("grad", d, mb))
                events += [((t1, 0, r, i, j, 0), r, ("send", dst, msg)), ((t1, 0, r, i, j, 1), dst, ("recv", r, msg))]
    return [(r, act) for _, r, act in sorted(events)]


def play(workers: dict[int, Worker], sched: Schedule, send: Callable, recv: Callable) -> None:
    """Run the program for the ranks in `workers`: send(src, dst, msg, tensor), recv(src, dst, msg) -> tensor."""
    for r, act in program(sched):
        if r in workers:
            if act[0] == "op":
                workers[r].run(act[1])
            elif act[0] == "send":
                send(r, act[1], act[2], workers[r].outbox.pop(act[2]))
            else:
                workers[r].inbox[act[2]] = recv(act[1], r, act[2])


def run_virtual(name: str, model: nn.Module, pp: int, tokens: torch.Tensor, targets: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One process, PP virtual ranks, in-memory FIFO queues as the links (their order is checked).
    Returns the losses (N,) and every parameter's gradient summed over its copies."""
    workers = make_workers(name, model, pp, list(range(pp)), tokens, targets)
    wires: dict[tuple[int, int], deque] = {}

    def recv(src: int, dst: int, msg: tuple) -> torch.Tensor:
        got, t = wires[(src, dst)].popleft()
        assert got == msg, f"link {src}->{dst} out of order: got {got}, expected {msg}"
        return t

    play(workers, SCHEDULES[name](pp, len(tokens)),
         lambda src, dst, msg, t: wires.setdefault((src, dst), deque()).append((msg, t.clone())), recv)
    grads: dict[str, torch.Tensor] = {}
    for wk in workers.values():   # DualPipe: stage s has copies on ranks s and PP-1-s: their gradients add up
        for n, g in wk.grads().items():
            grads[n] = grads[n] + g if n in grads else g
    losses = {g: l for wk in workers.values() for g, l in wk.losses.items()}
    return torch.stack([losses[g] for g in range(len(tokens))]), grads


def grad_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    # the official examples' check: 1 - 2<x,y>/(|x|^2+|y|^2), 0 iff x == y (direction and norm at once)
    x, y = x.double(), y.double()
    den = (x * x + y * y).sum().item()
    return 0.0 if den == 0 else 1 - 2 * (x * y).sum().item() / den


def tiny_setup(pp: int, nmb: int, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32,
               bm: int = 2, seq: int = 8) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A tiny DeepSeek-V3 (MLA + MoE, 2 Blocks per stage) and N micro-batches of random tokens, (N, Bm, T)."""
    from model import ModelArgs, Transformer
    torch.manual_seed(seed)
    args = ModelArgs(vocab_size=64, dim=32, inter_dim=64, moe_inter_dim=16, n_layers=2 * pp, n_dense_layers=1,
                     n_heads=2, n_routed_experts=4, n_shared_experts=1, n_activated_experts=2, n_expert_groups=2,
                     n_limited_groups=1, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                     v_head_dim=8, max_seq_len=16, original_seq_len=16, n_mtp_depth=0, aux_alpha=0.0,
                     init_std=0.1, attn_impl="naive",   # naive: wkv_b is used only through its nn.Linear
                     moe_impl="sorted")   # sorted: each expert is nn.Linear calls, so W defers the experts' dW too
    model = Transformer(args).to(device=device, dtype=dtype)
    tokens = torch.randint(0, args.vocab_size, (nmb, bm, seq), device=device)
    return model, tokens, torch.randint(0, args.vocab_size, (nmb, bm, seq), device=device)


def check_against_reference(model: nn.Module, losses: torch.Tensor, grads: dict[str, torch.Tensor],
                            tokens: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """Ordinary training on the untouched model, one micro-batch after another, gradients summed.
    Returns (max |loss - reference|, max grad_diff over all parameters)."""
    model.zero_grad(set_to_none=True)
    ref = []
    for tok, tgt in zip(tokens, targets):
        _, l = model(tok, tgt)
        l["loss"].backward()             # = ce exactly: aux_alpha = 0 and no MTP add exact zeros
        ref.append(l["ce"].detach())
    zero = torch.zeros((), device=tokens.device)
    return ((torch.stack(ref) - losses).abs().max().item(),
            max(grad_diff(zero.expand_as(p) if p.grad is None else p.grad, grads.get(n, zero.expand_as(p)))
                for n, p in model.named_parameters()))


def run_ranks(names: list[str], nmb: int, seed: int) -> int:
    """Real ranks (launched by torchrun): rank r plays its part of the program over torch.distributed p2p; then
    gradients and losses are all-reduced (which sums DualPipe's two copies of a stage) and rank 0 checks them."""
    import torch.distributed as dist
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, pp, failed = dist.get_rank(), dist.get_world_size(), 0
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if backend == "nccl" else "cpu"
    if backend == "nccl":
        torch.cuda.set_device(device)
    for name in names:
        model, tokens, targets = tiny_setup(pp, nmb, seed, device)   # same seed: every rank builds the same model
        worker = make_workers(name, model, pp, [rank], tokens, targets)
        shape = (*tokens.shape[1:], model.args.dim)                  # (Bm, T, D): every message has this shape
        sent = []

        def send(src: int, dst: int, msg: tuple, t: torch.Tensor) -> None:
            t = t.contiguous()
            sent.append((dist.isend(t, dst), t))                     # keep t alive until its send completes

        def recv(src: int, dst: int, msg: tuple) -> torch.Tensor:
            buf = torch.empty(shape, dtype=model.embed.weight.dtype, device=device)
            dist.recv(buf, src)
            return buf

        play(worker, SCHEDULES[name](pp, nmb), send, recv)
        for req, _ in sent:
            req.wait()
        mine, params = worker[rank].grads(), list(model.named_parameters())
        flat = torch.cat([mine.get(n, torch.zeros_like(p)).flatten() for n, p in params])   # zeros elsewhere:
        losses = torch.zeros(nmb, device=device)                                             # the sums are exact
        for g, l in worker[rank].losses.items():
            losses[g] = l
        dist.all_reduce(flat)
        dist.all_reduce(losses)
        ok = torch.ones(1, device=device)
        if rank == 0:
            grads = {n: g.view_as(p) for (n, p), g in zip(params, flat.split([p.numel() for _, p in params]))}
            dl, dg = check_against_reference(model, losses, grads, tokens, targets)
            ok[0] = float(dl == 0.0 and dg < 1e-12)
            print(f"{'PASS' if ok.item() else 'FAIL'} {NAMES[name]} on {pp} ranks ({backend}), {nmb} micro-batches: "
                  f"max |loss - reference| {dl:.3g}, max grad diff {dg:.3g} (limit 1e-12)", flush=True)
        dist.broadcast(ok, 0)
        failed += int(ok.item() == 0)
    dist.destroy_process_group()
    return int(failed > 0)


# -----------------------------------------------------------------------------
# 5. Command line: the Table 2 comparison, the overlap, the picture, the executors

DEFAULTS = dict(pp=8, nmb=20, F=1.0, B=2.0, W=1.0, FB=3.0, p2p=0.0, a2a=0.5, svg="auto", schedule="all", seed=0,
                exec=False, ranks=False)   # svg: auto = assets/dualpipe_pp{pp}.svg, empty = none


def _die(msg: str) -> None:
    print(f"dualpipe.py: {msg}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv: list[str]) -> dict:
    """--key=value (a Python literal, type-checked against DEFAULTS; bare --flag for booleans)."""
    cfg = dict(DEFAULTS)
    for a in argv:
        key, eq, val = a[2:].partition("=") if a.startswith("--") else (a, "", "")
        if key not in cfg:
            _die(f"unknown option {a!r}; options: " + " ".join(f"--{k}" for k in cfg))
        if not eq and not isinstance(cfg[key], bool):
            _die(f"--{key} needs a value, e.g. --{key}={cfg[key]}")
        try:
            v = ast.literal_eval(val) if eq else True
        except (ValueError, SyntaxError):
            v = val
        v = float(v) if isinstance(cfg[key], float) and type(v) is int else v
        if type(v) is not type(cfg[key]):
            _die(f"--{key} must be {type(cfg[key]).__name__}, got {val!r}")
        cfg[key] = v
    if cfg["schedule"] not in ("all", *SCHEDULES):
        _die(f"--schedule must be all, {', '.join(SCHEDULES)}; got {cfg['schedule']!r}")
    return cfg


def report(sizes: list[tuple[int, int]], c: Costs) -> None:
    """Table 2's formulas next to the simulated values, every schedule and size."""
    print(f"costs F={c.F:g} B={c.B:g} W={c.W:g} F&B={c.FB:g} p2p={c.p2p:g}; bubble = makespan - busy time, worst rank;"
          f" activations in micro-batch-stage units\n PP    N  schedule   bubble: formula  simulated  params f/s"
          f"  activations f/s")
    for pp, nmb in sizes:
        for name, build in SCHEDULES.items():
            (fb, fp, fa), tl = table2(name, pp, c), simulate(build(pp, nmb), c)
            sb, sp, sa = max(tl.bubble), max(tl.params), max(tl.peak_act)
            note = "" if abs(sb - fb) < 1e-9 else "   <- deviates from Table 2"
            if note and name == "zb1p":
                note += f" (= (PP-1)*max(F+B-2W, F, B-W) = {(pp - 1) * max(c.F + c.B - 2 * c.W, c.F, c.B - c.W):g})"
            print(f"{pp:>3} {nmb:>4}  {NAMES[name]:<9} {fb:>16.2f} {sb:>10.2f}  {fp:>5}/{sp:<4}  {fa:>10}/{sa:<4}{note}".rstrip())


def main(argv: list[str]) -> int:
    cfg = parse_args(argv)
    pp, nmb, names = cfg["pp"], cfg["nmb"], list(SCHEDULES) if cfg["schedule"] == "all" else [cfg["schedule"]]
    try:
        if cfg["ranks"]:
            if "RANK" not in os.environ:
                _die("--ranks needs real ranks: torchrun --nproc_per_node=PP dualpipe.py --ranks")
            return run_ranks(names, nmb, cfg["seed"])
        for n in SCHEDULES:
            SCHEDULES[n](pp, nmb)                       # check the user's sizes before printing anything
    except ValueError as e:
        _die(str(e))
    paper, user = Costs(), Costs(cfg["F"], cfg["B"], cfg["W"], cfg["FB"], cfg["p2p"])
    sizes = [(8, 20)] + ([(pp, nmb)] if (pp, nmb) != (8, 20) else [])
    for c in [paper] + ([user] if user != paper else []):
        report(sizes, c)
        print()
    # the F&B overlap: MoE all-to-all added to every chunk, hidden (or not) inside the F&B pairs
    comm = Costs(**{**user.__dict__, "a2a": cfg["a2a"]})
    serial, overlapped = pair_time(comm, False)[0], pair_time(comm, True)[0]
    print(f"F&B pair with all-to-all {comm.a2a:g} each (4 per pair): {serial:g} serialized, {overlapped:g} overlapped"
          f" -> hides {serial - overlapped:g} of {4 * comm.a2a:g}")
    tls = {n: simulate(SCHEDULES[n](pp, nmb), comm) for n in SCHEDULES}
    no_overlap = simulate(schedule_dualpipe(pp, nmb), Costs(**{**comm.__dict__, "overlap": False}))
    print(f"PP={pp} N={nmb} makespan with all-to-all: " + ", ".join(f"{NAMES[n]} {t.makespan:g}" for n, t in
          tls.items()) + f" (DualPipe without the overlap: {no_overlap.makespan:g})")
    if cfg["svg"]:
        path = f"assets/dualpipe_pp{pp}.svg" if cfg["svg"] == "auto" else cfg["svg"]
        panels = [(f"{NAMES[n]} PP={pp} N={nmb} (F={user.F:g} B={user.B:g} W={user.W:g} F&amp;B={user.FB:g})",
                   simulate(SCHEDULES[n](pp, nmb), user)) for n in SCHEDULES]
        panels += [(f"DualPipe with all-to-all {comm.a2a:g}, F&amp;B serialized", no_overlap),
                   (f"DualPipe with all-to-all {comm.a2a:g}, F&amp;B overlapped", tls["dualpipe"])]
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as fh:
            fh.write(svg_figure(panels, comm))
        print(f"wrote {path}")
    for n in names if cfg["exec"] else []:             # the single-process executor, tiny model, these sizes
        model, tokens, targets = tiny_setup(pp, nmb, cfg["seed"])
        dl, dg = check_against_reference(model, *run_virtual(n, model, pp, tokens, targets), tokens, targets)
        print(f"{NAMES[n]} on {pp} virtual ranks, {nmb} micro-batches: max |loss - reference| {dl:.3g}, "
              f"max grad diff {dg:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
