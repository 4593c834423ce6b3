"""The reference log-prob cache: keys follow the model, tokenizer, data and how the reference runs;
entries round-trip; a run on another model never reuses a stale entry."""
from __future__ import annotations

import logging
import os
import shutil

import pytest
import torch

from conftest import write_jsonl
from lmforge.tasks import refcache


def _model_folder(path, seed=0, size=3 << 20):
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "model.safetensors").write_bytes(torch.randint(0, 256, (size,), dtype=torch.uint8,
                                                           generator=torch.Generator().manual_seed(seed)).numpy().tobytes())
    return path


def test_model_fingerprint_sees_a_change_anywhere_in_the_weights(tmp_path):
    a = _model_folder(tmp_path / "a")
    same = tmp_path / "same"
    shutil.copytree(a, same)
    assert refcache.model_fingerprint(a) == refcache.model_fingerprint(same)  # content, not path
    for offset in (100 << 10, (3 << 20) - 1):  # between any two sampled slices; the last byte
        changed = tmp_path / f"changed_{offset}"
        shutil.copytree(a, changed)
        data = bytearray((changed / "model.safetensors").read_bytes())
        data[offset] ^= 1
        (changed / "model.safetensors").write_bytes(bytes(data))
        assert refcache.model_fingerprint(changed) != refcache.model_fingerprint(a)
    other_cfg = tmp_path / "cfg"
    shutil.copytree(a, other_cfg)
    (other_cfg / "config.json").write_text('{"model_type": "mistral"}')
    assert refcache.model_fingerprint(other_cfg) != refcache.model_fingerprint(a)


def test_content_digest_is_recomputed_when_the_file_changes(tmp_path):
    a = _model_folder(tmp_path / "a", size=1000)
    before = refcache.model_fingerprint(a)
    w = a / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[10] ^= 1
    w.write_bytes(bytes(data))
    st = w.stat()
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a new mtime even on coarse clocks
    assert refcache.model_fingerprint(a) != before


def test_tokenizer_and_data_fingerprints(tmp_path, tiny_llama_dir):
    from lmforge.models import load_tokenizer

    tok = load_tokenizer(tiny_llama_dir)
    copy = tmp_path / "tok"
    tok.save_pretrained(copy)
    base = refcache.tokenizer_fingerprint(tok, copy)
    assert refcache.tokenizer_fingerprint(load_tokenizer(copy), copy) == base
    tok2 = load_tokenizer(copy)
    tok2.chat_template = tok.chat_template.replace(" : ", ": ")
    changed = tmp_path / "tok2"
    tok2.save_pretrained(changed)
    assert refcache.tokenizer_fingerprint(tok2, changed) != base

    items = [{"a": [1, 2, 3], "b": [-100, 5]}, {"a": [4], "b": [6]}]
    keys = ("a", "b")
    fp = refcache.data_fingerprint(items, keys)
    assert refcache.data_fingerprint([dict(x) for x in items], keys) == fp
    assert refcache.data_fingerprint(items[::-1], keys) != fp  # order matters (entries are per item)
    assert refcache.data_fingerprint([items[0], {"a": [4], "b": [-100]}], keys) != fp  # a target changed
    assert refcache.data_fingerprint([{"a": [1, 2], "b": [3, -100, 5]}, items[1]], keys) != fp  # boundaries
    k = refcache.reference_key("m", "t", fp, quant=False, dtype="torch.float32")
    assert k == refcache.reference_key("m", "t", fp, dtype="torch.float32", quant=False)
    assert k != refcache.reference_key("m", "t", fp, quant=64, dtype="torch.float32")
    assert k != refcache.reference_key("m", "t", fp, quant=False, dtype="torch.bfloat16")
    assert k != refcache.reference_key("m2", "t", fp, quant=False, dtype="torch.float32")


def test_entries_round_trip_and_bad_entries_are_ignored(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    chosen, rejected = torch.tensor([-1.5, -2.0, -3.25]), torch.tensor([-4.0, -5.5, -6.0])
    path = refcache.save_reference("k1", chosen, rejected)
    assert path.parent == tmp_path / "refcache" and not list(path.parent.glob(".tmp-*"))
    got = refcache.load_reference("k1", 3)
    assert torch.equal(got[0], chosen) and torch.equal(got[1], rejected)
    assert refcache.load_reference("k1", 4) is None  # another data size
    assert refcache.load_reference("missing", 3) is None
    refcache.cache_path("k2").write_bytes(b"not safetensors")
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        assert refcache.load_reference("k2", 3) is None
    assert "ignoring unreadable reference cache" in caplog.text


def test_a_run_on_changed_weights_recomputes_the_reference(tmp_path, tiny_llama_dir, monkeypatch):
    from lmforge.config import build_config
    from lmforge.tasks.preference import PreferenceTask
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    changed = tmp_path / "changed"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(3.0)  # one layer differs
    model.save_pretrained(changed)
    for name in os.listdir(tiny_llama_dir):  # the same tokenizer
        if name not in ("model.safetensors", "config.json", "generation_config.json"):
            shutil.copy(tiny_llama_dir / name, changed / name)
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "the plot", "chosen": "good film", "rejected": "bad film"},
                                              {"prompt": "a movie", "chosen": "great", "rejected": "awful"}] * 3)
    computed = []
    original = PreferenceTask.reference_logps
    monkeypatch.setattr(PreferenceTask, "reference_logps",
                        lambda self, batch: computed.append(1) or original(self, batch))

    def run(folder):
        computed.clear()
        task = PreferenceTask(build_config({
            "task": "preference", "model": {"name": str(folder), "precision": "fp32"},
            "data": {"train": str(data), "eval_fraction": 0.0, "max_length": 32},
            "preference": {"precompute_ref": True}, "train": {"progress": False}}))
        return bool(computed), [it["ref_chosen"] for it in task.train_items]

    first_computed, base_refs = run(tiny_llama_dir)
    again_computed, again_refs = run(tiny_llama_dir)
    other_computed, other_refs = run(changed)
    assert first_computed and not again_computed and again_refs == base_refs
    assert other_computed and other_refs != pytest.approx(base_refs, abs=1e-4)
