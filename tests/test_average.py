"""Weight averaging of LoRA runs (``lmforge average``): the averaged adapter's update is exactly the
weighted mean of the members' updates, equals peft's ``add_weighted_adapter(combination_type="cat")``,
averages task heads element-wise, writes a run that loads like any other, and refuses unlike members."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lmforge.adapters import load_adapter
from lmforge.adapters.average import average_lora
from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.merge import average, merge
from test_merge import _base, _logits, _make_run


def _merged_weights(source, out) -> dict[str, torch.Tensor]:
    merge(str(source), out)
    return load_file(str(out / "model.safetensors"))


def test_averaged_update_is_the_weighted_mean_of_the_members(tiny_llama_dir, tmp_path):
    runs = [_make_run(tiny_llama_dir, tmp_path / f"run{i}", four_bit=False, seed=i) for i in range(3)]
    w = [0.5, 0.3, 0.2]
    report = average([str(r) for r in runs], tmp_path / "avg", weights=[5, 3, 2])  # normalised
    assert report["weights"] == pytest.approx(w) and report["r"] == 12 and report["lora_alpha"] == 24.0
    merged = _merged_weights(tmp_path / "avg", tmp_path / "m-avg")
    members = [_merged_weights(r, tmp_path / f"m{i}") for i, r in enumerate(runs)]
    changed = 0
    for key, got in merged.items():
        want = sum(wi * m[key] for wi, m in zip(w, members))  # W0 + sum_i w_i s B_i A_i
        assert torch.allclose(got, want, atol=1e-5), key
        changed += int(not torch.equal(members[0][key], members[1][key]))
    assert changed > 0  # the members differ, so the mean is a new model
    avg = _base(tiny_llama_dir)
    load_adapter(avg, tmp_path / "avg" / "adapter")
    first = _base(tiny_llama_dir)
    load_adapter(first, runs[0] / "adapter")
    assert (_logits(avg) - _logits(first)).abs().max() > 1e-3


def test_average_equals_peft_add_weighted_adapter_cat(tiny_llama_dir, tmp_path):
    peft = pytest.importorskip("peft")
    runs = [_make_run(tiny_llama_dir, tmp_path / f"run{i}", four_bit=False, seed=10 + i) for i in range(2)]
    average([str(r) for r in runs], tmp_path / "avg", weights=[0.25, 0.75])
    ours = _base(tiny_llama_dir)
    load_adapter(ours, tmp_path / "avg" / "adapter")
    ref = peft.PeftModel.from_pretrained(_base(tiny_llama_dir), str(runs[0] / "adapter"), adapter_name="a")
    ref.load_adapter(str(runs[1] / "adapter"), adapter_name="b")
    ref.add_weighted_adapter(["a", "b"], [0.25, 0.75], "avg", combination_type="cat")
    ref.set_adapter("avg")
    assert (_logits(ours) - _logits(ref)).abs().max() < 1e-5
    # and peft reads the averaged folder itself
    back = peft.PeftModel.from_pretrained(_base(tiny_llama_dir), str(tmp_path / "avg" / "adapter"))
    assert (_logits(back) - _logits(ours)).abs().max() < 1e-5


def _cfg(**kw):
    return {"peft_type": "LORA", "task_type": "SEQ_CLS", "r": 2, "lora_alpha": 4.0, "use_rslora": False,
            "target_modules": ["q_proj"], "modules_to_save": ["score"]} | kw


def _tensors(seed):
    g = torch.Generator().manual_seed(seed)
    return {"m.q_proj.lora_A.weight": torch.randn(2, 3, generator=g),
            "m.q_proj.lora_B.weight": torch.randn(4, 2, generator=g),
            "m.score.weight": torch.randn(1, 4, generator=g)}


def test_heads_average_elementwise_and_rslora_keeps_its_scale():
    a, b = _tensors(0), _tensors(1)
    config, out = average_lora([_cfg(), _cfg()], [a, b], [0.25, 0.75])
    assert torch.allclose(out["m.score.weight"], 0.25 * a["m.score.weight"] + 0.75 * b["m.score.weight"])
    s = config["lora_alpha"] / config["r"]
    delta = s * out["m.q_proj.lora_B.weight"] @ out["m.q_proj.lora_A.weight"]
    want = 2.0 * (0.25 * a["m.q_proj.lora_B.weight"] @ a["m.q_proj.lora_A.weight"]
                  + 0.75 * b["m.q_proj.lora_B.weight"] @ b["m.q_proj.lora_A.weight"])
    assert torch.allclose(delta, want, atol=1e-6)
    config, out = average_lora([_cfg(use_rslora=True)] * 2, [a, b])
    s_rs = config["lora_alpha"] / config["r"] ** 0.5
    assert s_rs == pytest.approx(4.0 / 2 ** 0.5)  # alpha' = sqrt(n) alpha keeps alpha / sqrt(r)


@pytest.mark.parametrize("configs, tensors, weights, message", [
    ([_cfg(), _cfg(r=4)], None, None, "key 'r' is 4"),
    ([_cfg(use_dora=True), _cfg(use_dora=True)], None, None, "DoRA adapter"),
    ([_cfg(peft_type="IA3"), _cfg(peft_type="IA3")], None, None, "IA3 adapter"),
    ([_cfg(), _cfg(target_modules=["v_proj"])], None, None, "key 'target_modules'"),
    ([_cfg(), _cfg()], "extra", None, "tensor 'x' is in one adapter"),
    ([_cfg(), _cfg()], "shape", None, "has shape (1, 5)"),
    ([_cfg(), _cfg()], None, [1.0], "1 weights for 2 adapters"),
    ([_cfg(), _cfg()], None, [1.0, -1.0], "weights must be >= 0"),
    ([_cfg()], None, None, "needs two or more"),
])
def test_unlike_members_are_refused(configs, tensors, weights, message):
    ts = [_tensors(i) for i in range(len(configs))]
    if tensors == "extra":
        ts[1]["x"] = torch.zeros(1)
    if tensors == "shape":
        ts[1]["m.score.weight"] = torch.zeros(1, 5)
    with pytest.raises(LmforgeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        average_lora(configs, ts, weights)


def test_cli_writes_a_run_that_loads_and_refuses_bad_input(tiny_llama_dir, tmp_path, capsys):
    runs = [_make_run(tiny_llama_dir, tmp_path / f"run{i}", four_bit=False, seed=i) for i in range(2)]
    for r in runs:
        (r / "labels.json").write_text('["neg", "pos"]')
    out = tmp_path / "runs" / "avg"
    assert main(["average", str(runs[0]), str(runs[1]), "--out", str(out), "--weights", "1,3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["weights"] == [0.25, 0.75] and report["r"] == 8
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "averaged.json", "config.yaml", "labels.json"]
    saved = (out / "config.yaml").read_text()
    assert "name: avg" in saved and "task: sft" in saved
    assert merge(str(out), tmp_path / "merged")["max_abs_diff"] < 1e-5  # loads as a run (its config, its adapter)

    # an occupied --out that is not ours is never replaced; ours needs --overwrite
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    assert main(["average", str(runs[0]), str(runs[1]), "--out", str(foreign), "--overwrite"]) == 2
    assert "will not replace it" in capsys.readouterr().err and (foreign / "notes.txt").read_text() == "keep"
    assert main(["average", str(runs[0]), str(runs[1]), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["average", str(runs[0]), str(runs[1]), "--out", str(out), "--overwrite"]) == 0
    capsys.readouterr()

    (runs[1] / "labels.json").write_text('["pos", "neg"]')
    cases = [([str(runs[0]), str(runs[1])], "labels.json: differs"),
             ([str(runs[0]), str(runs[0] / "adapter")], "not a run directory"),
             ([str(runs[0]), str(runs[0]), "--checkpoint", "best"], "no best/"),
             ([str(runs[0]), str(runs[0]), "--weights", "a,b"], "--weights: expected numbers")]
    other = _make_run(tiny_llama_dir, tmp_path / "other", four_bit=False, extra={"task": "preference"})
    cases.append(([str(runs[0]), str(other)], "task is 'preference'"))
    for args, message in cases:
        assert main(["average", *args, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not (tmp_path / "x").exists()  # nothing half-written


def test_adapter_folders_average_into_an_adapter_folder(tiny_llama_dir, tmp_path):
    runs = [_make_run(tiny_llama_dir, tmp_path / f"run{i}", four_bit=False, seed=i) for i in range(2)]
    average([str(r / "adapter") for r in runs], tmp_path / "avg-adapter")
    assert sorted(p.name for p in (tmp_path / "avg-adapter").iterdir()) == ["adapter_config.json",
                                                                          "adapter_model.safetensors"]
    assert json.loads((tmp_path / "avg-adapter" / "adapter_config.json").read_text())["r"] == 8


# ---- trajectory averaging: one run's step checkpoints ----------------------------------------------------

def _reward_run(tmp_path, model_dir, mode="lora"):
    """A real reward run (LoRA + the trained score head) that kept a checkpoint at every step."""
    from conftest import write_jsonl, write_yaml
    from tasks.test_reward import pref_rows

    data = write_jsonl(tmp_path / "pairs.jsonl", pref_rows(24))
    raw = {"task": "reward", "name": f"rm-{mode}", "output_dir": str(tmp_path / "runs"), "seed": 0,
           "model": {"name": str(model_dir), "precision": "fp32", "device": "cpu"},
           "data": {"train": str(data), "eval_fraction": 0.25, "max_length": 64},
           "reward": {"mode": mode}, "adapter": {"kind": "lora", "r": 4, "alpha": 8},
           "train": {"max_steps": 3, "batch_size": 6, "lr": 1e-2, "save_every": 1, "keep_last": 5, "log_every": 1,
                     "progress": False}}
    assert main(["train", str(write_yaml(tmp_path / f"{mode}.yaml", raw))]) == 0
    return tmp_path / "runs" / f"rm-{mode}"


def _lora_delta_and_head(model):
    """Each adapted layer's update s B A and the score head, by module path (the live model's view)."""
    from lmforge.adapters import adapter_modules

    out = {}
    for name, m in adapter_modules(model):
        if hasattr(m, "delta_weight"):
            out[name] = m.delta_weight().detach().clone()
        else:
            out[name] = m.trained.weight.detach().clone()
    return out


def test_step_checkpoints_average_to_the_mean_of_their_updates(tiny_llama_dir, tmp_path, capsys):
    from lmforge.tasks import load_task

    run = _reward_run(tmp_path, tiny_llama_dir)
    capsys.readouterr()
    # a step checkpoint renamed the peft way is the final adapter itself at the last step
    final = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    from lmforge.merge import _read_member
    from lmforge.rundir import open_run

    _, last = _read_member(open_run(run, "step-3"))
    assert set(last) == set(final) and all(torch.equal(last[k], final[k]) for k in final)
    assert main(["average", str(run), "--checkpoint", "step-1,step-2,final", "--weights", "1,1,2",
                 "--out", str(tmp_path / "swa")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["members"] == [f"{run}@step-1", f"{run}@step-2", f"{run}@final"] and report["r"] == 12
    w = [0.25, 0.25, 0.5]
    members = [_lora_delta_and_head(load_task(run, c).model) for c in ("step-1", "step-2", "final")]
    averaged = load_task(tmp_path / "swa")  # loads like any run
    got = _lora_delta_and_head(averaged.model)
    assert set(got) == set(members[0]) and any("score" in k for k in got)
    for key, value in got.items():
        want = sum(wi * m[key] for wi, m in zip(w, members))
        assert torch.allclose(value, want, atol=1e-6), key
    assert not torch.allclose(members[0][key], members[2][key])  # the trajectory moved: a real average
    assert json.loads((tmp_path / "swa" / "averaged.json").read_text())["checkpoint"] == "step-1,step-2,final"


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "step-1,latest"], "checkpoint 'latest': averaging takes final, best or step-N"),
    (["--checkpoint", "step-1,step-1"], "name each checkpoint once"),
    (["--checkpoint", "step-9,final"], "no complete checkpoint step-9 (have: step-1, step-2, step-3)"),
    (["--checkpoint", "final"], "give two or more runs, adapter folders or checkpoints of a run"),
])
def test_bad_checkpoint_lists_are_one_line(tiny_llama_dir, tmp_path, capsys, argv, message):
    run = _reward_run(tmp_path, tiny_llama_dir)
    capsys.readouterr()
    assert main(["average", str(run), "--out", str(tmp_path / "swa"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not (tmp_path / "swa").exists()


def test_checkpoints_that_are_not_the_runs_adapter_are_refused(tiny_llama_dir, tmp_path, capsys):
    run = _reward_run(tmp_path, tiny_llama_dir)
    step = run / "checkpoints" / "step-00000002" / "trainable.safetensors"
    weights = load_file(str(step))
    odd = next(k for k in weights if "lora_A" in k)
    from safetensors.torch import save_file

    save_file({k: v for k, v in weights.items() if k != odd}, str(step))  # a checkpoint of another model
    capsys.readouterr()
    assert main(["average", str(run), "--checkpoint", "step-1,step-2", "--out", str(tmp_path / "swa")]) == 2
    err = capsys.readouterr().err.strip()
    assert "step-00000002/trainable.safetensors: the checkpoint lacks the run's adapter tensor" in err
    step.write_bytes(b"not safetensors")
    assert main(["average", str(run), "--checkpoint", "step-1,step-2", "--out", str(tmp_path / "swa")]) == 2
    assert "unreadable checkpoint weights" in capsys.readouterr().err and not (tmp_path / "swa").exists()
