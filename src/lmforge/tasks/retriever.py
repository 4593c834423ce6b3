"""Retriever fine-tuning: MNR on (query, gold passage) pairs with hard negatives mined from BM25 or
dense search (the gold passage excluded), then the index rebuilt; index metrics before and after.

A ``retriever`` run is an ``embed`` run (loss ``mnr``, the shared engine, the same evaluators)
whose training rows are built here::

    data.train        rows with a query and the id of its gold passage (``retriever.query_column``,
                      ``retriever.doc_column``); data.eval / eval_fraction split off held-out queries
    retriever.corpus  the passages (``id`` + ``text`` columns, any reader)

For each training query the corpus is searched (``retriever.negatives``: ``bm25``, or ``dense`` with
the untrained encoder); the best-ranked passages that are not gold, after skipping
``skip_top`` of them (likely unlabelled positives), become its hard negatives. The engine trains
on ``(query, gold, negative)`` triplets with in-batch negatives. Before training, the held-out
queries are evaluated on an index of the corpus built with the base encoder; after it, the index
is rebuilt with the trained encoder (``RUN/index``) and evaluated again. Both reports are in
``eval.json`` under ``retrieval_before`` / ``retrieval_after``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

from pydantic import Field

from ..config import Section
from ..data.readers import Table
from ..data.schema import load_splits, require_columns, text_values
from ..errors import LmforgeError
from ..rundir import EVAL, write_json
from .base import register_task
from .embed import EmbedRun, EmbedTask

log = logging.getLogger("lmforge")


class RetrieverSection(Section):
    """Corpus, hard-negative mining and the rebuilt index."""

    corpus: str = Field(..., description="passages file (id and text columns)")
    id_column: str | None = Field(None, description="passage id column (default 'id', else row number)")
    text_column: str = "text"
    query_column: str = "query"
    doc_column: str = Field("doc_id", description="gold passage id column of data.train / data.eval")
    negatives: Literal["bm25", "dense", "none"] = "bm25"
    n_negatives: int = Field(1, ge=0, le=8, description="hard negatives per query (rows repeat per negative)")
    skip_top: int = Field(0, ge=0, description="non-gold passages skipped at the top of the ranking")
    depth: int = Field(30, gt=0, description="search depth for mining")
    chunking: Literal["sentences", "tokens", "paragraphs", "none"] = "none"
    chunk_size: int = Field(3, gt=0)
    modes: list[Literal["dense", "bm25", "hybrid"]] = Field(default_factory=lambda: ["dense", "hybrid"])
    ks: list[int] = Field(default_factory=lambda: [1, 3, 5, 10, 100])


class RetrieverRun(EmbedRun):
    task: Literal["retriever"] = "retriever"  # type: ignore[assignment]
    retriever: RetrieverSection


def mine_negatives(rankings: list[list[str]], gold: list[set[str]], n: int, skip_top: int = 0) -> list[list[str]]:
    """Per query, ``n`` passage ids from its ranking that are not gold, after skipping the first
    ``skip_top`` non-gold ones (fewer when the ranking runs out)."""
    out = []
    for ranked, g in zip(rankings, gold):
        pool = [d for d in ranked if d not in g]
        out.append(pool[skip_top:skip_top + n])
    return out


@register_task("retriever", config=RetrieverRun)
class RetrieverTask(EmbedTask):

    def __init__(self, cfg: RetrieverRun, *, with_data: bool = True):
        if cfg.embed.loss != "mnr":
            raise LmforgeError(f"retriever: embed.loss must be mnr, got '{cfg.embed.loss}'")
        self.rcfg = cfg.retriever
        self.eval_pairs: list[tuple[str, str]] = []
        self.index_before: dict | None = None
        super().__init__(cfg, with_data=with_data)

    # ---- data: triplets with mined negatives -------------------------------------------------------
    def _tables(self) -> tuple[Table, Table | None]:
        from ..search.index import read_documents

        rc = self.rcfg
        self.docs = read_documents(rc.corpus, id_column=rc.id_column, text_column=rc.text_column)
        self.doc_text = dict(self.docs)
        if len(self.doc_text) != len(self.docs):
            raise LmforgeError(f"{rc.corpus}: passage ids repeat")
        dc = self.cfg.data.model_copy(update={"columns": {}})
        train, ev = load_splits(dc, self.cfg.seed)
        pairs = self._pairs(train)
        rows = self._triplets(pairs)
        self.eval_pairs = self._pairs(ev) if ev is not None else []
        ev_table = Table(f"{dc.eval or dc.train} (held out)",
                         [{"anchor": q, "positive": self.doc_text[d]} for q, d in self.eval_pairs]) \
            if self.eval_pairs else None
        return Table(f"{dc.train} (+ mined negatives)", rows), ev_table

    def _pairs(self, table: Table) -> list[tuple[str, str]]:
        rc = self.rcfg
        require_columns(table, [rc.query_column, rc.doc_column])
        queries = text_values(table, rc.query_column)
        out = []
        for i, (q, rec) in enumerate(zip(queries, table.records)):
            d = str(rec[rc.doc_column])
            if d not in self.doc_text:
                raise LmforgeError(f"{table.where(i)}: gold passage '{d}' is not in {rc.corpus}")
            out.append((q, d))
        return out

    def _triplets(self, pairs: list[tuple[str, str]]) -> list[dict]:
        rc = self.rcfg
        if rc.negatives == "none" or rc.n_negatives == 0:
            return [{"anchor": q, "positive": self.doc_text[d]} for q, d in pairs]
        gold: dict[str, set[str]] = {}
        for q, d in pairs:
            gold.setdefault(q, set()).add(d)
        queries = list(gold)
        ranked = self._search(queries, rc.negatives, rc.depth)
        negs = dict(zip(queries, mine_negatives(ranked, [gold[q] for q in queries], rc.n_negatives, rc.skip_top)))
        rows = []
        for q, d in pairs:
            for n in negs[q] or []:
                rows.append({"anchor": q, "positive": self.doc_text[d], "negative": self.doc_text[n]})
        missing = sum(1 for q, _ in pairs if not negs[q])
        if missing:
            raise LmforgeError(f"retriever: {missing} queries got no hard negative (corpus too small for "
                               f"depth {rc.depth} / skip_top {rc.skip_top})")
        log.info("mined %d hard negatives with %s for %d queries", len(rows), rc.negatives, len(queries))
        return rows

    def _search(self, queries: list[str], mode: str, depth: int) -> list[list[str]]:
        """Passage ids ranked for each query, by BM25 over the passages or by the current encoder."""
        import numpy as np

        ids = [d for d, _ in self.docs]
        if mode == "bm25":
            from ..search.bm25 import bm25_topk, build_bm25

            _, rows = bm25_topk(build_bm25([t for _, t in self.docs]), queries, depth)
        else:
            from ..search.index import embed_texts
            from ..search.vectors import exact_topk

            bs = self._eval_bs()
            corpus = embed_texts(self.encoder, self.placement, [t for _, t in self.docs], bs)
            _, rows = exact_topk(embed_texts(self.encoder, self.placement, queries, bs), corpus, depth)
        return [[ids[int(i)] for i in np.asarray(r)] for r in rows]

    # ---- index before / after ------------------------------------------------------------------
    def _index_report(self, folder: Path, encoder, model_ref: str) -> dict:
        from ..search.evaluate import evaluate_index
        from ..search.index import IndexSettings, SearchIndex, build_index

        rc = self.rcfg
        settings = IndexSettings(chunking=rc.chunking, size=rc.chunk_size, batch_size=self._eval_bs())
        build_index(self.docs, model_ref, folder, settings, encoder=encoder, placement=self.placement)
        index = SearchIndex.load(folder)
        index._encoder = encoder  # noqa: SLF001: the encoder that built it (its probe matches by construction)
        index.placement = self.placement
        queries = {f"q{i}": q for i, (q, _) in enumerate(self.eval_pairs)}
        qrels = {f"q{i}": {d: 1.0} for i, (_, d) in enumerate(self.eval_pairs)}
        return evaluate_index(index, queries, qrels, rc.modes, rc.ks, src="held-out queries")

    def train_direct(self, run_dir: Path):
        """Not a direct method: evaluate the base encoder's index first, then let the engine train."""
        if self.eval_pairs:
            self.index_before = self._index_report(Path(run_dir) / "index_before", self.encoder,
                                                  self.cfg.model.name)
            log.info("index before: %s", json.dumps({m: self.index_before[m].get("ndcg@10")
                                                     for m in self.rcfg.modes}))
        return None

    def save(self, out_dir: Path) -> None:
        """``model/`` (the trained encoder), ``index/`` rebuilt with it, and eval.json's index reports."""
        super().save(out_dir)
        out_dir = Path(out_dir)
        if not self.eval_pairs:
            return
        after = self._index_report(out_dir / "index", self.trained_encoder(), str(out_dir / "model"))
        report = {}
        if (out_dir / EVAL).is_file():
            report = json.loads((out_dir / EVAL).read_text(encoding="utf-8"))
        report["retrieval_before"] = self.index_before
        report["retrieval_after"] = after
        write_json(out_dir / EVAL, report)

    @classmethod
    def from_run(cls, run_dir, which: str = "final"):
        raise LmforgeError(f"{run_dir}: a retriever run is used through its index: lmforge search {run_dir}/index")

