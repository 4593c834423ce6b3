"""Sentence-embedding training: SimCSE (unsupervised, supervised), multiple-negatives ranking,
cosine regression, CoSENT, the SBERT NLI softmax classifier and TSDAE, on one engine.

Data fields per loss (map file columns with ``data.columns``):

==============  =============================================  =========================
loss            fields                                         pure loss
==============  =============================================  =========================
simcse_unsup    text (a .txt file is one sentence a line)       info_nce, two dropout views
simcse_sup      anchor, positive, negative                     info_nce with hard negatives
mnr             anchor, positive, [negative]                   multiple_negatives_ranking_loss
cosine          sentence1, sentence2, score                    cosine_similarity_loss
cosent          sentence1, sentence2, score                    cosent_loss
softmax_nli     sentence1, sentence2, label                    softmax_nli_loss
tsdae           text                                           embeddings.tsdae.tsdae_loss
==============  =============================================  =========================

Scores must lie in ``embed.score_range`` (mapped to [0, 1]). Identical texts in an in-batch
batch are masked as false negatives. ``embed.mini_batch`` turns on GradCache for the
in-batch losses. ``embed.datasets`` mixes more training sets, each with its own loss, into every
step (:mod:`lmforge.tasks.embed_multi`). The trained model is saved as a sentence-transformers
folder in ``model/``; with ``embed.wise_ft: a`` the saved weights are the WiSE-FT interpolation
``(1 - a) theta_start + a theta_trained`` (:func:`lmforge.merge.interpolate_weights`).
"""
from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..config import RunConfig, Section
from ..data.readers import Table, read_table
from ..data.schema import apply_where, field_column, label_ids, label_names, load_splits, require_columns, text_values
from ..device import Placement
from ..embeddings.encoder import SentenceEncoder
from ..embeddings.tsdae import delete_words
from ..embeddings.evaluators import Evaluator, normalised_scores, run_evaluators
from ..embeddings.negatives import false_negative_keys
from ..errors import LmforgeError
from .base import Task, register_task
from .common import ADAPTER_MODES, add_adapter, open_run
from .embed_eval import file_evaluators, file_option_evaluators, split_evaluators
from .embed_multi import EmbedDataset, load_extra_sets

LOSSES = ("simcse_unsup", "simcse_sup", "mnr", "cosine", "cosent", "softmax_nli", "tsdae")
IN_BATCH = ("simcse_unsup", "simcse_sup", "mnr")
FIELDS = {"simcse_unsup": ["text"], "tsdae": ["text"], "simcse_sup": ["anchor", "positive", "negative"],
          "mnr": ["anchor", "positive"], "cosine": ["sentence1", "sentence2"], "cosent": ["sentence1", "sentence2"],
          "softmax_nli": ["sentence1", "sentence2"]}
LORA_DEFAULTS = ["query", "key", "value", "q_proj", "k_proj", "v_proj"]


class EmbedConfig(Section):
    """Which loss, pooling and evaluation."""

    loss: Literal["simcse_unsup", "simcse_sup", "mnr", "cosine", "cosent", "softmax_nli", "tsdae"] = "mnr"
    pooling: Literal["mean", "cls", "max", "last"] | None = Field(None, description="default: the model's, else mean")
    normalize: bool | None = Field(None, description="L2-normalise outputs (default: the model's setting)")
    dropout: float | None = Field(None, ge=0, lt=1, description="set the backbone's dropout (SimCSE needs > 0)")
    residual_dropout: float | None = Field(None, ge=0, lt=1, description="Llama-family decoders (attention "
                                           "dropout only): also drop embeddings and residual-branch outputs")
    mode: Literal["full", "lora", "adapter"] = Field("full", description="lora/adapter: the adapter: section's "
                                                     "kind (a mergeable one), merged into the saved model")
    temperature: float = Field(0.05, gt=0, description="simcse_*: InfoNCE temperature")
    scale: float = Field(20.0, gt=0, description="mnr / cosent: similarity scale")
    symmetric: bool = Field(False, description="in-batch losses: add the positive -> anchor direction")
    mini_batch: int | None = Field(None, gt=0, description="in-batch losses: GradCache mini-batch size")
    score_range: tuple[float, float] = Field((0.0, 5.0), description="declared range of gold scores")
    deletion_ratio: float = Field(0.6, ge=0, lt=1, description="tsdae: word deletion probability")
    sts_eval: str | None = Field(None, description="STS file (sentence1, sentence2, score) evaluated while training")
    retrieval_eval: str | None = Field(None, description="retrieval file evaluated while training")
    eval_before: bool = Field(True, description="also evaluate the untrained model (eval.json 'before')")
    datasets: list[EmbedDataset] = Field(default_factory=list, description="more training sets mixed into "
                                         "every step, each with its own loss (name, train, loss, rate, weight)")
    wise_ft: float | None = Field(None, gt=0, le=1, description="save (1 - a) * start + a * trained weights "
                                  "(WiSE-FT); evaluations during training see the trained weights")


