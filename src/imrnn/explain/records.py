"""The records an explanation produces: frozen dataclasses that round-trip through JSON exactly, and `ExplainError`."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from ..errors import IMRNNError

_J = TypeVar("_J", bound="_JsonMixin")


class ExplainError(IMRNNError, ValueError):
    """An explanation was asked for with inputs it cannot use (empty query, no candidates, bad options)."""


class _JsonMixin:
    """`to_json` / `from_json` for frozen dataclasses of floats, ints, strings, tuples and nested dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def to_json(self, indent: int | None = None) -> str:
        """JSON text; floats are written with repr precision, so `from_json(to_json(x)) == x` exactly."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False, ensure_ascii=False)

    @classmethod
    def from_dict(cls: type[_J], values: dict[str, Any]) -> _J:
        return _build(cls, values)

    @classmethod
    def from_json(cls: type[_J], text: str) -> _J:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise ExplainError(f"Not valid JSON for {cls.__name__}: {err}.") from None
        return cls.from_dict(values)


def _build(kind: Any, value: Any) -> Any:
    """Rebuild a value of type `kind` (dataclass, tuple[...], dict[...], X | None, scalar) from parsed JSON."""
    origin = typing.get_origin(kind)
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise ExplainError(f"Expected a JSON object for {kind.__name__}, got {type(value).__name__}.")
        hints = typing.get_type_hints(kind)
        names = {f.name for f in dataclasses.fields(kind)}
        if set(value) - names or {n for n in names if n not in value}:
            raise ExplainError(
                f"{kind.__name__} JSON has fields {sorted(value)}, expected {sorted(names)}; was it written by another version?"
            )
        return kind(**{name: _build(hints[name], value[name]) for name in names})
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(kind)
        if value is None and type(None) in args:
            return None
        return _build(next(a for a in args if a is not type(None)), value)
    if origin is tuple:
        args = typing.get_args(kind)
        item = args[0]
        return tuple(_build(item, v) for v in value)
    if origin is dict:
        key, item = typing.get_args(kind)
        return {k: _build(item, v) for k, v in value.items()}
    if kind is float:
        return float(value)
    if kind is int:
        return int(value)
    return value


@dataclass(frozen=True)
class Concept(_JsonMixin):
    """A vocabulary entry and its signed weight (+: moved toward it, -: moved away from it)."""

    token: str
    weight: float


@dataclass(frozen=True)
class Word(_JsonMixin):
    """A word of the user's text, by character offsets, with its attribution weight (score units)."""

    text: str
    start: int
    end: int
    weight: float


@dataclass(frozen=True)
class CandidateExplanation(_JsonMixin):
    """One candidate: scores, ranks, the exact split of its score change, concepts and word attributions.

    `base_score + projection + modulation + refinement == adapted_score` (up to float rounding): projection is
    <q~, d~> - base, and the two adapters share the rest by their Shapley values over the corners <q~|q^, d~|d^>
    (all three scaled by the novelty gate where the checkpoint has one).
    `query_weights[j]` is the drop of this document's adapted score when query word j is removed.
    """

    doc_id: str
    text: str
    base_score: float
    adapted_score: float
    base_rank: int
    adapted_rank: int
    rank_shift: int
    projection: float
    modulation: float
    refinement: float
    toward: tuple[Concept, ...]
    away: tuple[Concept, ...]
    query_weights: tuple[float, ...]
    doc_words: tuple[Word, ...] | None

    @property
    def change(self) -> float:
        return self.adapted_score - self.base_score


@dataclass(frozen=True)
class Explanation(_JsonMixin):
    """Why the adapters re-ranked one query's candidates the way they did."""

    query: str
    query_id: str | None
    num_candidates: int
    vocabulary: str
    gate: float  # weight of the adapted score for this query (1.0 unless the checkpoint has a novelty gate)
    query_words: tuple[Word, ...]  # weights: occlusion effect on the promoted document (0 if none)
    pulled_toward: tuple[Concept, ...]
    pushed_from: tuple[Concept, ...]
    promoted: str | None
    candidates: tuple[CandidateExplanation, ...]  # adapted top-`top` and base top-`top`, by adapted rank

    def candidate(self, doc_id: str) -> CandidateExplanation:
        for cand in self.candidates:
            if cand.doc_id == doc_id:
                return cand
        raise ExplainError(f"Document {doc_id!r} is not among the explained candidates of query {self.query_id!r}.")


@dataclass(frozen=True)
class DeletionPair(_JsonMixin):
    """Deletion test for one (query, most-promoted document) pair: score drops of the adapted score."""

    query_id: str
    doc_id: str
    score: float
    token_deleted: tuple[str, ...]
    token_drop: float
    concept_deleted: tuple[str, ...]
    concept_drop: float
    random_drops: tuple[float, ...]

    @property
    def random_drop(self) -> float:
        return float(np.mean(self.random_drops))

    @property
    def token_wins(self) -> bool:
        return self.token_drop > self.random_drop

    @property
    def concept_wins(self) -> bool:
        return self.concept_drop > self.random_drop


@dataclass(frozen=True)
class DeletionReport(_JsonMixin):
    """The deletion test over a query set; `skipped` counts queries without a usable pair, by reason."""

    n: int
    draws: int
    seed: int
    vocabulary: str
    concept_source: str
    pairs: tuple[DeletionPair, ...]
    skipped: dict[str, int]

    def summary(self) -> dict[str, float | int]:
        """Share of pairs where attributed deletion hurts more than random, and the mean drops."""
        if not self.pairs:
            return {"pairs": 0}
        return {
            "pairs": len(self.pairs),
            "token_share": float(np.mean([p.token_wins for p in self.pairs])),
            "concept_share": float(np.mean([p.concept_wins for p in self.pairs])),
            "token_drop": float(np.mean([p.token_drop for p in self.pairs])),
            "concept_drop": float(np.mean([p.concept_drop for p in self.pairs])),
            "random_drop": float(np.mean([p.random_drop for p in self.pairs])),
        }
