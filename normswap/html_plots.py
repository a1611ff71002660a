"""SVG plots of the HTML reports (per-layer error curves on a log axis, bar plots) and the small
formatting helpers the report pages share.  Pure string building: no I/O.

``log_plot_svg`` is about 120 lines: one SVG drawing (axes, decades, three series, tolerance,
legend), kept in one piece so its coordinates read together.
"""

from __future__ import annotations

import html as _html
import math
from typing import Any, Sequence

__all__ = ["log_plot_svg", "bar_plot_svg", "line_plot_svg", "OWN_COLOR", "ACC_COLOR", "TOL_COLOR", "NAIVE_COLOR", "FITTED_COLOR"]

OWN_COLOR = "#c0392b"
ACC_COLOR = "#2e6fba"
TOL_COLOR = "#555555"
NAIVE_COLOR = "#e67e22"
FITTED_COLOR = "#27ae60"


def _e(x: Any) -> str:
    return _html.escape("" if x is None else str(x), quote=True)


def _name(x: Any) -> str:
    """A module path / value name, escaped, with break opportunities after '.', '_', '/' (never cut)."""
    text = "" if x is None else str(x)
    if len(text) <= 28:  # short names stay on one line
        return f'<span style="white-space:nowrap">{_e(text)}</span>'
    out = _e(text)
    for ch in (".", "_", "/"):
        out = out.replace(ch, ch + "<wbr>")
    return out


def _num(x: Any) -> float | None:
    """A float from a report value (None, numbers, "inf"/"nan" strings)."""
    if x is None or isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, str):
        try:
            return float(x)
        except ValueError:
            return None
    return None


def _fmt(x: Any, digits: int = 3) -> str:
    v = _num(x)
    if v is None:
        return "—" if x is None else _e(x)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    if v == 0:
        return "0"
    if isinstance(x, int) and not isinstance(x, bool):
        return str(x)
    return f"{v:.{digits}g}"


def _pct(x: Any) -> str:
    v = _num(x)
    return "—" if v is None else f"{100 * v:.1f}%"


# --------------------------------------------------------------------------- SVG plots


def _nice_decades(vals: list[float]) -> tuple[int, int]:
    pos = [v for v in vals if v is not None and math.isfinite(v) and v > 0]
    if not pos:
        return -8, 0
    lo = math.floor(math.log10(min(pos)))
    hi = math.ceil(math.log10(max(pos)))
    if hi <= lo:
        hi = lo + 1
    if hi - lo < 3:  # at least 3 decades so that the tolerance line and the points breathe
        lo = hi - 3
    return lo, hi


def _sup(n: int) -> str:
    table = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")
    return "10" + str(n).translate(table)


_TICK_CHARS = 26  # a rotated tick shows at most this many characters (the hover shows all)


def _tick_layout(n: int, names: Sequence[str] | None) -> tuple[list[str] | None, int]:
    """Rotated name ticks (``#i name``, long names shortened from the left) and the extra bottom
    margin they need; (None, 0) when there are no names or too many layers for ticks."""
    if not names or n > 60:
        return None, 0
    ticks = []
    for i, nm in enumerate(names):
        text = f"{i} {nm}"
        ticks.append(text if len(text) <= _TICK_CHARS else f"{i} …{str(nm)[-(_TICK_CHARS - len(str(i)) - 2):]}")
    longest = max(len(t) for t in ticks)
    return ticks, max(0, int(longest * 6.2 * 0.77) - 8)  # 11px font, rotated 50 degrees


def _hover_bands(n: int, x0: float, pw: float, top: float, height: float, tips: Sequence[str] | None) -> list[str]:
    """Transparent full-height columns, one per position, whose <title> names the layer: hovering
    anywhere over a layer's column (not only its marker) shows which layer it is."""
    if not tips:
        return []
    w = pw / max(n, 1)
    return [f'<rect x="{x0 + w * i:.1f}" y="{top}" width="{w:.1f}" height="{height}" fill="transparent">'
            f"<title>{_e(tips[i])}</title></rect>" for i in range(min(n, len(tips)))]


