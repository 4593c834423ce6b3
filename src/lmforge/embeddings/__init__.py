"""Sentence embeddings: encoder, sentence-transformers I/O, TSDAE, cross-encoder, evaluators, GradCache."""
from lmforge.embeddings.encoder import POOLING_MODES, SentenceEncoder, pool
from lmforge.embeddings.st_io import read_st_settings, save_st_folder

__all__ = ["POOLING_MODES", "SentenceEncoder", "pool", "read_st_settings", "save_st_folder"]
