"""The reward of an ``rl`` run, from ``rl.reward``: a classify run, a reward run, or a dotted
Python function name, or a list of them averaged (:mod:`lmforge.rl.rewards` does the scoring)."""
from __future__ import annotations

from pathlib import Path

from ..config import preview, remote_code_flag
from ..errors import LmforgeError
from ..rl.rewards import ClassifierReward, FunctionReward, MeanReward, PairReward, import_function


def build_reward(opts, device):
    """A ``reward(prompts, responses) -> list[float]`` for ``opts`` (the ``rl:`` section), its model on ``device``."""
    if isinstance(opts.reward, (list, tuple)):  # an ensemble: each entry as a single rl.reward
        return MeanReward([_one_reward(ref, opts, device) for ref in opts.reward])
    return _one_reward(opts.reward, opts, device)


def _one_reward(ref: str, opts, device):
    if Path(ref).is_dir():
        return _run_reward(Path(ref), opts, device)
    if "/" in ref or "\\" in ref or Path(ref).suffix in (".yaml", ".json", ".safetensors"):
        raise LmforgeError(f"rl.reward: {preview(ref)}: run folder not found")
    if remote_code_flag() is False:  # a saved run's config being loaded: its code is not imported
        raise LmforgeError(f"rl.reward: the Python function {preview(ref)} named by a saved run is not imported; "
                           "pass --trust-remote-code if you trust it")
    return FunctionReward(import_function(ref), ref)


def _run_reward(path: Path, opts, device):
    from . import load_task
    from ..rundir import open_run

    task_name = open_run(path).config.task
    if task_name not in ("classify", "reward"):
        raise LmforgeError(f"rl.reward: {path} is a {task_name} run; a reward is a classify or reward run")
    if task_name == "reward" and opts.reward_label is not None:
        raise LmforgeError(f"rl.reward_label: {path} is a reward run (one scalar); reward_label is for classify runs")
    task = load_task(path)
    if not hasattr(task, "outputs_to_probs") and task_name == "classify":
        raise LmforgeError(f"rl.reward: {path} is a classify run of method {task.cfg.classify.method}; "
                           "a reward needs a fine-tuned classifier (a model with logits)")
    task.model.to(device).eval()
    task.model.requires_grad_(False)
    if task_name == "classify":
        return ClassifierReward(task.model, task.tokenizer, task.labels, opts.reward_label, score=opts.reward_score,
                                to_probs=task.outputs_to_probs, max_length=task.cfg.data.max_length,
                                autocast=task.placement.autocast, source=str(path),
                                logits_are_labels=task.cfg.classify.ordinal == "none")

    def encode(prompt, response):
        p_ids, c_ids, _ = task.fmt.encode_completion(prompt, response)
        return (p_ids[-task.max_prompt:] + c_ids)[: task.cfg.data.max_length]

    return PairReward(encode, task._score_sequences, source=str(path))
