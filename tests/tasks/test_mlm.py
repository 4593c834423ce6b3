"""Masked-LM continued pretraining: the added head is tied, the masked-only loss equals transformers',
masking is seeded, training lowers held-out perplexity, the saved folder starts a classify run."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import EXTRA, write_jsonl
from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

from lmforge.commands.core import prepare_run_dir
from lmforge.config import build_config
from lmforge.errors import LmforgeError
from lmforge.tasks.classify import ClassifyTask
from lmforge.tasks.mlm import MlmConfig, MlmTask
from lmforge.train import fit


def counting_rows(n, seed):
    """Runs of consecutive vocabulary words ("w3 w4 w5 ..."): a masked word follows from its neighbours."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        s = rng.randint(0, 40)
        rows.append({"text": " ".join(EXTRA[s:s + rng.randint(6, 12)])})
    return rows


def _cfg(tmp_path, model_dir, mlm=None, name="run", **train):
    if not (tmp_path / "train.jsonl").exists():
        write_jsonl(tmp_path / "train.jsonl", counting_rows(300, 1))
        write_jsonl(tmp_path / "eval.jsonl", counting_rows(80, 2))
    return build_config({
        "task": "mlm", "name": name, "output_dir": str(tmp_path / "runs"),
        "model": {"name": str(model_dir), "precision": "fp32"},
        "data": {"train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "eval.jsonl"), "max_length": 32},
        "mlm": mlm or {}, "train": {"batch_size": 16, "progress": False, "log_every": 5} | train})


def test_a_missing_head_is_added_tied_and_seeded(tmp_path, tiny_bert_dir):
    a, b = MlmTask(_cfg(tmp_path, tiny_bert_dir)), MlmTask(_cfg(tmp_path, tiny_bert_dir))
    hf = a.hf
    assert hf.get_output_embeddings().weight is hf.get_input_embeddings().weight
    base = AutoModel.from_pretrained(tiny_bert_dir)
    torch.testing.assert_close(hf.get_input_embeddings().weight, base.get_input_embeddings().weight)
    for (n, p), (_, q) in zip(a.hf.named_parameters(), b.hf.named_parameters()):
        assert torch.equal(p, q), n
    assert a.model.head == "cls"


def test_masked_only_loss_equals_transformers_full_loss(tmp_path, tiny_bert_dir):
    task = MlmTask(_cfg(tmp_path, tiny_bert_dir, {"probability": 0.3}))
    batch = task.collate(task.train_items[:8])
    nll, correct = task.model(**batch)
    n = (batch["labels"] != -100).sum()
    ref = task.hf(**batch)  # transformers' own MLM loss over the (B, T, V) logits
    torch.testing.assert_close(nll / n, ref.loss, rtol=1e-5, atol=1e-6)
    sel = batch["labels"] != -100
    assert int(correct) == int((ref.logits[sel].argmax(-1) == batch["labels"][sel]).sum())


def test_masking_is_seeded_and_skips_special_tokens(tmp_path, tiny_bert_dir):
    task = MlmTask(_cfg(tmp_path, tiny_bert_dir))
    items = task.train_items[:16]
    one, two = task.collate(items), task.collate(items)
    assert torch.equal(one["input_ids"], two["input_ids"]) and torch.equal(one["labels"], two["labels"])
    other = task.collate(task.train_items[16:32])
    assert not torch.equal(one["labels"][:, :5], other["labels"][:, :5])
    specials = torch.isin(one["input_ids"], torch.tensor([2, 3])) & (one["labels"] == -100)
    assert specials.sum() == 2 * len(items)  # [CLS] and [SEP] of every row are kept and never scored
    assert ((one["labels"] != -100) & (one["attention_mask"] == 0)).sum() == 0  # padding never masked
    # held-out masks are fixed: the same positions in every task built from the config
    again = MlmTask(_cfg(tmp_path, tiny_bert_dir))
    assert [it["labels"] for it in task.eval_items] == [it["labels"] for it in again.eval_items]


def _digit_piece_bert(path):
    """A tiny BERT whose WordPiece vocabulary spells "w12" as w ##1 ##2: every word has 2-3 sub-tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "w"] + [f"##{d}" for d in range(10)]
    vocab = {t: i for i, t in enumerate(pieces)}
    tk = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##"))
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(path)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(path)
    return path


def test_whole_word_masking_in_collate(tmp_path):
    model_dir = _digit_piece_bert(tmp_path / "model")
    task = MlmTask(_cfg(tmp_path, model_dir, {"whole_word": True}))
    assert task.tokenizer.convert_ids_to_tokens(task.tokenizer("w12 w3")["input_ids"]) == \
        ["[CLS]", "w", "##1", "##2", "w", "##3", "[SEP]"]
    batch = task.collate(task.train_items[:64])
    sel = (batch["labels"] != -100).tolist()
    partial = whole = 0
    for it, row in zip(task.train_items[:64], sel):
        for w in set(it["word_ids"]) - {-1}:
            picked = {row[t] for t, x in enumerate(it["word_ids"]) if x == w}
            partial += len(picked) == 2
            whole += picked == {True}
    assert whole > 20 and partial == 0
    tok = MlmTask(_cfg(tmp_path, model_dir)).collate(task.train_items[:64])  # token masking splits words
    tok_sel = (tok["labels"] != -100).tolist()
    assert any(len({r[t] for t, x in enumerate(it["word_ids"]) if x == w}) == 2
               for it, r in zip(task.train_items[:64], tok_sel) for w in set(it["word_ids"]) - {-1})


def test_training_lowers_held_out_perplexity_and_saves_a_plain_folder(tmp_path, tiny_bert_dir):
    cfg = _cfg(tmp_path, tiny_bert_dir, {"probability": 0.3}, lr=1e-2, epochs=8)
    task = MlmTask(cfg)
    run_dir = prepare_run_dir(cfg)
    fit(task, cfg, run_dir)
    task.save(run_dir)
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["perplexity_before"] > 50                     # a random head over ~110 tokens
    assert report["perplexity_after"] < report["perplexity_before"] / 5, report
    assert report["perplexity_after"] == report["perplexity"] and report["tokens"] == report["before"]["tokens"]

    folder = run_dir / "model"
    mlm = AutoModelForMaskedLM.from_pretrained(folder)
    assert mlm.get_output_embeddings().weight is mlm.get_input_embeddings().weight
    reloaded = MlmTask.from_run(run_dir)
    assert reloaded.evaluate(task.eval_items)["perplexity"] == pytest.approx(report["perplexity_after"], rel=1e-4)

    # the adapted encoder starts a classify run by path; BERT's pooler is carried over from the source
    clf = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    src = AutoModel.from_pretrained(tiny_bert_dir)
    torch.testing.assert_close(clf.bert.pooler.dense.weight, src.pooler.dense.weight)
    torch.testing.assert_close(clf.bert.encoder.layer[1].output.dense.weight,
                               task.hf.bert.encoder.layer[1].output.dense.weight)
    rows = [{"text": r["text"], "label": i % 2} for i, r in enumerate(counting_rows(40, 3))]
    write_jsonl(tmp_path / "cls.jsonl", rows)
    ccfg = build_config({"task": "classify", "name": "clf", "output_dir": str(tmp_path / "runs"),
                         "model": {"name": str(folder), "precision": "fp32"},
                         "data": {"train": str(tmp_path / "cls.jsonl"), "eval_fraction": 0.25},
                         "classify": {"mode": "full"}, "train": {"max_steps": 2, "batch_size": 8, "progress": False}})
    ctask = ClassifyTask(ccfg)
    torch.testing.assert_close(ctask.model.bert.embeddings.word_embeddings.weight,
                               task.hf.get_input_embeddings().weight)
    assert "accuracy" in fit(ctask, ccfg, prepare_run_dir(ccfg))


def test_bad_settings_are_one_line_errors(tmp_path, tiny_bert_dir, tiny_llama_dir):
    with pytest.raises(LmforgeError, match="mask_prob \\+ random_prob"):
        _cfg(tmp_path, tiny_bert_dir, {"mask_prob": 0.8, "random_prob": 0.3})
    with pytest.raises(LmforgeError, match="no mask token"):
        MlmTask(_cfg(tmp_path, tiny_llama_dir))


class _CrashAt5(MlmTask):
    def loss(self, batch):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 5:
            raise RuntimeError("simulated crash")
        return super().loss(batch)


def test_a_resumed_run_sees_the_same_masks(tmp_path, tiny_bert_dir):
    """Masks are a function of the run seed and the batch: a crashed and resumed run ends with the same weights."""
    settings = dict(max_steps=6, save_every=2, lr=1e-2, eval_every=None)

    def run(name, cls=MlmTask, resume=False):
        cfg = _cfg(tmp_path, tiny_bert_dir, {"eval_before": False}, name=name, resume=resume, **settings)
        task = cls(cfg)
        fit(task, cfg, prepare_run_dir(cfg))
        return task

    ref = run("ref")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run("cut", _CrashAt5)
    resumed = run("cut", resume=True)
    for (n, p), (_, q) in zip(ref.hf.named_parameters(), resumed.hf.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)


def test_defaults_and_the_domain_recipes():
    """BERT's 15% with 80/10/10 by default; the yelp recipe's adapted encoder starts the classify recipe by path."""
    from lmforge.config import load_config

    mc = MlmConfig()
    assert (mc.probability, mc.mask_prob, mc.random_prob, mc.whole_word) == (0.15, 0.8, 0.1, False)
    recipes = Path(__file__).resolve().parents[2] / "recipes"
    mlm, clf = load_config(recipes / "mlm_minilm_yelp.yaml"), load_config(recipes / "classify_from_mlm_yelp.yaml")
    assert mlm.task == "mlm" and mlm.model.name == "minilm" and mlm.data.eval_fraction > 0
    assert clf.task == "classify" and Path(clf.model.name) == mlm.run_dir / "model"
