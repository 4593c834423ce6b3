"""GRPO with LoRA: lmforge ``rl`` (algorithm grpo) vs TRL ``GRPOTrainer`` + peft, side by side.

Same packaged SmolLM2-135M-Instruct, same prompts (the first 6 words of Yelp review sentences,
``../shared/data/yelp_reviews/dev.jsonl``, raw text, no chat template), same reward function (the
share of the completion's words in a small positive-word list, a plain Python function both sides
call), LoRA r=16 alpha=32 dropout=0 on q/k/v/o/gate/up/down, 4 generations per prompt, 2 prompts
per optimizer step (8 completions, one minibatch, one optimisation pass: TRL
``per_device_train_batch_size=8, num_generations=4, num_iterations=1``; lmforge
``rollout_prompts=2, generations=4, batch_size=8, ppo_epochs=1``), at most 16 new tokens sampled
at temperature 1, clip 0.2, beta 0 on both (TRL's default), same AdamW learning rate, constant
schedule, same number of steps. With one optimizer step per rollout and beta 0 neither side runs
an old-policy or reference forward (TRL: num_iterations=1 reuses the log-probs, beta 0 loads no
reference; lmforge: ``rl.fast_rollout``), and lmforge samples with the LoRA update folded into
the base weights (``rl.merged_generation``); ``--plain`` adds a trial without both. lmforge's
sampling runs through ``kv_cache.py``: each distinct prompt prefilled once for its k samples
through the lean path, a preallocated KV cache, a lean step per token, and the weights prepacked
for oneDNN with the LoRA update merged in (``packed_linears.py``: after each optimizer step the
merged weights are written into the same packed buffers by one strided copy).

Each step generates a fresh rollout on both sides. Timed: the steps after the first (warm-up)
step. Figures (medians over ``--reps``, each trial a fresh process, trials alternating):
``prompts_per_s`` (prompts of the timed steps / seconds), ``prompts_per_cpu_s`` (/ process CPU
seconds: the figure to trust on a shared, loaded machine), ``completion_tokens_mean`` (a check
that both generate similar lengths), ``peak_rss_mb``, and the quality figure ``reward_mean`` over
the timed steps.

Trials: ``trl_default`` (TRL's defaults on CPU: fp32, gradient checkpointing on), ``trl_best``
(``bf16=True``, gradient checkpointing off: its faster realistic setting), ``lmforge`` (defaults:
``auto`` precision = bf16 autocast with frozen weights in bf16).

    OMP_NUM_THREADS=1 .venv/bin/python bench/rl.py [--steps 6] [--reps 2] [--threads 1] [--plain] [--profile]

Measured (s5: ``--steps 3 --reps 3 --threads 1``, twice, shared 2-core machine at load 6-8; outputs
``runs/rl5/t1*.json``): prompts per CPU second lmforge 0.913 / 0.942, TRL default 0.360 / 0.366, TRL best
0.447 / 0.461 (ratio_best_cpu 2.04 / 2.05, ratio_default_cpu 2.53 / 2.58; wall ratio_best 1.74 / 2.05, the
wall figures follow the load); over the 6 reps pooled lmforge 0.871-0.982 (median 0.916), TRL best 0.442-0.485
(median 0.455): 2.01x. Peak RSS 1401 / 1403 vs TRL 1486-1535 (default) and 1886-1900 MB (best).
After b01b2c7 (packed_train keeps SDPA for one short sequence per row: RL's loss rows), same command, load
1-3: lmforge 1.077 (reps 5.57 / 5.46 / 5.60 CPU-s), TRL best 0.492, TRL default 0.406 prompts per CPU s:
**ratio_best_cpu 2.19** [wall 2.18], ratio_default_cpu 2.65; peak RSS 1411 vs 1900 / 1508 MB; reward 0.0099
vs 0.0110. (``runs/rl5/t_lead.json``.)
Reward over the timed steps 0.0099 vs 0.0110 (16 completions, noise). Before (s4): 0.802 vs 0.416 (1.93x).
2 threads (``--threads 2``): not measurable on the loaded 2-core machine (load ~8: OpenMP threads spin, ~10x the
CPU of a 1-thread run on both sides); a trl_best + lmforge subset, 2 timed steps, 1 rep: 0.082 vs 0.042 prompts
per CPU s (1.95x), wall 0.040 vs 0.017 (2.44x), peak RSS 1382 vs 1896 MB. Measure it on a quiet machine.
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Window, alternate, emit, median, set_threads  # noqa: E402

YELP = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "yelp_reviews" / "dev.jsonl"
POSITIVE = {"good", "great", "nice", "love", "amazing", "best", "delicious", "friendly", "excellent", "happy",
            "awesome", "perfect", "wonderful", "fantastic", "recommend"}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
K, PROMPTS_PER_STEP, NEW_TOKENS, LR = 4, 2, 16, 1e-5


def positive_share(text: str) -> float:
    words = re.findall(r"[a-z']+", text.lower())
    return sum(w in POSITIVE for w in words) / max(len(words), 1)


def prompts(n: int = 64) -> list[str]:
    import json

    out = []
    for line in YELP.read_text(encoding="utf-8").splitlines():
        words = json.loads(line)["text"].split()
        if len(words) >= 10:
            out.append(" ".join(words[:6]))
        if len(out) == n:
            break
    return out


def run_lmforge(steps: int, threads: int | None, profile: bool = False, fast: bool = True) -> dict:
    set_threads(threads)
    import json

    from lmforge.api import config
    from lmforge.rl.rewards import FunctionReward
    from lmforge.rundir import prepare_run, write_jsonl
    from lmforge.tasks.rl import RlTask
    from lmforge.train import fit

    out = Path(tempfile.mkdtemp())
    data = out / "prompts.jsonl"
    write_jsonl(data, [{"prompt": p} for p in prompts()])
    cfg = config({
        "task": "rl", "name": "bench", "output_dir": str(out), "seed": 0,
        "model": {"name": "smollm2"},
        "data": {"train": str(data), "eval_fraction": 0.0, "max_length": 64},
        "rl": {"algorithm": "grpo", "reward": "bench.positive_share", "mode": "lora", "template": "raw",
               "generations": K, "rollout_prompts": PROMPTS_PER_STEP, "ppo_epochs": 1, "max_new_tokens": NEW_TOKENS,
               "temperature": 1.0, "kl_coef": 0.0, "clip_range": 0.2, "collapse_drop": None, "log_samples": 0,
               "merged_generation": fast, "fast_rollout": fast},
        "adapter": {"kind": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": LORA_TARGETS},
        "train": {"max_steps": steps + 1, "batch_size": PROMPTS_PER_STEP * K, "lr": LR, "schedule": "constant",
                  "weight_decay": 0.0, "max_grad_norm": 1.0, "progress": False, "log_every": 1}})
    task = RlTask(cfg, reward=FunctionReward(positive_share, "bench.positive_share"))
    run_dir = prepare_run(cfg)
    window = Window(1, steps, profile)
    fit(task, cfg, run_dir, on_step=lambda step, rec: window.step(step))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if r["split"] == "train" and r["step"] > 1]
    return window.result(steps * PROMPTS_PER_STEP, "prompts") | {
            "reward_mean": sum(r["reward_mean"] for r in timed) / len(timed),
            "completion_tokens_mean": sum(r["response_length"] for r in timed) / len(timed)}


def run_trl(steps: int, threads: int | None, best: bool, profile: bool = False) -> dict:
    set_threads(threads)
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from lmforge.models import resolve_model

    folder = str(resolve_model("smollm2"))
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32")

    def reward(completions, **kw):
        return [positive_share(c) for c in completions]

    window = Window(1, steps, profile)

    class Marks(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            window.step(state.global_step)

    args = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=PROMPTS_PER_STEP * K,
                      num_generations=K, gradient_accumulation_steps=1, num_iterations=1, max_steps=steps + 1,
                      max_completion_length=NEW_TOKENS, temperature=1.0, beta=0.0, epsilon=0.2,
                      learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
                      use_cpu=True, bf16=best, gradient_checkpointing=not best, logging_steps=1, report_to="none",
                      save_strategy="no", seed=0,
                      disable_dropout=True, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, processing_class=tok,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in prompts()]),
                          peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                                 task_type="CAUSAL_LM"),
                          callbacks=[Marks()])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h or "rewards/reward/mean" in h][1:]
    return window.result(steps * PROMPTS_PER_STEP, "prompts") | {
            "reward_mean": sum(float(h.get("reward", h.get("rewards/reward/mean"))) for h in logs) / len(logs),
            "completion_tokens_mean": sum(float(h.get("completions/mean_length", 0.0)) for h in logs) / len(logs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="timed optimizer steps (after one warm-up step)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--profile", action="store_true", help="torch.profiler over the timed steps (grouped, per step)")
    ap.add_argument("--plain", action="store_true", help="also lmforge without the rollout fast paths")
    a = ap.parse_args()
    kw = {"steps": a.steps, "threads": a.threads, "profile": a.profile}
    trials = {"trl_default": (run_trl, kw | {"best": False}), "trl_best": (run_trl, kw | {"best": True}),
              "lmforge": (run_lmforge, kw)}
    if a.plain:
        trials["lmforge_plain"] = (run_lmforge, kw | {"fast": False})
    res = alternate(trials, a.reps)
    keys = ("prompts_per_s", "prompts_per_cpu_s", "peak_rss_mb", "reward_mean", "completion_tokens_mean")
    fig = {k: {m: median(v, m) for m in keys} | ({"profile": v[0]["profile"]} if a.profile else {})
           for k, v in res.items()}
    best_trl = max(fig["trl_default"]["prompts_per_s"], fig["trl_best"]["prompts_per_s"])
    best_cpu = max(fig["trl_default"]["prompts_per_cpu_s"], fig["trl_best"]["prompts_per_cpu_s"])
    emit({"bench": "rl_grpo_lora_smollm2", "steps": a.steps, "reps": a.reps, "prompts_per_step": PROMPTS_PER_STEP,
          "ratio_default_cpu": fig["lmforge"]["prompts_per_cpu_s"] / fig["trl_default"]["prompts_per_cpu_s"],
          "ratio_best_cpu": fig["lmforge"]["prompts_per_cpu_s"] / best_cpu,
          "generations": K, "max_new_tokens": NEW_TOKENS, "figures": fig,
          "ratio_default": fig["lmforge"]["prompts_per_s"] / fig["trl_default"]["prompts_per_s"],
          "ratio_best": fig["lmforge"]["prompts_per_s"] / best_trl,
          "rss_ratio_best": fig["lmforge"]["peak_rss_mb"] / min(fig["trl_default"]["peak_rss_mb"],
                                                                fig["trl_best"]["peak_rss_mb"])})


if __name__ == "__main__":
    main()
