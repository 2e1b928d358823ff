"""Inline SVG charts: the report must open from disk with no network and no script.

Why hand-drawn SVG: two bar charts do not justify a plotting library on the CLI's install, and SVG
inside the page keeps the report one file plus its pictures.
"""

from __future__ import annotations

from html import escape

BAR = "#1e88e5"
AXIS = "#555"


def histogram_svg(counts: dict[str, int], *, width: int = 640, height: int = 240,
                  title: str = "") -> str:
    """Vertical bars, one per key (already in display order), labelled with their count."""
    items = list(counts.items())
    if not items:
        return "<p>No images.</p>"
    top = max(v for _, v in items) or 1
    left, bottom, pad = 40, 30, 18
    plot_w, plot_h = width - left - 10, height - bottom - pad
    step = plot_w / len(items)
    bar_w = max(2.0, step * 0.8)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'role="img" aria-label="{escape(title)}">']
    out.append(f'<line x1="{left}" y1="{pad + plot_h}" x2="{width - 10}" y2="{pad + plot_h}" '
               f'stroke="{AXIS}"/>')
    for i, (label, value) in enumerate(items):
        h = plot_h * value / top
        x = left + i * step + (step - bar_w) / 2
        y = pad + plot_h - h
        out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
                   f'fill="{BAR}"><title>{escape(str(label))}: {value}</title></rect>')
        out.append(f'<text x="{x + bar_w / 2:.1f}" y="{y - 3:.1f}" font-size="11" '
                   f'text-anchor="middle">{value}</text>')
        out.append(f'<text x="{x + bar_w / 2:.1f}" y="{height - 10}" font-size="11" '
                   f'text-anchor="middle">{escape(str(label))}</text>')
    out.append("</svg>")
    return "".join(out)


def hbar_svg(values: dict[str, float], *, width: int = 640, row: int = 18,
             vmax: float = 1.0, title: str = "") -> str:
    """Horizontal bars in [0, vmax], one row per name, value printed at the bar's end."""
    label_w, pad = 150, 6
    height = row * len(values) + 2 * pad
    plot_w = width - label_w - 50
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'role="img" aria-label="{escape(title)}">']
    for i, (name, value) in enumerate(values.items()):
        y = pad + i * row
        w = plot_w * max(0.0, min(value, vmax)) / vmax
        out.append(f'<text x="{label_w - 6}" y="{y + row * 0.7:.1f}" font-size="12" '
                   f'text-anchor="end">{escape(name)}</text>')
        out.append(f'<rect x="{label_w}" y="{y + 2}" width="{w:.1f}" height="{row - 4}" '
                   f'fill="{BAR}"><title>{escape(name)}: {value:.3f}</title></rect>')
        out.append(f'<text x="{label_w + w + 4:.1f}" y="{y + row * 0.7:.1f}" '
                   f'font-size="11">{value:.2f}</text>')
    out.append("</svg>")
    return "".join(out)
