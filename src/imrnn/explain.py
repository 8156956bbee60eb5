"""Explanations of IMRNN re-rankings, and a built-in check that they are faithful.

For one query over its candidate list an :class:`Explanation` gives

* base and adapted score and rank of every shown candidate, the rank shift, and the score change split
  exactly into three parts that sum to it: the learned projection, document modulation by the query adapter
  A_q, and query refinement by the document adapter A_d (a two-player Shapley split, so the order in which the
  two adapters are "switched on" does not matter);
* concepts by back-projection (the paper's method, done like with like): the modulation vectors
  q_hat - q_tilde and d_hat - d_tilde are differences of two *unit* vectors of the working space; they are
  mapped back to the encoder's embedding space with the Moore-Penrose pseudo-inverse of the projection
  (computed once per explainer) and matched against a token vocabulary, giving signed concept weights.
  A document's concepts use its modulation *relative to the other candidates* (d_hat_i - d_tilde_i minus the
  mean over the list): a shift shared by every candidate adds the same amount to every score and cannot
  change a rank, and on trained checkpoints it is ~99% of each raw modulation vector (a learned prior), so
  raw vectors would give every document the same concepts. The query's move q_hat - q_tilde is reported raw
  (on a trained SciFact checkpoint it points, on average, 0.96 in the direction of the mean move over all
  queries: mostly the adapter's learned prior, and the report says so);
* token attribution on the user's own words: occlusion for the query (every query word removed in turn, all
  variants encoded in one call, the full adapter re-run, so the effect on every candidate is exact and costs
  one short batch) and gradient x input through the frozen encoder for the documents (occlusion of a
  ~250-token abstract would need hundreds of encodes; one batched forward/backward serves all of them);

and :meth:`Explainer.deletion_test` measures faithfulness: deleting the top-n attributed query words must
lower the adapted score of the most-promoted document more than deleting n random words.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
import zlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Sequence, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import Checkpoint, load_checkpoint
from .data import default_cache_dir
from .encode import Encoder, _save_npy_atomic, _write_json_atomic
from .errors import IMRNNError

VOCABULARIES = ("encoder", "input")
CONCEPT_SOURCES = ("document", "query", "both")
VOCAB_FORMAT = 1
# Modulation vectors are differences of unit vectors: below this length they are float32 rounding (~1e-7 per
# component after a renormalisation), not a move. A concept weighing less than this share of its back-projected
# vector's length is rounding noise too. Both are relative to the vectors involved, not to any CPU's kernels.
MODULATION_NOISE = 1e-5
CONCEPT_NOISE = 1e-5
_WORD = re.compile(r"\w+(?:['\u2019\-]\w+)*")
_J = TypeVar("_J", bound="_JsonMixin")


class ExplainError(IMRNNError, ValueError):
    """An explanation was asked for with inputs it cannot use (empty query, no candidates, bad options)."""


# --------------------------------------------------------------------------- JSON-round-tripping dataclasses


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


# --------------------------------------------------------------------------- words and texts


def words(text: str) -> list[tuple[int, int]]:
    """Character spans of the words of `text` (letters/digits, with inner hyphens and apostrophes)."""
    return [m.span() for m in _WORD.finditer(text)]


def delete_words(text: str, spans: Sequence[tuple[int, int]], drop: Iterable[int]) -> str:
    """`text` with the words `drop` (indices into `spans`) cut out and whitespace collapsed."""
    cut = sorted(set(drop))
    pieces, last = [], 0
    for j in cut:
        start, end = spans[j]
        pieces.append(text[last:start])
        last = end
    pieces.append(text[last:])
    return re.sub(r"\s+", " ", "".join(pieces)).strip()


def _most_promoted(base_rank: np.ndarray, adapted_rank: np.ndarray, top: int) -> int | None:
    """The candidate in the adapted top-`top` with the largest rank gain (ties: better adapted rank); None if
    nothing there moved up."""
    visible = np.flatnonzero(adapted_rank <= top)
    shift = base_rank[visible] - adapted_rank[visible]
    best = visible[np.lexsort((adapted_rank[visible], -shift))[0]]
    return int(best) if base_rank[best] > adapted_rank[best] else None


def _ranks(scores: np.ndarray) -> np.ndarray:
    """1-based ranks by descending score; ties keep the given (first-stage) order."""
    order = np.argsort(-scores, kind="stable")
    ranks = np.empty(len(scores), dtype=np.int64)
    ranks[order] = np.arange(1, len(scores) + 1)
    return ranks


def pseudo_inverse(weight: torch.Tensor | np.ndarray) -> np.ndarray:
    """Moore-Penrose pseudo-inverse `(E, D)` of a projection weight `(D, E)`, computed in float64."""
    matrix = weight.detach().cpu().double() if isinstance(weight, torch.Tensor) else torch.as_tensor(np.asarray(weight, np.float64))
    return torch.linalg.pinv(matrix).numpy()


# --------------------------------------------------------------------------- concept vocabulary


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
    key_src = {"format": VOCAB_FORMAT, "model": encoder.identity, "prefix": prefix, "precision": encoder.config.precision,
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
        _save_npy_atomic(matrix_path, matrix)
        _write_json_atomic(meta_path, {**key_src, "tokens": tokens})
    return ConceptVocabulary.from_vectors(tokens, matrix, "encoder")


def input_vocabulary(encoder: Encoder) -> ConceptVocabulary:
    """The transformer's input word-embedding rows of the whole-word tokens (the authors' vocabulary)."""
    tokens, ids = vocabulary_tokens(encoder.model.tokenizer)
    weight = _input_embeddings(encoder).weight.detach().float().cpu().numpy()
    return ConceptVocabulary.from_vectors(tokens, weight[ids], "input")


def _input_embeddings(encoder: Encoder) -> torch.nn.Module:
    module = encoder.model[0]
    auto = getattr(module, "auto_model", None) or getattr(module, "model", None)
    if auto is None or not hasattr(auto, "get_input_embeddings"):
        raise ExplainError(
            f"Encoder {encoder.config.model!r} does not expose a transformer with input embeddings; token attribution "
            "and the 'input' vocabulary need a sentence-transformers model whose first module wraps a HF transformer."
        )
    return auto.get_input_embeddings()


# --------------------------------------------------------------------------- the explainer


class Explainer:
    """Explains a checkpoint's re-rankings; caches the pseudo-inverse and the concept vocabulary.

    `vocabulary="encoder"` (default) matches modulation vectors against every whole-word token embedded through
    the *full* encoder: the back-projected vectors live in the pooled sentence-embedding space, and so do these
    token vectors. The authors' choice, `"input"`, uses the transformer's input word-embedding matrix, a
    different space (pre-contextualisation, before 6 layers and mean pooling). Measured with
    `benchmarks/faithfulness.py` on SciFact test (MiniLM, 21,455 whole-word tokens): matching a query's own
    embedding against the vocabulary finds its own words in 13.0% of the top 10 with "encoder" vs 4.8% with
    "input", and deleting the query words closest to a promoted document's top concepts beats random deletion
    on 87.0% of pairs with "encoder" vs 69.0% with "input". The price is a one-time ~17 CPU-seconds build,
    cached on disk.
    """

    def __init__(self, checkpoint: Checkpoint, encoder: Encoder | None = None, vocabulary: str | ConceptVocabulary = "encoder",
                 cache_dir: str | Path | None = None, device: str = "cpu", progress: bool = False) -> None:
        if isinstance(vocabulary, ConceptVocabulary):
            self.__dict__["vocabulary"] = vocabulary  # a ready vocabulary (tests, custom concept lists)
            vocabulary = vocabulary.kind
        elif vocabulary not in VOCABULARIES:
            raise ExplainError(f"vocabulary must be one of {VOCABULARIES} or a ConceptVocabulary, got {vocabulary!r}.")
        self.checkpoint = checkpoint
        self.model = checkpoint.model.to(device).eval()
        self.encoder = encoder or Encoder(checkpoint.encoder, device)
        self.vocabulary_kind = vocabulary
        self.cache_dir = cache_dir
        self.device = device
        self.progress = progress

    @classmethod
    def from_checkpoint(cls, directory: str | Path, device: str = "cpu", **kwargs: Any) -> "Explainer":
        return cls(load_checkpoint(directory, device), device=device, **kwargs)

    # ---- cached per checkpoint

    @cached_property
    def pseudo_inverse(self) -> np.ndarray:
        """P^+ `(E, D)` of the projection weight P `(D, E)`; computed once per explainer (i.e. per checkpoint)."""
        return pseudo_inverse(self.model.projection.weight).astype(np.float32)

    @cached_property
    def vocabulary(self) -> ConceptVocabulary:
        if self.encoder.dimension != self.model.config.embedding_dim:
            raise ExplainError(
                f"The encoder gives {self.encoder.dimension}-d embeddings but the checkpoint expects "
                f"{self.model.config.embedding_dim}-d; explain with the encoder the checkpoint was trained with."
            )
        if self.vocabulary_kind == "input":
            return input_vocabulary(self.encoder)
        return encoder_vocabulary(self.encoder, self.cache_dir, self.progress)

    # ---- building blocks

    @cached_property
    def _matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """P^+ and the vocabulary as torch tensors (torch matmuls honour torch's thread setting)."""
        return torch.from_numpy(self.pseudo_inverse), torch.from_numpy(self.vocabulary.vectors)

    def back_project(self, vectors: np.ndarray) -> np.ndarray:
        """Working-space vectors `(..., D)` -> encoder space `(..., E)` through the pseudo-inverse."""
        pinv = self._matrices[0]
        return (torch.from_numpy(np.ascontiguousarray(vectors, np.float32)) @ pinv.T).numpy()

    def concept_weights(self, modulation: np.ndarray) -> np.ndarray:
        """Signed concept weights `(R, T)`: length of each back-projected modulation vector along each token's
        centred unit direction.

        Rounding noise is not a concept, whatever the CPU's kernels leave behind: a modulation vector (a difference
        of unit vectors) shorter than `MODULATION_NOISE` is no move at all, and a weight below `CONCEPT_NOISE` of
        its back-projected vector's length is no direction of it; both become exactly 0, so the untrained
        (identity) adapter has no concepts on any machine."""
        pinv, vocab = self._matrices
        moves = torch.from_numpy(np.ascontiguousarray(modulation, np.float32))
        back = moves @ pinv.T
        weights = back @ vocab.T
        moving = torch.linalg.vector_norm(moves, dim=-1, keepdim=True) > MODULATION_NOISE
        clear = weights.abs() > CONCEPT_NOISE * torch.linalg.vector_norm(back, dim=-1, keepdim=True)
        return torch.where(moving & clear, weights, 0.0).numpy()

    def top_concepts(self, weights: np.ndarray, k: int) -> list[tuple[tuple[Concept, ...], tuple[Concept, ...]]]:
        """Per row: (top-k positive concepts, top-k negative concepts), strongest first."""
        k = min(k, weights.shape[1])
        if k < 1:
            return [((), ())] * len(weights)
        top = np.argpartition(-weights, k - 1, axis=1)[:, :k]
        bottom = np.argpartition(weights, k - 1, axis=1)[:, :k]
        out = []
        tokens = self.vocabulary.tokens
        for row, up, down in zip(weights, top, bottom):
            up = up[np.argsort(-row[up], kind="stable")]
            down = down[np.argsort(row[down], kind="stable")]
            out.append((tuple(Concept(tokens[i], float(row[i])) for i in up if row[i] > 0),
                        tuple(Concept(tokens[i], float(row[i])) for i in down if row[i] < 0)))
        return out

    def _forward(self, query_embs: np.ndarray, cands: np.ndarray):
        """The adapter over one candidate list `(K, E)` for several versions of a query `(V, E)`."""
        queries = torch.from_numpy(np.ascontiguousarray(query_embs, np.float32)).to(self.device)
        docs = torch.from_numpy(np.ascontiguousarray(cands, np.float32)).to(self.device)
        with torch.inference_mode():
            return self.model(queries, docs[None].expand(len(queries), -1, -1))

    def _embed_with_grad(self, texts: Sequence[str], prefix: str):
        """Encoder outputs `(S, E)` with a graph back to the input word embeddings `(S, L, H)`, plus token offsets
        (relative to each text, prefix removed; -1 for special and prefix tokens)."""
        st = self.encoder.model
        full = [prefix + t for t in texts]
        features = st.preprocess(full) if hasattr(st, "preprocess") else st.tokenize(full)
        tok = st.tokenizer(full, padding=True, truncation="longest_first", max_length=st.max_seq_length,
                           return_offsets_mapping=True, return_special_tokens_mask=True, return_tensors="pt")
        if not torch.equal(tok["input_ids"], features["input_ids"]):
            raise ExplainError(
                f"Encoder {self.encoder.config.model!r} preprocesses text differently from its tokenizer, so words "
                "cannot be aligned with tokens; token attribution is not available for it."
            )
        offsets = tok["offset_mapping"].numpy().astype(np.int64) - len(prefix)
        dead = (tok["special_tokens_mask"].numpy() == 1) | (offsets[..., 0] < 0) | (tok["attention_mask"].numpy() == 0)
        offsets[dead] = -1
        features = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
        captured: list[torch.Tensor] = []

        def hook(_module: Any, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
            leaf = output.detach().requires_grad_(True)
            captured.append(leaf)
            return leaf

        handle = _input_embeddings(self.encoder).register_forward_hook(hook)
        params = [p for p in st.parameters() if p.requires_grad]
        for param in params:  # gradients w.r.t. the inputs only: cheaper, and no weight .grad side effects
            param.requires_grad_(False)
        try:
            with torch.enable_grad():
                embs = F.normalize(st(features)["sentence_embedding"].float(), dim=-1)
        finally:
            handle.remove()
            for param in params:
                param.requires_grad_(True)
        return embs, captured[0], offsets

    def _doc_words(self, query_emb: np.ndarray, cands: np.ndarray, positions: np.ndarray, texts: Sequence[str],
                   ) -> list[tuple[Word, ...]]:
        """Gradient x input of each selected document's adapted score w.r.t. its own input word embeddings.

        The full adapter is differentiated (including the document's effect on the refined query when it is a
        feedback document); one batched encoder forward/backward serves all selected documents."""
        if len(positions) == 0:
            return []
        embs, leaf, offsets = self._embed_with_grad(texts, self.encoder.config.passage_prefix)
        with torch.enable_grad():
            free = embs.detach().requires_grad_(True)
            base = torch.from_numpy(np.ascontiguousarray(cands, np.float32)).to(self.device)
            pos = torch.as_tensor(positions, device=self.device)
            docs = base.index_copy(0, pos, free)
            query = torch.from_numpy(np.asarray(query_emb, np.float32)[None]).to(self.device)
            scores = self.model(query, docs[None]).scores[0, pos]
            eye = torch.eye(len(positions), device=self.device)
            (jac,) = torch.autograd.grad(scores, free, grad_outputs=eye, is_grads_batched=True)  # [S(out), S, E]
            per_doc = jac[torch.arange(len(positions)), torch.arange(len(positions))]  # d s_i / d e_i
            (grad,) = torch.autograd.grad(embs, leaf, grad_outputs=per_doc)
        token_weights = (grad * leaf.detach()).sum(-1).cpu().numpy()
        return [_aggregate(text, off, w) for text, off, w in zip(texts, offsets, token_weights)]

    # ---- the explanation

    def explain(self, query: str, doc_ids: Sequence[str], doc_texts: Sequence[str], doc_embs: np.ndarray | None = None,
                query_id: str | None = None, top: int = 10, concepts: int = 10, doc_words: int = 1,
                k: int | None = None) -> Explanation:
        """Explain the re-ranking of one query's candidates.

        `doc_embs` `(N, E)` are the documents' encoder embeddings (encoded from `doc_texts` if None). With `k`,
        the candidates are the frozen retriever's exact top-`k` of the N documents (pass a whole corpus);
        otherwise all N are the candidates. `top`: candidates shown (the adapted and the base top-`top`);
        `concepts`: concepts per list; `doc_words`: documents (the most promoted, then the adapted top) that get
        word attributions (each costs one encoder forward/backward, ~0.15 s on one CPU core).
        """
        if not query.strip():
            raise ExplainError("The query is empty; give the text to explain.")
        if len(doc_ids) == 0 or len(doc_ids) != len(doc_texts):
            raise ExplainError(f"Need one text per document and at least one document; got {len(doc_ids)} ids and {len(doc_texts)} texts.")
        if top < 1 or concepts < 0 or doc_words < 0 or (k is not None and k < 1):
            raise ExplainError(f"top and k must be >= 1, concepts and doc_words >= 0; got {top}, {k}, {concepts}, {doc_words}.")
        if doc_embs is None:
            doc_embs = self.encoder.encode(list(doc_texts), self.encoder.config.passage_prefix)
        if doc_embs.shape != (len(doc_ids), self.model.config.embedding_dim):
            raise ExplainError(
                f"doc_embs has shape {doc_embs.shape}, expected ({len(doc_ids)}, {self.model.config.embedding_dim}): one "
                "row per document, from the encoder the checkpoint was trained with."
            )
        spans = words(query)
        variants = [query] + [delete_words(query, spans, [j]) for j in range(len(spans))]
        q_embs = self.encoder.encode(variants, self.encoder.config.query_prefix)  # one call: query + occlusions
        if k is not None and k < len(doc_ids):
            all_scores = np.asarray(doc_embs) @ q_embs[0]
            rows = np.argpartition(-all_scores, k - 1)[:k]
            rows = rows[np.lexsort((rows, -all_scores[rows]))]  # by score, ties by corpus order
        else:
            rows = np.arange(len(doc_ids))
        cands = np.asarray(doc_embs[rows], np.float32)
        scored = self._forward(q_embs, cands)
        scores = scored.scores.float().cpu().numpy()
        full = scores[0]
        occlusion = full[None, :] - scores[1:]  # [W, K]: drop of each doc's score without word j
        q0, q1 = scored.query[0].cpu().numpy(), scored.refined_query[0].cpu().numpy()
        d0, d1 = scored.docs[0].cpu().numpy(), scored.modulated_docs[0].cpu().numpy()
        base = cands @ q_embs[0]
        gate = float(scored.gate[0]) if hasattr(scored, "gate") else 1.0  # novelty gate: score = g*adapted + (1-g)*base
        a, b, c, s = d0 @ q0, d1 @ q0, d0 @ q1, d1 @ q1  # <q~,d~>, <q~,d^>, <q^,d~>, <q^,d^>
        projection = gate * (a - base)
        modulation = gate * 0.5 * ((b - a) + (s - c))
        refinement = gate * 0.5 * ((c - a) + (s - b))
        base_rank, adapted_rank = _ranks(base), _ranks(full)
        shift = base_rank - adapted_rank
        shown = np.flatnonzero((adapted_rank <= top) | (base_rank <= top))
        shown = shown[np.argsort(adapted_rank[shown], kind="stable")]
        best = _most_promoted(base_rank, adapted_rank, top)
        # concepts, like with like (unit minus unit): the query's move; each document's move relative to the list
        doc_moves = d1 - d0
        mods = np.concatenate([(q1 - q0)[None], doc_moves[shown] - doc_moves.mean(0)])
        tops = self.top_concepts(self.concept_weights(mods), concepts)
        # word attributions for the documents a user looks at first
        chosen = ([best] if best is not None else []) + [int(i) for i in shown if i != best]
        chosen_rows = np.array(chosen[:doc_words], dtype=np.int64)
        texts = [doc_texts[rows[i]] for i in chosen_rows]
        attributed = dict(zip(chosen_rows.tolist(), self._doc_words(q_embs[0], cands, chosen_rows, texts)))
        query_words = tuple(Word(query[s:e], s, e, float(occlusion[j, best]) if best is not None else 0.0)
                            for j, (s, e) in enumerate(spans))
        out = []
        for slot, i in enumerate(shown.tolist()):
            out.append(CandidateExplanation(
                doc_id=str(doc_ids[rows[i]]), text=str(doc_texts[rows[i]]), base_score=float(base[i]),
                adapted_score=float(full[i]), base_rank=int(base_rank[i]), adapted_rank=int(adapted_rank[i]),
                rank_shift=int(shift[i]), projection=float(projection[i]), modulation=float(modulation[i]),
                refinement=float(refinement[i]), toward=tops[slot + 1][0], away=tops[slot + 1][1],
                query_weights=tuple(float(x) for x in occlusion[:, i]), doc_words=attributed.get(i),
            ))
        return Explanation(
            query=query, query_id=query_id, num_candidates=len(rows), vocabulary=self.vocabulary.kind, gate=gate,
            query_words=query_words, pulled_toward=tops[0][0], pushed_from=tops[0][1],
            promoted=str(doc_ids[rows[best]]) if best is not None else None, candidates=tuple(out),
        )

    # ---- faithfulness

    def _word_directions(self, texts: Sequence[str]) -> np.ndarray:
        """Single words in the vocabulary's space (encoded alone, or mean input embedding), centred like it."""
        vocab = self.vocabulary
        if vocab.kind == "encoder":
            vectors = self.encoder.encode(list(texts), self.encoder.config.passage_prefix)
        else:
            tokenizer = self.encoder.model.tokenizer
            weight = _input_embeddings(self.encoder).weight.detach().float().cpu().numpy()
            ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
            vectors = np.stack([weight[i].mean(0) if i else np.zeros(weight.shape[1], np.float32) for i in ids])
        return vocab.directions(vectors)

    def _concept_word_scores(self, word_dirs: np.ndarray, mods: np.ndarray, concepts: int, source: str) -> np.ndarray:
        """How strongly each query word relates to the top concepts: its best cosine with any of the top-`concepts`
        positive concepts of the document's relative move (`source="document"`), the query's move ("query") or both."""
        weights = self.concept_weights(mods)
        rows = {"query": [0], "document": [1], "both": [0, 1]}[source]
        chosen = [np.argsort(-weights[r])[:concepts] for r in rows]
        chosen = np.concatenate([c[weights[r, c] > 0] for r, c in zip(rows, chosen)])
        if len(chosen) == 0:
            return np.zeros(len(word_dirs), np.float32)
        return (word_dirs @ self.vocabulary.vectors[chosen].T).max(1)

    def deletion_test(self, query_ids: Sequence[str], queries: Sequence[str], doc_embs: np.ndarray, candidates: np.ndarray,
                      doc_ids: Sequence[str], n: int = 3, draws: int = 10, top: int = 10, concepts: int = 10,
                      seed: int = 0, chunk: int = 16, progress: bool = False, concept_source: str = "document",
                      ) -> DeletionReport:
        """Faithfulness over a query set: for each query and its most-promoted document (largest rank gain among
        the adapted top-`top`), the adapted-score drop from deleting the top-n query words by (a) occlusion
        attribution and (b) similarity to the top concepts (the query's pulled-toward concepts and the document's
        toward concepts), against the mean drop over `draws` deletions of n random words.

        `candidates` `(Q, K)` are rows of `doc_embs` (-1 = padding); `doc_ids` names the rows. Encoder calls are
        batched over `chunk` queries; random draws are seeded per query, so results do not depend on `chunk`.
        """
        if n < 1 or draws < 1 or chunk < 1:
            raise ExplainError(f"n, draws and chunk must be >= 1; got {n}, {draws}, {chunk}.")
        if concept_source not in CONCEPT_SOURCES:
            raise ExplainError(f"concept_source must be one of {CONCEPT_SOURCES}, got {concept_source!r}.")
        if len(query_ids) != len(queries) or len(queries) != len(candidates):
            raise ExplainError(f"Got {len(query_ids)} query ids, {len(queries)} queries and {len(candidates)} candidate rows.")
        from tqdm.auto import tqdm

        doc_embs = np.asarray(doc_embs)
        pairs: list[DeletionPair] = []
        skipped: dict[str, int] = {}
        qp = self.encoder.config.query_prefix
        bar = tqdm(total=len(queries), desc="deletion test", unit="q", disable=not progress, dynamic_ncols=True)
        for start in range(0, len(queries), chunk):
            idx = range(start, min(start + chunk, len(queries)))
            spans = {i: words(queries[i]) for i in idx}
            usable = [i for i in idx if len(spans[i]) > n]
            for i in idx:
                if len(spans[i]) <= n:
                    skipped["fewer words than n + 1"] = skipped.get("fewer words than n + 1", 0) + 1
            picks = {i: _random_picks(seed, str(query_ids[i]), len(spans[i]), n, draws) for i in usable}
            texts, word_texts, layout = [], [], {}
            for i in usable:  # stage 1: full query, one occlusion per word, the random deletions; words alone
                layout[i] = (len(texts), len(word_texts))
                q, sp = queries[i], spans[i]
                texts += [q] + [delete_words(q, sp, [j]) for j in range(len(sp))] + [delete_words(q, sp, p) for p in picks[i]]
                word_texts += [q[s:e] for s, e in sp]
            embs = self.encoder.encode(texts, qp) if texts else np.zeros((0, doc_embs.shape[1]), np.float32)
            word_dirs = self._word_directions(word_texts) if word_texts else None
            stage2, targets = [], {}
            for i in usable:
                row, wrow = layout[i]
                nw = len(spans[i])
                rows = candidates[i][candidates[i] >= 0]
                cands = doc_embs[rows]
                scored = self._forward(embs[row : row + 1 + nw + draws], cands)
                scores = scored.scores.float().cpu().numpy()
                t = _most_promoted(_ranks(cands @ embs[row]), _ranks(scores[0]), top)
                if t is None:
                    skipped["no promoted document"] = skipped.get("no promoted document", 0) + 1
                    continue
                occl = scores[0, t] - scores[1 : 1 + nw, t]
                token_pick = np.argsort(-occl, kind="stable")[:n]
                moves = (scored.modulated_docs[0] - scored.docs[0]).cpu().numpy()
                mods = np.stack([(scored.refined_query[0] - scored.query[0]).cpu().numpy(), moves[t] - moves.mean(0)])
                concept_score = self._concept_word_scores(word_dirs[wrow : wrow + nw], mods, concepts, concept_source)
                concept_pick = np.argsort(-concept_score, kind="stable")[:n]
                random_drops = scores[0, t] - scores[1 + nw :, t]
                targets[i] = (t, rows, float(scores[0, t]), token_pick, concept_pick, random_drops)
                q, sp = queries[i], spans[i]
                stage2 += [delete_words(q, sp, token_pick), delete_words(q, sp, concept_pick)]
            embs2 = self.encoder.encode(stage2, qp) if stage2 else None
            for slot, (i, (t, rows, score, token_pick, concept_pick, random_drops)) in enumerate(targets.items()):
                after = self._forward(embs2[2 * slot : 2 * slot + 2], doc_embs[rows]).scores[:, t].float().cpu().numpy()
                q, sp = queries[i], spans[i]
                pairs.append(DeletionPair(
                    query_id=str(query_ids[i]), doc_id=str(doc_ids[rows[t]]), score=score,
                    token_deleted=tuple(q[sp[j][0] : sp[j][1]] for j in token_pick), token_drop=float(score - after[0]),
                    concept_deleted=tuple(q[sp[j][0] : sp[j][1]] for j in concept_pick), concept_drop=float(score - after[1]),
                    random_drops=tuple(float(x) for x in random_drops),
                ))
            bar.update(len(idx))
        bar.close()
        return DeletionReport(n, draws, seed, self.vocabulary.kind, concept_source, tuple(pairs), skipped)


def _random_picks(seed: int, query_id: str, count: int, n: int, draws: int) -> np.ndarray:
    """`draws` random n-subsets of `count` words, seeded by (seed, query id): independent of batching and order."""
    rng = np.random.default_rng([seed, zlib.crc32(query_id.encode())])
    return rng.random((draws, count)).argsort(1)[:, :n]


def _aggregate(text: str, offsets: np.ndarray, weights: np.ndarray) -> tuple[Word, ...]:
    """Sum token weights into the words of `text` that contain each token's first character."""
    spans = words(text)
    if not spans:
        return ()
    starts = np.array([s for s, _ in spans])
    ends = np.array([e for _, e in spans])
    tok_start = offsets[:, 0]
    live = tok_start >= 0
    slot = np.searchsorted(starts, tok_start, side="right") - 1
    live &= slot >= 0
    live[live] &= tok_start[live] < ends[slot[live]]
    total = np.zeros(len(spans), dtype=np.float64)
    np.add.at(total, slot[live], weights[live])
    return tuple(Word(text[s:e], int(s), int(e), float(w)) for (s, e), w in zip(spans, total))


# --------------------------------------------------------------------------- dataset and file helpers


def explain_dataset_query(explainer: Explainer, prepared: Any, split: str, query_id: str, top: int = 10,
                          concepts: int = 10, doc_words: int = 1) -> Explanation:
    """Explain one query of a dataset split over the frozen retriever's exact top-K of the corpus (`Prepared`)."""
    queries = prepared.dataset.split(split)
    if query_id not in set(queries.ids):
        raise ExplainError(
            f"Query {query_id!r} is not in split {split!r} of {prepared.dataset.name!r} (it has {len(queries)} queries with "
            f"judgements, e.g. {', '.join(queries.ids[:3])}). Pick one of those, or another --split."
        )
    text = queries.texts[queries.ids.index(query_id)]
    corpus = prepared.dataset.corpus
    return explainer.explain(text, corpus.ids, _Passages(corpus), prepared.doc_embs, query_id=query_id, top=top,
                             concepts=concepts, doc_words=doc_words, k=prepared.k)


class _Passages(Sequence[str]):
    """`corpus.passages()` built lazily: an explanation reads a few of them, not all N."""

    def __init__(self, corpus: Any) -> None:
        self.corpus = corpus

    def __len__(self) -> int:
        return len(self.corpus)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return f"{self.corpus.titles[i]} {self.corpus.texts[i]}".strip()


def split_deletion_test(explainer: Explainer, prepared: Any, split: str, n: int = 3, draws: int = 10, top: int = 10,
                        seed: int = 0, limit: int | None = None, progress: bool = True) -> DeletionReport:
    """The deletion test over a dataset split (optionally its first `limit` queries)."""
    queries = prepared.dataset.split(split)
    if limit is not None:
        queries = queries.subset(queries.ids[:limit])
    data = prepared.ranking(queries)
    return explainer.deletion_test(queries.ids, queries.texts, prepared.doc_embs, data.candidates,
                                   prepared.dataset.corpus.ids, n=n, draws=draws, top=top, seed=seed, progress=progress)


def read_documents(path: str | Path) -> tuple[list[str], list[str]]:
    """(ids, passages) from a JSONL file of {"_id" or "id", "title"?, "text"} objects, one per line."""
    path = Path(path)
    if not path.is_file():
        raise ExplainError(f"Documents file {path} does not exist; give a JSONL file with one {{\"_id\", \"text\"}} object per line.")
    ids, texts = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ExplainError(f"{path}:{number}: not valid JSON ({err}).") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ExplainError(f"{path}:{number}: expected an object with a string \"text\" field (and \"_id\").")
        ids.append(str(record.get("_id", record.get("id", number))))
        texts.append(f"{record.get('title') or ''} {record['text']}".strip())
    if not ids:
        raise ExplainError(f"{path} holds no documents.")
    if len(set(ids)) != len(ids):
        raise ExplainError(f"{path}: document ids are not unique.")
    return ids, texts
