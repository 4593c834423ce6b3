"""Supervised fine-tuning of causal LMs on chats, prompt/completion pairs or plain text, and of
encoder-decoder (seq2seq: T5, FLAN-T5, BART) models on prompt/completion pairs.

The loss is the mean next-token cross-entropy over target tokens (assistant/completion tokens
by default, every token with ``train_on: all``), computed chunk by chunk from the decoder's
hidden states and the LM head weight (never the full ``(B, T, V)`` logits). The engine weighs
micro-batches by their number of target tokens, so accumulation equals one big batch.

Seq2seq models (detected from ``is_encoder_decoder`` in the model's config) read the prompt with
the encoder and are trained on the completion with teacher forcing:
``L = -(1/N) sum_t log p(y_t | y_<t, x)`` over the completion tokens ``y`` (EOS included), the
decoder fed ``[start, y_0 .. y_{T-2}]``. Adapters are saved in PEFT's ``SEQ_2_SEQ_LM`` format.
"""
from __future__ import annotations

import logging
import time
from typing import Literal, Sequence

import torch
from pydantic import Field

from ..config import RunConfig
from ..data.batching import length_grouped_batches
from ..data.chat import (IGNORE, DropReport, collate_causal, completion_text, make_item, pack_items,
                         truncate_prompt_left, truncate_right)
from ..data.readers import Table, read_table
from ..data.schema import apply_where, field_column, load_splits
from ..device import move
from ..errors import LmforgeError
from ..losses.lm import chunked_cross_entropy
from ..models import is_seq2seq_folder, resolve_model
from .causal import CausalSection, CausalTask, output_projection, store_frozen
from .base import register_task
from .samples import generation_report

log = logging.getLogger(__name__)


class SftConfig(CausalSection):
    """Supervised fine-tuning options."""

    format: Literal["auto", "messages", "prompt_completion", "text"] = Field(
        "auto", description="record format; auto: prompt(+template) > messages > text, by the columns present")
    train_on: Literal["completion", "all"] = Field(
        "completion", description="loss on assistant/completion tokens only, or on every token (seq2seq "
                                  "models: always the completion)")
    packing: bool = Field(False, description="pack several samples per row (per-sample position ids)")
    truncation: Literal["right", "prompt_left"] = Field(
        "right", description="samples over data.max_length: right keeps the first tokens; prompt_left drops the "
                             "prompt's first tokens and keeps the reply (long multi-turn prompts keep their reply)")
    rouge_samples: int = Field(0, ge=0, description="eval: ROUGE of greedy generations on the first N eval samples")
    max_new_tokens: int = Field(64, gt=0, description="eval generation length")
    generation_batch_size: int = Field(16, gt=0)
    eval_base: bool = Field(False, description="also report the base model's eval metrics (adapters off), once")
    report_samples: int = Field(3, ge=0, description="greedy generations for the first N eval prompts before and "
                                                     "after training, shown in the run report (0: none)")
    max_target_length: int | None = Field(
        None, gt=0, description="seq2seq models: completion tokens at most (default: data.max_length)")


class SftRun(RunConfig):
    task: Literal["sft"] = "sft"
    sft: SftConfig = Field(default_factory=SftConfig)


