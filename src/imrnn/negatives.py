"""Training candidate sets and hard negatives: dense (base retriever top-K) and lexical (BM25 via bm25s)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import sparse

from .data import Qrels


def relevance_matrix(query_ids: Sequence[str], qrels: Qrels, doc_ids: np.ndarray) -> sparse.csr_matrix:
    """A `(Q, N)` sparse matrix of positive grades: row q, column = document row in the corpus."""
    position = {d: i for i, d in enumerate(doc_ids.tolist())}
    rows, cols, vals = [], [], []
    for q_row, qid in enumerate(query_ids):
        for doc, grade in qrels.get(qid, {}).items():
            if grade > 0 and doc in position:
                rows.append(q_row)
                cols.append(position[doc])
                vals.append(grade)
    return sparse.csr_matrix(
        (np.asarray(vals, np.float32), (np.asarray(rows, np.int64), np.asarray(cols, np.int64))),
        shape=(len(query_ids), len(doc_ids)),
    )


def gather_grades(relevance: sparse.csr_matrix, candidates: np.ndarray) -> np.ndarray:
    """Grades `(Q, K)` of each candidate row (0 for non-relevant and for -1 padding), vectorised."""
    q_rows = np.repeat(np.arange(candidates.shape[0]), candidates.shape[1])
    cols = np.maximum(candidates.ravel(), 0)
    grades = np.asarray(relevance[q_rows, cols]).reshape(candidates.shape).astype(np.float32)
    return np.where(candidates >= 0, grades, 0.0).astype(np.float32)


def training_candidates(
    base_candidates: np.ndarray, relevance: sparse.csr_matrix, max_added_positives: int
) -> tuple[np.ndarray, np.ndarray]:
    """The base top-K of each training query with up to `max_added_positives` missing positives put in.

    Inserted positives replace the lowest-ranked non-relevant candidates, so training sees the same kind of
    candidate list as inference, plus the positives the first stage missed. Returns (candidates, grades).
    """
    candidates = base_candidates.copy()
    grades = gather_grades(relevance, candidates)
    if max_added_positives <= 0:
        return candidates, grades
    found = (grades > 0).sum(1)
    wanted = np.diff(relevance.indptr)
    for q in np.flatnonzero(found < wanted):  # only queries whose first stage missed a positive
        row_cols = relevance.indices[relevance.indptr[q] : relevance.indptr[q + 1]]
        row_vals = relevance.data[relevance.indptr[q] : relevance.indptr[q + 1]]
        missing = ~np.isin(row_cols, candidates[q])
        order = np.argsort(-row_vals[missing], kind="stable")[:max_added_positives]
        slots = np.flatnonzero(grades[q] <= 0)[::-1][: len(order)]
        candidates[q, slots] = row_cols[missing][order][: len(slots)]
        grades[q, slots] = row_vals[missing][order][: len(slots)]
    return candidates, grades


def dense_negatives(candidates: np.ndarray, grades: np.ndarray, count: int) -> np.ndarray:
    """The `count` best-ranked non-relevant candidates per query `(Q, count)`, -1 where too few exist."""
    negative = (grades <= 0) & (candidates >= 0)
    order = np.argsort(~negative, axis=1, kind="stable")[:, :count]  # keeps rank order among negatives
    picked = np.take_along_axis(candidates, order, 1)
    return np.where(np.take_along_axis(negative, order, 1), picked, -1)


def bm25_negatives(
    corpus_texts: Sequence[str], query_texts: Sequence[str], relevance: sparse.csr_matrix, count: int, batch_size: int = 4096
) -> np.ndarray:
    """Top BM25 documents that are not relevant, `(Q, count)` corpus rows (-1 where too few), via bm25s."""
    try:
        import bm25s
    except ImportError as err:  # pragma: no cover - core dependency
        raise ImportError("BM25 negatives need bm25s: pip install bm25s") from err
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(list(corpus_texts), stopwords="en", show_progress=False), show_progress=False)
    extra = int(np.diff(relevance.indptr).max(initial=0))
    k = min(count + extra, len(corpus_texts))
    result = np.full((len(query_texts), count), -1, dtype=np.int64)
    for start in range(0, len(query_texts), batch_size):
        tokens = bm25s.tokenize(list(query_texts[start : start + batch_size]), stopwords="en", show_progress=False)
        docs, _ = retriever.retrieve(tokens, k=k, show_progress=False, n_threads=0)
        docs = np.asarray(docs, dtype=np.int64)
        grades = gather_grades(relevance[start : start + batch_size], docs)
        result[start : start + len(docs)] = dense_negatives(docs, grades, count)
    return result
