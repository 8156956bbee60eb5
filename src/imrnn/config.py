"""Frozen, validated configuration dataclasses (torch-free, so the CLI can build flags cheaply)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import ConfigError

LOSSES = ("listwise", "margin")


@dataclass(frozen=True)
class IMRNNConfig:
    """Architecture of the adapters. `working_dim=None` means square (= embedding_dim)."""

    embedding_dim: int = 384
    working_dim: int | None = None
    identity_init: bool = True
    hidden_dim: int = 128
    dropout: float = 0.1
    use_query_adapter: bool = True
    use_doc_adapter: bool = True
    feedback_docs: int = 5
    iterations: int = 1

    def __post_init__(self) -> None:
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
        return cls(**values)


@dataclass(frozen=True)
class TrainConfig:
    """How the adapters are trained; every field maps to an `imrnn train` flag."""

    loss: str = "listwise"
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    temperature: float = 0.05
    margin: float = 0.1
    hard_negatives: int = 16
    bm25_negatives: int = 0
    candidates: int = 100
    max_added_positives: int = 10
    validation_fraction: float = 0.15
    patience: int = 6
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
        return cls(**values)
