"""Named entity recognition: token classification with word-level BIO tags, full or LoRA.

- Data: one sentence per record, ``tokens`` (list of words) and ``ner_tags`` (list of BIO tags,
  or integer ids with ``data.labels``); ``data.columns`` maps other names. The label list comes
  from the data: ``O`` then ``B-T``/``I-T`` per entity type, sorted (:mod:`lmforge.data.tokens`).
- Alignment: the first sub-token of a word carries its tag; later sub-tokens are ignored or, with
  ``ner.label_all_subtokens``, carry the ``I-`` tag. Special tokens are ignored.
- Predictions are read at each word's first sub-token; evaluation is entity-level
  precision/recall/F1 per type and overall (seqeval via :func:`lmforge.eval.ner_report`).
  Words cut off by ``data.max_length`` count as ``O``. ``ner.decoding: bio`` decodes each sentence's
  word tags jointly (:func:`bio_viterbi`): the most probable tag sequence that is valid BIO (an
  ``I-T`` only after ``B-T`` or ``I-T``), instead of each word's most probable tag.
- ``predict`` reads ``text`` (raw strings, split into words CoNLL-style with character offsets kept) or
  ``tokens`` (lists of words) and writes entity spans merged from the word tags.
- Saved as ``adapter/`` (PEFT, ``TOKEN_CLS``) for LoRA or a Hugging Face folder ``model/``
  (with ``id2label``) for full fine-tuning, plus ``labels.json``.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field

from ..config import RunConfig, Section
from ..data.batching import collate_tokens, length_grouped_batches
from ..data.readers import Table, read_table
from ..data.schema import apply_where, field_column, load_splits, read_labels, require_columns
from ..data.tokens import (IGNORE, align_labels, bio_label_list, check_tag, inside_of, merge_spans, split_words,
                           word_first_tokens, words_with_offsets)
from ..device import Placement, move
from ..errors import LmforgeError
from ..models import load_tokenizer, resolve_model
from .base import Task, register_task
from .common import (ADAPTER_MODES, add_adapter, load_run_adapter, open_run, ready_for_inference, save_weights,
                     write_json)

LORA_DEFAULTS = ["query", "key", "value", "q_proj", "k_proj", "v_proj"]
HEADS = ["classifier", "score"]


class NerConfig(Section):
    """How the backbone is trained and how word tags meet sub-tokens."""

    mode: Literal["full", "lora", "adapter"] = Field("lora", description="lora/adapter: the adapter: section's kind")
    label_all_subtokens: bool = Field(
        False, description="train the non-first sub-tokens of a word on its I- tag instead of ignoring them")
    decoding: Literal["argmax", "bio"] = Field(
        "argmax", description="word tags: each word's most probable tag (argmax), or the most probable valid "
                              "BIO sequence per sentence (bio: never an I-T without a B-T before it)")


def bio_transitions(labels: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Which tags may start a sentence and follow each other under BIO.

    ``I-T`` may only follow ``B-T`` or ``I-T`` (and never start a sentence); ``O`` and ``B-*``
    may follow anything.

    Args:
        labels: (C,) tag names.

    Returns:
        ``start`` (C,) bool and ``allowed`` (C, C) bool, ``allowed[i, j]``: tag ``j`` may follow tag ``i``.
    """
    parts = [check_tag(l) for l in labels]
    start = torch.tensor([p != "I" for p, _ in parts])
    allowed = torch.tensor([[pj != "I" or (pi in "BI" and ti == tj) for pj, tj in parts] for pi, ti in parts])
    return start, allowed


def bio_viterbi(logp: torch.Tensor, start: torch.Tensor, allowed: torch.Tensor) -> list[int]:
    """The most probable tag sequence among the valid ones (Viterbi on independent word scores).

    ``argmax_y sum_t logp[t, y_t]`` subject to ``start[y_0]`` and ``allowed[y_{t-1}, y_t]``:
    ``delta_0 = logp_0 + log start``, ``delta_t[j] = logp_t[j] + max_i (delta_{t-1}[i] + log allowed[i, j])``,
    then backtracking from ``argmax delta_{T-1}``.

    Args:
        logp: (T, C) per-word log-probabilities of each tag.
        start: (C,) bool, tags that may open a sentence.
        allowed: (C, C) bool transitions.

    Returns:
        T tag ids (empty for T = 0).
    """
    if logp.shape[0] == 0:
        return []
    neg = torch.tensor(float("-inf"), dtype=logp.dtype)
    trans = torch.where(allowed, torch.zeros((), dtype=logp.dtype), neg)  # (C, C)
    delta = logp[0] + torch.where(start, torch.zeros((), dtype=logp.dtype), neg)  # (C,)
    back = []
    for t in range(1, logp.shape[0]):
        scores = delta[:, None] + trans  # (C_prev, C)
        best, arg = scores.max(0)  # (C,), (C,)
        back.append(arg)
        delta = best + logp[t]
    path = [int(delta.argmax())]
    for arg in reversed(back):
        path.append(int(arg[path[-1]]))
    return path[::-1]


