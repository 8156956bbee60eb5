"""Resumable training state: model, optimiser, RNG streams, best-so-far and history after each epoch, plus a
snapshot of every validated epoch's weights for plateau averaging.

One folder per saved epoch (`epoch-00007/`: `state.safetensors` + `state.json`, no pickle), built under a
temporary name and published by an atomic rename, so a kill at any moment leaves either the previous epoch
or the new one, never a half-written state. A state records a fingerprint of the configuration and the
training data; resuming with anything else is refused instead of silently mixing two runs.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError
from .files import atomic_write_with, publish_folder, remove_folder, temporary_folder_beside

STATE_FORMAT = 1
_EPOCH_DIR = re.compile(r"^epoch-(\d{5,})$")
SNAPSHOTS = "snapshots"  # one file per validated epoch (weights + per-query validation values), for plateau averaging


@dataclass
class TrainState:
    """Everything `train()` needs to continue exactly where it stopped."""

    epoch: int
    best_epoch: int
    best_score: float
    stale: int
    history: list[dict]
    model: dict[str, torch.Tensor]
    best: dict[str, torch.Tensor]
    optimiser: dict[int, dict[str, Any]]
    rng: dict[str, Any] = field(default_factory=dict)
    averaged: dict[str, torch.Tensor] = field(default_factory=dict)  # the moving average of the weights, if one is kept


@dataclass
class Snapshot:
    """One validated epoch: the weights validation scored and its per-query nDCG@10 (epoch 0: the untrained start)."""

    epoch: int
    weights: dict[str, torch.Tensor]
    validation: np.ndarray


def fingerprint(*parts: Any) -> str:
    """SHA-256 over JSON-able values and arrays (dtype, shape and bytes), in order."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, (np.ndarray, torch.Tensor)):
            array = np.ascontiguousarray(part.detach().cpu().numpy() if isinstance(part, torch.Tensor) else part)
            if array.dtype == object:
                digest.update(json.dumps(array.tolist()).encode("utf-8", "surrogatepass"))
            else:
                digest.update(f"{array.dtype.str}{array.shape}".encode())
                digest.update(array.tobytes())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode("utf-8", "surrogatepass"))
        digest.update(b"\x00")
    return digest.hexdigest()


