"""Reduction (UMAP, PCA, truncated SVD) and clustering (HDBSCAN, KMeans), seeded and deterministic.

UMAP with a ``random_state`` runs single-threaded (umap-learn's rule), which is what makes the
same seed and data give the same topics bit for bit on CPU (``deterministic=True``, the default);
``deterministic=False`` lets umap-learn optimise the layout on every core without a seed (faster,
not reproducible).

UMAP's neighbour graph is computed here, exactly, with one matrix product per block of rows
(:func:`knn`), and handed to umap-learn as ``precomputed_knn``. umap-learn itself computes it with
scikit-learn's ``pairwise_distances`` and a Python callable below 4,096 points (one Python call per
pair: 7.3 million calls for 3,823 documents, ~25 s of CPU) and with approximate NN-descent above.

umap-learn's numba kernels are compiled in every new process (~7 s of CPU before the first
epoch); :func:`cache_umap_kernels` turns on numba's own on-disk cache for them, so only the first
run on a machine compiles (numba keys the cache by the kernel's source file and signature and
recompiles after an upgrade).
"""
from __future__ import annotations

import numpy as np

from ..errors import LmforgeError

REDUCERS = ("umap", "pca", "svd", "none")
CLUSTERERS = ("hdbscan", "kmeans")


KNN_METRICS = ("cosine", "euclidean")
EXACT_KNN_MAX = 200_000  # above this many points the O(N^2) exact graph is left to umap-learn's NN-descent


