"""Semantic search, reranking and retrieval-augmented generation on lmforge's own encoders.

``chunking`` (documents -> chunks with offsets), ``vectors`` (dense storage and exact top-k),
``bm25`` (bm25s), ``fusion`` (reciprocal rank fusion), ``index`` (the index folder), ``query``
(dense / bm25 / hybrid search, reranking), ``evaluate`` (retrieval metrics per mode), ``rag``
(prompts with numbered passages, citations); the retriever recipe is ``lmforge.tasks.retriever``.
"""
from .chunking import Chunk, chunk_document, chunk_documents
from .fusion import reciprocal_rank_fusion
from .index import IndexSettings, SearchIndex, build_index, read_documents
from .query import SearchOptions, search, search_rows

__all__ = ["Chunk", "IndexSettings", "SearchIndex", "SearchOptions", "build_index", "chunk_document",
           "chunk_documents", "read_documents", "reciprocal_rank_fusion", "search", "search_rows"]
