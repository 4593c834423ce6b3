"""Look-inside commands: ``lmforge tokenize``, ``lmforge inspect``, ``lmforge word2vec``.

- ``tokenize MODEL [MODEL ...] "text" | --input FILE``: tokenizers side by side (coloured spans, ids,
  specials, chars/token, unknown/byte-fallback pieces, round trip) and, over a file, the tokens per
  word and per character of each (``--html`` writes the page);
- ``inspect MODEL "prompt"``: next-token top-k (at a temperature too), greedy steps, the logit lens,
  an attention heatmap, KV-cache time per token; ``[MASK]`` fills per layer for encoders;
- ``word2vec train|similar|analogy``: gensim skip-gram/CBOW, saved in word2vec format; the same
  queries on a contextual model's input embeddings (``--vs minilm``).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import LmforgeError


# ---- tokenize ------------------------------------------------------------------------------------
def _texts_of(path: str, column: str, limit: int | None) -> list[str]:
    from ..data.readers import read_table
    from ..data.schema import require_columns, text_values

    table = read_table(path)
    if not table.records:
        raise LmforgeError(f"{path}: no texts (empty file)")
    require_columns(table, [column])
    texts = text_values(table, column, allow_empty=True)
    texts = [t for t in texts if t.strip()][:limit] if limit else [t for t in texts if t.strip()]
    if not texts:
        raise LmforgeError(f"{path}: every '{column}' value is empty")
    return texts


def _short(ref: str) -> str:
    """A model's label in tables: an alias or hub id as given, a local path by its last part."""
    p = Path(ref).expanduser()
    return p.resolve().name if p.exists() else ref


def cmd_tokenize(args) -> int:
    from ..inspection import render, tokens
    from ..models import load_tokenizer, resolve_model
    from ..rundir import write_text

    refs = list(args.items)
    text = None
    if args.input is None:
        if len(refs) < 2:
            raise LmforgeError('give at least one model and the text: lmforge tokenize MODEL [MODEL ...] "text" '
                               "(or --input FILE)")
        text = refs.pop()
        if not text.strip():
            raise LmforgeError("the text is empty: give some text to tokenize")
    tokenizers = [(_short(r), load_tokenizer(resolve_model(r))) for r in refs]
    costs = []
    if args.input is not None:
        texts = _texts_of(args.input, args.column, args.limit)
        costs = [tokens.cost(tok, texts, name).row() for name, tok in tokenizers]
        text = texts[0]
    views = [tokens.view(tok, text, name) for name, tok in tokenizers]
    if args.html:
        write_text(args.html, render.tokenize_page(views, costs))
    if args.json:
        print(json.dumps({"views": [v.summary() for v in views], "cost": costs}, ensure_ascii=False))
        return 0
    colour = not args.no_color and sys.stdout.isatty()
    if args.input is None or args.show_first:
        for v in views:
            rt = "ok" if v.round_trip else f"DIFFERS at char {v.first_difference()}: {v.decoded!r}"
            print(f"== {v.name}: {len(v.tokens)} tokens ({len(v.content)} + specials {v.specials or '-'}), "
                  f"{v.chars_per_token:.2f} chars/token, unknown {v.unknown or '-'}, byte-fallback {v.byte_pieces}, "
                  f"round trip {rt}")
            print("  " + render.ansi_spans(v, colour))
            print(f"  ids: {v.ids}")
    if costs:
        print(f"{'tokenizer':<24}{'texts':>8}{'words':>10}{'chars':>11}{'tokens':>10}{'tok/word':>10}"
              f"{'tok/char':>10}{'unk':>7}{'rt fail':>9}")
        for c in costs:
            print(f"{c['tokenizer'][:23]:<24}{c['texts']:>8}{c['words']:>10}{c['chars']:>11}{c['tokens']:>10}"
                  f"{c['tokens_per_word']:>10.3f}{c['tokens_per_char']:>10.4f}{c['unknown']:>7}"
                  f"{c['round_trip_failures']:>9}")
        best = min(costs, key=lambda c: c["tokens"])
        print(f"cheapest for this data: {best['tokenizer']} ({best['tokens_per_word']:.3f} tokens/word)")
    if args.html:
        print(f"wrote {args.html}")
    return 0


