"""A dataset with its frozen encoder and cached corpus embeddings: what training, evaluation, explanations and the
HTTP service all start from. Inference-side: it imports nothing of training."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .candidates import RankingSet, ranking_set
from .config import EncoderConfig
from .data import Dataset, QuerySet, load_dataset
from .encode import Encoder, encode_corpus, encode_queries
from .errors import ConfigError
from .index import BACKENDS, Hits, search
from .scoring import frozen_scores


@dataclass
class Workspace:
    """A dataset with its frozen encoder, cached corpus embeddings and first-stage depth K: everything needed to
    turn any query set into candidate arrays."""

    dataset: Dataset
    encoder: Encoder
    doc_embs: np.ndarray
    cache_dir: Path | None = None
    k: int = 100
    backend: str = "exact"

    @classmethod
    def open(cls, dataset: str | Path | Dataset, encoder: Encoder | EncoderConfig | None = None, k: int = 100,
             backend: str = "exact", data_dir: str | Path | None = None, cache_dir: str | Path | None = None,
             download: bool = True, drop_unknown: bool = False, device: str = "cpu", batch_size: int | None = None,
             progress: bool = True, log: Callable[[str], None] = lambda _: None) -> "Workspace":
        """Load (or download) the dataset and embed its corpus, reusing the embedding cache; `log` hears which
        encoding path is used (what `precision="auto"` chose) once the inputs are known to be valid."""
        if k < 1:
            raise ConfigError(f"k (first-stage candidates) must be at least 1, got {k}.")
        if backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}.")
        if not isinstance(dataset, Dataset):
            dataset = load_dataset(dataset, data_dir, cache_dir, download, drop_unknown)
        if not isinstance(encoder, Encoder):
            encoder = Encoder(encoder, device, batch_size)
        log(f"encoder: {encoder.describe()}")
        docs = encode_corpus(encoder, dataset.corpus, cache_dir, progress=progress)
        return cls(dataset, encoder, docs, Path(cache_dir) if cache_dir else None, k, backend)

    @property
    def dimension(self) -> int:
        return int(self.doc_embs.shape[1])

    def search(self, query_embs: np.ndarray) -> Hits:
        """The frozen retriever's top-K corpus rows for query embeddings `(Q, d)`."""
        return search(query_embs, self.doc_embs, self.k, self.backend)

    def ranking(self, queries: QuerySet, max_added_positives: int = 0) -> RankingSet:
        """Query embeddings (cached) and the frozen retriever's top-K for every query of the set."""
        embs = np.asarray(encode_queries(self.encoder, queries, self.cache_dir))
        hits = self.search(embs)
        return ranking_set(queries.ids, embs, hits.indices, queries.qrels, self.dataset.corpus.ids, max_added_positives)

    def frozen_scores(self, data: RankingSet) -> np.ndarray:
        """The frozen retriever's cosine for each candidate of a ranking set (-inf at padding)."""
        return frozen_scores(data.query_embs, self.doc_embs, data.candidates)
