"""Reward models: a scalar head on a causal LM, trained with the Bradley-Terry ranking loss.

The model is ``AutoModelForSequenceClassification`` with one output (the ``score`` head, trained
in full next to LoRA). The reward of a prompt/response pair is the head applied to the final
hidden state of the sequence's last real token (found from the sequence length, not from pad
ids: several tokenizers use EOS as the pad token). Loss: ``-log sigma(r_w - r_l - m)`` with an
optional per-pair margin ``m`` (``data.columns.margin``). Evaluation: held-out pairwise accuracy.

Hidden-state regularisation (``reward.sft_alpha``; GRM, Yang et al. 2024, "Regularizing hidden
states enables learning generalizable reward model for LLMs"): the same final hidden states also
feed the base's (frozen) language-model head, and the chosen responses' token-mean NLL keeps
them able to generate text, which the paper finds makes the reward generalise out of
distribution, most with little preference data::

    L = (1 - alpha) L_BT + alpha L_SFT,   L_SFT = -mean_{t in chosen response} log p(y_t | y_<t, x)
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

import torch
from pydantic import Field

from ..config import RunConfig
from ..data.chat import IGNORE
from ..data.readers import read_table
from ..data.schema import apply_where, field_column, load_splits, require_columns
from ..device import move
from ..errors import LmforgeError
from ..losses.lm import chunked_cross_entropy
from ..losses.preference import bradley_terry_loss
from .causal import CausalSection, CausalTask
from .preference import encode_pairs, pair_sequences
from .base import register_task

RESPONSE_COLUMNS = ("response", "completion", "chosen")


class RewardConfig(CausalSection):
    """Reward-model options."""

    max_prompt_length: int | None = Field(None, gt=0, description="prompt tokens kept (from the end)")
    use_margin: bool = Field(False, description="subtract the per-pair margin column (data.columns.margin)")
    sft_alpha: float = Field(0.0, ge=0.0, lt=1.0,
                             description="weight of the chosen responses' NLL through the base's LM head "
                                         "(hidden-state regularisation, GRM): L = (1-a) L_BT + a L_SFT")
    packing: bool = Field(True, description="pack a batch's sequences into shared rows (per-sequence position "
                                            "ids, no attention across them): no padding")


class RewardRun(RunConfig):
    task: Literal["reward"] = "reward"
    reward: RewardConfig = Field(default_factory=RewardConfig)


@register_task("reward", config=RewardRun)
class RewardTask(CausalTask):
    name = "reward"
    section = "reward"
    reward_head = True
    peft_task_type = "SEQ_CLS"

    # ---- data -------------------------------------------------------------------------------
    @property
    def max_prompt(self) -> int:
        ml = self.cfg.data.max_length
        return min(self.opts.max_prompt_length or ml // 2, ml - 1)

    def _pairs(self, table, split: str) -> list[dict]:
        items, _ = encode_pairs(self, table, split, self.cfg.data.max_length, self.max_prompt)
        if self.opts.use_margin:
            col = field_column(self.cfg.data, "margin")
            require_columns(table, [col])
            margins = {}
            for i, rec in enumerate(table.records):
                v = rec[col]
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise LmforgeError(f"{table.where(i)}: '{col}' must be a number, got {v!r:.40}")
                margins[i] = float(v)
            for it in items:
                it["margin"] = margins[it["index"]]
        return items

    def load_data(self) -> None:
        train, ev = load_splits(self.cfg.data, self.cfg.seed)
        self.train_items = self._pairs(train, "train")
        self.eval_items = self._pairs(ev, "eval") if ev is not None else []

    def read_eval_file(self, path: str) -> list[dict]:
        return self._pairs(apply_where(read_table(path), self.cfg.data.where), "eval")

    def item_length(self, item: dict) -> int:
        return len(item["prompt_ids"]) + max(len(item["chosen_ids"]), len(item["rejected_ids"]))

    def collate_sequences(self, seqs: Sequence[dict]) -> dict[str, torch.Tensor]:
        """Packed or padded sequences plus ``last_index`` (N,): each sequence's last token in the
        flattened (R * T) batch."""
        batch = super().collate_sequences(seqs)
        width = batch["input_ids"].shape[1]
        if "sample_ids" in batch:
            flat = batch["sample_ids"].flatten()  # (R * T,)
            real = flat >= 0
            pos = torch.arange(flat.numel())[real]
            last = torch.zeros(len(seqs), dtype=torch.long).scatter_reduce(0, flat[real], pos, "amax")
        else:
            last = torch.arange(len(seqs)) * width + batch["attention_mask"].sum(-1) - 1  # (N,)
        batch["last_index"] = last
        return batch

    def collate(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        """The 2B sequences (chosen ones first, then rejected), packed or padded; ``n_pairs``, ``margin``;
        with ``sft_alpha`` also ``targets``: the chosen responses' next tokens (IGNORE elsewhere)."""
        if self.opts.sft_alpha > 0:
            pairs = [pair_sequences(it) for it in items]
            chosen = [p[0] for p in pairs]
            rejected = [{"input_ids": p[1]["input_ids"], "targets": [IGNORE] * len(p[1]["input_ids"])} for p in pairs]
            seqs = chosen + rejected
        else:
            seqs = [{"input_ids": it["prompt_ids"] + it[f"{s}_ids"]} for s in ("chosen", "rejected") for it in items]
        batch = self.collate_sequences(seqs)
        batch["n_pairs"] = torch.tensor(len(items))
        if all("margin" in it for it in items):
            batch["margin"] = torch.tensor([it["margin"] for it in items], dtype=torch.float32)  # (B,)
        return batch

    def batch_units(self, batch: dict) -> int:
        return int(batch["n_pairs"])

    # ---- model ---------------------------------------------------------------------------------
    def rewards(self, batch: dict, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """(N,) scalar rewards: the score head on each sequence's last real token."""
        hidden = self.hidden(batch) if hidden is None else hidden  # (R, T, H)
        h_last = hidden.flatten(0, 1).index_select(0, batch["last_index"])  # (N, H)
        head = self.core.score
        with torch.autocast(h_last.device.type, enabled=False):  # the head in its own (fp32) precision
            return head(h_last.to(head.weight.dtype)).squeeze(-1).float()  # (N,)

    def build_model(self, adapter_dir=None, full: bool = False):
        model = super().build_model(adapter_dir, full)
        self._lm_head = None
        if self.opts.sft_alpha > 0 and not getattr(model.config, "tie_word_embeddings", False):
            from ..causal_lm import read_base_tensor

            head = read_base_tensor(self.folder, "lm_head.weight")
            if head is None:
                raise LmforgeError(f"reward.sft_alpha: {self.folder} has no lm_head.weight in its safetensors "
                                   f"(and does not tie it to the embeddings); set sft_alpha: 0")
            emb = model.get_input_embeddings().weight
            self._lm_head = head.to(emb.device, emb.dtype)  # (V, H), frozen
        return model

    def lm_head_weight(self) -> torch.Tensor:
        """(V, H) the base's language-model head: a sequence-classification model keeps it only as
        the input embeddings it is tied to; an untied head is read from the base's weights."""
        return self.core.get_input_embeddings().weight if self._lm_head is None else self._lm_head

    def loss(self, batch):
        hidden = self.hidden(batch)  # (R, T, H)
        r = self.rewards(batch, hidden)  # (2B,)
        n = r.shape[0] // 2
        chosen, rejected = r[:n], r[n:]
        loss = bradley_terry_loss(chosen, rejected, batch.get("margin")).mean()
        diff = (chosen - rejected).detach()
        metrics = {"accuracy": float((diff > 0).float().mean()), "margin": float(diff.mean()),
                   "rewards/chosen": float(chosen.detach().mean()), "rewards/rejected": float(rejected.detach().mean())}
        alpha = self.opts.sft_alpha
        if alpha > 0:
            nll = chunked_cross_entropy(hidden, self.lm_head_weight().detach(), batch["targets"], reduction="mean")
            metrics["bt_loss"], metrics["sft_nll"] = float(loss.detach()), float(nll.detach())
            loss = (1 - alpha) * loss + alpha * nll
        return loss, metrics

    # ---- evaluation and scoring ------------------------------------------------------------------
    @torch.no_grad()
    def _score_sequences(self, seqs: list[list[int]]) -> list[float]:
        from ..data.batching import length_grouped_batches

        bs = self.cfg.train.eval_batch_size or self.cfg.train.batch_size * 2
        out = [0.0] * len(seqs)
        self.model.eval()
        for idx in length_grouped_batches([len(s) for s in seqs], bs, seed=0, epoch=0, shuffle=False):
            batch = move(self.collate_sequences([{"input_ids": seqs[i]} for i in idx]), self.placement.device)
            with self.placement.autocast():
                r = self.rewards(batch)
            for i, v in zip(idx, r.tolist()):
                out[i] = v
        return out

    def evaluate(self, items: Sequence[dict] | None = None) -> dict:
        """Held-out pairwise accuracy (reward of chosen > rejected), mean margin and BT loss, with
        percentile-bootstrap 95% intervals ``accuracy_ci95`` / ``margin_ci95`` (1000 resamples, seed 0)
        and each pair's margin in file order (``pairs``: what ``lmforge eval --paired-with`` compares)."""
        from ..eval.bootstrap import preference_intervals
        from ..eval.metrics import preference_report
        from ..eval.preference_pairs import pairs_in_file_order

        items = self.eval_items if items is None else items
        if not items:
            raise LmforgeError("no evaluation pairs")
        scores = self._score_sequences([it["prompt_ids"] + it["chosen_ids"] for it in items]
                                       + [it["prompt_ids"] + it["rejected_ids"] for it in items])
        n = len(items)
        chosen, rejected = torch.tensor(scores[:n]), torch.tensor(scores[n:])
        rep = preference_report(chosen.tolist(), rejected.tolist())
        loss = float(bradley_terry_loss(chosen, rejected).mean())
        return {"accuracy": rep["accuracy"], "mean_margin": rep["mean_margin"], "loss": loss,
                "rewards/chosen": float(chosen.mean()), "rewards/rejected": float(rejected.mean()), "n": n,
                **preference_intervals(chosen.tolist(), rejected.tolist()),
                "pairs": pairs_in_file_order([it.get("index", i) for i, it in enumerate(items)],
                                             [it.get("key", "") for it in items], (chosen - rejected).tolist())}

    def score_file(self, path: str, out: str | None = None) -> list[dict]:
        """Score prompt/response rows (response column: ``response``, ``completion`` or ``chosen``)."""
        table = apply_where(read_table(path), self.cfg.data.where)
        if not table.records:
            raise LmforgeError(f"{path}: no rows to score")
        pcol = field_column(self.cfg.data, "prompt")
        rcol = field_column(self.cfg.data, "response")
        if rcol not in table.records[0]:
            rcol = next((c for c in RESPONSE_COLUMNS if c in table.records[0]), rcol)
        require_columns(table, [rcol] + ([] if self.opts.prompt_template else [pcol]))
        seqs, rows = [], []
        from ..data.chat import completion_text

        for i, rec in enumerate(table.records):
            where = table.where(i)
            try:
                prompt = self.prompt_value(rec, pcol, where)
                response = completion_text(rec[rcol], rcol)
                p_ids, c_ids, _ = self.fmt.encode_completion(prompt, response)
            except LmforgeError as err:
                raise LmforgeError(f"{where}: {err}") from None
            p_ids = p_ids[-self.max_prompt:]
            seqs.append((p_ids + c_ids)[: self.cfg.data.max_length])
            rows.append({"prompt": rec.get(pcol, prompt), "response": rec[rcol]})
        for row, s in zip(rows, self._score_sequences(seqs)):
            row["score"] = s
        if out:
            from ..rundir import write_jsonl

            write_jsonl(out, rows)
        return rows

