"""Continued pretraining with masked language modelling (domain adaptation of an encoder).

- The model is ``AutoModelForMaskedLM``; when the checkpoint has no MLM head (a ``BertModel``
  such as the packaged MiniLM) the head is initialised from the run seed and its decoder is tied
  to the input embeddings.
- Texts are tokenised once; long texts become several ``max_length`` windows (nothing is cut
  off). Training masks each batch afresh (token or whole-word masking, 15% / 80-10-10 by
  default, :mod:`lmforge.data.masking`) with a seed derived from the run seed and the batch's
  examples, so a resumed run sees the same masks. Held-out texts are masked once with
  ``mlm.eval_mask_seed``: perplexities before and after training score the same positions.
- MLM perplexity = ``exp(mean cross-entropy over the masked tokens)``; only masked positions go
  through the vocabulary projection.
- The run saves a plain Hugging Face folder ``model/`` (MLM head included) that ``classify`` (or
  any encoder task) starts from by path, and ``lmforge fill-mask`` reads. Tensors of the source
  checkpoint that the MLM model does not use (BERT's pooler) are kept in it, so a classifier
  built from the adapted encoder gets the same pooler as one built from the original.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from ..config import RunConfig, Section
from ..data.batching import attention_mask, length_grouped_batches, pad_sequences
from ..data.masking import mask_batch, seed_of
from ..data.readers import Table, read_table
from ..data.schema import apply_where, field_column, load_splits, require_columns, text_values
from ..device import Placement, move
from ..errors import LmforgeError
from ..models import load_tokenizer, resolve_model
from .base import Task, register_task
from .common import ADAPTER_MODES, add_adapter, atomic_dir, open_run, ready_for_inference

log = logging.getLogger(__name__)


class MlmConfig(Section):
    """How texts are masked."""

    probability: float = Field(0.15, gt=0, lt=1, description="share of tokens (or words) selected")
    whole_word: bool = Field(False, description="select whole words: all their sub-tokens together")
    mask_prob: float = Field(0.8, ge=0, le=1, description="selected tokens replaced by the mask token")
    random_prob: float = Field(0.1, ge=0, le=1, description="selected tokens replaced by a random token")
    eval_mask_seed: int = Field(0, description="fixed masking of the held-out texts")
    eval_before: bool = Field(True, description="also score the held-out texts before training")
    mode: Literal["full", "lora", "adapter"] = Field(
        "full", description="lora/adapter: train the adapter: section's kind (a mergeable one), saved merged")

    @model_validator(mode="after")
    def _shares(self):
        if self.mask_prob + self.random_prob > 1:
            raise ValueError("mask_prob + random_prob must be at most 1")
        return self


class MlmRun(RunConfig):
    task: Literal["mlm"] = "mlm"
    mlm: MlmConfig = Field(default_factory=MlmConfig)


def _head_name(hf: nn.Module) -> str | None:
    """The child module holding the vocabulary projection when it maps hidden states to logits alone
    (BERT's ``cls``, RoBERTa's ``lm_head``); None when the head is spread over several children."""
    out = hf.get_output_embeddings()
    base = hf.base_model
    others = [(n, c) for n, c in hf.named_children() if c is not base and any(True for _ in c.parameters())]
    if len(others) == 1 and out is not None and any(m is out for m in others[0][1].modules()):
        return others[0][0]
    return None


class MaskedLM(nn.Module):
    """A Hugging Face masked LM whose forward scores the masked positions only."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf
        self.head = _head_name(hf)

    def forward(self, input_ids, attention_mask, labels, token_type_ids=None):
        """Summed cross-entropy and correct predictions over positions with ``labels != -100``.

        Returns:
            ``(nll_sum, n_correct)``: 0-d fp32 tensor and 0-d int tensor.
        """
        sel = labels != -100  # (B, T)
        kw = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kw["token_type_ids"] = token_type_ids
        if self.head is not None:
            hidden = self.hf.base_model(**kw).last_hidden_state  # (B, T, H)
            logits = getattr(self.hf, self.head)(hidden[sel])  # (N, V)
        else:
            logits = self.hf(**kw).logits[sel]  # (N, V)
        logits = logits.float()
        target = labels[sel]  # (N,)
        nll = F.cross_entropy(logits, target, reduction="sum")
        return nll, (logits.argmax(-1) == target).sum()


