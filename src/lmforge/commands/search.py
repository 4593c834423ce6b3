"""``lmforge index build|add``, ``lmforge search``, ``lmforge rag`` and ``eval INDEX --task retrieval``."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import LmforgeError


def _weights(text: str) -> tuple[float, float]:
    try:
        w = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise LmforgeError(f"--weights: expected two numbers 'DENSE,BM25', got '{text}'") from None
    if len(w) != 2:
        raise LmforgeError(f"--weights: expected two numbers 'DENSE,BM25', got '{text}'")
    return w


def _options(args):
    from ..search import SearchOptions

    opts = SearchOptions(mode=args.mode, k=args.k, weights=_weights(args.weights), rrf_k=args.rrf_k,
                         candidates=args.candidates, exact=args.exact, binary=args.binary, rescore=args.rescore,
                         rerank=args.rerank, rerank_top=args.rerank_top)
    opts.check()
    return opts


def _open(path: str, model: str | None = None):
    from ..search import SearchIndex

    index = SearchIndex.load(path)
    if model:
        index.encoder(model)
    return index


# ---- index -----------------------------------------------------------------------------------------
def cmd_index(args) -> int:
    from ..search import IndexSettings, SearchIndex, build_index, read_documents

    if args.action == "build":
        if not args.model or not args.out:
            raise LmforgeError("index build needs --docs FILE --model MODEL --out INDEX_DIR")
        out = Path(args.out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
            raise LmforgeError(f"{out}: exists and is not empty; choose another --out or pass --overwrite")
        settings = IndexSettings(chunking=args.chunking, size=args.chunk_size, overlap=args.overlap, dtype=args.dtype,
                                 binary=args.binary, faiss=args.faiss, batch_size=args.batch_size,
                                 precision=args.precision)
        settings.check()
        docs = read_documents(args.docs, id_column=args.id_column, text_column=args.text_column)
        summary = build_index(docs, args.model, out, settings)
    else:
        if not args.index:
            raise LmforgeError("index add needs the INDEX folder and --docs FILE")
        index = SearchIndex.load(args.index)
        docs = read_documents(args.docs, id_column=args.id_column, text_column=args.text_column)
        summary = index.add(docs, model=args.model)
    print(json.dumps(summary))
    return 0


# ---- search ----------------------------------------------------------------------------------------
def cmd_search(args) -> int:
    from ..rundir import write_jsonl
    from ..search import search

    opts = _options(args)
    if (args.query is None) == (args.queries is None):
        raise LmforgeError("give either a QUERY or --queries FILE")
    if args.query is not None:
        if not args.query.strip():
            raise LmforgeError("the query is empty")
        index = _open(args.index, args.model)
        for hit in search(index, [args.query], opts)[0]:
            print(json.dumps(hit, ensure_ascii=False))
        return 0
    from ..search.evaluate import read_queries

    queries = read_queries(args.queries)
    index = _open(args.index, args.model)
    results = search(index, list(queries.values()), opts)
    rows = [{"query_id": q} | h for q, hs in zip(queries, results) for h in hs]
    if args.out:
        write_jsonl(args.out, rows)
        print(json.dumps({"queries": len(queries), "results": len(rows), "out": args.out}))
    else:
        for r in rows:
            print(json.dumps(r, ensure_ascii=False))
    return 0


# ---- rag -------------------------------------------------------------------------------------------
def cmd_rag(args) -> int:
    from ..search.rag import answer_questions, read_template
    from .generate import _generation_config, _load

    if args.closed_book and len(args.target) == 1:
        index_path, question = None, args.target[0]
    elif len(args.target) == 2:
        index_path, question = args.target
    else:
        raise LmforgeError("usage: lmforge rag INDEX QUESTION (or --closed-book QUESTION)")
    if not question.strip():
        raise LmforgeError("the question is empty")
    template = read_template(args.template, args.closed_book)
    cfg = _generation_config(args)
    passages = []
    if not args.closed_book:
        from ..search import search

        index = _open(index_path, args.encoder)
        passages = search(index, [question], _options(args))[0]
    model, tokenizer, placement = _load(args)
    stream = None
    if not args.json and not args.no_stream:
        def stream(piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()
    with placement.autocast():
        ans = answer_questions(model, tokenizer, [question], [passages], cfg, template=template,
                               closed_book=args.closed_book, stream=stream)[0]
    if args.json:
        print(json.dumps(ans.to_json(), ensure_ascii=False))
        return 0
    if stream is None:
        sys.stdout.write(ans.answer)
    sys.stdout.write("\n")
    if not args.closed_book:
        sources = ans.sources()
        print("\nSources:" if sources else "\nSources: none cited")
        for s in sources:
            text = " ".join(s["text"].split())
            print(f"[{s['n']}] {s['doc_id']} ({s['start']}-{s['end']}): {text[:200]}{'...' if len(text) > 200 else ''}")
    return 0


# ---- eval INDEX --task retrieval ---------------------------------------------------------------
def is_index(path: str) -> bool:
    return (Path(path) / "manifest.json").is_file() and (Path(path) / "chunks.jsonl").is_file()


def cmd_eval_index(args) -> int:
    """``lmforge eval INDEX --task retrieval --queries FILE --qrels FILE [--modes ...]``."""
    from ..rundir import write_json
    from ..search.evaluate import evaluate_index, read_qrels, read_queries

    if not getattr(args, "queries", None) or not getattr(args, "qrels", None):
        raise LmforgeError("evaluating an index needs --queries FILE and --qrels FILE")
    modes = [m.strip() for m in (getattr(args, "modes", None) or "dense,bm25,hybrid").split(",") if m.strip()]
    queries, qrels = read_queries(args.queries), read_qrels(args.qrels)
    index = _open(args.run_dir)
    report = evaluate_index(index, queries, qrels, modes, src=args.qrels)
    report = {"task": "retrieval", "index": args.run_dir, "queries": args.queries, "qrels": args.qrels} | report
    if args.out:
        write_json(args.out, report)
    print(json.dumps(report))
    return 0


def _add_search_args(p, *, k: int = 10, mode: str = "dense") -> None:
    g = p.add_argument_group("search")
    g.add_argument("--mode", default=mode, choices=["dense", "bm25", "hybrid"])
    g.add_argument("--k", type=int, default=k, help="results (passages for rag)")
    g.add_argument("--weights", default="1,1", help="hybrid RRF weights DENSE,BM25")
    g.add_argument("--rrf-k", type=int, default=60)
    g.add_argument("--candidates", type=int, default=100, help="depth of each list fused by hybrid")
    g.add_argument("--rerank", default=None, help="cross-encoder (folder, alias or run) re-scoring the top results")
    g.add_argument("--rerank-top", type=int, default=50)
    g.add_argument("--exact", action="store_true", help="exact search even if the index has a FAISS index")
    g.add_argument("--binary", action="store_true", help="Hamming first pass over binary codes, then rescoring")
    g.add_argument("--rescore", type=int, default=4, help="binary: candidates rescored per result")


def register(sub) -> None:
    from .helptext import input_help
    from .generate import _add_decoding_args

    ix = sub.add_parser("index", help="build a search index or add documents to one")
    ix.add_argument("action", choices=["build", "add"])
    ix.add_argument("index", nargs="?", help="index folder (add)")
    ix.add_argument("--docs", required=True, help="documents: any data file (jsonl/csv/parquet/txt)")
    ix.add_argument("--model", default=None, help="encoder (build; add: must match the index's)")
    ix.add_argument("--out", default=None, help="index folder (build)")
    ix.add_argument("--id-column", default=None, help="document id column (default: 'id', else row number)")
    ix.add_argument("--text-column", default="text")
    ix.add_argument("--chunking", default="sentences", choices=["sentences", "tokens", "paragraphs", "none"])
    ix.add_argument("--chunk-size", type=int, default=3, help="sentences / tokens / paragraphs per chunk")
    ix.add_argument("--overlap", type=int, default=0, help="units shared by consecutive chunks")
    ix.add_argument("--dtype", default="float32", choices=["float32", "float16", "int8"])
    ix.add_argument("--binary", action="store_true", help="also store binary codes")
    ix.add_argument("--faiss", action="store_true", help="also build a FAISS HNSW index (faiss-cpu)")
    ix.add_argument("--batch-size", type=int, default=16, help="encoder batch size (IndexSettings.batch_size)")
    ix.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16", "int8"],
                    help="encoder precision for chunks and later queries (int8: int8 linear layers, CPU)")
    ix.add_argument("--overwrite", action="store_true")
    input_help(ix, "--docs JSONL/CSV/Parquet with a text column (--text-column) and an optional id column, or "
                   ".txt",
                   '{"id": "d1", "text": "The Eiffel Tower is in Paris."}')
    ix.set_defaults(func=cmd_index)

    s = sub.add_parser("search", help="search an index (dense, bm25 or hybrid; optional reranking)")
    s.add_argument("index")
    s.add_argument("query", nargs="?")
    s.add_argument("--queries", default=None, help="batch: a file of queries (id + query/text columns)")
    s.add_argument("--out", default=None, help="batch: write JSON lines here instead of stdout")
    s.add_argument("--model", default=None, help="query encoder (refused unless it matches the index's)")
    _add_search_args(s)
    input_help(s, "an index folder and a query, or --queries JSONL/CSV with an id (qid/query_id/id) and a text"
                  " (query/text/question) column",
                  '{"qid": "q1", "query": "where is the Eiffel Tower?"}')
    s.set_defaults(func=cmd_search)

    r = sub.add_parser("rag", help="answer a question from retrieved passages, citing them")
    r.add_argument("target", nargs="+", metavar="INDEX QUESTION")
    r.add_argument("--model", default="smollm2", help="generator: model folder, alias, .gguf or run directory")
    r.add_argument("--adapter", default=None, help="LoRA adapter folder or run directory")
    r.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    r.add_argument("--device", default="auto")
    r.add_argument("--encoder", default=None, help="query encoder (default: the index's)")
    r.add_argument("--template", default=None, help="prompt template file with {question} and {passages}")
    r.add_argument("--closed-book", action="store_true", help="answer without retrieval")
    r.add_argument("--no-stream", action="store_true")
    r.add_argument("--json", action="store_true", help="print one JSON object (answer, citations, sources)")
    _add_search_args(r, k=3, mode="hybrid")
    _add_decoding_args(r, temperature=0.0, top_p=1.0, max_new_tokens=128, batch=False)
    input_help(r, "an index folder and a question (optionally --template: a text file with {question} and "
                  "{passages})",
                  'lmforge rag runs/index "Where is the Eiffel Tower?" --json')
    r.set_defaults(func=cmd_rag)