# ---- inspect -------------------------------------------------------------------------------------
def cmd_inspect(args) -> int:
    from ..inspection import render, report
    from ..rundir import write_json, write_text

    views = [v.strip() for v in args.views.split(",") if v.strip()] if args.views else None
    if not args.prompt.strip():
        raise LmforgeError("the prompt is empty: give some text to inspect")
    model, tokenizer, kind = report.load(args.model, args.adapter, args.device)
    chosen = report.choose_views(kind, args.prompt, views, args.model)
    res = report.inspect_model(model, tokenizer, kind, args.prompt, views=chosen, top_k=args.top_k,
                               temperature=args.temperature, steps=args.steps, layer=args.layer, head=args.head,
                               kv_tokens=args.kv_tokens, chat=args.chat)
    png = None
    if "attention" in res:
        a = res["attention"]
        png = render.heatmap_png(a["weights"], res["tokens"], f"{args.model}: layer {a['layer']} head {a['head']}")
    if args.out:
        out = Path(args.out)
        write_json(out / "inspect.json", res)
        if png is not None:
            render.write_png(out / f"attention_l{res['attention']['layer']}_h{res['attention']['head']}.png", png)
        write_text(out / "inspect.html", report.inspect_page(res, png))
    if args.json:
        print(json.dumps(res, ensure_ascii=False))
        return 0
    _print_inspect(res)
    print(f"wrote {args.out}/inspect.html" if args.out else "(--out DIR writes the HTML page and the attention PNG)")
    return 0


def _print_inspect(res: dict) -> None:
    print(f"prompt tokens ({len(res['tokens'])}): {res['tokens']}")
    if "next" in res:
        nxt = res["next"]
        t = nxt["temperature"]
        print(f"next token{'' if t == 1 else f'  (T=1 | T={t})'}:")
        for a, b in zip(nxt["top"], nxt["top_t"]):
            extra = "" if t == 1 else f"   | {b['prob']:.4f} {b['token']!r}"
            print(f"  {a['prob']:.4f} {a['token']!r}{extra}")
        for i, s in enumerate(res.get("steps", []), start=1):
            alts = ", ".join(f"{x['token']!r} {x['prob']:.3f}" for x in s["top"][1:])
            print(f"step {i}: {s['chosen']['token']!r} p={s['chosen']['prob']:.3f} H={s['entropy']:.2f}  (then {alts})")
        if res.get("steps"):
            print(f"greedy continuation: {res['steps'][-1]['text']!r}")
    if "lens" in res:
        lens = res["lens"]
        print(f"logit lens at the last position (after {lens['tokens'][-1]!r}); "
              f"last layer vs model max |dp| = {lens['max_diff']:.2g}:")
        for li, per_pos in enumerate(lens["top"]):
            tops = ", ".join(f"{x['token']!r} {x['prob']:.3f}" for x in per_pos[-1][:3])
            print(f"  {'emb' if li == 0 else li:>4}: {tops}   (final token rank {lens['final_rank'][li][-1]})")
    if "mask" in res:
        for j, pos in enumerate(res["mask"]["positions"]):
            print(f"[MASK] {j + 1} (token {pos}) per layer:")
            for li, fills in enumerate(res["mask"]["fills"]):
                print(f"  {'emb' if li == 0 else li:>4}: " + ", ".join(f"{f['token']} {f['prob']:.3f}" for f in fills[j][:5]))
    if "attention" in res:
        a = res["attention"]
        print(f"attention layer {a['layer']} head {a['head']} (of {a['layers']} layers x {a['heads']} heads): "
              "most attended key per query")
        for q, row in enumerate(a["weights"]):
            k = max(range(len(row)), key=row.__getitem__)
            print(f"  {res['tokens'][q]!r:>16} -> {res['tokens'][k]!r} {row[k]:.2f}")
    if "kv" in res:
        kv = res["kv"]
        print(f"KV cache over {kv['tokens']} greedy tokens: {kv['cached_ms_per_token']:.1f} ms/token cached vs "
              f"{kv['uncached_ms_per_token']:.1f} uncached (x{kv['speedup']:.2f}; first step with prompt "
              f"{kv['cached_first_ms']:.1f} ms; same tokens: {kv['same_tokens']})")


