"""Framework integrations: LangChain (`imrnn.integrations.langchain`) and LlamaIndex (`imrnn.integrations.llama_index`).

Each submodule needs its own extra (`pip install 'imrnn[langchain]'`, `pip install 'imrnn[llama-index]'`); this
package holds what both share: turning a query's candidates (stored embeddings or texts) into one batched re-ranking.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import ConfigError
from ..files import tensor_view
from ..retriever import IMRNNRetriever
from ..scoring import frozen_cosine

__all__ = ["candidate_embeddings", "rerank_candidates"]


def candidate_embeddings(retriever: IMRNNRetriever, texts: Sequence[str],
                         stored: Sequence[Sequence[float] | None]) -> np.ndarray:
    """`(N, d)` float32 embeddings of N candidates: a candidate's stored vector where it has one (it must come from
    the checkpoint's encoder), else its text, all such texts embedded in one encoder call."""
    if len(texts) != len(stored):
        raise ConfigError(f"Got {len(texts)} candidate texts but {len(stored)} stored embeddings; give one per candidate.")
    dim = retriever.model.config.embedding_dim
    has = np.fromiter((vector is not None for vector in stored), dtype=bool, count=len(stored))
    embs = np.empty((len(texts), dim), dtype=np.float32)
    if has.any():
        rows = np.flatnonzero(has)
        encoder = retriever.encoder.config.model
        try:
            given = np.asarray([stored[i] for i in rows], dtype=np.float32)
        except (TypeError, ValueError):
            raise ConfigError(f"Stored embeddings must be {dim} numbers each (from the checkpoint's encoder {encoder!r}), "
                              f"but the one of candidate {rows[0]} or a later one is not; remove them to embed the "
                              "texts instead.") from None
        if given.shape != (len(rows), dim):
            raise ConfigError(f"Stored embeddings must be {dim}-d vectors from the checkpoint's encoder {encoder!r}, got "
                              f"shape {given.shape[1:]} (candidate {rows[0]}); embed the documents with that encoder "
                              "(IMRNNEmbeddings / IMRNNEmbedding) or remove the stored vectors to embed the texts.")
        bad = np.flatnonzero(~np.isfinite(given).all(axis=1))
        if len(bad):
            raise ConfigError(f"The stored embedding of candidate {rows[bad[0]]} holds NaN or Inf values; re-embed it.")
        embs[rows] = given
    if not has.all():
        missing = np.flatnonzero(~has)
        embs[missing] = retriever.encoder.encode([texts[i] for i in missing], retriever.encoder.config.passage_prefix)
    return embs


def rerank_candidates(retriever: IMRNNRetriever, query: str, texts: Sequence[str],
                      stored: Sequence[Sequence[float] | None]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Re-rank one query's candidates in one batched pass: (order, adapted scores, frozen cosines), best first.

    `order[i]` is the position (in `texts`) of the i-th best candidate; the two score arrays follow `order`."""
    if not isinstance(query, str):
        raise ConfigError(f"The query must be a string, got {type(query).__name__}.")
    embs = candidate_embeddings(retriever, texts, stored)
    query_emb = retriever.encoder.encode_queries([query])
    scores = retriever.rerank_embeddings(query_emb, embs[None])[0]
    base = frozen_cosine(tensor_view(query_emb), tensor_view(embs)[None])[0].numpy()
    order = np.argsort(-scores, kind="stable")
    return order, scores[order], base[order]
