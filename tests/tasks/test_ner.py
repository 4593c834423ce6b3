"""NER: hand-checked label alignment, label lists, full/LoRA training with seqeval metrics, reload,
and the CLI (train, eval, predict with entity spans and character offsets)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl, write_yaml

from lmforge.adapters import LoraLinear
from lmforge.cli import main
from lmforge.commands.core import prepare_run_dir
from lmforge.config import build_config
from lmforge.errors import LmforgeError
from lmforge.tasks.ner import NerTask
from lmforge.train import fit

FILLER = ["the", "a", "is", "was", "visited", "met", "in", "and", "with", "today", "said", "."]
FIRST, LAST = ["john", "mary"], ["smith", "jones"]  # john = jo ##hn, jones = jon ##es ...
CITIES = ["paris", "berlin", "york"]                 # "york city" is a two-word LOC
PIECES = ["jo", "##hn", "##son", "ma", "##ry", "sm", "##ith", "jon", "##es", "pa", "##ris", "ber", "##lin",
          "yo", "##rk", "city"]


@pytest.fixture(scope="module")
def wordpiece_bert(tmp_path_factory):
    """A tiny random BERT whose WordPiece tokenizer splits the entity names into 2-3 pieces."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + FILLER + PIECES)}
    tk = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]")
    path = tmp_path_factory.mktemp("wordpiece_bert")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def ner_rows(n, seed):
    """Sentences whose tags follow from the words: PER = first name [+ last name], LOC = city or "york city"."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        tokens, tags = [], []
        for _ in range(rng.randint(3, 8)):
            kind = rng.choice(["O", "O", "PER", "LOC"])
            if kind == "O":
                words = [rng.choice(FILLER)]
            elif kind == "PER":
                words = [rng.choice(FIRST)] + ([rng.choice(LAST)] if rng.random() < 0.5 else [])
            else:
                words = ["york", "city"] if rng.random() < 0.3 else [rng.choice(CITIES)]
            tokens += words
            tags += ["O"] * len(words) if kind == "O" else [f"B-{kind}"] + [f"I-{kind}"] * (len(words) - 1)
        rows.append({"tokens": tokens, "ner_tags": tags})
    return rows


def _cfg(tmp_path, model_dir, mode="full", n_train=200, ner=None, data=None, **train):
    tr, ev = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    if not tr.exists():
        write_jsonl(tr, ner_rows(n_train, seed=1))
        write_jsonl(ev, ner_rows(60, seed=2))
    return build_config({
        "task": "ner", "name": "run", "output_dir": str(tmp_path / "runs"),
        "model": {"name": str(model_dir), "precision": "fp32"},
        "data": {"train": str(tr), "eval": str(ev), "max_length": 48} | (data or {}),
        "ner": {"mode": mode} | (ner or {}),
        "train": {"batch_size": 16, "progress": False, "log_every": 5} | train})


def test_alignment_with_the_word_level_fixture_hand_checked(tmp_path, tiny_bert_dir):
    """The fixture splits punctuation off words: 'w1,' and 'movie!' are two tokens each."""
    write_jsonl(tmp_path / "train.jsonl", [{"tokens": ["the", "w1,", "movie!", "good"],
                                            "ner_tags": ["O", "B-PER", "I-PER", "B-MISC"]}])
    for label_all in (False, True):
        task = NerTask(_cfg(tmp_path, tiny_bert_dir, data={"eval": None, "eval_fraction": 0.0},
                            ner={"label_all_subtokens": label_all}))
        assert task.labels == ["O", "B-MISC", "I-MISC", "B-PER", "I-PER"]
        it = task.train_items[0]
        toks = task.tokenizer.convert_ids_to_tokens(it["input_ids"])
        assert toks == ["[CLS]", "the", "w1", ",", "movie", "!", "good", "[SEP]"]
        second = 4 if label_all else -100  # the sub-tokens ',' and '!' : ignored, or I-PER
        assert it["labels"] == [-100, 0, 3, second, 4, second, 1, -100]
        assert it["first"] == [1, 2, 4, 6] and it["tags"] == ["O", "B-PER", "I-PER", "B-MISC"]


def test_alignment_with_wordpiece_sub_tokens_hand_checked(tmp_path, wordpiece_bert):
    write_jsonl(tmp_path / "train.jsonl", [{"tokens": ["Johnson", "visited", "York", "."],
                                            "ner_tags": ["B-PER", "O", "B-LOC", "O"]}])
    task = NerTask(_cfg(tmp_path, wordpiece_bert, data={"eval": None, "eval_fraction": 0.0},
                        ner={"label_all_subtokens": True}))
    it = task.train_items[0]
    assert task.tokenizer.convert_ids_to_tokens(it["input_ids"]) == \
        ["[CLS]", "jo", "##hn", "##son", "visited", "yo", "##rk", ".", "[SEP]"]
    # labels: O=0 B-LOC=1 I-LOC=2 B-PER=3 I-PER=4
    assert it["labels"] == [-100, 3, 4, 4, 0, 1, 2, 0, -100]


def test_label_list_integer_tags_and_bad_input(tmp_path, tiny_bert_dir):
    write_jsonl(tmp_path / "train.jsonl", [{"words": ["the", "w1"], "y": [0, 1]}, {"words": ["w2"], "y": [2]}])
    names = ["O", "B-PER", "I-PER"]
    task = NerTask(_cfg(tmp_path, tiny_bert_dir, data={"eval": None, "eval_fraction": 0.0, "labels": names,
                                                        "columns": {"tokens": "words", "ner_tags": "y"}}))
    assert task.labels == names and [it["tags"] for it in task.train_items] == [["O", "B-PER"], ["I-PER"]]
    assert task.model.config.id2label == {0: "O", 1: "B-PER", 2: "I-PER"}

    bad = {"length": {"tokens": ["a", "b"], "ner_tags": ["O"]}, "tag": {"tokens": ["a"], "ner_tags": ["PER"]},
           "ints": {"tokens": ["a"], "ner_tags": [1]}, "words": {"tokens": "a b", "ner_tags": ["O"]}}
    for case, rec in bad.items():
        d = tmp_path / case
        write_jsonl(d / "train.jsonl", [{"tokens": ["w1"], "ner_tags": ["B-PER"]}, rec])
        with pytest.raises(LmforgeError, match=r"train.jsonl line 2"):
            NerTask(_cfg(d, tiny_bert_dir, data={"eval": None, "eval_fraction": 0.0}))
    d = tmp_path / "unseen"
    write_jsonl(d / "train.jsonl", [{"tokens": ["w1"], "ner_tags": ["B-PER"]}])
    write_jsonl(d / "eval.jsonl", [{"tokens": ["w1"], "ner_tags": ["B-ORG"]}])
    with pytest.raises(LmforgeError, match="unknown tag 'B-ORG'"):
        NerTask(_cfg(d, tiny_bert_dir))


def test_lora_mode_trains_adapters_and_the_head_only(tmp_path, tiny_bert_dir):
    model = NerTask(_cfg(tmp_path, tiny_bert_dir, "lora")).model
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    assert wrapped == {"query", "key", "value"}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("classifier" in n for n in trainable)
    assert all("lora_" in n or "classifier" in n for n in trainable)


TRAIN = {"full": dict(lr=3e-3, epochs=6), "lora": dict(lr=1e-2, epochs=10)}


@pytest.mark.parametrize("mode", TRAIN)
def test_training_learns_entities_and_reloads(tmp_path, wordpiece_bert, mode):
    cfg = _cfg(tmp_path, wordpiece_bert, mode, **TRAIN[mode])
    task = NerTask(cfg)
    run_dir = prepare_run_dir(cfg)
    fit(task, cfg, run_dir)
    task.save(run_dir)
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["f1"] > 0.9, report
    assert set(report["per_type"]) == {"LOC", "PER"}
    gold_per = sum(t == "B-PER" for it in task.eval_items for t in it["tags"])
    assert report["per_type"]["PER"]["support"] == gold_per
    assert (run_dir / ("adapter/adapter_config.json" if mode == "lora" else "model/config.json")).is_file()
    assert json.loads((run_dir / "labels.json").read_text()) == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    again, before = NerTask.from_run(run_dir).predict_items(task.eval_items), task.predict_items(task.eval_items)
    assert [tags for tags, _ in again] == [tags for tags, _ in before]
    assert [s for _, p in again for s in p] == pytest.approx([s for _, p in before for s in p], abs=1e-5)
    if mode == "lora":
        cfg_json = json.loads((run_dir / "adapter/adapter_config.json").read_text())
        assert cfg_json["task_type"] == "TOKEN_CLS" and "classifier" in cfg_json["modules_to_save"]


def test_cli_train_eval_predict_with_entity_spans(tmp_path, capsys, wordpiece_bert):
    write_jsonl(tmp_path / "train.jsonl", ner_rows(200, seed=1))
    write_jsonl(tmp_path / "test.jsonl", ner_rows(40, seed=3))
    recipe = write_yaml(tmp_path / "r.yaml", {
        "task": "ner", "name": "cli", "output_dir": str(tmp_path / "runs"),
        "model": {"name": str(wordpiece_bert), "precision": "fp32"},
        "data": {"train": str(tmp_path / "train.jsonl"), "eval_fraction": 0.1},
        "ner": {"mode": "full"}, "train": {"epochs": 6, "lr": 3e-3, "batch_size": 16, "progress": False}})
    assert main(["train", str(recipe)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    run_dir = tmp_path / "runs" / "cli"
    assert summary["run_dir"] == str(run_dir) and summary["f1"] > 0.9

    assert main(["eval", str(run_dir), "--data", str(tmp_path / "test.jsonl")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((run_dir / "eval_test.json").read_text())
    assert printed["n_sentences"] == 40 and printed["f1"] > 0.9 and set(printed["per_type"]) == {"LOC", "PER"}

    texts = ["  Mary   Jones visited\tParis today", "the John met a York City"]
    rows = [{"text": texts[0]}, {"text": texts[1]}, {"tokens": ["john", "was", "in", "berlin", "paris"]}]
    write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "preds" / "out.jsonl"
    assert main(["predict", str(run_dir), "--input", str(tmp_path / "in.jsonl"), "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out) == {"predictions": 3, "out": str(out), "checkpoint": "final"}
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["text"] for g in got] == texts + ["john was in berlin paris"]
    spans = [[(e["text"], e["type"], e["start"], e["end"]) for e in g["entities"]] for g in got]
    assert spans == [[("Mary   Jones", "PER", 2, 14), ("Paris", "LOC", 23, 28)],  # one span per entity, not per piece
                     [("John", "PER", 4, 8), ("York City", "LOC", 15, 24)],
                     [("john", "PER", 0, 4), ("berlin", "LOC", 12, 18), ("paris", "LOC", 19, 24)]]
    for g, text in zip(got, texts):
        for e in g["entities"]:
            assert text[e["start"]:e["end"]] == e["text"] and 0.5 < e["score"] <= 1.0
    assert got[0]["tags"] == ["B-PER", "I-PER", "O", "B-LOC", "O"]

    (tmp_path / "bad.jsonl").write_text(json.dumps({"sentence": "x"}) + "\n")
    assert main(["predict", str(run_dir), "--input", str(tmp_path / "bad.jsonl"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs 'text'" in err[0]


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_conll_recipes_train_the_packaged_minilm(mode):
    from lmforge.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "recipes" / f"ner_{mode}_minilm_conll.yaml")
    assert cfg.task == "ner" and cfg.ner.mode == mode and cfg.model.name == "minilm"
    assert cfg.data.train == "../shared/data/conll2003/train.jsonl"
    assert cfg.data.eval == "../shared/data/conll2003/valid.jsonl" and cfg.train.best_metric == "f1"
