"""First-stage search: the chunked exact path against brute force, padding, errors and the faiss backends."""

from __future__ import annotations

import numpy as np
import pytest

from imrnn.errors import ConfigError
from imrnn.index import FaissIndex, exact_search, search


def quantised(rng: np.random.Generator, shape: tuple[int, int], levels: int = 6) -> np.ndarray:
    """Values k/4 with |k| <= levels: every dot product is exact in float32 whatever the summation order,
    so ties are true ties and the reference may be compared bit for bit."""
    return (rng.integers(-levels, levels + 1, size=shape) / 4).astype(np.float32)


def brute_force(queries: np.ndarray, docs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The obvious way: all scores, then per query an argsort on (score desc, row asc)."""
    scores = queries.astype(np.float64) @ docs.astype(np.float64).T
    idx, val = [], []
    for row in scores:
        order = sorted(range(len(row)), key=lambda i: (-row[i], i))[:k]
        idx.append(order)
        val.append(row[order])
    return np.array(idx, dtype=np.int64), np.array(val, dtype=np.float32)


@pytest.mark.parametrize(
    "seed,n_docs,chunk,k,dim,levels",
    [(0, 500, 64, 10, 24, 6), (1, 333, 100, 25, 24, 6), (2, 257, 7, 40, 24, 6), (3, 90, 1000, 90, 24, 6),
     (4, 120, 16, 1, 24, 6), (5, 600, 64, 10, 3, 1), (6, 600, 600, 25, 3, 1), (7, 600, 250, 8, 4, 1)],
)
def test_exact_search_equals_brute_force_with_ties(seed, n_docs, chunk, k, dim, levels):
    """Small `dim`/`levels` make scores take few values, so many ties straddle the top-k cut in a chunk."""
    rng = np.random.default_rng(seed)
    docs = quantised(rng, (n_docs, dim), levels)
    # duplicate rows, spread across chunks: their scores tie exactly with their originals
    dup_from = rng.choice(n_docs // 2, size=n_docs // 5, replace=False)
    dup_to = rng.choice(np.arange(n_docs // 2, n_docs), size=len(dup_from), replace=False)
    docs[dup_to] = docs[dup_from]
    queries = quantised(rng, (30, dim), levels)
    queries[0] = 0.0  # every document scores 0: the answer is rows 0..k-1
    hits = exact_search(queries, docs, k, chunk_size=chunk)
    idx, val = brute_force(queries, docs, k)
    assert hits.indices.dtype == np.int64 and hits.scores.dtype == np.float32
    assert hits.indices.shape == hits.scores.shape == (30, k)
    np.testing.assert_array_equal(hits.indices, idx)
    np.testing.assert_array_equal(hits.scores, val)
    np.testing.assert_array_equal(hits.indices[0], np.arange(k))
    # the test really exercises ties, beyond the all-zero query: within the lists or across the cut
    full = queries[1:] @ docs.T
    within = (np.diff(hits.scores[1:], axis=1) == 0).sum()
    across = ((full >= hits.scores[1:, -1:]).sum(axis=1) > k).sum()
    assert within + across > 0


def test_exact_search_on_continuous_data_and_memmap(tmp_path):
    rng = np.random.default_rng(7)
    docs = rng.normal(size=(1000, 32)).astype(np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    np.save(tmp_path / "docs.npy", docs)
    mapped = np.load(tmp_path / "docs.npy", mmap_mode="r")
    queries = rng.normal(size=(40, 32)).astype(np.float32)
    hits = exact_search(queries, mapped, 20, chunk_size=128)
    full = queries @ docs.T
    expected = np.argsort(-full, axis=1, kind="stable")[:, :20]
    np.testing.assert_array_equal(hits.indices, expected)
    np.testing.assert_allclose(hits.scores, np.take_along_axis(full, expected, 1), rtol=1e-5, atol=1e-6)
    assert np.all(np.diff(hits.scores, axis=1) <= 0)
    few = exact_search(queries[:3], mapped, 20, chunk_size=128)  # few queries: numpy's BLAS instead of torch's
    np.testing.assert_array_equal(few.indices, hits.indices[:3])
    np.testing.assert_allclose(few.scores, hits.scores[:3], atol=1e-6)


def test_k_larger_than_corpus_pads():
    rng = np.random.default_rng(3)
    docs = quantised(rng, (5, 8))
    queries = quantised(rng, (3, 8))
    hits = exact_search(queries, docs, 9, chunk_size=2)
    assert hits.indices.shape == (3, 9)
    idx, val = brute_force(queries, docs, 5)
    np.testing.assert_array_equal(hits.indices[:, :5], idx)
    np.testing.assert_array_equal(hits.scores[:, :5], val)
    assert np.all(hits.indices[:, 5:] == -1)
    assert np.all(np.isneginf(hits.scores[:, 5:]))
    assert sorted(hits.indices[0, :5].tolist()) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "queries,docs,k,match",
    [
        (np.zeros((2, 8)), np.zeros((5, 16)), 3, "query dimension 8 differs from document dimension 16"),
        (np.zeros(8), np.zeros((5, 8)), 3, "must be 2-D"),
        (np.zeros((2, 8)), np.zeros((5, 8)), 0, "k must be at least 1"),
        (np.zeros((2, 8)), np.zeros((0, 8)), 3, "no documents"),
    ],
)
def test_bad_shapes_raise_config_error(queries, docs, k, match):
    with pytest.raises(ConfigError, match=match):
        exact_search(queries, docs, k)
    with pytest.raises(ConfigError, match=match):
        search(queries, docs, k, backend="faiss-flat")


def test_unknown_backend():
    with pytest.raises(ConfigError, match="backend must be one of"):
        search(np.zeros((1, 4)), np.zeros((3, 4)), 2, backend="annoy")
    with pytest.raises(ConfigError, match="'flat' or 'hnsw'"):
        FaissIndex("ivf")


def test_faiss_flat_equals_exact(tmp_path):
    rng = np.random.default_rng(11)
    docs = rng.normal(size=(3000, 48)).astype(np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    queries = rng.normal(size=(50, 48)).astype(np.float32)
    exact = exact_search(queries, docs, 30, chunk_size=700)
    flat = search(queries, docs, 30, backend="faiss-flat")
    np.testing.assert_array_equal(flat.indices, exact.indices)
    np.testing.assert_allclose(flat.scores, exact.scores, rtol=1e-5, atol=1e-5)
    index = FaissIndex("flat").build(docs, chunk_size=1000)
    index.save(tmp_path / "flat.faiss")
    loaded = FaissIndex("flat").load(tmp_path / "flat.faiss")
    np.testing.assert_array_equal(loaded.search(queries, 30).indices, exact.indices)
    assert [p.name for p in tmp_path.iterdir()] == ["flat.faiss"]


def test_faiss_pads_like_exact():
    rng = np.random.default_rng(4)
    docs = rng.normal(size=(6, 8)).astype(np.float32)
    queries = rng.normal(size=(2, 8)).astype(np.float32)
    flat = search(queries, docs, 10, backend="faiss-flat")
    exact = exact_search(queries, docs, 10)
    np.testing.assert_array_equal(flat.indices, exact.indices)
    assert np.all(np.isneginf(flat.scores[:, 6:]))


def test_faiss_search_before_build():
    with pytest.raises(ConfigError, match="Build or load"):
        FaissIndex("flat").search(np.zeros((1, 4), np.float32), 1)


def test_faiss_hnsw_recall_against_exact():
    rng = np.random.default_rng(12)
    docs = rng.normal(size=(5000, 32)).astype(np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    queries = rng.normal(size=(200, 32)).astype(np.float32)
    exact = exact_search(queries, docs, 10)
    approx = search(queries, docs, 10, backend="faiss-hnsw")
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx.indices, exact.indices)])
    assert recall > 0.9
    assert np.all(np.diff(approx.scores, axis=1) <= 0)


@pytest.mark.parametrize("k", [1, 5, 10, 60])
def test_faiss_flat_breaks_ties_like_exact(k):
    rng = np.random.default_rng(0)
    docs = quantised(rng, (500, 24))
    docs[300:400] = docs[0:100]  # duplicate documents: their scores tie with the originals
    queries = quantised(rng, (50, 24))
    queries[0] = 0.0  # every document ties
    exact = exact_search(queries, docs, k, chunk_size=128)
    flat = search(queries, docs, k, backend="faiss-flat")
    np.testing.assert_array_equal(flat.indices, exact.indices)
    np.testing.assert_array_equal(flat.scores, exact.scores)
    np.testing.assert_array_equal(flat.indices[0], np.arange(k))
