"""Preference tuning of causal LMs: DPO (sigmoid), conservative DPO, IPO, hinge, RPO (DPO + chosen NLL), ORPO.

Data: ``prompt``, ``chosen``, ``rejected`` as texts or chat messages. Each step runs one
forward over the chosen and rejected sequences concatenated along the batch (2B rows) and
scores each completion with :func:`lmforge.losses.lm.sequence_logps`.

The reference model of the DPO family is, when training adapters, the same weights with the
adapters switched off (:func:`lmforge.adapters.disable_lora`, no second copy); for full
fine-tuning a frozen copy. With ``precompute_ref`` the reference log-probs are computed once
before training and cached on disk (:mod:`lmforge.tasks.refcache`), so later runs on the same
model, tokenizer and data reuse them. ORPO needs no reference.

Truncation: the prompt keeps its last ``max_prompt_length`` tokens (default: half of
``data.max_length``), each completion is cut on the right to fit ``data.max_length``; both are
counted and reported.
"""
from __future__ import annotations

import copy
import logging
from typing import Literal, Sequence

import torch
from pydantic import Field

from ..config import RunConfig
from ..data.batching import length_grouped_batches
from ..data.chat import IGNORE, DropReport, completion_text, next_token_targets
from ..data.readers import Table, read_table
from ..data.schema import apply_where, field_column, load_splits, require_columns
from ..device import move
from ..errors import LmforgeError
from ..eval.preference_pairs import pair_key, pairs_in_file_order
from ..losses.lm import sequence_logps, token_logps
from ..losses.preference import dpo_loss, orpo_loss, orpo_nll, rpo_loss
from ..models import resolve_model
from . import refcache
from .causal import CausalSection, CausalTask, load_base, output_projection
from .base import register_task

log = logging.getLogger(__name__)


class PreferenceConfig(CausalSection):
    """Preference-tuning options."""

    loss: Literal["sigmoid", "ipo", "hinge", "orpo"] = Field(
        "sigmoid", description="sigmoid: DPO (cDPO with label_smoothing > 0); ipo; hinge (SLiC); orpo")
    beta: float = Field(0.1, gt=0, description="DPO/IPO/hinge inverse temperature; ORPO's lambda")
    orpo_nll: Literal["response", "prompt_and_response"] = Field(
        "response", description="ORPO's SFT term: token-mean NLL (pooled over the batch, as TRL) of the chosen "
                                "response (the paper), or of prompt and response (what TRL's ORPOTrainer scores)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="cDPO: probability a label is flipped")
    rpo_alpha: float | None = Field(None, ge=0, description="RPO: add alpha x the token-mean NLL of the chosen "
                                                            "replies (pooled over the batch, as TRL) to the DPO-family "
                                                            "loss; the reference stays the base model (null/0: off)")
    max_prompt_length: int | None = Field(None, gt=0, description="prompt tokens kept (from the end)")
    precompute_ref: bool = Field(False, description="compute reference log-probs once and cache them on disk")
    packing: bool = Field(True, description="pack a batch's chosen and rejected sequences into shared rows "
                                            "(per-sequence position ids, no attention across them): no padding")
    report_samples: int = Field(3, ge=0, description="greedy replies (64 tokens at most) to the first N eval prompts "
                                                     "before and after training, shown in the run report (0: none)")


class PreferenceRun(RunConfig):
    task: Literal["preference"] = "preference"
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)