# ---- word2vec ------------------------------------------------------------------------------------
def _vectors(ref: str):
    """A word2vec file, or any model reference (its input embeddings)."""
    from ..inspection import wordvec

    p = Path(ref).expanduser()
    if p.is_file() and p.suffix in (".bin", ".txt", ".vec", ".w2v"):
        return wordvec.load(p)
    return wordvec.from_model(ref)


def cmd_w2v_train(args) -> int:
    from ..inspection import wordvec

    lines: list[str] = []
    for path in args.input:
        lines += _texts_of(path, args.column, None)
    sentences = [w for w in (wordvec.words_of(t, lower=not args.cased) for t in lines) if w]
    if min(args.dim, args.window, args.negative, args.epochs, args.min_count) <= 0 or args.sample < 0:
        raise LmforgeError("--dim, --window, --negative, --epochs and --min-count must be positive, --sample >= 0")
    wv = wordvec.train(sentences, sg=args.arch == "skipgram", dim=args.dim, window=args.window, negative=args.negative,
                       min_count=args.min_count, epochs=args.epochs, sample=args.sample, seed=args.seed,
                       workers=args.workers)
    wordvec.save(wv, args.out)
    print(f"{len(wv.words)} words x {wv.vectors.shape[1]} dims from {len(sentences)} sentences "
          f"({sum(map(len, sentences))} words) -> {args.out}")
    return 0


def _side_by_side(tables: list[tuple[str, list]], json_out: bool) -> None:
    if json_out:
        print(json.dumps({name: [[w, round(s, 4)] for w, s in rows] for name, rows in tables}, ensure_ascii=False))
        return
    for name, rows in tables:
        print(f"== {name}")
        for w, s in rows:
            print(f"  {s:.3f}  {w}")


def cmd_w2v_similar(args) -> int:
    if args.topn <= 0:
        raise LmforgeError("--topn must be positive")
    tables = [(ref, _vectors(ref).similar(args.word, args.topn)) for ref in [args.model, *args.vs]]
    _side_by_side(tables, args.json)
    return 0


def cmd_w2v_analogy(args) -> int:
    from ..inspection import wordvec

    refs = [args.model, *args.vs]
    if args.file:
        rows = wordvec.read_analogies(args.file)
        tables = [(ref, _vectors(ref)) for ref in refs]
        covered = [i for i, r in enumerate(rows) if all(all(w in wv for w in r[1:]) for _, wv in tables)]
        res = {ref: {"all": wordvec.evaluate_analogies(wv, rows),
                     "covered_by_all": wordvec.evaluate_analogies(wv, rows, only=covered)} for ref, wv in tables}
        if args.json:
            print(json.dumps(res, ensure_ascii=False))
            return 0
        for ref, r in res.items():
            a, c = r["all"], r["covered_by_all"]
            print(f"{ref}: accuracy {a['accuracy']:.3f} ({a['correct']}/{a['questions']}, {a['skipped']} with unknown "
                  f"words); on the {c['questions']} questions every model covers: {c['accuracy']:.3f}; "
                  f"per category {a['per_category']}")
        return 0
    if len(args.words) != 3:
        raise LmforgeError("give three words a b c (a : b :: c : ?), or --file ANALOGIES.tsv")
    a, b, c = args.words
    tables = [(ref, _vectors(ref).analogy(a, b, c, args.topn)) for ref in refs]
    _side_by_side(tables, args.json)
    return 0


