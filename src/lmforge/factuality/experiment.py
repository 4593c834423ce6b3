"""One recipe that chains the stages: split -> sample -> score -> pairs -> DPO -> held-out report.

``experiment: truthfulqa`` (any prompt file with references works as ``data.prompts``):

1. seeded split into tuning and held-out questions; tuning questions that paraphrase a held-out
   one are removed (:func:`.data.split_heldout`); the first ``data.n_validation`` tuning questions
   form a validation set (never sampled or paired: settings are chosen on its figures, never on
   the held-out ones); only the remaining tuning prompts are sampled;
2. ``sample.n`` answers per tuning prompt (``samples.jsonl``);
3. for each variant in ``variants`` (``reference``, ``free``): scores, pairs and the best
   answers (``scored-<v>.jsonl``, ``pairs-<v>.jsonl``, ``sft-<v>.jsonl``);
4. a ``preference`` run (LoRA DPO by default) on each pairs file (``dpo-<v>/``);
5. greedy answers to the held-out questions from the base model and each tuned run, scored
   against the references; ``report.json`` holds before/after figures with paired bootstrap
   95% intervals (``heldout``, and ``validation`` when ``data.n_validation`` > 0).

``experiment: summary_pairs``: DPO on a seeded part of (prompt, chosen, rejected) rows and the
held-out preference accuracy (chosen log-prob > rejected) before and after.

Every stage writes its files atomically; with ``resume: true`` a stage whose output exists is
not run again (the recipe is saved in the folder and must match).
"""
from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

from ..errors import LmforgeError

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "output_dir": "runs", "seed": 42, "model": "smollm2", "resume": False, "device": "auto",
    "variants": ["reference", "free"],
    "data": {"prompts": None, "n_tuning": 150, "n_heldout": 100, "n_validation": 0, "paraphrase_jaccard": 0.6, "instruction": ""},
    "sample": {"n": 4, "temperature": 1.0, "top_p": 0.95, "max_new_tokens": 40, "batch_size": 16},
    "score": {"checker": None, "free_group": "nli", "rule": "jaccard", "jaccard_min": 0.5, "threshold": None,
              "free_checker": None, "free_threshold": None, "discount_question": False},
    "pairs": {"margin": 0.0, "max_pairs_per_prompt": 3},
    "dpo": {},
    "eval": {"max_new_tokens": 40, "n_boot": 2000, "batch_size": 16},
}
DPO_DEFAULTS = {
    "data": {"eval_fraction": 0.1, "max_length": 192},
    "preference": {"mode": "lora", "loss": "sigmoid", "beta": 0.1, "max_prompt_length": 96},
    "adapter": {"kind": "lora", "r": 16, "alpha": 32},
    "train": {"epochs": 1, "batch_size": 8, "lr": 5.0e-4, "warmup_ratio": 0.1, "log_every": 5, "progress": False},
}


def _merge(base: dict, over: dict, where: str = "") -> dict:
    out = dict(base)
    for k, v in (over or {}).items():
        if isinstance(out.get(k), dict) and isinstance(v, dict):
            out[k] = _merge(out[k], v, f"{where}{k}.")
        else:
            out[k] = v
    return out


def _legacy_dpo_lora(cfg: dict) -> dict:
    """``dpo.lora`` (the deprecated section) as ``dpo.adapter``, the way ``RunConfig`` reads it
    (``{kind: lora}`` unless ``adapter.kind`` says otherwise; the ``lora`` values win), so a
    recipe saved with either form compares equal to the other."""
    dpo = cfg.get("dpo")
    if not isinstance(dpo, dict) or not isinstance(dpo.get("lora"), dict):
        return cfg
    dpo = dict(dpo)
    adapter = dpo.get("adapter") if isinstance(dpo.get("adapter"), dict) else {}
    dpo["adapter"] = {"kind": "lora", **adapter, **dpo.pop("lora")}
    return cfg | {"dpo": dpo}


