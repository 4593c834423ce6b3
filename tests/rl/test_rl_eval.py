"""A finished rl run evaluates again through ``lmforge eval RUN --data FILE``: its reward is
rebuilt from the config, but a Python function named in a saved run's config.yaml is imported
only when the command line passes --trust-remote-code (a run folder is data, not code)."""
from __future__ import annotations

import json

import pytest

from conftest import write_jsonl
from lmforge.api import train_config
from lmforge.cli import main

from .rl_helpers import make_rl_llama, prompt_rows, rl_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rl_eval")
    return train_config(rl_config(tmp, make_rl_llama(tmp / "llama"), train={"max_steps": 2})), tmp


def test_eval_of_a_saved_rl_run(run, capsys):
    r, tmp = run
    data = write_jsonl(tmp / "held.jsonl", prompt_rows(6, seed=9))
    assert main(["eval", str(r.run_dir), "--data", str(data), "--out", str(tmp / "e1.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'toy_rewards.fraction_positive' named by a saved run is not imported" in err[0]
    assert not (tmp / "e1.json").exists()
    assert main(["eval", str(r.run_dir), "--data", str(data), "--out", str(tmp / "e2.json"),
                 "--trust-remote-code"]) == 0
    rep = json.loads((tmp / "e2.json").read_text())
    assert rep["n"] == 6 and {"reward_mean", "kl", "response_length", "distinct_2"} <= rep.keys()
    again = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert again["reward_mean"] == pytest.approx(rep["reward_mean"])
