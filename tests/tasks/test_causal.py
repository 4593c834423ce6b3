"""Shared causal-LM machinery: chunked loss vs plain cross-entropy, packing, modes, DDP path, I/O."""
from __future__ import annotations

import socket

import pytest
import torch
import torch.nn.functional as F

from conftest import WORDS, write_jsonl
from lmforge.config import build_config
from lmforge.data.chat import IGNORE, pack_items
from lmforge.errors import LmforgeError
from lmforge.tasks.causal import decoder_hidden, output_projection
from lmforge.tasks.sft import SftTask


def sft_rows(n: int, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a = rng.sample(WORDS[:20], rng.randint(2, 9))
        rows.append({"prompt": " ".join(a), "completion": " ".join(reversed(a[: rng.randint(1, len(a))]))})
    return rows


def make_task(tmp_path, model_dir, rows=None, sft: dict | None = None) -> SftTask:
    data = write_jsonl(tmp_path / "sft.jsonl", rows or sft_rows(24))
    cfg = build_config({"task": "sft", "model": {"name": str(model_dir), "precision": "fp32"},
                        "data": {"train": str(data), "eval_fraction": 0.2, "max_length": 64},
                        "sft": {"mode": "full"} | (sft or {}), "train": {"batch_size": 4, "progress": False}})
    return SftTask(cfg)


def test_chunked_loss_equals_plain_cross_entropy(tmp_path, tiny_llama_dir):
    task = make_task(tmp_path, tiny_llama_dir, sft={"chunk_size": 7})
    batch = task.collate(task.train_items[:5])
    assert batch["attention_mask"].min() == 0  # the batch has padding
    loss, _ = task.loss(batch)
    logits = task.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    ref = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE)
    assert abs(loss.item() - ref.item()) < 1e-5
    # gradients agree too
    loss.backward()
    g1 = {n: p.grad.clone() for n, p in task.model.named_parameters()}
    task.model.zero_grad()
    F.cross_entropy(task.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    .flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE).backward()
    for n, p in task.model.named_parameters():
        torch.testing.assert_close(g1[n], p.grad, atol=1e-5, rtol=1e-4)


