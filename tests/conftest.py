"""Shared fixtures: tiny random models built from configs, with real tokenizers built in code."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

# tiny models gain nothing from threads, and parallel test runs on 2 cores thrash with them
torch.set_num_threads(1)


def train_and_save(task, cfg) -> dict:
    """A finished run as `lmforge train` leaves it: config.yaml, the engine's fit, the saved weights.
    Returns the final eval report."""
    from lmforge.config import dump_config
    from lmforge.train import fit

    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "config.yaml").write_text(dump_config(cfg))
    final = fit(task, cfg, cfg.run_dir)
    task.save(cfg.run_dir)
    return final

@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """A task run sets torch's thread count for its own run; the next test starts at the suite's 1
    again (encoder paths differ with the thread count, so a leaked count made tests order-dependent)."""
    n = torch.get_num_threads()
    yield
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)

WORDS = ("good great fine lovely superb nice bad awful poor boring dull terrible movie film plot actor "
         "story scene the a an is was very quite really not and but this that it of to in").split()
EXTRA = [f"w{i}" for i in range(60)]


def build_word_tokenizer(kind: str):
    """A word-level fast tokenizer: BERT-style ([CLS] x [SEP]) or Llama-style (<s> x, </s> eos)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if kind == "bert":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    else:
        specials = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + WORDS + EXTRA + list("?!.,:"))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token=specials[1]))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    if kind == "bert":
        tk.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
        return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]",
                                       cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"), vocab
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>",
                                  bos_token="<s>", eos_token="</s>")
    tok.chat_template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} : {{ m['content'] }} <|im_end|> "
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant : {% endif %}")
    return tok, vocab


def make_tiny_bert(path: Path, seed: int = 0) -> Path:
    from transformers import BertConfig, BertModel

    tok, vocab = build_word_tokenizer("bert")
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, pad_token_id=0)
    torch.manual_seed(seed)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_tiny_llama(path: Path, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok, vocab = build_word_tokenizer("llama")
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=vocab["<pad>"], bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"],
                      tie_word_embeddings=True)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    """Synthetic reviews whose label is decided by positive vs negative words."""
    rng = random.Random(seed)
    pos, neg = WORDS[:6], WORDS[6:12]
    filler = WORDS[12:] + EXTRA[:20]
    rows = []
    for _ in range(n):
        y = rng.random() < 0.5
        words = rng.sample(filler, rng.randint(2, 8)) + rng.sample(pos if y else neg, 2)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": "pos" if y else "neg"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return path


def write_yaml(path: Path, obj: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(obj, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(request, tmp_path_factory, monkeypatch):
    """Unit tests keep lmforge's cache inside the session; integration tests share the user's."""
    if request.node.get_closest_marker("integration") is None:
        monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path_factory.getbasetemp() / "lmforge_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
