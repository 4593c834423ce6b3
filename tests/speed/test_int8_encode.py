"""precision int8: the per-row int8 kernels (lmforge.cpu_kernels.quant_rows / dequant_rows) against
their torch fallbacks, the int8 linear against fp32, FastBert int8 against transformers' fp32
forward, and the placement, config and CLI around it."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel

from lmforge import cpu_kernels
from lmforge.cpu_kernels import dequant_rows, library, quant_rows
from lmforge.device import Placement
from lmforge.fast_encode import FastBert, _Linear

needs_cc = pytest.mark.skipif(library() is None, reason="no C compiler here: the torch fallback is all there is")


def _both(fn, *args, **kw):
    """``fn`` with the C kernels, then on the torch fallback."""
    c = fn(*[a.clone() for a in args], **kw)
    saved = list(cpu_kernels._LIB)
    cpu_kernels._LIB[:] = [None]
    try:
        t = fn(*[a.clone() for a in args], **kw)
    finally:
        cpu_kernels._LIB[:] = saved
    return c, t


@needs_cc
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (40, 384), (5, 1537)])
def test_quant_rows_c_equals_torch_bit_for_bit(shape):
    torch.manual_seed(shape[1])
    x = torch.randn(shape) * 5
    x[0] = 0  # an all-zero row: scale 0, codes 0
    (qc, sc), (qt, st) = _both(quant_rows, x)
    assert qc.dtype == torch.int8 and sc.dtype == torch.float32
    assert torch.equal(qc, qt) and torch.equal(sc, st)
    assert (qc[0] == 0).all() and sc[0] == 0
    if shape[0] > 1:  # each other row reaches +-127 at its largest |x| and reconstructs to half a step
        assert (qc[1:].abs().amax(1) == 127).all()
        assert ((sc[:, None] * qc - x).abs() <= sc[:, None] / 2 + 1e-6).all()


@needs_cc
@pytest.mark.parametrize("act", ["none", "gelu", "relu"])
def test_dequant_rows_c_matches_torch(act):
    g = torch.Generator().manual_seed(0)
    acc = torch.randint(-40000, 40000, (33, 70), dtype=torch.int32, generator=g)
    sx, sw, b = torch.rand(33, generator=g) * 1e-3, torch.rand(70, generator=g) * 1e-3, torch.randn(70, generator=g)
    yc, yt = _both(dequant_rows, acc, sx, sw, b, act=act)
    torch.testing.assert_close(yc, yt, atol=2e-6, rtol=2e-6)
    ref = torch.addcmul(b, acc.float(), sx[:, None] * sw)
    ref = F.gelu(ref) if act == "gelu" else ref.relu() if act == "relu" else ref
    torch.testing.assert_close(yt, ref)
    a = acc.clone()
    assert dequant_rows(a, sx, sw, b, act).data_ptr() == a.data_ptr()  # written over the accumulator


@pytest.mark.parametrize("act", ["none", "gelu", "relu"])
def test_dequant_quant_rows_equals_quantising_the_dequantised_rows(act):
    """The fused kernel (codes written over the accumulator) against the two-step composition, on
    either implementation; and the FFN built on it equals ``down(up(t))`` bit for bit."""
    from lmforge.cpu_kernels import dequant_quant_rows
    from lmforge.fast_encode import _ffn_int8

    g = torch.Generator().manual_seed(3)
    acc = torch.randint(-40000, 40000, (37, 96), dtype=torch.int32, generator=g)
    sx, sw, b = torch.rand(37, generator=g) * 1e-3, torch.rand(96, generator=g) * 1e-3, torch.randn(96, generator=g)
    (qc, sc), (qt, st) = _both(dequant_quant_rows, acc, sx, sw, b, act=act)
    q2, s2 = quant_rows(dequant_rows(acc.clone(), sx, sw, b, act))
    assert torch.equal(qc, q2) and torch.equal(sc, s2)
    assert (qc.int() - qt.int()).abs().max() <= 1 and torch.allclose(sc, st, rtol=1e-5)  # GELU's erf: C vs torch
    up = _Linear.make(torch.randn(96, 32) * 0.2, torch.randn(96), act, int8=True)
    down = _Linear.make(torch.randn(32, 96) * 0.2, torch.randn(32), int8=True)
    t = torch.randn(50, 32)
    assert torch.equal(_ffn_int8(up, down, t), down(up(t)))


@pytest.mark.parametrize("act", ["none", "gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("rows", [1, 5, 300])
def test_int8_linear_is_close_to_fp32_and_chunks_rows(act, rows, monkeypatch):
    """Per-row x per-output-row int8: ~1-2 % relative error on random data; the row chunks (7 rows)
    and one pass agree exactly."""
    from lmforge import fast_encode

    torch.manual_seed(rows)
    w, b, x = torch.randn(48, 64) * 0.1, torch.randn(48), torch.randn(rows, 64)
    q = _Linear.make(w, b, act, int8=True)
    assert q.weight.dtype == torch.int8 and q.scale.shape == (48,)
    ref = _Linear.make(w, b, act, pack=False)(x)
    got = q(x)
    assert got.dtype == torch.float32 and got.shape == (rows, 48)
    assert (got - ref).norm() / ref.norm() < 0.03
    monkeypatch.setattr(fast_encode, "ROW_CHUNK", 7)
    assert torch.equal(q(x), got)
    wrong = _Linear(q.weight, q.bias, act, False, q.scale * 1.1)  # a wrong scale is caught
    assert (wrong(x) - ref).norm() / ref.norm() > 0.05


def _bert(seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, hidden_act="gelu", type_vocab_size=2)
    return BertModel(cfg, add_pooling_layer=False).eval()


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_fastbert_int8_is_close_to_transformers(attention):
    model = _bert()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (4, 11), generator=g)
    mask = torch.zeros(4, 11, dtype=torch.long)
    for i, n in enumerate([11, 6, 3, 1]):
        mask[i, :n] = 1
    with torch.no_grad():
        ref = model(input_ids=ids * mask, attention_mask=mask).last_hidden_state
        fb = FastBert(model, torch.float32, attention=attention, int8=True)
        out = fb.hidden(ids * mask, mask)
        fp = FastBert(model, torch.float32, attention=attention).hidden(ids * mask, mask)
    keep = mask.bool()
    assert all(l.qkv.weight.dtype == torch.int8 and l.down.weight.dtype == torch.int8 for l in fb.layers)
    cos = F.cosine_similarity(out[keep], ref[keep], dim=-1)
    assert cos.min() > 0.99
    assert not torch.allclose(out[keep], fp[keep], atol=1e-4)  # the int8 path ran, not the fp32 one
    assert out[~keep].abs().max() == 0
    with pytest.raises(ValueError):
        FastBert(model, torch.bfloat16, int8=True)


def test_placement_int8_is_fp32_compute_on_the_cpu():
    p = Placement.resolve("cpu", "int8")
    assert p.int8 and p.dtype == torch.float32 and p.name == "int8" and not p.autocast_enabled
    assert not Placement.resolve("cpu", "fp32").int8


def test_encoder_int8_vectors_and_code_path(tiny_bert_dir, caplog):
    from lmforge.embeddings import SentenceEncoder

    enc = SentenceEncoder.from_pretrained(str(tiny_bert_dir))
    texts = ["the film was good", "a bad plot", "fine acting and a good score", "dull"]
    p8, p32 = Placement.resolve("cpu", "int8"), Placement.resolve("cpu", "fp32")
    v8 = enc.encode(texts, placement=p8)
    v32 = enc.encode(texts, placement=p32)
    cos = (v8 * v32).sum(1) / (np.linalg.norm(v8, axis=1) * np.linalg.norm(v32, axis=1))
    assert cos.min() > 0.99 and not np.allclose(v8, v32, atol=1e-5)
    assert enc.code_path(p8).endswith("-int8") and not enc.code_path(p32).endswith("-int8")
    enc.fast_path = False  # no fast path: int8 cannot apply, one warning, fp32 vectors
    with caplog.at_level("WARNING", logger="lmforge"):
        v = enc.encode(texts, placement=p8)
    assert "int8" in caplog.text
    np.testing.assert_allclose(v, v32, atol=1e-5)


def test_tasks_without_an_int8_path_refuse_it(tmp_path):
    from lmforge.config import load_config
    from lmforge.errors import LmforgeError

    for task, ok in (("sft", False), ("preference", False), ("topics", True), ("classify", True)):
        y = tmp_path / f"{task}.yaml"
        y.write_text(f"task: {task}\nmodel: {{name: minilm, precision: int8}}\ndata: {{train: x.jsonl}}\n")
        if ok:
            assert load_config(y).model.precision == "int8"
        else:
            with pytest.raises(LmforgeError, match="precision int8 is for encoder tasks"):
                load_config(y)


def test_cli_embed_and_index_build_in_int8(tiny_bert_dir, tmp_path, capsys):
    from lmforge.cli import main
    from lmforge.search import SearchIndex

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in
                            enumerate(["the film was good . great acting", "a bad plot . dull", "fine score"])))
    assert main(["embed", str(tiny_bert_dir), "--input", str(docs), "--precision", "int8",
                 "--out", str(tmp_path / "v.npy")]) == 0
    assert np.load(tmp_path / "v.npy").shape[0] == 3
    ix = tmp_path / "ix"
    assert main(["index", "build", "--docs", str(docs), "--model", str(tiny_bert_dir), "--out", str(ix),
                 "--precision", "int8"]) == 0
    index = SearchIndex.load(ix)
    assert index.settings.precision == "int8"
    index.encoder()
    assert index.placement.int8  # queries are encoded the way the chunks were
    capsys.readouterr()
    assert main(["search", str(ix), "good film", "--k", "1"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["rank"] == 1


def test_topics_task_runs_its_encoder_in_int8(tiny_bert_dir, tmp_path):
    """``model.precision: int8`` in a topics recipe: the documents are embedded on the int8 path
    (the placement says so, the embeddings differ from fp32's) and the fit completes."""
    import yaml

    from conftest import write_jsonl
    from lmforge.config import build_config
    from lmforge.tasks import build_task
    from topics._helpers import corpus, recipe

    data = write_jsonl(tmp_path / "docs.jsonl", corpus(12))
    out = {}
    for prec in ("int8", "fp32"):
        rec = recipe(tmp_path, str(tiny_bert_dir), str(data), pictures=False, stability_seeds=0) | {"name": prec}
        rec["model"]["precision"] = prec
        task = build_task(build_config(yaml.safe_load(yaml.safe_dump(rec))))
        assert task.placement.int8 == (prec == "int8")
        (tmp_path / prec).mkdir()
        task.train_direct(tmp_path / prec)
        assert len(task.model.assignments) == 48
        assert task.encoder.code_path(task.placement).endswith("-int8") == (prec == "int8")  # the cache key
        out[prec] = task.embed([r["text"] for r in corpus(3)], cache=False)
    a, b = out["int8"], out["fp32"]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() > 0.99 and not np.allclose(a, b, atol=1e-5)
