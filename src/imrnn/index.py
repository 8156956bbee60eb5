"""First-stage top-k search over cached embeddings: exact chunked matmul, or faiss (flat / HNSW)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .files import atomic_write_with, release_pages, tensor_view
from .errors import ConfigError, DataError

BACKENDS = ("exact", "faiss-flat", "faiss-hnsw")


@dataclass(frozen=True)
class Hits:
    """Top-k results as arrays: row q holds the k best document rows for query q, best first."""

    indices: np.ndarray  # int64 [Q, K], -1 where fewer than K documents exist
    scores: np.ndarray  # float32 [Q, K], -inf where indices is -1


def _sort_topk(indices: np.ndarray, scores: np.ndarray, k: int) -> Hits:
    """Keep the k best per row, ordered by score descending then document row ascending (deterministic)."""
    order = np.lexsort((indices, -scores), axis=1)[:, :k]
    return Hits(np.take_along_axis(indices, order, 1), np.take_along_axis(scores, order, 1))


def exact_search(queries: np.ndarray, docs: np.ndarray, k: int, chunk_size: int = 65536) -> Hits:
    """Exact inner-product top-k, reading `docs` (possibly a memmap) in row chunks so memory stays bounded.

    Rows of a memory-mapped corpus are released from resident memory once scored, and the chunk shrinks for
    large query batches, so peak memory does not grow with the corpus. k > N pads with -1 / -inf. Zero vectors
    are allowed (they score 0); NaN or Inf in queries or documents is a ConfigError naming the first bad row.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    _check_shapes(queries, docs, k)
    _check_finite(queries, "query")
    n_q, n_docs = len(queries), len(docs)
    k_eff = min(k, n_docs)
    chunk_size = max(1, min(chunk_size, max(1024, _MAX_BLOCK_SCORES // max(n_q, 1))))
    best_idx = np.full((n_q, 0), -1, dtype=np.int64)
    best_scores = np.full((n_q, 0), -np.inf, dtype=np.float32)
    for start in range(0, n_docs, chunk_size):
        block = np.asarray(docs[start : start + chunk_size], dtype=np.float32)
        scores = _inner_products(queries, block)
        if not np.isfinite(scores).all():  # a non-finite document value always makes its scores non-finite
            _check_finite(block, "document", start)
        release_pages(docs, start, start + len(block))
        take, width = min(k_eff, scores.shape[1]), scores.shape[1]
        if take < width:
            part = np.argpartition(-scores, take - 1, axis=1)[:, :take]
            kth = np.take_along_axis(scores, part, 1).min(axis=1, keepdims=True)
            if np.any((scores >= kth).sum(1) > take):  # ties straddle the cut: resolve them by row order
                part = np.argsort(-scores, axis=1, kind="stable")[:, :take]
        else:
            part = np.broadcast_to(np.arange(width), scores.shape)
        cand_idx = np.concatenate([best_idx, part.astype(np.int64) + start], axis=1)
        cand_scores = np.concatenate([best_scores, np.take_along_axis(scores, part, 1)], axis=1)
        merged = _sort_topk(cand_idx, cand_scores, k_eff)
        best_idx, best_scores = merged.indices, merged.scores
    return _pad(Hits(best_idx, best_scores.astype(np.float32)), k)


def _pad(hits: Hits, k: int) -> Hits:
    missing = k - hits.indices.shape[1]
    if missing <= 0:
        return hits
    n_q = hits.indices.shape[0]
    return Hits(
        np.concatenate([hits.indices, np.full((n_q, missing), -1, np.int64)], 1),
        np.concatenate([hits.scores, np.full((n_q, missing), -np.inf, np.float32)], 1),
    )


_MAX_BLOCK_SCORES = 1 << 25  # query x document scores per block (~128 MiB of float32, plus argpartition's indices)


_TORCH_MIN_QUERIES = 16


def _inner_products(queries: np.ndarray, block: np.ndarray) -> np.ndarray:
    """queries @ block.T. Batches go through torch's BLAS: numpy's OpenBLAS threads keep spinning after a call and
    slowed the adapter's torch threads that follow (300 SciFact queries: search_embeddings 40-54 ms -> 28 ms). A few
    queries are memory-bound matrix-vector work, where OpenBLAS is about 3x faster than torch's MKL on this CPU."""
    if len(queries) < _TORCH_MIN_QUERIES:
        return queries @ block.T
    return (tensor_view(queries) @ tensor_view(block).T).numpy()


def _check_finite(array: np.ndarray, what: str, offset: int = 0) -> None:
    """ConfigError naming the first row holding NaN or Inf."""
    bad = ~np.isfinite(array).all(axis=-1)
    if bad.any():
        row = int(np.argmax(bad)) + offset
        raise ConfigError(
            f"{int(bad.sum())} {what} embedding(s) hold NaN or Inf values (first: {what} row {row}). Scores against them "
            "are meaningless; re-encode those texts (e.g. with --precision fp32) or drop the rows."
        )


def open_embeddings(path: str | Path, what: str = "corpus") -> np.ndarray:
    """A float32 `(N, d)` .npy file, memory-mapped read-only (never unpickled), with a DataError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Missing {what} embeddings file {path}. Give a float32 (N, d) .npy file (numpy.save).")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"{path} is not a readable .npy file ({err}). Write it with numpy.save(path, float32_array).") from None
    if array.ndim != 2 or array.dtype != np.float32 or 0 in array.shape:
        raise DataError(
            f"{path} holds a {array.dtype} array of shape {array.shape}; {what} embeddings must be a non-empty float32 "
            "(N, d) array. Convert with array.astype(numpy.float32)."
        )
    return array


def _check_shapes(queries: np.ndarray, docs: np.ndarray, k: int) -> None:
    if queries.ndim != 2 or docs.ndim != 2:
        raise ConfigError(f"queries and docs must be 2-D arrays, got shapes {queries.shape} and {docs.shape}.")
    if queries.shape[1] != docs.shape[1]:
        raise ConfigError(
            f"query dimension {queries.shape[1]} differs from document dimension {docs.shape[1]}: "
            "embed both with the same encoder."
        )
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}.")
    if len(docs) == 0:
        raise ConfigError("The corpus has no documents to search.")


class FaissIndex:
    """A faiss inner-product index (flat = exact, hnsw = approximate) built from (memory-mapped) embeddings."""

    def __init__(self, kind: str = "hnsw", hnsw_m: int = 32, ef_construction: int = 80, ef_search: int = 128) -> None:
        try:
            import faiss
        except ImportError as err:
            raise ImportError("The faiss backend needs faiss: pip install 'imrnn[faiss]' (faiss-cpu).") from err
        if kind not in ("flat", "hnsw"):
            raise ConfigError(f"faiss index kind must be 'flat' or 'hnsw', got {kind!r}.")
        self._faiss = faiss
        self.kind = kind
        self.ef_search = ef_search
        self._hnsw_m = hnsw_m
        self._ef_construction = ef_construction
        self.index = None

    def build(self, docs: np.ndarray, chunk_size: int = 100_000) -> "FaissIndex":
        """Add `docs` in chunks, so a memory-mapped corpus is never copied whole into RAM at once."""
        faiss = self._faiss
        dim = docs.shape[1]
        if self.kind == "flat":
            self.index = faiss.IndexFlatIP(dim)
        else:
            self.index = faiss.IndexHNSWFlat(dim, self._hnsw_m, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = self._ef_construction
        for start in range(0, len(docs), chunk_size):
            block = np.ascontiguousarray(docs[start : start + chunk_size], dtype=np.float32)
            _check_finite(block, "document", start)
            self.index.add(block)
            release_pages(docs, start, start + len(block))
        return self

    def save(self, path: str | Path) -> None:
        atomic_write_with(path, lambda name: self._faiss.write_index(self.index, name))

    def load(self, path: str | Path) -> "FaissIndex":
        self.index = self._faiss.read_index(str(path))
        return self

    def search(self, queries: np.ndarray, k: int) -> Hits:
        if self.index is None:
            raise ConfigError("Build or load the faiss index before searching.")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.index.d:
            raise ConfigError(f"queries must be a (Q, {self.index.d}) array for this index, got shape {queries.shape}.")
        if k < 1:
            raise ConfigError(f"k must be at least 1, got {k}.")
        _check_finite(queries, "query")
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = max(self.ef_search, k)
        total = self.index.ntotal
        fetch = k + 1 if self.kind == "flat" and k < total else k
        while True:
            scores, indices = self.index.search(queries, fetch)
            # faiss picks arbitrarily among documents tied at the k-th place; fetch until every tie group at
            # the cut is complete, so the tie-break below (row ascending) gives exactly exact_search's answer
            if fetch == k or fetch >= total or not np.any(scores[:, -1] >= scores[:, k - 1]):
                break
            fetch = min(total, 2 * fetch)
        scores = np.where(indices < 0, -np.inf, scores).astype(np.float32)
        return _sort_topk(indices.astype(np.int64), scores, k)


def search(queries: np.ndarray, docs: np.ndarray, k: int = 100, backend: str = "exact") -> Hits:
    """Top-k documents for each query with the chosen backend (`exact`, `faiss-flat` or `faiss-hnsw`)."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    if backend == "exact":
        return exact_search(queries, docs, k)
    _check_shapes(np.asarray(queries), docs, k)
    return FaissIndex(backend.split("-", 1)[1]).build(docs).search(queries, k)