def encode_pairs(task: CausalTask, table: Table, split: str, max_length: int, max_prompt: int) -> tuple[list[dict], DropReport]:
    """Tokenise ``prompt``/``chosen``/``rejected`` rows into ``{prompt_ids, chosen_ids, rejected_ids}``.

    Rows with an empty or identical chosen/rejected are dropped and counted; prompts longer
    than ``max_prompt`` keep their last tokens; completions are cut to fit ``max_length``.
    """
    dc = task.cfg.data
    cols = {f: field_column(dc, f) for f in ("prompt", "chosen", "rejected")}
    needed = [cols["chosen"], cols["rejected"]] + ([] if task.opts.prompt_template else [cols["prompt"]])
    require_columns(table, needed)
    rep = DropReport(split, total=len(table))
    out = []
    cut_prompts = cut_completions = 0
    for i, rec in enumerate(table.records):
        where = table.where(i)
        try:
            prompt = task.prompt_value(rec, cols["prompt"], where)
            chosen = completion_text(rec[cols["chosen"]], cols["chosen"])
            rejected = completion_text(rec[cols["rejected"]], cols["rejected"])
            if not chosen.strip() or not rejected.strip():
                rep.drop("empty chosen or rejected", where)
                continue
            if chosen.strip() == rejected.strip():
                rep.drop("chosen identical to rejected", where)
                continue
            p_ids, c_ids, c_lab = task.fmt.encode_completion(prompt, chosen)
            _, r_ids, r_lab = task.fmt.encode_completion(prompt, rejected)
        except LmforgeError as err:
            msg = str(err)
            raise LmforgeError(msg if msg.startswith(table.source) else f"{where}: {msg}") from None
        if len(p_ids) > max_prompt:
            p_ids = p_ids[-max_prompt:]
            cut_prompts += 1
        room = max_length - len(p_ids)
        if len(c_ids) > room or len(r_ids) > room:
            cut_completions += 1
        c_ids, c_lab, r_ids, r_lab = c_ids[:room], c_lab[:room], r_ids[:room], r_lab[:room]
        if c_ids == r_ids:
            rep.drop(f"chosen and rejected identical after truncation to max_length={max_length}", where)
            continue
        if all(t == IGNORE for t in c_lab) or all(t == IGNORE for t in r_lab):
            rep.drop(f"no completion token left after truncation to max_length={max_length}", where)
            continue
        out.append({"prompt_ids": p_ids, "chosen_ids": c_ids, "chosen_labels": c_lab,
                    "rejected_ids": r_ids, "rejected_labels": r_lab, "index": i, "key": pair_key(rec)})
        if split == "eval" and len(out) <= getattr(task.opts, "report_samples", 0):  # the report's samples
            out[-1] |= {"prompt": task.fmt.generation_prompt(prompt), "reference": chosen}
    rep.truncated = cut_completions
    task.report(rep)
    if cut_prompts:
        log.warning("%s: %d of %d prompts longer than %d tokens kept their last %d tokens",
                    split, cut_prompts, rep.total, max_prompt, max_prompt)
    if not out:
        raise LmforgeError(f"{table.source}: no {split} pairs left after dropping ({'; '.join(rep.lines())})")
    return out, rep


def pair_sequences(item: dict) -> list[dict]:
    """The item's chosen and rejected sequences as ``{input_ids, targets}``."""
    p = item["prompt_ids"]
    return [{"input_ids": p + item[f"{s}_ids"], "targets": next_token_targets([IGNORE] * len(p) + item[f"{s}_labels"])}
            for s in ("chosen", "rejected")]


