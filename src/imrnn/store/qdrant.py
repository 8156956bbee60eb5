"""Qdrant through qdrant-client: `qdrant:PATH` runs local mode (embedded, nothing to start; exact search in
NumPy, meant for small collections); `qdrant:http://HOST:6333` reaches a Qdrant server or cluster."""

from __future__ import annotations

import json
import uuid
from typing import Any, Iterator

import numpy as np

from ..errors import StoreError
from .base import METADATA_KEY, CollectionInfo, Records, StoreHits, VectorStore, assemble_hits
from .config import StoreConfig

_NAMESPACE = uuid.UUID("5f0b6c2e-7a43-4e8e-9a55-1d3c2b7e9a10")  # document id -> point id (Qdrant ids are UUIDs)


def point_id(doc_id: str) -> str:
    """The Qdrant point id of a document id: a name-based UUID, so re-writing a document overwrites its point."""
    return str(uuid.uuid5(_NAMESPACE, doc_id))


def _qdrant() -> Any:
    try:
        import qdrant_client
    except ImportError as err:
        raise ImportError("The Qdrant store needs qdrant-client: pip install 'imrnn[store]'") from err
    return qdrant_client


class QdrantStore(VectorStore):
    """A Qdrant collection with two named vectors, `embedding` (dot product, HNSW on a server) and `projected`
    (stored and returned, no graph), and the payload `doc_id`, `title`, `text`."""

    kind = "qdrant"

    def __init__(self, target: str, config: StoreConfig) -> None:
        super().__init__(target, config)
        qdrant_client = _qdrant()
        self._remote = "://" in target
        try:
            self.client = (qdrant_client.QdrantClient(url=target, timeout=30) if self._remote
                           else qdrant_client.QdrantClient(path=target))
            self.client.get_collections()  # a server client connects lazily: fail here, not mid-job
        except RuntimeError as err:  # local mode: the folder is locked by another client
            raise StoreError(f"Qdrant local store {target} is open in another process ({err}). Close it there, or "
                             "run a Qdrant server for concurrent access.") from None
        except Exception as err:  # connection refused, timeouts, bad URLs or folders: all mean "cannot reach it"
            if not self._remote:
                raise StoreError(f"Could not open the Qdrant local store {target} ({type(err).__name__}: {err}); give "
                                 "a folder that can be created and written, e.g. qdrant:./scifact.qdrant.") from None
            raise StoreError(f"Could not reach Qdrant at {target} ({type(err).__name__}: {err}). Start the server or "
                             "check the address and port, or use an embedded store: qdrant:./FOLDER.") from None

    def exists(self) -> bool:
        return bool(self.client.collection_exists(self.collection))

    def _create(self, embedding_dim: int, projected_dim: int, metadata: str) -> None:
        from qdrant_client import models

        graph = models.HnswConfigDiff(m=self.config.hnsw_m, ef_construct=self.config.ef_construction)
        self.client.create_collection(self.collection, vectors_config={
            "embedding": models.VectorParams(size=embedding_dim, distance=models.Distance.DOT, hnsw_config=graph),
            "projected": models.VectorParams(size=projected_dim, distance=models.Distance.DOT,
                                             hnsw_config=models.HnswConfigDiff(m=0)),  # m=0: no graph is built
        }, metadata={METADATA_KEY: metadata})

    def _describe(self) -> CollectionInfo:
        config = self.client.get_collection(self.collection).config
        vectors = config.params.vectors if isinstance(config.params.vectors, dict) else {}
        if not {"embedding", "projected"} <= set(vectors):
            raise StoreError(f"Collection {self.collection!r} in {self.uri} was not made by imrnn (vectors: "
                             f"{sorted(vectors)}); index into a new collection with --collection NAME.")
        raw = (config.metadata or {}).get(METADATA_KEY)
        return CollectionInfo(self.collection, vectors["embedding"].size, vectors["projected"].size,
                              json.loads(raw) if raw else {})

    def _write_metadata(self, metadata: str) -> None:
        self.client.update_collection(self.collection, metadata={METADATA_KEY: metadata})

    def _upsert(self, records: Records) -> None:
        from qdrant_client import models

        self.client.upsert(self.collection, wait=True, points=models.Batch(
            ids=[point_id(i) for i in records.ids],
            vectors={"embedding": np.asarray(records.embeddings, np.float32).tolist(),
                     "projected": np.asarray(records.projected, np.float32).tolist()},
            payloads=[{"doc_id": i, "title": t, "text": x} for i, t, x in zip(records.ids, records.titles, records.texts)]))

    def _delete(self, ids: list[str]) -> None:
        from qdrant_client import models

        self.client.delete(self.collection, points_selector=models.PointIdsList(points=[point_id(i) for i in ids]), wait=True)

    def _search(self, queries: np.ndarray, k: int) -> StoreHits:
        from qdrant_client import models

        params = (models.SearchParams(hnsw_ef=max(self.config.ef_search, k), exact=self.config.index_type == "flat")
                  if self._remote else None)  # local mode always searches exactly (and warns about any params)
        requests = [models.QueryRequest(query=q, using="embedding", limit=k, params=params, with_payload=["doc_id"],
                                        with_vector=["embedding", "projected"]) for q in queries.tolist()]
        results = self.client.query_batch_points(self.collection, requests=requests)
        points = [p for r in results for p in r.points]
        info = self.info()
        return assemble_hits([len(r.points) for r in results], [p.payload["doc_id"] for p in points],
                             [p.score for p in points], [p.vector["embedding"] for p in points],
                             [p.vector["projected"] for p in points], info.embedding_dim, info.projected_dim)

    def scan(self, batch_size: int = 1000) -> Iterator[Records]:
        info = self.info()
        offset = None
        while True:
            points, offset = self.client.scroll(self.collection, limit=batch_size, offset=offset, with_payload=True,
                                                with_vectors=True)
            if points:
                yield Records([p.payload["doc_id"] for p in points],
                              np.asarray([p.vector["embedding"] for p in points], np.float32).reshape(-1, info.embedding_dim),
                              np.asarray([p.vector["projected"] for p in points], np.float32).reshape(-1, info.projected_dim),
                              [p.payload.get("title", "") for p in points], [p.payload.get("text", "") for p in points])
            if offset is None:
                return

    def count(self) -> int:
        self.info()
        return int(self.client.count(self.collection, exact=True).count)

    def drop(self) -> None:
        self.client.delete_collection(self.collection)
        self._info = None

    def close(self) -> None:
        """Close the client (local mode: releases the folder's lock)."""
        if getattr(self, "client", None) is not None:
            self.client.close()
            self.client = None
