"""Faithfulness by deletion: removing the query words an explanation singles out must lower the adapted score of
the most-promoted document more than removing as many random words.

Words are singled out two ways: by occlusion attribution, and by similarity to the top concepts of the
document's relative move (or the query's move, or both: `CONCEPT_SOURCES`).
"""

from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np

from ..files import tensor_view
from ..scoring import frozen_cosine, ranks
from .attribution import Explainer, delete_words, most_promoted, words
from .records import DeletionPair, DeletionReport, ExplainError
from .vocabulary import input_embeddings

CONCEPT_SOURCES = ("document", "query", "both")


def deletion_test(explainer: Explainer, query_ids: Sequence[str], queries: Sequence[str], doc_embs: np.ndarray,
                  candidates: np.ndarray, doc_ids: Sequence[str], n: int = 3, draws: int = 10, top: int = 10,
                  concepts: int = 10, seed: int = 0, chunk: int = 16, progress: bool = False,
                  concept_source: str = "document") -> DeletionReport:
    """Faithfulness of `explainer` over a query set: for each query and its most-promoted document (largest rank
    gain among the adapted top-`top`), the adapted-score drop from deleting the top-n query words by (a) occlusion
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
    qp = explainer.encoder.config.query_prefix
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
        embs = explainer.encoder.encode(texts, qp) if texts else np.zeros((0, doc_embs.shape[1]), np.float32)
        word_dirs = _word_directions(explainer, word_texts) if word_texts else None
        stage2, targets = [], {}
        for i in usable:
            row, wrow = layout[i]
            nw = len(spans[i])
            rows = candidates[i][candidates[i] >= 0]
            cands = doc_embs[rows]
            scored = explainer.forward(embs[row : row + 1 + nw + draws], cands)
            scores = scored.scores.float().cpu().numpy()
            base = frozen_cosine(tensor_view(embs[row : row + 1]), tensor_view(cands)[None])[0].numpy()
            t = most_promoted(ranks(base), ranks(scores[0]), top)
            if t is None:
                skipped["no promoted document"] = skipped.get("no promoted document", 0) + 1
                continue
            occl = scores[0, t] - scores[1 : 1 + nw, t]
            token_pick = np.argsort(-occl, kind="stable")[:n]
            moves = (scored.modulated_docs[0] - scored.docs[0]).cpu().numpy()
            mods = np.stack([(scored.refined_query[0] - scored.query[0]).cpu().numpy(), moves[t] - moves.mean(0)])
            concept_score = _concept_word_scores(explainer, word_dirs[wrow : wrow + nw], mods, concepts, concept_source)
            concept_pick = np.argsort(-concept_score, kind="stable")[:n]
            random_drops = scores[0, t] - scores[1 + nw :, t]
            targets[i] = (t, rows, float(scores[0, t]), token_pick, concept_pick, random_drops)
            q, sp = queries[i], spans[i]
            stage2 += [delete_words(q, sp, token_pick), delete_words(q, sp, concept_pick)]
        embs2 = explainer.encoder.encode(stage2, qp) if stage2 else None
        for slot, (i, (t, rows, score, token_pick, concept_pick, random_drops)) in enumerate(targets.items()):
            after = explainer.forward(embs2[2 * slot : 2 * slot + 2], doc_embs[rows]).scores[:, t].float().cpu().numpy()
            q, sp = queries[i], spans[i]
            pairs.append(DeletionPair(
                query_id=str(query_ids[i]), doc_id=str(doc_ids[rows[t]]), score=score,
                token_deleted=tuple(q[sp[j][0] : sp[j][1]] for j in token_pick), token_drop=float(score - after[0]),
                concept_deleted=tuple(q[sp[j][0] : sp[j][1]] for j in concept_pick), concept_drop=float(score - after[1]),
                random_drops=tuple(float(x) for x in random_drops),
            ))
        bar.update(len(idx))
    bar.close()
    return DeletionReport(n, draws, seed, explainer.vocabulary.kind, concept_source, tuple(pairs), skipped)


def _random_picks(seed: int, query_id: str, count: int, n: int, draws: int) -> np.ndarray:
    """`draws` random n-subsets of `count` words, seeded by (seed, query id): independent of batching and order."""
    rng = np.random.default_rng([seed, zlib.crc32(query_id.encode())])
    return rng.random((draws, count)).argsort(1)[:, :n]


def _word_directions(explainer: Explainer, texts: Sequence[str]) -> np.ndarray:
    """Single words in the vocabulary's space (encoded alone, or mean input embedding), centred like it."""
    vocab = explainer.vocabulary
    if vocab.kind == "encoder":
        vectors = explainer.encoder.encode(list(texts), explainer.encoder.config.passage_prefix)
    else:
        tokenizer = explainer.encoder.model.tokenizer
        weight = input_embeddings(explainer.encoder).weight.detach().float().cpu().numpy()
        ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        vectors = np.stack([weight[i].mean(0) if i else np.zeros(weight.shape[1], np.float32) for i in ids])
    return vocab.directions(vectors)


def _concept_word_scores(explainer: Explainer, word_dirs: np.ndarray, mods: np.ndarray, concepts: int, source: str) -> np.ndarray:
    """How strongly each query word relates to the top concepts: its best cosine with any of the top-`concepts`
    positive concepts of the document's relative move (`source="document"`), the query's move ("query") or both."""
    weights = explainer.concept_weights(mods)
    rows = {"query": [0], "document": [1], "both": [0, 1]}[source]
    chosen = [np.argsort(-weights[r])[:concepts] for r in rows]
    chosen = np.concatenate([c[weights[r, c] > 0] for r, c in zip(rows, chosen)])
    if len(chosen) == 0:
        return np.zeros(len(word_dirs), np.float32)
    return (word_dirs @ explainer.vocabulary.vectors[chosen].T).max(1)