def _x_ticks(n: int, x, base_y: float, labels, ticks, tips) -> list[str]:
    out = []
    if ticks:
        for i in range(n):
            tip = f"<title>{_e(tips[i])}</title>" if tips and i < len(tips) else ""
            out.append(f'<line x1="{x(i):.1f}" x2="{x(i):.1f}" y1="{base_y}" y2="{base_y + 4}" stroke="#888"/>')
            out.append(f'<text x="{x(i):.1f}" y="{base_y + 12}" text-anchor="end" fill="#333" '
                       f'transform="rotate(-50 {x(i):.1f} {base_y + 12})">{_e(ticks[i])}{tip}</text>')
        return out
    step = max(1, math.ceil(n / 30))
    for i in range(0, n, step):
        lab = labels[i] if labels else str(i)
        tip = f"<title>{_e(tips[i])}</title>" if tips and i < len(tips) else ""
        out.append(f'<line x1="{x(i):.1f}" x2="{x(i):.1f}" y1="{base_y}" y2="{base_y + 4}" stroke="#888"/>')
        out.append(f'<text x="{x(i):.1f}" y="{base_y + 16}" text-anchor="middle" fill="#333">{_e(lab)}{tip}</text>')
    return out


def log_plot_svg(
    series: Sequence[dict],
    n: int,
    *,
    labels: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
    tooltips: Sequence[str] | None = None,
    tolerance: Sequence[float | None] | None = None,
    highlight: int | None = None,
    highlight_label: str | None = None,
    ylabel: str = "error",
    xlabel: str = "layer (execution order)",
    width: int = 940,
    height: int = 340,
) -> str:
    """A log-scale line/marker plot along ``n`` positions.

    ``series``: dicts with ``name``, ``values`` (n numbers or None), ``color``,
    optional ``dash`` and ``marker`` ("circle" | "square").  ``tolerance``: a
    per-position tolerance drawn as a dashed step line.  ``names``: the layer of each position,
    shown as rotated x ticks (up to 60 positions) and on hover over its column.
    """
    ticks, extra = _tick_layout(n, names)
    ml, mr, mt, mb = 70, 20, 18, 58
    pw, ph = width - ml - mr, height - mt - mb
    height += extra
    allv = [_num(v) for s in series for v in s["values"]] + [_num(t) for t in (tolerance or [])]
    lo, hi = _nice_decades([v for v in allv if v is not None])

    def y(v: float) -> float:
        return mt + ph - (math.log10(v) - lo) / (hi - lo) * ph

    def x(i: int) -> float:  # slot centres, as in bar_plot_svg, so stacked plots line up
        return ml + pw * (i + 0.5) / max(n, 1)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="11" role="img">',
        f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="#fbfbfc" stroke="#bbb"/>',
    ]
    out += _hover_bands(n, ml, pw, mt, ph, tooltips or names)
    for d in range(lo, hi + 1):
        yy = y(10.0**d)
        out.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#e3e3e3"/>')
        out.append(f'<text x="{ml - 6}" y="{yy + 4:.1f}" text-anchor="end" fill="#333">{_sup(d)}</text>')
    out += _x_ticks(n, x, mt + ph, labels, ticks, tooltips or names)
    out.append(f'<text x="{ml + pw / 2}" y="{height - 22}" text-anchor="middle" fill="#333">{_e(xlabel)}</text>')
    out.append(
        f'<text transform="translate(16,{mt + ph / 2}) rotate(-90)" text-anchor="middle" fill="#333">{_e(ylabel)} (log scale)</text>'
    )
    if highlight is not None and 0 <= highlight < n:
        hx = x(highlight)
        out.append(f'<line x1="{hx:.1f}" x2="{hx:.1f}" y1="{mt}" y2="{mt + ph}" stroke="{OWN_COLOR}" stroke-width="1.5" stroke-dasharray="2,3"/>')
        if highlight_label:
            anchor = "start" if hx < ml + pw * 0.6 else "end"
            dx = 5 if anchor == "start" else -5
            out.append(
                f'<text x="{hx + dx:.1f}" y="{mt + 13}" text-anchor="{anchor}" fill="{OWN_COLOR}" font-weight="bold">{_e(highlight_label)}</text>'
            )
    if tolerance:
        pts = []
        for i, t in enumerate(tolerance):
            tv = _num(t)
            if tv is None or not math.isfinite(tv) or tv <= 0:
                continue
            half = pw / max(n, 1) / 2
            x0, x1 = x(i) - half, x(i) + half
            pts.append(f"M{x0:.1f},{y(tv):.1f} H{x1:.1f}")
        if pts:
            out.append(f'<path d="{" ".join(pts)}" stroke="{TOL_COLOR}" stroke-width="1.6" stroke-dasharray="6,4" fill="none"><title>tolerance</title></path>')
    for s in series:
        color, dash = s.get("color", "#333"), s.get("dash")
        marker = s.get("marker", "circle")
        segs, cur = [], []
        points = []
        for i, v in enumerate(s["values"]):
            fv = _num(v)
            if fv is None:
                if cur:
                    segs.append(cur)
                cur = []
                continue
            if math.isnan(fv) or math.isinf(fv):
                py, kind = mt + 1, "top"
            elif fv <= 0:
                py, kind = mt + ph - 1, "zero"
            else:
                py, kind = min(max(y(fv), mt + 1), mt + ph - 1), "val"
            points.append((i, x(i), py, kind, fv))
            if kind != "val":  # a line into the floor/ceiling would read as a value: break it
                if cur:
                    segs.append(cur)
                cur = []
                continue
            cur.append((x(i), py))
        if cur:
            segs.append(cur)
        for seg in segs:
            if len(seg) > 1 and s.get("line", True):
                d = "M" + " L".join(f"{a:.1f},{b:.1f}" for a, b in seg)
                extra = f' stroke-dasharray="{dash}"' if dash else ""
                out.append(f'<path d="{d}" stroke="{color}" stroke-width="1.7" fill="none"{extra}/>')
        for i, px, py, kind, fv in points:
            fill = "#fff" if kind == "zero" else color
            tip = (tooltips[i] + " — " if tooltips else "") + f'{s["name"]}: {_fmt(fv)}'
            if marker == "square":
                out.append(f'<rect x="{px - 3.5:.1f}" y="{py - 3.5:.1f}" width="7" height="7" fill="{fill}" stroke="{color}" stroke-width="1.3"><title>{_e(tip)}</title></rect>')
            else:
                out.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3.8" fill="{fill}" stroke="{color}" stroke-width="1.3"><title>{_e(tip)}</title></circle>')
    out.append("</svg>")
    legend = ['<div class="legend small">']
    for s in series:
        style = f"background:{s.get('color', '#333')}"
        legend.append(f'<span><i class="sw" style="{style}"></i>{_e(s["name"])}</span>')
    if tolerance:
        legend.append(f'<span><i class="sw" style="background:repeating-linear-gradient(90deg,{TOL_COLOR} 0 6px,transparent 6px 10px)"></i>tolerance</span>')
    legend.append('<span class="muted">hollow marker on the bottom edge: exactly 0; on the top edge: ∞/NaN</span></div>')
    return "".join(out) + "".join(legend)