def test_hidden_states_are_the_lm_head_input(tmp_path, tiny_llama_dir):
    task = make_task(tmp_path, tiny_llama_dir)
    batch = task.collate(task.train_items[:3])
    hidden = task.hidden(batch)  # (B, T, H)
    weight, bias = output_projection(task.model)
    assert bias is None
    logits = task.model(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(hidden @ weight.T, logits, atol=1e-5, rtol=1e-5)


def test_packed_loss_equals_unpacked_loss(tmp_path, tiny_llama_dir):
    task = make_task(tmp_path, tiny_llama_dir)
    items = task.train_items[:8]
    rows = pack_items(items, 128)
    assert max(r["n_samples"] for r in rows) > 1 and len(rows) < len(items)
    unpacked = task.collate(items)
    packed = task.collate(rows)
    lu, _ = task.loss(unpacked)
    lp, _ = task.loss(packed)
    assert task.batch_units(packed) == task.batch_units(unpacked)
    assert abs(float(lu) - float(lp)) < 1e-5
    # the restarting position ids are what isolates the samples: without them the loss differs
    plain = {k: v for k, v in packed.items() if k != "position_ids"}
    assert abs(float(task.loss(plain)[0]) - float(lu)) > 1e-3


def test_modes_build_the_right_trainable_set(tmp_path, tiny_llama_dir):
    from lmforge.adapters.lora import LoraLinear
    from lmforge.quant.nf4 import Linear4bit

    full = make_task(tmp_path, tiny_llama_dir, sft={"mode": "full"}).model
    assert all(p.requires_grad for p in full.parameters())
    lora = make_task(tmp_path, tiny_llama_dir, sft={"mode": "lora"}).model
    names = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    wrapped = {n.rsplit(".", 1)[-1] for n, m in lora.named_modules() if isinstance(m, LoraLinear)}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    q = make_task(tmp_path, tiny_llama_dir, sft={"mode": "qlora"}).model
    bases = [m.base for m in q.modules() if isinstance(m, LoraLinear)]
    assert bases and all(isinstance(b, Linear4bit) for b in bases)
    assert isinstance(q.lm_head, torch.nn.Linear) and not isinstance(q.lm_head, Linear4bit)
    assert all(".lora_" in n for n, p in q.named_parameters() if p.requires_grad)


def test_lora_on_lm_head_is_refused(tmp_path, tiny_llama_dir):
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows(10))
    cfg = build_config({"task": "sft", "model": {"name": str(tiny_llama_dir), "precision": "fp32"},
                        "data": {"train": str(data), "max_length": 64}, "lora": {"target_modules": ["lm_head"]},
                        "train": {"progress": False}})
    task = SftTask(cfg)
    with pytest.raises(LmforgeError, match="LM head"):
        task.loss(task.collate(task.train_items[:2]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_under_a_process_group_the_task_keeps_its_plain_model(tmp_path, tiny_llama_dir):
    """The engine owns distribution (it sums gradients itself): the task's forward and loss run on
    the plain model, and the engine's all-reduce over one rank leaves every gradient as it was."""
    import torch.distributed as dist

    from lmforge.train.distributed import DistEnv, all_reduce_grads

    task = make_task(tmp_path, tiny_llama_dir, sft={"mode": "lora"})
    batch = task.collate(task.train_items[:3])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        loss, _ = task.loss(batch)
        loss.backward()
        params = [p for p in task.model.parameters() if p.requires_grad]
        before = [p.grad.clone() for p in params]
        all_reduce_grads(params, DistEnv(rank=0, world=2))  # the all-reduce path, on a one-rank group
        assert before and all(torch.equal(a, p.grad) for a, p in zip(before, params))
        assert not hasattr(task.model, "module")
    finally:
        dist.destroy_process_group()


def test_lora_run_saves_a_peft_adapter_that_peft_loads(tmp_path, tiny_llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    task = make_task(tmp_path, tiny_llama_dir, sft={"mode": "lora"})
    with torch.no_grad():
        for n, p in task.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    task.save(tmp_path / "run")
    cfg = (tmp_path / "run" / "adapter" / "adapter_config.json").read_text()
    assert '"task_type": "CAUSAL_LM"' in cfg
    ids = task.collate(task.train_items[:2])["input_ids"]
    ours = task.model(input_ids=ids).logits
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    theirs = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter")(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["lora", "qlora", "full"])
def test_from_run_restores_the_trained_model(tmp_path, tiny_llama_dir, mode):
    from lmforge.config import dump_config

    task = make_task(tmp_path, tiny_llama_dir, sft={"mode": mode})
    with torch.no_grad():
        for n, p in task.model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(task.cfg))
    task.save(run)
    back = SftTask.from_run(run)
    batch = task.collate(task.eval_items)
    task.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(back.loss(batch)[0], task.loss(batch)[0], atol=1e-5, rtol=1e-5)
    assert not back.model.training


def test_frozen_weights_are_stored_in_the_autocast_dtype(tmp_path, tiny_llama_dir):
    rows = sft_rows(24)
    fp32 = make_task(tmp_path, tiny_llama_dir, rows, sft={"mode": "lora"})
    data = write_jsonl(tmp_path / "b.jsonl", rows)
    cfg = build_config({"task": "sft", "model": {"name": str(tiny_llama_dir), "precision": "bf16"},
                        "data": {"train": str(data), "eval_fraction": 0.2, "max_length": 64},
                        "sft": {"mode": "lora"}, "train": {"progress": False}})
    bf16 = SftTask(cfg)
    frozen = [p for p in bf16.model.parameters() if not p.requires_grad]
    trained = [p for p in bf16.model.parameters() if p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert bf16.model.model.rotary_emb.inv_freq.dtype == torch.float32  # buffers untouched
    batch = fp32.collate(fp32.train_items[:4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = fp32.loss(batch)[0]
    with bf16.placement.autocast():
        got = bf16.loss(batch)[0]
    got.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trained)
    assert abs(got.item() - want.item()) < 2e-2 * abs(want.item())


def test_packing_support_check(tmp_path, tiny_llama_dir):
    from lmforge.device import Placement
    from lmforge.tasks.causal import packing_supported

    task = make_task(tmp_path, tiny_llama_dir)
    assert packing_supported(task.model, Placement.resolve("cpu", "fp32"))

    class Leaky(torch.nn.Module):
        """The same model fed without position ids: packed samples see each other."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def get_input_embeddings(self):
            return self.inner.get_input_embeddings()

        def get_decoder(self):
            inner = self.inner.get_decoder()
            return lambda **kw: inner(**(kw | {"position_ids": None}))

    assert not packing_supported(Leaky(task.model), Placement.resolve("cpu", "fp32"))


def test_attention_kernel_switches_with_row_width(tmp_path, tiny_llama_dir):
    from lmforge.device import EAGER_MAX_LENGTH

    data = write_jsonl(tmp_path / "k.jsonl", sft_rows(24))
    cfg = build_config({"task": "sft", "model": {"name": str(tiny_llama_dir), "precision": "bf16"},
                        "data": {"train": str(data), "eval_fraction": 0.0, "max_length": 512},
                        "sft": {"mode": "lora"}, "train": {"progress": False}})
    task = SftTask(cfg)
    assert task.model.config._attn_implementation == "sdpa"  # built for 512-token rows
    batch = task.collate(task.train_items[:4])  # short rows
    with task.placement.autocast():
        trained = task.loss(batch)[0]
        assert task.model.config._attn_implementation == "eager"
        task.use_attention(task.model, EAGER_MAX_LENGTH + 1)
        assert task.model.config._attn_implementation == "sdpa"
        again = task.loss(batch)[0]  # both kernels give the same loss
    assert abs(float(trained) - float(again)) < 2e-2 * abs(float(again))


def test_packed_pairs_use_rows_as_wide_as_the_longest_sequence_for_eager(tmp_path, tiny_llama_dir):
    from lmforge.tasks.preference import PreferenceTask

    rows = [{"prompt": " ".join(WORDS[i:i + 4]), "chosen": " ".join(WORDS[i + 4:i + 9]),
             "rejected": " ".join(WORDS[i + 9:i + 11])} for i in range(12)]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    spec = {"task": "preference", "data": {"train": str(data), "eval_fraction": 0.0, "max_length": 200},
            "preference": {"mode": "lora", "template": "raw"}, "train": {"progress": False}}
    widths = {}
    for prec in ("bf16", "fp32"):
        task = PreferenceTask(build_config(spec | {"model": {"name": str(tiny_llama_dir), "precision": prec}}))
        batch = task.collate(task.train_items[:4])
        longest = max(len(s["input_ids"]) for it in task.train_items[:4] for s in
                      [{"input_ids": it["prompt_ids"] + it[k]} for k in ("chosen_ids", "rejected_ids")])
        widths[prec] = (batch["input_ids"].shape[1], longest)
        assert int(batch["token_mask"].sum()) == sum(len(it["prompt_ids"]) * 2 + len(it["chosen_ids"])
                                                     + len(it["rejected_ids"]) for it in task.train_items[:4])
    assert widths["bf16"][0] == widths["bf16"][1]  # eager: rows as wide as the longest sequence
    assert widths["bf16"][1] < widths["fp32"][0] <= 200  # SDPA: rows of up to max_length, shared