def _carried_tensors(folder: Path, unexpected: set[str], hf: nn.Module) -> dict[str, torch.Tensor]:
    """Checkpoint tensors of the base model the MLM model does not use (e.g. ``pooler.*``), keyed as
    the MLM model's base would name them (``bert.pooler.*``)."""
    from safetensors import safe_open

    prefix = hf.base_model_prefix
    tops = {n for n, _ in hf.named_children()} - {prefix}
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                if k not in unexpected or k.split(".", 1)[0] in tops:
                    continue
                out[k if k.startswith(prefix + ".") else f"{prefix}.{k}"] = fh.get_tensor(k)
    return out


@register_task("mlm", config=MlmRun)
class MlmTask(Task):
    name = "mlm"

    def __init__(self, cfg: MlmRun, *, with_data: bool = True):
        self.cfg = cfg
        self.placement = Placement.resolve(cfg.model.device, cfg.model.precision)
        self.folder = resolve_model(cfg.model.name, cfg.model.revision)
        self.tokenizer = load_tokenizer(self.folder, cfg.model.trust_remote_code)
        if self.tokenizer.mask_token_id is None:
            raise LmforgeError(f"{cfg.model.name}: the tokenizer has no mask token; masked-LM training needs one")
        if not self.tokenizer.is_fast:
            raise LmforgeError(f"{cfg.model.name}: masked-LM training needs a fast tokenizer (word ids)")
        self.text_col = field_column(cfg.data, "text")
        self.before: dict | None = None
        if with_data:
            train, ev = load_splits(cfg.data, cfg.seed)
            self.train_items = self._items(train)
            self.eval_items = self._masked(self._items(ev)) if ev is not None else []
        self.model = self._build_model()
        if cfg.model.frozen_in_compute_dtype:
            self.placement.cast_frozen(self.model)
        if with_data and self.eval_items and cfg.mlm.eval_before:
            self.model.to(self.placement.device)
            self.before = self.evaluate(self.eval_items)
            log.info("held-out MLM perplexity before training: %.3f", self.before["perplexity"])

    # ---- data -------------------------------------------------------------------------
    def _items(self, table: Table) -> list[dict]:
        """Token ids and word ids (-1 at special tokens) of every ``max_length`` window of every text."""
        require_columns(table, [self.text_col])
        texts = text_values(table, self.text_col)
        enc = self.tokenizer(texts, truncation=True, max_length=self.cfg.data.max_length,
                             return_overflowing_tokens=True)
        items = []
        for i, ids in enumerate(enc["input_ids"]):
            words = [-1 if w is None else w for w in enc.word_ids(i)]
            if any(w >= 0 for w in words):
                base = min(w for w in words if w >= 0)  # windows after the first start mid-text
                items.append({"input_ids": ids, "word_ids": [w - base if w >= 0 else -1 for w in words],
                              "idx": len(items)})
        if not items:
            raise LmforgeError(f"{table.source}: no tokens to mask")
        return items

    def _mask(self, ids: list[list[int]], words: list[list[int]], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        mc = self.cfg.mlm
        return mask_batch(pad_sequences(ids, self.tokenizer.pad_token_id), pad_sequences(words, -1),
                          mask_token_id=self.tokenizer.mask_token_id, vocab_size=len(self.tokenizer),
                          seed=seed, prob=mc.probability, whole_word=mc.whole_word, mask_prob=mc.mask_prob,
                          random_prob=mc.random_prob)

    def _masked(self, items: list[dict]) -> list[dict]:
        """Held-out items masked once, each with its own seed (independent of batching)."""
        out = []
        for it in items:
            x, y = self._mask([it["input_ids"]], [it["word_ids"]], seed_of(self.cfg.mlm.eval_mask_seed, it["idx"]))
            out.append({"input_ids": x[0].tolist(), "labels": y[0].tolist()})
        return out

    def collate(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        ids = [it["input_ids"] for it in items]
        batch = {"attention_mask": attention_mask(ids)}  # (B, T)
        if "labels" in items[0]:  # pre-masked held-out items
            batch["input_ids"] = pad_sequences(ids, self.tokenizer.pad_token_id)
            batch["labels"] = pad_sequences([it["labels"] for it in items], -100)
        else:
            seed = seed_of(self.cfg.seed, *(it["idx"] for it in items))
            batch["input_ids"], batch["labels"] = self._mask(ids, [it["word_ids"] for it in items], seed)
        return batch

    def batch_units(self, batch: dict) -> int:
        return int((batch["labels"] != -100).sum())

    # ---- model ------------------------------------------------------------------------
    def _build_model(self) -> MaskedLM:
        from transformers import AutoModelForMaskedLM

        mc = self.cfg.model
        torch.manual_seed(self.cfg.seed)  # a new head depends on the run's seed only
        hf, info = AutoModelForMaskedLM.from_pretrained(
            self.folder, trust_remote_code=mc.trust_remote_code, dtype=torch.float32, output_loading_info=True,
            attn_implementation=self.placement.attn_implementation(mc.attn_implementation, encoder=True))
        model = MaskedLM(hf)
        head_prefix = f"{model.head}." if model.head else "\0"
        if any(k.startswith(head_prefix) for k in info["missing_keys"]):
            out_emb, in_emb = hf.get_output_embeddings(), hf.get_input_embeddings()
            if out_emb.weight is not in_emb.weight:
                out_emb.weight = in_emb.weight
            hf.config.tie_word_embeddings = True
            log.info("the checkpoint has no MLM head: a new one is initialised, tied to the input embeddings")
        self.carried = _carried_tensors(Path(self.folder), set(info["unexpected_keys"]), hf)
        if self.cfg.mlm.mode in ADAPTER_MODES:
            add_adapter(hf, self.cfg, ["query", "key", "value", "q_proj", "k_proj", "v_proj"], [], self.tokenizer)
        return model

    @property
    def hf(self) -> nn.Module:
        return self.model.hf

    # ---- engine protocol ----------------------------------------------------------------
    def loss(self, batch):
        nll, correct = self.model(**batch)
        n = (batch["labels"] != -100).sum().clamp_min(1)
        return nll / n, {"accuracy": float(correct) / float(n)}

    @torch.no_grad()
    def evaluate(self, items: Sequence[dict] | None = None) -> dict:
        """MLM perplexity and masked-token accuracy on pre-masked items (the held-out split by default)."""
        from ..eval.metrics import perplexity_report

        use = self.eval_items if items is None else items
        bs = self.cfg.train.eval_batch_size or max(32, self.cfg.train.batch_size * 2)
        order = length_grouped_batches([len(it["input_ids"]) for it in use], bs, seed=0, epoch=0, shuffle=False)
        was_training = self.model.training
        self.model.eval()
        nll, n, correct = 0.0, 0, 0
        for idx in order:
            batch = move(self.collate([use[i] for i in idx]), self.placement.device)
            with self.placement.autocast():
                s, c = self.model(**batch)
            nll += float(s)
            correct += int(c)
            n += int((batch["labels"] != -100).sum())
        self.model.train(was_training)
        if n == 0:
            raise LmforgeError("no masked tokens to score")
        report = perplexity_report(nll, n) | {"accuracy": correct / n}
        if items is None and self.before is not None:
            report |= {"perplexity_before": self.before["perplexity"], "perplexity_after": report["perplexity"],
                       "before": self.before}
        return report

    def save(self, out_dir: Path) -> None:
        """Write ``model/``: a Hugging Face masked-LM folder with the tokenizer."""
        hf = self.hf
        if self.cfg.mlm.mode in ADAPTER_MODES:  # adapters merged: a plain masked-LM folder
            import copy

            from ..adapters.base import unwrap_adapters

            hf = unwrap_adapters(copy.deepcopy(hf).cpu())
        with atomic_dir(out_dir / "model") as tmp:
            hf.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            if self.carried and (tmp / "model.safetensors").is_file():
                from safetensors.torch import load_file, save_file

                state = load_file(str(tmp / "model.safetensors"))
                state.update({k: v for k, v in self.carried.items() if k not in state})
                save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})

    # ---- loading a finished run --------------------------------------------------------
    @classmethod
    def from_run(cls, run_dir: str | Path, which: str = "final") -> "MlmTask":
        run_dir = Path(run_dir)
        opened = open_run(run_dir, which)
        cfg, art = opened.config, opened.root / "model"
        if not (art / "config.json").is_file():
            raise LmforgeError(f"{run_dir}: no trained model in the run (missing {art.name}/)")
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"name": str(art)}),
                                     "mlm": cfg.mlm.model_copy(update={"mode": "full"})})  # saved merged
        task = cls(cfg, with_data=False)
        ready_for_inference(task)
        return task

    def read_eval_file(self, path: str) -> list[dict]:
        table = apply_where(read_table(path), self.cfg.data.where)
        return self._masked(self._items(table))

    def predict_file(self, path: str, out: str) -> int:
        raise LmforgeError("mlm runs do not predict files; use: lmforge fill-mask RUN_DIR \"a [MASK] text\"")

