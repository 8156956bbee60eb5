"""The one small interface every vector-store backend implements, and `open_store` that picks one from a URI.

A collection holds adapter-ready records: a document id, its payload (title, text), its frozen embedding and
the adapter's projected vector (`IMRNN.cache_corpus(...).projected`), plus one JSON metadata record saying which
encoder and checkpoint made them and how far indexing got. A search returns, for each query, the top-K ids with
both stored vectors, so re-ranking only gathers what the store sends back and never re-projects.
"""

from __future__ import annotations

import itertools
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import ConfigError, StoreError
from .config import StoreConfig

METADATA_KEY = "imrnn"  # the collection property (Milvus) / metadata key (Qdrant) holding the JSON record
ID_BYTES = 512  # the longest document id (UTF-8 bytes) a store key holds
TEXT_BYTES = 65535  # payload fields are capped at Milvus's VARCHAR limit (UTF-8 bytes); vectors come from full texts
_QUERY_BATCH = 64  # queries per search request: bounded messages whatever the number of queries
URI_HELP = ("milvus:./NAME.db (Milvus Lite, embedded), milvus:http://HOST:19530 (Milvus server or cluster), "
            "qdrant:./FOLDER (Qdrant local mode, embedded) or qdrant:http://HOST:6333 (Qdrant server or cluster)")


@dataclass(frozen=True)
class Records:
    """A batch of adapter-ready documents, row-aligned: ids, payload, frozen embeddings `(n, E)`, projected `(n, D)`."""

    ids: list[str]
    embeddings: np.ndarray
    projected: np.ndarray
    titles: list[str]
    texts: list[str]

    def __post_init__(self) -> None:
        sizes = {len(self.ids), len(self.embeddings), len(self.projected), len(self.titles), len(self.texts)}
        if len(sizes) != 1:
            raise ConfigError(f"Records need one id, embedding, projected vector, title and text per document; got "
                              f"{len(self.ids)}, {len(self.embeddings)}, {len(self.projected)}, {len(self.titles)}, "
                              f"{len(self.texts)}.")

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class StoreHits:
    """Top-K per query as arrays (`Q` queries, `K` = the largest result list; shorter lists are padded)."""

    ids: np.ndarray  # object (Q, K), "" at padding
    scores: np.ndarray  # float32 (Q, K): the store's inner product (= the frozen retriever's score), -inf at padding
    embeddings: np.ndarray  # float32 (Q, K, E): stored frozen embeddings, 0 at padding
    projected: np.ndarray  # float32 (Q, K, D): stored projected vectors, 0 at padding
    valid: np.ndarray  # bool (Q, K): False at padding


@dataclass(frozen=True)
class CollectionInfo:
    """A collection's vector sizes and its imrnn metadata record ({} if it has none)."""

    name: str
    embedding_dim: int
    projected_dim: int
    metadata: dict[str, Any]


def clip_text(text: str, limit: int = TEXT_BYTES) -> str:
    """`text` cut to at most `limit` UTF-8 bytes at a character boundary (payload only; vectors use the full text)."""
    data = text.encode("utf-8")
    return text if len(data) <= limit else data[:limit].decode("utf-8", errors="ignore")


def assemble_hits(lengths: Sequence[int], ids: Sequence[str], scores: Sequence[float], embeddings: Sequence,
                  projected: Sequence, embedding_dim: int, projected_dim: int) -> StoreHits:
    """`StoreHits` from the flat, query-major hits a client returned (`lengths[q]` hits for query q)."""
    counts = np.asarray(lengths, dtype=np.int64)
    k = int(counts.max(initial=0))
    valid = np.arange(k) < counts[:, None]
    out_ids = np.full(valid.shape, "", dtype=object)
    out_ids[valid] = list(ids)
    out_scores = np.full(valid.shape, -np.inf, dtype=np.float32)
    out_scores[valid] = np.asarray(scores, dtype=np.float32)
    out_embs = np.zeros((*valid.shape, embedding_dim), dtype=np.float32)
    out_proj = np.zeros((*valid.shape, projected_dim), dtype=np.float32)
    if len(ids):
        out_embs[valid] = np.asarray(embeddings, dtype=np.float32)
        out_proj[valid] = np.asarray(projected, dtype=np.float32)
    return StoreHits(out_ids, out_scores, out_embs, out_proj, valid)


