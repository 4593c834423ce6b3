"""Task ``topics``: embed documents, reduce, cluster, describe with c-TF-IDF and keywords.

No gradient steps: :meth:`TopicsTask.train_direct` fits everything (as ``classify``'s
embedding_lr does), writes ``topics/`` (safetensors + JSON), ``eval.json`` and the pictures.
Embeddings come from lmforge's :class:`~lmforge.embeddings.SentenceEncoder` (any model reference
or an ``embed`` run) and are cached on disk, keyed by model files, texts and pooling settings.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LmforgeError
from ..rundir import write_json
from .base import Task, register_task
from .common import open_run
from .topics_config import TopicsConfig, TopicsRun  # noqa: F401  (the settings live there)


def encoder_ref(ref: str) -> str:
    """An ``embed`` run directory means its sentence-transformers ``model/``; anything else is a model reference."""
    from ..rundir import is_run_dir, open_run

    if is_run_dir(ref):
        art = open_run(ref).artefact
        if art is None or not (art / "modules.json").is_file():
            raise LmforgeError(f"{ref}: this run has no sentence-embedding model (no model/modules.json)")
        return str(art)
    return ref


@register_task("topics", config=TopicsRun)
class TopicsTask(Task):
    name = "topics"

    def __init__(self, cfg: TopicsRun, *, with_data: bool = True):
        from ..device import Placement

        self.cfg = cfg
        self.tc = cfg.topics
        self.placement = Placement.resolve(cfg.model.device, cfg.model.precision)
        self._encoder = None
        self.model = None  # the TopicModel once fitted or loaded (no nn.Module: nothing to train)
        self.texts: list[str] = []
        self.timestamps = None
        self.dropped_empty = 0
        if with_data:
            self._read()

    # ---- data ----------------------------------------------------------------------------------
    def _read(self) -> None:
        from ..data.readers import read_table
        from ..data.schema import apply_where, field_column, require_columns
        from ..topics.edit import parse_timestamps

        dc = self.cfg.data
        if not dc.train:
            raise LmforgeError("config: missing required value 'data.train'")
        table = apply_where(read_table(dc.train), dc.where)
        col = field_column(dc, "text")
        require_columns(table, [col] + list(self.tc.extra_text_columns))
        if dc.max_train_samples and len(table) > dc.max_train_samples:
            table = table.subset(range(dc.max_train_samples))
        keep, texts = [], []
        for i, rec in enumerate(table.records):
            parts = [rec.get(c) for c in list(self.tc.extra_text_columns) + [col]]
            bad = [p for p in parts if p is not None and not isinstance(p, str)]
            if bad:
                raise LmforgeError(f"{table.where(i)}: '{col}' must be text, got {type(bad[0]).__name__}")
            text = ". ".join(p.strip() for p in parts if p and p.strip())
            if text:
                keep.append(i)
                texts.append(text)
        self.dropped_empty = len(table) - len(keep)
        if not texts:
            raise LmforgeError(f"{dc.train}: every document is empty (column '{col}')")
        distinct = len(set(texts))
        need = self._min_documents()
        if distinct < need:
            raise LmforgeError(f"{dc.train}: only {distinct} distinct non-empty documents ({len(texts)} with duplicates); "
                               f"the topic pipeline needs at least {need} ({self._why_min()})")
        self.texts = texts
        self._tokenize_ahead()
        from ..topics.pipeline import vectorize

        self.vectorized = vectorize(texts, self.tc.vectorizer.model_dump(mode="json"))  # no words: error now
        if "timestamp" in dc.columns:
            tcol = dc.columns["timestamp"]
            require_columns(table, [tcol])
            self.timestamps = parse_timestamps([table.records[i].get(tcol) for i in keep],
                                               [table.where(i) for i in keep])

    def _tokenize_ahead(self) -> None:
        """Load the encoder now (a bad model fails before anything is written) and, unless the
        embeddings are cached, let it tokenise the documents on another thread while this one
        builds the vocabulary (:meth:`SentenceEncoder.tokenize_ahead`: ~0.3 s of a 2-core
        1,000-article fit off the serial path)."""
        from ..embeddings.disk_cache import cache_file
        from ..models import resolve_model

        enc = self.encoder
        if self.tc.encoder.cache and cache_file(enc, self.texts, resolve_model(encoder_ref(self.cfg.model.name)),
                                                self.placement).is_file():
            return
        enc.tokenize_ahead(self.texts)

    def _min_documents(self) -> int:
        r, c = self.tc.reduction, self.tc.clustering
        need = 2 * c.min_cluster_size if c.method == "hdbscan" else c.n_clusters
        if r.method == "umap":
            need = max(need, r.n_neighbors + 1, r.n_components + 2)
        return need

    def _why_min(self) -> str:
        r, c = self.tc.reduction, self.tc.clustering
        why = [f"topics.clustering.min_cluster_size={c.min_cluster_size}" if c.method == "hdbscan"
               else f"topics.clustering.n_clusters={c.n_clusters}"]
        if r.method == "umap":
            why.append(f"topics.reduction.n_neighbors={r.n_neighbors}")
        return ", ".join(why)

    # ---- embeddings ------------------------------------------------------------------------------
    @property
    def encoder(self):
        if self._encoder is None:
            from ..embeddings.files import load_encoder

            e = self.tc.encoder
            enc = load_encoder(self.cfg.model.name, pooling=e.pooling, normalize=e.normalize, max_length=e.max_length)
            self._encoder = enc.to_inference(self.placement)
        return self._encoder

    def embed(self, texts: list[str], *, cache: bool | None = None) -> np.ndarray:
        """``(N, D)`` embeddings, read from / written to the embedding disk cache
        (:func:`lmforge.embeddings.disk_cache.cached_encode`: keyed by model, texts, pooling, placement
        and the encoder's code path)."""
        from ..embeddings.disk_cache import cached_encode
        from ..models import resolve_model

        enc, bs = self.encoder, self.tc.encoder.batch_size
        if not (self.tc.encoder.cache if cache is None else cache):
            return enc.encode(texts, batch_size=bs, placement=self.placement)
        folder = resolve_model(encoder_ref(self.cfg.model.name))
        return cached_encode(enc, texts, folder, batch_size=bs, placement=self.placement)

    def word_embed(self, words: list[str]) -> np.ndarray:
        return self.encoder.encode(words, batch_size=256, placement=self.placement)

    def labeller(self):
        if not self.tc.labels.generate:
            return None
        import torch

        from ..generation import GenerationConfig, generate
        from ..causal_lm import load_causal_lm, resolve_source

        lc = self.tc.labels
        lm, tok, _ = load_causal_lm(resolve_source(lc.model), device=self.placement.device)
        gcfg = GenerationConfig(max_new_tokens=lc.max_new_tokens, batch_size=lc.batch_size, stop=["\n"])

        def run(prompts: list[str]) -> list[str]:
            with torch.inference_mode(), self.placement.autocast():
                return generate(lm, tok, prompts, gcfg, chat=False)  # few-shot completion: see label_prompt

        return run

    def settings(self) -> dict[str, Any]:
        return self.tc.model_dump(mode="json") | {"encoder_ref": self.cfg.model.name}

    # ---- fitting ---------------------------------------------------------------------------------
    def train_direct(self, run_dir: Path) -> dict:
        from ..topics import pipeline as P
        from ..topics.edit import reduce_outliers, reduce_to_n
        from ..topics.metrics import stability

        t0 = time.perf_counter()
        labeller = self.labeller()  # load the label model first: a problem shows before the long part
        emb = self.embed(self.texts)
        t_embed = time.perf_counter() - t0
        settings = self.settings() | {"dim": int(emb.shape[1])}
        model, doc_term = P.fit(self.texts, emb, settings, self.cfg.seed, vectorized=self.vectorized)
        runs = [model.assignments]
        first = {k: v for k, v in P.measure(model, doc_term).items() if k in ("n_topics", "outlier_rate", "npmi", "diversity")}
        a = model.assignments
        if self.tc.nr_topics:
            a = reduce_to_n(a, model.ctfidf, model.topic_ids, self.tc.nr_topics)
            model = P.describe(a, doc_term, model.vocab, emb, settings, arrays=model.arrays)
            a = model.assignments
        before = float((a == -1).mean())
        if self.tc.outlier_target is not None:
            a = reduce_outliers(a, emb, model.topic_embeddings, model.topic_ids, self.tc.outlier_target)
        for s in range(1, self.tc.stability_seeds):
            red = P.reduce_step(emb, settings, self.cfg.seed + s)
            runs.append(P.cluster_step(red, settings, self.cfg.seed + s))
        model = P.describe(a, doc_term, model.vocab, emb, settings, texts=self.texts, word_embed=self.word_embed,
                           labeller=labeller, arrays=model.arrays)
        model.arrays["doc_embeddings"] = np.asarray(emb, np.float32)
        self.model, self.doc_term = model, doc_term
        metrics = P.measure(model, doc_term, seed=self.cfg.seed) | {
            "documents": len(self.texts), "dropped_empty": self.dropped_empty, "fit": first,
            "outlier_rate_before_reduction": before, "embed_seconds": t_embed}
        if len(runs) > 1:
            metrics["stability"] = stability(runs)
        metrics["train_seconds"] = time.perf_counter() - t0
        self.write_outputs(Path(run_dir), metrics)
        return metrics

    def write_outputs(self, run_dir: Path, metrics: dict) -> None:
        """topics/ (model + documents), hierarchy, over time, pictures, eval.json."""
        from ..topics.edit import hierarchy, topics_over_time
        from ..topics.plots import render_all

        m = self.model
        if self.tc.pictures and ("map2d" not in m.arrays or len(m.arrays["map2d"]) != len(m.assignments)):
            how = self.tc.map_projection
            how = ("umap" if self.tc.reduction.method == "umap" else "pca") if how == "auto" else how
            m.arrays["map2d"] = map_2d(m.arrays.get("reduced", m.arrays["doc_embeddings"]), self.cfg.seed,
                                       self.tc.reduction.n_neighbors, how)
        docs = [{"text": t} | ({"timestamp": str(self.timestamps[i])} if self.timestamps is not None else {})
                for i, t in enumerate(self.texts)]
        m.save(run_dir / "topics", documents=docs)
        write_json(run_dir / "topics_hierarchy.json", hierarchy(m.ctfidf, m.topic_ids))
        rows = None
        if self.timestamps is not None:
            rows = topics_over_time(m.assignments, self.timestamps, self.doc_term, m.idf, m.vocab,
                                    bins=self.tc.time_bins)
            write_json(run_dir / "topics_over_time.json", rows)
        if self.tc.pictures:
            metrics["pictures"] = [p.name for p in render_all(run_dir, m, self.texts, rows)]
        write_json(run_dir / "eval.json", metrics)

    def save(self, out_dir: Path) -> None:
        """Everything was written by :meth:`train_direct`."""

    # ---- a saved run -----------------------------------------------------------------------------
    @classmethod
    def from_run(cls, run_dir: str | Path, which: str = "final") -> "TopicsTask":
        from ..topics.model import TopicModel

        run_dir = Path(run_dir)
        task = cls(open_run(run_dir, which).config, with_data=False)
        task.model = TopicModel.load(run_dir / "topics")
        task.run_dir = run_dir
        task._docs_folder = run_dir / "topics"
        return task

    def load_documents(self) -> None:
        """Texts, timestamps and doc-term matrix of the fitted corpus (for edits)."""
        from ..topics.model import read_documents
        from ..topics.pipeline import doc_term_of

        docs = read_documents(self._docs_folder)
        self.texts = [d["text"] for d in docs]
        if docs and "timestamp" in docs[0]:
            self.timestamps = np.array([d["timestamp"] for d in docs], dtype="datetime64[s]")
        self.doc_term = doc_term_of(self.texts, self.model.vocab, self.model.settings["vectorizer"])

    def redescribe(self, assignments: np.ndarray, note: dict) -> dict:
        """Re-describe the fitted corpus after an edit and rewrite the run's outputs; returns eval.json."""
        from ..topics import pipeline as P

        emb = self.model.arrays["doc_embeddings"]
        arrays = {k: v for k, v in self.model.arrays.items()}
        self.model = P.describe(assignments, self.doc_term, self.model.vocab, emb, self.model.settings,
                                texts=self.texts, word_embed=self.word_embed, labeller=self.labeller(), arrays=arrays)
        old = json.loads((self.run_dir / "eval.json").read_text(encoding="utf-8")) if (self.run_dir / "eval.json").is_file() else {}
        metrics = old | P.measure(self.model, self.doc_term, seed=self.cfg.seed)
        metrics["edits"] = old.get("edits", []) + [note]
        self.write_outputs(self.run_dir, metrics)
        return metrics

    def read_eval_file(self, path: str):
        raise LmforgeError(f"{self.run_dir}: topic runs are measured when fitted (eval.json); "
                           "use `lmforge predict` for new documents")

    def predict_texts(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        dim = self.model.topic_embeddings.shape[1]
        if self.encoder.dim != dim:
            raise LmforgeError(f"encoder {self.cfg.model.name} gives {self.encoder.dim}-dim vectors; "
                               f"the topic model has {dim}")
        return self.model.predict(self.embed(texts, cache=False))

    def predict_file(self, path: str, out: str) -> int:
        from ..data.readers import read_table
        from ..data.schema import field_column, require_columns, text_values
        from ..rundir import write_jsonl

        if str(path).endswith(".npy"):  # precomputed embeddings of the run's encoder
            try:
                emb = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise LmforgeError(f"{path}: unreadable .npy ({exc})") from None
            if emb.ndim != 2:
                raise LmforgeError(f"{path}: expected an (N, D) matrix of embeddings, got shape {emb.shape}")
            try:
                ids, sims, probs = self.model.predict(emb)
            except LmforgeError as exc:
                raise LmforgeError(f"{path}: {exc}") from None
            return write_jsonl(out, ({"index": i, "topic": int(k), "probability": float(p), "similarity": float(s)}
                                     for i, (k, s, p) in enumerate(zip(ids, sims, probs))))
        table = read_table(path)
        col = field_column(self.cfg.data, "text")
        col = col if table.records and col in table.records[0] else "text"
        require_columns(table, [col])
        texts = text_values(table, col)
        ids, sims, probs = self.predict_texts(texts)
        return write_jsonl(out, ({"text": t, "topic": int(k), "label": "outliers" if k == -1 else self.model.label(int(k)),
                                  "probability": float(p), "similarity": float(s)}
                                 for t, k, s, p in zip(texts, ids, sims, probs)))


def map_2d(x: np.ndarray, seed: int, n_neighbors: int = 15, how: str = "umap") -> np.ndarray:
    """A 2-D projection for the documents map: UMAP of the reduced space (PCA when asked or too few points)."""
    from ..topics.cluster import reduce

    x = np.asarray(x, np.float32)
    if x.shape[1] == 2:
        return x
    if how == "umap" and len(x) > max(n_neighbors, 4) + 1:
        return reduce(x, "umap", n_components=2, n_neighbors=n_neighbors, min_dist=0.1, metric="euclidean", seed=seed)
    return reduce(x, "pca", n_components=2, seed=seed)


TASK = TopicsTask
