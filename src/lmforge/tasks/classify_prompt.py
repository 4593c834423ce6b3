"""The ``prompt`` classification method: a generative (chat) model is asked a templated question and
each label is scored by the log-probability of its answer words after it (:func:`choice_logprobs`),
never by parsing generated text."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import LmforgeError
from .classify import classify_method
from .classify_methods import TextMethod


@classify_method("prompt")
class PromptTask(TextMethod):
    """A generative model answers a templated question; labels are ranked by answer log-probability."""

    method = "prompt"

    def _build_model(self, adapt: bool = True):
        from ..causal_lm import Source, load_causal_lm

        model, self.tokenizer, _ = load_causal_lm(Source(base=str(self.folder)), dtype=torch.float32,
                                                  device=self.placement.device,
                                                  trust_remote_code=self.cfg.model.trust_remote_code)
        model.requires_grad_(False)
        pc = self.cfg.classify.prompt
        if "{text}" not in pc.template:
            raise LmforgeError("config: classify.prompt.template has no {text} slot")
        self.use_chat = pc.chat and bool(getattr(self.tokenizer, "chat_template", None))
        words = self.label_map(pc.verbalizers, "prompt.verbalizers")
        anchor = self.render("x")
        self.choices = [(c, answer_ids(self.tokenizer, anchor, w, self.use_chat)) for c, ws in enumerate(words)
                        for w in ws]
        return model

    def render(self, text: str, pair: str | None = None) -> str:
        pc = self.cfg.classify.prompt
        question = pc.template.replace("{text}", text).replace("{text_pair}", pair or "")
        if not self.use_chat:
            return question + pc.answer_prefix
        from ..generation import render_chat

        messages = ([{"role": "system", "content": pc.system}] if pc.system else []) + [
            {"role": "user", "content": question}]
        return render_chat(self.tokenizer, messages) + pc.answer_prefix

    def clip(self, texts: list[str]) -> list[str]:
        """Texts cut to ``data.max_length`` tokens (the question around them is not counted)."""
        limit = self.cfg.data.max_length
        try:
            spans = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        except (NotImplementedError, ValueError):  # slow tokenizers have no offsets: keep the texts
            return texts
        return [t if len(o) <= limit else t[:o[limit - 1][1]] for t, o in zip(texts, spans)]

    def predict_texts(self, texts, pairs=None) -> np.ndarray:
        """Label probabilities: ``softmax_c(logsumexp_{w in words(c)} log p(w | prompt))`` -- each
        label's answer words scored by :func:`choice_logprobs`, renormalised over the labels."""
        texts = self.clip(list(texts))
        pairs = self.clip([p or "" for p in pairs]) if pairs and any(pairs) else [None] * len(texts)
        prompts = [self.render(t, p) for t, p in zip(texts, pairs)]
        ids = self.tokenizer(prompts, add_special_tokens=not self.use_chat)["input_ids"]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        label_of = torch.tensor([c for c, _ in self.choices])
        out = torch.empty(len(ids), len(self.labels))
        bs = self.cfg.classify.prompt.batch_size
        for s in range(0, len(order), bs):
            idx = order[s:s + bs]
            with self.placement.autocast():
                scores = choice_logprobs(self.model, [ids[i] for i in idx], [w for _, w in self.choices],
                                         self.tokenizer.pad_token_id)  # (b, K)
            per_label = torch.stack([scores[:, label_of == c].logsumexp(-1)
                                     for c in range(len(self.labels))], dim=-1)  # (b, C)
            out[torch.tensor(idx)] = torch.softmax(per_label, dim=-1)
        return out.numpy()


def answer_ids(tokenizer, prompt: str, answer: str, chat: bool) -> list[int]:
    """Token ids of ``answer`` as they follow ``prompt``: the tail of ``ids(prompt + answer)`` when
    ``ids(prompt)`` is its prefix (merges across the boundary are respected), else ``ids(answer)``."""
    special = not chat
    head = tokenizer(prompt, add_special_tokens=special)["input_ids"]
    both = tokenizer(prompt + answer, add_special_tokens=special)["input_ids"]
    tail = both[len(head):] if both[:len(head)] == head else tokenizer(answer, add_special_tokens=False)["input_ids"]
    if not tail:
        raise LmforgeError(f"classify.prompt.verbalizers: '{answer}' encodes to no tokens")
    return list(tail)


def _head_logps(model, hidden: Tensor) -> Tensor:
    """``log softmax(W h)`` with the output projection in fp32 (bf16 logits would round label scores
    to ~0.1 nats), final-logit soft-capping applied when the model has it.  (B, n, H) -> (B, n, V)."""
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    with torch.autocast(hidden.device.type, enabled=False):
        bias = head.bias.float() if getattr(head, "bias", None) is not None else None
        z = F.linear(hidden.float(), head.weight.float(), bias)  # (B, n, V)
        if cap:
            z = cap * torch.tanh(z / cap)
        return torch.log_softmax(z, dim=-1)


@torch.no_grad()
def choice_logprobs(model, prompts: Sequence[Sequence[int]], choices: Sequence[Sequence[int]], pad_id: int) -> Tensor:
    """Log-probability of each answer choice after each prompt.

    ``score[b, k] = sum_t log p(c_{k,t} | x_b, c_{k,<t})``. The prompts run once, left-padded, with
    a KV cache; each choice then continues from the cache (one forward over its tokens but the
    last) and the cache is cropped back to the prompts before the next choice. Only the hidden
    states that score a token go through the output projection, in fp32.

    Args:
        model: a causal LM (``base_model`` + output embeddings) accepting ``position_ids``,
            ``past_key_values`` and ``use_cache``.
        prompts: B token-id lists.
        choices: K non-empty token-id lists (the answers' tokens).
        pad_id: padding token id.

    Returns:
        ``(B, K)`` fp32 summed log-probabilities.
    """
    from ..data.batching import attention_mask, pad_sequences
    from ..generation import _new_cache, cache_kwargs

    body = model.base_model
    device = next(model.parameters()).device
    ids = pad_sequences(prompts, pad_id, left=True).to(device)  # (B, T)
    mask = attention_mask(prompts, left=True).to(device)  # (B, T)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)  # (B, T)
    batch = ids.shape[0]
    cache = _new_cache(model)
    hidden = body(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                  **cache_kwargs(body, cache)).last_hidden_state  # (B, T, H)
    first = _head_logps(model, hidden[:, -1:])[:, 0]  # (B, V)
    scores = torch.empty(batch, len(choices), device=device)
    for k, choice in enumerate(choices):
        c = torch.tensor(choice, device=device)  # (L,)
        score = first[:, c[0]]  # (B,)
        if len(choice) > 1:
            n = len(choice) - 1
            step_mask = torch.cat([mask, mask.new_ones(batch, n)], dim=1)  # (B, T + n)
            step_pos = pos[:, -1:] + torch.arange(1, n + 1, device=device)  # (B, n)
            h = body(input_ids=c[:-1].expand(batch, n), attention_mask=step_mask, position_ids=step_pos,
                     use_cache=True, **cache_kwargs(body, cache)).last_hidden_state  # (B, n, H)
            logp = _head_logps(model, h).gather(-1, c[1:].expand(batch, n)[..., None])  # (B, n, 1)
            score = score + logp.squeeze(-1).sum(-1)
            cache.crop(-n)  # drop the choice again (negative: tokens to remove)
        scores[:, k] = score
    return scores.cpu()