def bar_plot_svg(
    values: Sequence[float | None],
    *,
    labels: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
    tooltips: Sequence[str] | None = None,
    color: str = ACC_COLOR,
    ylabel: str = "",
    xlabel: str = "layer (execution order)",
    width: int = 940,
    height: int = 220,
) -> str:
    """A linear bar chart with the value written above each bar."""
    n = len(values)
    ticks, extra = _tick_layout(n, names)
    ml, mr, mt, mb = 70, 20, 18, 50
    pw, ph = width - ml - mr, height - mt - mb
    height += extra
    vals = [_num(v) for v in values]
    top = max([v for v in vals if v is not None and math.isfinite(v)] or [1.0])
    top = top if top > 0 else 1.0
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="11" role="img">',
        f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="#fbfbfc" stroke="#bbb"/>',
    ]
    out += _hover_bands(n, ml, pw, mt, ph, tooltips or names)
    for frac in (0, 0.5, 1.0):
        yy = mt + ph - frac * ph
        out.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#e3e3e3"/>')
        out.append(f'<text x="{ml - 6}" y="{yy + 4:.1f}" text-anchor="end" fill="#333">{_fmt(top * frac)}</text>')
    slot = pw / max(n, 1)
    bw = max(2.0, min(36.0, slot * 0.7))
    out += _x_ticks(n, lambda i: ml + slot * (i + 0.5), mt + ph, labels, ticks, tooltips or names)
    for i, v in enumerate(vals):
        cx = ml + slot * (i + 0.5)
        if v is None or not math.isfinite(v):
            out.append(f'<text x="{cx:.1f}" y="{mt + ph - 4}" text-anchor="middle" fill="#999">—</text>')
            continue
        h = max(0.0, v) / top * ph
        tip = (tooltips[i] + ": " if tooltips else "") + _fmt(v)
        out.append(f'<rect x="{cx - bw / 2:.1f}" y="{mt + ph - h:.1f}" width="{bw:.1f}" height="{h:.1f}" fill="{color}"><title>{_e(tip)}</title></rect>')
        if n <= 60:
            out.append(f'<text x="{cx:.1f}" y="{mt + ph - h - 3:.1f}" text-anchor="middle" fill="#222">{_fmt(v)}</text>')
    out.append(f'<text x="{ml + pw / 2}" y="{height - 14}" text-anchor="middle" fill="#333">{_e(xlabel)}</text>')
    out.append(f'<text transform="translate(16,{mt + ph / 2}) rotate(-90)" text-anchor="middle" fill="#333">{_e(ylabel)}</text>')
    out.append("</svg>")
    return "".join(out)


