"""Frozen, validated configuration dataclasses (torch-free, so the CLI can build flags cheaply)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .errors import ConfigError

LOSSES = ("listwise", "margin")
_JSON_TYPES: dict[str, type | tuple[type, ...]] = {"int": int, "float": (int, float), "bool": bool, "str": str}


def check_types(cls: type, values: dict) -> dict:
    """`values` for `cls(**values)` (e.g. read from a JSON file), refusing any value whose type does not match its
    field's annotation (a string for an int, a bool for a float, NaN or Infinity for a float)."""
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value, allowed = values[f.name], [t.strip() for t in str(f.type).split("|")]
        if not any(t in _JSON_TYPES for t in allowed) or (value is None and "None" in allowed):
            continue
        ok = any(isinstance(value, _JSON_TYPES[t]) and (t == "bool" or not isinstance(value, bool)) for t in allowed if t in _JSON_TYPES)
        if not ok or (isinstance(value, float) and not math.isfinite(value)):
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
            raise ConfigError(f"{cls.__name__}.{f.name} must be {' or '.join(allowed)}, got {type(value).__name__} {shown}.")
    return values


@dataclass(frozen=True)
class IMRNNConfig:
    """Architecture of the adapters. `working_dim=None` means square (= embedding_dim).

    The novelty gate (`memory_size` > 0 and a `gate_threshold`) blends adapted and frozen scores per query by
    how close the query is to a training query: g = sigmoid((max cos(q, memory) - threshold) / gate_width),
    score = g * adapted + (1 - g) * frozen. Training calibrates it on validation; 0 = no gate.
    """

    embedding_dim: int = 384
    working_dim: int | None = None
    identity_init: bool = True
    hidden_dim: int = 128
    dropout: float = 0.1
    use_query_adapter: bool = True
    use_doc_adapter: bool = True
    feedback_docs: int = 5
    iterations: int = 1
    memory_size: int = 0
    gate_threshold: float | None = None
    gate_width: float = 0.05

    def __post_init__(self) -> None:
        if self.memory_size < 0 or self.gate_width <= 0:
            raise ConfigError(f"memory_size must be >= 0 and gate_width > 0, got {self.memory_size}, {self.gate_width}.")
        if (self.memory_size > 0) != (self.gate_threshold is not None):
            raise ConfigError("A novelty gate needs both memory_size > 0 and a gate_threshold (or neither).")
        if self.embedding_dim < 1 or self.hidden_dim < 1:
            raise ConfigError(f"embedding_dim and hidden_dim must be positive, got {self.embedding_dim}, {self.hidden_dim}.")
        if self.working_dim is not None and self.working_dim < 1:
            raise ConfigError(f"working_dim must be positive or None (square), got {self.working_dim}.")
        if self.identity_init and self.working_dim not in (None, self.embedding_dim):
            raise ConfigError(
                f"identity_init needs a square projection, but working_dim={self.working_dim} != embedding_dim="
                f"{self.embedding_dim}. Set working_dim to None or identity_init to False."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}.")
        if self.feedback_docs < 1:
            raise ConfigError(f"feedback_docs (m) must be at least 1, got {self.feedback_docs}.")
        if self.iterations < 1:
            raise ConfigError(f"iterations must be at least 1, got {self.iterations}.")

    @property
    def dim(self) -> int:
        return self.working_dim or self.embedding_dim

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "IMRNNConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"Unknown IMRNNConfig fields {sorted(unknown)}; known: {sorted(known)}.")
        return cls(**check_types(cls, values))


@dataclass(frozen=True)
class TrainConfig:
    """How the adapters are trained; every field maps to an `imrnn train` flag."""

    loss: str = "margin"
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    temperature: float = 0.05
    margin: float = 0.1
    hard_negatives: int = 16
    bm25_negatives: int = 0
    candidates: int = 100
    max_added_positives: int = 0
    validation_fraction: float = 0.15
    patience: int = 6
    novelty_gate: bool = True
    seed: int = 42

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ConfigError(f"loss must be one of {LOSSES}, got {self.loss!r}.")
        for name in ("epochs", "batch_size", "candidates", "patience", "hard_negatives"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("bm25_negatives", "max_added_positives"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if not all(math.isfinite(v) for v in (self.lr, self.temperature, self.margin, self.weight_decay)):
            raise ConfigError("lr, temperature, margin and weight_decay must be finite numbers (not NaN or Inf).")
        if self.lr <= 0 or self.temperature <= 0 or self.margin < 0 or self.weight_decay < 0:
            raise ConfigError("lr and temperature must be > 0; margin and weight_decay >= 0.")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ConfigError(f"validation_fraction must be in (0, 1), got {self.validation_fraction}.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        if set(values) - known:
            raise ConfigError(f"Unknown TrainConfig fields {sorted(set(values) - known)}; known: {sorted(known)}.")
        return cls(**check_types(cls, values))
