"""Scoring shared by training, evaluation, the retriever and explanations (one definition of each):

* `frozen_cosine`: the frozen retriever's score of a candidate, the baseline every adapted score is compared to;
* `novelty_gate`: the per-query weight of the adapted score, from the nearest training query;
* `blend`: gate * adapted + (1 - gate) * frozen;
* `score_candidates`: the adapter's scores for candidate rows of a corpus, in batches (evaluation, validation),
  by the same `IMRNN.score_rows` as search;
* `frozen_scores`: the same candidates' frozen cosines;
* `sort_by_score`, `ranks`, `repeated_rows`: ordering with the first-stage order as the tie-break.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError
from .files import tensor_view

if TYPE_CHECKING:
    from .model import IMRNN


def frozen_cosine(queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Cosine `[B, K]` of queries `[B, E]` with their candidates `[B, K, E]` (embeddings need not be unit length)."""
    return torch.linalg.vecdot(F.normalize(candidates, dim=-1), F.normalize(queries, dim=-1)[:, None, :])


def nearest_similarity(queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """For each query `[B, E]`, its largest cosine with the rows of a unit-normalised `memory` `[M, E]`."""
    return (F.normalize(queries, dim=-1) @ memory.T).amax(dim=1)


def novelty_gate(nearest: torch.Tensor, threshold: float, width: float) -> torch.Tensor:
    """Weight of the adapted score per query: sigmoid((nearest training-query cosine - threshold) / width)."""
    return torch.sigmoid((nearest - threshold) / width)


def blend(gate: torch.Tensor, adapted: torch.Tensor, frozen: torch.Tensor) -> torch.Tensor:
    """Per-query mix `[B, K]` of adapted and frozen scores by `gate` `[B]`."""
    return gate[:, None] * adapted + (1.0 - gate[:, None]) * frozen


def repeated_rows(rows: np.ndarray) -> np.ndarray:
    """True where a row already appeared earlier in the same list (first occurrences and padding stay False)."""
    ordered = np.sort(rows, axis=1)
    if not ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any():  # the usual case, and a fast check
        return np.zeros(rows.shape, dtype=bool)
    order = np.argsort(rows, axis=1, kind="stable")
    ordered = np.take_along_axis(rows, order, 1)
    repeat = np.zeros(rows.shape, dtype=bool)
    repeat[:, 1:] = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    out = np.zeros_like(repeat)
    np.put_along_axis(out, order, repeat, 1)
    return out


def sort_by_score(candidates: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Re-order each row of candidates by score (descending; ties keep the first-stage order)."""
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(candidates, order, 1), np.take_along_axis(scores, order, 1)


def ranks(scores: np.ndarray) -> np.ndarray:
    """1-based ranks of one list by descending score; ties keep the given (first-stage) order."""
    order = np.argsort(-scores, kind="stable")
    out = np.empty(len(scores), dtype=np.int64)
    out[order] = np.arange(1, len(scores) + 1)
    return out


def frozen_scores(query_embs: np.ndarray, doc_embs: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """The frozen retriever's cosine `(Q, K)` for candidate rows `(Q, K)` of a corpus (-inf at -1 padding)."""
    cands = np.asarray(doc_embs[np.maximum(candidates, 0)], dtype=np.float32)
    scores = frozen_cosine(tensor_view(query_embs), torch.from_numpy(cands)).numpy()
    return np.where(candidates >= 0, scores, -np.inf).astype(np.float32)


def score_candidates(model: IMRNN, query_embs: np.ndarray, doc_embs: np.ndarray | torch.Tensor, candidates: np.ndarray,
                     batch_size: int = 1024) -> np.ndarray:
    """Adapted scores `(Q, K)` for candidate rows `(Q, K)` (-1 = padding -> -inf), in batches of queries, no grad.

    Scored by `IMRNN.score_rows`, the path `IMRNNRetriever.search` takes, so validation, evaluation and search rank
    alike: per batch, each distinct candidate row is gathered and projected once however many lists share it (a
    memory-mapped corpus is never copied whole). A row repeated within one query's list is scored once: later copies
    count as padding (-inf), so a document neither appears twice in a ranking nor weighs twice in the feedback. A
    query without candidates gets all -inf. NaN or Inf in a query or a candidate's embedding is a ConfigError."""
    candidates = np.asarray(candidates)
    if candidates.ndim != 2:
        raise ConfigError(f"candidates must be a (Q, K) array of corpus rows, got shape {candidates.shape}.")
    if candidates.size and int(candidates.max()) >= len(doc_embs):
        raise ConfigError(f"candidate row {int(candidates.max())} is out of range for a corpus of {len(doc_embs)} documents.")
    candidates = np.where(repeated_rows(candidates), -1, candidates)
    model.eval()
    device = next(model.parameters()).device
    out = np.full(candidates.shape, -np.inf, dtype=np.float32)
    for start in range(0, len(candidates), batch_size):
        block = candidates[start : start + batch_size]
        valid = block >= 0
        distinct, position = np.unique(block[valid], return_inverse=True)
        if not len(distinct):
            continue
        rows = np.zeros(block.shape, dtype=np.int64)
        rows[valid] = position
        table = _finite_rows(doc_embs, distinct)
        queries = _finite_queries(np.asarray(query_embs[start : start + batch_size], dtype=np.float32), start)
        scores, _ = model.score_rows(queries.to(device), torch.from_numpy(rows).to(device), torch.from_numpy(valid).to(device),
                                     model.cache_corpus(table))
        scores = scores.float().cpu().numpy()
        if np.isnan(scores[valid]).any():
            raise ConfigError("The adapter produced NaN scores from finite inputs: embeddings of extreme magnitude overflow "
                              "float32. Pass L2-normalised embeddings (as the encoder produces).")
        out[start : start + len(block)] = scores
    return out


def _finite_rows(doc_embs: np.ndarray | torch.Tensor, rows: np.ndarray) -> torch.Tensor:
    """Corpus `rows` as a float32 tensor; ConfigError naming the first row holding NaN or Inf."""
    if isinstance(doc_embs, torch.Tensor):
        table = doc_embs[torch.from_numpy(rows)].float()
    else:
        table = torch.from_numpy(np.asarray(doc_embs[rows], dtype=np.float32))
    finite = torch.isfinite(table).all(dim=1)
    if not bool(finite.all()):
        raise ConfigError(f"candidate embeddings hold NaN or Inf values (first: corpus row {int(rows[int((~finite).nonzero()[0])])}). "
                          "Scores against them are meaningless; re-encode those passages or drop them.")
    return table


def _finite_queries(queries: np.ndarray, offset: int) -> torch.Tensor:
    """`queries` as a tensor; ConfigError naming the first query row holding NaN or Inf (counted from `offset`)."""
    finite = np.isfinite(queries).all(axis=1)
    if not finite.all():
        raise ConfigError(f"query embeddings hold NaN or Inf values (first: query row {offset + int(np.argmin(finite))}). "
                          "Scores for them are meaningless; re-encode those queries or drop them.")
    return torch.from_numpy(queries)
