"""Pictures of what the inspection found: coloured terminal spans, HTML pages, the attention PNG."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Sequence

from .tokens import TokenView, segments

ANSI_BG = [45, 222, 151, 217, 117, 229, 183, 194]  # xterm-256 backgrounds, cycled per token
HTML_BG = ["#d6eaff", "#ffe3b3", "#c8f0c8", "#ffc9c9", "#d9ccff", "#fff3a8", "#f2d0f2", "#cfeeee"]


def ansi_spans(v: TokenView, colour: bool = True) -> str:
    """The text with each token on its own background colour (``|`` separators without colour)."""
    out = []
    for text, i in segments(v):
        shown = text.replace("\n", "⏎") if text else "·"
        if i is None:
            out.append(text)
        elif colour:
            out.append(f"\x1b[48;5;{ANSI_BG[i % len(ANSI_BG)]}m\x1b[30m{shown}\x1b[0m")
        else:
            out.append(f"[{shown}]")
    return "".join(out)


def _span_html(v: TokenView) -> str:
    out = []
    for text, i in segments(v):
        if i is None:
            out.append(html.escape(text))
            continue
        t = v.tokens[i]
        flags = " special" if t.special else " unk" if t.unknown else " byte" if t.byte else ""
        title = html.escape(f"#{i} id={t.id} piece={t.piece!r} decodes to {t.text!r}", quote=True)
        out.append(f'<span class="tok{flags}" style="background:{HTML_BG[i % len(HTML_BG)]}" title="{title}">'
                   f'{html.escape(text) if text else "·"}</span>')
    return "".join(out)


PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title><style>
body{{font-family:system-ui,sans-serif;margin:2em;max-width:70em}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top;font-size:.9em}}
.spans{{font-family:monospace;white-space:pre-wrap;line-height:1.9;font-size:1.05em}}
.tok{{border-radius:3px;padding:1px 0;margin:0 1px}} .special{{outline:1px dashed #555}}
.unk{{outline:2px solid #c00}} .byte{{outline:2px dotted #a60}} .ok{{color:#070}} .bad{{color:#b00}}
img{{max-width:100%}} code{{background:#f4f4f4}}
</style></head><body><h1>{title}</h1>{body}</body></html>"""


def page(title: str, body: str) -> str:
    return PAGE.format(title=html.escape(title), body=body)


def table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """An HTML table of dict rows (values escaped)."""
    if not rows:
        return ""
    cols = list(columns or rows[0].keys())
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return "" if x is None else str(x)


def tokenize_page(views: Sequence[TokenView], costs: Sequence[dict] = ()) -> str:
    """The tokenize HTML page: one coloured block per tokenizer, a summary table, a cost table."""
    parts = []
    if views:
        parts.append("<h2>Text</h2><pre>" + html.escape(views[0].text) + "</pre>")
        rows = []
        for v in views:
            rows.append({"tokenizer": v.name, "tokens": len(v.tokens), "content tokens": len(v.content),
                         "specials added": " ".join(v.specials), "chars/token": round(v.chars_per_token, 3),
                         "unknown": " ".join(v.unknown), "byte fallback": v.byte_pieces,
                         "round trip": "ok" if v.round_trip else f"differs at {v.first_difference()}"})
        parts.append(table(rows))
        for v in views:
            rt = ('<span class="ok">round trip ok</span>' if v.round_trip else
                  f'<span class="bad">round trip: {html.escape(v.decoded)!s}</span>')
            parts.append(f"<h2>{html.escape(v.name)} &middot; {len(v.tokens)} tokens &middot; {rt}</h2>"
                         f'<div class="spans">{_span_html(v)}</div>'
                         f"<p><code>{html.escape(str(v.ids))}</code></p>")
    if costs:
        parts.append("<h2>Cost over the file</h2>" + table(list(costs)))
    parts.append("<p>Hover a token for its id and vocabulary piece. Dashed: special token added by the "
                 "tokenizer; red: unknown token; dotted: byte-fallback piece.</p>")
    return page("lmforge tokenize", "".join(parts))


def heatmap_png(weights, labels: Sequence[str], title: str) -> bytes:
    """A (T, T) attention matrix as a PNG: rows are queries, columns keys (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    w = np.asarray(weights, dtype=float)
    n = len(labels)
    size = max(4.0, min(0.35 * n + 2, 24))
    fig, ax = plt.subplots(figsize=(size + 1, size))
    try:
        im = ax.imshow(w, cmap="viridis", vmin=0.0, vmax=max(float(w.max()), 1e-9))
        shown = [repr(x)[1:-1][:14] for x in labels]
        ax.set_xticks(range(n), shown, rotation=90, fontsize=8)
        ax.set_yticks(range(n), shown, fontsize=8)
        ax.set_xlabel("key (attended to)")
        ax.set_ylabel("query")
        ax.set_title(title)
        fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
    finally:
        plt.close(fig)
    return buf.getvalue()


def img_tag(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def write_png(path: str | Path, png: bytes) -> None:
    from ..rundir import write_bytes

    write_bytes(path, png)