def knn(x: np.ndarray, k: int, metric: str = "cosine", *, block_bytes: int = 1 << 27) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``k`` nearest neighbours of every row among all rows, the row itself first.

    With ``u_i = x_i / |x_i|``: cosine ``d_ij = 1 - u_i . u_j``; euclidean
    ``d_ij = sqrt(max(|x_i|^2 + |x_j|^2 - 2 x_i . x_j, 0))``. Scores are computed in float32, one
    ``(rows, N)`` block at a time (memory ``block_bytes``); the diagonal is forced first (distance 0)
    and equal scores among the ``k`` are ordered by row id.

    Args:
        x: ``(N, D)`` points.
        k: neighbours per point, itself included (umap-learn's ``n_neighbors``), ``k <= N``.
        metric: ``cosine`` or ``euclidean``.

    Returns:
        ``(indices (N, k) int64, distances (N, k) float32)``, nearest first.
    """
    import torch

    if metric not in KNN_METRICS:
        raise LmforgeError(f"exact neighbours support {', '.join(KNN_METRICS)}, got '{metric}'")
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))  # (N, D)
    n = t.shape[0]
    if not 1 <= k <= n:
        raise LmforgeError(f"k={k} neighbours need 1 <= k <= {n} points")
    if metric == "cosine":
        t = torch.nn.functional.normalize(t, dim=1)
    sq = (t * t).sum(1)  # (N,)
    rows = max(1, min(n, block_bytes // (4 * n)))
    idx = np.empty((n, k), np.int64)
    dist = np.empty((n, k), np.float32)
    with torch.no_grad():
        for a in range(0, n, rows):
            b = min(n, a + rows)
            s = t[a:b] @ t.T  # (r, N)
            if metric == "euclidean":
                s = 2 * s - sq[a:b, None] - sq[None, :]  # -|x_i - x_j|^2, (r, N)
            s[torch.arange(b - a), torch.arange(a, b)] = float("inf")  # itself first
            top, val = _topk_low_ids_first(s, k)  # (r, k) each, best first
            idx[a:b] = top.numpy()
            val = val.numpy()
            d = (1.0 - val) if metric == "cosine" else np.sqrt(np.maximum(-val, 0.0))
            d[:, 0] = 0.0
            dist[a:b] = np.maximum(d, 0.0)
    return idx, dist


UMAP_KERNEL_MODULES = ("umap.umap_", "umap.layouts", "umap.utils", "umap.spectral", "umap.distances", "umap.sparse")
_kernels_cached = False


def cache_umap_kernels() -> int:
    """Turn on numba's on-disk cache for umap-learn's module-level kernels (once per process).

    Returns how many kernels were switched on now. The cache lives where numba puts it
    (``__pycache__`` next to the source when writable, else numba's user cache folder, or
    ``NUMBA_CACHE_DIR``). A kernel numba cannot cache is compiled as before.
    """
    global _kernels_cached
    if _kernels_cached:
        return 0
    import importlib

    from numba.core.caching import NullCache
    from numba.core.dispatcher import Dispatcher

    by_func: dict = {}
    for name in UMAP_KERNEL_MODULES:
        for obj in vars(importlib.import_module(name)).values():
            if isinstance(obj, Dispatcher) and isinstance(obj._cache, NullCache):  # noqa: SLF001
                by_func.setdefault(obj.py_func, {})[id(obj)] = obj
    n = 0
    for group in by_func.values():
        # numba names a cache entry by the Python function and signature, not by the compile
        # options: a serial and a parallel kernel of one function would read each other's code.
        # So the serial kernel caches under the function itself and each other kernel is rebuilt
        # from a twin of the function with its own name (_cacheable_twin), rebound in its module.
        kernels = list(group.values())
        serial = [d for d in kernels if not d.targetoptions.get("parallel")] if len(kernels) > 1 else kernels
        if len(serial) == 1:
            serial[0].enable_caching()
            n += 1
        for d in kernels:
            if d not in serial and len(serial) == 1 and _rebind_cached_twin(d):
                n += 1
    _kernels_cached = True
    return n


def _rebind_cached_twin(kernel) -> bool:
    """Replace ``kernel`` (a numba dispatcher bound to module names of umap-learn) by the same
    compile options over a copy of its Python function named ``<name>__<options>``, with numba's
    disk cache on; returns whether any module name was rebound."""
    import importlib
    import types

    import numba

    f = kernel.py_func
    opts = {k: v for k, v in kernel.targetoptions.items() if k in ("parallel", "fastmath", "nogil", "boundscheck")}
    tag = "_".join(f"{k}{int(bool(v))}" for k, v in sorted(opts.items()))
    twin = types.FunctionType(f.__code__, f.__globals__, f"{f.__name__}__{tag}", f.__defaults__, f.__closure__)
    twin.__qualname__, twin.__module__ = f"{f.__qualname__}__{tag}", f.__module__
    new = numba.njit(twin, cache=True, **opts)
    bound = False
    for name in UMAP_KERNEL_MODULES:
        mod = importlib.import_module(name)
        for attr, obj in list(vars(mod).items()):
            if obj is kernel:
                setattr(mod, attr, new)
                bound = True
    return bound


def _topk_low_ids_first(s, k: int):
    """Row-wise top ``k`` of a ``(r, N)`` score tensor, best first, equal scores by lower column
    (``torch.topk`` leaves the choice among ties unspecified, at the k-th place too)."""
    import torch

    kth = torch.topk(s, k, dim=1).values[:, -1:]  # (r, 1)
    mask = s >= kth  # (r, N): exactly k per row unless the k-th score is tied
    counts = mask.sum(1)
    top = torch.empty((s.shape[0], k), dtype=torch.long)
    plain = counts == k
    if plain.any():
        cols = mask[plain].nonzero()[:, 1].reshape(-1, k)  # ascending column ids
        top[plain] = cols
    for r in torch.nonzero(~plain).flatten().tolist():  # a tie at the k-th place: every tied column
        top_r = mask[r].nonzero().flatten()
        order = torch.sort(s[r, top_r], descending=True, stable=True).indices[:k]
        top[r] = top_r[order]
    val = torch.gather(s, 1, top)
    order = torch.sort(val, dim=1, descending=True, stable=True).indices  # ties keep the ascending ids
    return torch.gather(top, 1, order), torch.gather(val, 1, order)


def reduce(embeddings: np.ndarray, method: str = "umap", *, n_components: int = 5, n_neighbors: int = 15,
           min_dist: float = 0.0, metric: str = "cosine", seed: int = 42, deterministic: bool = True,
           return_model: bool = False):
    """``(N, D)`` embeddings -> ``(N, n_components)`` float32 (or the embeddings for ``none``).

    ``deterministic``: UMAP seeded and single-threaded (bit for bit); False: umap-learn's
    multi-threaded layout without a seed. Returns the reduced array, or ``(reduced, fitted_reducer)``
    when ``return_model``.
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

        cache_umap_kernels()
        kw = {"random_state": seed, "n_jobs": 1} if deterministic else {"n_jobs": -1}
        if metric in KNN_METRICS and n <= EXACT_KNN_MAX:
            kw |= {"precomputed_knn": knn(x, n_neighbors, metric) + (None,), "force_approximation_algorithm": True}
        model = UMAP(n_neighbors=n_neighbors, n_components=n_components, min_dist=min_dist, metric=metric,
                     low_memory=False, **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "n_jobs overridden by random_state", no search index, spectral init
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
