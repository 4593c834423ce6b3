"""Multi-dataset embed training (embed.datasets) and WiSE-FT (embed.wise_ft): the mixing plan and
the interpolation by hand, the mixed loss against the pure losses, a tiny end-to-end run, and bad
input as one line with exit 2."""
from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from conftest import write_jsonl, write_yaml
from lmforge.cli import main
from lmforge.config import build_config
from lmforge.data.mixing import companion_rows, mixing_rate
from lmforge.embeddings.encoder import SentenceEncoder
from lmforge.errors import LmforgeError
from lmforge.losses.contrastive import cosent_loss, multiple_negatives_ranking_loss
from lmforge.merge import interpolate_weights
from lmforge.tasks.embed import EmbedTask

from embeddings._helpers import scored_rows, triplet_rows


# ---- the mixing plan ------------------------------------------------------------------------------
def test_rate_one_gives_each_item_one_row_and_cycles_a_smaller_set():
    plan = companion_rows(5, 2, rate=1, seed=3)
    assert [len(p) for p in plan] == [1, 1, 1, 1, 1]
    flat = [p[0] for p in plan]
    # rows 0 and 1 once each in every pass of two (exhaustion -> a fresh shuffled pass)
    assert sorted(flat[0:2]) == [0, 1] and sorted(flat[2:4]) == [0, 1] and flat[4] in (0, 1)


def test_fractional_rate_spreads_rows_evenly():
    # c_i = floor((i+1)/2) - floor(i/2): items 1 and 3 carry one row each
    assert [len(p) for p in companion_rows(5, 10, rate=0.5, seed=0)] == [0, 1, 0, 1, 0]
    # rate 2.5: floor(2.5)=2, floor(5)-2=3, floor(7.5)-5=2, 10-7=3
    assert [len(p) for p in companion_rows(4, 100, rate=2.5, seed=0)] == [2, 3, 2, 3]


def test_proportional_uses_every_row_once_per_epoch():
    assert mixing_rate("proportional", 4, 6) == Fraction(3, 2)
    plan = companion_rows(4, 6, rate="proportional", seed=1)
    assert [len(p) for p in plan] == [1, 2, 1, 2]  # floor(1.5), floor(3)-1, floor(4.5)-3, 6-4
    assert sorted(r for p in plan for r in p) == [0, 1, 2, 3, 4, 5]


def test_plan_is_seeded_and_follows_the_seeded_permutation():
    assert companion_rows(50, 50, seed=7) == companion_rows(50, 50, seed=7)
    assert companion_rows(50, 50, seed=7) != companion_rows(50, 50, seed=8)
    import random

    order = list(range(6))
    random.Random(7).shuffle(order)
    assert [p[0] for p in companion_rows(6, 6, seed=7)] == order  # one pass, in the shuffled order
    assert companion_rows(3, 0) == [[], [], []]


# ---- WiSE-FT interpolation ------------------------------------------------------------------------
def test_interpolation_by_hand():
    base = {"w": torch.tensor([1.0, 3.0]), "h": torch.tensor([[2.0]], dtype=torch.bfloat16),
            "pos": torch.tensor([0, 1])}
    tuned = {"w": torch.tensor([3.0, -1.0]), "h": torch.tensor([[4.0]], dtype=torch.bfloat16),
             "pos": torch.tensor([5, 6])}
    out = interpolate_weights(base, tuned, 0.25)
    assert out["w"].tolist() == [1.5, 2.0]  # 0.75*1 + 0.25*3, 0.75*3 + 0.25*(-1)
    assert out["h"].dtype == torch.bfloat16 and out["h"].item() == 2.5
    assert out["pos"].tolist() == [5, 6]  # integer tensors: the tuned model's
    assert interpolate_weights(base, tuned, 1.0)["w"].tolist() == [3.0, -1.0]
    assert interpolate_weights(base, tuned, 0.0)["w"].tolist() == [1.0, 3.0]
    with pytest.raises(LmforgeError, match="alpha must lie in"):
        interpolate_weights(base, tuned, 1.5)
    with pytest.raises(LmforgeError, match="differ in tensor 'x'"):
        interpolate_weights(base, tuned | {"x": torch.zeros(1)}, 0.5)
    with pytest.raises(LmforgeError, match=r"'w' has shape \(2,\) vs \(3,\)"):
        interpolate_weights(base, tuned | {"w": torch.zeros(3)}, 0.5)


