"""`imrnn index`: a corpus into a vector store as adapter-ready records, idempotent and resumable.

The job writes batches in corpus order and records after each one, in the collection's own metadata, how many
documents are done; a killed run, run again, resumes at the first unfinished batch (upserts by id, so a batch
written twice leaves no duplicate). Encoding goes through the on-disk embedding cache (itself resumable), or
through Ray Data `map_batches` actors (`ray_address`: a local Ray started here, or a cluster's address). Re-projection
(`reproject=True`) rewrites only the projected vectors for another checkpoint, from the stored embeddings.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
from tqdm.auto import tqdm

from .config import EncoderConfig
from .data import Corpus
from .encode import Encoder, encode_corpus
from .errors import ConfigError, StoreError
from .model import IMRNN
from .store.adapter import AdapterIdentity
from .store.base import ID_BYTES, Records, VectorStore

LOCAL_RAY = "local"  # `--ray` without an address: start a Ray instance on this machine
LOCAL_RAY_STARTS = 3  # tries to start a local Ray, whose start-up fails now and then (see `_start_ray`)


@dataclass(frozen=True)
class IndexReport:
    """What one `index_corpus` call did."""

    uri: str
    collection: str
    documents: int  # in the corpus (or the collection, for a re-projection)
    written: int  # upserted by this call
    resumed_from: int  # documents a previous run had finished
    seconds: float
    action: str  # "indexed", "already indexed" or "reprojected"


def index_corpus(store: VectorStore, model: IMRNN, encoder: Encoder, corpus: Corpus | None, checkpoint_path: str = "",
                 cache_dir: str | os.PathLike | None = None, ray_address: str | None = None, ray_actors: int = 2,
                 reproject: bool = False, recreate: bool = False, progress: bool = True) -> IndexReport:
    """Make `store`'s collection hold `corpus` as adapter-ready records for `model` (see the module docstring).

    `recreate` drops the collection first; `reproject` re-projects what the collection holds for `model` instead
    of indexing `corpus` (which may then be None). A collection made by another encoder or checkpoint is a
    StoreError naming the fix."""
    start_time = time.perf_counter()
    identity = AdapterIdentity.of(model, encoder, checkpoint_path)
    if recreate and store.exists():
        store.drop()
    if reproject:
        return _reproject(store, model, identity, progress, start_time)
    if corpus is None:
        raise ConfigError("index_corpus needs a corpus to index (or reproject=True).")
    _check_ids(corpus)
    fingerprint, total = corpus.fingerprint(), len(corpus)
    done = 0
    if store.exists():
        info = store.info()
        identity.check(info, store.uri, ready=False)
        meta = info.metadata
        if meta.get("state") == "reprojecting":
            raise StoreError(f"Collection {store.collection!r} in {store.uri} is half re-projected; finish that first "
                             f"with `imrnn index --store {store.uri} --collection {store.collection} --checkpoint "
                             f"{checkpoint_path or 'CKPT'} --reproject`.")
        recorded = meta.get("progress", {})
        if recorded.get("corpus") == fingerprint:
            if meta.get("state") == "ready":
                return IndexReport(store.uri, store.collection, total, 0, total, time.perf_counter() - start_time,
                                   "already indexed")
            done = min(int(recorded.get("done", 0)), total)
    else:
        store.create(identity.embedding_dim, identity.projected_dim, identity.metadata("indexing"))

    def record(state: str, count: int) -> None:
        store.write_metadata(identity.metadata(state, {"corpus": fingerprint, "done": count, "total": total}))

    record("indexing", done)
    resumed_from = done
    batches = (_ray_batches(encoder.config, corpus, done, store.config.batch_size, ray_address, ray_actors, encoder.device)
               if ray_address is not None else _cached_batches(encoder, corpus, done, store.config.batch_size, cache_dir, progress))
    bar = tqdm(total=total, initial=done, desc=f"indexing into {store.collection}", unit="doc", disable=not progress,
               dynamic_ncols=True)
    for rows, embeddings in batches:
        store.upsert(_records(model, corpus, rows, embeddings))
        done = int(rows[-1]) + 1
        record("indexing", done)
        bar.update(len(rows))
    bar.close()
    record("ready", total)
    stored = store.count()
    if stored < total:
        raise StoreError(f"Collection {store.collection!r} in {store.uri} holds {stored} documents after indexing "
                         f"{total}; the store lost writes. Run `imrnn index --recreate` with the same arguments.")
    return IndexReport(store.uri, store.collection, total, total - resumed_from, resumed_from,
                       time.perf_counter() - start_time, "indexed")


def _check_ids(corpus: Corpus) -> None:
    if len(corpus) == 0:
        raise ConfigError("Cannot index an empty corpus.")
    too_long = next((i for i in corpus.ids.tolist() if len(str(i).encode("utf-8")) > ID_BYTES), None)
    if too_long is not None:
        raise ConfigError(f"Document id {str(too_long)[:60]!r}... is longer than {ID_BYTES} UTF-8 bytes, the store's "
                          "key limit; shorten the ids.")


def _records(model: IMRNN, corpus: Corpus, rows: np.ndarray, embeddings: np.ndarray) -> Records:
    """Adapter-ready records for corpus `rows`: projected once here (`IMRNN.cache_corpus`), never at search time."""
    cache = model.cache_corpus(np.ascontiguousarray(embeddings, dtype=np.float32))
    broken = np.flatnonzero(~np.isfinite(cache.norms.cpu().numpy()))
    if len(broken):
        raise ConfigError(f"The embedding of document {corpus.ids[rows[broken[0]]]!r} holds NaN or Inf values; "
                          "re-encode it (delete its cache entry) or drop it from the corpus.")
    return Records(corpus.ids[rows].tolist(), np.asarray(embeddings, np.float32), cache.projected.cpu().numpy(),
                   [corpus.titles[r] for r in rows], [corpus.texts[r] for r in rows])


def _cached_batches(encoder: Encoder, corpus: Corpus, start: int, batch_size: int,
                    cache_dir: str | os.PathLike | None, progress: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(rows, embeddings) from `start` on, in batches, from the resumable on-disk embedding cache (filled first)."""
    embeddings = encode_corpus(encoder, corpus, cache_dir, progress=progress)
    return ((np.arange(first, min(first + batch_size, len(corpus))), np.asarray(embeddings[first : first + batch_size]))
            for first in range(start, len(corpus), batch_size))


