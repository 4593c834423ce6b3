"""Sequence classification: encoder or decoder backbone, full / frozen / LoRA fine-tuning."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ..data.batching import collate_tokens, length_grouped_batches
from ..data.readers import Table, read_table
from ..data.schema import (apply_where, field_column, label_ids, label_names, load_splits, read_labels, require_columns,
                           text_values)
from ..device import Placement, move
from ..errors import LmforgeError
from ..models import is_decoder_only, load_tokenizer, resolve_model
from .base import Task, register_task
from .classify_config import ClassifyRun
from .common import (ADAPTER_MODES, add_adapter, freeze_except, load_run_adapter, open_run, ready_for_inference,
                     save_weights, write_json, write_jsonl)

log = logging.getLogger("lmforge")
LORA_DEFAULTS = ["query", "key", "value", "q_proj", "k_proj", "v_proj"]
HEADS = ["classifier", "score"]


def _tokenize(tok, texts: list[str], pairs: list[str] | None, max_length: int) -> list[dict]:
    enc = tok(texts, pairs, truncation=True, max_length=max_length) if pairs else tok(
        texts, truncation=True, max_length=max_length)
    items = [{"input_ids": ids} for ids in enc["input_ids"]]
    if pairs and "token_type_ids" in enc:
        for it, tt in zip(items, enc["token_type_ids"]):
            it["token_type_ids"] = tt
    return items


@register_task("classify", config=ClassifyRun)
class ClassifyTask(Task):
    name = "classify"

    def __init__(self, cfg: ClassifyRun, *, with_data: bool = True, labels: list[str] | None = None,
                 adapt: bool = True):
        self.cfg = cfg
        self.placement = Placement.resolve(cfg.model.device, cfg.model.precision)
        self.folder = resolve_model(cfg.model.name, cfg.model.revision)
        self.tokenizer = load_tokenizer(self.folder, cfg.model.trust_remote_code)
        dc = cfg.data
        self.text_col, self.label_col = field_column(dc, "text"), field_column(dc, "label")
        self.pair_col = dc.columns.get("text_pair")
        if with_data:
            train, ev = load_splits(dc, cfg.seed)
            require_columns(train, [self.text_col, self.label_col] + ([self.pair_col] if self.pair_col else []))
            self.labels = label_names(train, self.label_col, dc.labels)
            self.train_items = self._items(train, "train")
            self.eval_items = self._items(ev, "eval") if ev is not None else []
        else:
            self.labels = labels or dc.labels
            if not self.labels:
                raise LmforgeError("classification labels are unknown (no labels.json in the run)")
        self.weight = self._class_weights() if with_data else None
        self.bias: torch.Tensor | None = None  # decision biases of a loaded run (classify_decision)
        if with_data and cfg.classify.decision_bias != "none" and not self.eval_items:
            raise LmforgeError("config: classify.decision_bias is fitted on the validation split: set data.eval "
                               "or data.eval_fraction")
        self.model = self._build_model(adapt)
        from ..adapters.lora import trainable_parameters

        self.trainable = trainable_parameters(self.model) if adapt else None
        if cfg.model.frozen_in_compute_dtype:
            self.placement.cast_frozen(self.model)
        if self.placement.int8 and adapt:  # the frozen base's products in int8 (adapters, heads train in fp32)
            from ..int8_frozen import int8_frozen

            if not int8_frozen(self.model):
                log.warning("precision int8: no frozen linear layer to run in int8 (classify.mode %s): fp32",
                            cfg.classify.mode)

    @classmethod
    def for_config(cls, cfg) -> type["ClassifyTask"]:
        """``classify.method`` picks the class: this one (or a subclass) fine-tunes, the others
        are in :mod:`lmforge.tasks.classify_methods`."""
        method = cfg.classify.method
        return cls if method == "finetune" and not getattr(cls, "method", "") else method_task(method)

    # ---- data -------------------------------------------------------------------------
    def _items(self, table: Table, split: str) -> list[dict]:
        require_columns(table, [self.text_col, self.label_col])
        texts = text_values(table, self.text_col)
        pairs = text_values(table, self.pair_col) if self.pair_col else None
        ids = label_ids(table, self.label_col, self.labels, split=split)
        items = _tokenize(self.tokenizer, texts, pairs, self.cfg.data.max_length)
        for it, y in zip(items, ids):
            it["label"] = y
        return items

    def _class_weights(self) -> torch.Tensor | None:
        """(C,) loss weights per ``classify.class_weights`` (None: unweighted)."""
        from ..losses.classification import class_weights

        cw = self.cfg.classify.class_weights
        if cw == "none":
            return None
        if isinstance(cw, dict):
            unknown = sorted(set(cw) - set(self.labels))
            if unknown:
                raise LmforgeError(f"config: classify.class_weights: unknown label(s) {unknown} "
                                   f"(labels: {', '.join(self.labels[:10])})")
            return torch.tensor([float(cw.get(l, 1.0)) for l in self.labels])
        counts = [0] * len(self.labels)
        for it in self.train_items:
            counts[it["label"]] += 1
        return class_weights(counts, cw)

    def n_outputs(self) -> int:
        """Width of the head: C logits, C-1 cumulative logits (ordinal), or 1 score (regression)."""
        return {"none": len(self.labels), "cumulative": len(self.labels) - 1, "regression": 1}[
            self.cfg.classify.ordinal]

    def outputs_to_probs(self, out: torch.Tensor) -> torch.Tensor:
        """(B, n_outputs) head outputs -> (B, C) class probabilities."""
        from ..losses.classification import cumulative_link_probs, regression_probs

        kind = self.cfg.classify.ordinal
        if kind == "cumulative":
            return cumulative_link_probs(out)
        if kind == "regression":
            return regression_probs(out, len(self.labels))
        return torch.softmax(out.float(), -1)

    def collate(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        keys = ("input_ids", "token_type_ids") if "token_type_ids" in items[0] else ("input_ids",)
        batch = collate_tokens(items, self.tokenizer.pad_token_id, keys)
        if "label" in items[0]:
            batch["labels"] = torch.tensor([it["label"] for it in items], dtype=torch.long)
        return batch

    # ---- model ------------------------------------------------------------------------
    def _build_model(self, adapt: bool = True):
        """The HF sequence classifier, frozen or LoRA-wrapped per the mode (``adapt=False``: plain)."""
        from transformers import AutoConfig, AutoModelForSequenceClassification

        mc = self.cfg.model
        hf_cfg = AutoConfig.from_pretrained(self.folder, trust_remote_code=mc.trust_remote_code)
        if self.cfg.classify.ordinal != "none" and len(self.labels) < 2:
            raise LmforgeError("config: classify.ordinal needs at least 2 ordered labels")
        names = {"none": self.labels, "cumulative": [f">{l}" for l in self.labels[:-1]],
                 "regression": ["rank"]}[self.cfg.classify.ordinal]
        hf_cfg.num_labels = len(names)
        hf_cfg.id2label = {i: l for i, l in enumerate(names)}
        hf_cfg.label2id = {l: i for i, l in enumerate(names)}
        hf_cfg.problem_type = "regression" if self.cfg.classify.ordinal == "regression" else None
        if is_decoder_only(hf_cfg) or getattr(hf_cfg, "pad_token_id", None) is None:
            hf_cfg.pad_token_id = self.tokenizer.pad_token_id
        torch.manual_seed(self.cfg.seed)  # the new head and LoRA weights depend on the run's seed only
        model = AutoModelForSequenceClassification.from_pretrained(
            self.folder, config=hf_cfg, trust_remote_code=mc.trust_remote_code, dtype=torch.float32,
            attn_implementation=self.placement.attn_implementation(mc.attn_implementation, encoder=True))
        if self.placement.unpad(mc.attn_implementation):
            from ..unpad import enable_unpadding

            enable_unpadding(model)  # encoders: no compute on padding tokens (decoders unchanged)
        if not adapt:
            return model
        self.heads = [h for h in HEADS if any(n_.rsplit(".", 1)[-1] == h for n_, _ in model.named_modules())]
        mode = self.cfg.classify.mode
        if mode == "frozen":
            freeze_except(model, self.heads, self.cfg.classify.unfreeze_last)
        elif mode in ADAPTER_MODES:
            add_adapter(model, self.cfg, LORA_DEFAULTS, self.heads, self.tokenizer)
        return model

    def describe_model(self) -> str:
        from ..adapters.lora import format_trainable, trainable_parameters

        return f"{self.cfg.classify.mode}: " + format_trainable(trainable_parameters(self.model))

    # ---- engine protocol ----------------------------------------------------------------
    def loss(self, batch):
        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        out = self.model(**inputs).logits.float()  # (B, n_outputs)
        c = self.cfg.classify
        from ..losses.classification import cumulative_link_loss, regression_loss, weighted_focal_cross_entropy

        if c.ordinal == "cumulative":
            loss = cumulative_link_loss(out, labels, self.weight)
        elif c.ordinal == "regression":
            loss = regression_loss(out, labels, self.weight)
        else:
            loss = weighted_focal_cross_entropy(out, labels, self.weight, c.focal_gamma, c.label_smoothing)
        acc = (self.outputs_to_probs(out.detach()).argmax(-1) == labels).float().mean()
        return loss, {"accuracy": float(acc)}

    @torch.no_grad()
    def predict_items(self, items: Sequence[dict], batch_size: int | None = None) -> torch.Tensor:
        """Class probabilities for tokenised items, in input order.  Returns (N, C) fp32."""
        bs = batch_size or self.cfg.train.eval_batch_size or max(32, self.cfg.train.batch_size * 2)
        order = length_grouped_batches([len(it["input_ids"]) for it in items], bs, seed=0, epoch=0, shuffle=False)
        out = torch.empty(len(items), len(self.labels))
        self.model.eval()
        for idx in order:
            batch = move(self.collate([{k: v for k, v in items[i].items() if k != "label"} for i in idx]),
                         self.placement.device)
            with self.placement.autocast():
                logits = self.model(**batch).logits.float()
            out[idx] = self.outputs_to_probs(logits).cpu()
        from .classify_decision import apply_bias

        return apply_bias(out, getattr(self, "bias", None))

    def evaluate(self, items: Sequence[dict] | None = None) -> dict:
        from ..eval.metrics import classification_report

        items = self.eval_items if items is None else items
        t0 = time.perf_counter()
        probs = self.predict_items(items)
        dt = time.perf_counter() - t0
        y = torch.tensor([it["label"] for it in items])
        report = classification_report(y.tolist(), probs.argmax(-1).tolist(), self.labels,
                                       ordinal=self.cfg.classify.ordinal != "none")
        for w in report.get("warnings", []):
            log.warning("classify: %s", w)
        report["loss"] = float(F.nll_loss(torch.log(probs.clamp_min(1e-12)), y))
        report["samples_per_s"] = len(items) / max(dt, 1e-9)
        if self.trainable is not None:
            report["trainable_params"] = self.trainable
        return report

    def save(self, out_dir: Path) -> None:
        """Write ``adapter/`` (LoRA, PEFT format) or ``model/`` (HF folder) and ``labels.json``."""
        save_weights(self.model, self.tokenizer, out_dir, lora=self.cfg.classify.mode in ADAPTER_MODES,
                     base_name=str(self.cfg.model.name), task_type="SEQ_CLS")
        write_json(out_dir / "labels.json", self.labels)
        if self.cfg.classify.decision_bias != "none" and getattr(self, "eval_items", None):
            self._fit_decision(out_dir)

    def _fit_decision(self, out_dir: Path) -> None:
        """Fit the decision biases of these weights on the validation split; write ``decision.json``."""
        from .classify_decision import fit_decision_bias, macro_f1, write_decision

        was_training = self.model.training
        probs = self.predict_items(self.eval_items)  # (N, C), self.bias is None while training
        self.model.train(was_training)
        y = torch.tensor([it["label"] for it in self.eval_items])
        logp = probs.clamp_min(1e-12).log()
        bias = fit_decision_bias(logp, y)
        before, after = (macro_f1(y, logp.argmax(-1), len(self.labels)),
                         macro_f1(y, (logp + bias).argmax(-1), len(self.labels)))
        write_decision(out_dir, bias, n=len(y), before=before, after=after)
        log.info("classify: decision biases %s (validation macro-F1 %.4f -> %.4f)",
                 [round(float(v), 2) for v in bias], before, after)

    # ---- loading a finished run --------------------------------------------------------
    @classmethod
    def from_run(cls, run_dir: str | Path, which: str = "final") -> "ClassifyTask":
        run_dir = Path(run_dir)
        opened = open_run(run_dir, which)
        cfg, art = opened.config, opened.root
        labels = read_labels(art)
        if cfg.classify.mode not in ADAPTER_MODES:
            cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"name": str(art / "model")})})
            cfg = cfg.model_copy(update={"classify": cfg.classify.model_copy(update={"mode": "full"})})
        task = cls(cfg, with_data=False, labels=labels, adapt=False)
        if cfg.classify.mode in ADAPTER_MODES:
            load_run_adapter(task.model, cfg, art / "adapter")
        from .classify_decision import read_decision

        task.bias = read_decision(art, len(labels))
        ready_for_inference(task)
        if task.placement.int8:  # as in training: the layers that were frozen run in int8, the rest fp32
            task._int8_as_trained()
        return task

    def _int8_as_trained(self) -> None:
        """``precision: int8`` on a reloaded run: the linear layers that were frozen while it
        trained (not the head, the adapter's own layers, or the last blocks ``unfreeze_last``
        trained) run their products in int8, the same as during training and evaluation."""
        from ..int8_frozen import int8_frozen
        from .common import layer_stack

        names = dict((id(m), n) for n, m in self.model.named_modules())
        keep = [n for n, _ in self.model.named_modules() if n.rsplit(".", 1)[-1] in HEADS]
        last = self.cfg.classify.unfreeze_last if self.cfg.classify.mode == "frozen" else 0
        stack = layer_stack(self.model)
        if last and stack is not None:
            keep += [names[id(b)] for b in list(stack)[-last:]]
        int8_frozen(self.model, tuple(keep))

    # ---- files for eval/predict ------------------------------------------------------------
    def read_eval_file(self, path: str) -> list[dict]:
        table = apply_where(read_table(path), self.cfg.data.where)
        return self._items(table, "eval")

    def predict(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> list[dict]:
        """``{"text", "label", "score", "probs"}`` for each raw text (and its pair text)."""
        texts = list(texts)
        probs = self.predict_items(_tokenize(self.tokenizer, texts, list(pairs) if pairs else None,
                                             self.cfg.data.max_length))
        return self.prediction_rows(texts, probs.tolist())

    def prediction_rows(self, texts: Sequence[str], probs: list[list[float]]) -> list[dict]:
        rows = []
        for t, p in zip(texts, probs):
            k = max(range(len(p)), key=p.__getitem__)
            rows.append({"text": t, "label": self.labels[k], "score": p[k],
                         "probs": {l: round(v, 6) for l, v in zip(self.labels, p)}})
        return rows

    def predict_file(self, path: str, out: str) -> int:
        table = read_table(path)
        col = self.text_col if table.records and self.text_col in table.records[0] else "text"
        require_columns(table, [col])
        texts = text_values(table, col)
        pairs = text_values(table, self.pair_col) if self.pair_col else None
        return write_jsonl(out, self.predict(texts, pairs))


#: classify.method -> the module defining (and registering) its class; loaded on first use
METHOD_MODULES = {"embedding_lr": "lmforge.tasks.classify_methods", "zero_shot": "lmforge.tasks.classify_methods",
                  "setfit": "lmforge.tasks.classify_methods", "prompt": "lmforge.tasks.classify_prompt",
                  "text2text": "lmforge.tasks.classify_text2text"}
CLASSIFY_METHODS: dict[str, type] = {"finetune": ClassifyTask}


def classify_method(method: str):
    """Class decorator: the class that runs ``classify.method: <method>``."""

    def deco(cls: type) -> type:
        cls.method = method
        CLASSIFY_METHODS[method] = cls
        return cls

    return deco


def method_task(method: str) -> type:
    """The task class of a ``classify.method`` (its module is imported by name: the method
    modules build on this one, so this one never imports them)."""
    if method not in CLASSIFY_METHODS and method in METHOD_MODULES:
        import importlib

        importlib.import_module(METHOD_MODULES[method])
    if method not in CLASSIFY_METHODS:
        raise LmforgeError(f"classify.method: unknown method '{method}' (choose from "
                           f"{sorted(set(METHOD_MODULES) | set(CLASSIFY_METHODS))})")
    return CLASSIFY_METHODS[method]