def load_recipe(recipe: str | Path | dict) -> dict:
    """The recipe mapping with defaults filled in; unknown top-level keys are refused."""
    from ..config import read_yaml

    raw = read_yaml(Path(recipe)) if not isinstance(recipe, dict) else dict(recipe)
    src = recipe if not isinstance(recipe, dict) else "recipe"
    if not isinstance(raw, dict):
        raise LmforgeError(f"{src}: a recipe must be a mapping")
    kind = raw.get("experiment")
    if kind not in ("truthfulqa", "summary_pairs"):
        raise LmforgeError(f"{src}: experiment must be truthfulqa or summary_pairs, got {kind!r}")
    allowed = set(DEFAULTS) | {"experiment", "name"}
    bad = sorted(set(raw) - allowed)
    if bad:
        raise LmforgeError(f"{src}: unknown key(s) {', '.join(bad)} (allowed: {', '.join(sorted(allowed))})")
    if not raw.get("name"):
        raise LmforgeError(f"{src}: missing 'name'")
    cfg = _legacy_dpo_lora(_merge(DEFAULTS, raw))
    bad_v = [v for v in cfg["variants"] if v not in ("reference", "free")]
    if kind == "truthfulqa" and (bad_v or not cfg["variants"]):
        raise LmforgeError(f"{src}: variants must be a non-empty list of reference/free, got {cfg['variants']}")
    if kind == "truthfulqa" and (("reference" in cfg["variants"]) or cfg["score"]["free_group"] == "nli") \
            and not cfg["score"]["checker"]:
        raise LmforgeError(f"{src}: score.checker is required (NLI checker folder or embedding:MODEL)")
    return cfg


class _Stages:
    """The run folder: a stage runs unless ``resume`` and its output exists."""

    def __init__(self, cfg: dict):
        from ..rundir import write_json

        self.cfg = cfg
        self.dir = Path(cfg["output_dir"]) / cfg["name"]
        saved = self.dir / "recipe.json"
        if self.dir.exists() and any(self.dir.iterdir()):
            if not cfg["resume"]:
                raise LmforgeError(f"{self.dir}: exists; set resume: true to reuse its finished stages")
            # a recipe saved before an option existed equals the same recipe with that option's default
            if saved.is_file() and _legacy_dpo_lora(_merge(DEFAULTS, json.loads(saved.read_text()))) \
                    | {"resume": True} != cfg | {"resume": True}:
                raise LmforgeError(f"{self.dir}: was made by a different recipe (see recipe.json)")
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(saved, cfg)
        self.times: dict[str, float] = {}

    def done(self, name: str) -> bool:
        return self.cfg["resume"] and (self.dir / name).exists()

    def timed(self, key: str, t0: float) -> None:
        self.times[key] = round(time.perf_counter() - t0, 1)


def _dpo(cfg: dict, pairs: Path, out_dir: Path, name: str):
    from ..api import config, train_config

    dpo = _merge(DPO_DEFAULTS, cfg["dpo"])
    rc = _merge(dpo, {"task": "preference", "name": name, "output_dir": str(out_dir), "seed": cfg["seed"],
                      "overwrite": True, "model": {"name": cfg["model"], "device": cfg["device"]},
                      "data": {"train": str(pairs)}})
    return train_config(config(rc))


def _mean(values) -> float:
    v = list(values)
    return round(sum(v) / len(v), 4) if v else 0.0


def _lazy(load):
    """``get()`` calls ``load()`` once, on first use (a tuned model is loaded only when a stage needs it)."""
    cache: list = []

    def get():
        if not cache:
            cache.append(load())
        return cache[0]
    return get


def _read(path: Path) -> list[dict]:
    from ..data.readers import read_jsonl

    return read_jsonl(path).records


