"""Rewards: score a batch of (prompt, response) texts with one float each.

Three kinds, all called as ``reward(prompts, responses) -> list[float]``:

- :class:`ClassifierReward`: a fine-tuned sequence classifier (a ``classify`` run); the score is
  the logit or the probability of one named label. Responses are decoded text re-tokenised with
  the classifier's own tokenizer, scored in batches on its device.
- :class:`PairReward`: a Bradley-Terry reward model (a ``reward`` run); the prompt and response
  go through the reward model's own chat formatting, as it was trained.
- :class:`FunctionReward`: a Python function ``text -> float`` named by its dotted path (the
  user's own recipe asks for it: code is imported only from a name the user wrote).

:class:`MeanReward` averages several of them per response (a reward-model ensemble: the
mean-reward ensemble of Coste et al. 2023, against over-optimising one model's errors).

A reward that raises, or returns something that is not a finite number, stops with one line
naming the prompt.
"""
from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence

import torch

from ..config import preview
from ..errors import LmforgeError

DOTTED = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*([.:][A-Za-z_][\w]*)$")


def _number(value, where: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise LmforgeError(f"{where} returned {preview(value, 40)}, not a finite number")
    return float(value)


def import_function(name: str, what: str = "rl.reward") -> Callable:
    """The callable named ``package.module.function`` (or ``package.module:function``)."""
    if not DOTTED.match(name):
        raise LmforgeError(f"{what}: {preview(name)} is neither a run folder nor a dotted function name "
                           "(package.module.function)")
    module, _, attr = name.replace(":", ".").rpartition(".")
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # ModuleNotFoundError or an error inside the user's module
        raise LmforgeError(f"{what}: cannot import {module!r} ({type(exc).__name__}: {str(exc)[:120]})") from None
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise LmforgeError(f"{what}: {module!r} has no function {attr!r}")
    return fn


class FunctionReward:
    """``fn(response_text) -> float`` for each response."""

    def __init__(self, fn: Callable[[str], float], name: str):
        self.fn, self.name = fn, name

    def __call__(self, prompts: Sequence, responses: Sequence[str]) -> list[float]:
        out = []
        for i, (p, r) in enumerate(zip(prompts, responses)):
            where = f"rl.reward {self.name} (response to prompt {preview(_text(p), 50)})"
            try:
                value = self.fn(r)
            except Exception as exc:
                raise LmforgeError(f"{where} raised {type(exc).__name__}: {str(exc)[:120]}") from None
            out.append(_number(value, where))
        return out


def _text(prompt) -> str:
    if isinstance(prompt, list):  # chat messages: the last user turn
        return str(prompt[-1].get("content", "")) if prompt else ""
    return str(prompt)


class ClassifierReward:
    """Score = ``logit`` or ``prob`` of ``label`` under a sequence classifier.

    Args:
        model: a Hugging Face sequence classifier in eval mode (its logits are per label).
        tokenizer: its tokenizer (responses are re-tokenised with it).
        labels: the label names in output order.
        label: the label whose score is the reward.
        score: ``"prob"`` (softmax probability) or ``"logit"``.
        to_probs: ``(B, n_outputs) -> (B, C)`` probabilities (ordinal heads); softmax by default.
        max_length: classifier tokens kept per text; batch_size: texts per forward.
        autocast: a context manager factory for the classifier's precision.
        source: the run folder (for messages).
    """

    def __init__(self, model, tokenizer, labels: Sequence[str], label: str | None, *, score: str = "prob",
                 to_probs: Callable | None = None, max_length: int = 128, batch_size: int = 32,
                 autocast=None, source: str = "classifier", logits_are_labels: bool = True):
        labels = list(labels)
        if label is None:
            raise LmforgeError(f"rl.reward_label: required for a classify run as reward (labels of {source}: "
                               f"{', '.join(labels[:10])})")
        if label not in labels:
            raise LmforgeError(f"rl.reward_label: {preview(label)} is not a label of {source} "
                               f"(labels: {', '.join(labels[:10])})")
        if score == "logit" and not logits_are_labels:
            raise LmforgeError(f"rl.reward_score: logit needs one logit per label; {source} has an ordinal head "
                               "(use prob)")
        self.model, self.tokenizer, self.index = model, tokenizer, labels.index(label)
        self.score, self.to_probs = score, to_probs or (lambda z: torch.softmax(z.float(), -1))
        self.max_length, self.batch_size = max_length, batch_size
        self._autocast = autocast  # e.g. Placement.autocast of the classifier's run

    @torch.no_grad()
    def __call__(self, prompts: Sequence, responses: Sequence[str]) -> list[float]:
        import contextlib

        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out: list[float] = []
        for start in range(0, len(responses), self.batch_size):
            texts = [r if r.strip() else " " for r in responses[start:start + self.batch_size]]
            enc = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=True,
                                 return_tensors="pt")
            if "attention_mask" not in enc:
                enc["attention_mask"] = (enc["input_ids"] != pad).long()
            inputs = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            with (self._autocast() if self._autocast else contextlib.nullcontext()):
                logits = self.model(**inputs).logits.float()  # (b, n_outputs)
            vals = logits[:, self.index] if self.score == "logit" else self.to_probs(logits)[:, self.index]
            out += vals.float().cpu().tolist()
        return out


class PairReward:
    """A Bradley-Terry reward model's scalar for (prompt, response).

    ``encode(prompt, response) -> token ids`` formats a pair as the reward model was trained;
    ``score(list of id lists) -> list of floats`` runs it in batches."""

    def __init__(self, encode: Callable, score: Callable, source: str = "reward model"):
        self.encode, self.score, self.source = encode, score, source

    def __call__(self, prompts: Sequence, responses: Sequence[str]) -> list[float]:
        seqs = []
        for p, r in zip(prompts, responses):
            try:
                seqs.append(self.encode(p, r))
            except LmforgeError as err:
                raise LmforgeError(f"{self.source}: cannot format the response to prompt {preview(_text(p), 50)} "
                                   f"({err})") from None
        return [float(v) for v in self.score(seqs)]


class MeanReward:
    """``(1/M) sum_j reward_j(prompt, response)`` for each response, over M >= 1 rewards (each called
    on the whole batch; their scores should share a scale, e.g. seeds of one reward recipe)."""

    def __init__(self, rewards: Sequence[Callable]):
        if not rewards:
            raise LmforgeError("rl.reward: an empty list (name one or more rewards)")
        self.rewards = list(rewards)

    def __call__(self, prompts: Sequence, responses: Sequence[str]) -> list[float]:
        scores = [reward(prompts, responses) for reward in self.rewards]  # M lists of N
        return [sum(col) / len(col) for col in zip(*scores)]