# ---- registration --------------------------------------------------------------------------------
def register(sub) -> None:
    from .helptext import input_help

    p = sub.add_parser("tokenize", help="tokenizers side by side on a text, or their cost over a file")
    p.add_argument("items", nargs="+", metavar="MODEL_OR_TEXT",
                   help='one or more models (aliases, folders, hub ids), then the text (unless --input)')
    p.add_argument("--input", default=None, help="data file (txt/jsonl/csv/...): tokens per word and per character")
    p.add_argument("--column", default="text", help="text column of --input (default: text)")
    p.add_argument("--limit", type=int, default=None, help="read at most this many texts of --input")
    p.add_argument("--show-first", action="store_true", help="with --input: also show the first text's tokens")
    p.add_argument("--html", default=None, help="write the side-by-side page here")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-color", action="store_true")
    input_help(p, "one or more models then a text, or --input .txt/JSONL/CSV with a text column (--column)",
                  'lmforge tokenize minilm smollm2 "Tokenizers disagree."')
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("inspect", help="next-token probabilities, logit lens, attention, KV-cache timing")
    p.add_argument("model", help="model reference, run directory or adapter folder (encoders: [MASK] fills)")
    p.add_argument("prompt")
    p.add_argument("--adapter", default=None)
    p.add_argument("--views", default=None, help="comma list of next,lens,attention,kv,mask (default: all that apply)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--temperature", type=float, default=1.0, help="also show the probabilities at this temperature")
    p.add_argument("--steps", type=int, default=5, help="greedy steps to show")
    p.add_argument("--layer", type=int, default=-1, help="attention layer (negative: from the end)")
    p.add_argument("--head", type=int, default=0, help="attention head")
    p.add_argument("--kv-tokens", type=int, default=16, help="tokens to time with and without the KV cache (0: off)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--out", default=None, help="folder for inspect.html, inspect.json and the attention PNG")
    p.add_argument("--json", action="store_true")
    p.add_argument("--device", default="auto")
    input_help(p, "a model (folder, alias, run, adapter) and a prompt (encoders: a text with the mask token)",
                  'lmforge inspect smollm2 "The capital of France is" --views next,lens')
    p.set_defaults(func=cmd_inspect)

    w = sub.add_parser("word2vec", help="train word2vec (gensim) and query word vectors or a model's input embeddings")
    ws = w.add_subparsers(dest="w2v_command", required=True)
    t = ws.add_parser("train", help="skip-gram or CBOW with negative sampling over text files")
    t.add_argument("input", nargs="+", help="text files (txt lines, or a --column of jsonl/csv)")
    t.add_argument("--out", required=True, help="output file: .bin (word2vec binary) or .txt (text)")
    t.add_argument("--column", default="text")
    t.add_argument("--arch", choices=["skipgram", "cbow"], default="skipgram")
    t.add_argument("--dim", type=int, default=100)
    t.add_argument("--window", type=int, default=5)
    t.add_argument("--negative", type=int, default=5, help="negative samples per positive")
    t.add_argument("--min-count", type=int, default=5)
    t.add_argument("--epochs", type=int, default=5)
    t.add_argument("--sample", type=float, default=1e-3, help="down-sample words above this frequency (0: off)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--workers", type=int, default=1, help="1 = reproducible")
    t.add_argument("--cased", action="store_true", help="keep case (default: lower-case)")
    input_help(t, "text files: .txt (one sentence a line) or JSONL/CSV with a text column (--column)",
                  '{"text": "the cat sat on the mat"}')
    t.set_defaults(func=cmd_w2v_train)
    for name, fn, helptext in (("similar", cmd_w2v_similar, "nearest neighbours of a word"),
                               ("analogy", cmd_w2v_analogy, "a : b :: c : ? (3CosAdd), or accuracy on --file")):
        q = ws.add_parser(name, help=helptext)
        q.add_argument("model", help="word2vec file (.bin/.txt/.vec) or a model reference (input embeddings)")
        if name == "similar":
            q.add_argument("word")
        else:
            q.add_argument("words", nargs="*", help="a b c")
            q.add_argument("--file", default=None, help="TSV of 'a b c d [category]' rows: report the accuracy")
        q.add_argument("--vs", action="append", default=[], help="also query this model or file (repeatable)")
        q.add_argument("--topn", type=int, default=10)
        q.add_argument("--json", action="store_true")
        input_help(q, "a word2vec file (.bin/.txt/.vec) or a model reference, then "
                      + ("a word" if name == "similar" else "a b c (or --file: TSV rows 'a b c d [category]')"),
                      "lmforge word2vec " + ("similar vectors.bin king" if name == "similar"
                                             else "analogy vectors.bin man king woman"))
        q.set_defaults(func=fn)
