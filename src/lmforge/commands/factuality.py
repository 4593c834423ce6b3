"""``lmforge factuality sample|score|pairs|checker|compare|run``: factuality tuning (Tian et al. 2023).

sample N answers per prompt -> score them (against references, or by self-consistency) ->
preference pairs for the ``preference`` task; ``checker`` trains the NLI cross-encoder that
checks claims; ``run`` chains everything from a recipe (``recipes/factuality_*.yaml``).
"""
from __future__ import annotations

import json


def cmd_sample(args) -> int:
    from ..factuality.pipeline import sample_file

    print(json.dumps(sample_file(args.model, args.prompts, args.out, n=args.n, temperature=args.temperature,
                                 top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed,
                                 batch_size=args.batch_size, adapter=args.adapter, device=args.device)))
    return 0


def cmd_score(args) -> int:
    from ..factuality.pipeline import score_file

    print(json.dumps(score_file(args.samples, args.out, method=args.method, checker=args.checker, group=args.group,
                                rule=args.rule, jaccard_min=args.jaccard_min, threshold=args.threshold,
                                device=args.device)))
    return 0


def cmd_pairs(args) -> int:
    from ..factuality.pipeline import pairs_file

    print(json.dumps(pairs_file(args.scored, args.out, margin=args.margin, sft_out=args.sft_out,
                                max_pairs_per_prompt=args.max_pairs_per_prompt, exclude=args.exclude)))
    return 0


def cmd_checker(args) -> int:
    from ..factuality.checkers import train_nli_checker

    print(json.dumps(train_nli_checker(args.train, args.out, base=args.base, eval_file=args.eval,
                                       max_train=args.max_train, max_eval=args.max_eval, epochs=args.epochs,
                                       batch_size=args.batch_size, lr=args.lr, max_length=args.max_length,
                                       seed=args.seed, device=args.device)))
    return 0


def cmd_compare(args) -> int:
    from ..factuality.pipeline import compare_files

    print(json.dumps(compare_files(args.before, args.after, checker=args.checker, threshold=args.threshold,
                                   n_boot=args.n_boot, seed=args.seed, device=args.device), indent=2))
    return 0


def cmd_run(args) -> int:
    from ..factuality.experiment import run_recipe

    print(json.dumps(run_recipe(args.recipe), indent=2))
    return 0


def register(sub) -> None:
    from .helptext import input_help

    f = sub.add_parser("factuality", help="factuality tuning: sample answers, score them, build preference pairs")
    fs = f.add_subparsers(dest="factuality_action", required=True)

    s = fs.add_parser("sample", help="N sampled answers per prompt with their log-probabilities (JSONL)")
    s.add_argument("model", help="model reference, packaged alias (smollm2) or sft/preference run directory")
    s.add_argument("--prompts", required=True, help="JSONL with prompt (or question), optional id and references")
    s.add_argument("--out", required=True)
    s.add_argument("--adapter", default=None)
    s.add_argument("-n", type=int, default=4, help="answers per prompt")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-p", type=float, default=0.95)
    s.add_argument("--max-new-tokens", type=int, default=48)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--device", default="auto")
    input_help(s, "--prompts JSONL with prompt (or question), optional id and references",
                  '{"id": "q1", "question": "Who wrote Hamlet?", "references": ["William Shakespeare"]}')
    s.set_defaults(func=cmd_sample)

    c = fs.add_parser("score", help="score sampled answers: reference-based support or reference-free consistency")
    c.add_argument("samples", help="JSONL from `factuality sample` (prompt, answer, references for reference-based)")
    c.add_argument("--out", required=True)
    c.add_argument("--method", choices=["reference", "free"], required=True)
    c.add_argument("--checker", default=None, help="NLI checker folder (`factuality checker`) or embedding:MODEL")
    c.add_argument("--group", choices=["rules", "nli"], default="rules",
                   help="reference-free: normalised-text rules, or the checker in both directions")
    c.add_argument("--rule", default="jaccard", help="rules grouping: exact, first_claim or jaccard")
    c.add_argument("--jaccard-min", type=float, default=0.5)
    c.add_argument("--threshold", type=float, default=None, help="support threshold (checker default)")
    c.add_argument("--device", default="auto")
    input_help(c, "the JSONL `factuality sample` wrote (prompt, answer, references for --method reference)",
                  "lmforge factuality score samples.jsonl --out scored.jsonl --method reference --checker runs/nli")
    c.set_defaults(func=cmd_score)

    p = fs.add_parser("pairs", help="(chosen, rejected) pairs whose scores differ by more than a margin")
    p.add_argument("scored", help="JSONL from `factuality score`")
    p.add_argument("--out", required=True, help="pairs JSONL for the preference task")
    p.add_argument("--margin", type=float, default=0.0)
    p.add_argument("--sft-out", default=None, help="also write each prompt's best answer (prompt, completion)")
    p.add_argument("--max-pairs-per-prompt", type=int, default=None)
    p.add_argument("--exclude", default=None, help="prompt file (held-out questions) that must not appear")
    input_help(p, "the JSONL `factuality score` wrote",
                  "lmforge factuality pairs scored.jsonl --out pairs.jsonl")
    p.set_defaults(func=cmd_pairs)

    k = fs.add_parser("checker", help="train the NLI cross-encoder checker on SNLI-style pairs")
    k.add_argument("--train", required=True, help="JSONL with premise, hypothesis, label")
    k.add_argument("--eval", default=None, help="JSONL to report binary entailment accuracy on")
    k.add_argument("--out", required=True)
    k.add_argument("--base", default="minilm", help="encoder to start from")
    k.add_argument("--max-train", type=int, default=None)
    k.add_argument("--max-eval", type=int, default=None)
    k.add_argument("--epochs", type=float, default=1.0)
    k.add_argument("--batch-size", type=int, default=32)
    k.add_argument("--lr", type=float, default=3e-5)
    k.add_argument("--max-length", type=int, default=128)
    k.add_argument("--seed", type=int, default=42)
    k.add_argument("--device", default="auto")
    input_help(k, "--train JSONL with premise, hypothesis, label (entailment/neutral/contradiction)",
                  '{"premise": "A man plays a guitar.", "hypothesis": "A man plays music.", "label": "entailment"}')
    k.set_defaults(func=cmd_checker)

    m = fs.add_parser("compare", help="before/after support figures of two answer files, paired bootstrap 95%% CIs")
    m.add_argument("before", help="JSONL: id, answer, references (e.g. greedy-base.jsonl of a run)")
    m.add_argument("after")
    m.add_argument("--checker", required=True)
    m.add_argument("--threshold", type=float, default=None)
    m.add_argument("--n-boot", type=int, default=2000)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--device", default="auto")
    input_help(m, "two answer JSONL files with id, answer, references (before and after)",
                  '{"id": "q1", "answer": "Shakespeare wrote it.", "references": ["William Shakespeare"]}')
    m.set_defaults(func=cmd_compare)

    r = fs.add_parser("run", help="run a factuality recipe: split, sample, score, pairs, DPO, held-out report")
    r.add_argument("recipe")
    input_help(r, "a factuality recipe YAML (recipes/factuality_*.yaml)",
                  "lmforge factuality run recipes/factuality_truthfulqa_smollm2.yaml")
    r.set_defaults(func=cmd_run)
