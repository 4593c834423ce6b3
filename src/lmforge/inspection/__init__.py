"""Look inside a model: how tokenizers split text, next-token probabilities, the logit lens,
attention, KV-cache timing, and static word embeddings (word2vec) next to a model's input embeddings.

- :mod:`.tokens`: one tokenizer's view of a text (pieces, ids, spans, specials, unknown and
  byte-fallback pieces, round trip) and the per-word / per-character cost over a corpus;
- :mod:`.lens`: next-token distributions, greedy steps, the logit lens (decoders) and per-layer
  ``[MASK]`` fills (encoders), attention maps, time per token with and without the KV cache;
- :mod:`.render`: terminal colours, HTML pages, the attention heatmap PNG;
- :mod:`.wordvec`: word2vec training through gensim, pickle-free save/load, neighbours and analogies
  (3CosAdd) over any word-vector table, including a contextual model's input embeddings.
"""
