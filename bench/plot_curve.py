"""
Draw a training run's held-out curve as an SVG, without a plotting library: val bits/byte against the step and
against wall time (train.py's metrics.jsonl: eval records carry step, val_bpb, best and time in seconds since
launch). The best eval is marked; a dashed line marks the final one's level.

Run: python bench/plot_curve.py out-gpu/metrics.jsonl assets/gpu_curve.svg ["title"]
"""
import json
import sys


def panel(points, x0, y0, w, h, xlabel, ylo, yhi, best):
    """SVG elements of one panel: axes, ticks, the polyline, dots (the best one filled)."""
    xs = [x for x, _ in points]
    xhi = max(xs) * 1.05
    sx = lambda x: x0 + w * x / xhi
    sy = lambda y: y0 + h - h * (y - ylo) / (yhi - ylo)
    out = [f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#999"/>']
    for i in range(6):   # y ticks
        y = ylo + (yhi - ylo) * i / 5
        out.append(f'<line x1="{x0}" x2="{x0 + w}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{x0 - 6}" y="{sy(y) + 4:.1f}" text-anchor="end" font-size="11">{y:.2f}</text>')
    step = 10 ** len(str(int(xhi / 5))) // 10 or 1
    for mult in (1, 2, 5, 10):
        if xhi / (step * mult) <= 6:
            step *= mult
            break
    for i in range(0, int(xhi) + 1, step):   # x ticks
        out.append(f'<text x="{sx(i):.1f}" y="{y0 + h + 16}" text-anchor="middle" font-size="11">{i}</text>')
    out.append(f'<text x="{x0 + w / 2}" y="{y0 + h + 34}" text-anchor="middle" font-size="12">{xlabel}</text>')
    path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
    out.append(f'<polyline points="{path}" fill="none" stroke="#1f77b4" stroke-width="2"/>')
    for k, (x, y) in enumerate(points):
        fill = "#d62728" if k == best else "white"
        out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" fill="{fill}" stroke="#1f77b4"/>')
    fy = points[-1][1]
    out.append(f'<line x1="{x0}" x2="{x0 + w}" y1="{sy(fy):.1f}" y2="{sy(fy):.1f}" stroke="#888" '
               f'stroke-dasharray="4 3"/>')
    return out


def main(argv):
    src, dst = argv[0], argv[1]
    title = argv[2] if len(argv) > 2 else src
    evals = [r for r in map(json.loads, open(src)) if "val_bpb" in r]
    if not evals:
        raise SystemExit(f"error: no eval records (val_bpb) in {src}")
    bpb = [r["val_bpb"] for r in evals]
    best = min(range(len(bpb)), key=bpb.__getitem__)
    lo, hi = min(bpb), max(bpb)
    ylo, yhi = lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)
    W, H, w, h = 900, 360, 360, 240
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="14">{title}</text>',
           f'<text x="20" y="{40 + h / 2}" font-size="12" transform="rotate(-90 20 {40 + h / 2})" '
           f'text-anchor="middle">val bits per byte</text>']
    svg += panel([(r["step"], r["val_bpb"]) for r in evals], 80, 40, w, h, "step", ylo, yhi, best)
    svg += panel([(r["time"], r["val_bpb"]) for r in evals], 510, 40, w, h, "wall time since launch (s)", ylo, yhi,
                 best)
    b, f = evals[best], evals[-1]
    svg.append(f'<text x="{W / 2}" y="{H - 12}" text-anchor="middle" font-size="12">best {b["val_bpb"]:.4f} at step '
               f'{b["step"]} (red); final {f["val_bpb"]:.4f} at step {f["step"]} (dashed), {f["time"]:.0f} s</text>')
    svg.append("</svg>")
    with open(dst, "w") as fh:
        fh.write("\n".join(svg) + "\n")
    print(f"wrote {dst}: {len(evals)} evals, best {b['val_bpb']:.4f} at step {b['step']}, final {f['val_bpb']:.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])
