"""The training engine: accumulation, optimizer groups, schedules, resume, NaN guard, seeds, logging, best."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import sentiment_rows, write_jsonl

from lmforge.cli import main
from lmforge.commands.core import prepare_run_dir
from lmforge.config import build_config, dump_config
from lmforge.data.batching import collate_tokens
from lmforge.device import Placement
from lmforge.models import load_tokenizer
from lmforge.tasks import TASKS
from lmforge.tasks.base import Task
from lmforge.tasks.classify import ClassifyTask
from lmforge.train import checkpoint as ckpt
from lmforge.train import fit
from lmforge.train.distributed import DistEnv
from lmforge.train.engine import backward_window
from lmforge.train.optim import build_optimizer, lr_lambda

CPU = torch.device("cpu")


def make_cfg(tmp_path: Path, model_dir: Path, *, name="run", n_train=40, seed=0, mode="full", **train):
    """A classify config on tiny data (fp32, no progress bar); ``train`` overrides the train section."""
    if not (tmp_path / "train.jsonl").exists():
        write_jsonl(tmp_path / "train.jsonl", sentiment_rows(n_train, seed=11))
        write_jsonl(tmp_path / "eval.jsonl", sentiment_rows(16, seed=12))
    tc = {"batch_size": 8, "lr": 2e-3, "progress": False, "log_every": 1, "max_grad_norm": 1.0} | train
    return build_config({
        "task": "classify", "name": name, "output_dir": str(tmp_path / "runs"), "seed": seed,
        "model": {"name": str(model_dir), "precision": "fp32"},
        "data": {"train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "eval.jsonl")},
        "classify": {"mode": mode}, "train": tc})


def with_train(cfg, **changes):
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=changes)})


def run_fit(cfg, task_cls=ClassifyTask):
    task = task_cls(cfg)
    run_dir = prepare_run_dir(cfg)
    fit(task, cfg, run_dir)
    return task, run_dir


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in ckpt.trainable_state(model).items()}


def assert_same_weights(a: dict, b: dict, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def train_rows(run_dir: Path, split="train") -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


# ---------------------------------------------------------------- accumulation
def _window_grads(task, micro_items: list[list[dict]]):
    task.model.zero_grad(set_to_none=True)
    micro = [task.collate(items) for items in micro_items]
    loss, metrics, units = backward_window(task, micro, DistEnv(), CPU, task.placement)
    grads = {n: p.grad.clone() for n, p in task.model.named_parameters() if p.grad is not None}
    return loss, metrics, units, grads


def _assert_same_grads(a, b, atol=1e-6):
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def test_accumulated_micro_batches_equal_one_big_batch(tmp_path, tiny_bert_dir):
    task = ClassifyTask(make_cfg(tmp_path, tiny_bert_dir))
    task.model.train()
    items = list(task.train_items[:8])
    loss8, m8, units8, g8 = _window_grads(task, [items])
    for split in (4, 3):  # 4 + 4, and unequal 3 + 5
        loss, m, units, g = _window_grads(task, [items[:split], items[split:]])
        assert units == units8 == 8
        assert loss == pytest.approx(loss8, abs=1e-6)
        assert m["accuracy"] == pytest.approx(m8["accuracy"], abs=1e-6)
        _assert_same_grads(g, g8)


class TokenLMTask(Task):
    """Next-token loss averaged over target tokens: a task whose loss units are tokens."""

    name = "token_lm"

    def __init__(self, folder: Path, texts: list[str]):
        from transformers import AutoModelForCausalLM

        self.placement = Placement.resolve("cpu", "fp32")
        self.tok = load_tokenizer(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        self.train_items = [{"input_ids": ids} for ids in self.tok(texts)["input_ids"]]

    def collate(self, items):
        b = collate_tokens(items, self.tok.pad_token_id)                          # (B, T)
        b["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)  # (B, T)
        return b

    def batch_units(self, batch):
        return int((batch["labels"][:, 1:] != -100).sum())

    def loss(self, batch):
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[:, :-1].float()                                             # (B, T-1, V)
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten()), {}


class SampleWeightedLM(TokenLMTask):
    def batch_units(self, batch):
        return int(batch["input_ids"].shape[0])


def test_token_unit_accumulation_with_unequal_micro_batches(tiny_llama_dir):
    texts = [r["text"] for r in sentiment_rows(8, seed=3)]
    task = TokenLMTask(tiny_llama_dir, texts)
    items = list(task.train_items)
    lengths = [len(it["input_ids"]) for it in items]
    assert sum(lengths[:3]) * 5 != sum(lengths[3:]) * 3   # token shares differ from sample shares
    loss8, _, units8, g8 = _window_grads(task, [items])
    loss, _, units, g = _window_grads(task, [items[:3], items[3:]])
    assert units == units8 == sum(n - 1 for n in lengths)
    assert loss == pytest.approx(loss8, abs=1e-6)
    _assert_same_grads(g, g8)
    # weighting micro-batches by samples instead of tokens would be wrong: the check can fail
    task.__class__ = SampleWeightedLM
    _, _, _, g_bad = _window_grads(task, [items[:3], items[3:]])
    assert max((g_bad[k] - g8[k]).abs().max().item() for k in g8) > 1e-4


# ---------------------------------------------------------------- optimizer and schedule
def test_adamw_decays_matrices_only(tiny_bert_dir, tmp_path):
    task = ClassifyTask(make_cfg(tmp_path, tiny_bert_dir, mode="frozen"))
    model = task.model
    for p in model.bert.encoder.layer[1].parameters():
        p.requires_grad_(True)
    opt = build_optimizer(model, lr=0.1, weight_decay=0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = [names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.5 for p in g["params"]]
    plain = [names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(decayed + plain) == sorted(trainable)
    assert "classifier.weight" in decayed and "bert.encoder.layer.1.attention.self.query.weight" in decayed
    assert "classifier.bias" in plain and "bert.encoder.layer.1.output.LayerNorm.weight" in plain
    assert all(n.endswith("bias") or "LayerNorm" in n for n in plain)
    assert not any(n.startswith("bert.encoder.layer.0.") for n in decayed + plain)
    # one step with zero gradients: only decoupled decay moves weights, biases and norms stay put
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    after = dict(model.named_parameters())
    torch.testing.assert_close(after["classifier.weight"].detach(), before["classifier.weight"] * (1 - 0.1 * 0.5))
    for n in plain:
        assert torch.equal(after[n].detach(), before[n]), n


def test_schedule_values_with_warmup():
    lin = lr_lambda("linear", warmup=2, total=10)
    assert [lin(s) for s in range(11)] == pytest.approx(
        [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0])
    cos = lr_lambda("cosine", warmup=2, total=10)
    assert [cos(s) for s in (0, 1, 2, 4, 6, 8, 10)] == pytest.approx(
        [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0])
    const = lr_lambda("constant", warmup=4, total=10)
    assert [const(s) for s in (0, 3, 4, 9)] == pytest.approx([0.25, 1.0, 1.0, 1.0])
    assert lr_lambda("linear", warmup=0, total=4)(0) == 1.0


# ---------------------------------------------------------------- resume
class CrashAt(ClassifyTask):
    """Raises on the Nth loss call: a run killed in the middle of training."""

    crash_at = 7

    def loss(self, batch):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == self.crash_at:
            raise RuntimeError("simulated crash")
        return super().loss(batch)


RESUME = dict(max_steps=10, save_every=3, warmup_ratio=0.2, schedule="cosine", eval_every=4,
              best_metric="loss", greater_is_better=False)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_bert_dir):
    tmp = tmp_path_factory.mktemp("resume")
    task, run_dir = run_fit(make_cfg(tmp, tiny_bert_dir, name="full", **RESUME))
    return tmp, weights(task.model), train_rows(run_dir), json.loads((run_dir / "eval.json").read_text())


def _crash_then_resume(tmp, model_dir, name, between=None):
    cfg = make_cfg(tmp, model_dir, name=name, **RESUME)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_fit(cfg, CrashAt)
    root = cfg.run_dir / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-00000003", "step-00000006"]
    if between is not None:
        between(root)
    task, run_dir = run_fit(with_train(cfg, resume=True))
    return task, run_dir


def _assert_matches(uninterrupted, task, run_dir):
    _, w_ref, rows_ref, eval_ref = uninterrupted
    assert_same_weights(weights(task.model), w_ref)
    rows = train_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 7)) + list(range(7, 11))   # 1-6 before, 7-10 after
    assert rows[-1]["loss"] == pytest.approx(rows_ref[-1]["loss"], abs=1e-6)
    assert [r["lr"] for r in rows] == pytest.approx([r["lr"] for r in rows_ref], abs=1e-12)
    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev["step"] == 10 and ev["best_step"] == eval_ref["best_step"]
    assert ev["loss"] == pytest.approx(eval_ref["loss"], abs=1e-6)


def test_resume_after_a_crash_matches_an_uninterrupted_run(uninterrupted, tiny_bert_dir):
    task, run_dir = _crash_then_resume(uninterrupted[0], tiny_bert_dir, "crashed")
    _assert_matches(uninterrupted, task, run_dir)
    # resuming the finished run (as after a kill between the last checkpoint and eval.json) changes nothing
    (run_dir / "eval.json").unlink()
    again, _ = run_fit(make_cfg(uninterrupted[0], tiny_bert_dir, name="crashed", resume=True, **RESUME))
    assert_same_weights(weights(again.model), uninterrupted[1])
    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev["step"] == 10 and ev["loss"] == pytest.approx(uninterrupted[3]["loss"], abs=1e-6)


def test_lora_run_resumes_exactly(tmp_path, tiny_bert_dir):
    settings = dict(mode="lora", max_steps=6, save_every=2, lr=1e-2, warmup_ratio=0.3)
    ref, _ = run_fit(make_cfg(tmp_path, tiny_bert_dir, name="ref", **settings))
    cfg = make_cfg(tmp_path, tiny_bert_dir, name="cut", **settings)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_fit(cfg, type("CrashAt5", (CrashAt,), {"crash_at": 5}))
    task, _ = run_fit(with_train(cfg, resume=True))
    names = set(weights(task.model))
    assert names and all("lora_" in n or "classifier" in n for n in names)
    assert_same_weights(weights(task.model), weights(ref.model))


class _KilledWhileSaving:
    def state_dict(self):
        raise KeyboardInterrupt("killed while writing the checkpoint")


def test_half_written_checkpoint_is_ignored_and_resume_uses_the_previous(uninterrupted, tiny_bert_dir):
    def kill_a_save(root):
        task = ClassifyTask(make_cfg(uninterrupted[0], tiny_bert_dir, **RESUME))
        with pytest.raises(KeyboardInterrupt):
            ckpt.save_checkpoint(root, 9, task.model, _KilledWhileSaving(), None, {}, keep=2)
        partial = root / ".tmp-step-00000009"
        assert (partial / "trainable.safetensors").is_file() and not (partial / "state.json").exists()
        assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-00000003", "step-00000006"]

    task, run_dir = _crash_then_resume(uninterrupted[0], tiny_bert_dir, "killed-save", kill_a_save)
    _assert_matches(uninterrupted, task, run_dir)
    assert not (run_dir / "checkpoints" / ".tmp-step-00000009").exists()   # cleaned by the next save


# ---------------------------------------------------------------- NaN guard
class BadLossAt5(ClassifyTask):
    value = float("nan")

    def loss(self, batch):
        loss, metrics = super().loss(batch)
        self.calls = getattr(self, "calls", 0) + 1
        return (loss * self.value if self.calls == 5 else loss), metrics


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, tiny_bert_dir, monkeypatch,
                                                                          capsys, value):
    cfg = make_cfg(tmp_path, tiny_bert_dir, max_steps=8, save_every=3)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(dump_config(cfg))
    monkeypatch.setattr(BadLossAt5, "value", value)
    monkeypatch.setitem(TASKS, "classify", BadLossAt5)
    assert main(["train", str(recipe)]) == 1
    out = capsys.readouterr()
    err = out.err.strip().splitlines()
    assert len(err) == 1 and out.out == ""
    assert f"non-finite loss ({value}) at step 5" in err[0]
    root = cfg.run_dir / "checkpoints"
    assert str(root / "step-00000003") in err[0]
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-00000003"]
    assert not (cfg.run_dir / "eval.json").exists()
    task = ClassifyTask(cfg)
    opt = build_optimizer(task.model, 1e-3, 0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    state = ckpt.load_checkpoint(root / "step-00000003", task.model, opt, sched)
    assert state["step"] == 3
    assert all(torch.isfinite(p).all() for p in task.model.parameters())


# ---------------------------------------------------------------- seeds, logging, best
def test_same_seed_same_run_and_another_seed_differs(tmp_path, tiny_bert_dir):
    runs = []
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        task, run_dir = run_fit(make_cfg(tmp_path, tiny_bert_dir, name=name, seed=seed, max_steps=6))
        runs.append((weights(task.model), [r["loss"] for r in train_rows(run_dir)]))
    (wa, la), (wb, lb), (wc, _) = runs
    assert la == lb
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(wa["classifier.weight"], wc["classifier.weight"])


def test_metrics_best_checkpoint_and_pruning(tmp_path, tiny_bert_dir):
    cfg = make_cfg(tmp_path, tiny_bert_dir, max_steps=10, warmup_ratio=0.3, schedule="linear", lr=1e-3,
                   eval_every=2, save_every=2, keep_last=2, best_metric="loss", greater_is_better=False)
    task, run_dir = run_fit(cfg)
    rows = train_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 11))
    f = lr_lambda("linear", warmup=3, total=10)
    assert [r["lr"] for r in rows] == pytest.approx([1e-3 * f(s) for s in range(10)], rel=1e-9)
    for r in rows:
        assert math.isfinite(r["loss"]) and r["samples_per_s"] > 0 and r["tokens_per_s"] > r["samples_per_s"]
        assert 0.0 <= r["accuracy"] <= 1.0
    evals = train_rows(run_dir, "eval")
    assert [r["step"] for r in evals] == [2, 4, 6, 8, 10]
    best = min(evals, key=lambda r: r["loss"])                # first minimum wins ties
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["best_step"] == best["step"] and result["best_loss"] == pytest.approx(best["loss"])
    assert (run_dir / "best" / "model" / "config.json").is_file()
    reloaded = ClassifyTask.from_run(run_dir, which="best")
    assert reloaded.evaluate(task.eval_items)["loss"] == pytest.approx(best["loss"], abs=1e-5)
    kept = {p.name for p in ckpt.list_checkpoints(run_dir / "checkpoints")}
    assert kept == {"step-00000008", "step-00000010", f"step-{best['step']:08d}"}
    assert (run_dir / "tensorboard").is_dir()
