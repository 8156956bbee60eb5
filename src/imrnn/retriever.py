"""High-level API: a frozen encoder + trained adapters as one retriever (index, search, re-rank)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .data import Corpus
from .encode import Encoder, encode_cached
from .errors import ConfigError
from .index import BACKENDS, FaissIndex, exact_search
from .model import IMRNN


@dataclass(frozen=True)
class Ranking:
    """One query's results, best first: document ids, adapted scores and the frozen retriever's scores."""

    ids: list[str]
    scores: np.ndarray
    base_scores: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def _as_corpus(corpus: Corpus | Mapping[str, str] | Sequence[str] | Sequence[Mapping[str, str]], ids: Sequence[str] | None) -> Corpus:
    """Accept a Corpus, {id: text}, a list of texts (+ ids), or BEIR-style dicts with _id/title/text."""
    if isinstance(corpus, Corpus):
        return corpus
    if isinstance(corpus, Mapping):
        keys = [str(k) for k in corpus]
        return Corpus(np.array(keys, dtype=object), [""] * len(keys), [str(v) for v in corpus.values()])
    items = list(corpus)
    if items and isinstance(items[0], Mapping):
        keys = [str(d.get("_id", i)) for i, d in enumerate(items)]
        return Corpus(np.array(keys, dtype=object), [d.get("title") or "" for d in items], [d.get("text") or "" for d in items])
    keys = [str(i) for i in ids] if ids is not None else [str(i) for i in range(len(items))]
    if len(keys) != len(items):
        raise ConfigError(f"Got {len(items)} documents but {len(keys)} ids; give one id per document.")
    if len(set(keys)) != len(keys):
        raise ConfigError("Document ids must be unique.")
    return Corpus(np.array(keys, dtype=object), [""] * len(items), [str(t) for t in items])


class IMRNNRetriever:
    """Frozen bi-encoder first stage (top-`candidates`) re-ranked by IMRNN adapters, on batches of queries."""

    def __init__(self, checkpoint: Checkpoint, device: str = "cpu", candidates: int = 100, backend: str = "exact",
                 cache_dir: str | Path | None = None, batch_size: int = 64) -> None:
        if backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}.")
        if candidates < 1:
            raise ConfigError(f"candidates must be at least 1, got {candidates}.")
        self.checkpoint = checkpoint
        self.model: IMRNN = checkpoint.model.to(device).eval()
        self.encoder = Encoder(checkpoint.encoder, device, batch_size)
        self.device = device
        self.candidates = candidates
        self.backend = backend
        self.cache_dir = cache_dir
        self.doc_ids: np.ndarray | None = None
        self.doc_embs: np.ndarray | None = None
        self._faiss: FaissIndex | None = None
        self._projected: torch.Tensor | None = None

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path, device: str = "cpu", **kwargs) -> "IMRNNRetriever":
        """Rebuild encoder and adapters from a checkpoint folder written by `imrnn train` or `save_pretrained`."""
        return cls(load_checkpoint(checkpoint_dir, device), device, **kwargs)

    def save_pretrained(self, directory: str | Path) -> Path:
        return save_checkpoint(self.checkpoint, directory)

    def index(self, corpus: Corpus | Mapping[str, str] | Sequence[str] | Sequence[Mapping[str, str]],
              ids: Sequence[str] | None = None, progress: bool = True) -> "IMRNNRetriever":
        """Embed the corpus (reusing the on-disk cache when the texts and encoder are unchanged)."""
        corpus = _as_corpus(corpus, ids)
        if len(corpus) == 0:
            raise ConfigError("Cannot index an empty corpus.")
        embs = encode_cached(self.encoder, corpus.ids.tolist(), corpus.passages(), self.cache_dir, "passage", progress=progress)
        self._check_dim(embs.shape[1])
        self.doc_ids, self.doc_embs = corpus.ids, embs
        self._faiss = FaissIndex(self.backend.split("-", 1)[1]).build(embs) if self.backend != "exact" else None
        self._projected = self.model.project_corpus(embs)  # once per corpus: search() then only gathers rows
        return self

    def _check_dim(self, dim: int) -> None:
        if dim != self.model.config.embedding_dim:
            raise ConfigError(
                f"Embeddings are {dim}-d but the adapter expects {self.model.config.embedding_dim}-d: "
                f"use the encoder the checkpoint was trained with ({self.checkpoint.encoder.model})."
            )

    def search(self, queries: str | Sequence[str], k: int = 10) -> list[Ranking]:
        """Top-k documents per query: first-stage top-`candidates`, re-scored by the adapters in one batch."""
        if self.doc_embs is None or self.doc_ids is None:
            raise ConfigError("Call index(corpus) before search().")
        texts = [queries] if isinstance(queries, str) else list(queries)
        query_embs = self.encoder.encode_queries(texts)
        return self.search_embeddings(query_embs, k)

    def search_embeddings(self, query_embs: np.ndarray, k: int = 10) -> list[Ranking]:
        """`search` from already-computed query embeddings `(Q, d)`."""
        if self.doc_embs is None or self.doc_ids is None:
            raise ConfigError("Call index(corpus) before search().")
        if k < 1:
            raise ConfigError(f"k must be at least 1, got {k}.")
        depth = max(self.candidates, k)
        hits = self._faiss.search(query_embs, depth) if self._faiss is not None else exact_search(query_embs, self.doc_embs, depth)
        if self._projected is None or len(self._projected) != len(self.doc_embs):
            self._projected = self.model.project_corpus(self.doc_embs)
        valid = hits.indices >= 0
        candidate_rows = torch.from_numpy(np.maximum(hits.indices, 0))
        queries = torch.from_numpy(np.array(query_embs, np.float32)).to(self.device)
        base = torch.from_numpy(np.where(valid, hits.scores, 0.0).astype(np.float32)).to(self.device)
        projected = self._projected[candidate_rows]
        scores = self.model.fast_scores(queries, projected, base, torch.from_numpy(valid).to(self.device)).cpu().numpy()
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        rows, adapted, base = (np.take_along_axis(a, order, 1) for a in (hits.indices, scores, hits.scores))
        return [self._ranking(r, a, b) for r, a, b in zip(rows, adapted, base)]

    def _ranking(self, rows: np.ndarray, scores: np.ndarray, base: np.ndarray) -> Ranking:
        keep = rows >= 0
        return Ranking(self.doc_ids[rows[keep]].tolist(), scores[keep], base[keep])

    def rerank(self, query: str, documents: Sequence[str], ids: Sequence[str] | None = None) -> Ranking:
        """Re-rank the given documents for one query (texts are embedded on the fly, not cached)."""
        if len(documents) == 0:
            raise ConfigError("rerank() needs at least one document.")
        keys = [str(i) for i in ids] if ids is not None else [str(i) for i in range(len(documents))]
        if len(keys) != len(documents):
            raise ConfigError(f"Got {len(documents)} documents but {len(keys)} ids.")
        if len(set(keys)) != len(keys):
            raise ConfigError("rerank() ids must be unique: a ranking lists each document once.")
        query_emb = self.encoder.encode_queries([query])
        doc_embs = self.encoder.encode(list(documents), self.encoder.config.passage_prefix)
        self._check_dim(doc_embs.shape[1])
        scores = self.rerank_embeddings(query_emb, doc_embs[None])[0]
        base = doc_embs @ query_emb[0]
        order = np.argsort(-scores, kind="stable")
        return Ranking([keys[i] for i in order], scores[order], base[order])

    def rerank_embeddings(self, query_embs: np.ndarray | torch.Tensor, candidate_embs: np.ndarray | torch.Tensor,
                          mask: np.ndarray | torch.Tensor | None = None) -> np.ndarray | torch.Tensor:
        """Adapted scores `(Q, K)` for queries `(Q, d)` and candidates `(Q, K, d)` in one batched pass.

        Returns the same kind of array it was given (NumPy in, NumPy out; torch in, torch out)."""
        as_torch = isinstance(query_embs, torch.Tensor)
        queries = torch.as_tensor(np.asarray(query_embs, np.float32) if not as_torch else query_embs, device=self.device).float()
        cands = candidate_embs if isinstance(candidate_embs, torch.Tensor) else torch.from_numpy(np.asarray(candidate_embs, np.float32))
        valid = None if mask is None else torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask, device=self.device).bool()
        with torch.inference_mode():
            cands = cands.to(self.device).float()
            if valid is not None and not bool(valid.all()):
                cands = cands.masked_fill(~valid[..., None], 0.0)
            if bool(torch.isfinite(queries).all()) and bool(torch.isfinite(cands).all()) and cands.shape[-1] == queries.shape[-1]:
                base = torch.einsum("bd,bkd->bk", F.normalize(queries, dim=-1), F.normalize(cands, dim=-1))
                scores = self.model.fast_scores(queries, self.model.project(cands), base, valid)
            else:  # the checked path raises a clear error for bad shapes or non-finite values
                scores = self.model(queries, cands, valid).scores
        return scores if as_torch else scores.cpu().numpy()

