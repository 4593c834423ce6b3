"""An embeddings-only server: a sentence-transformers folder (normalising) as the model."""
from __future__ import annotations

import math

import pytest

openai = pytest.importorskip("openai", reason="the openai client is a dev extra")
pytest.importorskip("fastapi", reason="serve needs the serve extra (fastapi, uvicorn)")

from ._server import Server  # noqa: E402


@pytest.fixture(scope="module")
def st_server(tmp_path_factory):
    from lmforge.embeddings.encoder import SentenceEncoder
    from tests.conftest import make_tiny_bert

    root = tmp_path_factory.mktemp("serve_st")
    enc = SentenceEncoder.from_pretrained(make_tiny_bert(root / "bert"), pooling="cls", normalize=True)
    enc.save(root / "st-bert")
    srv = Server([str(root / "st-bert"), "--precision", "fp32"], cwd=root)
    yield srv, enc
    srv.stop()


def test_encoder_only_server(st_server):
    srv, enc = st_server
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", timeout=60, max_retries=0)
    assert [m.id for m in c.models.list().data] == ["st-bert"]
    texts = ["good movie", "the plot was dull"]
    got = c.embeddings.create(model="st-bert", input=texts)
    want = enc.encode(texts, precision="fp32")
    for d, w in zip(got.data, want):
        assert math.isclose(sum(x * x for x in d.embedding), 1.0, rel_tol=1e-5)  # the folder normalises
        assert max(abs(a - b) for a, b in zip(d.embedding, w)) < 1e-5
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        c.chat.completions.create(model="st-bert", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        c.embeddings.create(model="st-bert", input="x", dimensions=3)
    with pytest.raises(openai.BadRequestError, match="input"):
        c.embeddings.create(model="st-bert", input=[])
