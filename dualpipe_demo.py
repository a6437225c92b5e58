"""
The DualPipe demo: Table 2 of the paper recomputed by dualpipe.py's simulator for 1F1B, ZB1P and DualPipe, the F&B
overlap of the MoE all-to-all (Figure 4), the timelines drawn as an SVG like the paper's Figure 5, and the executors
run on a tiny model of model.py (virtual ranks in this process, or real ranks under torchrun over gloo / NCCL),
checked against ordinary non-pipelined training (tests/dualpipe_harness.py).

Run: python dualpipe_demo.py [--pp=4 --nmb=12 --B=1.5 --a2a=0.5 --svg=out.svg --schedule=dualpipe --exec]
     torchrun --nproc_per_node=4 dualpipe_demo.py --ranks [--nmb=8]
  (--ranks, not --run: torchrun's own parser would take --run for its --run-path; --exec is --exec=True)
"""
import os
import sys

import torch

from config import die, parse_or_exit
from dualpipe import NAMES, SCHEDULES, Costs, Timeline, make_workers, pair_time, play, run_virtual, schedule_dualpipe, \
    simulate, table2
from tests.dualpipe_harness import check_against_reference, tiny_setup

PROG = "dualpipe_demo.py"

# -----------------------------------------------------------------------------
# The picture: ranks x time, one colour per op kind and direction (the paper's Figure 5 style)

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
# Real ranks under torchrun

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
# Command line: the Table 2 comparison, the overlap, the picture, the executors

DEFAULTS = dict(pp=8, nmb=20, F=1.0, B=2.0, W=1.0, FB=3.0, p2p=0.0, a2a=0.5, svg="auto", schedule="all", seed=0,
                exec=False, ranks=False)   # svg: auto = assets/dualpipe_pp{pp}.svg, empty = none


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
    cfg = parse_or_exit(PROG, argv, DEFAULTS)
    if cfg["schedule"] not in ("all", *SCHEDULES):
        die(PROG, f"--schedule must be all, {', '.join(SCHEDULES)}; got {cfg['schedule']!r}")
    pp, nmb, names = cfg["pp"], cfg["nmb"], list(SCHEDULES) if cfg["schedule"] == "all" else [cfg["schedule"]]
    try:
        if cfg["ranks"]:
            if "RANK" not in os.environ:
                die(PROG, "--ranks needs real ranks: torchrun --nproc_per_node=PP dualpipe_demo.py --ranks")
            return run_ranks(names, nmb, cfg["seed"])
        for n in SCHEDULES:
            SCHEDULES[n](pp, nmb)                       # check the user's sizes before printing anything
    except ValueError as e:
        die(PROG, str(e))
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
