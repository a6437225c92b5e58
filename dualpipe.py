"""
DualPipe, DeepSeek-V3's bidirectional pipeline schedule (§3.2.1, Figure 5, Table 2), small enough to watch on a laptop.

The official code (github.com/deepseek-ai/DualPipe) needs CUDA + NCCL and has no timing and no picture. Here the
schedule is an explicit list of ops per rank, next to the 1F1B and ZB1P baselines, and then it is
  1. simulated: per-op costs + data dependencies -> timeline, bubble, activation peak, parameter copies (Table 2);
  2. overlapped: in an F&B pair one micro-batch's all-to-all hides behind the other's attention/MLP (Figure 4);
  3. executed for real, on virtual ranks in one process or on real ranks over torch.distributed (gloo / NCCL),
     with slices of model.py's Transformer as stages (Transformer.pipeline_stage).
This file is the algorithm. dualpipe_demo.py prints the Table 2 comparison, draws the timelines as an SVG (the
paper's Figure 5) and runs the executors on real ranks under torchrun; tests/test_dualpipe.py checks the
executors against ordinary non-pipelined forward/backward (tests/dualpipe_harness.py).

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
becomes (PP-1)·max(F+B-2W, F, B-W); try `python dualpipe_demo.py --B=1.5`). A p2p latency adds to every bubble.
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
Run: python dualpipe_demo.py [--pp=4 --nmb=12 --B=1.5 --exec]  |  torchrun --nproc_per_node=4 dualpipe_demo.py --ranks
     (python dualpipe.py ... runs the same demo)

Legend: PP ranks (= stages), N micro-batches, r rank, s stage, d direction (0 enters at rank 0, 1 at rank PP-1),
mb micro-batch index inside its direction; tensors: Bm micro-batch size, T tokens, D model dim, V vocab.
"""
import copy
import sys
from collections import deque
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn as nn


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
        nf, nb, w_queue, ops = [0, 0], [0, 0], deque(), []  # next F / B micro-batch per direction, W's due

        def f(d: int) -> None:
            ops.append(Op("F", d, nf[d]))
            nf[d] += 1

        def b(d: int, split: bool) -> None:                  # split: B now, its W later (FIFO, like the official)
            ops.append(Op("B" if split else "BW", d, nb[d]))
            if split:
                w_queue.append((d, nb[d]))
            nb[d] += 1

        def w() -> None:                                    # the weight grads of the oldest split B
            ops.append(Op("W", *w_queue.popleft()))

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
        assert not w_queue and nf == [per_dir] * 2 and nb == [per_dir] * 2, (r, nf, nb, len(w_queue))
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
# 3. Executor: the same schedules run for real, on slices of model.py's Transformer

class Worker:
    """One pipeline rank: its stage copies (one per direction it serves, by d) and its micro-batches in flight.
    Messages are ('act' | 'grad', d, mb): ops put tensors in `outbox`, the transport fills `inbox`."""

    def __init__(self, rank: int, pp: int, stages: dict[int, nn.Module], names: dict[int, list[str]],
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
        stage, inp = self.stages[d], self.tokens[g] if s == 0 else x
        if s == self.pp - 1:   # the model's own forward: trunk, head and cross-entropy, op for op the reference's
            out = stage(inp, self.targets[g]).losses["ce"]
            self.losses[g] = out.detach()
        else:
            out = stage.trunk(inp)                                                 # (Bm, T, D)
        records, self.records = self.records, None
        if s != self.pp - 1:
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
    """Each rank gets deep copies of its stages (Transformer.pipeline_stage): one per direction (DualPipe:
    stages r and PP-1-r)."""
    stages = [model.pipeline_stage(s, pp) for s in range(pp)]
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


if __name__ == "__main__":   # the old entry point: the demo (tables, SVG, executors) lives in dualpipe_demo.py
    from dualpipe_demo import main
    sys.exit(main(sys.argv[1:]))
