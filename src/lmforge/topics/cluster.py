"""Reduction (UMAP, PCA, truncated SVD) and clustering (HDBSCAN, KMeans), seeded and deterministic.

UMAP with a ``random_state`` runs single-threaded (umap-learn's rule), which is what makes the
same seed and data give the same topics bit for bit on CPU.
"""
from __future__ import annotations

import numpy as np

from ..errors import LmforgeError

REDUCERS = ("umap", "pca", "svd", "none")
CLUSTERERS = ("hdbscan", "kmeans")


def reduce(embeddings: np.ndarray, method: str = "umap", *, n_components: int = 5, n_neighbors: int = 15,
           min_dist: float = 0.0, metric: str = "cosine", seed: int = 42, return_model: bool = False):
    """``(N, D)`` embeddings -> ``(N, n_components)`` float32 (or the embeddings for ``none``).

    Returns the reduced array, or ``(reduced, fitted_reducer)`` when ``return_model``.
    """
    x = np.asarray(embeddings, dtype=np.float32)
    n = len(x)
    if method == "none":
        return (x, None) if return_model else x
    if method == "umap":
        if n <= n_neighbors:
            raise LmforgeError(f"{n} documents are too few for umap n_neighbors={n_neighbors} (need more than {n_neighbors})")
        if n_components + 1 >= n:
            raise LmforgeError(f"{n} documents are too few for umap n_components={n_components}")
        import warnings

        from umap import UMAP

        model = UMAP(n_neighbors=n_neighbors, n_components=n_components, min_dist=min_dist, metric=metric,
                     random_state=seed, low_memory=False, n_jobs=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "n_jobs overridden by random_state", spectral init notes
            out = model.fit_transform(x)
    elif method in ("pca", "svd"):
        if n_components > min(x.shape):
            raise LmforgeError(f"{method} n_components={n_components} exceeds min(documents, dim)={min(x.shape)}")
        from sklearn.decomposition import PCA, TruncatedSVD

        model = (PCA(n_components=n_components, random_state=seed, svd_solver="full") if method == "pca"
                 else TruncatedSVD(n_components=n_components, random_state=seed, algorithm="arpack"))
        out = model.fit_transform(x)
    else:
        raise LmforgeError(f"reduction must be one of {', '.join(REDUCERS)}, got '{method}'")
    out = np.ascontiguousarray(out, dtype=np.float32)
    return (out, model) if return_model else out


def cluster(reduced: np.ndarray, method: str = "hdbscan", *, min_cluster_size: int = 10,
            min_samples: int | None = None, n_clusters: int = 20, seed: int = 42) -> np.ndarray:
    """Cluster labels ``(N,)`` int64, -1 for HDBSCAN's noise (outliers); KMeans has none.

    Labels are renumbered by :func:`renumber` (largest cluster first).
    """
    n = len(reduced)
    if method == "hdbscan":
        if n < 2 * min_cluster_size:
            raise LmforgeError(f"{n} documents are too few for hdbscan min_cluster_size={min_cluster_size} "
                               f"(need at least {2 * min_cluster_size})")
        from sklearn.cluster import HDBSCAN

        labels = HDBSCAN(min_cluster_size=min_cluster_size, min_samples=min_samples,
                         metric="euclidean", copy=True).fit_predict(reduced)
    elif method == "kmeans":
        if n < n_clusters:
            raise LmforgeError(f"{n} documents are too few for kmeans n_clusters={n_clusters}")
        from sklearn.cluster import KMeans

        labels = KMeans(n_clusters=n_clusters, random_state=seed, n_init=4).fit_predict(reduced)
    else:
        raise LmforgeError(f"clustering must be one of {', '.join(CLUSTERERS)}, got '{method}'")
    return renumber(np.asarray(labels, dtype=np.int64))


def renumber(assignments: np.ndarray) -> np.ndarray:
    """Relabel topics 0..K-1 by decreasing size (ties: smaller old id first); -1 stays -1."""
    a = np.asarray(assignments, dtype=np.int64)
    ids, counts = np.unique(a[a != -1], return_counts=True)
    order = ids[np.lexsort((ids, -counts))]
    table = {int(old): new for new, old in enumerate(order)}
    return np.array([table.get(int(x), -1) for x in a], dtype=np.int64)
