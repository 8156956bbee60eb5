"""High-level API: a frozen encoder + trained adapters as one retriever (index, search, re-rank)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .data import Corpus
from .encode import Encoder, encode_cached
from .errors import ConfigError
from .index import BACKENDS, FaissIndex, exact_search
from .files import tensor_view
from .model import IMRNN, CorpusCache
from .scoring import frozen_cosine, repeated_rows
from .store.adapter import AdapterIdentity, rerank_hits
from .store.base import Records, VectorStore, open_store
from .store.config import StoreConfig


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
                 cache_dir: str | Path | None = None, batch_size: int | None = None) -> None:
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
        self._cache: CorpusCache | None = None  # model.cache_corpus(doc_embs), made once per corpus
        self._cache_source: np.ndarray | None = None
        self._row_of: dict[str, int] | None = None  # document id -> corpus row, for rerank_ids

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path, device: str = "cpu", **kwargs) -> "IMRNNRetriever":
        """Rebuild encoder and adapters from a checkpoint folder written by `imrnn train` or `save_pretrained`."""
        return cls(load_checkpoint(checkpoint_dir, device), device, **kwargs)

    def save_pretrained(self, directory: str | Path) -> Path:
        return save_checkpoint(self.checkpoint, directory)

    @classmethod
    def connect(cls, checkpoint_dir: str | Path, store: str | VectorStore, device: str = "cpu",
                store_config: StoreConfig | None = None, **kwargs) -> "StoreRetriever":
        """A retriever whose corpus lives in a vector store (`StoreRetriever`): `store` is a URI such as
        "milvus:./scifact.db" (Milvus Lite, embedded), "milvus:http://host:19530", "qdrant:./folder" or an open store."""
        opened = open_store(store, store_config) if isinstance(store, str) else store
        try:
            return StoreRetriever(load_checkpoint(checkpoint_dir, device), opened, device,
                                  checkpoint_path=str(checkpoint_dir), **kwargs)
        except BaseException:
            opened.close()
            raise

    def index(self, corpus: Corpus | Mapping[str, str] | Sequence[str] | Sequence[Mapping[str, str]],
              ids: Sequence[str] | None = None, progress: bool = True) -> "IMRNNRetriever":
        """Embed the corpus (reusing the on-disk cache when the texts and encoder are unchanged)."""
        corpus = _as_corpus(corpus, ids)
        if len(corpus) == 0:
            raise ConfigError("Cannot index an empty corpus.")
        embs = encode_cached(self.encoder, corpus.ids.tolist(), corpus.passages(), self.cache_dir, "passage", progress=progress)
        return self.index_embeddings(embs, corpus.ids)

    def index_embeddings(self, embeddings: np.ndarray, ids: Sequence[str] | None = None) -> "IMRNNRetriever":
        """Index document embeddings computed elsewhere (`(N, d)`, from the checkpoint's encoder), e.g. a vector
        database export; `ids` default to "0" ... "N-1". A memory-mapped array is read in chunks, not copied.
        Each document is projected once here, so `search` and `rerank_ids` only gather rows."""
        embs = embeddings if isinstance(embeddings, np.ndarray) else _float_array(embeddings, "Document embeddings")
        if embs.ndim != 2 or len(embs) == 0:
            raise ConfigError(f"Document embeddings must be a non-empty (N, d) array, got shape {embs.shape}.")
        self._check_dim(embs.shape[1])
        keys = np.array([str(i) for i in (ids if ids is not None else range(len(embs)))], dtype=object)
        if len(keys) != len(embs):
            raise ConfigError(f"Got {len(embs)} embeddings but {len(keys)} ids; give one id per document.")
        if len(set(keys.tolist())) != len(keys):
            raise ConfigError("Document ids must be unique.")
        cache = self.model.cache_corpus(embs)
        broken = torch.nonzero(~torch.isfinite(cache.norms))
        if len(broken):
            raise ConfigError(f"Document embeddings hold NaN or Inf values (first at document row {int(broken[0])}); "
                              "re-encode those documents or drop them.")
        self._faiss = FaissIndex(self.backend.split("-", 1)[1]).build(embs) if self.backend != "exact" else None
        self.doc_ids, self.doc_embs, self._row_of = keys, embs, None
        self._cache, self._cache_source = cache, embs
        return self

    def _check_dim(self, dim: int) -> None:
        if dim != self.model.config.embedding_dim:
            raise ConfigError(
                f"Embeddings are {dim}-d but the adapter expects {self.model.config.embedding_dim}-d: "
                f"use the encoder the checkpoint was trained with ({self.checkpoint.encoder.model})."
            )

    def search(self, queries: str | Sequence[str], k: int = 10) -> list[Ranking]:
        """Top-k documents per query: first-stage top-`candidates`, re-scored by the adapters in one batch."""
        self._indexed("search()")
        texts = [queries] if isinstance(queries, str) else list(queries)
        query_embs = self.encoder.encode_queries(texts)
        return self.search_embeddings(query_embs, k)

    def search_embeddings(self, query_embs: np.ndarray, k: int = 10) -> list[Ranking]:
        """`search` from already-computed query embeddings `(Q, d)`."""
        corpus = self._indexed("search()")
        if k < 1:
            raise ConfigError(f"k must be at least 1, got {k}.")
        depth = max(self.candidates, k)
        hits = self._faiss.search(query_embs, depth) if self._faiss is not None else exact_search(query_embs, corpus, depth)
        return self._rerank_rows(np.asarray(query_embs, np.float32), hits.indices, k)

    def rerank_ids(self, query_embs: np.ndarray, candidates: Sequence[Sequence[str]] | np.ndarray,
                   k: int | None = None) -> list[Ranking]:
        """Re-rank candidates found by another first stage (BM25, a vector database) for queries `(Q, d)`.

        `candidates` holds one list of document ids of the indexed corpus per query (lists may differ in length;
        an id repeated in a list counts once), or an integer array `(Q, K)` of corpus rows with -1 as padding.
        Their projections were computed once by `index()`, so this is the fastest way to re-rank."""
        self._indexed("rerank_ids()")
        queries = _float_array(query_embs, "Query embeddings")
        rows = self._candidate_rows(candidates)
        if queries.ndim != 2 or len(queries) != len(rows) or queries.shape[1] != self.doc_embs.shape[1]:
            raise ConfigError(f"Expected query embeddings (Q, {self.doc_embs.shape[1]}) with Q = {len(rows)} "
                              f"candidate lists, got shape {queries.shape}.")
        _check_finite_rows(queries)
        if k is not None and k < 1:
            raise ConfigError(f"k must be at least 1, got {k}.")
        return self._rerank_rows(queries, np.where(repeated_rows(rows), -1, rows), k or rows.shape[1])

    def _indexed(self, what: str) -> np.ndarray:
        if self.doc_embs is None or self.doc_ids is None:
            raise ConfigError(f"Call index(corpus) or index_embeddings(embeddings) before {what}.")
        return self.doc_embs

    def _candidate_rows(self, candidates: Sequence[Sequence[str]] | np.ndarray) -> np.ndarray:
        """Corpus rows `(Q, K)` (-1 = padding) for lists of ids or an integer row array, with clear errors."""
        if isinstance(candidates, np.ndarray) and np.issubdtype(candidates.dtype, np.integer):
            if candidates.ndim != 2:
                raise ConfigError(f"Candidate rows must be a (Q, K) integer array, got shape {candidates.shape}.")
            if candidates.size and (candidates.min() < -1 or candidates.max() >= len(self.doc_embs)):
                raise ConfigError(f"Candidate rows must lie in [-1, {len(self.doc_embs)}) (-1 = padding); "
                                  f"got values from {candidates.min()} to {candidates.max()}.")
            return candidates.astype(np.int64, copy=False)
        shape_error = ConfigError("candidates must hold one list of document ids per query, e.g. [['d1', 'd7'], ['d3']].")
        try:
            lists = [ids if isinstance(ids, list) else list(ids) for ids in candidates]
        except TypeError:  # not iterable, or an entry that is not a list
            raise shape_error from None
        if isinstance(candidates, (str, bytes)) or any(isinstance(ids, (str, bytes)) for ids in candidates):
            raise shape_error
        if self._row_of is None:
            self._row_of = {doc_id: row for row, doc_id in enumerate(self.doc_ids.tolist())}
        lengths = np.array([len(ids) for ids in lists], dtype=np.int64)
        flat = list(itertools.chain.from_iterable(lists))
        try:
            found = np.fromiter(map(self._row_of.__getitem__, flat), dtype=np.int64, count=len(flat))
        except (KeyError, TypeError):  # ids that are not strings, or unknown ids
            missing = next((i for i, doc_id in enumerate(flat) if str(doc_id) not in self._row_of), None)
            if missing is not None:
                raise ConfigError(f"Candidate list {int(np.searchsorted(np.cumsum(lengths), missing, side='right'))} names "
                                  f"document id {str(flat[missing])!r}, which is not in the indexed corpus; pass ids of "
                                  "documents given to index().") from None
            found = np.fromiter((self._row_of[str(doc_id)] for doc_id in flat), dtype=np.int64, count=len(flat))
        rows = np.full((len(lists), int(lengths.max(initial=0))), -1, dtype=np.int64)
        rows[np.arange(rows.shape[1]) < lengths[:, None]] = found
        return rows

    def _rerank_rows(self, queries: np.ndarray, rows: np.ndarray, k: int) -> list[Ranking]:
        """Adapted scores for corpus `rows` (-1 = padding) through the projected-corpus cache, best `k` per query."""
        if self._cache is None or self._cache_source is not self.doc_embs:
            self._cache, self._cache_source = self.model.cache_corpus(self.doc_embs), self.doc_embs
        valid = rows >= 0
        scores, base = self.model.score_rows(
            tensor_view(queries).to(self.device), torch.from_numpy(np.maximum(rows, 0)).to(self.device),
            torch.from_numpy(valid).to(self.device), self._cache)
        scores, base = scores.cpu().numpy(), base.cpu().numpy()
        broken = np.isnan(scores) & valid
        if broken.any():
            raise ConfigError(f"Document embeddings hold NaN or Inf values (document row {rows[broken][0]}); "
                              "re-index the corpus with index().")
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        rows, adapted, base = (np.take_along_axis(a, order, 1) for a in (rows, scores, base))
        ids = self.doc_ids[np.maximum(rows, 0)].tolist()
        if (rows >= 0).all():  # no padding: one vectorised lookup serves every query
            return [Ranking(i, a, b) for i, a, b in zip(ids, adapted, base)]
        return [Ranking([d for d, ok in zip(i, keep) if ok], a[keep], b[keep])
                for i, a, b, keep in zip(ids, adapted, base, rows >= 0)]

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
        base = frozen_cosine(tensor_view(query_emb), tensor_view(doc_embs)[None])[0].numpy()
        order = np.argsort(-scores, kind="stable")
        return Ranking([keys[i] for i in order], scores[order], base[order])

    def rerank_embeddings(self, query_embs: np.ndarray | torch.Tensor, candidate_embs: np.ndarray | torch.Tensor,
                          mask: np.ndarray | torch.Tensor | None = None) -> np.ndarray | torch.Tensor:
        """Adapted scores `(Q, K)` for queries `(Q, d)` and candidates `(Q, K, d)` in one batched pass.

        Returns the same kind of array it was given (NumPy in, NumPy out; torch in, torch out)."""
        as_torch = isinstance(query_embs, torch.Tensor)
        queries = torch.as_tensor(query_embs if as_torch else np.asarray(query_embs, np.float32), device=self.device).float()
        cands = torch.as_tensor(candidate_embs if isinstance(candidate_embs, torch.Tensor)
                                else np.asarray(candidate_embs, np.float32), device=self.device).float()
        valid = None if mask is None else torch.as_tensor(mask if isinstance(mask, torch.Tensor) else np.asarray(mask), device=self.device)
        scores, _ = self.model.score_embeddings(queries, cands, valid)
        return scores if as_torch else scores.cpu().numpy()


def _float_array(values: np.ndarray | Sequence, what: str) -> np.ndarray:
    """`values` as float32, or a ConfigError saying what could not be read as numbers."""
    try:
        return np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{what} must be numbers in an array, e.g. a float32 NumPy array ({err}).") from None


def _check_finite_rows(queries: np.ndarray) -> None:
    bad = np.flatnonzero(~np.isfinite(queries).all(axis=1))
    if len(bad):
        raise ConfigError(f"Query embeddings hold NaN or Inf values (first at query row {bad[0]}); re-encode that query.")


class StoreRetriever(IMRNNRetriever):
    """An `IMRNNRetriever` whose first stage is a vector store (made by `IMRNNRetriever.connect`).

    `search` takes the store's top-`candidates` with their stored frozen and projected vectors and re-ranks them
    (`rerank_hits`: rows are gathered, never projected again); `index` / `index_embeddings` add or overwrite
    documents and `delete` removes them, visible to the next search. The collection must have been made by the
    same encoder and checkpoint (else a StoreError naming `imrnn index --reproject`). Close it (or use `with`)."""

    def __init__(self, checkpoint: Checkpoint, store: VectorStore, device: str = "cpu", candidates: int = 100,
                 batch_size: int | None = None, checkpoint_path: str = "", cache_dir: str | Path | None = None) -> None:
        super().__init__(checkpoint, device, candidates, "exact", cache_dir, batch_size)
        self.store = store
        self.identity = AdapterIdentity.of(self.model, self.encoder, checkpoint_path)
        if store.exists():
            self.identity.check(store.info(), store.uri)

    def __enter__(self) -> "StoreRetriever":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.store.close()

    def index(self, corpus: Corpus | Mapping[str, str] | Sequence[str] | Sequence[Mapping[str, str]],
              ids: Sequence[str] | None = None, progress: bool = True) -> "StoreRetriever":
        """Add documents to the store (an id already there is overwritten): embedded (through the embedding cache)
        and projected once here, stored with their title and text."""
        corpus = _as_corpus(corpus, ids)
        if len(corpus) == 0:
            raise ConfigError("Cannot index an empty corpus.")
        embs = encode_cached(self.encoder, corpus.ids.tolist(), corpus.passages(), self.cache_dir, "passage", progress=progress)
        return self._add(corpus.ids.tolist(), np.asarray(embs), corpus.titles, corpus.texts)

    def index_embeddings(self, embeddings: np.ndarray, ids: Sequence[str] | None = None) -> "StoreRetriever":
        """Add documents from embeddings computed elsewhere (`(N, d)`, the checkpoint's encoder), without payload."""
        embs = _float_array(embeddings, "Document embeddings")
        if embs.ndim != 2 or len(embs) == 0:
            raise ConfigError(f"Document embeddings must be a non-empty (N, d) array, got shape {embs.shape}.")
        self._check_dim(embs.shape[1])
        keys = [str(i) for i in (ids if ids is not None else range(len(embs)))]
        if len(keys) != len(embs) or len(set(keys)) != len(keys):
            raise ConfigError(f"Give one unique id per embedding: got {len(embs)} embeddings and {len(set(keys))} distinct "
                              f"of {len(keys)} ids.")
        return self._add(keys, embs, [""] * len(keys), [""] * len(keys))

    def _add(self, ids: list[str], embs: np.ndarray, titles: list[str], texts: list[str]) -> "StoreRetriever":
        cache = self.model.cache_corpus(embs)
        broken = torch.nonzero(~torch.isfinite(cache.norms))
        if len(broken):
            raise ConfigError(f"Document embeddings hold NaN or Inf values (first at document row {int(broken[0])}); "
                              "re-encode those documents or drop them.")
        if not self.store.exists():
            self.store.create(self.identity.embedding_dim, self.identity.projected_dim, self.identity.metadata("ready"))
        self.store.upsert(Records(ids, embs, cache.projected.cpu().numpy(), list(titles), list(texts)))
        return self

    def delete(self, ids: Sequence[str]) -> "StoreRetriever":
        """Remove documents by id from the store (ids it does not hold are ignored)."""
        self.store.delete(ids)
        return self

    def search(self, queries: str | Sequence[str], k: int = 10) -> list[Ranking]:
        texts = [queries] if isinstance(queries, str) else list(queries)
        return self.search_embeddings(self.encoder.encode_queries(texts), k)

    def search_embeddings(self, query_embs: np.ndarray, k: int = 10) -> list[Ranking]:
        """The store's top-`candidates` for queries `(Q, d)`, re-ranked by the adapters from the stored vectors."""
        if k < 1:
            raise ConfigError(f"k must be at least 1, got {k}.")
        queries = _float_array(query_embs, "Query embeddings")
        hits = self.store.search(queries, max(self.candidates, k))
        ids, scores, base = rerank_hits(self.model, queries, hits, k, self.device)
        keep = np.isfinite(scores)
        if keep.all():
            return [Ranking(i, s, b) for i, s, b in zip(ids.tolist(), scores, base)]
        return [Ranking(i[m].tolist(), s[m], b[m]) for i, s, b, m in zip(ids, scores, base, keep)]

    def rerank_ids(self, query_embs: np.ndarray, candidates: Sequence[Sequence[str]] | np.ndarray,
                   k: int | None = None) -> list[Ranking]:
        raise ConfigError("rerank_ids() re-ranks documents of an in-process index; a store-connected retriever "
                          "searches the store with search() / search_embeddings(), or scores given vectors with "
                          "rerank_embeddings().")