def run_truthfulqa(cfg: dict) -> dict:
    from ..rundir import write_json, write_jsonl
    from .checkers import load_checker
    from .data import read_prompts, split_heldout, truthfulqa
    from .evaluate import answer_metrics, compare
    from .pairs import build_pairs
    from .pipeline import load_generator, pairs_file, score_rows
    from .sampler import greedy_answers, sample_answers

    d, s, sc, ev = cfg["data"], cfg["sample"], cfg["score"], cfg["eval"]
    rows = read_prompts(d["prompts"]) if d["prompts"] else truthfulqa()
    rows = [r for r in rows if r.get("references")]
    tuning, held, removed = split_heldout(rows, d["n_heldout"], d["n_tuning"], seed=cfg["seed"],
                                          paraphrase_jaccard=d["paraphrase_jaccard"])
    n_val = d["n_validation"] or 0
    if not (isinstance(n_val, int) and 0 <= n_val < len(tuning)):
        raise LmforgeError(f"data.n_validation must be an integer in 0..{len(tuning) - 1}, got {n_val!r}")
    if d["instruction"]:  # after the split: the shared instruction must not make questions look alike
        tuning, held = ([r | {"prompt": d["instruction"] + r["prompt"]} for r in x] for x in (tuning, held))
    val, tuning = tuning[:n_val], tuning[n_val:]
    st = _Stages(cfg)  # after the input checks: a refused recipe leaves no folder behind
    write_jsonl(st.dir / "tuning.jsonl", tuning)
    write_jsonl(st.dir / "heldout.jsonl", held)
    sets = {"heldout": held}
    if val:
        write_jsonl(st.dir / "validation.jsonl", val)
        sets["validation"] = val
    report: dict[str, Any] = {"name": cfg["name"], "model": cfg["model"], "tuning_questions": len(tuning),
                              "validation_questions": len(val), "heldout_questions": len(held),
                              "paraphrases_removed": removed, "sample": s, "variants": {}}
    gen = load_generator(cfg["model"], device=cfg["device"])
    if not st.done("samples.jsonl"):
        t0 = time.perf_counter()
        samples, dropped = sample_answers(*gen, tuning, s["n"], temperature=s["temperature"], top_p=s["top_p"],
                                          max_new_tokens=s["max_new_tokens"], seed=cfg["seed"],
                                          batch_size=s["batch_size"])
        write_jsonl(st.dir / "samples.jsonl", samples)
        st.timed("sample", t0)
        report["dropped_empty_samples"] = dropped
    samples = _read(st.dir / "samples.jsonl")
    report["samples"] = len(samples)

    def greedy(model_gen, tag: str) -> None:  # greedy-<tag>.jsonl (held-out), greedy-<tag>-validation.jsonl
        for which, qs in sets.items():
            fname = f"greedy-{tag}.jsonl" if which == "heldout" else f"greedy-{tag}-{which}.jsonl"
            if not st.done(fname):
                t0 = time.perf_counter()
                ans = greedy_answers(*model_gen(), [r["prompt"] for r in qs], max_new_tokens=ev["max_new_tokens"],
                                     batch_size=ev["batch_size"])
                write_jsonl(st.dir / fname, [r | {"answer": a} for r, a in zip(qs, ans)])
                st.timed(f"greedy_{tag}" + ("" if which == "heldout" else f"_{which}"), t0)

    def question(r: dict) -> str:  # the question without the shared instruction
        return r["prompt"][len(d["instruction"]):] if d["instruction"] else r["prompt"]

    def judged(tag: str) -> dict:  # answer metrics of greedy-<tag>*.jsonl per question set
        out = {}
        for which, qs in sets.items():
            fname = f"greedy-{tag}.jsonl" if which == "heldout" else f"greedy-{tag}-{which}.jsonl"
            out[which] = answer_metrics([r["answer"] for r in _read(st.dir / fname)],
                                        [r["references"] for r in qs], checker, questions=[question(r) for r in qs])
        return out

    greedy(lambda: gen, "base")
    checker = load_checker(sc["checker"], threshold=sc["threshold"], device=cfg["device"]) if sc["checker"] else None
    # reference-free grouping may use its own checker (e.g. embedding:minilm when the NLI checker finds no two
    # samples equivalent); held-out answers are always judged by score.checker
    free_checker = (load_checker(sc["free_checker"], threshold=sc["free_threshold"], device=cfg["device"])
                    if sc["free_checker"] else checker)
    before = judged("base")
    del gen
    for v in cfg["variants"]:
        t0 = time.perf_counter()
        if not st.done(f"scored-{v}.jsonl"):
            ck = free_checker if v == "free" else checker
            kept = [r for r in samples if r["answer"].strip()]
            qs = [question(r) for r in kept] if (v == "reference" and sc["discount_question"]) else None
            scored = score_rows(kept, v, ck, group=sc["free_group"], rule=sc["rule"], jaccard_min=sc["jaccard_min"],
                                questions=qs)
            write_jsonl(st.dir / f"scored-{v}.jsonl", scored)
        st.timed(f"score_{v}", t0)
        scored = _read(st.dir / f"scored-{v}.jsonl")
        found = build_pairs(scored, cfg["pairs"]["margin"], max_pairs_per_prompt=cfg["pairs"]["max_pairs_per_prompt"])
        if not found:  # e.g. every sample of every prompt in its own class: nothing to prefer
            log.warning("variant %s: no pair of answers differs by more than the margin; no tuning", v)
            report["variants"][v] = {"pairs": 0, "mean_sample_score": _mean(r["score"] for r in scored)}
            continue
        if not st.done(f"pairs-{v}.jsonl"):
            pairs_file(st.dir / f"scored-{v}.jsonl", st.dir / f"pairs-{v}.jsonl", margin=cfg["pairs"]["margin"],
                       sft_out=st.dir / f"sft-{v}.jsonl", exclude=st.dir / "heldout.jsonl",
                       max_pairs_per_prompt=cfg["pairs"]["max_pairs_per_prompt"])
        pairs = _read(st.dir / f"pairs-{v}.jsonl")
        t0 = time.perf_counter()
        run_dir = st.dir / f"dpo-{v}"
        if not st.done(f"dpo-{v}/adapter"):
            run = _dpo(cfg, st.dir / f"pairs-{v}.jsonl", st.dir, f"dpo-{v}")
            dpo_metrics = {k: x for k, x in run.metrics.items() if isinstance(x, (int, float))}
        else:
            dpo_metrics = json.loads((run_dir / "eval.json").read_text()) if (run_dir / "eval.json").is_file() else {}
        st.timed(f"dpo_{v}", t0)
        greedy(_lazy(lambda: load_generator(str(run_dir), device=cfg["device"])), v)  # loaded only if needed
        after = judged(v)
        report["variants"][v] = {
            "pairs": len(pairs), "prompts_with_pairs": len({p["id"] for p in pairs}),
            "mean_sample_score": _mean(r["score"] for r in scored),
            "dpo_eval": {k: (round(x, 4) if isinstance(x, float) else x) for k, x in dpo_metrics.items()},
            **{which: compare(before[which], after[which], n_boot=ev["n_boot"], seed=cfg["seed"]) for which in sets}}
    report["seconds"] = st.times
    write_json(st.dir / "report.json", report)
    return report


