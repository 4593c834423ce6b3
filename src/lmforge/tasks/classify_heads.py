"""Pieces of the embedding-based classification methods: scikit-learn heads saved without pickle,
per-class sampling, SetFit's pair generation and the two small tasks
the engine trains for SetFit (the contrastive pair stage, the differentiable linear head)."""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LmforgeError
from ..rundir import write_bytes, write_text
from .base import Task

#: Types a saved head may hold beyond those skops trusts by default, by exact name (never a module
#: prefix: ``builtins.`` alone would admit ``builtins.exec``). They are the fitted internals of the
#: scikit-learn classifiers a head can use (trees and forests, nearest neighbours, MLPs).
SKOPS_ALLOWED = frozenset({
    "sklearn.tree._tree.Tree",
    "sklearn.neighbors._kd_tree.KDTree",
    "sklearn.neighbors._ball_tree.BallTree",
    "sklearn.metrics._dist_metrics.EuclideanDistance64",
    "sklearn.metrics._dist_metrics.ManhattanDistance64",
    "sklearn.metrics._dist_metrics.MinkowskiDistance64",
    "sklearn.metrics._dist_metrics.ChebyshevDistance64",
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
    "sklearn.neural_network._stochastic_optimizers.SGDOptimizer",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
})


# ---- heads -------------------------------------------------------------------------------------------
def classifier_class(name: str) -> type:
    """The scikit-learn classifier class named ``name`` (dotted path inside ``sklearn``)."""
    module, _, attr = name.rpartition(".")
    if not name.startswith("sklearn.") or not module:
        raise LmforgeError(f"classifier '{name}': give a scikit-learn class by dotted name, "
                           "e.g. sklearn.linear_model.LogisticRegression")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        raise LmforgeError(f"classifier '{name}' not found in scikit-learn") from None
    if not (isinstance(cls, type) and hasattr(cls, "fit") and hasattr(cls, "predict")):
        raise LmforgeError(f"classifier '{name}' is not a scikit-learn estimator class")
    return cls


