"""Classification beyond fine-tuning a classifier: ``classify.method`` other than ``finetune``.

- ``embedding_lr``: frozen sentence embeddings + a scikit-learn classifier (logistic regression by
  default); training-set embeddings are cached on disk and reused across runs.
- ``zero_shot``: one prototype per class -- the mean embedding of its label descriptions
  (templates such as ``"a {label} review"``) and/or of a few labelled examples; the class of
  highest cosine similarity wins.
- ``setfit`` (Tunstall et al. 2022): N examples per class, positive/negative pairs, contrastive
  fine-tuning of the encoder with the cosine-similarity loss on the shared engine, then a head.
- ``prompt`` (in :mod:`lmforge.tasks.classify_prompt`): a generative model is asked a templated
  question; each label is scored by the log-probability of its answer words.

Every method is a :class:`~lmforge.tasks.classify.ClassifyTask`: the same data, label and
eval/predict file handling, a run directory with ``labels.json``, ``eval.json`` and the method's
artefacts. Non-gradient methods train in :meth:`TextMethod.train_direct`.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.schema import label_ids, read_labels, require_columns, text_values
from ..embeddings.disk_cache import cached_encode
from ..errors import LmforgeError
from .classify import ClassifyTask, classify_method
from .classify_heads import PairTask, SklearnHead, VectorHeadTask, sample_per_class, setfit_pairs
from .common import open_run, write_json


class TextMethod(ClassifyTask):
    """Shared by the methods: items keep their text; subclasses turn texts into class probabilities."""

    method = ""
    sample_size = 0  # training examples the method learnt from, when it samples them (setfit, per_class)

    def __init__(self, cfg, *, with_data: bool = True, labels: list[str] | None = None, adapt: bool = True):
        self._fitting = with_data
        super().__init__(cfg, with_data=with_data, labels=labels, adapt=adapt)
        self.trainable = self.count_parameters()

    # ---- data -------------------------------------------------------------------------------
    def _items(self, table, split: str) -> list[dict]:
        require_columns(table, [self.text_col, self.label_col] + ([self.pair_col] if self.pair_col else []))
        texts = text_values(table, self.text_col)
        pairs = text_values(table, self.pair_col) if self.pair_col else [None] * len(texts)
        ids = label_ids(table, self.label_col, self.labels, split=split)
        return [{"text": t, "text_pair": p, "label": y} for t, p, y in zip(texts, pairs, ids)]

    def item_length(self, item: dict) -> int:
        return len(item["text"])

    def label_map(self, given: dict, what: str) -> list[list[str]]:
        """Per label, its words from ``given`` (label -> text or list), else the label name."""
        unknown = sorted(set(given) - set(self.labels))
        if unknown:
            raise LmforgeError(f"config: classify.{what} has unknown label(s) {unknown} (labels: {self.labels})")
        out = []
        for lab in self.labels:
            words = given.get(lab, lab)
            out.append([words] if isinstance(words, str) else list(words))
            if not out[-1] or not all(w.strip() for w in out[-1]):
                raise LmforgeError(f"config: classify.{what}: label '{lab}' needs a non-empty text")
        return out

    # ---- prediction -----------------------------------------------------------------------------
    def predict_texts(self, texts: list[str], pairs: list[str | None] | None = None) -> np.ndarray:
        """Class probabilities ``(N, C)`` for raw texts."""
        raise NotImplementedError

    def predict_items(self, items: Sequence[dict], batch_size: int | None = None) -> Tensor:
        probs = self.predict_texts([it["text"] for it in items], [it.get("text_pair") for it in items])
        return torch.as_tensor(np.asarray(probs), dtype=torch.float32)  # (N, C)

    def predict(self, texts: Sequence[str], pairs: Sequence[str | None] | None = None) -> list[dict]:
        texts = list(texts)
        return self.prediction_rows(texts, np.asarray(self.predict_texts(texts, pairs), dtype=float).tolist())

    # ---- training and artefacts ----------------------------------------------------------------
    def count_parameters(self) -> dict:
        total = sum(p.numel() for p in self.model.parameters())
        return dict(trainable=0, total=total, percent=0.0)

    def describe_model(self) -> str:
        from ..adapters.lora import format_trainable

        return f"{self.method}: " + format_trainable(self.trainable)

    def fit_method(self, run_dir: Path) -> None:
        """Fit whatever the method learns (classifier, prototypes, encoder + head)."""

    def train_direct(self, run_dir: Path) -> dict:
        t0 = time.perf_counter()
        self.fit_method(Path(run_dir))
        seconds = time.perf_counter() - t0
        self.trainable = self.count_parameters()
        metrics = (self.evaluate() if self.eval_items else {}) | {"train_seconds": seconds}
        write_json(Path(run_dir) / "eval.json", metrics)
        return metrics

    def save_artefacts(self, out_dir: Path) -> None:
        """Write the fitted parts (the config and labels are saved already)."""

    def load_artefacts(self, run_dir: Path) -> None:
        """Read what :meth:`save_artefacts` wrote."""

    def save(self, out_dir: Path) -> None:
        self.save_artefacts(Path(out_dir))
        write_json(Path(out_dir) / "labels.json", self.labels)

    @classmethod
    def run_config(cls, cfg, run_dir: Path):
        """The config to rebuild a finished run with (e.g. pointing at its trained encoder)."""
        return cfg

    @classmethod
    def from_run(cls, run_dir: str | Path, which: str = "final") -> "TextMethod":
        run_dir = Path(run_dir)
        cfg = cls.run_config(open_run(run_dir, which).config, run_dir)
        task = cls(cfg, with_data=False, labels=read_labels(run_dir))
        task.load_artefacts(run_dir)
        task.trainable = task.count_parameters()
        return task


class EncoderMethod(TextMethod):
    """Methods on a sentence encoder (``classify.encoder``: pooling, normalisation, batch size)."""

    def _build_model(self, adapt: bool = True):
        from ..embeddings.encoder import SentenceEncoder

        cfg, eo = self.cfg, self.cfg.classify.encoder
        if self.pair_col:
            raise LmforgeError(f"classify.method {self.method} embeds single texts; data.columns.text_pair is "
                               "for the finetune and prompt methods")
        enc = SentenceEncoder.from_pretrained(cfg.model.name, pooling=eo.pooling, normalize=eo.normalize,
                                              trust_remote_code=cfg.model.trust_remote_code,
                                              revision=cfg.model.revision)
        enc.max_length = min(enc.max_length, cfg.data.max_length)
        enc.requires_grad_(self.trains_encoder())
        self.encoder = enc
        return enc

    def trains_encoder(self) -> bool:
        return False

    def embed(self, texts: Sequence[str], cache: bool = False) -> np.ndarray:
        """``(N, D)`` float32 embeddings; ``cache`` reads/writes the on-disk cache (frozen encoders only)."""
        bs, place = self.cfg.classify.encoder.batch_size, self.placement
        if cache and not self.trains_encoder():
            return cached_encode(self.encoder, list(texts), self.folder, batch_size=bs, placement=place)
        return self.encoder.encode(list(texts), batch_size=bs, placement=place)


@classify_method("embedding_lr")
class EmbeddingLRTask(EncoderMethod):
    """Frozen embeddings + a scikit-learn classifier (``classify.embedding_lr``)."""

    method = "embedding_lr"
    head: SklearnHead | None = None

    def _build_model(self, adapt: bool = True):
        ec = self.cfg.classify.embedding_lr
        self.head = SklearnHead(ec.classifier, ec.kwargs, len(self.labels))
        return super()._build_model(adapt)

    def fit_method(self, run_dir: Path) -> None:
        ec = self.cfg.classify.embedding_lr
        items = self.train_items
        if ec.per_class is not None:
            items = [items[i] for i in sample_per_class([it["label"] for it in items], ec.per_class, self.cfg.seed)]
        self.sample_size = len(items)
        x = self.embed([it["text"] for it in items], cache=ec.cache)  # (N, D)
        self.head.fit(x, np.array([it["label"] for it in items]))

    def predict_texts(self, texts, pairs=None) -> np.ndarray:
        return self.head.probs(self.embed(texts))

    def count_parameters(self) -> dict:
        base = sum(p.numel() for p in self.encoder.parameters())
        n = self.head.n_params if self.head is not None and self.head.fitted else 0
        return dict(trainable=n, total=base + n, percent=100.0 * n / (base + n))

    def save_artefacts(self, out_dir: Path) -> None:
        self.head.save(out_dir / "head")

    def load_artefacts(self, run_dir: Path) -> None:
        self.head = SklearnHead.load(run_dir / "head", len(self.labels))


@classify_method("zero_shot")
class ZeroShotTask(EncoderMethod):
    """Cosine similarity to class prototypes from label descriptions and/or a few examples."""

    method = "zero_shot"
    prototypes: Tensor | None = None  # (C, D), unit rows

    def descriptions(self) -> list[list[str]]:
        """Per class, the description texts: every template with every label word."""
        zc = self.cfg.classify.zero_shot
        bad = [t for t in zc.templates if "{label}" not in t]
        if bad:
            raise LmforgeError(f"config: classify.zero_shot.templates: '{bad[0]}' has no {{label}} slot")
        words = self.label_map(zc.label_words, "zero_shot.label_words")
        return [[t.replace("{label}", w) for t in zc.templates for w in ws] for ws in words]

    def fit_method(self, run_dir: Path) -> None:
        zc = self.cfg.classify.zero_shot
        if not zc.use_descriptions and not zc.shots:
            raise LmforgeError("config: classify.zero_shot needs use_descriptions=true or shots > 0")
        parts = []
        if zc.use_descriptions:
            descs = self.descriptions()
            emb = F.normalize(torch.from_numpy(self.embed([d for ds in descs for d in ds])), dim=-1)  # (sum_c n_c, D)
            parts.append(torch.stack([e.mean(0) for e in emb.split([len(d) for d in descs])]))  # (C, D)
        if zc.shots:
            y = [it["label"] for it in self.train_items]
            idx = sample_per_class(y, zc.shots, self.cfg.seed)
            missing = sorted(set(range(len(self.labels))) - {y[i] for i in idx})
            if missing:
                raise LmforgeError(f"classify.zero_shot.shots: no training example of label(s) "
                                   f"{[self.labels[m] for m in missing]}")
            emb = F.normalize(torch.from_numpy(self.embed([self.train_items[i]["text"] for i in idx])), dim=-1)
            lab = torch.tensor([y[i] for i in idx])
            parts.append(torch.stack([emb[lab == c].mean(0) for c in range(len(self.labels))]))  # (C, D)
        self.prototypes = F.normalize(torch.stack([F.normalize(p, dim=-1) for p in parts]).sum(0), dim=-1)

    def predict_texts(self, texts, pairs=None) -> np.ndarray:
        e = F.normalize(torch.from_numpy(self.embed(texts)), dim=-1)  # (N, D)
        cos = e @ self.prototypes.T  # (N, C)
        return torch.softmax(cos / self.cfg.classify.zero_shot.temperature, dim=-1).numpy()

    def save_artefacts(self, out_dir: Path) -> None:
        from ..rundir import write_safetensors

        write_safetensors(out_dir / "prototypes.safetensors", {"prototypes": self.prototypes})

    def load_artefacts(self, run_dir: Path) -> None:
        from safetensors.torch import load_file

        path = run_dir / "prototypes.safetensors"
        if not path.is_file():
            raise LmforgeError(f"{run_dir}: no prototypes.safetensors (did training finish?)")
        self.prototypes = load_file(str(path))["prototypes"].float()


@classify_method("setfit")
class SetFitTask(EncoderMethod):
    """SetFit: contrastive fine-tuning of the encoder on sampled pairs, then a head on its embeddings."""

    method = "setfit"
    head: SklearnHead | None = None

    def trains_encoder(self) -> bool:
        return self._fitting

    def fit_method(self, run_dir: Path) -> None:
        from ..train import fit

        sc, cfg = self.cfg.classify.setfit, self.cfg
        y = [it["label"] for it in self.train_items]
        idx = sample_per_class(y, sc.per_class, cfg.seed)
        texts, labels = [self.train_items[i]["text"] for i in idx], np.array([y[i] for i in idx])
        pairs = setfit_pairs(labels, sc.num_iterations, keys=texts, max_pairs=sc.max_pairs, seed=cfg.seed)
        if not pairs:
            raise LmforgeError("setfit: the sample gives no training pairs (need at least two distinct texts)")
        self.sample_size, self.pair_count = len(idx), len(pairs)
        ids = self.encoder.tokenize(texts)
        pair_task = PairTask(self.encoder, ids, pairs, self.placement)
        backbone = self.encoder.backbone
        attn = backbone.config._attn_implementation
        train_attn = self.placement.attn_implementation(cfg.model.attn_implementation, encoder=True)
        if train_attn != attn:
            backbone.set_attn_implementation(train_attn)  # eager trains faster on CPU under bf16 autocast
        fit(pair_task, cfg, run_dir)
        if train_attn != attn:
            backbone.set_attn_implementation(attn)
        self.encoder.requires_grad_(False).eval()
        x = self.embed(texts)  # (n, D)
        if sc.head == "logistic":
            self.head = SklearnHead(sc.classifier, sc.kwargs, len(self.labels)).fit(x, labels)
        else:
            self.head = self._fit_linear_head(x, labels, run_dir / "head")

    def _fit_linear_head(self, x: np.ndarray, y: np.ndarray, head_dir: Path) -> SklearnHead:
        from ..train import fit

        sc, tc = self.cfg.classify.setfit, self.cfg.train
        train = tc.model_copy(update={"epochs": sc.head_epochs, "lr": sc.head_lr, "max_steps": None,
                                      "eval_every": None, "save_every": None, "resume": False,
                                      "best_metric": None, "warmup_ratio": 0.0})
        task = VectorHeadTask(torch.from_numpy(x), torch.from_numpy(y), len(self.labels), self.placement)
        head_dir.mkdir(parents=True, exist_ok=True)
        fit(task, self.cfg.model_copy(update={"train": train}), head_dir)
        lin = task.model.cpu()
        return SklearnHead.from_linear("torch.nn.Linear", lin.weight.detach().double().numpy(),
                                       lin.bias.detach().double().numpy(), len(self.labels))

    def predict_texts(self, texts, pairs=None) -> np.ndarray:
        return self.head.probs(self.embed(texts))

    def count_parameters(self) -> dict:
        base = sum(p.numel() for p in self.encoder.parameters())
        n = self.head.n_params if self.head is not None and self.head.fitted else 0
        return dict(trainable=base + n, total=base + n, percent=100.0)

    def save_artefacts(self, out_dir: Path) -> None:
        self.encoder.save(out_dir / "model")
        self.head.save(out_dir / "head")

    @classmethod
    def run_config(cls, cfg, run_dir: Path):
        model = run_dir / "model"
        if not (model / "modules.json").is_file():
            raise LmforgeError(f"{run_dir}: no trained encoder in {model}")
        enc = cfg.classify.encoder.model_copy(update={"pooling": None, "normalize": None})
        return cfg.model_copy(update={"model": cfg.model.model_copy(update={"name": str(model)}),
                                      "classify": cfg.classify.model_copy(update={"encoder": enc})})

    def load_artefacts(self, run_dir: Path) -> None:
        self.head = SklearnHead.load(run_dir / "head", len(self.labels))
