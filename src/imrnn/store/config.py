"""How a vector-store collection is laid out and searched (torch- and numpy-free, so the CLI builds flags cheaply)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..config import setting
from ..errors import ConfigError

INDEX_TYPES = ("hnsw", "flat")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")


@dataclass(frozen=True)
class StoreConfig:
    """A collection's name, its first-stage index and the size of write batches; every field is an `imrnn index`
    and `imrnn search --store` flag."""

    collection: str = setting("imrnn", "Collection in the store (letters, digits, underscores).")
    index_type: str = setting("hnsw", "First-stage index on the frozen embeddings: hnsw (approximate) or flat (exact).",
                              flag="--index-type")
    hnsw_m: int = setting(16, "HNSW graph degree M.")
    ef_construction: int = setting(200, "HNSW build-time candidate list (efConstruction).")
    ef_search: int = setting(256, "HNSW search-time candidate list (ef); raised to the number of candidates if smaller.")
    batch_size: int = setting(1000, "Documents per upsert request.", flag="--upsert-batch")

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.collection):
            raise ConfigError(f"Collection name must be letters, digits and underscores, starting with a letter or "
                              f"underscore (at most 255), got {self.collection!r}; e.g. --collection scifact.")
        if self.index_type not in INDEX_TYPES:
            raise ConfigError(f"index_type must be one of {INDEX_TYPES}, got {self.index_type!r}.")
        for name in ("hnsw_m", "ef_construction", "ef_search", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}.")
