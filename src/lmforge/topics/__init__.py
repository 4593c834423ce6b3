"""Topic modelling: embed -> reduce -> cluster -> class-based TF-IDF -> refined representations.

Pure functions on numpy/scipy arrays; no model or file I/O except :mod:`lmforge.topics.model`
(safetensors + JSON, never pickle) and :mod:`lmforge.topics.plots` (pictures).

- :mod:`~lmforge.topics.ctfidf`: class counts and c-TF-IDF on sparse matrices, top words.
- :mod:`~lmforge.topics.represent`: maximal marginal relevance, KeyBERT-inspired re-ranking,
  representative documents, label prompts.
- :mod:`~lmforge.topics.metrics`: NPMI coherence, diversity, stability (ARI/NMI), outlier rate.
- :mod:`~lmforge.topics.cluster`: reduction (UMAP/PCA/SVD) and clustering (HDBSCAN/KMeans).
- :mod:`~lmforge.topics.edit`: reduce to N, merge, outlier reduction, hierarchy, topics over time.
- :mod:`~lmforge.topics.model`: the fitted :class:`TopicModel`, save/load/predict.
"""