def run_summary_pairs(cfg: dict) -> dict:
    from ..rundir import write_json, write_jsonl
    from .data import summary_pairs
    from .evaluate import paired_bootstrap, preference_correct
    from .pipeline import load_generator

    st = _Stages(cfg)
    d = cfg["data"]
    rows = summary_pairs(d["prompts"])
    order = list(range(len(rows)))
    random.Random(cfg["seed"]).shuffle(order)
    n_held = d["n_heldout"]
    if not 0 < n_held < len(rows):
        raise LmforgeError(f"data.n_heldout must be in 1..{len(rows) - 1}, got {n_held}")
    held = [rows[i] for i in order[:n_held]]
    train = [rows[i] for i in order[n_held:]][:d["n_tuning"]]
    write_jsonl(st.dir / "train.jsonl", train)
    write_jsonl(st.dir / "heldout.jsonl", held)
    bs = cfg["eval"]["batch_size"]
    before = preference_correct(*load_generator(cfg["model"], device=cfg["device"]), held, batch_size=bs)
    if not st.done("dpo/adapter"):
        run = _dpo(cfg, st.dir / "train.jsonl", st.dir, "dpo")
        dpo_metrics = {k: x for k, x in run.metrics.items() if isinstance(x, (int, float))}
    else:
        dpo_metrics = {}
    after = preference_correct(*load_generator(str(st.dir / "dpo"), device=cfg["device"]), held, batch_size=bs)
    report = {"name": cfg["name"], "model": cfg["model"], "train_pairs": len(train), "heldout_pairs": len(held),
              "dpo_eval": dpo_metrics,
              "heldout_preference_accuracy": paired_bootstrap(before, after, n_boot=cfg["eval"]["n_boot"],
                                                              seed=cfg["seed"])}
    write_json(st.dir / "report.json", report)
    return report


def run_recipe(recipe: str | Path | dict) -> dict:
    """Run a factuality recipe; returns its report (also ``<output_dir>/<name>/report.json``)."""
    cfg = load_recipe(recipe)
    return run_truthfulqa(cfg) if cfg["experiment"] == "truthfulqa" else run_summary_pairs(cfg)
