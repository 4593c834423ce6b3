"""Rewards: a classify run (probability or logit of a named label, re-tokenised with the
classifier's tokenizer), a reward run (Bradley-Terry scalar of prompt + response), a dotted
Python function; and the bad inputs of section 7 through the real CLI (one line, exit 2,
nothing half-written)."""
from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_bert, sentiment_rows, write_jsonl, write_yaml
from lmforge.api import train_config
from lmforge.cli import main
from lmforge.config import build_config, dump_config
from lmforge.errors import LmforgeError
from lmforge.tasks import load_task
from lmforge.tasks.rl_reward import build_reward

from .rl_helpers import make_rl_llama, rl_config

TEXTS = ["good great movie", "awful boring plot", "", "the film was not bad"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl_rewards")
    bert, llama = make_tiny_bert(root / "bert"), make_rl_llama(root / "llama")
    clf = train_config(build_config({
        "task": "classify", "name": "clf", "output_dir": str(root / "runs"),
        "model": {"name": str(bert), "precision": "fp32", "device": "cpu"},
        "data": {"train": str(write_jsonl(root / "clf.jsonl", sentiment_rows(32, 1))), "eval_fraction": 0.25,
                 "max_length": 32},
        "train": {"max_steps": 2, "batch_size": 8, "progress": False}})).run_dir
    pairs = [{"prompt": r["text"], "chosen": "good great", "rejected": "awful bad"} for r in sentiment_rows(16, 2)]
    rm = train_config(build_config({
        "task": "reward", "name": "rm", "output_dir": str(root / "runs"),
        "model": {"name": str(llama), "precision": "fp32", "device": "cpu"},
        "data": {"train": str(write_jsonl(root / "rm.jsonl", pairs)), "eval_fraction": 0.25, "max_length": 32},
        "reward": {"template": "raw"}, "train": {"max_steps": 2, "batch_size": 4, "progress": False}})).run_dir
    return root, llama, clf, rm


def _opts(reward, **kw):
    reward = [str(r) for r in reward] if isinstance(reward, list) else str(reward)
    return type("Opts", (), {"reward": reward, "reward_label": None, "reward_score": "prob"} | kw)()


@pytest.mark.parametrize("score", ["prob", "logit"])
def test_classify_run_reward_is_the_label_score(world, score):
    _, _, clf, _ = world
    fn = build_reward(_opts(clf, reward_label="pos", reward_score=score), torch.device("cpu"))
    got = fn(["p"] * len(TEXTS), TEXTS)
    task = load_task(clf)
    k = task.labels.index("pos")
    for text, value in zip(TEXTS, got):
        enc = task.tokenizer(text if text.strip() else " ", return_tensors="pt")
        with torch.no_grad():
            logits = task.model(**enc).logits[0]  # one text alone: no padding involved
        want = logits[k] if score == "logit" else torch.softmax(logits, -1)[k]
        assert value == pytest.approx(float(want), abs=1e-5)
    probs = [r["probs"]["pos"] for r in task.predict(TEXTS[:2])]
    if score == "prob":
        assert got[:2] == pytest.approx(probs, abs=1e-5)


def test_reward_run_scores_prompt_and_response(world):
    _, _, _, rm = world
    fn = build_reward(_opts(rm), torch.device("cpu"))
    got = fn(["good movie", "bad plot"], ["great", "awful boring"])
    task = load_task(rm)
    for prompt, resp, value in zip(["good movie", "bad plot"], ["great", "awful boring"], got):
        p, c, _ = task.fmt.encode_completion(prompt, resp)
        with torch.no_grad():
            want = task.model(input_ids=torch.tensor([p + c])).logits[0, 0]
        assert value == pytest.approx(float(want), abs=1e-5)


def test_function_reward_errors_name_the_prompt(world):
    fn = build_reward(_opts("toy_rewards.explode"), torch.device("cpu"))
    with pytest.raises(LmforgeError, match=r"toy_rewards.explode \(response to prompt 'the film'\) raised "
                                           r"ValueError: the scorer is broken"):
        fn(["the film"], ["x"])
    fn = build_reward(_opts("toy_rewards.not_a_number"), torch.device("cpu"))
    with pytest.raises(LmforgeError, match="returned 'high', not a finite number"):
        fn(["the film"], ["x"])
    assert build_reward(_opts("toy_rewards.fraction_positive"), "cpu")(["a", "b"], ["good film", ""]) == [0.5, 0.0]


# ---- section 7: bad input through the CLI ---------------------------------------------------------
def _cli(tmp_path, capsys, cfg_dict):
    recipe = write_yaml(tmp_path / "r.yaml", cfg_dict)
    code = main(["train", str(recipe)])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def _raw(tmp_path, world, **rl):
    cfg = rl_config(tmp_path, world[1], rl=rl, train={"max_steps": 2})
    import yaml

    return yaml.safe_load(dump_config(cfg))


@pytest.mark.parametrize("case, change, needle", [
    ("unknown label", lambda w: {"reward": str(w[2]), "reward_label": "toxic"},
     "rl.reward_label: 'toxic' is not a label of"),
    ("no label", lambda w: {"reward": str(w[2])}, "rl.reward_label: required for a classify run"),
    ("label on a reward run", lambda w: {"reward": str(w[3]), "reward_label": "pos"}, "is a reward run (one scalar)"),
    ("not importable", lambda w: {"reward": "no_such_module.score"}, "rl.reward: cannot import 'no_such_module'"),
    ("no such function", lambda w: {"reward": "toy_rewards.nope"}, "has no function 'nope'"),
    ("not a name", lambda w: {"reward": "score(text)"}, "neither a run folder nor a dotted function name"),
    ("missing folder", lambda w: {"reward": "runs/missing/"}, "run folder not found"),
    ("max_new_tokens 0", lambda w: {"max_new_tokens": 0}, "rl.max_new_tokens: Input should be greater than 0"),
    ("max_new_tokens -3", lambda w: {"max_new_tokens": -3}, "rl.max_new_tokens: Input should be greater than 0"),
    ("k=1 for grpo", lambda w: {"generations": 1}, "rl.generations: grpo needs at least 2"),
    ("rollout not whole minibatches", lambda w: {"rollout_prompts": 3}, "is not a whole number of minibatches"),
])
def test_bad_input_is_one_line_exit_2_and_no_run(tmp_path, world, capsys, case, change, needle):
    raw = _raw(tmp_path, world)
    raw["rl"] |= change(world)
    code, err = _cli(tmp_path, capsys, raw)
    assert code == 2 and len(err) == 1 and needle in err[0], (case, err)
    assert not (tmp_path / "runs" / "run").exists()


def test_empty_prompt_set(tmp_path, world, capsys):
    raw = _raw(tmp_path, world)
    (tmp_path / "empty.jsonl").write_text("")
    raw["data"]["train"] = str(tmp_path / "empty.jsonl")
    code, err = _cli(tmp_path, capsys, raw)
    assert code == 2 and len(err) == 1 and "empty.jsonl" in err[0], err
    (tmp_path / "blank.jsonl").write_text('{"prompt": "good film"}\n{"prompt": "  "}\n')
    raw["data"]["train"] = str(tmp_path / "blank.jsonl")
    code, err = _cli(tmp_path, capsys, raw)
    assert code == 2 and len(err) == 1 and "blank.jsonl line 2: empty prompt" in err[0], err
    assert not (tmp_path / "runs" / "run").exists()


def test_raising_reward_names_the_prompt_and_leaves_nothing_half_written(tmp_path, world, capsys):
    raw = _raw(tmp_path, world, reward="toy_rewards.explode")
    code, err = _cli(tmp_path, capsys, raw)
    assert code == 2 and len(err) == 1, err
    assert "rl.reward toy_rewards.explode (response to prompt '" in err[0] and "raised ValueError" in err[0]
    run = tmp_path / "runs" / "run"
    assert not (run / "adapter").exists() and not (run / "eval.json").exists()
    assert not [p for p in run.rglob("*") if ".tmp" in p.name or (p.is_file() and p.stat().st_size == 0)]


def test_a_list_of_rewards_is_their_mean(world):
    """rl.reward as a list: each response's reward is the mean of the members' (a reward-model ensemble)."""
    _, _, _, rm = world
    prompts, responses = ["good movie", "bad plot", "x"], ["great good", "awful boring", "good"]
    alone = build_reward(_opts(rm), torch.device("cpu"))(prompts, responses)
    words = [sum(w == "good" for w in r.split()) / len(r.split()) for r in responses]
    both = build_reward(_opts([rm, "toy_rewards.fraction_good"]), torch.device("cpu"))
    assert both(prompts, responses) == pytest.approx([(a + b) / 2 for a, b in zip(alone, words)], abs=1e-6)
    with pytest.raises(LmforgeError, match="an empty list"):
        build_reward(_opts([]), torch.device("cpu"))
    # a run trains with it end to end, and its saved config keeps the list
    cfg = rl_config(world[0], world[1], name="ens", rl={"reward": [str(rm), "toy_rewards.fraction_good"]},
                    train={"max_steps": 2})
    run = train_config(cfg)
    assert load_task(run.run_dir).cfg.rl.reward == [str(rm), "toy_rewards.fraction_good"]
    assert "reward_mean" in (run.run_dir / "metrics.jsonl").read_text()
