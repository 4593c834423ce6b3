"""The inspection tools on the packaged models and real text (integration: slower, needs the packages
and ../shared/data)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
WIKI = ROOT.parent / "shared" / "data" / "wiki1m_subset" / "train.txt"
ANALOGIES = ROOT / "recipes" / "inspect" / "analogies.tsv"


def _require(path: Path):
    if not path.is_file():
        pytest.skip(f"{path} is not here")


def test_smollm2_logit_lens_last_layer_is_the_model():
    from lmforge.inspection import lens, report

    torch.set_num_threads(1)
    model, tok, kind = report.load("smollm2")
    assert kind == "causal"
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    res = lens.logit_lens(model, tok, ids, k=3)
    assert len(res.top) == model.config.num_hidden_layers + 1 and res.max_diff < 1e-4
    assert res.top[-1][-1][0]["token"] == " Paris"
    assert res.final_rank[0][-1] > 100  # the embedding layer does not know it yet


def test_tokenizer_cost_minilm_vs_smollm2_on_wiki():
    from lmforge.inspection import tokens
    from lmforge.models import load_tokenizer, resolve_model

    _require(WIKI)
    texts = [t for t in WIKI.read_text(encoding="utf-8").splitlines()[:300] if t.strip()]
    mini = tokens.cost(load_tokenizer(resolve_model("minilm")), texts, "minilm")
    smol = tokens.cost(load_tokenizer(resolve_model("smollm2")), texts, "smollm2")
    assert smol.round_trip_failures == 0 and smol.unknown == 0  # byte-level BPE loses nothing
    assert mini.round_trip_failures > len(texts) // 2  # uncased WordPiece lower-cases and re-spaces
    assert 1.0 < mini.tokens_per_word < 2.0 and 1.0 < smol.tokens_per_word < 2.0


def test_minilm_input_embeddings_solve_most_hand_made_analogies():
    from lmforge.inspection import wordvec

    wv = wordvec.from_model("minilm")
    rows = wordvec.read_analogies(ANALOGIES)
    res = wordvec.evaluate_analogies(wv, rows)
    assert res["skipped"] == 0 and res["accuracy"] >= 0.7
    assert wv.analogy("man", "woman", "king", topn=1)[0][0] == "queen"
