"""Assemble the report page: one self-contained HTML file (inline CSS and SVG, no network).

The page holds, per run or overlaid for several runs: the summary, warnings, training curves
(loss raw faint + smoothed bold, learning rate, gradient norm, throughput, task metrics),
every eval metric over steps with the best step marked, the final ``eval.json`` as tables and
pictures, sample predictions, and the raw numbers as JSON (``<script type="application/json"
id="lmforge-data">``). Several runs add a table of the config keys that differ and the final
metrics side by side.
"""
from __future__ import annotations

import base64
import datetime as _dt
import json
import math
from typing import Any, Sequence

from .analysis import (best_index, differing_config, ema, final_scalars, greater_is_better, numeric_keys, series,
                       summary, warnings_for)
from .data import RunData
from .svg import PALETTE, bar_chart, esc, fmt, heatmap, line_chart, scatter

CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;color:#1b1f24;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:18px 24px 60px}
h1{font-size:22px;margin:6px 0 2px}h2{font-size:17px;margin:26px 0 8px;border-bottom:1px solid #d8dce1;padding-bottom:4px}
h3{font-size:15px;margin:16px 0 6px}.muted{color:#667}
.grid{display:flex;flex-wrap:wrap;gap:12px}.card{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:6px}
table{border-collapse:collapse;background:#fff;margin:4px 0 10px;font-size:13px}
td,th{border:1px solid #dde1e6;padding:3px 8px;text-align:left;vertical-align:top}th{background:#eef1f4}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.warn{background:#fff4e5;border:1px solid #f0b45b;border-radius:6px;padding:6px 12px;margin:8px 0}
.warn li{margin:2px 0}.ok{background:#eaf6ec;border:1px solid #8cc79a;border-radius:6px;padding:6px 12px}
svg text{font-family:inherit}svg .title{font-size:13px;font-weight:600}svg .tick{font-size:10px;fill:#555}
svg .label{font-size:11px;fill:#333}svg .frame{fill:none;stroke:#bbb}svg .grid{stroke:#eee}
svg .mark{font-size:10px;font-weight:600}svg .cellv{font-size:10px}
pre{white-space:pre-wrap;margin:0;font:12px/1.35 ui-monospace,Menlo,Consolas,monospace}
details{margin:6px 0}.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:5px}
"""
SCRIPT = ("try{window.lmforgeData=JSON.parse(document.getElementById('lmforge-data').textContent);}"
          "catch(e){console.error('lmforge-data: '+e);}")
SKIP_EVAL = {"samples_per_s", "n", "n_sentences", "trainable_params", "train_size"}


def _jsonable(x):
    """Non-finite floats become strings (JSON has no NaN)."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _cell(v) -> str:
    if isinstance(v, bool) or v is None:
        return f"<td>{esc(v)}</td>"
    if isinstance(v, (int, float)):
        return f'<td class="num">{fmt(float(v)) if isinstance(v, float) else v}</td>'
    if isinstance(v, (list, dict)):
        s = json.dumps(v, default=str)
        return f"<td>{esc(s if len(s) < 120 else s[:117] + '...')}</td>"
    return f"<td>{esc(v)}</td>"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(v) for v in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><tr>{head}</tr>{body}</table>'


def _color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _curves(runs: Sequence[RunData], key: str, *, split: str, title: str, smooth: bool = False,
            log_y: bool = False, mark_best: bool = False) -> str | None:
    """One line chart of ``key`` over steps for every run that logged it (overlaid)."""
    out, markers = [], []
    multi = len(runs) > 1
    for i, r in enumerate(runs):
        xs, ys = series(r.train if split == "train" else r.eval, key)
        if not xs:
            continue
        label = f"{r.name}: {key}" if multi else key
        if smooth and len(xs) > 2:
            out.append({"name": f"{label} (raw)", "x": xs, "y": ys, "color": _color(i), "opacity": 0.3,
                        "width": 1.0})
            out.append({"name": f"{label} (smoothed)", "x": xs, "y": ema(ys), "color": _color(i), "width": 2.4})
        else:
            out.append({"name": label, "x": xs, "y": ys, "color": _color(i), "dots": split == "eval"})
        if mark_best and len(xs) > 1:  # one eval has no "best" to point at
            b = best_index(ys, greater_is_better(key))
            if b is not None:
                markers.append({"x": xs[b], "y": ys[b], "label": f"{label}: best {fmt(ys[b])} @ {xs[b]:.0f}"
                                if multi else f"best {fmt(ys[b])} @ {xs[b]:.0f}", "show_label": not multi})
    if not out:
        return None
    return line_chart(out, title=title, ylabel=key, markers=markers, log_y=log_y, name=f"{split}:{key}")


def _group_keys(runs: Sequence[RunData]) -> tuple[list[str], list[str]]:
    """Train metric keys beyond the standard ones, and eval metric keys (first-seen order)."""
    std = {"loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "split"}
    train = list(dict.fromkeys(k for r in runs for k in numeric_keys(r.train) if k not in std))
    ev = list(dict.fromkeys(k for r in runs for k in numeric_keys(r.eval) if k not in SKIP_EVAL))
    return train, ev


def _training_section(runs: Sequence[RunData]) -> str:
    plots = [_curves(runs, "loss", split="train", title="training loss (raw faint, smoothed bold)", smooth=True)]
    plots.append(_curves(runs, "lr", split="train", title="learning rate"))
    grad = _curves(runs, "grad_norm", split="train", title="gradient norm (before clipping)", smooth=True)
    plots.append(grad)
    plots.append(_curves(runs, "samples_per_s", split="train", title="throughput: samples/s"))
    plots.append(_curves(runs, "tokens_per_s", split="train", title="throughput: tokens/s"))
    extra, _ = _group_keys(runs)
    rl = [k for k in extra if any(w in k.lower() for w in ("reward", "kl", "entropy", "margin"))]
    other = [k for k in extra if k not in rl]
    html = ['<h2 id="training">Training</h2>']
    if not any(plots):
        html.append('<p class="muted">No training steps were logged (metrics.jsonl is empty or missing).</p>')
    html.append('<div class="grid">' + "".join(f'<div class="card">{p}</div>' for p in plots if p) + "</div>")
    if grad is None and any(r.train for r in runs):
        html.append('<p class="muted">Gradient norm: not logged by this run.</p>')
    if rl:
        html.append("<h3>Preference / RL: rewards, margins, KL, entropy</h3><div class=\"grid\">")
        html += [f'<div class="card">{p}</div>' for p in
                 (_curves(runs, k, split="train", title=k, smooth=True) for k in rl) if p]
        html.append("</div>")
    if other:
        html.append("<h3>Other training metrics</h3><div class=\"grid\">")
        html += [f'<div class="card">{p}</div>' for p in
                 (_curves(runs, k, split="train", title=k, smooth=True) for k in other) if p]
        html.append("</div>")
    return "".join(html)


def _eval_section(runs: Sequence[RunData]) -> str:
    _, keys = _group_keys(runs)
    if not keys:
        return ""
    plots = [_curves(runs, k, split="eval", title=f"eval {k}", mark_best=True) for k in keys]
    return ('<h2 id="eval-curves">Evaluation over steps (best marked)</h2><div class="grid">'
            + "".join(f'<div class="card">{p}</div>' for p in plots if p) + "</div>")


def _final_section(r: RunData, prefix: str) -> str:
    f = r.final
    if not f:
        return ""
    html = [f"<h2 id=\"final-{esc(prefix)}\">Final evaluation{': ' + esc(r.name) if prefix else ''}</h2>"]
    scal = final_scalars(r)
    if scal:
        html.append(_table(["metric", "value"], [(k, v) for k, v in scal.items()]))
    pc = f.get("per_class")
    if isinstance(pc, dict) and pc:
        names = list(pc)
        rows = [(n, *(pc[n].get(m) for m in ("precision", "recall", "f1", "support"))) for n in names]
        html.append("<h3>Per class</h3>" + _table(["class", "precision", "recall", "f1", "support"], rows))
        cm = f.get("confusion_matrix")
        if isinstance(cm, list) and cm and len(cm) == len(names):
            html.append(f'<div class="card">{heatmap(cm, names, names, title="confusion matrix", name="confusion")}</div>')
    pt = f.get("per_type")
    if isinstance(pt, dict) and pt:
        names = list(pt)
        rows = [(n, *(pt[n].get(m) for m in ("precision", "recall", "f1", "support"))) for n in names]
        html.append("<h3>Entities per type</h3>" + _table(["type", "precision", "recall", "f1", "support"], rows))
        html.append('<div class="card">' + bar_chart(names, [pt[n].get("f1") or 0.0 for n in names],
                                                     title="entity F1 per type", name="ner_f1") + "</div>")
    for k, v in f.items():
        if k.endswith("scatter") and isinstance(v, dict) and isinstance(v.get("pred"), list):
            base = k[: -len("_scatter")] or "sts"
            html.append('<div class="card">' + scatter(v["gold"], v["pred"], title=f"{base}: predicted vs gold",
                                                       xlabel="gold score", ylabel="predicted (cosine)",
                                                       name=f"scatter:{base}") + "</div>")
    pref = {k: v for k, v in scal.items() if k.startswith("rewards/") or k in ("kl", "entropy") or "margin" in k}
    if pref:
        html.append("<h3>Preference rewards and margins</h3>" + _table(["metric", "value"], list(pref.items())))
    html.append(_topics(r))
    return "".join(html)


def _topics(r: RunData) -> str:
    if not r.pictures and not r.topics:
        return ""
    html = ["<h3>Topics</h3>"]
    if r.topics:
        top = r.topics[:30]
        labels = [str(t.get("topic", t.get("id", i))) for i, t in enumerate(top)]
        sizes = [float(t.get("size") or t.get("count") or 0) for t in top]
        if any(sizes):
            html.append('<div class="card">' + bar_chart(labels, sizes, title="topic sizes", name="topics") + "</div>")
        html.append(_table(["topic", "size", "words"],
                           [(lab, t.get("size", t.get("count")), ", ".join(map(str, (t.get("words") or [])[:10])))
                            for lab, t in zip(labels, top)]))
    for name, mime, data in r.pictures:
        src = f"data:{mime};base64,{base64.b64encode(data).decode()}"
        html.append(f'<figure class="card"><img alt="{esc(name)}" src="{src}" style="max-width:100%">'
                    f"<figcaption class=\"muted\">{esc(name)}</figcaption></figure>")
    return "".join(html)


def _samples(r: RunData, prefix: str) -> str:
    if not r.samples:
        return ""
    cols = list(dict.fromkeys(k for s in r.samples for k in s))[:6]
    rows = [[("<pre>" + esc(s.get(c) if isinstance(s.get(c), str) else json.dumps(s.get(c), default=str))[:600]
              + "</pre>") if c in s else "" for c in cols] for s in r.samples]
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{v}</td>" for v in row) + "</tr>" for row in rows)
    title = ("Sample generations before and after training" if any("before" in s for s in r.samples)
             else "Sample predictions")
    return (f"<h2>{title}{': ' + esc(r.name) if prefix else ''}</h2>"
            f'<table class="samples"><tr>{head}</tr>{body}</table>')


def _compare_section(runs: Sequence[RunData]) -> str:
    names = [r.name for r in runs]
    diff = differing_config(runs)
    html = ['<h2 id="compare">Runs side by side</h2><h3>Config keys that differ</h3>']
    html.append(_table(["key", *names], [(k, *vals) for k, vals in diff]) if diff
                else '<p class="muted">The configs are identical.</p>')
    finals = [final_scalars(r) for r in runs]
    keys = list(dict.fromkeys(k for f in finals for k in f))
    if keys:
        html.append("<h3>Final metrics</h3>" + _table(["metric", *names], [(k, *(f.get(k) for f in finals))
                                                                              for k in keys]))
    return "".join(html)


def _summary_section(runs: Sequence[RunData]) -> str:
    sums = [summary(r) for r in runs]
    keys = list(dict.fromkeys(k for s in sums for k in s))
    if len(runs) == 1:
        return '<h2 id="summary">Summary</h2>' + _table(["", runs[0].name], [(k, sums[0].get(k)) for k in keys])
    head = [""] + [r.name for r in runs]
    table = _table(head, [(k, *(s.get(k) for s in sums)) for k in keys])
    legend = " ".join(f'<span><span class="swatch" style="background:{_color(i)}"></span>{esc(r.name)}</span>'
                      for i, r in enumerate(runs))
    return f'<h2 id="summary">Summary</h2><p>{legend}</p>{table}'


def _warnings_section(runs: Sequence[RunData]) -> str:
    items = [(r.name, w) for r in runs for w in warnings_for(r)]
    if not items:
        return '<div class="ok" id="warnings">No warnings.</div>'
    multi = len(runs) > 1
    lis = "".join(f"<li>{esc(n + ': ') if multi else ''}{esc(w)}</li>" for n, w in items)
    return f'<div class="warn" id="warnings"><b>Warnings</b><ul>{lis}</ul></div>'


def build_html(runs: Sequence[RunData]) -> str:
    """The whole page for one or more runs (overlaid curves when several)."""
    title = "lmforge report: " + ", ".join(r.name for r in runs)
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"<h1>{esc(title)}</h1><p class=\"muted\">{esc(', '.join(str(r.path) for r in runs))} &middot; "
             f"generated {now}</p>", _warnings_section(runs), _summary_section(runs)]
    if len(runs) > 1:
        parts.append(_compare_section(runs))
    parts.append(_training_section(runs))
    parts.append(_eval_section(runs))
    for r in runs:
        parts.append(_final_section(r, r.name if len(runs) > 1 else ""))
        parts.append(_samples(r, r.name if len(runs) > 1 else ""))
    for r in runs:
        parts.append(f"<details><summary>config: {esc(r.name)}</summary><pre>"
                     f"{esc(json.dumps(r.config, indent=2, default=str))}</pre></details>")
    raw = {r.name: {"path": str(r.path), "summary": summary(r), "warnings": warnings_for(r), "config": r.config,
                    "train": r.train, "eval": r.eval, "events": r.events, "final": r.final, "env": r.env}
           for r in runs}
    blob = json.dumps(_jsonable(raw), default=str).replace("</", "<\\/")
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>{''.join(p for p in parts if p)}"
            f"</main><script type=\"application/json\" id=\"lmforge-data\">{blob}</script>"
            f"<script>{SCRIPT}</script></body></html>")
