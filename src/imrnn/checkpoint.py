"""Checkpoint folders: `config.json` + `model.safetensors`, written atomically, loaded strictly, never unpickled."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import save_file

from . import __version__
from .config import EncoderConfig, IMRNNConfig, TrainConfig, check_types
from .errors import CheckpointError, ConfigError
from .files import publish_folder, temporary_folder_beside
from .model import IMRNN

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = 1
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


@dataclass
class Checkpoint:
    """A trained adapter with everything needed to use and audit it."""

    model: IMRNN
    encoder: EncoderConfig
    train_config: TrainConfig | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def model_config(self) -> IMRNNConfig:
        return self.model.config


def save_checkpoint(checkpoint: Checkpoint, directory: str | Path) -> Path:
    """Write the folder atomically: build it beside the target, then rename over it."""
    directory = Path(directory)
    payload = {
        "format": FORMAT,
        "library": "imrnn",
        "library_version": __version__,
        "model_config": checkpoint.model.config.to_dict(),
        "train_config": checkpoint.train_config.to_dict() if checkpoint.train_config else None,
        "encoder": {**checkpoint.encoder.__dict__, "dimension": checkpoint.model.config.embedding_dim},
        **checkpoint.metadata,
    }
    tmp = temporary_folder_beside(directory)
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in checkpoint.model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": str(FORMAT)})
        (tmp / CONFIG_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True, default=_json_default))
        publish_folder(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def load_checkpoint(directory: str | Path, device: str = "cpu", expected_dim: int | None = None) -> Checkpoint:
    """Rebuild the adapter from the folder alone; any missing, extra, misshapen or non-finite weight is an error."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a checkpoint folder. Train one with `imrnn train --output {directory}`.")
    for path in (config_path, weights_path):
        if not path.is_file():
            raise CheckpointError(f"Checkpoint {directory} is incomplete: {path.name} is missing. Re-train or re-copy the folder.")
    try:
        payload = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise CheckpointError(f"{config_path} is not readable JSON ({type(err).__name__}: {str(err)[:120]}). Re-train or re-copy the folder.") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{config_path} must hold a JSON object, got {type(payload).__name__}. Re-train or re-copy the folder.")
    if payload.get("format") != FORMAT:
        raise CheckpointError(f"{config_path}: checkpoint format {str(payload.get('format'))[:20]!r}, this imrnn reads format {FORMAT}.")
    try:
        for key, kinds in (("model_config", dict), ("encoder", dict), ("train_config", (dict, type(None)))):
            if not isinstance(payload.get(key), kinds):
                raise TypeError(f'"{key}" must be a JSON object, got {type(payload.get(key)).__name__}')
        model_config = IMRNNConfig.from_dict(payload["model_config"])
        encoder_fields = {k: v for k, v in payload["encoder"].items() if k != "dimension"}
        encoder = EncoderConfig(**check_types(EncoderConfig, encoder_fields))
        train_config = TrainConfig.from_dict(payload["train_config"]) if payload.get("train_config") else None
    except (KeyError, TypeError, ConfigError) as err:
        raise CheckpointError(f"{config_path} is not a valid imrnn checkpoint config ({err}).") from None
    if expected_dim is not None and expected_dim != model_config.embedding_dim:
        raise CheckpointError(
            f"The checkpoint's adapter expects {model_config.embedding_dim}-d embeddings but the encoder gives "
            f"{expected_dim}-d. Use the encoder it was trained with ({payload['encoder'].get('model')})."
        )
    with torch.device("meta"):  # shapes implied by config.json, without allocating (a hostile config may be huge)
        expected = {k: (tuple(v.shape), v.dtype) for k, v in IMRNN(model_config).state_dict().items()}
    try:
        with safe_open(str(weights_path), framework="pt") as handle:  # header first: names, shapes, dtypes
            names = set(handle.keys())
            missing, unexpected = sorted(set(expected) - names), sorted(names - set(expected))
            if missing or unexpected:
                raise CheckpointError(f"{weights_path}: missing tensors {missing}, unexpected tensors {unexpected[:10]}; the file does not match config.json.")
            for name in sorted(names):
                header = handle.get_slice(name)
                shape, dtype = tuple(header.get_shape()), header.get_dtype()
                if shape != expected[name][0]:
                    raise CheckpointError(f"{weights_path}: tensor {name} has shape {shape}, config.json implies {expected[name][0]}.")
                if dtype != _SAFETENSORS_DTYPES.get(expected[name][1]):
                    raise CheckpointError(f"{weights_path}: tensor {name} has dtype {dtype}, expected {_SAFETENSORS_DTYPES.get(expected[name][1])}.")
            state = {name: handle.get_tensor(name) for name in sorted(names)}
    except CheckpointError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{weights_path} is not a readable safetensors file ({str(err)[:200]}). Re-train or re-copy the folder.") from None
    for name, tensor in state.items():
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{weights_path}: tensor {name} holds NaN or Inf values; the checkpoint is corrupt.")
    model = IMRNN(model_config)
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    metadata = {k: v for k, v in payload.items() if k not in ("model_config", "train_config", "encoder")}
    return Checkpoint(model, encoder, train_config, metadata)
