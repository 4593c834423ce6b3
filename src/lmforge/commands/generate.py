"""Generative commands: generate, chat, merge, average (LoRA runs into one); and the ``eval --task perplexity|generation`` path."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from ..errors import LmforgeError

log = logging.getLogger("lmforge")

EVAL_TASKS = ("perplexity", "generation")


# ---- shared pieces --------------------------------------------------------------------------------
def _add_model_args(p) -> None:
    p.add_argument("model", help="model folder, hub id, .gguf file, packaged alias (smollm2) or run directory")
    p.add_argument("--adapter", default=None, help="LoRA adapter folder or run directory")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 where the CPU (or GPU) runs it natively; on a CPU without it, linear weights "
                        "stored in bf16 and applied in fp32 (half the bytes per token); fp32: every weight fp32")
    p.add_argument("--device", default="auto")


def _add_decoding_args(p, *, temperature: float, top_p: float, max_new_tokens: int, batch: bool = True) -> None:
    g = p.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    g.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=top_p)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step")
    if batch:
        g.add_argument("--raw", action="store_true", help="do not apply the chat template")
        g.add_argument("--batch-size", type=int, default=8)


def _generation_config(args):
    from ..generation import GenerationConfig

    return GenerationConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, stop=list(args.stop), seed=args.seed,
        use_cache=not args.no_cache, batch_size=getattr(args, "batch_size", 8))


def _load(args, purpose: str = "chat"):
    """(model, tokenizer, placement) for ``args.model`` / ``args.adapter`` (a causal LM: ``purpose``
    names the command when a seq2seq model is refused)."""
    from ..device import Placement
    from ..causal_lm import load_causal_lm, resolve_source

    placement = Placement.resolve(getattr(args, "device", "auto"), getattr(args, "precision", "auto"))
    src = resolve_source(args.model, getattr(args, "adapter", None))
    model, tokenizer, _ = load_causal_lm(src, device=placement.device, purpose=purpose)
    placement.for_inference(model)  # as lmforge.api.generate: weights stored for decoding (bf16 where it pays)
    return model, tokenizer, placement


# ---- generate -------------------------------------------------------------------------------------
def cmd_generate(args) -> int:
    from ..api import generate, generate_file

    if (args.prompt is None) == (args.input is None):
        raise LmforgeError("give either --prompt TEXT or --input FILE --out FILE")
    if args.input is not None and not args.out:
        raise LmforgeError("--input needs --out FILE for the generations")
    if args.out and Path(args.out).is_dir():
        raise LmforgeError(f"--out {args.out}: is a folder, give a file name")
    if args.prompt is not None and args.out:
        raise LmforgeError("--out goes with --input; a single --prompt is printed to the terminal")
    if args.prompt is not None and not args.prompt.strip():
        raise LmforgeError("the prompt is empty")
    decoding = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop=list(args.stop),
                    seed=args.seed, use_cache=not args.no_cache, batch_size=getattr(args, "batch_size", 8))
    where = dict(adapter=args.adapter, chat=False if args.raw else None, device=args.device,
                 precision=args.precision)
    if args.input is not None:
        print(json.dumps(generate_file(args.model, args.input, args.out, **where, **decoding)))
        return 0

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    generate(args.model, [args.prompt], **where, **decoding, stream=stream)
    sys.stdout.write("\n")
    return 0


# ---- chat -----------------------------------------------------------------------------------------
def _fit_history(tokenizer, history: list[dict], limit: int | None) -> list[dict]:
    """Drop the oldest turns until the rendered conversation fits ``limit`` tokens."""
    from ..generation import encode_prompts

    while limit and len(history) > 1 and len(encode_prompts(tokenizer, [history], True)[0]) > limit:
        history = history[2:] if len(history) > 2 else history[1:]
    return history


def cmd_chat(args) -> int:
    from ..generation import encode_prompts, generate
    from ..prompting.memory import ChatMemory, parse_memory

    memory_spec = getattr(args, "memory", None) or "full"
    parse_memory(memory_spec)  # a bad --memory fails before the model loads
    cfg = _generation_config(args)
    model, tokenizer, placement = _load(args)
    if not getattr(tokenizer, "chat_template", None):
        log.warning("the model has no chat template: using a plain 'User:/Assistant:' transcript")
        cfg.stop.append("\nUser:")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    limit = max_pos - cfg.max_new_tokens if max_pos and max_pos > cfg.max_new_tokens else None
    interactive = sys.stdin.isatty()
    history: list[dict] = []
    budget = min(b for b in (limit, getattr(args, "memory_budget", None)) if b) if (
        limit or getattr(args, "memory_budget", None)) else None

    def summarise(text: str) -> str:
        from ..generation import GenerationConfig

        with placement.autocast():
            return generate(model, tokenizer, [text], GenerationConfig(max_new_tokens=96))[0]

    memory = ChatMemory(memory_spec, lambda msgs: len(encode_prompts(tokenizer, [msgs], True)[0]), budget,
                        summarise=summarise)
    if interactive:
        print("chat: /reset clears the history, /memory shows it, /exit quits", file=sys.stderr)
    while True:
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            memory.reset()
            print("(history cleared)", flush=True)
            continue
        if text == "/memory":
            print(memory.show(), flush=True)
            continue
        memory.add("user", text)
        history = memory.messages()

        def stream(piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        with placement.autocast():
            reply = generate(model, tokenizer, [history], cfg, stream=stream)[0]
        sys.stdout.write("\n")
        sys.stdout.flush()
        memory.add("assistant", reply.strip())
    return 0


# ---- merge ----------------------------------------------------------------------------------------
def cmd_merge(args) -> int:
    from ..merge import merge

    report = merge(args.source, args.out, base=args.base, dtype=args.dtype,
                   base_4bit=True if args.base_4bit else None, overwrite=args.overwrite)
    print(json.dumps(report))
    return 0


def cmd_average(args) -> int:
    from ..merge import average

    weights = None
    if args.weights:
        try:
            weights = [float(x) for x in args.weights.split(",")]
        except ValueError:
            raise LmforgeError(f"--weights: expected numbers separated by commas, got {args.weights!r}") from None
    print(json.dumps(average(args.sources, args.out, checkpoint=args.checkpoint, weights=weights,
                             overwrite=args.overwrite)))
    return 0


# ---- eval --task perplexity|generation ------------------------------------------------------------
GENERATION_EVAL_HELP = ("generation: --data with a prompt (or messages) and a reference (reference/references/"
                        "completion/summary/target); on an sft run (or --adapter RUN) the run's prompt template and "
                        "column mapping apply to raw records (e.g. dialogue/summary) and decoding starts from its "
                        "settings (greedy, sft.max_new_tokens), as training's ROUGE")


def add_generation_eval_args(e) -> None:
    """The ``--task generation`` flags of ``lmforge eval`` (``--adapter`` and ``--seed`` are shared
    with ``--task mc``); unset flags keep the run's settings."""
    g = e.add_argument_group("generation (--task generation)", GENERATION_EVAL_HELP)
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens generated at most (default: an sft run's sft.max_new_tokens, else 128)")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (the default)")
    g.add_argument("--top-k", type=int, default=None, help="0 = off")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step")
    g.add_argument("--batch-size", type=int, default=None,
                   help="prompts per batch (default: an sft run's sft.generation_batch_size, else 8)")
    g.add_argument("--prompt-template", default=None,
                   help="build prompts from the record's columns, e.g. 'Summarize: {dialogue}' (default: the "
                        "run's sft.prompt_template, else the 'prompt' field)")
    g.add_argument("--reference", default=None, help="the reference column (default: the run's, else "
                                                     "reference/references/completion/summary/target)")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="perplexity/generation of a model (an sft run uses its own model.precision)")
    g.add_argument("--device", default="auto")


