"""Dataset-level workflow: embeddings -> base candidates -> training -> side-by-side evaluation report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .checkpoint import Checkpoint
from .data import Dataset, QuerySet, carve_validation
from .encode import Encoder, encode_corpus, encode_queries
from .evaluate import hits_to_run, paired_test, per_query
from .index import search
from .config import IMRNNConfig, TrainConfig
from .model import IMRNN
from .train import RankingSet, TrainResult, ranking_set, rerank, score_candidates, train

REPORT_MEASURES = ("nDCG@10", "R@10", "RR@10", "R@100")


@dataclass
class Prepared:
    """A dataset with its cached corpus embeddings, ready to produce candidate sets for any query set."""

    dataset: Dataset
    encoder: Encoder
    doc_embs: np.ndarray
    cache_dir: Path | None = None
    k: int = 100
    backend: str = "exact"

    @classmethod
    def build(cls, dataset: Dataset, encoder: Encoder, cache_dir: str | Path | None = None, k: int = 100,
              backend: str = "exact", progress: bool = True) -> "Prepared":
        docs = encode_corpus(encoder, dataset.corpus, cache_dir, progress=progress)
        return cls(dataset, encoder, docs, Path(cache_dir) if cache_dir else None, k, backend)

    def ranking(self, queries: QuerySet, max_added_positives: int = 0) -> RankingSet:
        """Query embeddings (cached) and the frozen retriever's top-K for every query of the set."""
        embs = np.asarray(encode_queries(self.encoder, queries, self.cache_dir))
        hits = search(embs, self.doc_embs, self.k, self.backend)
        return ranking_set(queries.ids, embs, hits.indices, queries.qrels, self.dataset.corpus.ids, max_added_positives)

    def base_scores(self, data: RankingSet) -> np.ndarray:
        """The frozen retriever's cosine for each candidate (-inf at padding)."""
        cands = np.asarray(self.doc_embs)[np.maximum(data.candidates, 0)]
        scores = np.einsum("qd,qkd->qk", np.asarray(data.query_embs, np.float32), cands)
        return np.where(data.candidates >= 0, scores, -np.inf).astype(np.float32)


def validation_split(dataset: Dataset, train_split: str, validation: str, fraction: float, seed: int) -> tuple[QuerySet, QuerySet]:
    """(train, validation): an official split named by `validation`, or carved from train ('carve': random
    queries; 'disjoint': query groups sharing no relevant document; 'auto': dev if present, else carve)."""
    train_queries = dataset.split(train_split)
    if validation == "auto":
        validation = "dev" if "dev" in dataset.splits and train_split != "dev" else "carve"
    if validation in ("carve", "disjoint"):
        return carve_validation(train_queries, fraction, seed, disjoint=validation == "disjoint")
    return train_queries, dataset.split(validation)


def fit(prepared: Prepared, train_queries: QuerySet, validation_queries: QuerySet, model_config: IMRNNConfig,
        train_config: TrainConfig, device: str = "cpu", progress: bool = True, state_dir: Path | None = None,
        resume: bool = False) -> TrainResult:
    """Train an adapter on a query set, early-stopping on the validation set (resumable: see `train`)."""
    train_set = prepared.ranking(train_queries, train_config.max_added_positives)
    if train_config.bm25_negatives:
        from .negatives import bm25_negatives, relevance_matrix

        relevance = relevance_matrix(train_queries.ids, train_queries.qrels, prepared.dataset.corpus.ids)
        extra = bm25_negatives(prepared.dataset.corpus.passages(), train_queries.texts, relevance, train_config.bm25_negatives)
        train_set = ranking_set(train_queries.ids, train_set.query_embs, train_set.candidates, train_queries.qrels,
                                prepared.dataset.corpus.ids, 0, extra)
    validation_set = prepared.ranking(validation_queries)
    return train(model_config, train_config, prepared.doc_embs, prepared.dataset.corpus.ids, train_set, validation_set,
                 device=device, progress=progress, state_dir=state_dir, resume=resume)


def unseen_relevant_queries(test: QuerySet, train_qrels: dict[str, dict[str, int]]) -> list[str]:
    """Test queries none of whose relevant documents is relevant to any training query."""
    seen = {d for docs in train_qrels.values() for d, r in docs.items() if r > 0}
    return [q for q in test.ids if not any(r > 0 and d in seen for d, r in test.qrels[q].items())]


def evaluate_adapter(model: IMRNN, prepared: Prepared, test: QuerySet, train_qrels: dict[str, dict[str, int]] | None = None,
                     ) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """Base vs adapted on the same candidates: metrics, paired tests, wins/losses and the unseen subset.

    Returns (report, adapted run)."""
    data = prepared.ranking(test)
    doc_ids = prepared.dataset.corpus.ids
    base_run = hits_to_run(test.ids, doc_ids, data.candidates, prepared.base_scores(data))
    order, scores = rerank(data.candidates, score_candidates(model, data.query_embs, prepared.doc_embs, data.candidates))
    adapted_run = hits_to_run(test.ids, doc_ids, order, scores)
    report = compare_runs(base_run, adapted_run, test.qrels)
    report["k"] = prepared.k
    unseen: dict[str, Any] = {"queries": 0, "base": None, "adapted": None}
    if train_qrels is not None:
        ids = unseen_relevant_queries(test, train_qrels)
        unseen["queries"] = len(ids)
        if ids:
            sub = {q: test.qrels[q] for q in ids}
            unseen.update({k: v for k, v in compare_runs(base_run, adapted_run, sub).items() if k in ("base", "adapted", "p_value")})
    report["unseen_relevant"] = unseen
    return report, adapted_run


def compare_runs(base_run: dict, adapted_run: dict, qrels: dict, measures: tuple[str, ...] = REPORT_MEASURES) -> dict[str, Any]:
    """Side-by-side means, paired t-test p-values, randomisation p on nDCG@10, and improved/worsened counts."""
    base, adapted = per_query(base_run, qrels, measures), per_query(adapted_run, qrels, measures)
    tests = {m: paired_test(base[m], adapted[m]) for m in measures if m != "R@100"}
    delta = adapted["nDCG@10"] - base["nDCG@10"]
    return {
        "queries": len(delta),
        "base": {m: float(v.mean()) for m, v in base.items()},
        "adapted": {m: float(v.mean()) for m, v in adapted.items()},
        "p_value": {m: t["t_test"] for m, t in tests.items()},
        "randomization_p": {m: t["randomization"] for m, t in tests.items()},
        "improved": int((delta > 1e-9).sum()),
        "worsened": int((delta < -1e-9).sum()),
    }


def checkpoint_from(result: TrainResult, prepared: Prepared, train_config: TrainConfig, train_queries: QuerySet,
                    validation_queries: QuerySet, test_report: dict | None) -> Checkpoint:
    """Bundle a training result with the metadata a checkpoint records."""
    metadata = {
        "library_version": __version__,
        "encoder_identity": prepared.encoder.identity,
        "data": {
            "dataset": prepared.dataset.name,
            "corpus_fingerprint": prepared.dataset.corpus.fingerprint(),
            "train_queries": len(train_queries),
            "validation_queries": len(validation_queries),
            "candidates": prepared.k,
        },
        "seed": train_config.seed,
        "novelty_gate": result.gate,
        "training": {"best_epoch": result.best_epoch, "seconds": round(result.seconds, 2), "history": result.history,
                     "parameters": result.model.num_parameters()},
        "metrics": {"validation": {"nDCG@10": result.best_validation}, "test": test_report},
    }
    return Checkpoint(result.model, prepared.encoder.config, train_config, metadata)
