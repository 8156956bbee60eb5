"""Milvus through pymilvus: `milvus:PATH.db` runs Milvus Lite embedded (in this process, nothing to start);
`milvus:http://HOST:19530` reaches a Milvus server or distributed cluster with the same calls."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import StoreError
from .base import ID_BYTES, METADATA_KEY, TEXT_BYTES, CollectionInfo, Records, StoreHits, VectorStore, assemble_hits, flat
from .config import StoreConfig

_FIELDS = ("id", "embedding", "projected", "title", "text")
_local_users: Counter[str] = Counter()  # open MilvusStore objects per Milvus Lite file (pymilvus shares one engine)
_local_lock = threading.Lock()


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """Silence the named loggers below CRITICAL for the duration of the block."""
    saved = [(logging.getLogger(name), logging.getLogger(name).level) for name in loggers]
    for logger, _ in saved:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


def _pymilvus() -> Any:
    try:
        import pymilvus
    except ImportError as err:
        raise ImportError("The Milvus store needs pymilvus and milvus-lite: pip install 'imrnn[store]'") from err
    return pymilvus


class MilvusStore(VectorStore):
    """A Milvus collection: VARCHAR primary key `id`, `title`/`text`, FLOAT_VECTOR `embedding` (HNSW or FLAT,
    inner product) and `projected` (FLAT: stored and returned, never searched); strong consistency, so a write is
    visible to the next search."""

    kind = "milvus"

    def __init__(self, target: str, config: StoreConfig) -> None:
        super().__init__(target, config)
        pymilvus = _pymilvus()
        self._hnsw = False  # set from the collection's index by `_create` / `_describe`
        self._local = None if "://" in target else str(Path(target).expanduser().resolve())
        if self._local is not None:
            if not self._local.endswith(".db"):
                raise StoreError(f"A Milvus Lite store is a path ending in .db, got {target!r}; e.g. milvus:./scifact.db.")
            if not Path(self._local).parent.is_dir():
                raise StoreError(f"The folder {Path(self._local).parent} of Milvus Lite store {target!r} does not exist; "
                                 "create it first.")
        try:
            with _quiet("milvus_lite"):  # a locked file is reported below, not as a logged traceback
                self.client = pymilvus.MilvusClient(self._local or target, timeout=30)
        except pymilvus.MilvusException as err:
            reason = getattr(err, "message", err)
            if self._local is not None:
                raise StoreError(f"Could not open the Milvus Lite store {target} ({reason}): Milvus Lite lets one process "
                                 "open a file at a time, so another process probably has it open. Close it there, or "
                                 "use a Milvus server for concurrent access.") from None
            raise StoreError(f"Could not reach Milvus at {target} ({reason}). Start the server or check the address and "
                             "port, or use an embedded store: milvus:./NAME.db.") from None
        if self._local is not None:
            with _local_lock:
                _local_users[self._local] += 1

    def exists(self) -> bool:
        return bool(self.client.has_collection(self.collection))

    def _create(self, embedding_dim: int, projected_dim: int, metadata: str) -> None:
        from pymilvus import DataType

        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=ID_BYTES)
        schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=embedding_dim)
        schema.add_field("projected", DataType.FLOAT_VECTOR, dim=projected_dim)
        schema.add_field("title", DataType.VARCHAR, max_length=TEXT_BYTES)
        schema.add_field("text", DataType.VARCHAR, max_length=TEXT_BYTES)
        indexes = self.client.prepare_index_params()
        if self.config.index_type == "hnsw":
            indexes.add_index("embedding", index_type="HNSW", metric_type="IP",
                              params={"M": self.config.hnsw_m, "efConstruction": self.config.ef_construction})
        else:
            indexes.add_index("embedding", index_type="FLAT", metric_type="IP")
        indexes.add_index("projected", index_type="FLAT", metric_type="IP")  # Milvus loads only indexed vector fields
        self.client.create_collection(self.collection, schema=schema, index_params=indexes, consistency_level="Strong",
                                      properties={METADATA_KEY: metadata})
        self._hnsw = self.config.index_type == "hnsw"

    def _describe(self) -> CollectionInfo:
        described = self.client.describe_collection(self.collection)
        dims = {f["name"]: int(f.get("params", {}).get("dim", 0)) for f in described["fields"]}
        if not {"embedding", "projected"} <= set(dims):
            raise StoreError(f"Collection {self.collection!r} in {self.uri} was not made by imrnn (fields: "
                             f"{sorted(dims)}); index into a new collection with --collection NAME.")
        raw = described.get("properties", {}).get(METADATA_KEY)
        self._hnsw = self.client.describe_index(self.collection, "embedding").get("index_type") == "HNSW"
        self.client.load_collection(self.collection)  # a server keeps it loaded; a reopened Lite file may not be
        return CollectionInfo(self.collection, dims["embedding"], dims["projected"], json.loads(raw) if raw else {})

    def _write_metadata(self, metadata: str) -> None:
        self.client.alter_collection_properties(self.collection, properties={METADATA_KEY: metadata})

    def _upsert(self, records: Records) -> None:
        rows = [{"id": i, "embedding": e, "projected": p, "title": t, "text": x}
                for i, e, p, t, x in zip(records.ids, np.asarray(records.embeddings, np.float32),
                                         np.asarray(records.projected, np.float32), records.titles, records.texts)]
        self.client.upsert(self.collection, rows)

    def _delete(self, ids: list[str]) -> None:
        self.client.delete(self.collection, ids=ids)

    def _search(self, queries: np.ndarray, k: int) -> StoreHits:
        info = self.info()
        params: dict[str, Any] = {"metric_type": "IP"}
        if self._hnsw:  # the index the collection was built with, whatever this config says
            params["params"] = {"ef": max(self.config.ef_search, k)}
        results = self.client.search(self.collection, data=list(queries), anns_field="embedding", limit=k,
                                     output_fields=["embedding", "projected"], search_params=params)
        hits = [h for per_query in results for h in per_query]
        return assemble_hits([len(r) for r in results], flat([r.ids for r in results]),
                             flat([r.distances for r in results]), [h["entity"]["embedding"] for h in hits],
                             [h["entity"]["projected"] for h in hits], info.embedding_dim, info.projected_dim)

    def scan(self, batch_size: int = 1000) -> Iterator[Records]:
        info = self.info()
        with _quiet("grpc._server", "pymilvus"):  # Milvus Lite lacks the iterator's timestamp RPC and logs it loudly
            iterator = self.client.query_iterator(self.collection, batch_size=batch_size, filter="", output_fields=list(_FIELDS))
        try:
            while rows := iterator.next():
                yield Records([r["id"] for r in rows],
                              np.asarray([r["embedding"] for r in rows], np.float32).reshape(-1, info.embedding_dim),
                              np.asarray([r["projected"] for r in rows], np.float32).reshape(-1, info.projected_dim),
                              [r["title"] for r in rows], [r["text"] for r in rows])
        finally:
            iterator.close()

    def count(self) -> int:
        self.info()
        return int(self.client.query(self.collection, filter="", output_fields=["count(*)"])[0]["count(*)"])

    def drop(self) -> None:
        self.client.drop_collection(self.collection)
        self._info = None

    def close(self) -> None:
        """Close the client; the last user of a Milvus Lite file also stops its engine (freeing the file lock and port)."""
        if getattr(self, "client", None) is None:
            return
        self.client.close()
        self.client = None
        if self._local is not None:
            with _local_lock:
                _local_users[self._local] -= 1
                last = _local_users[self._local] <= 0
                if last:
                    del _local_users[self._local]
            if last:
                from milvus_lite.server_manager import server_manager_instance

                server_manager_instance.release_server(self._local)
