"""Augmented SBERT (Thakur et al. 2021) in one ``lmforge train`` run.

1. a cross-encoder is trained on the gold scored pairs (both orders) with the shared engine;
2. new pairs are sampled -- each gold sentence with its ``top_k`` nearest neighbours under
   the initial bi-encoder, minus the gold pairs -- and the cross-encoder labels them (silver);
3. the bi-encoder is trained on gold + silver with the cosine (or CoSENT) loss.

The run directory holds ``model/`` (the bi-encoder, a sentence-transformers folder),
``cross_encoder/model`` (usable on its own to score and rerank pairs, see
:class:`lmforge.embeddings.cross_encoder.CrossEncoder`) and ``silver.jsonl``.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Literal, Sequence

from pydantic import Field, model_validator

from ..config import Section
from ..data.readers import Table
from ..data.schema import field_column, load_splits, require_columns, text_values
from ..embeddings.evaluators import normalised_scores, sts_from_file
from ..errors import LmforgeError
from .embed import EmbedConfig, EmbedRun, EmbedTask
from .base import register_task


class AugsbertConfig(Section):
    """The cross-encoder and the silver-pair sampling."""

    cross_encoder: str | None = Field(None, description="starting model of the cross-encoder (default: model.name)")
    cross_epochs: float = Field(1.0, gt=0)
    cross_batch_size: int = Field(16, gt=0)
    cross_lr: float = Field(2e-5, gt=0)
    both_orders: bool = Field(True, description="train the cross-encoder on (a, b) and (b, a)")
    top_k: int = Field(3, gt=0, description="silver pairs per gold sentence (its nearest neighbours)")
    max_silver: int | None = Field(None, gt=0, description="cap on silver pairs (seeded sample)")


class AugsbertRun(EmbedRun):
    task: Literal["augsbert"] = "augsbert"
    embed: EmbedConfig = Field(default_factory=lambda: EmbedConfig(loss="cosine"))
    augsbert: AugsbertConfig = Field(default_factory=AugsbertConfig)

    @model_validator(mode="before")
    @classmethod
    def _default_loss(cls, raw):
        if isinstance(raw, dict) and isinstance(raw.get("embed"), dict) and "loss" not in raw["embed"]:
            raw = raw | {"embed": raw["embed"] | {"loss": "cosine"}}
        return raw

    @model_validator(mode="after")
    def _scored_loss(self):
        if self.embed.loss not in ("cosine", "cosent"):
            raise ValueError("augsbert trains the bi-encoder on scored pairs: embed.loss must be cosine or cosent")
        return self


def sample_silver_pairs(emb, sentences: Sequence[str], gold: set[tuple[str, str]], top_k: int) -> list[tuple[str, str]]:
    """Each sentence paired with its ``top_k`` nearest other sentences (cosine), skipping gold
    pairs (either order) and repeats.

    Args:
        emb: ``(N, D)`` embeddings of ``sentences``.
        gold: pairs already labelled, as ``(a, b)`` tuples.

    Returns:
        New ``(a, b)`` pairs in sentence order.
    """
    from ..eval.retrieval import rank_topk

    _, idx = rank_topk(emb, emb, top_k + 1)  # (N, k+1): the sentence itself is usually first
    seen = {tuple(sorted(p)) for p in gold}
    out = []
    for i, row in enumerate(idx.tolist()):
        for j in [j for j in row if j != i][:top_k]:
            key = tuple(sorted((sentences[i], sentences[j])))
            if key not in seen:
                seen.add(key)
                out.append((sentences[i], sentences[j]))
    return out


@register_task("augsbert", config=AugsbertRun)
class AugsbertTask(EmbedTask):
    name = "augsbert"
    silver: list[dict] | None = None  # the silver-labelled pairs (set while building the data)
    cross_dir: Path | None = None  # the cross-encoder's run folder

    def _tables(self) -> tuple[Table, Table | None]:
        cfg, ac = self.cfg, self.cfg.augsbert
        train, ev = load_splits(cfg.data, cfg.seed)
        c1, c2 = self._columns(train)
        cs = field_column(cfg.data, "score")
        require_columns(train, [c1, c2, cs])
        s1, s2 = text_values(train, c1), text_values(train, c2)
        gold = normalised_scores(train, cs, cfg.embed.score_range)
        pairs = list(zip(s1, s2))

        ce = self._train_cross_encoder(pairs, gold, ev, (c1, c2, cs))
        sentences = list(dict.fromkeys(s1 + s2))
        emb = self.encoder.encode(sentences, batch_size=self._eval_bs(), placement=self.placement)
        silver = sample_silver_pairs(emb, sentences, set(pairs), ac.top_k)
        if ac.max_silver and len(silver) > ac.max_silver:
            silver = random.Random(cfg.seed + 3).sample(silver, ac.max_silver)
        scores = ce.predict(silver, batch_size=self._eval_bs(), placement=self.placement) if silver else []
        lo, hi = cfg.embed.score_range
        self.silver = [{c1: a, c2: b, cs: float(y) * (hi - lo) + lo} for (a, b), y in zip(silver, scores)]
        records = train.records + self.silver
        locs = train.locs + [f"silver pair {i + 1}" for i in range(len(self.silver))]
        return Table(f"{train.source} + silver", records, locs), ev

    def _train_cross_encoder(self, pairs, gold, ev: Table | None, cols):
        # imported here: the cross-encoder module itself imports the task package
        from ..embeddings.cross_encoder import CrossEncoder
        from .cross_encoder import train_cross_encoder

        cfg, ac = self.cfg, self.cfg.augsbert
        ce = CrossEncoder.from_pretrained(ac.cross_encoder or cfg.model.name, max_length=2 * cfg.data.max_length)
        if ac.both_orders:
            pairs, gold = pairs + [(b, a) for a, b in pairs], gold + gold
        eval_pairs, eval_scores = [], []
        if cfg.embed.sts_eval:
            sts = sts_from_file(cfg.embed.sts_eval, score_range=cfg.embed.score_range)
            eval_pairs, eval_scores = list(zip(sts.s1, sts.s2)), sts.scores
        elif ev is not None and ev.records:
            c1, c2, cs = cols
            eval_pairs = list(zip(text_values(ev, c1), text_values(ev, c2)))
            eval_scores = normalised_scores(ev, cs, cfg.embed.score_range)
        tc = cfg.train.model_copy(update={
            "epochs": ac.cross_epochs, "max_steps": None, "batch_size": ac.cross_batch_size, "lr": ac.cross_lr,
            "eval_every": None, "save_every": None, "best_metric": None, "resume": False})
        self.cross_dir = Path(cfg.output_dir) / f".{cfg.name}-cross-encoder"
        if self.cross_dir.exists():
            shutil.rmtree(self.cross_dir)
        self.cross_metrics = train_cross_encoder(ce, pairs, gold, cfg.model_copy(update={"train": tc}), self.cross_dir,
                                                 eval_pairs=eval_pairs, eval_scores=eval_scores,
                                                 placement=self.placement)
        return ce

    def evaluate(self, items=None) -> dict:
        metrics = super().evaluate(items)
        if items is None and getattr(self, "cross_metrics", None):
            metrics["cross_encoder"] = {k: v for k, v in self.cross_metrics.items() if isinstance(v, (int, float))}
            metrics["silver_pairs"] = len(self.silver)
        return metrics

    def save(self, out_dir: Path) -> None:
        """``model/`` (bi-encoder), ``cross_encoder/`` (its run, with ``model/``) and ``silver.jsonl``."""
        super().save(out_dir)
        out_dir = Path(out_dir)
        if out_dir.resolve() != self.cfg.run_dir.resolve():  # best/ checkpoints: the bi-encoder only
            return
        if self.cross_dir is not None and self.cross_dir.exists():
            from ..rundir import commit_dir

            self.cross_dir = commit_dir(self.cross_dir, out_dir / "cross_encoder")  # same folder: a rename
        if self.silver is not None:
            from ..rundir import write_jsonl

            write_jsonl(out_dir / "silver.jsonl", self.silver)

    @classmethod
    def from_run(cls, run_dir, which: str = "final") -> "AugsbertTask":
        if not (Path(run_dir) / "model").exists():
            raise LmforgeError(f"{run_dir}: no trained model")
        return super().from_run(run_dir, which)