def run_eval_task(args) -> int:
    """``lmforge eval MODEL --task perplexity|generation --data FILE [--out FILE]``
    (:func:`lmforge.api.evaluate_model`); prints the report as one JSON line."""
    from ..api import evaluate_model

    if args.task not in EVAL_TASKS:
        raise LmforgeError(f"eval --task must be one of {', '.join(EVAL_TASKS)}, got '{args.task}'")
    decoding = {"temperature": getattr(args, "temperature", None), "top_k": getattr(args, "top_k", None),
                "top_p": getattr(args, "top_p", None), "repetition_penalty": getattr(args, "repetition_penalty", None),
                "stop": getattr(args, "stop", None), "use_cache": False if getattr(args, "no_cache", False) else None}
    if decoding["temperature"]:
        decoding["seed"] = getattr(args, "seed", None)
    extra = {}
    if args.task == "generation":
        extra = dict(decoding=decoding, prompt_template=getattr(args, "prompt_template", None),
                     reference=getattr(args, "reference", None), checkpoint=getattr(args, "checkpoint", "final"),
                     no_filter=getattr(args, "no_filter", False))
    elif any(v for v in decoding.values()) or getattr(args, "prompt_template", None):
        raise LmforgeError("eval: decoding options and --prompt-template go with --task generation")
    report = evaluate_model(getattr(args, "model", None) or args.run_dir, args.data, args.task,
                            adapter=getattr(args, "adapter", None), out=getattr(args, "out", None),
                            batch_size=getattr(args, "batch_size", None),
                            max_new_tokens=getattr(args, "max_new_tokens", None),
                            max_length=getattr(args, "max_length", None),
                            device=getattr(args, "device", "auto"), precision=getattr(args, "precision", "auto"),
                            **extra)
    print(json.dumps(report, ensure_ascii=False))
    return 0


