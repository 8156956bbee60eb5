"""File helpers every stage shares: atomic writes and folder swaps with one fsync policy, and memory-map views.

The policy: a file's bytes are flushed and fsync'ed *before* the rename that publishes it, so after a crash a
name points either at the old complete content or at the new complete content, never at a torn file. Folders
are built under a temporary name beside their target (every file in them fsync'ed the same way) and swapped in
by renames; a folder being replaced or removed is first renamed aside (to a `.tmp-` name), so no half-deleted
folder keeps its name and every leftover of a killed process is recognisable by that prefix.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable

import numpy as np

if TYPE_CHECKING:
    import torch


def _temporary_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _set_aside(path: Path, why: str) -> Path:
    """Where a folder goes while it is replaced or deleted: a `.tmp-` name, like every unfinished thing here."""
    return path.with_name(f".tmp-{why}-{path.name}-{os.getpid()}")


def fsync_file(path: str | Path) -> None:
    """Flush a written file's bytes to disk."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Publish the bytes `write(handle)` produces at `path`: temporary file beside it, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_beside(path)
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`path.write_text(text)` (UTF-8), atomically."""
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def atomic_write_json(path: str | Path, payload: Any, indent: int | None = 2, default: Callable[[Any], Any] | None = None) -> Path:
    """JSON with sorted keys, atomically."""
    return atomic_write_text(path, json.dumps(payload, indent=indent, sort_keys=True, default=default))


def atomic_save_npy(path: str | Path, array: np.ndarray) -> Path:
    """`numpy.save`, atomically."""
    return atomic_write(path, lambda handle: np.save(handle, array))


def atomic_write_with(path: str | Path, write_to: Callable[[str], None]) -> Path:
    """For writers that take a file name (faiss, safetensors): write a temporary name beside `path`, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_beside(path)
    try:
        write_to(str(tmp))
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def temporary_folder_beside(target: str | Path, prefix: str | None = None) -> Path:
    """A new empty folder next to `target` (same file system, so a rename can publish it)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix or f".{target.name}.", dir=target.parent))


def publish_folder(built: str | Path, target: str | Path) -> Path:
    """Swap a folder built by `temporary_folder_beside` in as `target`: fsync its files, rename an existing
    `target` aside, rename `built` into place, then delete the old one."""
    built, target = Path(built), Path(target)
    for file in built.rglob("*"):
        if file.is_file():
            fsync_file(file)
    if target.exists():
        old = _set_aside(target, "old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(built, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(built, target)
    return target


def remove_folder(folder: str | Path) -> None:
    """Delete a folder without leaving a half-deleted one under its name: rename it aside, then delete."""
    folder = Path(folder)
    if not folder.exists():
        return
    trash = _set_aside(folder, "trash")
    shutil.rmtree(trash, ignore_errors=True)
    try:
        os.replace(folder, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


# --------------------------------------------------------------------------- memory-mapped arrays


def tensor_view(embeddings: np.ndarray) -> torch.Tensor:
    """A float32 torch tensor sharing memory with `embeddings` (a read-only memmap included: callers only read it)."""
    import torch

    array = np.asarray(embeddings, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def release_pages(array: np.ndarray, start: int, stop: int) -> None:
    """Drop rows `[start, stop)` of a read-only or shared memory map from this process's resident memory.

    The data stays in the file (and usually the page cache); touching the rows again maps them back in. A no-op
    for arrays that are not file-backed maps, or are copy-on-write maps whose private changes would be lost.
    """
    import mmap

    base = array
    while not isinstance(base, np.memmap) and isinstance(getattr(base, "base", None), np.ndarray):
        base = base.base
    handle = getattr(base, "_mmap", None)
    if handle is None or getattr(base, "mode", "c") not in ("r", "r+", "w+") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    if not array.flags.c_contiguous or array.ndim < 1 or stop <= start:
        return
    try:
        view = np.frombuffer(handle, dtype=np.uint8)
        offset = array.__array_interface__["data"][0] - view.__array_interface__["data"][0]
    except (TypeError, ValueError):
        return
    row = array.strides[0]
    page = mmap.PAGESIZE
    begin = max(0, (offset + start * row) // page * page)
    end = min(len(handle), offset + stop * row)
    if end > begin:
        try:
            handle.madvise(mmap.MADV_DONTNEED, begin, end - begin)
        except (OSError, ValueError):
            pass
