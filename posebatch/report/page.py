"""The report's ``index.html``: plain HTML, inline CSS and SVG, pictures by relative path.

Why no script and no external style: the page is opened from a disk or a bucket on machines that
may have no network, and it must look the same there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from html import escape
from typing import Any

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;
background:#fff;max-width:1200px}
h1{margin-bottom:4px}.muted{color:#666}
table{border-collapse:collapse;margin:8px 0 16px}
td,th{border:1px solid #ddd;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right}
.gallery{display:flex;flex-wrap:wrap;gap:12px}
.gallery figure{margin:0;width:240px}
.gallery img{width:240px;height:180px;object-fit:contain;background:#111;display:block}
.gallery figcaption{font-size:12px;word-break:break-all}
"""


@dataclass
class Tile:
    key: str
    thumb: str
    full: str
    caption: str


@dataclass
class Page:
    title: str
    summary_rows: list[tuple[str, str]]
    failures: list[dict[str, Any]]
    histogram_svg: str
    keypoint_svg: str
    galleries: list[tuple[str, str, list[Tile]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def render(page: Page) -> str:
    e = escape
    out = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{e(page.title)}</title><style>{CSS}</style></head><body>",
           f"<h1>{e(page.title)}</h1>"]
    out += [f'<p class="muted">{e(n)}</p>' for n in page.notes]
    out.append("<h2>Summary</h2><table>")
    out += [f'<tr><th>{e(k)}</th><td class="num">{e(v)}</td></tr>' for k, v in page.summary_rows]
    out.append("</table>")
    out.append("<h2>Valid persons per image</h2>" + page.histogram_svg)
    out.append("<h2>Mean keypoint score (valid persons)</h2>" + page.keypoint_svg)
    out.append("<h2>Failures</h2>")
    if page.failures:
        out.append("<table><tr><th>error_code</th><th>images</th><th>message</th>"
                   "<th>example</th></tr>")
        for f in page.failures:
            out.append(f'<tr><td>{e(str(f.get("error_code")))}</td>'
                       f'<td class="num">{e(str(f.get("images")))}</td>'
                       f'<td>{e(str(f.get("error_msg")))}</td>'
                       f'<td>{e(str(f.get("example")))}</td></tr>')
        out.append("</table>")
    else:
        out.append("<p>None.</p>")
    for anchor, heading, tiles in page.galleries:
        out.append(f'<h2 id="{e(anchor)}">{e(heading)}</h2>')
        if not tiles:
            out.append("<p>No images.</p>")
            continue
        out.append('<div class="gallery">')
        for t in tiles:
            out.append(f'<figure><a href="{e(t.full)}"><img src="{e(t.thumb)}" '
                       f'alt="{e(t.key)}"></a><figcaption>{e(t.caption)}</figcaption></figure>')
        out.append("</div>")
    out.append("</body></html>\n")
    return "\n".join(out)