class NerRun(RunConfig):
    task: Literal["ner"] = "ner"
    ner: NerConfig = Field(default_factory=NerConfig)


@register_task("ner", config=NerRun)
class NerTask(Task):
    name = "ner"

    def __init__(self, cfg: NerRun, *, with_data: bool = True, labels: list[str] | None = None,
                 adapt: bool = True):
        self.cfg = cfg
        self.placement = Placement.resolve(cfg.model.device, cfg.model.precision)
        self.folder = resolve_model(cfg.model.name, cfg.model.revision)
        self.tokenizer = load_tokenizer(self.folder, cfg.model.trust_remote_code)
        if not self.tokenizer.is_fast:
            raise LmforgeError(f"{cfg.model.name}: NER needs a fast tokenizer (word ids of sub-tokens)")
        dc = cfg.data
        self.tokens_col, self.tags_col = field_column(dc, "tokens"), field_column(dc, "ner_tags")
        if with_data:
            train, ev = load_splits(dc, cfg.seed)
            self.labels = self._label_list(train)
            self.inside = inside_of(self.labels)
            self.train_items = self._items(train)
            self.eval_items = self._items(ev) if ev is not None else []
        else:
            self.labels = labels or dc.labels
            if not self.labels:
                raise LmforgeError("NER labels are unknown (no labels.json in the run)")
            self.inside = inside_of(self.labels)
        self.model = self._build_model(adapt)
        if cfg.model.frozen_in_compute_dtype:
            self.placement.cast_frozen(self.model)

    # ---- data -------------------------------------------------------------------------
    def _words(self, table: Table, i: int) -> list[str]:
        words = table.records[i].get(self.tokens_col)
        if not isinstance(words, list) or not words or not all(isinstance(w, str) and w for w in words):
            raise LmforgeError(f"{table.where(i)}: '{self.tokens_col}' must be a non-empty list of words")
        return words

    def _tags(self, table: Table, i: int) -> list[str]:
        """The record's tags as label names (integer tags index ``data.labels``)."""
        tags, n = table.records[i].get(self.tags_col), len(table.records[i][self.tokens_col])
        if not isinstance(tags, list) or len(tags) != n:
            raise LmforgeError(f"{table.where(i)}: '{self.tags_col}' must be a list of {n} tags (one per word)")
        names = self.cfg.data.labels
        out = []
        for t in tags:
            if isinstance(t, int) and not isinstance(t, bool):
                if not names or not 0 <= t < len(names):
                    raise LmforgeError(f"{table.where(i)}: integer tag {t} needs data.labels (names in id order)")
                t = names[t]
            try:
                check_tag(t)
            except (ValueError, TypeError):
                raise LmforgeError(f"{table.where(i)}: tag {t!r} is not BIO (O, B-TYPE or I-TYPE)") from None
            out.append(t)
        return out

    def _label_list(self, train: Table) -> list[str]:
        require_columns(train, [self.tokens_col, self.tags_col])
        if self.cfg.data.labels:
            labels = list(self.cfg.data.labels)
            if len(set(labels)) != len(labels):
                raise LmforgeError("config: data.labels has duplicate names")
            for l in labels:
                try:
                    check_tag(l)
                except ValueError as err:
                    raise LmforgeError(f"config: data.labels: {err}") from None
            return labels
        for i in range(len(train)):
            self._words(train, i)
        return bio_label_list([self._tags(train, i) for i in range(len(train))])

    def _encode(self, word_lists: list[list[str]]):
        return self.tokenizer(word_lists, is_split_into_words=True, truncation=True,
                              max_length=self.cfg.data.max_length)

    def _items(self, table: Table) -> list[dict]:
        """Tokenised sentences with aligned token labels and the gold word tags (for evaluation)."""
        require_columns(table, [self.tokens_col, self.tags_col])
        words = [self._words(table, i) for i in range(len(table))]
        tags = [self._tags(table, i) for i in range(len(table))]
        index = {l: k for k, l in enumerate(self.labels)}
        enc = self._encode(words)
        items = []
        for i, (ws, ts) in enumerate(zip(words, tags)):
            unknown = [t for t in ts if t not in index]
            if unknown:
                raise LmforgeError(f"{table.where(i)}: unknown tag {unknown[0]!r} (labels: {', '.join(self.labels)})")
            wid = enc.word_ids(i)
            labels = align_labels(wid, [index[t] for t in ts], label_all=self.cfg.ner.label_all_subtokens,
                                  inside=self.inside)
            items.append({"input_ids": enc["input_ids"][i], "labels": labels, "tags": ts,
                          "first": word_first_tokens(wid, len(ws))})
        return items

    def collate(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        keys = ("input_ids", "labels") if "labels" in items[0] else ("input_ids",)
        return collate_tokens(items, self.tokenizer.pad_token_id, keys)

    def batch_units(self, batch: dict) -> int:
        return int((batch["labels"] != IGNORE).sum())

    # ---- model ------------------------------------------------------------------------
    def _build_model(self, adapt: bool = True):
        """The HF token classifier, LoRA-wrapped in ``lora`` mode (``adapt=False``: plain)."""
        from transformers import AutoConfig, AutoModelForTokenClassification

        mc = self.cfg.model
        hf_cfg = AutoConfig.from_pretrained(self.folder, trust_remote_code=mc.trust_remote_code)
        hf_cfg.num_labels = len(self.labels)
        hf_cfg.id2label = dict(enumerate(self.labels))
        hf_cfg.label2id = {l: i for i, l in enumerate(self.labels)}
        torch.manual_seed(self.cfg.seed)  # the new head and LoRA weights depend on the run's seed only
        model = AutoModelForTokenClassification.from_pretrained(
            self.folder, config=hf_cfg, trust_remote_code=mc.trust_remote_code, dtype=torch.float32,
            attn_implementation=self.placement.attn_implementation(mc.attn_implementation, encoder=True))
        if adapt and self.cfg.ner.mode in ADAPTER_MODES:
            heads = [h for h in HEADS if any(n.rsplit(".", 1)[-1] == h for n, _ in model.named_modules())]
            add_adapter(model, self.cfg, LORA_DEFAULTS, heads, self.tokenizer)
        return model

    # ---- engine protocol ----------------------------------------------------------------
    def loss(self, batch):
        labels = batch["labels"]  # (B, T)
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        sel = labels != IGNORE  # (B, T)
        loss = F.cross_entropy(logits[sel], labels[sel])  # mean over labelled sub-tokens
        acc = (logits[sel].argmax(-1) == labels[sel]).float().mean()
        return loss, {"token_accuracy": float(acc)}

    @torch.no_grad()
    def predict_items(self, items: Sequence[dict], batch_size: int | None = None) -> list[tuple[list, list]]:
        """Per item, the predicted tag and its probability for every word (``O``/0 for words with no token)."""
        bs = batch_size or self.cfg.train.eval_batch_size or max(32, self.cfg.train.batch_size * 2)
        order = length_grouped_batches([len(it["input_ids"]) for it in items], bs, seed=0, epoch=0, shuffle=False)
        out: list = [None] * len(items)
        was_training = self.model.training
        self.model.eval()
        for idx in order:
            batch = move(self.collate([{"input_ids": items[i]["input_ids"]} for i in idx]), self.placement.device)
            with self.placement.autocast():
                logits = self.model(**batch).logits.float()  # (B, T, C)
            probs = torch.softmax(logits, -1).cpu()  # (B, T, C)
            for row, i in enumerate(idx):
                out[i] = self._word_tags(probs[row], items[i]["first"])
        self.model.train(was_training)
        return out

    def _word_tags(self, probs: torch.Tensor, first: Sequence[int]) -> tuple[list[str], list[float]]:
        """Word tags and their probabilities from one sentence's (T, C) token probabilities, read at
        each word's first sub-token (``first[w] < 0``: the word was cut off, tag ``O`` with 0.0)."""
        kept = torch.tensor([t for t in first if t >= 0], dtype=torch.long)
        word_p = probs[kept]  # (W_kept, C)
        if self.cfg.ner.decoding == "bio":
            if not hasattr(self, "_bio"):
                self._bio = bio_transitions(self.labels)
            ids = bio_viterbi(word_p.clamp_min(1e-12).log(), *self._bio)
        else:
            ids = word_p.argmax(-1).tolist()
        tags, ps, k = [], [], 0
        for t in first:
            if t < 0:
                tags.append("O")
                ps.append(0.0)
            else:
                tags.append(self.labels[ids[k]])
                ps.append(float(word_p[k, ids[k]]))
                k += 1
        return tags, ps

    def evaluate(self, items: Sequence[dict] | None = None) -> dict:
        from ..eval.metrics import ner_report

        items = self.eval_items if items is None else items
        t0 = time.perf_counter()
        preds = self.predict_items(items)
        dt = time.perf_counter() - t0
        report = ner_report([it["tags"] for it in items], [p[0] for p in preds])
        report["sentences_per_s"] = len(items) / max(dt, 1e-9)
        return report

    def save(self, out_dir: Path) -> None:
        """Write ``adapter/`` (LoRA, PEFT format) or ``model/`` (HF folder) and ``labels.json``."""
        save_weights(self.model, self.tokenizer, out_dir, lora=self.cfg.ner.mode in ADAPTER_MODES,
                     base_name=str(self.cfg.model.name), task_type="TOKEN_CLS")
        write_json(out_dir / "labels.json", self.labels)

    # ---- loading a finished run --------------------------------------------------------
    @classmethod
    def from_run(cls, run_dir: str | Path, which: str = "final") -> "NerTask":
        run_dir = Path(run_dir)
        opened = open_run(run_dir, which)
        cfg, art = opened.config, opened.root
        labels = read_labels(art)
        if cfg.ner.mode not in ADAPTER_MODES:
            cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"name": str(art / "model")})})
        task = cls(cfg, with_data=False, labels=labels, adapt=False)
        if cfg.ner.mode in ADAPTER_MODES:
            load_run_adapter(task.model, cfg, art / "adapter")
        ready_for_inference(task)
        return task

    # ---- files for eval/predict ------------------------------------------------------------
    def read_eval_file(self, path: str) -> list[dict]:
        return self._items(apply_where(read_table(path), self.cfg.data.where))

    def predict_file(self, path: str, out: str) -> int:
        """Entity spans for each record's ``text`` (split into words CoNLL-style) or ``tokens`` (list of words)."""
        table = read_table(path)
        if not table.records:
            raise LmforgeError(f"{path}: no records (empty file)")
        texts, offsets, words = [], [], []
        for i, rec in enumerate(table.records):
            if isinstance(rec.get("text"), str):
                ws, offs = split_words(rec["text"])
                text = rec["text"]
            elif self.tokens_col in rec or "tokens" in rec:
                ws = rec.get(self.tokens_col, rec.get("tokens"))
                if not isinstance(ws, list):
                    raise LmforgeError(f"{table.where(i)}: 'tokens' must be a list of words")
                try:
                    text, offs = words_with_offsets(ws)
                except LmforgeError as err:
                    raise LmforgeError(f"{table.where(i)}: {err}") from None
            else:
                raise LmforgeError(f"{table.where(i)}: needs 'text' (a string) or 'tokens' (a list of words)")
            texts.append(text)
            offsets.append(offs)
            words.append(ws)
        nonempty = [i for i, ws in enumerate(words) if ws]
        enc = self._encode([words[i] for i in nonempty]) if nonempty else None
        items = [{"input_ids": enc["input_ids"][k], "first": word_first_tokens(enc.word_ids(k), len(words[i]))}
                 for k, i in enumerate(nonempty)]
        preds: list = [([], [])] * len(words)
        for i, p in zip(nonempty, self.predict_items(items) if items else []):
            preds[i] = p
        from ..rundir import write_jsonl

        return write_jsonl(out, ({"text": text, "entities": merge_spans(text, offs, tags, scores), "tags": tags}
                                 for text, offs, (tags, scores) in zip(texts, offsets, preds)))