class EmbedRun(RunConfig):
    task: Literal["embed"] = "embed"
    embed: EmbedConfig = Field(default_factory=EmbedConfig)


class EmbedModel(nn.Module):
    """What the engine optimises: the encoder plus the loss's extra modules (NLI head, TSDAE decoder)."""

    def __init__(self, encoder: SentenceEncoder, head: nn.Module | None = None, decoder: nn.Module | None = None):
        super().__init__()
        self.encoder, self.head, self.decoder = encoder, head, decoder

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        return self.encoder(input_ids, attention_mask, token_type_ids)  # (B, D)


@register_task("embed", config=EmbedRun)
class EmbedTask(Task):
    name = "embed"

    def __init__(self, cfg: EmbedRun, *, with_data: bool = True):
        self.cfg = cfg
        ec = cfg.embed
        self.loss_name = ec.loss
        self.placement = Placement.resolve(cfg.model.device, cfg.model.precision)
        self.encoder = SentenceEncoder.from_pretrained(
            cfg.model.name, pooling=ec.pooling, normalize=ec.normalize, dropout=ec.dropout,
            residual_dropout=ec.residual_dropout,
            attn_implementation=self.placement.attn_implementation(cfg.model.attn_implementation, encoder=True),
            trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.revision)
        self.tokenizer = self.encoder.tokenizer
        self.max_length = min(cfg.data.max_length, self.encoder.max_length)
        self._text_ids: dict[str, int] = {}
        self._noise = random.Random(cfg.seed)
        self.labels: list[str] | None = None
        self.evaluators: list[Evaluator] = []
        self.before: dict | None = None
        self.eval_items: list[dict] = []
        self.extra_sets: list[EmbedDataset] = list(ec.datasets) if with_data else []
        # WiSE-FT: the starting weights, kept on the CPU for the interpolation at save time
        self._start = ({k: v.detach().cpu().clone() for k, v in self.encoder.state_dict().items()}
                       if ec.wise_ft is not None and ec.wise_ft < 1 else None)
        train = ev = None
        if with_data:
            train, ev = self._tables()
            if self.loss_name == "softmax_nli":
                self.labels = label_names(train, field_column(cfg.data, "label"), cfg.data.labels)
            self.train_items = self._items(train)
            if self.extra_sets:
                if self.loss_name == "simcse_unsup":
                    raise LmforgeError("embed.datasets: simcse_unsup runs cannot mix in other sets")
                load_extra_sets(self, self.extra_sets, len(self.train_items), cfg.seed)
        head = nn.Linear(3 * self.encoder.dim, len(self.labels)) if self.labels else None
        decoder = None
        if self.loss_name == "tsdae" and with_data:
            from ..embeddings.tsdae import build_tied_decoder

            decoder = build_tied_decoder(self.encoder.backbone)
        if ec.mode in ADAPTER_MODES:
            add_adapter(self.encoder.backbone, cfg, LORA_DEFAULTS, [], self.tokenizer)
        self.model = EmbedModel(self.encoder, head, decoder)
        if with_data:
            self.evaluators = self._evaluators(ev)
            if self.evaluators and ec.eval_before:
                self.before = run_evaluators(self.evaluators, self.encoder, batch_size=self._eval_bs(),
                                             placement=self.placement)

    # ---- data ------------------------------------------------------------------------------
    def _tables(self) -> tuple[Table, Table | None]:
        return load_splits(self.cfg.data, self.cfg.seed)

    def _columns(self, table: Table | None = None, loss: str | None = None, dc=None) -> list[str]:
        """File columns of the text fields, in loss order (anchor, positive[, negative]); ``loss`` and
        ``dc`` (anything with ``columns``) default to the primary set's."""
        dc, loss = dc or self.cfg.data, loss or self.loss_name
        fields = list(FIELDS[loss])
        if loss == "mnr" and ("negative" in dc.columns or (
                table is not None and table.records and "negative" in table.records[0])):
            fields.append("negative")
        return [field_column(dc, f) for f in fields]

    def _tid(self, text: str) -> int:
        return self._text_ids.setdefault(text, len(self._text_ids))

    def rows_for(self, table: Table, ds: EmbedDataset) -> list[dict]:
        """Tokenised rows of an extra training set (``embed.datasets``), with its own loss and columns."""
        return self._items(table, ds.loss, ds, ds.score_range or self.cfg.embed.score_range)

    def _items(self, table: Table, loss: str | None = None, dc=None, score_range=None) -> list[dict]:
        dc, loss = dc or self.cfg.data, loss or self.loss_name
        cols = self._columns(table, loss, dc)
        extra = {"cosine": "score", "cosent": "score", "softmax_nli": "label"}.get(loss)
        require_columns(table, cols + ([field_column(dc, extra)] if extra else []))
        columns = [text_values(table, c) for c in cols]
        uniq = list(dict.fromkeys(t for col in columns for t in col))
        ids = dict(zip(uniq, self._tokenize(uniq)))
        items = [{"ids": [ids[col[i]] for col in columns], "tids": [self._tid(col[i]) for col in columns]}
                 for i in range(len(table))]
        if loss == "tsdae":
            for it, text in zip(items, columns[0]):
                it["text"] = text
        if extra == "score":
            rng = score_range or self.cfg.embed.score_range
            for it, y in zip(items, normalised_scores(table, field_column(dc, "score"), rng)):
                it["score"] = y
        elif extra == "label":
            for it, y in zip(items, label_ids(table, field_column(dc, "label"), self.labels, split="train")):
                it["label"] = y
        return items

    def _tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(list(texts), truncation=True, max_length=self.max_length,
                              return_attention_mask=False, return_token_type_ids=False)["input_ids"]

    def item_length(self, item: dict) -> int:
        return max(len(x) for x in item["ids"])

    def collate(self, items: Sequence[dict]) -> dict:
        batch = self._collate_rows(items)
        if self.extra_sets:  # one sub-batch per extra set (None when this micro-batch holds no row of it)
            batch["extra"] = [self._collate_rows(rows) if rows else None for rows in
                              ([r for it in items for r in it["extra"][k]] for k in range(len(self.extra_sets)))]
        return batch

    def _collate_rows(self, items: Sequence[dict]) -> dict:
        if "text" in items[0]:  # tsdae
            ratio = self.cfg.embed.deletion_ratio
            noisy = self._tokenize([delete_words(it["text"], ratio, self._noise) for it in items])
            return {"columns": [self.encoder.collate(noisy)],
                    "target": self.encoder.collate([it["ids"][0] for it in items])}
        ncol = len(items[0]["ids"])
        batch: dict = {"columns": [self.encoder.collate([it["ids"][c] for it in items]) for c in range(ncol)],
                       "tids": torch.tensor([it["tids"] for it in items], dtype=torch.long)}  # (B, C)
        if "score" in items[0]:
            batch["scores"] = torch.tensor([it["score"] for it in items], dtype=torch.float32)  # (B,)
        if "label" in items[0]:
            batch["labels"] = torch.tensor([it["label"] for it in items], dtype=torch.long)  # (B,)
        return batch

    def batch_units(self, batch: dict) -> int:
        return int(batch["columns"][0]["input_ids"].shape[0])

    def batch_tokens(self, batch: dict) -> int:
        parts = batch["columns"] + ([batch["target"]] if "target" in batch else [])
        extra = sum(self.batch_tokens(b) for b in batch.get("extra", ()) if b is not None)
        return int(sum(int(p["attention_mask"].sum()) for p in parts)) + extra

    # ---- loss ------------------------------------------------------------------------------
    def _embed(self, features: dict) -> Tensor:
        with self.placement.autocast():
            return self.model(**features)  # (b, D)

    def loss(self, batch: dict) -> tuple[Tensor, dict]:
        """The primary set's loss plus ``weight_k *`` each extra set's loss on its own sub-batch."""
        loss, metrics = self._loss_of(self.loss_name, batch, self.cfg.embed.scale)
        for ds, sub in zip(self.extra_sets, batch.get("extra", ())):
            if sub is None:
                continue
            part, m = self._loss_of(ds.loss, sub, ds.scale or self.cfg.embed.scale)
            loss = loss + ds.weight * part
            metrics |= {f"{ds.name}_loss": float(part.detach())} | {f"{ds.name}_{k}": v for k, v in m.items()}
        return loss, metrics

    def _loss_of(self, name: str, batch: dict, scale: float) -> tuple[Tensor, dict]:
        ec = self.cfg.embed
        cols = batch["columns"]
        if name in IN_BATCH and ec.mini_batch and self.batch_units(batch) > ec.mini_batch:
            from ..embeddings.cached import cached_embedding_loss, split_features

            groups = [split_features(c, ec.mini_batch) for c in cols]
            if name == "simcse_unsup":
                groups = groups * 2  # two dropout views of the same sentences
            loss = cached_embedding_loss(self._embed, groups,
                                         lambda embs: self._in_batch(embs, batch, name, scale)[0])
            return loss, {}
        if name == "simcse_unsup":  # one forward over both views: dropout differs per row
            both = {k: torch.cat([v, v]) for k, v in cols[0].items()}
            embs = list(self._embed(both).chunk(2))  # 2 x (B, D)
        else:
            embs = [self._embed(c) for c in cols]
        if name in IN_BATCH:
            return self._in_batch(embs, batch, name, scale)
        return self._pair_loss(embs, batch, name, scale)

    def _in_batch(self, embs: list[Tensor], batch: dict, name: str, scale: float) -> tuple[Tensor, dict]:
        from ..losses.contrastive import info_nce, multiple_negatives_ranking_loss

        ec = self.cfg.embed
        a, p = embs[0], embs[1]  # (B, D)
        negs = torch.stack(embs[2:], dim=1) if len(embs) > 2 else None  # (B, K, D)
        akeys, ckeys = false_negative_keys(batch["tids"])
        akeys, ckeys = akeys.to(a.device), ckeys.to(a.device)
        if name == "mnr":
            loss = multiple_negatives_ranking_loss(a, p, negs, scale=scale, symmetric=ec.symmetric,
                                                   anchor_ids=akeys, candidate_ids=ckeys)
        else:
            loss = info_nce(a, p, negs, temperature=ec.temperature, symmetric=ec.symmetric,
                            anchor_ids=akeys, candidate_ids=ckeys)
        with torch.no_grad():
            sims = F.normalize(a, dim=-1) @ F.normalize(p, dim=-1).T  # (B, B)
            acc = (sims.argmax(-1) == torch.arange(a.shape[0], device=a.device)).float().mean()
        return loss, {"in_batch_accuracy": float(acc)}

    def _pair_loss(self, embs: list[Tensor], batch: dict, name: str, scale: float) -> tuple[Tensor, dict]:
        from ..losses.contrastive import cosent_loss, cosine_similarity_loss, softmax_nli_logits

        net = self.model
        if name == "tsdae":
            from ..embeddings.tsdae import tsdae_loss

            t = batch["target"]
            with self.placement.autocast():
                return tsdae_loss(net.decoder, embs[0], t["input_ids"], t["attention_mask"]), {}
        u, v = embs
        if name == "cosine":
            return cosine_similarity_loss(u, v, batch["scores"]), {}
        if name == "cosent":
            return cosent_loss(u, v, batch["scores"], scale=scale), {}
        logits = softmax_nli_logits(u, v, net.head.weight, net.head.bias).float()  # (B, C)
        loss = F.cross_entropy(logits, batch["labels"])
        return loss, {"accuracy": float((logits.argmax(-1) == batch["labels"]).float().mean())}

    # ---- evaluation --------------------------------------------------------------------------
    def _eval_bs(self) -> int:
        return self.cfg.train.eval_batch_size or max(64, self.cfg.train.batch_size)

    def _evaluators(self, ev: Table | None) -> list[Evaluator]:
        ec = self.cfg.embed
        out, self.eval_items = file_option_evaluators(ec.sts_eval, ec.retrieval_eval, ec.score_range)
        if ev is not None and ev.records:
            out += split_evaluators(ev, self._columns(ev), self.loss_name, self.cfg.data, ec.score_range,
                                    self.labels, self.model.head, name="dev")
            self.eval_items += ev.records
        return out

    def evaluate(self, items: Table | None = None) -> dict:
        """Evaluator metrics (and ``before`` when training): STS, alignment/uniformity, retrieval."""
        if items is None:
            evs = self.evaluators
        else:
            evs = file_evaluators(items, self.cfg.embed.score_range)
        metrics = run_evaluators(evs, self.encoder, batch_size=self._eval_bs(), placement=self.placement)
        if items is None and self.before is not None:
            metrics["before"] = self.before
        return metrics

    def read_eval_file(self, path: str) -> Table:
        return apply_where(read_table(path), self.cfg.data.where)

    # ---- artefacts -----------------------------------------------------------------------------
    def trained_encoder(self) -> SentenceEncoder:
        """The encoder with LoRA merged (a copy in LoRA mode) and, with ``embed.wise_ft: a``,
        interpolated with the starting weights (a copy), ready to save or use."""
        if self.cfg.embed.mode not in ADAPTER_MODES and self._start is None:
            return self.encoder
        enc = copy.deepcopy(self.encoder).cpu()
        if self.cfg.embed.mode in ADAPTER_MODES:
            from ..adapters.lora import unwrap_lora

            unwrap_lora(enc.backbone)
            enc.backbone.requires_grad_(True)
        if self._start is not None:
            from ..merge import interpolate_weights

            enc.load_state_dict(interpolate_weights(self._start, enc.state_dict(), self.cfg.embed.wise_ft))
        return enc

    def save(self, out_dir: Path) -> None:
        """Write ``model/``: a sentence-transformers folder."""
        self.trained_encoder().save(Path(out_dir) / "model")

    @classmethod
    def from_run(cls, run_dir: str | Path, which: str = "final") -> "EmbedTask":
        run_dir = Path(run_dir)
        opened = open_run(run_dir, which)
        cfg, art = opened.config, opened.root / "model"
        if not (art / "modules.json").is_file():
            raise LmforgeError(f"{run_dir}: no trained model in {art}")
        ec = cfg.embed.model_copy(update={"mode": "full", "pooling": None, "normalize": None, "dropout": None,
                                         "residual_dropout": None, "wise_ft": None})
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"name": str(art)}), "embed": ec})
        return cls(cfg, with_data=False)

    def predict_file(self, path: str, out: str) -> int:
        """Embed a text file (one vector per text) into ``out`` (.npy or .parquet)."""
        from ..embeddings.files import read_texts, write_vectors

        texts = read_texts(path, field_column(self.cfg.data, "text"))
        vecs = self.encoder.encode(texts, batch_size=self._eval_bs(), placement=self.placement)
        write_vectors(out, texts, vecs)
        return len(texts)