def chosen_all_token_targets(batch: dict, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token targets over whole chosen sequences (prompt and response) of a collated batch.

    ``targets[r, t] = input_ids[r, t + 1]`` when positions ``t`` and ``t + 1`` belong to the same
    chosen sequence (index ``< n``), else ``IGNORE``. Returns ``(targets, seq)``, both ``(R, T)``:
    ``seq`` is each position's chosen-sequence index (-1 elsewhere).
    """
    ids = batch["input_ids"]  # (R, T)
    if "sample_ids" in batch:  # packed rows
        sid = batch["sample_ids"]  # (R, T)
    else:  # one sequence per row, right-padded: rows 0..n-1 are the chosen ones
        real = batch["attention_mask"].bool()  # (R, T)
        rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids)
        sid = torch.where(real, rows, torch.full_like(rows, -1))
    seq = torch.where((sid >= 0) & (sid < n), sid, torch.full_like(sid, -1))  # (R, T)
    targets = torch.full_like(ids, IGNORE)
    same = (seq[:, :-1] >= 0) & (seq[:, :-1] == seq[:, 1:])  # (R, T-1)
    targets[:, :-1] = torch.where(same, ids[:, 1:], torch.full_like(ids[:, 1:], IGNORE))
    return targets, seq.clamp(min=0)


@register_task("preference", config=PreferenceRun)
class PreferenceTask(CausalTask):
    name = "preference"
    section = "preference"

    def __init__(self, cfg: PreferenceRun, **kw):
        self._ref = None
        self._from_run = kw.get("model_dir") is not None or kw.get("adapter_dir") is not None
        super().__init__(cfg, **kw)
        o = self.opts
        if o.label_smoothing > 0 and o.loss != "sigmoid":
            raise LmforgeError(f"preference.label_smoothing (cDPO) applies to loss sigmoid, not {o.loss}")
        if o.rpo_alpha and o.loss == "orpo":
            raise LmforgeError("preference.rpo_alpha: ORPO already has its NLL term; use it with sigmoid, ipo or hinge")
        if self.uses_reference and not self.adapters and not self._from_run and not o.precompute_ref:
            self._ref = self._freeze(copy.deepcopy(self.model))  # the frozen reference for full fine-tuning
        if self.uses_reference and o.precompute_ref and self.train_items:
            if not self.adapters:
                self._ref = self.model  # untrained yet: the model is its own reference for this pass
            self.attach_reference(self.train_items)
            if self.eval_items:
                self.attach_reference(self.eval_items)
            if not self.adapters:
                self._ref = None

    @property
    def uses_reference(self) -> bool:
        return self.opts.loss != "orpo"

    # ---- data -------------------------------------------------------------------------------
    @property
    def max_prompt(self) -> int:
        ml = self.cfg.data.max_length
        return min(self.opts.max_prompt_length or ml // 2, ml - 1)

    def load_data(self) -> None:
        train, ev = load_splits(self.cfg.data, self.cfg.seed)
        ml = self.cfg.data.max_length
        self.train_items, _ = encode_pairs(self, train, "train", ml, self.max_prompt)
        self.eval_items = encode_pairs(self, ev, "eval", ml, self.max_prompt)[0] if ev is not None else []

    def read_eval_file(self, path: str) -> list[dict]:
        table = apply_where(read_table(path), self.cfg.data.where)
        items = encode_pairs(self, table, "eval", self.cfg.data.max_length, self.max_prompt)[0]
        if self.uses_reference and self.opts.precompute_ref:
            self.attach_reference(items)
        return items

    def item_length(self, item: dict) -> int:
        return len(item["prompt_ids"]) + max(len(item["chosen_ids"]), len(item["rejected_ids"]))

    def collate(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        """The 2B sequences (chosen ones first, then rejected), packed or padded, plus ``n_pairs``."""
        pairs = [pair_sequences(it) for it in items]
        batch = self.collate_sequences([p[0] for p in pairs] + [p[1] for p in pairs])
        batch["n_pairs"] = torch.tensor(len(items))
        if all("ref_chosen" in it for it in items):
            batch["ref_chosen"] = torch.tensor([it["ref_chosen"] for it in items], dtype=torch.float32)  # (B,)
            batch["ref_rejected"] = torch.tensor([it["ref_rejected"] for it in items], dtype=torch.float32)
        return batch

    def batch_units(self, batch: dict) -> int:
        """Pairs: the loss is a mean over them."""
        return int(batch["n_pairs"])

    # ---- reference ---------------------------------------------------------------------------
    def _freeze(self, model):
        model.requires_grad_(False)
        return model.to(self.placement.device).eval()

    def _reference_model(self):
        """The frozen full-fine-tuning reference (loaded from ``model.name`` for a finished run)."""
        if self._ref is None:
            base = resolve_model(self.cfg.model.name, self.cfg.model.revision)
            self._ref = self._freeze(load_base(base, self.tokenizer, trust_remote_code=self.cfg.model.trust_remote_code))
        return self._ref

    @torch.no_grad()
    def reference_logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(2B,) reference log-probs and (2B,) token counts for a collated batch."""
        if self.adapters:
            from ..adapters.lora import disable_lora

            with disable_lora(self.core):
                return self.sequence_logps(batch, self.core)
        return self.sequence_logps(batch, self._reference_model())

    def attach_reference(self, items: list[dict]) -> None:
        """Store ``ref_chosen``/``ref_rejected`` in each item, from the disk cache or one pass."""
        base = resolve_model(self.cfg.model.name, self.cfg.model.revision)  # the reference's folder
        key = refcache.reference_key(
            refcache.model_fingerprint(base),
            refcache.tokenizer_fingerprint(self.tokenizer, base),
            refcache.data_fingerprint(items, ("prompt_ids", "chosen_ids", "chosen_labels", "rejected_ids",
                                              "rejected_labels")),
            quant=self.opts.mode == "qlora" and self.opts.quant_block_size, dtype=str(self.placement.dtype),
            frozen_in_dtype=self.adapters and self.placement.autocast_enabled)
        cached = refcache.load_reference(key, len(items))
        if cached is None:
            log.info("computing reference log-probs of %d pairs (cached for later runs)", len(items))
            chosen, rejected = torch.zeros(len(items)), torch.zeros(len(items))
            was_training = self.model.training
            self.model.to(self.placement.device).eval()
            for idx in self._eval_batches(items):
                batch = move(self.collate([items[i] for i in idx]), self.placement.device)
                with self.placement.autocast():
                    logps, _ = self.reference_logps(batch)  # (2B,)
                n = len(idx)
                chosen[idx], rejected[idx] = logps[:n].float().cpu(), logps[n:].float().cpu()
            self.model.train(was_training)
            refcache.save_reference(key, chosen, rejected)
            log.info("reference log-probs cached (%s)", key)
        else:
            chosen, rejected = cached
            log.info("reference log-probs of %d pairs loaded from the cache (%s)", len(items), key)
        for it, c, r in zip(items, chosen.tolist(), rejected.tolist()):
            it["ref_chosen"], it["ref_rejected"] = c, r

    # ---- loss --------------------------------------------------------------------------------
    def sequence_logps(self, batch: dict, model=None, hidden=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed completion log-probs (2B,) and completion token counts (2B,) in one forward
        (``hidden``: the batch's final hidden states when already computed)."""
        model = self.model if model is None else model
        hidden = self.hidden(batch, model) if hidden is None else hidden  # (R, T, H)
        weight, bias = output_projection(model)
        targets = batch["targets"]  # (R, T)
        if "sample_ids" not in batch:  # one sequence per row
            return sequence_logps(hidden, weight, targets, bias=bias, chunk_size=self.opts.chunk_size,
                                  return_counts=True)
        per_token = token_logps(hidden, weight, targets, bias=bias, chunk_size=self.opts.chunk_size)  # (R, T)
        scored = targets != IGNORE  # (R, T)
        seq = batch["sample_ids"][scored]  # (M,) sequence of each scored token
        n = 2 * int(batch["n_pairs"])
        logps = per_token.new_zeros(n).index_add(0, seq, per_token[scored])  # (2B,)
        counts = torch.zeros(n, dtype=torch.long, device=seq.device).index_add(0, seq, torch.ones_like(seq))
        return logps, counts

    def chosen_sequence_logps(self, batch: dict, hidden: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed log-probs (B,) and counts (B,) of every token of each chosen sequence after its
        first (prompt and response: what TRL's ORPOTrainer puts in its NLL)."""
        targets, seq = chosen_all_token_targets(batch, n)  # (R, T), (R, T)
        weight, bias = output_projection(self.model)
        per_token = token_logps(hidden, weight, targets, bias=bias, chunk_size=self.opts.chunk_size)  # (R, T)
        scored = targets != IGNORE
        sums = per_token.new_zeros(n).index_add(0, seq[scored], per_token[scored])  # (B,)
        counts = torch.zeros(n, dtype=torch.long, device=seq.device).index_add(
            0, seq[scored], torch.ones_like(seq[scored]))
        return sums, counts

    def pair_losses(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-pair losses (B,) and per-pair statistics (rewards, log-probs)."""
        o = self.opts
        whole = o.loss == "orpo" and o.orpo_nll == "prompt_and_response"
        hidden = self.hidden(batch) if whole else None  # (R, T, H), shared by both scorings
        logps, counts = self.sequence_logps(batch, hidden=hidden)  # (2B,), (2B,)
        n = logps.shape[0] // 2
        pc, pr, nc, nr = logps[:n], logps[n:], counts[:n], counts[n:]
        stats = {"logps/chosen": pc.detach(), "logps/rejected": pr.detach(), "_n_chosen": nc, "_n_rejected": nr}
        if o.loss == "orpo":
            mc, mr = pc / nc.clamp(min=1), pr / nr.clamp(min=1)  # length-averaged log-probs (B,)
            or_losses, rc, rr, log_odds = orpo_loss(mc, mr, beta=o.beta)
            sft_sum, sft_n = self.chosen_sequence_logps(batch, hidden, n) if whole else (pc, nc)
            nll = orpo_nll(sft_sum, sft_n)  # (B,) the SFT term, a token mean over the chosen tokens
            losses = nll + or_losses
            stats |= {"nll": nll.detach(), "log_odds_ratio": log_odds}
        else:
            if "ref_chosen" in batch:
                ref_c, ref_r = batch["ref_chosen"], batch["ref_rejected"]
            else:
                ref, _ = self.reference_logps(batch)
                ref_c, ref_r = ref[:n], ref[n:]
            lengths = {"chosen_lengths": nc, "rejected_lengths": nr} if o.loss == "ipo" else {}
            losses, rc, rr = dpo_loss(pc, pr, ref_c, ref_r, beta=o.beta, loss_type=o.loss,
                                      label_smoothing=o.label_smoothing, **lengths)
            if o.rpo_alpha:
                losses, nll = rpo_loss(losses, pc, nc, alpha=o.rpo_alpha)  # (B,) DPO + alpha * chosen NLL
                stats["nll"] = nll
        stats |= {"rewards/chosen": rc, "rewards/rejected": rr}
        return losses, stats

    def loss(self, batch):
        losses, s = self.pair_losses(batch)
        metrics = {k: float(v.float().mean()) for k, v in s.items() if not k.startswith("_")}
        margin = (s["rewards/chosen"] - s["rewards/rejected"]).float()
        metrics["rewards/margins"] = float(margin.mean())
        metrics["rewards/accuracy"] = float((margin > 0).float().mean())
        return losses.mean(), metrics

    # ---- evaluation ----------------------------------------------------------------------------
    def sample_outputs(self) -> list[dict]:
        """``{"input", "output", "reference"}`` (reference: the chosen reply) greedy replies to the
        first ``report_samples`` eval prompts (called before and after training: the report shows both)."""
        from .samples import greedy_generations, prompt_text

        gen = [it for it in self.eval_items if "prompt" in it][: self.opts.report_samples]
        if not gen:
            return []
        preds = greedy_generations(self, [it["prompt"] for it in gen], max_new_tokens=64, batch_size=len(gen),
                                   desc="samples")
        return [{"input": prompt_text(it["prompt"]), "output": p, "reference": it["reference"]}
                for p, it in zip(preds, gen)]

    def _eval_batches(self, items: Sequence[dict]) -> list[list[int]]:
        bs = self.cfg.train.eval_batch_size or self.cfg.train.batch_size
        return length_grouped_batches([self.item_length(it) for it in items], bs, seed=0, epoch=0, shuffle=False)

    @torch.no_grad()
    def evaluate(self, items: Sequence[dict] | None = None) -> dict:
        """Held-out preference accuracy (implicit reward of chosen > rejected), mean margin, loss.

        ``logp_accuracy`` is how often the policy gives the chosen reply the higher per-token
        log-prob; unlike the implicit-reward accuracy (0 before training: every reward is 0) it
        is meaningful for the untrained model too. ``accuracy_ci95`` / ``margin_ci95``: percentile-bootstrap
        95% intervals over the pairs (1000 resamples, seed 0; :func:`lmforge.eval.bootstrap.preference_intervals`).
        ``pairs``: each pair's margin in file order with its row key
        (:func:`lmforge.eval.preference_pairs.pairs_in_file_order`), for paired comparisons of two runs.
        """
        from ..eval.bootstrap import preference_intervals
        from ..eval.metrics import preference_report

        items = self.eval_items if items is None else items
        if not items:
            raise LmforgeError("no evaluation pairs")
        self.model.eval()
        chosen, rejected, loss_sum, logp_wins, order = [], [], 0.0, 0, []
        sums = {"logps/chosen": 0.0, "logps/rejected": 0.0}
        for idx in self._eval_batches(items):
            batch = move(self.collate([items[i] for i in idx]), self.placement.device)
            with self.placement.autocast():
                losses, s = self.pair_losses(batch)
            order += idx
            loss_sum += float(losses.float().sum())
            chosen += s["rewards/chosen"].float().tolist()
            rejected += s["rewards/rejected"].float().tolist()
            for k in sums:
                sums[k] += float(s[k].float().sum())
            mean_c = s["logps/chosen"] / s["_n_chosen"].clamp(min=1)  # (B,) per-token log-probs
            mean_r = s["logps/rejected"] / s["_n_rejected"].clamp(min=1)
            logp_wins += int((mean_c > mean_r).sum())
        report = preference_report(chosen, rejected)
        return {"accuracy": report["accuracy"], "mean_margin": report["mean_margin"], "loss": loss_sum / len(items),
                "rewards/chosen": sum(chosen) / len(chosen), "rewards/rejected": sum(rejected) / len(rejected),
                "logps/chosen": sums["logps/chosen"] / len(items), "logps/rejected": sums["logps/rejected"] / len(items),
                "logp_accuracy": logp_wins / len(items), "n": report["n"]} | preference_intervals(chosen, rejected) | {
                "pairs": pairs_in_file_order([items[i].get("index", i) for i in order],
                                             [items[i].get("key", "") for i in order],
                                             [c - r for c, r in zip(chosen, rejected)])}

