"""The ``text2text`` classification method: an encoder-decoder model (T5, FLAN-T5, BART) reads a
templated question and answers with a label word, the way FLAN-T5 was instruction-tuned.

Two ways to turn the answer into a label (``classify.prompt.label_by``):

- ``score`` (default): each label's words ``w`` are scored as the decoder's whole output, tokenised
  as sft trains targets (``text_target``: T5 ``w </s>``, BART ``<s> w </s>``),
  ``log p(w | x) = sum_t log p(w_t | w_<t, x)`` (EOS included, so "good" does not win by being
  a prefix of "goodness"), and ``P(c | x) = softmax_c(logsumexp_{w in words(c)} log p(w </s> | x))``;
- ``generate``: the model's greedy answer is read back: the label whose word equals the answer
  (case, surrounding spaces and punctuation ignored) gets probability 1; an answer that matches no
  label word falls back to the scored probabilities and is counted (``unmatched_generations``).

The question is ``classify.prompt.template`` with ``{text}`` (and ``{text_pair}``); label words are
``classify.prompt.verbalizers`` (default: the label names). Nothing is trained: a run holds its
config, ``labels.json`` and ``eval.json``; give a fine-tuned or merged seq2seq folder as ``model.name``
to classify with it.
"""
from __future__ import annotations

import string
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import LmforgeError
from .classify import classify_method
from .classify_methods import TextMethod


def normalise_answer(text: str) -> str:
    """Lower-cased, whitespace-collapsed, without surrounding punctuation (``" Positive." -> "positive"``)."""
    return " ".join(text.lower().split()).strip(string.punctuation + " ")


def match_label(answer: str, words: Sequence[Sequence[str]]) -> int | None:
    """The index of the label one of whose words equals ``answer`` (normalised), or None."""
    a = normalise_answer(answer)
    for c, ws in enumerate(words):
        if any(normalise_answer(w) == a for w in ws):
            return c
    return None


@torch.no_grad()
def seq2seq_choice_logprobs(model, input_ids: Tensor, attention_mask: Tensor, choices: Sequence[Sequence[int]],
                            start_id: int, pad_id: int) -> Tensor:
    """Log-probability of each choice as the whole decoder output, for each source.

    ``score[b, k] = sum_t log p(c_{k,t} | c_{k,<t}, x_b)`` with the decoder fed ``[start, c_k[:-1]]``.
    The encoder runs once; the decoder runs once over all choices, each source's encoder states
    repeated K times.

    Args:
        model: an encoder-decoder LM (``get_encoder()``, ``get_decoder()``, output embeddings).
        input_ids, attention_mask: (B, S) right-padded sources.
        choices: K non-empty token-id lists (usually ending with EOS).
        start_id: the decoder start token; pad_id: padding id.

    Returns:
        ``(B, K)`` fp32 summed log-probabilities.
    """
    from ..causal_lm import encode_source, seq2seq_head, seq2seq_hidden, shift_right
    from ..data.batching import pad_sequences

    batch, k = input_ids.shape[0], len(choices)
    device = input_ids.device
    enc = encode_source(model, input_ids, attention_mask)  # (B, S, H)
    targets = pad_sequences(list(choices), -100).to(device)  # (K, L)
    dec_in = shift_right(targets, start_id, pad_id)  # (K, L)
    rep = lambda t: t.repeat_interleave(k, dim=0)  # noqa: E731  (B, ...) -> (B*K, ...), source-major
    hidden = seq2seq_hidden(model, rep(input_ids), rep(attention_mask), dec_in.repeat(batch, 1),
                            encoder_hidden=rep(enc))  # (B*K, L, H)
    weight, bias, scale = seq2seq_head(model)
    with torch.autocast(device.type, enabled=False):
        z = torch.nn.functional.linear(hidden.float() * scale, weight.float(),
                                       None if bias is None else bias.float())  # (B*K, L, V)
        logp = torch.log_softmax(z, dim=-1)
    tgt = targets.repeat(batch, 1)  # (B*K, L)
    picked = logp.gather(-1, tgt.clamp_min(0)[..., None]).squeeze(-1)  # (B*K, L)
    return (picked * (tgt != -100)).sum(-1).view(batch, k).cpu()  # (B, K)


