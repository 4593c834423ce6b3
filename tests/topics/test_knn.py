"""The exact neighbour graph handed to UMAP: hand-computed cases, brute force, and UMAP using it."""
from __future__ import annotations

import numpy as np
import pytest

from lmforge.errors import LmforgeError
from lmforge.topics.cluster import knn, reduce


def test_knn_cosine_by_hand():
    # unit vectors at 0, 90, 45 degrees and a scaled copy of the first (cosine ignores length)
    x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [3.0, 0.0]], np.float32)
    idx, dist = knn(x, 3, "cosine")
    c45 = 1 - np.sqrt(0.5)
    # row 0: itself, then row 3 (distance 0, a tie broken by nothing: it is the only one), then row 2
    assert idx[0].tolist() == [0, 3, 2]
    np.testing.assert_allclose(dist[0], [0.0, 0.0, c45], atol=1e-6)
    # row 2: itself, then rows 0, 1, 3 all at 45 degrees: the lower row ids first
    assert idx[2].tolist() == [2, 0, 1]
    np.testing.assert_allclose(dist[2], [0.0, c45, c45], atol=1e-6)
    # row 3: itself first even though row 0 is at distance 0 too
    assert idx[3].tolist() == [3, 0, 2]


def test_knn_euclidean_by_hand():
    x = np.array([[0.0], [1.0], [3.0], [-1.0]], np.float32)
    idx, dist = knn(x, 3, "euclidean")
    assert idx[0].tolist() == [0, 1, 3]  # 1 and -1 both at distance 1: lower id first
    np.testing.assert_allclose(dist[0], [0, 1, 1], atol=1e-6)
    assert idx[2].tolist() == [2, 1, 0]
    np.testing.assert_allclose(dist[2], [0, 2, 3], atol=1e-6)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_knn_matches_brute_force_across_blocks(metric):
    from sklearn.metrics import pairwise_distances

    x = np.random.default_rng(0).normal(size=(203, 7)).astype(np.float32)
    idx, dist = knn(x, 6, metric, block_bytes=4 * 203 * 17)  # 17 rows per block, a ragged last one
    d = pairwise_distances(x.astype(np.float64), metric=metric)
    np.fill_diagonal(d, -1)  # itself first
    ref = np.argsort(d, axis=1, kind="stable")[:, :6]
    assert (idx == ref).all()
    np.fill_diagonal(d, 0)
    np.testing.assert_allclose(dist, np.take_along_axis(d, ref, 1), atol=1e-5)


def test_knn_refuses_bad_k_and_metric():
    x = np.ones((3, 2), np.float32)
    with pytest.raises(LmforgeError, match="k=4"):
        knn(x, 4)
    with pytest.raises(LmforgeError, match="manhattan"):
        knn(x, 2, "manhattan")


def test_umap_on_the_exact_graph_keeps_neighbourhoods():
    """UMAP fed the exact graph separates three well-apart groups, seeded twice the same."""
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 16)) * 5
    x = np.concatenate([c + rng.normal(size=(40, 16)) for c in centres]).astype(np.float32)
    a = reduce(x, "umap", n_components=2, n_neighbors=10, metric="euclidean", seed=3)
    b = reduce(x, "umap", n_components=2, n_neighbors=10, metric="euclidean", seed=3)
    assert np.array_equal(a, b)
    from sklearn.manifold import trustworthiness

    assert trustworthiness(x, a, n_neighbors=5) > 0.9


def test_umap_kernel_cache_serial_and_parallel_apart():
    """numba's disk cache goes on once per process for umap-learn's kernels; a function compiled
    both serial and parallel gets two cache entries (numba keys entries by function name, not by
    compile options): the serial kernel under its own name, the parallel one rebuilt from a
    renamed twin of the same code and rebound where umap-learn looks it up."""
    from numba.core.caching import NullCache

    import umap.layouts as L
    from lmforge.topics.cluster import cache_umap_kernels

    cache_umap_kernels()
    assert cache_umap_kernels() == 0  # once per process
    ser, par = L._nb_optimize_layout_euclidean_single_epoch, L._nb_optimize_layout_euclidean_single_epoch_parallel
    assert not isinstance(ser._cache, NullCache) and not isinstance(par._cache, NullCache)
    assert par.targetoptions.get("parallel") and not ser.targetoptions.get("parallel")
    assert par.py_func.__code__ is ser.py_func.__code__
    assert ser._cache._cache_file._index_name != par._cache._cache_file._index_name
    assert L._get_optimize_layout_euclidean_single_epoch_fn(True) is par
