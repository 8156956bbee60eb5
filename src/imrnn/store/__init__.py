"""Vector databases as imrnn's first stage: one small interface (`VectorStore`), Milvus and Qdrant backends.

    from imrnn.store import open_store
    with open_store("milvus:./scifact.db") as store:        # Milvus Lite, embedded; or milvus:http://host:19530
        hits = store.search(query_embeddings, k=100)         # ids + stored frozen and projected vectors

`IMRNNRetriever.connect(checkpoint, "milvus:./scifact.db")` wraps a store with the adapter; `imrnn index` fills one.
Imports are lazy, so `imrnn --help` loads neither a database client nor torch.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "StoreConfig": "config",
    "VectorStore": "base",
    "Records": "base",
    "StoreHits": "base",
    "CollectionInfo": "base",
    "open_store": "base",
    "AdapterIdentity": "adapter",
    "rerank_hits": "adapter",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'imrnn.store' has no attribute {name!r}")