# ---- the task ---------------------------------------------------------------------------------
def _cfg(tmp_path, model_dir, sets, *, embed=None, n=8, **train):
    write_jsonl(tmp_path / "sts.jsonl", scored_rows(n))
    return build_config({
        "task": "embed", "name": "multi", "output_dir": str(tmp_path / "runs"), "seed": 0,
        "model": {"name": str(model_dir), "precision": "fp32"},
        "data": {"train": str(tmp_path / "sts.jsonl"), "eval_fraction": 0.0, "max_length": 32},
        "embed": {"loss": "cosent", "eval_before": False, "datasets": sets} | (embed or {}),
        "train": {"batch_size": 4, "max_steps": 2, "progress": False, "lr": 1e-3} | train})


def test_mixed_loss_is_the_primary_loss_plus_weighted_set_losses(tmp_path, tiny_bert_dir):
    write_jsonl(tmp_path / "nli.jsonl", [{"a": r["anchor"], "p": r["positive"], "n": r["negative"]}
                                        for r in triplet_rows(6, seed=5)])
    sets = [{"name": "nli", "train": str(tmp_path / "nli.jsonl"), "loss": "mnr", "weight": 0.5, "scale": 10.0,
             "columns": {"anchor": "a", "positive": "p", "negative": "n"}}]
    task = EmbedTask(_cfg(tmp_path, tiny_bert_dir, sets))
    items = task.train_items[:4]
    assert all(len(it["extra"]) == 1 and len(it["extra"][0]) == 1 for it in task.train_items)  # rate 1
    batch = task.collate(items)
    sub = batch["extra"][0]
    assert len(sub["columns"]) == 3 and sub["columns"][0]["input_ids"].shape[0] == 4  # anchor, pos, neg
    task.model.eval()  # no dropout: the two computations see the same embeddings
    loss, metrics = task.loss(batch)
    enc = task.encoder
    u, v = enc(**batch["columns"][0]), enc(**batch["columns"][1])
    a, p, n = (enc(**c) for c in sub["columns"])
    want = cosent_loss(u, v, batch["scores"], scale=20.0) + 0.5 * multiple_negatives_ranking_loss(
        a, p, n[:, None, :], scale=10.0)
    assert loss.item() == pytest.approx(want.item(), abs=1e-5)
    assert "nli_loss" in metrics and "nli_in_batch_accuracy" in metrics