def linear_probs(x: np.ndarray, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
    """Probabilities of a linear classifier, as scikit-learn's ``LogisticRegression.predict_proba``.

    ``z = x W^T + b``. One row in ``W`` (binary): ``p = [1 - s(z), s(z)]`` with the logistic
    ``s``; several rows: ``p = softmax(z)``. (For linear models without probabilities, e.g.
    LinearSVC, these are monotone scores, not calibrated probabilities.)

    Args:
        x: ``(N, D)`` features.
        coef: ``(K, D)`` weights, K = 1 (binary) or the number of classes.
        intercept: ``(K,)`` biases.

    Returns:
        ``(N, max(K, 2))`` float64 probabilities.
    """
    z = x.astype(np.float64) @ coef.T + intercept  # (N, K)
    if coef.shape[0] == 1:
        p1 = 1.0 / (1.0 + np.exp(-z[:, 0]))  # (N,)
        return np.stack([1.0 - p1, p1], axis=1)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class SklearnHead:
    """A classifier on embeddings, saved without pickle: linear models as JSON coefficients,
    other scikit-learn classifiers with skops (``pip install skops``).

    Args:
        name: dotted scikit-learn class (or ``torch.nn.Linear`` for a head made by :meth:`from_linear`).
        kwargs: constructor arguments.
        n_classes: number of labels; probabilities always have this many columns.
    """

    def __init__(self, name: str, kwargs: dict[str, Any], n_classes: int):
        self.name, self.kwargs, self.n_classes = name, dict(kwargs), n_classes
        self.estimator = None
        self.coef = self.intercept = self.classes = None
        if not name.startswith("torch."):
            cls = classifier_class(name)
            if not _is_linear(cls):
                _need_skops(name)
            try:
                self.estimator = cls(**self.kwargs)
            except TypeError as err:
                raise LmforgeError(f"classifier '{name}': bad arguments ({err})") from None
            from sklearn.base import is_classifier

            if not is_classifier(self.estimator):
                raise LmforgeError(f"classifier '{name}' is not a scikit-learn classifier")

    @classmethod
    def from_linear(cls, name: str, coef: np.ndarray, intercept: np.ndarray, n_classes: int) -> "SklearnHead":
        head = cls(name, {}, n_classes)
        head.coef, head.intercept, head.classes = coef, intercept, np.arange(n_classes)
        return head

    @property
    def fitted(self) -> bool:
        return self.coef is not None or (self.estimator is not None and hasattr(self.estimator, "classes_"))

    @property
    def n_params(self) -> int:
        """Learned numbers: weights + biases of a linear head (0 for non-parametric ones)."""
        return int(self.coef.size + self.intercept.size) if self.coef is not None else 0

    def fit(self, x: np.ndarray, y: np.ndarray) -> "SklearnHead":
        if len(set(np.asarray(y).tolist())) < 2:
            raise LmforgeError("the classifier needs training examples of at least two labels")
        self.estimator.fit(x, y)
        if hasattr(self.estimator, "coef_"):
            self.coef = np.atleast_2d(np.asarray(self.estimator.coef_, dtype=np.float64))
            self.intercept = np.atleast_1d(np.asarray(self.estimator.intercept_, dtype=np.float64))
            self.classes = np.asarray(self.estimator.classes_, dtype=np.int64)
        return self

    def probs(self, x: np.ndarray) -> np.ndarray:
        """``(N, n_classes)`` probabilities (classes never seen in training get 0)."""
        out = np.zeros((len(x), self.n_classes))
        if self.coef is not None:
            out[:, self.classes] = linear_probs(x, self.coef, self.intercept)
        elif hasattr(self.estimator, "predict_proba"):
            out[:, self.estimator.classes_] = self.estimator.predict_proba(x)
        else:
            out[np.arange(len(x)), self.estimator.predict(x)] = 1.0
        return out

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        meta: dict[str, Any] = {"classifier": self.name, "kwargs": self.kwargs}
        if self.coef is not None:
            meta |= {"classes": self.classes.tolist(), "coef": self.coef.tolist(), "intercept": self.intercept.tolist()}
        else:
            import skops.io as sio

            write_bytes(folder / "classifier.skops", sio.dumps(self.estimator))
        write_text(folder / "head.json", json.dumps(meta))

    @classmethod
    def load(cls, folder: Path, n_classes: int) -> "SklearnHead":
        path = folder / "head.json"
        if not path.is_file():
            raise LmforgeError(f"{folder}: no head.json (did training finish?)")
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(meta, dict) or not isinstance(meta.get("classifier"), str):
                raise ValueError("no 'classifier' name")
        except (UnicodeDecodeError, ValueError) as exc:
            raise LmforgeError(f"{path}: malformed head file ({str(exc).splitlines()[0][:120]})") from None
        if "coef" in meta:
            head = cls.from_linear(meta["classifier"], np.array(meta["coef"]), np.array(meta["intercept"]), n_classes)
            head.kwargs, head.classes = meta.get("kwargs", {}), np.array(meta["classes"], dtype=np.int64)
            return head
        head = cls(meta["classifier"], meta.get("kwargs", {}), n_classes)
        head.estimator = load_skops(folder / "classifier.skops", type(head.estimator))
        return head


def load_skops(file: Path, expected: type):
    """Load a scikit-learn estimator saved with skops, trusting only :data:`SKOPS_ALLOWED` by exact
    name beyond skops' own defaults; any other type (``builtins.exec``, ``os.system`` ...) is
    refused in one line before anything is constructed. The result must be an ``expected``."""
    import zipfile

    import skops.io as sio

    if not file.is_file():
        raise LmforgeError(f"{file}: missing (did training finish?)")
    try:
        untrusted = sio.get_untrusted_types(file=file)
    except (zipfile.BadZipFile, KeyError, ValueError, TypeError, OSError, AttributeError) as exc:
        raise LmforgeError(f"{file}: not a readable skops file ({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})") from None
    refused = sorted(t for t in untrusted if t not in SKOPS_ALLOWED)
    if refused:
        shown = ", ".join(t[:80] for t in refused[:3])
        raise LmforgeError(f"{file}: refusing to load type{'s' * (len(refused) > 1)} {shown} (not a scikit-learn "
                           "classifier part lmforge trusts; a crafted head can run code)")
    try:
        est = sio.load(file, trusted=list(untrusted))
    except Exception as exc:  # noqa: BLE001 - skops raises many types for malformed (but allowed) content
        raise LmforgeError(f"{file}: cannot load the classifier ({type(exc).__name__})") from None
    if type(est) is not expected:
        raise LmforgeError(f"{file}: holds a {type(est).__name__}, head.json names {expected.__name__}")
    return est


def _is_linear(cls: type) -> bool:
    from sklearn.linear_model._base import LinearClassifierMixin
    from sklearn.svm import LinearSVC

    return issubclass(cls, (LinearClassifierMixin, LinearSVC))


def _need_skops(name: str) -> None:
    try:
        import skops.io  # noqa: F401
    except ImportError:
        raise LmforgeError(f"classifier '{name}' is not linear: saving it without pickle needs skops "
                           "(pip install skops)") from None


# ---- sampling --------------------------------------------------------------------------------------------
def sample_per_class(labels: Sequence[int], n: int | None, seed: int) -> list[int]:
    """Indices of ``n`` examples of every class (all of a class with fewer; ``n=None``: all), seeded; sorted."""
    rng = np.random.default_rng(seed)
    y = np.asarray(labels)
    out: list[int] = []
    for c in sorted(set(y.tolist())):
        idx = np.flatnonzero(y == c)
        out += idx.tolist() if n is None or len(idx) <= n else rng.choice(idx, n, replace=False).tolist()
    return sorted(out)


def setfit_pairs(labels: Sequence[int], num_iterations: int, *, keys: Sequence[str] | None = None,
                 max_pairs: int | None = None, seed: int = 0) -> list[tuple[int, int, float]]:
    """SetFit's training pairs: positives (same label, target 1.0) and negatives (target 0.0).

    Candidates are the unordered pairs ``{i, j}``, ``i != j``, deduplicated by key (the texts):
    pairs of two equal texts are dropped, pairs with the same two texts are kept once. With ``n``
    examples, ``min(n * num_iterations, available, max_pairs // 2)`` pairs of each kind are drawn
    without replacement (seeded). SetFit's ``num_iterations`` asks for ``n * num_iterations`` of
    each kind too, but samples with repetition and includes self-pairs.

    Args:
        labels: ``(n,)`` class ids.
        num_iterations: pairs of each kind per example.
        keys: identity of each example (default: its index).
        max_pairs: bound on the total (split evenly between the kinds).
        seed: sampling seed.

    Returns:
        ``[(i, j, target)]``: the positives, then the negatives, each in drawn order.
    """
    y = np.asarray(labels)
    n = len(y)
    kid = np.arange(n) if keys is None else np.unique(np.asarray(list(keys), dtype=object).astype(str),
                                                     return_inverse=True)[1].reshape(-1)
    i, j = np.triu_indices(n, k=1)
    ka, kb = np.minimum(kid[i], kid[j]), np.maximum(kid[i], kid[j])
    keep = ka != kb
    i, j, pair_key = i[keep], j[keep], (ka * n + kb)[keep]
    _, first = np.unique(pair_key, return_index=True)
    first.sort()
    i, j = i[first], j[first]
    same = y[i] == y[j]
    rng = np.random.default_rng(seed)
    want = n * num_iterations if max_pairs is None else min(n * num_iterations, max_pairs // 2)
    out: list[tuple[int, int, float]] = []
    for kind, target in ((same, 1.0), (~same, 0.0)):
        ci, cj = i[kind], j[kind]
        take = rng.choice(len(ci), min(want, len(ci)), replace=False)
        out += [(int(ci[t]), int(cj[t]), target) for t in take]
    return out


# ---- SetFit stages for the engine ------------------------------------------------------------------------
class PairTask(Task):
    """SetFit's contrastive stage for the engine: ``L = mean_i (cos(u_i, v_i) - y_i)^2`` with
    ``y = 1`` for same-class pairs and ``0`` otherwise (``losses.contrastive.cosine_similarity_loss``).

    A batch embeds each distinct sentence once (pairs drawn from a few dozen examples repeat
    sentences: ~35 % of the rows of a 16-pair batch from 32 examples), in one forward pass; the
    loss gathers the pair sides from those rows, so gradients flow to every occurrence. (Repeats
    then share a dropout mask.)

    Args:
        encoder: the :class:`~lmforge.embeddings.SentenceEncoder` being trained.
        tokens: token ids of the examples.
        pairs: ``(i, j, target)`` over example indices.
        placement: the run's device/precision.
    """

    name = "setfit-pairs"

    def __init__(self, encoder, tokens: list[list[int]], pairs: list[tuple[int, int, float]], placement):
        self.model, self.placement, self.tokens = encoder, placement, tokens
        self.train_items = [{"a": i, "b": j, "score": float(s)} for i, j, s in pairs]
        self.eval_items = []

    def item_length(self, item: dict) -> int:
        return max(len(self.tokens[item["a"]]), len(self.tokens[item["b"]]))

    def collate(self, items: Sequence[dict]) -> dict[str, Tensor]:
        rows = list(dict.fromkeys([it["a"] for it in items] + [it["b"] for it in items]))  # distinct examples
        where = {ex: r for r, ex in enumerate(rows)}
        batch = self.model.collate([self.tokens[ex] for ex in rows])  # (U, T)
        batch["side_a"] = torch.tensor([where[it["a"]] for it in items])  # (B,)
        batch["side_b"] = torch.tensor([where[it["b"]] for it in items])  # (B,)
        batch["scores"] = torch.tensor([it["score"] for it in items], dtype=torch.float32)  # (B,)
        return batch

    def batch_units(self, batch: dict) -> int:
        return int(batch["scores"].shape[0])

    def loss(self, batch: dict) -> tuple[Tensor, dict]:
        from ..losses.contrastive import cosine_similarity_loss

        emb = self.model(batch["input_ids"], batch["attention_mask"]).float()  # (U, D)
        return cosine_similarity_loss(emb[batch["side_a"]], emb[batch["side_b"]], batch["scores"]), {}


class VectorHeadTask(Task):
    """A linear softmax head on fixed vectors (SetFit's differentiable head), trained by the engine."""

    name = "linear-head"

    def __init__(self, x: Tensor, y: Tensor, n_classes: int, placement):
        self.x, self.y, self.placement = x.float(), y.long(), placement  # (N, D), (N,)
        self.model = nn.Linear(x.shape[1], n_classes)
        self.train_items = [{"i": i} for i in range(len(y))]
        self.eval_items = []

    def item_length(self, item: dict) -> int:
        return 1

    def collate(self, items: Sequence[dict]) -> dict[str, Tensor]:
        idx = torch.tensor([it["i"] for it in items])
        return {"x": self.x[idx], "labels": self.y[idx]}  # (B, D), (B,)

    def batch_units(self, batch: dict) -> int:
        return int(batch["labels"].shape[0])

    def batch_tokens(self, batch: dict) -> int:
        return self.batch_units(batch)

    def loss(self, batch: dict) -> tuple[Tensor, dict]:
        logits = self.model(batch["x"]).float()  # (B, C)
        acc = (logits.argmax(-1) == batch["labels"]).float().mean()
        return F.cross_entropy(logits, batch["labels"]), {"accuracy": float(acc)}