def register(sub) -> None:
    from .helptext import input_help

    g = sub.add_parser("generate", help="generate text from a prompt or a JSONL file of prompts")
    _add_model_args(g)
    g.add_argument("--prompt", default=None, help="one prompt; the output is streamed to the terminal")
    g.add_argument("--input", default=None, help="JSONL/CSV/... with a 'prompt' (or 'messages') field")
    g.add_argument("--out", default=None, help="JSONL written with each record plus its 'generation'")
    _add_decoding_args(g, temperature=0.0, top_p=1.0, max_new_tokens=128)
    input_help(g, "a causal LM (folder, alias, .gguf, run); --prompt TEXT or --input JSONL/CSV/... with a "
                  "prompt (or messages) field",
                  '{"prompt": "Write a haiku about rain."}')
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive multi-turn chat (reads stdin; /reset, /exit)")
    _add_model_args(c)
    _add_decoding_args(c, temperature=0.7, top_p=0.9, max_new_tokens=256, batch=False)
    c.add_argument("--memory", default="full", help="full | window:N (last N exchanges) | summary "
                                                    "(older turns summarised by the model); /memory shows it")
    c.add_argument("--memory-budget", type=int, default=None,
                   help="prompt tokens at most (default: the model's context minus --max-new-tokens)")
    input_help(c, "a causal LM; then one user message per line on stdin (/reset, /memory, /exit)",
                  "lmforge chat smollm2 --temperature 0.7")
    c.set_defaults(func=cmd_chat)

    m = sub.add_parser("merge", help="merge a LoRA adapter into its base (causal or seq2seq): a standalone HF folder")
    m.add_argument("source", help="run directory or adapter folder")
    m.add_argument("--out", required=True)
    m.add_argument("--base", default=None, help="base model (default: from the run config or adapter)")
    m.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    m.add_argument("--base-4bit", action="store_true", help="the adapter was trained on an NF4 base")
    m.add_argument("--overwrite", action="store_true")
    input_help(m, "a lora/qlora run folder or a PEFT adapter folder (its base from the run config or "
                  "adapter_config.json)",
                  "lmforge merge runs/sft-lora-smollm2-dialogsum --out merged/")
    m.set_defaults(func=cmd_merge)

    a = sub.add_parser("average", help="average LoRA runs trained alike into one run (weight averaging, WARM)")
    a.add_argument("sources", nargs="+", help="run directories (or two or more adapter folders)")
    a.add_argument("--out", required=True, help="the averaged run directory (adapter folder for folders)")
    a.add_argument("--checkpoint", default="final",
                   help="which weights of each run: final, best, step-N, or several comma-separated "
                        "(e.g. one run at step-100,step-200,final: trajectory averaging, SWA)")
    a.add_argument("--weights", default=None, help="member weights, e.g. 0.5,0.5 (default equal)")
    a.add_argument("--overwrite", action="store_true", help="replace an earlier averaged run at --out")
    input_help(a, "LoRA runs of one task and base with the same adapter settings (e.g. seeds of one recipe)",
                  "lmforge average runs/rm-seed1 runs/rm-seed2 --checkpoint best --out runs/rm-warm")
    a.set_defaults(func=cmd_average)