def test_tiny_end_to_end_multi_dataset_run_with_wise_ft(tmp_path, tiny_bert_dir):
    write_jsonl(tmp_path / "pairs.jsonl", triplet_rows(10, seed=2))
    write_jsonl(tmp_path / "more_sts.jsonl", scored_rows(6, seed=9, top=1.0))
    sets = [{"name": "nli", "train": str(tmp_path / "pairs.jsonl"), "loss": "mnr", "rate": "proportional"},
            {"name": "sts2", "train": str(tmp_path / "more_sts.jsonl"), "loss": "cosine", "score_range": [0, 1],
             "rate": 0.5}]
    recipe = write_yaml(tmp_path / "r.yaml", _cfg(tmp_path, tiny_bert_dir, sets, embed={"wise_ft": 0.5},
                                                  lr=5e-2, max_steps=3).model_dump(mode="json"))
    assert main(["train", str(recipe)]) == 0
    run = tmp_path / "runs" / "multi"
    rows = [r for r in (run / "metrics.jsonl").read_text().splitlines() if '"split": "train"' in r]
    assert rows and "nli_loss" in rows[-1]
    start = SentenceEncoder.from_pretrained(str(tiny_bert_dir)).state_dict()
    saved = SentenceEncoder.from_pretrained(str(run / "model")).state_dict()
    # the trained weights are not saved; the interpolation must differ from the start
    moved = [k for k in start if start[k].is_floating_point() and not torch.equal(start[k], saved[k])]
    assert moved
    # theta_saved = 0.5 start + 0.5 trained  <=>  trained = 2 saved - start: re-derive and re-save
    task = EmbedTask(build_config(dict(_cfg(tmp_path, tiny_bert_dir, sets, embed={"wise_ft": 0.5})
                                       .model_dump(mode="json"))))
    trained = {k: 2 * saved[k] - start[k] if start[k].is_floating_point() else saved[k] for k in start}
    task.encoder.load_state_dict(trained)
    again = task.trained_encoder().state_dict()
    for k in moved:
        assert torch.allclose(again[k], saved[k], atol=1e-6), k


@pytest.mark.parametrize("bad,match", [
    ({"loss": "softmax_nli"}, r"embed\.datasets\.0\.loss"),
    ({"train": "EMPTY"}, r"embed\.datasets\[0\] \(x\): .*empty\.jsonl has no rows"),
    ({"rate": -1.0}, r"embed\.datasets\[0\] \(x\)\.rate: must be > 0"),
    ({"columns": {"anchor": "nope"}}, r"embed\.datasets\[0\] \(x\): .*missing column 'nope'"),
])
def test_bad_dataset_is_one_line_exit_2(tmp_path, tiny_bert_dir, capsys, bad, match):
    (tmp_path / "empty.jsonl").write_text("")
    write_jsonl(tmp_path / "pairs.jsonl", triplet_rows(4))
    ds = {"name": "x", "train": str(tmp_path / "pairs.jsonl"), "loss": "mnr"} | bad
    if ds["train"] == "EMPTY":
        ds["train"] = str(tmp_path / "empty.jsonl")
    cfg = _cfg(tmp_path, tiny_bert_dir, []).model_dump(mode="json")
    cfg["embed"]["datasets"] = [ds]
    recipe = write_yaml(tmp_path / "bad.yaml", cfg)
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and __import__("re").search(match, err[0]), err
    assert not (tmp_path / "runs" / "multi").exists()


def test_evaluation_during_training_sees_the_trained_weights(tmp_path, tiny_bert_dir):
    """The engine's evaluations (best step, eval.json) must score the weights after the optimizer steps,
    not embeddings of the weights they first saw (a cache keyed on tensor versions misses fused AdamW's
    in-place updates, which do not bump them)."""
    from lmforge.commands.core import prepare_run_dir
    from lmforge.train import fit

    write_jsonl(tmp_path / "dev.jsonl", scored_rows(8, seed=3))
    cfg = _cfg(tmp_path, tiny_bert_dir, [], embed={"sts_eval": str(tmp_path / "dev.jsonl"), "eval_before": True},
               lr=5e-2, max_steps=3)
    task = EmbedTask(cfg)
    prepare_run_dir(cfg)
    metrics = fit(task, cfg, cfg.run_dir)
    fresh = SentenceEncoder.from_pretrained(str(tiny_bert_dir))
    fresh.load_state_dict(task.encoder.state_dict())  # the trained weights, in a new module
    from lmforge.embeddings.evaluators import run_evaluators, sts_from_file

    want = run_evaluators([sts_from_file(str(tmp_path / "dev.jsonl"))], fresh, placement=task.placement)
    assert metrics["sts_spearman"] != metrics["before"]["sts_spearman"]
    assert metrics["sts_spearman"] == pytest.approx(want["sts_spearman"], abs=1e-6)
