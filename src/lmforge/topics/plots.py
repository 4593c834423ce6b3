"""Pictures of a topic model, written atomically into the run directory.

- documents map: 2-D projection, one colour per topic, outliers grey, labels at the centroids,
  as PNG (matplotlib) and as one self-contained offline HTML file (plotly with its JavaScript
  inlined, no CDN) with the document text on hover;
- each topic's top words as bars; the topic-similarity heatmap; topics over time.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np

from ..rundir import write_bytes, write_text

GREY = "#c8c8c8"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, dpi: int = 100) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    _plt().close(fig)
    write_bytes(path, buf.getvalue())
    return path


def _colours(n: int) -> list[str]:
    import matplotlib.colors as mc

    cmap = _plt().get_cmap("tab20")
    return [mc.to_hex(cmap(i % 20)) for i in range(n)]


def documents_map_png(path: str | Path, xy: np.ndarray, assignments: np.ndarray, labels: dict[int, str],
                      max_labels: int = 20, size: tuple[int, int] = (10, 8), dpi: int = 100) -> Path:
    """Scatter of ``(N, 2)`` points coloured by topic; the ``max_labels`` largest topics labelled."""
    plt = _plt()
    a = np.asarray(assignments)
    fig, ax = plt.subplots(figsize=size)
    out = a == -1
    ax.scatter(xy[out, 0], xy[out, 1], s=3, c=GREY, alpha=0.5, linewidths=0, label="outliers")
    ids = [t for t in sorted(set(a.tolist())) if t != -1]
    for t, c in zip(ids, _colours(len(ids))):
        m = a == t
        ax.scatter(xy[m, 0], xy[m, 1], s=4, c=c, alpha=0.8, linewidths=0)
    sizes = sorted(ids, key=lambda t: -(a == t).sum())[:max_labels]
    for t in sizes:
        cx, cy = np.median(xy[a == t], axis=0)
        ax.text(cx, cy, f"{t}: {labels.get(t, '')}"[:40], fontsize=8, ha="center",
                bbox=dict(boxstyle="round,pad=0.2", fc="white", alpha=0.7, lw=0))
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title(f"documents map: {len(ids)} topics, {int(out.sum())} outliers of {len(a)}")
    fig.tight_layout()
    return _save(fig, Path(path), dpi)


def documents_map_html(path: str | Path, xy: np.ndarray, assignments: np.ndarray, labels: dict[int, str],
                       hover: Sequence[str], hover_chars: int = 120) -> Path:
    """The documents map as one offline HTML file: plotly.js inlined, one trace per topic."""
    import plotly.graph_objects as go

    a = np.asarray(assignments)
    ids = sorted(set(a.tolist()))
    colours = dict(zip([t for t in ids if t != -1], _colours(len(ids))))
    fig = go.Figure()
    for t in ids:
        m = np.flatnonzero(a == t)
        name = "outliers" if t == -1 else f"{t}: {labels.get(t, '')}"[:50]
        text = [hover[i][:hover_chars].replace("<", "&lt;") for i in m]
        fig.add_trace(go.Scattergl(x=xy[m, 0].tolist(), y=xy[m, 1].tolist(), mode="markers", name=name,
                                   text=text, hovertemplate="%{text}<extra>" + name.replace("<", "&lt;") + "</extra>",
                                   marker=dict(size=4, color=GREY if t == -1 else colours[t],
                                               opacity=0.4 if t == -1 else 0.8)))
    fig.update_layout(title=f"documents map ({len(a)} documents)", template="plotly_white",
                      xaxis=dict(visible=False), yaxis=dict(visible=False), width=1100, height=800)
    write_text(path, fig.to_html(include_plotlyjs=True, full_html=True))
    return Path(path)


def topic_words_png(path: str | Path, words: dict[int, list], topic_ids: Sequence[int], labels: dict[int, str],
                    n_topics: int = 12, n_words: int = 8) -> Path:
    """One horizontal bar chart of c-TF-IDF weights per topic (the first ``n_topics``)."""
    plt = _plt()
    ids = [t for t in topic_ids if t != -1][:n_topics]
    cols = 4
    rows = max(1, -(-len(ids) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.set_visible(False)
    for ax, t, c in zip(axes.ravel(), ids, _colours(len(ids))):
        ws = words.get(t, [])[:n_words][::-1]
        ax.set_visible(True)
        ax.barh([w for w, _ in ws], [s for _, s in ws], color=c)
        ax.set_title(f"{t}: {labels.get(t, '')}"[:38], fontsize=9)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    return _save(fig, Path(path))


def similarity_heatmap_png(path: str | Path, topic_embeddings: np.ndarray, topic_ids: Sequence[int],
                           labels: dict[int, str], max_topics: int = 40) -> Path:
    """Cosine similarity between topic embeddings (real topics, the first ``max_topics``)."""
    from .represent import cosine_matrix

    plt = _plt()
    rows = [r for r, t in enumerate(topic_ids) if t != -1][:max_topics]
    sim = cosine_matrix(topic_embeddings[rows], topic_embeddings[rows])
    names = [f"{topic_ids[r]}: {labels.get(topic_ids[r], '')}"[:30] for r in rows]
    k = max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(3 + 0.3 * k, 2.5 + 0.3 * k))
    im = ax.imshow(sim, cmap="viridis", vmin=min(0.0, float(sim.min())) if len(rows) else 0, vmax=1.0)
    ax.set_xticks(range(len(rows)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(rows)), names, fontsize=7)
    fig.colorbar(im, ax=ax, fraction=0.04)
    ax.set_title("topic similarity (cosine)")
    fig.tight_layout()
    return _save(fig, Path(path))


def over_time_png(path: str | Path, rows: list[dict], labels: dict[int, str], max_topics: int = 10) -> Path:
    """Documents per time bin for the largest topics (rows of ``topics_over_time``)."""
    plt = _plt()
    starts = sorted({r["start"] for r in rows})
    totals: dict[int, int] = {}
    for r in rows:
        if r["topic"] != -1:
            totals[r["topic"]] = totals.get(r["topic"], 0) + r["count"]
    top = sorted(totals, key=lambda t: -totals[t])[:max_topics]
    fig, ax = plt.subplots(figsize=(11, 5))
    x = np.arange(len(starts))
    for t, c in zip(top, _colours(len(top))):
        y = [sum(r["count"] for r in rows if r["topic"] == t and r["start"] == s) for s in starts]
        ax.plot(x, y, marker="o", color=c, label=f"{t}: {labels.get(t, '')}"[:40])
    ax.set_xticks(x, [s[:10] for s in starts], rotation=45, fontsize=8)
    ax.set_ylabel("documents")
    ax.set_title("topics over time")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return _save(fig, Path(path))


def render_all(folder: str | Path, model, texts: Sequence[str], over_time_rows: list[dict] | None = None) -> list[Path]:
    """Every picture of a fitted :class:`~lmforge.topics.model.TopicModel` into ``folder``:
    ``topics_map.png``, ``topics_map.html``, ``topic_words.png``, ``topic_similarity.png`` and,
    with timestamps, ``topics_over_time.png``. The map uses ``model.arrays['map2d']``."""
    folder = Path(folder)
    labels = {t: model.label(t) for t in model.real_topics}
    xy = np.asarray(model.arrays["map2d"])
    paths = [documents_map_png(folder / "topics_map.png", xy, model.assignments, labels),
             documents_map_html(folder / "topics_map.html", xy, model.assignments, labels, texts),
             topic_words_png(folder / "topic_words.png", model.words, model.topic_ids, labels),
             similarity_heatmap_png(folder / "topic_similarity.png", model.topic_embeddings, model.topic_ids, labels)]
    if over_time_rows:
        paths.append(over_time_png(folder / "topics_over_time.png", over_time_rows, labels))
    return paths