class VectorStore(ABC):
    """One collection of adapter-ready records in a vector database; a context manager that closes the client."""

    kind: str = ""

    def __init__(self, target: str, config: StoreConfig) -> None:
        self.target = target  # the path or URL the client opens
        self.uri = f"{self.kind}:{target}"  # what `open_store` takes, quoted in messages
        self.config = config
        self._info: CollectionInfo | None = None

    @property
    def collection(self) -> str:
        return self.config.collection

    def __enter__(self) -> "VectorStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r}, collection={self.collection!r})"

    # ------------------------------------------------------------------ what every backend provides

    @abstractmethod
    def exists(self) -> bool:
        """True if the collection exists."""

    @abstractmethod
    def _create(self, embedding_dim: int, projected_dim: int, metadata: str) -> None:
        """Create the collection: string id, payload, two vector fields (first-stage index on the frozen one)."""

    @abstractmethod
    def _describe(self) -> CollectionInfo:
        """Vector sizes and the decoded metadata record of the existing collection."""

    @abstractmethod
    def _write_metadata(self, metadata: str) -> None:
        """Replace the collection's metadata record (a JSON string)."""

    @abstractmethod
    def _upsert(self, records: Records) -> None:
        """Insert or overwrite one batch of records (by id)."""

    @abstractmethod
    def _delete(self, ids: list[str]) -> None:
        """Remove documents by id (unknown ids are ignored)."""

    @abstractmethod
    def _search(self, queries: np.ndarray, k: int) -> StoreHits:
        """Top-`k` by inner product on the frozen embeddings for a batch of queries, with both stored vectors."""

    @abstractmethod
    def scan(self, batch_size: int = 1000) -> Iterator[Records]:
        """Every record of the collection, in batches (for re-projection and audits)."""

    @abstractmethod
    def count(self) -> int:
        """Number of documents in the collection."""

    @abstractmethod
    def drop(self) -> None:
        """Delete the collection and everything in it."""

    @abstractmethod
    def close(self) -> None:
        """Release the client (and an embedded engine's files and port)."""

    # ------------------------------------------------------------------ shared checks around them

    def create(self, embedding_dim: int, projected_dim: int, metadata: dict[str, Any]) -> CollectionInfo:
        """Create the collection with its metadata record; an existing collection is an error."""
        if self.exists():
            raise StoreError(f"Collection {self.collection!r} already exists in {self.uri}.")
        self._create(embedding_dim, projected_dim, json.dumps(metadata, sort_keys=True))
        self._info = CollectionInfo(self.collection, embedding_dim, projected_dim, dict(metadata))
        return self._info

    def info(self) -> CollectionInfo:
        """The collection's sizes and metadata; a missing collection is a StoreError saying how to make it."""
        if self._info is None:
            if not self.exists():
                raise StoreError(f"Collection {self.collection!r} does not exist in {self.uri}. Create it with "
                                 f"`imrnn index --store {self.uri} --collection {self.collection} "
                                 "--dataset NAME --checkpoint CKPT`, or pass the collection it was indexed into.")
            self._info = self._describe()
        return self._info

    def write_metadata(self, metadata: dict[str, Any]) -> None:
        info = self.info()
        self._write_metadata(json.dumps(metadata, sort_keys=True))
        self._info = CollectionInfo(info.name, info.embedding_dim, info.projected_dim, dict(metadata))

    def upsert(self, records: Records) -> None:
        """Insert or overwrite records by id, in batches of `config.batch_size`; vector sizes are checked first."""
        info = self.info()
        for what, array, dim in (("embeddings", records.embeddings, info.embedding_dim),
                                 ("projected vectors", records.projected, info.projected_dim)):
            if np.ndim(array) != 2 or np.shape(array)[1] != dim:
                raise StoreError(f"Collection {self.collection!r} in {self.uri} stores {dim}-d {what}, got an array of "
                                 f"shape {np.shape(array)}. Use the encoder and checkpoint it was indexed with, or index "
                                 "into a new collection (--collection NAME).")
        for start in range(0, len(records), self.config.batch_size):
            part = slice(start, start + self.config.batch_size)
            self._upsert(Records(records.ids[part], records.embeddings[part], records.projected[part],
                                 [clip_text(t) for t in records.titles[part]], [clip_text(t) for t in records.texts[part]]))

    def delete(self, ids: Sequence[str]) -> None:
        """Remove documents by id; ids the collection does not hold are ignored."""
        self.info()
        keys = [str(i) for i in ids]
        for start in range(0, len(keys), self.config.batch_size):
            self._delete(keys[start : start + self.config.batch_size])

    def search(self, queries: np.ndarray, k: int) -> StoreHits:
        """Top-`k` documents per query `(Q, E)` with their stored vectors; query size is checked against the store."""
        info = self.info()
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != info.embedding_dim:
            raise StoreError(f"Collection {self.collection!r} in {self.uri} holds {info.embedding_dim}-d embeddings, "
                             f"but the queries have shape {queries.shape}. Encode queries with the encoder the "
                             "collection was indexed with (see its metadata), or index into a new collection.")
        if k < 1:
            raise ConfigError(f"k must be at least 1, got {k}.")
        parts = [self._search(queries[s : s + _QUERY_BATCH], k) for s in range(0, len(queries), _QUERY_BATCH)]
        if len(parts) == 1:
            return parts[0]
        width = max(p.ids.shape[1] for p in parts)
        return StoreHits(*(np.concatenate([_pad(getattr(p, name), width, fill) for p in parts])
                           for name, fill in (("ids", ""), ("scores", -np.inf), ("embeddings", 0.0),
                                              ("projected", 0.0), ("valid", False))))


def _pad(array: np.ndarray, width: int, fill: Any) -> np.ndarray:
    """`array` widened along axis 1 to `width` with `fill`."""
    missing = width - array.shape[1]
    if missing == 0:
        return array
    shape = (array.shape[0], missing, *array.shape[2:])
    return np.concatenate([array, np.full(shape, fill, dtype=array.dtype)], axis=1)


def flat(lists: Sequence[Sequence[Any]]) -> list[Any]:
    """The lists joined in order (query-major hits)."""
    return list(itertools.chain.from_iterable(lists))


def open_store(uri: str, config: StoreConfig | None = None) -> VectorStore:
    """A store from a URI: `milvus:PATH.db` or `milvus:http://...` (pymilvus), `qdrant:PATH` or `qdrant:http://...`
    (qdrant-client). A bare path ending in `.db` means Milvus Lite. Embedded engines need nothing else running."""
    config = config or StoreConfig()
    kind, sep, target = uri.partition(":")
    if not sep or kind not in ("milvus", "qdrant") or not target:
        if uri.endswith(".db") and "://" not in uri:
            kind, target = "milvus", uri
        else:
            raise ConfigError(f"Store URI {uri!r} is not one imrnn knows; use {URI_HELP}.")
    if kind == "milvus":
        from .milvus import MilvusStore

        return MilvusStore(target, config)
    from .qdrant import QdrantStore

    return QdrantStore(target, config)
