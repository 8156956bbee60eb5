"""Attribution: why one query's candidates were re-ranked, by the exact score split, concepts and words.

The score change of each candidate is split exactly into the learned projection, document modulation by A_q
and query refinement by A_d (a two-player Shapley split). Concepts come from back-projection: modulation
vectors (differences of unit vectors of the working space) are mapped to the encoder's space with the
pseudo-inverse of the projection and matched against a :class:`~.vocabulary.ConceptVocabulary`; a document's
concepts use its move relative to the other candidates, since a shift shared by all cannot change a rank.
Query words are attributed by occlusion (exact, one short batch); document words by gradient x input through
the frozen encoder (one batched forward/backward instead of hundreds of occlusion encodes).
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoint import Checkpoint, load_checkpoint
from ..encode import Encoder
from ..files import tensor_view
from ..model import Scored
from ..scoring import frozen_cosine, ranks
from .records import CandidateExplanation, Concept, DeletionReport, ExplainError, Explanation, Word
from .vocabulary import VOCABULARIES, ConceptVocabulary, encoder_vocabulary, input_embeddings, input_vocabulary

# Modulation vectors are differences of unit vectors: below this length they are float32 rounding (~1e-7 per
# component after a renormalisation), not a move. A concept weighing less than this share of its back-projected
# vector's length is rounding noise too. Both are relative to the vectors involved, not to any CPU's kernels.
MODULATION_NOISE = 1e-5
CONCEPT_NOISE = 1e-5
_WORD = re.compile(r"\w+(?:['\u2019\-]\w+)*")


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


def most_promoted(base_rank: np.ndarray, adapted_rank: np.ndarray, top: int) -> int | None:
    """The candidate in the adapted top-`top` with the largest rank gain (ties: better adapted rank); None if
    nothing there moved up."""
    visible = np.flatnonzero(adapted_rank <= top)
    shift = base_rank[visible] - adapted_rank[visible]
    best = visible[np.lexsort((adapted_rank[visible], -shift))[0]]
    return int(best) if base_rank[best] > adapted_rank[best] else None


def pseudo_inverse(weight: torch.Tensor | np.ndarray) -> np.ndarray:
    """Moore-Penrose pseudo-inverse `(E, D)` of a projection weight `(D, E)`, computed in float64."""
    matrix = weight.detach().cpu().double() if isinstance(weight, torch.Tensor) else torch.as_tensor(np.asarray(weight, np.float64))
    return torch.linalg.pinv(matrix).numpy()


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

    def forward(self, query_embs: np.ndarray, cands: np.ndarray) -> Scored:
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

        handle = input_embeddings(self.encoder).register_forward_hook(hook)
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
        scored = self.forward(q_embs, cands)
        scores = scored.scores.float().cpu().numpy()
        full = scores[0]
        occlusion = full[None, :] - scores[1:]  # [W, K]: drop of each doc's score without word j
        q0, q1 = scored.query[0].cpu().numpy(), scored.refined_query[0].cpu().numpy()
        d0, d1 = scored.docs[0].cpu().numpy(), scored.modulated_docs[0].cpu().numpy()
        base = frozen_cosine(tensor_view(q_embs[:1]), tensor_view(cands)[None])[0].numpy()
        gate = float(scored.gate[0]) if hasattr(scored, "gate") else 1.0  # novelty gate: score = g*adapted + (1-g)*base
        a, b, c, s = d0 @ q0, d1 @ q0, d0 @ q1, d1 @ q1  # <q~,d~>, <q~,d^>, <q^,d~>, <q^,d^>
        projection = gate * (a - base)
        modulation = gate * 0.5 * ((b - a) + (s - c))
        refinement = gate * 0.5 * ((c - a) + (s - b))
        base_rank, adapted_rank = ranks(base), ranks(full)
        shift = base_rank - adapted_rank
        shown = np.flatnonzero((adapted_rank <= top) | (base_rank <= top))
        shown = shown[np.argsort(adapted_rank[shown], kind="stable")]
        best = most_promoted(base_rank, adapted_rank, top)
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

    def deletion_test(self, query_ids: Sequence[str], queries: Sequence[str], doc_embs: np.ndarray, candidates: np.ndarray,
                      doc_ids: Sequence[str], n: int = 3, draws: int = 10, top: int = 10, concepts: int = 10,
                      seed: int = 0, chunk: int = 16, progress: bool = False, concept_source: str = "document",
                      ) -> DeletionReport:
        """Faithfulness of this explainer's attributions over a query set: see `faithfulness.deletion_test`."""
        from .faithfulness import deletion_test  # lazy: faithfulness builds on this module

        return deletion_test(self, query_ids, queries, doc_embs, candidates, doc_ids, n=n, draws=draws, top=top,
                             concepts=concepts, seed=seed, chunk=chunk, progress=progress, concept_source=concept_source)


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
