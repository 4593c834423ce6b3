"""MLM masking: selection rates, the 80/10/10 rule, whole words, special tokens, seeding."""
from __future__ import annotations

import torch

from lmforge.data.masking import corrupt, mask_batch, seed_of, select_tokens, select_words

MASK, V = 3, 1000


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _tokens_batch(b=200, t=500, specials=True):
    """(B, T) ids in [10, V) (never the mask id) and word ids with -1 at [CLS]/[SEP]-like ends."""
    ids = torch.randint(10, V, (b, t), generator=_gen(123))
    words = torch.arange(t).repeat(b, 1)  # every token its own word
    if specials:
        words[:, 0] = -1
        words[:, -1] = -1
    return ids, words


def test_token_selection_rate_and_special_tokens():
    ids, words = _tokens_batch()
    sel = select_tokens(words, 0.15, _gen())
    assert not sel[:, 0].any() and not sel[:, -1].any()  # special tokens are never selected
    rate = sel[:, 1:-1].float().mean().item()
    assert abs(rate - 0.15) < 0.005, rate  # 99,600 Bernoulli(0.15) draws: sd 0.0011


def test_80_10_10_within_tolerance_on_a_large_sample():
    ids, words = _tokens_batch()
    sel = select_tokens(words, 0.15, _gen(1))
    out, labels = corrupt(ids, sel, mask_token_id=MASK, vocab_size=V, generator=_gen(2))
    n = sel.sum().item()
    assert n > 14000
    masked = (out[sel] == MASK).float().mean().item()
    kept = (out[sel] == ids[sel]).float().mean().item()
    replaced = ((out[sel] != MASK) & (out[sel] != ids[sel])).float().mean().item()
    # sd of a share p over ~15k draws is <= 0.004; random draws hit the original (or the mask) with 1/V
    assert abs(masked - 0.8) < 0.015, masked
    assert abs(kept - 0.1) < 0.012, kept
    assert abs(replaced - 0.1) < 0.012, replaced
    assert torch.equal(out[~sel], ids[~sel])  # nothing else changes
    assert torch.equal(labels[sel], ids[sel]) and (labels[~sel] == -100).all()
    assert out[sel][(out[sel] != MASK) & (out[sel] != ids[sel])].lt(V).all()


def test_corrupt_extremes_are_exact():
    ids = torch.tensor([[5, 6, 7, 8]])
    sel = torch.tensor([[False, True, False, True]])
    out, labels = corrupt(ids, sel, mask_token_id=MASK, vocab_size=V, generator=_gen(), mask_prob=1.0, random_prob=0.0)
    assert out.tolist() == [[5, MASK, 7, MASK]] and labels.tolist() == [[-100, 6, -100, 8]]
    out, labels = corrupt(ids, sel, mask_token_id=MASK, vocab_size=V, generator=_gen(), mask_prob=0.0, random_prob=0.0)
    assert out.tolist() == [[5, 6, 7, 8]] and labels.tolist() == [[-100, 6, -100, 8]]


def _piece_words(b=300, n_words=60, seed=5):
    """Word ids where words have 1-4 sub-tokens, [CLS] first, [SEP] and padding (-1) after the text."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(b):
        sizes = torch.randint(1, 5, (n_words,), generator=g).tolist()
        rows.append([-1] + [w for w, s in enumerate(sizes) for _ in range(s)] + [-1])
    width = max(map(len, rows)) + 3
    return torch.tensor([r + [-1] * (width - len(r)) for r in rows])


def test_whole_word_masking_masks_all_sub_tokens_of_a_word_together():
    words = _piece_words()
    sel = select_words(words, 0.15, _gen(7))
    assert not sel[words < 0].any()
    picked_words, total_words = 0, 0
    for row_w, row_s in zip(words.tolist(), sel.tolist()):
        by_word: dict[int, set[bool]] = {}
        for w, s in zip(row_w, row_s):
            if w >= 0:
                by_word.setdefault(w, set()).add(s)
        assert all(len(v) == 1 for v in by_word.values())  # all or none of each word's tokens
        picked_words += sum(v == {True} for v in by_word.values())
        total_words += len(by_word)
    assert abs(picked_words / total_words - 0.15) < 0.01  # 18,000 words: sd 0.0027
    # token masking, by contrast, splits words
    tok = select_tokens(words, 0.15, _gen(7))
    split = any(len({s for w2, s in zip(rw, rs) if w2 == w}) == 2
                for rw, rs in zip(words.tolist(), tok.tolist()) for w in set(rw) if w >= 0)
    assert split


def test_every_row_with_candidates_gets_at_least_one_selection():
    words = torch.tensor([[-1, 0, -1, -1], [-1, 0, 0, -1], [-1, -1, -1, -1]])  # 1 token, 1 two-piece word, none
    for seed in range(20):
        t = select_tokens(words, 0.01, _gen(seed))
        assert t.tolist()[0] == [False, True, False, False] and t[1].sum() == 1 and not t[2].any()
        w = select_words(words, 0.01, _gen(seed))
        assert w.tolist() == [[False, True, False, False], [False, True, True, False], [False] * 4]
    assert not select_tokens(words, 0.01, _gen(), at_least_one=False).any()


def test_mask_batch_is_a_function_of_the_seed():
    ids, words = _tokens_batch(8, 40)
    a = mask_batch(ids, words, mask_token_id=MASK, vocab_size=V, seed=11)
    b = mask_batch(ids, words, mask_token_id=MASK, vocab_size=V, seed=11)
    c = mask_batch(ids, words, mask_token_id=MASK, vocab_size=V, seed=12)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    ww = mask_batch(ids, words, mask_token_id=MASK, vocab_size=V, seed=11, whole_word=True)
    assert ww[0].shape == ids.shape and (ww[1] != -100).any()


def test_seed_of_is_stable_and_order_sensitive():
    assert seed_of(1, 2, 3) == seed_of(1, 2, 3)
    assert seed_of(1, 2, 3) != seed_of(1, 3, 2)
    assert 0 <= seed_of(42, 7) < 2**63
