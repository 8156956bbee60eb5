"""Candidate sets: a query set as arrays (query embeddings, first-stage candidate rows, their grades), the unit
that training, validation and evaluation all work on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .data import Qrels
from .negatives import relevance_matrix, training_candidates


@dataclass
class RankingSet:
    """A query set as arrays: query embeddings, candidate corpus rows `(Q, K)` (-1 = padding) and their grades."""

    query_ids: list[str]
    query_embs: np.ndarray
    candidates: np.ndarray
    grades: np.ndarray
    qrels: Qrels


def ranking_set(
    query_ids: Sequence[str], query_embs: np.ndarray, base_candidates: np.ndarray, qrels: Qrels, doc_ids: np.ndarray,
    max_added_positives: int = 0, extra_negatives: np.ndarray | None = None,
) -> RankingSet:
    """Arrays for a query set: base candidates (plus missing positives for training, and extra negatives)."""
    relevance = relevance_matrix(query_ids, qrels, doc_ids)
    candidates, grades = training_candidates(base_candidates, relevance, max_added_positives)
    if extra_negatives is not None and extra_negatives.shape[1] > 0:
        candidates, grades = append_negatives(candidates, grades, extra_negatives)
    return RankingSet(list(query_ids), query_embs, candidates, grades, {q: qrels[q] for q in query_ids})


def select_queries(sets: Sequence[RankingSet], ids: Sequence[str]) -> RankingSet:
    """The rows of `ids` (in that order) from ranking sets of one first stage: a query set's ranking without searching
    the corpus again."""
    row = {q: (i, j) for i, data in enumerate(sets) for j, q in enumerate(data.query_ids)}
    picked = [row[q] for q in ids]

    def rows(field: str) -> np.ndarray:
        return np.stack([np.asarray(getattr(sets[i], field))[j] for i, j in picked])

    qrels = {q: r for data in sets for q, r in data.qrels.items()}
    return RankingSet(list(ids), rows("query_embs"), rows("candidates"), rows("grades"), {q: qrels[q] for q in ids})


def append_negatives(candidates: np.ndarray, grades: np.ndarray, negatives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Append extra negatives as new columns, masking (-1) those already among the candidates."""
    present = (negatives[:, :, None] == candidates[:, None, :]).any(2)
    negatives = np.where(present, -1, negatives)
    return np.concatenate([candidates, negatives], 1), np.concatenate([grades, np.zeros(negatives.shape, np.float32)], 1)