class EncodeActor:
    """A Ray Data actor holding one frozen encoder: a batch {"row", "text"} -> {"row", "embedding"}."""

    def __init__(self, config: dict[str, Any], device: str, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.encoder = Encoder(EncoderConfig(**config), device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = batch["text"].tolist()
        return {"row": batch["row"], "embedding": self.encoder.encode(texts, self.encoder.config.passage_prefix)}


def _start_ray(ray: Any, address: str) -> None:
    """Connect to the Ray cluster at `address`, or start a local Ray (LOCAL_RAY), trying up to LOCAL_RAY_STARTS times:
    a local start fails now and then (twice in about a dozen full test runs here, each time after its GCS was up; the one
    whose error was recorded: "The current node timed out during startup", Ray waiting a fixed 30 s for its raylet to
    register, on 2 busy cores; Ray's start-up is known to fail now and then, ray-project/ray#18053); a later try worked.
    StoreError when it cannot be done."""
    if address != LOCAL_RAY:
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        except ConnectionError as err:
            raise StoreError(f"Could not reach the Ray cluster at {address!r} ({err}). Start it (`ray start --head`), "
                             "check the address, or give --ray without an address for a local Ray.") from None
        return
    for attempt in range(1, LOCAL_RAY_STARTS + 1):
        try:
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
            return
        except Exception as err:  # Ray raises ValueError, RuntimeError or plain Exception from its start-up
            if attempt == LOCAL_RAY_STARTS:
                raise StoreError(f"Could not start a local Ray in {attempt} tries (last: {type(err).__name__}: {err}). "
                                 "Ray's logs (by default in /tmp/ray/session_latest/logs) say why; or index without --ray.") from err
            warnings.warn(f"A local Ray did not start ({type(err).__name__}: {err}); trying again "
                          f"({attempt + 1} of {LOCAL_RAY_STARTS}).", stacklevel=2)
            time.sleep(attempt)  # give the ports and processes of the failed start a moment to go


def _ray_batches(config: EncoderConfig, corpus: Corpus, start: int, batch_size: int, address: str, actors: int,
                 device: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(rows, embeddings) from `start` on, encoded by `actors` Ray Data actors, in corpus order, in store batches.

    `address` is LOCAL_RAY (start Ray here, stopped afterwards) or a cluster address for `ray.init` (e.g. "auto",
    "ray://head:10001"); every node needs imrnn installed."""
    if actors < 1:
        raise ConfigError(f"ray_actors must be at least 1, got {actors}.")
    try:
        import ray
        import ray.data
    except ImportError as err:
        raise ImportError("Encoding with Ray needs ray[data]: pip install 'imrnn[ray]'") from err
    started = not ray.is_initialized()
    if started:
        _start_ray(ray, address)
    try:
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # corpus order: the recorded progress stays a prefix
        context.enable_progress_bars = False  # the job's own bar counts stored documents
        rows = np.arange(start, len(corpus))
        texts = corpus.passages()
        dataset = ray.data.from_items([{"row": int(r), "text": texts[r]} for r in rows])
        gpus = 1 if str(device).startswith("cuda") else 0
        # each actor reserves one CPU (so Ray Data's own tasks can still run); on a local Ray it may use its share of threads
        threads = max(1, int(ray.cluster_resources().get("CPU", 1)) // actors) if address == LOCAL_RAY else 1
        encoded = dataset.map_batches(
            EncodeActor, fn_constructor_kwargs={"config": dataclasses.asdict(config), "device": device, "threads": threads},
            batch_size=64, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1, num_gpus=gpus)
        for batch in encoded.iter_batches(batch_size=batch_size, batch_format="numpy"):
            yield batch["row"].astype(np.int64), batch["embedding"].astype(np.float32)
    finally:
        if started:
            ray.shutdown()


def _reproject(store: VectorStore, model: IMRNN, identity: AdapterIdentity, progress: bool,
               start_time: float) -> IndexReport:
    """Rewrite every record's projected vector for `model` from its stored frozen embedding (no encoder needed).

    The collection is marked "reprojecting" (so searches refuse it) until every record is rewritten; a killed
    re-projection is finished by running it again."""
    info = store.info()
    identity.check(info, store.uri, reproject=True, ready=False)
    total = store.count()
    corpus = info.metadata.get("progress", {}).get("corpus")  # kept: a later `imrnn index` of it stays a no-op

    def record(state: str, count: int) -> None:
        store.write_metadata(identity.metadata(state, {"corpus": corpus, "done": count, "total": total}))

    record("reprojecting", 0)
    done = 0
    bar = tqdm(total=total, desc=f"re-projecting {store.collection}", unit="doc", disable=not progress, dynamic_ncols=True)
    for batch in store.scan(store.config.batch_size):
        projected = model.cache_corpus(batch.embeddings).projected.cpu().numpy()
        store.upsert(Records(batch.ids, batch.embeddings, projected, batch.titles, batch.texts))
        done += len(batch)
        record("reprojecting", done)
        bar.update(len(batch))
    bar.close()
    record("ready", total)
    return IndexReport(store.uri, store.collection, total, done, 0, time.perf_counter() - start_time, "reprojected")