# --------------------------------------------------------------------------- check


def nice_ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    """Tick values in [lo, hi] at a round step (1, 2 or 5 times a power of ten), about ``n`` of them."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    count = int(math.floor((hi - first) / step + 1e-9)) + 1
    return [round(first + k * step, 12) for k in range(count)]


def line_plot_svg(points: Sequence[tuple[float, float, str]], *, color: str = FITTED_COLOR, ylabel: str = "",
                  xlabel: str = "", percent: bool = False, width: int = 940, height: int = 280) -> str:
    """A linear line plot of ``(x, y, tooltip)`` points (e.g. held-back agreement against
    seconds); ``percent``: y in [0, 1] drawn as 0-100 %."""
    pts = [(float(a), float(b), t) for a, b, t in points if _num(a) is not None and _num(b) is not None]
    ml, mr, mt, mb = 70, 20, 18, 50
    pw, ph = width - ml - mr, height - mt - mb
    if not pts:
        return '<p class="muted">No points to plot.</p>'
    x0, x1 = 0.0, max(max(p[0] for p in pts), 1e-9)
    ys = [p[1] for p in pts]
    lo, hi = (0.0, 1.0) if percent else (min(ys), max(ys))
    if percent:  # never above 100 %: a flat 100 % curve gets the band 90-100 %
        lo = max(0.0, min(0.9, math.floor(min(ys) * 10) / 10))
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5

    def X(v):
        return ml + (v - x0) / (x1 - x0) * pw

    def Y(v):
        return mt + ph - (v - lo) / (hi - lo) * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           'font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="11" role="img">',
           f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="#fbfbfc" stroke="#bbb"/>']
    for v in nice_ticks(lo, hi):
        out.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{Y(v):.1f}" y2="{Y(v):.1f}" stroke="#e3e3e3"/>')
        out.append(f'<text x="{ml - 6}" y="{Y(v) + 4:.1f}" text-anchor="end" fill="#333">'
                   f'{_e(f"{100 * v:.0f}%" if percent else _fmt(v))}</text>')
    for v in nice_ticks(x0, x1):
        out.append(f'<text x="{X(v):.1f}" y="{mt + ph + 16}" text-anchor="middle" fill="#333">{_e(_fmt(v))}</text>')
    out.append(f'<text x="{ml + pw / 2}" y="{height - 14}" text-anchor="middle" fill="#333">{_e(xlabel)}</text>')
    out.append(f'<text transform="translate(16,{mt + ph / 2}) rotate(-90)" text-anchor="middle" fill="#333">{_e(ylabel)}</text>')
    d = "M" + " L".join(f"{X(a):.1f},{Y(b):.1f}" for a, b, _ in pts)
    out.append(f'<path d="{d}" stroke="{color}" stroke-width="1.7" fill="none"/>')
    for a, b, tip in pts:
        out.append(f'<circle cx="{X(a):.1f}" cy="{Y(b):.1f}" r="3.8" fill="{color}" stroke="{color}"><title>{_e(tip)}</title></circle>')
    out.append("</svg>")
    return "".join(out)