@classify_method("text2text")
class Text2TextTask(TextMethod):
    """A seq2seq model answers a templated question with a label word (scored or generated)."""

    method = "text2text"
    unmatched = 0

    def _build_model(self, adapt: bool = True):
        from ..causal_lm import Source, is_seq2seq, load_causal_lm

        model, self.tokenizer, _ = load_causal_lm(Source(base=str(self.folder)), dtype=torch.float32,
                                                  device=self.placement.device,
                                                  trust_remote_code=self.cfg.model.trust_remote_code, seq2seq_ok=True)
        if not is_seq2seq(model):
            raise LmforgeError(f"model.name: {self.cfg.model.name} is a causal (decoder-only) LM; classify method "
                               "text2text needs an encoder-decoder model (T5, FLAN-T5, BART); use method prompt")
        model.requires_grad_(False)
        pc = self.cfg.classify.prompt
        if "{text}" not in pc.template:
            raise LmforgeError("config: classify.prompt.template has no {text} slot")
        self.words = self.label_map(pc.verbalizers, "prompt.verbalizers")
        eos = self.tokenizer.eos_token_id
        self.choices = []  # (label index, the word's decoder tokens as sft trains them: T5 "w </s>", BART "<s> w </s>")
        for c, ws in enumerate(self.words):
            for w in ws:
                if not self.tokenizer(text_target=w, add_special_tokens=False)["input_ids"]:
                    raise LmforgeError(f"classify.prompt.verbalizers: '{w}' encodes to no tokens")
                ids = list(self.tokenizer(text_target=w)["input_ids"])
                self.choices.append((c, ids if eos is None or ids[-1] == eos else ids + [eos]))
        return model

    def render(self, text: str, pair: str | None = None) -> str:
        return self.cfg.classify.prompt.template.replace("{text}", text).replace("{text_pair}", pair or "")

    def _sources(self, texts, pairs) -> list[list[int]]:
        """Token ids of the questions, each text cut to ``data.max_length`` tokens first."""
        limit = self.cfg.data.max_length
        ids = []
        for t, p in zip(texts, pairs):
            words = self.tokenizer(t, add_special_tokens=False)["input_ids"]
            if len(words) > limit:
                t = self.tokenizer.decode(words[:limit], skip_special_tokens=True)
            ids.append(list(self.tokenizer(self.render(t, p))["input_ids"]))
        return ids

    def _scores(self, sources: list[list[int]]) -> np.ndarray:
        """(N, C) label probabilities from the scored label words."""
        from ..causal_lm import decoder_start_id
        from ..data.batching import attention_mask, pad_sequences

        pad = self.tokenizer.pad_token_id
        start = decoder_start_id(self.model)
        label_of = torch.tensor([c for c, _ in self.choices])
        out = torch.empty(len(sources), len(self.labels))
        order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
        bs = self.cfg.classify.prompt.batch_size
        device = self.placement.device
        for s in range(0, len(order), bs):
            idx = order[s:s + bs]
            ids = pad_sequences([sources[i] for i in idx], pad).to(device)  # (b, S)
            mask = attention_mask([sources[i] for i in idx]).to(device)
            with self.placement.autocast():
                scores = seq2seq_choice_logprobs(self.model, ids, mask, [w for _, w in self.choices], start, pad)
            per_label = torch.stack([scores[:, label_of == c].logsumexp(-1) for c in range(len(self.labels))], -1)
            out[torch.tensor(idx)] = torch.softmax(per_label, dim=-1)  # (b, C)
        return out.numpy()

    def predict_texts(self, texts, pairs=None) -> np.ndarray:
        texts = list(texts)
        pairs = list(pairs) if pairs and any(pairs) else [None] * len(texts)
        sources = self._sources(texts, pairs)
        probs = self._scores(sources)
        self.unmatched = 0
        if self.cfg.classify.prompt.label_by == "generate":
            answers = self._generate(sources)
            self.answers = answers
            for i, answer in enumerate(answers):
                c = match_label(answer, self.words)
                if c is None:
                    self.unmatched += 1
                    continue
                probs[i] = np.eye(len(self.labels), dtype=probs.dtype)[c]
        return probs

    def _generate(self, sources: list[list[int]]) -> list[str]:
        """Greedy answers (a few tokens longer than the longest label word) to the tokenised questions."""
        from ..data.batching import attention_mask, pad_sequences
        from ..generation import GenerationConfig, decode, eos_token_ids

        longest = max(len(w) for _, w in self.choices)
        gcfg = GenerationConfig(max_new_tokens=longest + 2)
        eos, pad = eos_token_ids(self.model, self.tokenizer), self.tokenizer.pad_token_id
        bs, device = self.cfg.classify.prompt.batch_size, self.placement.device
        answers = []
        for s in range(0, len(sources), bs):
            rows = sources[s:s + bs]
            ids = pad_sequences(rows, pad, left=True).to(device)  # (b, S)
            mask = attention_mask(rows, left=True).to(device)
            with self.placement.autocast():
                out = decode(self.model, ids, mask, gcfg, eos_ids=eos, pad_id=pad)
            answers += [self.tokenizer.decode([t for t in o if t not in eos], skip_special_tokens=True) for o in out]
        return answers

    def evaluate(self, items=None) -> dict:
        report = super().evaluate(items)
        if self.cfg.classify.prompt.label_by == "generate":
            report["unmatched_generations"] = self.unmatched
        return report
