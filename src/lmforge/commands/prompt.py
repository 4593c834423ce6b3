"""Prompting commands: ``lmforge prompt`` (a recipe over a file), ``lmforge chain`` (a YAML chain,
every intermediate saved) and ``lmforge agent`` (a ReAct agent with tools)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..errors import LmforgeError


def _add_model(p, positional: bool = False) -> None:
    if positional:
        p.add_argument("model", help="model folder, hub id, .gguf file, packaged alias (smollm2) or run directory")
    else:
        p.add_argument("--model", default="smollm2", help="model (default: the packaged smollm2)")
    p.add_argument("--adapter", default=None, help="LoRA adapter folder or run directory")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--device", default="auto")


def _load(args):
    from ..device import Placement
    from ..causal_lm import load_causal_lm, resolve_source

    placement = Placement.resolve(args.device, args.precision)
    model, tokenizer, _ = load_causal_lm(resolve_source(args.model, args.adapter), device=placement.device)
    return model, tokenizer, placement


def _records(path: str) -> tuple[list[dict], callable]:
    from ..data.readers import read_table

    table = read_table(path)
    if not table.records:
        raise LmforgeError(f"{path}: no records (empty file)")
    return table.records, table.where


def cmd_prompt(args) -> int:
    from ..prompting.recipe import load_recipe, run_recipe
    from ..rundir import write_jsonl

    recipe = load_recipe(args.recipe)
    recipe.constraint()  # a bad schema or regex fails before the model loads
    records, where = _records(args.input)
    model, tokenizer, placement = _load(args)
    t0 = time.perf_counter()
    with placement.autocast():
        rows = run_recipe(model, tokenizer, recipe, records, where=where, base=Path(args.recipe).parent)
    write_jsonl(args.out, [r | {"output": row["output"]} | ({"valid": row["valid"]} if "valid" in row else {})
                           | ({"prompt": row["prompt"]} if args.save_prompts else {})
                           for r, row in zip(records, rows)])
    print(json.dumps({"outputs": len(rows), "out": args.out, "seconds": round(time.perf_counter() - t0, 3)}))
    return 0


def cmd_chain(args) -> int:
    from ..prompting.chains import load_chain, run_chain

    chain = load_chain(args.chain)
    for n in chain.order:
        chain.recipes[n].constraint()
    records, where = _records(args.input)
    chain.check_inputs(records, where)
    model, tokenizer, placement = _load(args)
    t0 = time.perf_counter()
    with placement.autocast():
        report = run_chain(model, tokenizer, chain, records, args.out, where=where, base=Path(args.chain).parent)
    print(json.dumps(report | {"seconds": round(time.perf_counter() - t0, 3)}))
    return 0


def cmd_agent(args) -> int:
    from ..prompting.agent import run_agents
    from ..prompting.tools import build_tools
    from ..rundir import write_json

    if not args.question.strip():
        raise LmforgeError("the question is empty")
    if args.max_steps < 1:
        raise LmforgeError(f"--max-steps must be >= 1, got {args.max_steps}")
    tools = build_tools(args.tools) if args.tools else []
    model, tokenizer, placement = _load(args)
    with placement.autocast():
        run = run_agents(model, tokenizer, [args.question], tools, max_steps=args.max_steps,
                         max_new_tokens=args.max_new_tokens, constrain=args.constrain_actions)[0]
    for e in run["transcript"]:
        print(e["output"].strip())
        if e["observation"] is not None:
            print(f"Observation: {e['observation']}")
    transcript = args.transcript or f"runs/agents/agent-{time.strftime('%Y%m%d-%H%M%S')}.json"
    write_json(transcript, run | {"model": args.model, "tools": [t.name for t in tools]})
    print(json.dumps({"answer": run["answer"], "steps": run["steps"], "malformed": run["malformed"],
                      "stopped": run["stopped"], "transcript": transcript}))
    return 0


def register(sub) -> None:
    from .helptext import input_help

    p = sub.add_parser("prompt", help="run a prompt recipe (components, few-shot, constrained output) over a file")
    p.add_argument("recipe", help="prompt recipe YAML (see recipes/prompts/)")
    p.add_argument("--input", required=True, help="JSONL/CSV/... records whose fields fill the recipe")
    p.add_argument("--out", required=True, help="JSONL: each record plus its 'output' (and 'valid')")
    p.add_argument("--save-prompts", action="store_true", help="also write the rendered chat messages")
    _add_model(p)
    input_help(p, "a prompt recipe YAML (recipes/prompts/) and --input JSONL/CSV/... whose fields fill its "
                  "{placeholders}",
                  '{"sentence": "a gorgeous, witty film"}')
    p.set_defaults(func=cmd_prompt)

    c = sub.add_parser("chain", help="run a YAML chain of prompts; every intermediate is saved")
    c.add_argument("chain", help="chain YAML")
    c.add_argument("--input", required=True, help="JSONL/CSV/... records whose fields feed the first steps")
    c.add_argument("--out", required=True, help="output folder: steps/<name>.jsonl and chain.jsonl")
    _add_model(c)
    input_help(c, "a chain YAML (recipes/prompts/story_chain.yaml) and --input JSONL/CSV/... whose fields feed"
                  " the first steps",
                  '{"idea": "a robot that wants to learn to paint"}')
    c.set_defaults(func=cmd_chain)

    a = sub.add_parser("agent", help="a ReAct agent: Thought / Action / Observation with tools")
    _add_model(a, positional=True)
    a.add_argument("question")
    a.add_argument("--tools", default="", help="comma-separated: calculator, search:INDEX, py:package.module.function "
                                               "(your own Python function; only enabled from this command line)")
    a.add_argument("--max-steps", type=int, default=5)
    a.add_argument("--max-new-tokens", type=int, default=96, help="per step")
    a.add_argument("--constrain-actions", action="store_true",
                   help="decode each step under the Thought/Action format (always parses)")
    a.add_argument("--transcript", default=None,
                   help="JSON file for the full transcript (default runs/agents/agent-TIME.json)")
    input_help(a, "a causal LM and a question (tools from --tools)",
                  'lmforge agent smollm2 "What is 17 * 23?" --tools calculator')
    a.set_defaults(func=cmd_agent)