@register_task("sft", config=SftRun)
class SftTask(CausalTask):
    name = "sft"
    section = "sft"

    def __init__(self, cfg: SftRun, **kw):
        if cfg.sft.eval_base and cfg.sft.mode == "full":
            raise LmforgeError("sft.eval_base needs mode lora or qlora (the base is the model with adapters off)")
        self._base_metrics: dict | None = None
        model_dir = kw.get("model_dir")
        self.seq2seq = is_seq2seq_folder(model_dir or resolve_model(cfg.model.name, cfg.model.revision))
        if self.seq2seq:
            self.peft_task_type = "SEQ_2_SEQ_LM"
            if cfg.sft.packing:
                raise LmforgeError("sft.packing: not available for seq2seq models (the encoder reads one prompt "
                                   "per row); set sft.packing: false")
            if cfg.sft.mode == "qlora":
                raise LmforgeError("sft.mode: qlora is not available for seq2seq models (T5 blocks read their "
                                   "projections' weight dtype, which a 4-bit layer does not have); use mode lora")
        super().__init__(cfg, **kw)

    # ---- data ---------------------------------------------------------------------------------
    def _format(self, table: Table) -> str:
        fmt = self.opts.format
        if fmt != "auto":
            return fmt
        cols = set(table.records[0]) if table.records else set()
        dc = self.cfg.data
        if self.opts.prompt_template or field_column(dc, "prompt") in cols:
            return "prompt_completion"
        if field_column(dc, "messages") in cols:
            return "messages"
        if field_column(dc, "text") in cols:
            return "text"
        raise LmforgeError(f"{table.source}: cannot tell the format: expected a 'prompt'+'completion', "
                           f"'messages' or 'text' column (columns: {', '.join(sorted(cols)[:8])})")

    def _encode(self, table: Table, split: str, keep_prompt: bool = False) -> list[dict]:
        """Tokenise, mask, truncate; count and drop samples with no target left."""
        if not table.records:
            raise LmforgeError(f"{table.source}: no examples (empty split)")
        if self.seq2seq:
            return self._encode_seq2seq(table, split, keep_prompt)
        dc = self.cfg.data
        fmt = self._format(table)
        col = {f: field_column(dc, f) for f in ("prompt", "completion", "messages", "text", "reference")}
        rep = DropReport(split, total=len(table))
        items = []
        for i, rec in enumerate(table.records):
            where = table.where(i)
            prompt = reference = None
            try:
                if fmt == "prompt_completion":
                    prompt = self.prompt_value(rec, col["prompt"], where)
                    if col["completion"] not in rec:
                        raise LmforgeError(f"missing column '{col['completion']}'")
                    completion = completion_text(rec[col["completion"]], col["completion"])
                    if not completion.strip():
                        rep.drop("empty completion", where)
                        continue
                    p_ids, c_ids, c_labels = self.fmt.encode_completion(prompt, completion)
                    ids = p_ids + c_ids
                    labels = list(ids) if self.opts.train_on == "all" else [IGNORE] * len(p_ids) + c_labels
                    reference = completion
                elif fmt == "messages":
                    msgs = rec.get(col["messages"])
                    ids, labels = self.fmt.encode_messages(msgs, self.opts.train_on)
                    if msgs[-1]["role"] == "assistant":
                        prompt, reference = msgs[:-1], msgs[-1]["content"]
                else:
                    text = rec.get(col["text"])
                    if not isinstance(text, str):
                        raise LmforgeError(f"'{col['text']}' must be text")
                    if not text.strip():
                        rep.drop("empty text", where)
                        continue
                    ids, labels = self.fmt.encode_text(text)
            except LmforgeError as err:
                msg = str(err)
                raise LmforgeError(msg if msg.startswith(table.source) else f"{where}: {msg}") from None
            cut_fn = truncate_prompt_left if self.opts.truncation == "prompt_left" else truncate_right
            ids, labels, cut = cut_fn(ids, labels, dc.max_length)
            rep.truncated += cut
            item = make_item(ids, labels)
            if item is None:
                rep.drop(f"no trainable token after truncation to max_length={dc.max_length}", where)
                continue
            if keep_prompt and prompt is not None:
                ref = rec.get(col["reference"], reference) if col["reference"] != col["completion"] else reference
                item["prompt"] = self.fmt.generation_prompt(prompt)
                item["reference"] = ref
            items.append(item)
        self.report(rep)
        if not items:
            raise LmforgeError(f"{table.source}: no {split} samples left after dropping ({'; '.join(rep.lines())})")
        return items

    def _encode_seq2seq(self, table: Table, split: str, keep_prompt: bool) -> list[dict]:
        """Seq2seq items ``{input_ids, labels}``: the prompt (with the tokenizer's special tokens,
        e.g. T5's closing EOS) for the encoder, the completion (``text_target``, EOS last) as labels;
        each side truncated to its length (``data.max_length``, ``sft.max_target_length``)."""
        fmt = self._format(table)
        if fmt != "prompt_completion":
            raise LmforgeError(f"{table.source}: seq2seq sft trains on prompt + completion records (or "
                               f"sft.prompt_template + a completion column), not {fmt}")
        dc, tok = self.cfg.data, self.tokenizer
        src_len, tgt_len = dc.max_length, self.opts.max_target_length or dc.max_length
        col_p, col_c, col_r = (field_column(dc, f) for f in ("prompt", "completion", "reference"))
        rep = DropReport(split, total=len(table))
        items = []
        for i, rec in enumerate(table.records):
            where = table.where(i)
            prompt = self.prompt_value(rec, col_p, where)
            if not isinstance(prompt, str) or not prompt.strip():
                raise LmforgeError(f"{where}: the prompt must be non-empty text (seq2seq models take text prompts)")
            if col_c not in rec:
                raise LmforgeError(f"{where}: missing column '{col_c}'")
            completion = completion_text(rec[col_c], col_c)
            if not completion.strip():
                rep.drop("empty completion", where)
                continue
            src = list(tok(prompt)["input_ids"])
            tgt = list(tok(text_target=completion)["input_ids"])
            if not tgt or tgt[-1] != self.fmt.eos_id:
                tgt.append(self.fmt.eos_id)
            cut = len(src) > src_len
            if cut or len(tgt) > tgt_len:
                rep.truncated += 1
                src = src[:src_len - 1] + src[-1:] if cut else src  # keep the closing special
                tgt = tgt[:tgt_len - 1] + [self.fmt.eos_id] if len(tgt) > tgt_len else tgt
            item = {"input_ids": src, "labels": tgt}
            if keep_prompt:  # generation reads what the encoder was trained on (the cut prompt when cut)
                item["prompt"] = tok.decode(src, skip_special_tokens=True) if cut else prompt
                item["reference"] = rec.get(col_r, completion) if col_r != col_c else completion
            items.append(item)
        self.report(rep)
        if not items:
            raise LmforgeError(f"{table.source}: no {split} samples left after dropping ({'; '.join(rep.lines())})")
        return items

    def load_data(self) -> None:
        train, ev = load_splits(self.cfg.data, self.cfg.seed)
        items = self._encode(train, "train")
        if self.opts.packing:
            rows = pack_items(items, self.cfg.data.max_length)
            log.info("packed %d samples into %d rows of <= %d tokens", len(items), len(rows), self.cfg.data.max_length)
            items = rows
        self.train_items = items
        self.eval_items = self._encode(ev, "eval", keep_prompt=True) if ev is not None else []

    def read_eval_file(self, path: str) -> list[dict]:
        return self._encode(apply_where(read_table(path), self.cfg.data.where), "eval", keep_prompt=True)

    # ---- engine protocol ------------------------------------------------------------------------
    def collate(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        if self.seq2seq:
            from ..causal_lm import collate_seq2seq, decoder_start_id

            return collate_seq2seq(items, self.tokenizer.pad_token_id, decoder_start_id(self.model))
        return collate_causal(items, self.tokenizer.pad_token_id)

    def item_length(self, item: dict) -> int:
        return len(item["input_ids"]) + len(item.get("labels", ()))

    def batch_units(self, batch: dict) -> int:
        """Target tokens: the loss is a mean over them."""
        return int((batch["targets"] != IGNORE).sum())

    def batch_tokens(self, batch: dict) -> int:
        if self.seq2seq:  # source + target tokens
            return int(batch["attention_mask"].sum()) + self.batch_units(batch)
        return super().batch_tokens(batch)

    def hidden(self, batch: dict, model=None) -> torch.Tensor:
        """(B, T, H) final decoder hidden states; seq2seq: scaled as the LM head expects them."""
        if not self.seq2seq:
            return super().hidden(batch, model)
        from ..causal_lm import seq2seq_head, seq2seq_hidden

        model = self.model if model is None else model
        h = seq2seq_hidden(model, batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"])
        scale = seq2seq_head(model)[2]
        return h * scale if scale != 1.0 else h  # (B, T, H)

    def head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(weight (V, H), bias or None)`` of the output projection."""
        if self.seq2seq:
            from ..causal_lm import seq2seq_head

            return seq2seq_head(self.model)[:2]
        return output_projection(self.model)

    def build_model(self, adapter_dir=None, full: bool = False):
        """Causal LMs: :meth:`CausalTask.build_model`. Seq2seq: the same steps with the seq2seq
        adapter targets (every linear projection of T5 and BART blocks by default)."""
        if not self.seq2seq:
            return super().build_model(adapter_dir, full)
        from .causal import load_base
        from .common import load_run_adapter

        mc = self.cfg.model
        model = load_base(self.folder, self.tokenizer, trust_remote_code=mc.trust_remote_code,
                          attn_implementation=self.placement.attn_implementation(mc.attn_implementation,
                                                                                self.cfg.data.max_length))
        if full or not self.adapters:
            return model
        if adapter_dir is not None:
            load_run_adapter(model, self.cfg, adapter_dir)
        else:
            from ..adapters.registry import apply_adapter, get_kind
            from ..causal_lm import SEQ2SEQ_TARGETS, seq2seq_adapter_options

            kind = self.cfg.adapter.kind
            opts = seq2seq_adapter_options(kind, self.cfg.adapter.options, model)
            apply_adapter(model, get_kind(kind).make_spec(opts, default_targets=SEQ2SEQ_TARGETS, modules_to_save=[],
                                                          model=model), tokenizer=self.tokenizer)
        if self.placement.autocast_enabled and mc.frozen_in_compute_dtype:
            store_frozen(model, self.placement.dtype)
        return model

    def loss(self, batch):
        hidden = self.hidden(batch)  # (B, T, H)
        weight, bias = self.head()
        loss = chunked_cross_entropy(hidden, weight, batch["targets"], bias=bias, reduction="mean",
                                     chunk_size=self.opts.chunk_size)
        return loss, {}

    # ---- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def _nll(self, items: Sequence[dict]) -> tuple[float, int]:
        """Summed NLL and number of target tokens over items (unpacked, length-sorted batches)."""
        bs = self.cfg.train.eval_batch_size or self.cfg.train.batch_size
        order = length_grouped_batches([self.item_length(it) for it in items], bs, seed=0, epoch=0, shuffle=False)
        total, count = 0.0, 0
        weight, bias = self.head()
        keys = ("input_ids", "labels") if self.seq2seq else ("input_ids", "targets")
        for idx in order:
            batch = move(self.collate([{k: items[i][k] for k in keys} for i in idx]), self.placement.device)
            with self.placement.autocast():
                hidden = self.hidden(batch)  # (B, T, H)
                total += float(chunked_cross_entropy(hidden, weight, batch["targets"], bias=bias,
                                                     chunk_size=self.opts.chunk_size))
            count += self.batch_units(batch)
        return total, count

    def generate(self, prompts: list, desc: str = "generate (eval)", show: bool | None = None) -> list[str]:
        """Greedy completions of prompts (as :meth:`Formatter.generation_prompt` gives them), with
        progress (``show``; default: when there is more than one batch; see
        :func:`lmforge.tasks.samples.greedy_generations`)."""
        from .samples import greedy_generations

        bs = self.opts.generation_batch_size
        return greedy_generations(self, prompts, max_new_tokens=self.opts.max_new_tokens, batch_size=bs, desc=desc,
                                  show=len(prompts) > bs if show is None else show)

    def sample_outputs(self) -> list[dict]:
        """``{"input", "output", "reference"}`` greedy generations for the first ``report_samples``
        eval prompts (called before and after training: the run report shows both)."""
        from .samples import prompt_text

        gen = [it for it in self.eval_items if "prompt" in it][: self.opts.report_samples]
        if not gen:
            return []
        preds = self.generate([it["prompt"] for it in gen], desc="samples", show=True)
        return [{"input": prompt_text(it["prompt"]), "output": p, "reference": it.get("reference")}
                for p, it in zip(preds, gen)]

    def generation_config(self, **decoding):
        """The decoding settings of eval-time generation: greedy, ``sft.max_new_tokens`` tokens,
        ``sft.generation_batch_size`` prompts per batch; ``decoding`` overrides any of them (None:
        keep). ``lmforge eval RUN --task generation`` starts from these, so its figures compare
        with the ROUGE training reports."""
        from ..generation import GenerationConfig

        base = {"max_new_tokens": self.opts.max_new_tokens, "batch_size": self.opts.generation_batch_size}
        try:
            return GenerationConfig(**(base | {k: v for k, v in decoding.items() if v is not None}))
        except TypeError as err:
            raise LmforgeError(f"generation: {err}") from None

    def generation_report(self, items: Sequence[dict], gcfg=None) -> dict:
        """:func:`generation_report` of this run's eval items (default decoding:
        :meth:`generation_config`, what training reports)."""
        return generation_report(self, items, gcfg or self.generation_config())

    def _metrics(self, items: Sequence[dict]) -> dict:
        from ..eval.metrics import perplexity_report
        from ..eval.text import rouge

        t0 = time.perf_counter()
        nll, n = self._nll(items)
        rep = perplexity_report(nll, n)
        out = {"loss": rep["nll"], "perplexity": rep["perplexity"], "tokens": rep["tokens"]}
        gen = [it for it in items if "prompt" in it][: self.opts.rouge_samples]
        if gen:
            preds = self.generate([it["prompt"] for it in gen])
            scores = rouge(preds, [it["reference"] for it in gen])
            out |= {k: scores[k] for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")} | {"rouge_n": scores["n"]}
            self.last_generations = [{"prediction": p, "reference": it["reference"]} for p, it in zip(preds, gen)]
        out["eval_seconds"] = time.perf_counter() - t0
        return out

    def evaluate(self, items: Sequence[dict] | None = None) -> dict:
        """Eval loss and perplexity over target tokens; ROUGE when ``rouge_samples`` > 0;
        ``base_*`` metrics (adapters off) when ``eval_base``."""
        items = self.eval_items if items is None else items
        if not items:
            raise LmforgeError("no evaluation samples")
        self.model.eval()
        out = self._metrics(items)
        if self.opts.eval_base and self.adapters:
            if self._base_metrics is None or items is not self.eval_items:
                from ..adapters.lora import disable_lora

                with disable_lora(self.core):
                    base = {f"base_{k}": v for k, v in self._metrics(items).items() if k != "eval_seconds"}
                if items is not self.eval_items:
                    return out | base
                self._base_metrics = base
            out |= self._base_metrics
        return out
