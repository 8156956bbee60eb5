"""What makes a collection adapter-ready: the identity of the encoder and checkpoint that produced its vectors,
the checks that refuse a mismatching one, and re-ranking of a store's top-K from the vectors it returns."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..encode import Encoder
from ..errors import ConfigError, StoreError
from ..model import IMRNN, CorpusCache
from .base import CollectionInfo, StoreHits

FORMAT = 1
_ENCODER_KEYS = ("identity", "max_length", "passage_prefix")  # what a stored document embedding depends on


def checkpoint_fingerprint(model: IMRNN) -> str:
    """A digest of every weight and buffer of the adapter (names, shapes, values): which checkpoint this is."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()[:24]


@dataclass(frozen=True)
class AdapterIdentity:
    """The encoder and checkpoint a collection's vectors come from, as recorded in its metadata."""

    encoder: dict[str, Any]
    fingerprint: str
    checkpoint_path: str
    embedding_dim: int
    projected_dim: int

    @classmethod
    def of(cls, model: IMRNN, encoder: Encoder, checkpoint_path: str = "") -> "AdapterIdentity":
        config = encoder.config
        described = {"model": config.model, "identity": encoder.identity, "max_length": config.max_length,
                     "passage_prefix": config.passage_prefix, "query_prefix": config.query_prefix,
                     "precision": config.precision}
        return cls(described, checkpoint_fingerprint(model), checkpoint_path, model.config.embedding_dim, model.config.dim)

    def metadata(self, state: str, progress: dict[str, Any] | None = None) -> dict[str, Any]:
        """The collection's metadata record: this identity, the indexing `state` and its `progress`."""
        return {"format": FORMAT, "encoder": self.encoder, "checkpoint": {"fingerprint": self.fingerprint,
                                                                          "path": self.checkpoint_path},
                "embedding_dim": self.embedding_dim, "projected_dim": self.projected_dim, "state": state,
                "progress": progress or {}}

    def check(self, info: CollectionInfo, uri: str, reproject: bool = False, ready: bool = True) -> None:
        """StoreError unless the collection was made by imrnn with the same encoder and vector sizes and (unless
        `reproject`) by this checkpoint, and (if `ready`) its indexing finished. Each message names the fix."""
        where = f"Collection {info.name!r} in {uri}"
        meta = info.metadata
        if meta.get("format") != FORMAT:
            raise StoreError(f"{where} has no imrnn metadata (format {FORMAT}), so nothing says which encoder and "
                             "checkpoint made its vectors. Index into a new collection with `imrnn index "
                             "--collection NAME`, or rebuild this one with `imrnn index --recreate`.")
        if (info.embedding_dim, info.projected_dim) != (self.embedding_dim, self.projected_dim):
            raise StoreError(f"{where} stores {info.embedding_dim}-d embeddings and {info.projected_dim}-d projected "
                             f"vectors, but the checkpoint works on {self.embedding_dim}-d and {self.projected_dim}-d "
                             f"ones (encoder {self.encoder['model']}). Use the checkpoint the collection was indexed "
                             f"with ({meta.get('checkpoint', {}).get('path') or 'see its metadata'}), or index into a "
                             "new collection (--collection NAME).")
        stored = {key: meta.get("encoder", {}).get(key) for key in _ENCODER_KEYS}
        if stored != {key: self.encoder[key] for key in _ENCODER_KEYS}:
            raise StoreError(f"{where} was encoded with {meta.get('encoder', {}).get('identity')!r} (max_length "
                             f"{stored['max_length']}, prefix {stored['passage_prefix']!r}), but this checkpoint uses "
                             f"{self.encoder['identity']!r} (max_length {self.encoder['max_length']}, prefix "
                             f"{self.encoder['passage_prefix']!r}). Its stored embeddings cannot serve this checkpoint: "
                             "index into a new collection (--collection NAME) or rebuild it with `imrnn index --recreate`.")
        recorded = meta.get("checkpoint", {})
        if not reproject and recorded.get("fingerprint") != self.fingerprint:
            raise StoreError(f"{where} holds vectors projected by checkpoint {recorded.get('path') or '?'} (fingerprint "
                             f"{recorded.get('fingerprint')}), not by the one given ({self.checkpoint_path or '?'}, "
                             f"fingerprint {self.fingerprint}). Re-project its stored embeddings (no re-encoding) with "
                             f"`imrnn index --store {uri} --collection {info.name} --checkpoint "
                             f"{self.checkpoint_path or 'CKPT'} --reproject`, or search with the checkpoint it was indexed with.")
        if ready and meta.get("state") != "ready":
            progress = meta.get("progress", {})
            raise StoreError(f"{where} is not ready: its {meta.get('state')} stopped after {progress.get('done', '?')} of "
                             f"{progress.get('total', '?')} documents. Re-run the same `imrnn index` command"
                             f"{' with --reproject' if meta.get('state') == 'reprojecting' else ''} to finish it.")


def rerank_hits(model: IMRNN, queries: np.ndarray, hits: StoreHits, k: int, device: str = "cpu"
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Adapted top-`k` of a store's candidates: (ids `(Q, k)` object, "" at padding; adapted scores, -inf at
    padding; frozen scores), best first. The stored projected vectors are only gathered (`IMRNN.score_rows`),
    never projected again, so this costs what re-ranking an in-process corpus cache costs."""
    queries = np.array(queries, dtype=np.float32)  # a copy: cached query embeddings are read-only memory maps
    if queries.ndim != 2 or len(queries) != len(hits.ids):
        raise ConfigError(f"Expected query embeddings (Q, d) with Q = {len(hits.ids)} result lists, got shape {queries.shape}.")
    bad = np.flatnonzero(~np.isfinite(queries).all(axis=1))
    if len(bad):
        raise ConfigError(f"Query embeddings hold NaN or Inf values (first at query row {bad[0]}); re-encode that query.")
    n_queries, depth = hits.valid.shape
    embeddings = torch.from_numpy(hits.embeddings.reshape(n_queries * depth, -1)).to(device)
    cache = CorpusCache(torch.from_numpy(hits.projected.reshape(n_queries * depth, -1)).to(device), embeddings,
                        torch.linalg.vector_norm(embeddings, dim=-1).clamp_min_(1e-12))
    rows = torch.arange(n_queries * depth, device=device).reshape(n_queries, depth)
    scores, base = model.score_rows(torch.from_numpy(queries).to(device), rows,
                                    torch.from_numpy(hits.valid).to(device), cache)
    scores, base = scores.cpu().numpy(), base.cpu().numpy()
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # ties keep the store's order
    return tuple(np.take_along_axis(a, order, 1) for a in (hits.ids, scores, base))  # type: ignore[return-value]
