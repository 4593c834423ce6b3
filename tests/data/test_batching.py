"""Length-grouped batches and padding collation."""
from __future__ import annotations

import random

import pytest
import torch

from lmforge.data.batching import attention_mask, collate_tokens, length_grouped_batches, pad_sequences, random_batches


def _lengths(n=500, seed=0):
    rng = random.Random(seed)
    return [rng.randint(3, 120) for _ in range(n)]


def _padding(batches, lengths):
    """Padding tokens a batching adds: sum over batches of (B * longest - sum of lengths)."""
    return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)


@pytest.mark.parametrize("n,bs,group", [(500, 16, 8), (37, 4, 3), (5, 8, 64)])
def test_grouped_batches_cover_every_index_once(n, bs, group):
    lengths = _lengths(n)
    batches = length_grouped_batches(lengths, bs, seed=1, epoch=0, group=group)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(n))
    assert all(1 <= len(b) <= bs for b in batches)
    assert sum(len(b) < bs for b in batches) <= -(-n // (bs * group))  # one short batch per mega-batch at most


def test_grouped_batches_pad_less_than_random_batches():
    lengths = _lengths()
    grouped = length_grouped_batches(lengths, 16, seed=0, epoch=0, group=8)
    plain = random_batches(len(lengths), 16, seed=0, epoch=0)
    assert sorted(i for b in plain for i in b) == list(range(len(lengths)))
    assert _padding(grouped, lengths) < 0.5 * _padding(plain, lengths)


def test_batches_are_seeded_by_seed_and_epoch():
    lengths = _lengths(200)
    a = length_grouped_batches(lengths, 8, seed=5, epoch=2)
    assert a == length_grouped_batches(lengths, 8, seed=5, epoch=2)
    assert a != length_grouped_batches(lengths, 8, seed=5, epoch=3)
    assert a != length_grouped_batches(lengths, 8, seed=6, epoch=2)
    assert random_batches(50, 8, seed=1, epoch=0) != random_batches(50, 8, seed=1, epoch=1)


def test_no_shuffle_sorts_longest_first_and_drop_last():
    lengths = [3, 9, 1, 7, 5]
    assert length_grouped_batches(lengths, 2, seed=0, epoch=0, shuffle=False) == [[1, 3], [4, 0], [2]]
    dropped = length_grouped_batches(lengths, 2, seed=0, epoch=0, group=64, drop_last=True)
    assert sorted(len(b) for b in dropped) == [2, 2]
    assert len(random_batches(5, 2, seed=0, epoch=0, drop_last=True)) == 2


def test_pad_sequences_right_and_left():
    right = pad_sequences([[1, 2, 3], [4], []], pad_value=0)
    assert right.tolist() == [[1, 2, 3], [4, 0, 0], [0, 0, 0]] and right.dtype == torch.long
    left = pad_sequences([[1, 2, 3], [4]], pad_value=9, left=True)
    assert left.tolist() == [[1, 2, 3], [9, 9, 4]]


def test_collate_tokens_masks_and_pads_per_key():
    items = [{"input_ids": [5, 6, 7], "labels": [1, 2, 3], "token_type_ids": [0, 1, 1]},
             {"input_ids": [8], "labels": [4], "token_type_ids": [0]}]
    b = collate_tokens(items, pad_id=0, keys=("input_ids", "labels", "token_type_ids"))
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[1, 2, 3], [4, -100, -100]]          # ignored by cross-entropy
    assert b["token_type_ids"].tolist() == [[0, 1, 1], [0, 0, 0]]
    lb = collate_tokens(items, pad_id=2, left=True)
    assert set(lb) == {"input_ids", "attention_mask"}
    assert lb["input_ids"].tolist() == [[5, 6, 7], [2, 2, 8]]
    assert lb["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


# ---- gradient accumulation: one global batch per step, then micro-batches ---------------------------------------
def _steps(micro: list[list[int]], accum: int) -> list[list[int]]:
    return [sorted(i for m in micro[k:k + accum] for i in m) for k in range(0, len(micro), accum)]


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("n", [64, 61])
def test_batch_4_times_2_trains_on_the_samples_of_batch_8_in_every_epoch(grouped, n):
    import random as _random

    from lmforge.data.batching import step_batches

    lengths = [_random.Random(i).randint(3, 40) for i in range(n)] if grouped else None
    for epoch in range(4):
        a = step_batches(lengths, n, 4, grad_accum=2, seed=5, epoch=epoch)
        b = step_batches(lengths, n, 8, grad_accum=1, seed=5, epoch=epoch)
        c = step_batches(lengths, n, 2, grad_accum=4, seed=5, epoch=epoch)
        assert _steps(a, 2) == _steps(b, 1) == _steps(c, 4)       # the same samples in every step
        assert sorted(i for m in a for i in m) == list(range(n))  # each sample once per epoch
        assert all(len(m) == 4 for m in a[:-1]) and all(len(m) == 2 for m in c[:-1])
        if grouped:                                               # micro-batches of similar lengths
            for m in a:
                assert [lengths[i] for i in m] == sorted((lengths[i] for i in m), reverse=True)
    assert _steps(step_batches(lengths, n, 4, grad_accum=2, seed=5, epoch=0), 2) != _steps(
        step_batches(lengths, n, 4, grad_accum=2, seed=5, epoch=1), 2)  # epochs reshuffle


def test_world_and_drop_last_keep_whole_micro_batches():
    from lmforge.data.batching import step_batches

    micro = step_batches(list(range(50)), 50, 3, grad_accum=2, world=2, seed=0, epoch=0, drop_last=True)
    assert all(len(m) == 6 for m in micro) and len(micro) == 8     # 50 -> 48 used, 4 steps of 2 micro
    one = step_batches(list(range(50)), 50, 12, grad_accum=1, world=1, seed=0, epoch=0)
    assert _steps(micro, 2) == [s for s in _steps(one, 1) if len(s) == 12]


def test_old_and_new_agree_without_accumulation():
    from lmforge.data.batching import length_grouped_batches, random_batches, step_batches

    lengths = [(i * 37) % 23 for i in range(72)]  # whole batches: the same order as before
    assert step_batches(lengths, 72, 8, seed=3, epoch=2) == length_grouped_batches(lengths, 8, seed=3, epoch=2)
    assert step_batches(None, 70, 8, seed=3, epoch=2) == random_batches(70, 8, seed=3, epoch=2)


def _pad_by_rows(seqs, pad, left):  # the per-row reference
    width = max(len(s) for s in seqs)
    rows = [[pad] * (width - len(s)) + list(s) if left else list(s) + [pad] * (width - len(s)) for s in seqs]
    return torch.tensor(rows, dtype=torch.long)


@pytest.mark.parametrize("left", [False, True])
def test_pad_sequences_and_attention_mask_equal_the_per_row_padding(left):
    rng = random.Random(3)
    for trial in range(20):
        seqs = [[rng.randrange(50_000) for _ in range(rng.randint(0, 40))] for _ in range(rng.randint(1, 9))]
        if trial % 5 == 0:
            seqs.append([])
        want = _pad_by_rows(seqs, 7, left)
        assert torch.equal(pad_sequences(seqs, 7, left=left), want)
        assert torch.equal(pad_sequences([tuple(s) for s in seqs], 7, left=left), want)
        assert torch.equal(pad_sequences([torch.tensor(s, dtype=torch.long) for s in seqs], 7, left=left), want)
        mask = attention_mask(seqs, left=left)
        assert mask.dtype == torch.long and torch.equal(mask, _pad_by_rows([[1] * len(s) for s in seqs], 0, left))