def capture_rng(generator: torch.Generator, device: str) -> dict[str, Any]:
    """The state of every random stream training may touch (torch CPU/CUDA, the shuffling generator, numpy, random)."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
        "numpy": np.random.get_state(legacy=False),
        "python": random.getstate(),
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state(torch.device(device))
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator, device: str) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"], torch.device(device))


def save_state(directory: str | Path, state: TrainState, key: str) -> Path:
    """Publish `state` as `<directory>/epoch-NNNNN/` atomically, then remove older epochs and leftovers."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, value in state.model.items():
        tensors[f"model/{name}"] = value
    for name, value in state.best.items():
        tensors[f"best/{name}"] = value
    for name, value in state.averaged.items():
        tensors[f"averaged/{name}"] = value
    optimiser_scalars: dict[str, dict[str, Any]] = {}
    for index, values in state.optimiser.items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimiser/{index}/{name}"] = value
            else:
                optimiser_scalars.setdefault(str(index), {})[name] = value
    tensors["rng/torch"] = state.rng["torch"]
    tensors["rng/generator"] = state.rng["generator"]
    if "cuda" in state.rng:
        tensors["rng/cuda"] = state.rng["cuda"]
    numpy_state = state.rng["numpy"]
    python_state = state.rng["python"]
    payload = {
        "format": STATE_FORMAT,
        "fingerprint": key,
        "epoch": state.epoch,
        "best_epoch": state.best_epoch,
        "best_score": state.best_score,
        "stale": state.stale,
        "history": state.history,
        "optimiser_scalars": optimiser_scalars,
        "rng_numpy": {"bit_generator": numpy_state["bit_generator"], "key": numpy_state["state"]["key"].tolist(),
                      "pos": int(numpy_state["state"]["pos"]), "has_gauss": int(numpy_state["has_gauss"]),
                      "gauss": float(numpy_state["gauss"])},
        "rng_python": [python_state[0], list(python_state[1]), python_state[2]],
    }
    target = directory / f"epoch-{state.epoch:05d}"
    tmp = temporary_folder_beside(target, prefix=".tmp-")
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(payload, indent=1))
        publish_folder(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for other in directory.iterdir():
        if other != target and _leftover(other):
            remove_folder(other)
    return target


def _leftover(path: Path) -> bool:
    """A saved epoch or the remains of an interrupted save (temporary or set-aside `.tmp-` folders)."""
    return path.name.startswith(".tmp-") or bool(_EPOCH_DIR.match(path.name))


def save_snapshot(directory: str | Path, snapshot: Snapshot) -> Path:
    """Keep one epoch's validated weights and per-query validation nDCG@10 in `<directory>/snapshots/` (atomically;
    written before that epoch's state, so every saved state has the snapshots of its epochs)."""
    tensors = {f"model/{name}": value.detach().cpu().contiguous() for name, value in snapshot.weights.items()}
    tensors["validation"] = torch.from_numpy(np.ascontiguousarray(snapshot.validation, dtype=np.float64))
    path = Path(directory) / SNAPSHOTS / f"epoch-{snapshot.epoch:05d}.safetensors"
    return atomic_write_with(path, lambda name: save_file(tensors, name))


def load_snapshots(directory: str | Path, last_epoch: int) -> list[Snapshot]:
    """The snapshots of epochs 0..`last_epoch` saved by `save_snapshot`; CheckpointError if one is missing or damaged."""
    out = []
    for epoch in range(last_epoch + 1):
        path = Path(directory) / SNAPSHOTS / f"epoch-{epoch:05d}.safetensors"
        try:
            tensors = load_file(str(path))
            validation = tensors.pop("validation").numpy()
        except (OSError, SafetensorError, KeyError) as err:
            raise CheckpointError(f"The training state in {directory} lacks a usable snapshot of epoch {epoch} ({err!r}). "
                                  f"Delete {directory} (or train without --resume) to start over.") from None
        out.append(Snapshot(epoch, {name.removeprefix("model/"): value for name, value in tensors.items()}, validation))
    return out


def discard_state(directory: str | Path) -> None:
    """Remove a whole state folder (after its checkpoint was written)."""
    remove_folder(directory)


def clear_state(directory: str | Path) -> None:
    """Remove every saved epoch (and leftovers) from `directory`, keeping unrelated files."""
    directory = Path(directory)
    if directory.is_dir():
        for other in directory.iterdir():
            if _leftover(other):
                remove_folder(other)
        remove_folder(directory / SNAPSHOTS)


def has_state(directory: str | Path) -> bool:
    directory = Path(directory)
    return directory.is_dir() and any(_EPOCH_DIR.match(p.name) for p in directory.iterdir())


def load_state(directory: str | Path, key: str) -> TrainState | None:
    """The latest saved epoch in `directory`, or None if there is none; CheckpointError if it cannot be used."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    epochs = sorted((int(m.group(1)), p) for p in directory.iterdir() if (m := _EPOCH_DIR.match(p.name)) and p.is_dir())
    if not epochs:
        return None
    folder = epochs[-1][1]
    fix = f"Delete {directory} (or train without --resume) to start over."
    try:
        payload = json.loads((folder / "state.json").read_text())
        tensors = load_file(str(folder / "state.safetensors"))
    except (OSError, ValueError, SafetensorError) as err:
        raise CheckpointError(f"The training state in {folder} is unreadable ({err}). {fix}") from None
    if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT:
        raise CheckpointError(f"The training state in {folder} has an unknown format. {fix}")
    if payload.get("fingerprint") != key:
        raise CheckpointError(
            f"The training state in {folder} was saved by a run with another configuration or other training data; "
            f"resuming it would mix two runs. Train with the same flags and data, or: {fix}"
        )
    try:
        optimiser: dict[int, dict[str, Any]] = {}
        for index, values in payload["optimiser_scalars"].items():
            optimiser.setdefault(int(index), {}).update(values)
        parts: dict[str, dict[str, torch.Tensor]] = {"model": {}, "best": {}, "averaged": {}}
        for name, tensor in tensors.items():
            kind, rest = name.split("/", 1)
            if kind == "optimiser":
                index, field_name = rest.split("/", 1)
                optimiser.setdefault(int(index), {})[field_name] = tensor
            elif kind in parts:
                parts[kind][rest] = tensor
        saved = payload["rng_numpy"]
        numpy_state = {"bit_generator": saved["bit_generator"], "has_gauss": saved["has_gauss"], "gauss": saved["gauss"],
                       "state": {"key": np.asarray(saved["key"], dtype=np.uint32), "pos": saved["pos"]}}
        version, internal, gauss = payload["rng_python"]
        rng = {"torch": tensors["rng/torch"], "generator": tensors["rng/generator"], "numpy": numpy_state,
               "python": (version, tuple(internal), gauss)}
        if "rng/cuda" in tensors:
            rng["cuda"] = tensors["rng/cuda"]
        return TrainState(int(payload["epoch"]), int(payload["best_epoch"]), float(payload["best_score"]),
                          int(payload["stale"]), list(payload["history"]), parts["model"], parts["best"], optimiser, rng,
                          parts["averaged"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"The training state in {folder} is incomplete ({err!r}). {fix}") from None


def training_key(model_config: Any, config: Any, doc_embs: np.ndarray, doc_ids: np.ndarray, train_set: Any,
                 validation_set: Any) -> str:
    """Fingerprint of what a training run depends on: both configs, the two ranking sets and every corpus row
    (id and embedding) their candidate lists can reach."""
    rows = np.unique(np.concatenate([np.ravel(train_set.candidates), np.ravel(validation_set.candidates)]))
    rows = rows[rows >= 0]
    return fingerprint(
        model_config.to_dict(), config.to_dict(), int(len(doc_ids)), rows, np.asarray(doc_ids)[rows],
        np.asarray(doc_embs[rows], dtype=np.float32),
        *(getattr(s, name) for s in (train_set, validation_set) for name in ("query_ids", "query_embs", "candidates", "grades")),
    )
