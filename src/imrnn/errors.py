"""The library's own exceptions: every failure a user can cause is one of these."""

from __future__ import annotations


class IMRNNError(Exception):
    """Base class of every error imrnn raises on bad input or bad artefacts."""


class DataError(IMRNNError, ValueError):
    """A dataset, qrels or run file is missing or malformed (the message names file, line and fix)."""


class CheckpointError(IMRNNError, ValueError):
    """A checkpoint folder is missing, incomplete, tampered with or incompatible."""


class ConfigError(IMRNNError, ValueError):
    """A configuration value is out of range or inconsistent."""


class StoreError(IMRNNError, RuntimeError):
    """A vector store is unreachable, or its collection is missing or does not match the adapter (the message names the fix)."""
