"""The rl task accepts an encoder-decoder policy (tiny random T5): the prompt is the encoder's
input, the response the decoder's; rollout log-probs equal transformers' own teacher-forced ones;
PPO (value head on the decoder states) and GRPO train and save a PEFT SEQ_2_SEQ_LM adapter."""
from __future__ import annotations

import json

import pytest
import torch

from lmforge.api import train_config
from lmforge.tasks.rl import RlTask
from seq2seq._tiny import make_folder

from .rl_helpers import rl_config


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return make_folder("t5", tmp_path_factory.mktemp("rl_t5"))


@pytest.mark.parametrize("kind", ["t5", "bart"])  # bart: learned positions, so prompt alignment matters
def test_rollout_logps_equal_transformers(tmp_path, tmp_path_factory, t5_dir, kind):
    folder = t5_dir if kind == "t5" else make_folder("bart", tmp_path_factory.mktemp("rl_bart"))
    task = RlTask(rl_config(tmp_path, folder, rl={"algorithm": "ppo"}))
    assert task.seq2seq and task.peft_task_type == "SEQ_2_SEQ_LM"
    with torch.no_grad():
        for n, p in task.model.named_parameters():  # LoRA on, so policy and reference differ
            if "lora_B" in n:
                p.normal_(0, 0.5)
        task.model.eval()
        out = task.rollout(0)
    items = out["items"]
    assert len(items) == 8 and all(it["response_ids"] for it in items)
    policy = task.policy
    for it in items[:3]:
        src = torch.tensor([it["prompt_ids"]])
        labels = torch.tensor([it["response_ids"]])
        with torch.no_grad():
            logits = policy(input_ids=src, attention_mask=torch.ones_like(src), labels=labels).logits
        want = torch.log_softmax(logits.float(), -1)[0].gather(-1, labels[0, :, None]).squeeze(-1)
        torch.testing.assert_close(it["old_logps"], want, atol=1e-5, rtol=0)
        assert (it["old_logps"] - it["ref_logps"]).abs().max() > 1e-3  # the reference has the adapters off
        assert it["values"].shape == it["old_logps"].shape
    assert {"reward_mean", "kl", "value_explained_variance"} <= out["metrics"].keys()


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_seq2seq_policy_trains_and_saves_a_seq2seq_adapter(tmp_path, t5_dir, algorithm):
    rl = {"algorithm": algorithm} | ({"generations": 2, "rollout_prompts": 4} if algorithm == "grpo" else {})
    run = train_config(rl_config(tmp_path, t5_dir, name=algorithm, rl=rl, train={"max_steps": 4}))
    rows = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert len(train) >= 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    assert train[-1]["grad_norm"] > 0
    cfg = json.loads((run.run_dir / "adapter" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_2_SEQ_LM"
    assert (run.run_dir / "adapter" / "value_head.safetensors").is_file() == (algorithm == "ppo")
    reloaded = RlTask.from_run(run.run_dir)
    a = {k: v for k, v in run.task.model.state_dict().items() if "lora_" in k or "value_head" in k}
    b = reloaded.model.state_dict()
    assert a and all(torch.equal(v.float(), b[k].float()) for k, v in a.items())
