"""Concept vocabularies: whole-word tokenizer entries and their directions in the encoder's space.

`"encoder"` embeds each token through the full frozen encoder (cached on disk); `"input"` takes the
transformer's input word-embedding rows (the authors' choice). Both are centred on their mean and renormalised.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..data import default_cache_dir
from ..encode import Encoder
from ..files import atomic_save_npy, atomic_write_json
from .records import ExplainError

VOCABULARIES = ("encoder", "input")
VOCAB_FORMAT = 1


@dataclass(frozen=True)
class ConceptVocabulary:
    """Whole-word vocabulary tokens and their unit, mean-centred directions `(T, E)` in the encoder's space."""

    tokens: tuple[str, ...]
    vectors: np.ndarray
    mean: np.ndarray
    kind: str

    @classmethod
    def from_vectors(cls, tokens: Sequence[str], vectors: np.ndarray, kind: str) -> "ConceptVocabulary":
        """Centre unit vectors on their mean and renormalise: weights then have a meaningful sign (toward/away
        relative to the average token) instead of all sharing the anisotropy offset of the embedding space."""
        unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        mean = unit.mean(0)
        centred = unit - mean
        centred /= np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), 1e-12)
        return cls(tuple(tokens), np.ascontiguousarray(centred, dtype=np.float32), mean.astype(np.float32), kind)

    def directions(self, vectors: np.ndarray) -> np.ndarray:
        """Other vectors of the same space (e.g. single words), centred and normalised like the vocabulary."""
        unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        centred = unit - self.mean
        return centred / np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), 1e-12)


def vocabulary_tokens(tokenizer: Any) -> tuple[list[str], list[int]]:
    """Whole-word entries of a tokenizer's vocabulary: (display strings, token ids).

    Dropped: special tokens, `[unused*]`-style placeholders, WordPiece `##` continuations (for SentencePiece/BPE
    vocabularies: pieces without the word-start marker), tokens without a letter (punctuation, numbers) and
    tokens shorter than three characters, which carry little meaning on their own.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = set(getattr(tokenizer, "all_special_tokens", []))
    markers = ("\u2581", "\u0120")  # SentencePiece '▁', byte-level BPE 'Ġ'
    word_start = any(tok.startswith(markers) for tok, _ in vocab[:5000])
    tokens, ids = [], []
    for tok, idx in vocab:
        if tok in special or (tok.startswith(("[", "<")) and tok.endswith(("]", ">"))) or tok.startswith("##"):
            continue
        if word_start:
            if not tok.startswith(markers):
                continue
            tok = tok[1:]
        if len(tok) < 3 or not any(ch.isalpha() for ch in tok):
            continue
        tokens.append(tok)
        ids.append(idx)
    return tokens, ids


def encoder_vocabulary(encoder: Encoder, cache_dir: str | Path | None = None, progress: bool = True) -> ConceptVocabulary:
    """Every whole-word vocabulary token embedded through the full frozen encoder, cached on disk as .npy.

    For MiniLM that is 21,455 single-token texts, ~17 s of one CPU core, once; the `(T, E)` matrix is written
    atomically under `<cache>/concepts/` keyed by the encoder's identity, prefix, precision and token list, and
    later loads take ~0.2 s.
    """
    tokens, _ = vocabulary_tokens(encoder.model.tokenizer)
    prefix = encoder.config.passage_prefix
    key_src = {"format": VOCAB_FORMAT, "model": encoder.identity, "prefix": prefix, "precision": encoder.precision,
               "tokens": hashlib.sha256("\n".join(tokens).encode()).hexdigest()}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:20]
    root = Path(cache_dir or default_cache_dir()) / "concepts"
    matrix_path, meta_path = root / f"{key}.npy", root / f"{key}.json"
    matrix = None
    if matrix_path.is_file() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            loaded = np.load(matrix_path)
            if meta.get("tokens") == tokens and loaded.shape == (len(tokens), encoder.dimension):
                matrix = loaded
        except (OSError, ValueError, json.JSONDecodeError):
            matrix = None
    if matrix is None:
        root.mkdir(parents=True, exist_ok=True)
        batch_size = encoder.batch_size
        encoder.batch_size = max(batch_size, 512)  # single-token texts: big batches, little padding
        try:
            matrix = encoder.encode(tokens, prefix, progress=progress)
        finally:
            encoder.batch_size = batch_size
        atomic_save_npy(matrix_path, matrix)
        atomic_write_json(meta_path, {**key_src, "tokens": tokens})
    return ConceptVocabulary.from_vectors(tokens, matrix, "encoder")


def input_vocabulary(encoder: Encoder) -> ConceptVocabulary:
    """The transformer's input word-embedding rows of the whole-word tokens (the authors' vocabulary)."""
    tokens, ids = vocabulary_tokens(encoder.model.tokenizer)
    weight = input_embeddings(encoder).weight.detach().float().cpu().numpy()
    return ConceptVocabulary.from_vectors(tokens, weight[ids], "input")


def input_embeddings(encoder: Encoder) -> torch.nn.Module:
    """The input word-embedding layer of the encoder's transformer (token attribution hooks it; "input" reads it)."""
    module = encoder.model[0]
    auto = getattr(module, "auto_model", None) or getattr(module, "model", None)
    if auto is None or not hasattr(auto, "get_input_embeddings"):
        raise ExplainError(
            f"Encoder {encoder.config.model!r} does not expose a transformer with input embeddings; token attribution "
            "and the 'input' vocabulary need a sentence-transformers model whose first module wraps a HF transformer."
        )
    return auto.get_input_embeddings()

