"""Masked-language-model corruption (BERT, Devlin et al. 2019, section 3.1), as pure functions.

A fraction ``p`` (15% by default) of the maskable positions is selected; each selected token is
replaced by the mask token with probability 0.8, by a uniformly random vocabulary token with
probability 0.1, and kept unchanged otherwise. The model is trained to predict the original
token at every selected position (labels elsewhere are ``ignore_index``).

Token masking selects every maskable position independently. Whole-word masking selects
*words* independently (``word_ids`` says which word each token belongs to) and masks all of a
selected word's sub-tokens together, so the model cannot recover ``##ing`` from ``play``.

All randomness comes from the ``torch.Generator`` passed in: the same seed gives the same masks.
Positions whose word id is negative (special tokens, padding) are never selected.
"""
from __future__ import annotations

import hashlib

import torch
from torch import Tensor

__all__ = ["corrupt", "mask_batch", "select_tokens", "select_words", "seed_of"]


def seed_of(*parts: int) -> int:
    """A 63-bit generator seed that is a stable function of the integers given (any order matters)."""
    h = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def _at_least_one(selected: Tensor, candidates: Tensor, scores: Tensor) -> Tensor:
    """Rows with candidates but no selection get their highest-scoring candidate selected."""
    empty = ~selected.any(-1) & candidates.any(-1)  # (B,)
    if empty.any():
        best = scores.masked_fill(~candidates, -1.0).argmax(-1)  # (B,)
        rows = empty.nonzero(as_tuple=True)[0]
        selected = selected.clone()
        selected[rows, best[rows]] = True
    return selected


def select_tokens(word_ids: Tensor, prob: float, generator: torch.Generator, *,
                  at_least_one: bool = True) -> Tensor:
    """Token masking: each maskable position is selected with probability ``prob``.

    ``selected[b, t] = (word_ids[b, t] >= 0) and (u[b, t] < prob)``, ``u ~ U(0, 1)``.

    Args:
        word_ids: (B, T) int, the word index of each token; negative for special tokens and padding.
        prob: selection probability ``p``.
        generator: source of randomness (CPU).
        at_least_one: select one position in rows that would otherwise have none (short texts).

    Returns:
        (B, T) bool selection.
    """
    candidates = word_ids >= 0  # (B, T)
    u = torch.rand(word_ids.shape, generator=generator)  # (B, T)
    selected = candidates & (u < prob)
    return _at_least_one(selected, candidates, -u) if at_least_one else selected


def select_words(word_ids: Tensor, prob: float, generator: torch.Generator, *,
                 at_least_one: bool = True) -> Tensor:
    """Whole-word masking: each word is selected with probability ``prob``, with all its tokens.

    ``selected[b, t] = (word_ids[b, t] >= 0) and (u[b, word_ids[b, t]] < prob)``, ``u ~ U(0, 1)``
    drawn once per word.

    Args:
        word_ids: (B, T) int word index of each token (0-based within the row, tokens of one word
            share the index); negative for special tokens and padding.
        prob: word selection probability ``p``.
        generator: source of randomness (CPU).
        at_least_one: select one word in rows that would otherwise have none.

    Returns:
        (B, T) bool selection; every token of a word is selected or none is.
    """
    candidates = word_ids >= 0  # (B, T)
    n_words = int(word_ids.max().clamp_min(0)) + 1
    u = torch.rand((word_ids.shape[0], n_words), generator=generator)  # (B, W)
    per_token = u.gather(1, word_ids.clamp_min(0))  # (B, T): the word's draw at each of its tokens
    selected = candidates & (per_token < prob)
    if at_least_one:
        chosen = _at_least_one(selected, candidates, -per_token)  # one token of the best word ...
        rows = (chosen & ~selected).any(-1)  # (B,)
        if rows.any():  # ... widened to all tokens of that word
            word = torch.where(chosen & ~selected, word_ids, -1).max(-1).values  # (B,)
            selected = selected | (rows[:, None] & (word_ids == word[:, None]) & candidates)
    return selected


def corrupt(input_ids: Tensor, selected: Tensor, *, mask_token_id: int, vocab_size: int,
            generator: torch.Generator, mask_prob: float = 0.8, random_prob: float = 0.1,
            ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Apply the 80/10/10 rule to the selected positions.

    For each selected position draw ``v ~ U(0, 1)``: ``v < mask_prob`` -> mask token;
    ``mask_prob <= v < mask_prob + random_prob`` -> a token drawn uniformly from ``[0, V)``;
    otherwise the token is kept. ``labels = input_ids`` where selected, ``ignore_index`` elsewhere.

    Args:
        input_ids: (B, T) token ids.
        selected: (B, T) bool positions to predict.
        mask_token_id: id of the mask token.
        vocab_size: ``V``, the range random replacements are drawn from.
        generator: source of randomness (CPU).
        mask_prob: share of selected tokens replaced by the mask token.
        random_prob: share of selected tokens replaced by a random token.
        ignore_index: label of unselected positions.

    Returns:
        ``(corrupted_ids, labels)``, both (B, T) int64.
    """
    v = torch.rand(input_ids.shape, generator=generator)  # (B, T)
    random_ids = torch.randint(0, vocab_size, input_ids.shape, generator=generator)  # (B, T)
    to_mask = selected & (v < mask_prob)
    to_random = selected & (v >= mask_prob) & (v < mask_prob + random_prob)
    out = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    out = torch.where(to_random, random_ids.to(input_ids.dtype), out)  # (B, T)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, ignore_index))  # (B, T)
    return out.long(), labels.long()


def mask_batch(input_ids: Tensor, word_ids: Tensor, *, mask_token_id: int, vocab_size: int, seed: int,
               prob: float = 0.15, whole_word: bool = False, mask_prob: float = 0.8,
               random_prob: float = 0.1) -> tuple[Tensor, Tensor]:
    """Select (token or whole-word) and corrupt a padded batch with one seeded generator.

    Args:
        input_ids: (B, T) token ids (padding anywhere with negative ``word_ids``).
        word_ids: (B, T) word index per token, negative for special tokens and padding.
        mask_token_id: id of the mask token.
        vocab_size: range of random replacement tokens.
        seed: generator seed; the result is a function of the inputs and the seed only.
        prob: selection probability (of tokens, or of words with ``whole_word``).
        whole_word: select whole words instead of single tokens.
        mask_prob: share of selected tokens replaced by the mask token.
        random_prob: share of selected tokens replaced by a random token.

    Returns:
        ``(corrupted_ids, labels)``, (B, T) int64; labels are -100 where not selected.
    """
    g = torch.Generator().manual_seed(seed)
    pick = select_words if whole_word else select_tokens
    selected = pick(word_ids, prob, g)  # (B, T)
    return corrupt(input_ids, selected, mask_token_id=mask_token_id, vocab_size=vocab_size, generator=g,
                   mask_prob=mask_prob, random_prob=random_prob)
