"""Plots as inline SVG strings: line charts, heatmaps, scatter plots and bar charts.

No plotting library and nothing fetched: each function returns one ``<svg>`` element that a
browser draws as it is. Every drawn series carries ``data-series`` and ``data-points`` (the number
of points it draws) so a test, or a person reading the source, can check what is on the page.
Non-finite values are left out of a line (the line breaks there).
"""
from __future__ import annotations

import html
import math
from typing import Sequence

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")
W, H = 540, 290
PAD_L, PAD_R, PAD_T, PAD_B = 66, 14, 30, 42


def esc(x) -> str:
    return html.escape(str(x), quote=True)


def fmt(v: float) -> str:
    """A short tick label: 3 significant digits, scientific for very small/large magnitudes."""
    if v == 0 or not math.isfinite(v):
        return "0" if v == 0 else str(v)
    a = abs(v)
    if a >= 1e6 or a < 1e-4:
        return f"{v:.2g}"
    if a >= 1e3:
        return f"{v:.0f}"
    return f"{v:.3g}"


def tick_label(v: float, step: float) -> str:
    """A tick value with as many decimals as the tick step needs (0.5 steps: ``159.5``)."""
    if step <= 0 or not math.isfinite(step) or abs(v) >= 1e6 or (v != 0 and abs(v) < 1e-4):
        return fmt(v)
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return f"{v:.{min(decimals, 6)}f}"


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering ``[lo, hi]`` (steps of 1, 2 or 5 x 10^k)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    if not step > 0 or start + step == start:  # a span below float resolution at this magnitude
        return [lo, hi]
    out = []
    for k in range(4 * max(n, 1) + 2):  # bounded: about n ticks, never an endless loop
        t = start + k * step
        if t > hi + step * 1e-9:
            break
        out.append(round(t, 12))
    return out


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class _Axes:
    """Maps data coordinates to pixels inside the plot area; ``log_y`` plots log10(y)."""

    def __init__(self, xs: Sequence[float], ys: Sequence[float], log_y: bool = False, w: int = W, h: int = H):
        self.log_y, self.w, self.h = log_y, w, h
        ys = [math.log10(y) for y in ys if y > 0] if log_y else list(ys)
        self.x0, self.x1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
        self.y0, self.y1 = (min(ys), max(ys)) if ys else (0.0, 1.0)
        if self.x1 == self.x0:
            self.x0, self.x1 = self.x0 - 1, self.x1 + 1
        if self.y1 == self.y0:
            d = abs(self.y0) * 0.05 or 1.0
            self.y0, self.y1 = self.y0 - d, self.y1 + d
        pad = (self.y1 - self.y0) * 0.05
        self.y0, self.y1 = self.y0 - pad, self.y1 + pad

    def px(self, x: float) -> float:
        return PAD_L + (x - self.x0) / (self.x1 - self.x0) * (self.w - PAD_L - PAD_R)

    def py(self, y: float) -> float:
        v = math.log10(y) if self.log_y else y
        return self.h - PAD_B - (v - self.y0) / (self.y1 - self.y0) * (self.h - PAD_T - PAD_B)

    def frame(self, title: str, xlabel: str, ylabel: str) -> list[str]:
        w, h = self.w, self.h
        out = [f'<text class="title" x="{w / 2:.0f}" y="18" text-anchor="middle">{esc(title)}</text>',
               f'<rect class="frame" x="{PAD_L}" y="{PAD_T}" width="{w - PAD_L - PAD_R}" height="{h - PAD_T - PAD_B}"/>']
        xt = nice_ticks(self.x0, self.x1, 6)
        for t in xt:
            x = self.px(t)
            label = tick_label(t, xt[1] - xt[0] if len(xt) > 1 else 0)
            out.append(f'<line class="grid" x1="{x:.1f}" y1="{PAD_T}" x2="{x:.1f}" y2="{h - PAD_B}"/>'
                       f'<text class="tick" x="{x:.1f}" y="{h - PAD_B + 14}" text-anchor="middle">{label}</text>')
        yt = nice_ticks(self.y0, self.y1, 5)
        for t in yt:
            y = h - PAD_B - (t - self.y0) / (self.y1 - self.y0) * (h - PAD_T - PAD_B)
            label = fmt(10 ** t) if self.log_y else tick_label(t, yt[1] - yt[0] if len(yt) > 1 else 0)
            out.append(f'<line class="grid" x1="{PAD_L}" y1="{y:.1f}" x2="{w - PAD_R}" y2="{y:.1f}"/>'
                       f'<text class="tick" x="{PAD_L - 6}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
        out.append(f'<text class="label" x="{(PAD_L + w - PAD_R) / 2:.0f}" y="{h - 6}" text-anchor="middle">{esc(xlabel)}</text>')
        out.append(f'<text class="label" transform="translate(14 {(PAD_T + h - PAD_B) / 2:.0f}) rotate(-90)" '
                   f'text-anchor="middle">{esc(ylabel)}</text>')
        return out


def line_chart(series: Sequence[dict], *, title: str, xlabel: str = "step", ylabel: str = "",
               markers: Sequence[dict] = (), log_y: bool = False, name: str = "") -> str:
    """A line chart of one or more series.

    Args:
        series: dicts with ``name``, ``x``, ``y`` (same lengths) and optional ``color``,
            ``width`` (px), ``opacity``, ``dots`` (draw a dot per point, for sparse evals).
        title, xlabel, ylabel: texts.
        markers: dicts with ``x``, ``y``, ``label``: a ring and a label (the best step).
        log_y: log10 y axis (non-positive values are left out).
        name: ``data-plot`` of the ``<svg>`` (what tests look for).
    """
    pts_all = [(x, y) for s in series for x, y in zip(s["x"], s["y"])
               if _finite(x) and _finite(y) and (y > 0 or not log_y)]
    ax = _Axes([p[0] for p in pts_all], [p[1] for p in pts_all], log_y)
    out = [f'<svg class="plot" data-plot="{esc(name or title)}" viewBox="0 0 {W} {H}" width="{W}" height="{H}" '
           f'xmlns="http://www.w3.org/2000/svg" role="img"><title>{esc(title)}</title>']
    out += ax.frame(title, xlabel, ylabel)
    legend = []
    for i, s in enumerate(series):
        color = s.get("color") or PALETTE[i % len(PALETTE)]
        pts = [(x, y) for x, y in zip(s["x"], s["y"]) if _finite(x) and _finite(y) and (y > 0 or not log_y)]
        d, pen = [], "M"
        prev_ok = True
        for x, y in zip(s["x"], s["y"]):
            ok = _finite(x) and _finite(y) and (y > 0 or not log_y)
            if ok:
                d.append(f"{pen}{ax.px(x):.1f},{ax.py(y):.1f}")
                pen = "L"
            elif prev_ok:
                pen = "M"
            prev_ok = ok
        attrs = (f'data-series="{esc(s["name"])}" data-points="{len(pts)}" stroke="{color}" '
                 f'stroke-width="{s.get("width", 1.8)}" stroke-opacity="{s.get("opacity", 1.0)}"')
        out.append(f'<path class="series" fill="none" {attrs} d="{" ".join(d)}"><title>{esc(s["name"])}</title></path>')
        if s.get("dots"):
            for x, y in pts:
                out.append(f'<circle class="dot" cx="{ax.px(x):.1f}" cy="{ax.py(y):.1f}" r="2.6" fill="{color}">'
                           f'<title>{esc(s["name"])} step {fmt(x)}: {fmt(y)}</title></circle>')
        if not s.get("hide_legend"):
            legend.append((s["name"], color, s.get("opacity", 1.0)))
    for m in markers:
        if _finite(m["x"]) and _finite(m["y"]):
            x, y = ax.px(m["x"]), ax.py(m["y"])
            anchor = "end" if x > W - 110 else ("start" if x < PAD_L + 60 else "middle")
            ty = y - 10 if y > PAD_T + 16 else y + 18
            text = (f'<text class="mark" x="{x:.1f}" y="{ty:.1f}" text-anchor="{anchor}">{esc(m["label"])}</text>'
                    if m.get("show_label", True) else "")
            out.append(f'<g class="marker" data-x="{m["x"]}"><circle cx="{x:.1f}" cy="{y:.1f}" r="6" fill="none" '
                       f'stroke="#000" stroke-width="1.5"><title>{esc(m.get("label", ""))}</title></circle>{text}</g>')
    col_w = (W - PAD_L) // 2
    for i, (label, color, op) in enumerate(legend):  # two columns under the plot
        x, y = PAD_L + col_w * (i % 2), H + 6 + 14 * (i // 2)
        out.append(f'<g class="legend"><line x1="{x}" y1="{y - 4}" x2="{x + 16}" y2="{y - 4}" '
                   f'stroke="{color}" stroke-width="3" stroke-opacity="{max(op, 0.35)}"/>'
                   f'<text class="tick" x="{x + 20}" y="{y}">{esc(label[:40])}</text></g>')
    out.append("</svg>")
    height = H + 14 * ((len(legend) + 1) // 2) + 4
    out[0] = out[0].replace(f'viewBox="0 0 {W} {H}" width="{W}" height="{H}"',
                            f'viewBox="0 0 {W} {height}" width="{W}" height="{height}"', 1)
    return "".join(out)


def heatmap(matrix: Sequence[Sequence[float]], rows: Sequence[str], cols: Sequence[str], *, title: str,
            xlabel: str = "predicted", ylabel: str = "true", name: str = "") -> str:
    """A heatmap with the value in each cell (a confusion matrix: rows true, columns predicted).

    Cell shade is ``v / max(row sum)`` of its row, so each true class reads as a distribution.
    """
    n_r, n_c = len(rows), len(cols)
    cell = max(18, min(48, 420 // max(n_r, n_c, 1)))
    left, top = 110, 40
    w, h = left + cell * n_c + 20, top + cell * n_r + 60
    out = [f'<svg class="plot heatmap" data-plot="{esc(name or title)}" viewBox="0 0 {w} {h}" width="{w}" '
           f'height="{h}" xmlns="http://www.w3.org/2000/svg"><title>{esc(title)}</title>'
           f'<text class="title" x="{w / 2:.0f}" y="18" text-anchor="middle">{esc(title)}</text>']
    for i, row in enumerate(matrix):
        total = sum(v for v in row if _finite(v)) or 1
        out.append(f'<text class="tick" x="{left - 6}" y="{top + cell * i + cell / 2 + 4:.0f}" '
                   f'text-anchor="end">{esc(str(rows[i])[:16])}</text>')
        for j, v in enumerate(row):
            share = (v / total) if _finite(v) else 0.0
            light = 97 - 60 * share
            ink = "#fff" if share > 0.55 else "#111"
            out.append(f'<rect class="cell" data-row="{i}" data-col="{j}" x="{left + cell * j}" y="{top + cell * i}" '
                       f'width="{cell}" height="{cell}" fill="hsl(212,70%,{light:.0f}%)" stroke="#fff">'
                       f'<title>{esc(rows[i])} -> {esc(cols[j])}: {fmt(v)}</title></rect>'
                       f'<text class="cellv" x="{left + cell * j + cell / 2:.0f}" y="{top + cell * i + cell / 2 + 4:.0f}" '
                       f'text-anchor="middle" fill="{ink}">{fmt(v) if _finite(v) else ""}</text>')
    for j, c in enumerate(cols):
        x = left + cell * j + cell / 2
        y = top + cell * n_r + 8
        out.append(f'<text class="tick" transform="translate({x:.0f} {y}) rotate(35)">{esc(str(c)[:16])}</text>')
    out.append(f'<text class="label" x="{left + cell * n_c / 2:.0f}" y="{h - 4}" text-anchor="middle">{esc(xlabel)}</text>'
               f'<text class="label" transform="translate(12 {top + cell * n_r / 2:.0f}) rotate(-90)" '
               f'text-anchor="middle">{esc(ylabel)}</text></svg>')
    return "".join(out)


def scatter(xs: Sequence[float], ys: Sequence[float], *, title: str, xlabel: str, ylabel: str, name: str = "",
            diagonal: bool = False) -> str:
    """A scatter plot (predicted vs gold), optionally with the ``y = x`` diagonal."""
    pts = [(x, y) for x, y in zip(xs, ys) if _finite(x) and _finite(y)]
    ax = _Axes([p[0] for p in pts], [p[1] for p in pts])
    out = [f'<svg class="plot" data-plot="{esc(name or title)}" viewBox="0 0 {W} {H}" width="{W}" height="{H}" '
           f'xmlns="http://www.w3.org/2000/svg"><title>{esc(title)}</title>']
    out += ax.frame(title, xlabel, ylabel)
    if diagonal and pts:
        lo, hi = max(ax.x0, ax.y0), min(ax.x1, ax.y1)
        if hi > lo:
            out.append(f'<line class="diag" x1="{ax.px(lo):.1f}" y1="{ax.py(lo):.1f}" x2="{ax.px(hi):.1f}" '
                       f'y2="{ax.py(hi):.1f}" stroke="#999" stroke-dasharray="4 3"/>')
    out.append(f'<g class="series" data-series="points" data-points="{len(pts)}">')
    for x, y in pts:
        out.append(f'<circle cx="{ax.px(x):.1f}" cy="{ax.py(y):.1f}" r="2.4" fill="{PALETTE[0]}" fill-opacity="0.55"/>')
    out.append("</g></svg>")
    return "".join(out)


def bar_chart(labels: Sequence[str], values: Sequence[float], *, title: str, name: str = "",
              colors: Sequence[str] | None = None) -> str:
    """Horizontal bars, one per label (per-type F1, topic sizes)."""
    n = len(labels)
    bar, left = 18, 130
    w, h = W, 40 + n * (bar + 6) + 10
    vmax = max([v for v in values if _finite(v)] + [1e-12])
    out = [f'<svg class="plot bars" data-plot="{esc(name or title)}" viewBox="0 0 {w} {h}" width="{w}" height="{h}" '
           f'xmlns="http://www.w3.org/2000/svg"><title>{esc(title)}</title>'
           f'<text class="title" x="{w / 2:.0f}" y="18" text-anchor="middle">{esc(title)}</text>'
           f'<g class="series" data-series="bars" data-points="{n}">']
    for i, (lab, v) in enumerate(zip(labels, values)):
        y = 32 + i * (bar + 6)
        bw = (v / vmax) * (w - left - 80) if _finite(v) and v > 0 else 0
        color = (colors[i] if colors else PALETTE[0])
        out.append(f'<text class="tick" x="{left - 6}" y="{y + 13}" text-anchor="end">{esc(str(lab)[:20])}</text>'
                   f'<rect x="{left}" y="{y}" width="{bw:.1f}" height="{bar}" fill="{color}"><title>{esc(lab)}: {fmt(v)}</title></rect>'
                   f'<text class="tick" x="{left + bw + 4:.1f}" y="{y + 13}">{fmt(v) if _finite(v) else "n/a"}</text>')
    out.append("</g></svg>")
    return "".join(out)
