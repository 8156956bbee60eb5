"""Runs -> metrics through pytrec_eval (ir-measures names), TREC run I/O and paired significance tests."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pytrec_eval
from scipy import stats

from .data import Qrels, clip, numbered_lines, read_qrels
from .errors import DataError
from .files import atomic_write_text

Run = dict[str, dict[str, float]]
DEFAULT_MEASURES = ("nDCG@10", "R@10", "R@100", "RR@10", "AP", "P@10")
_MEASURE = re.compile(r"^(nDCG|R|P|RR|AP)(?:@(\d+))?$")
_TREC_NAME = {"nDCG": "ndcg_cut", "R": "recall", "P": "P", "AP": "map", "RR": "recip_rank"}

__all__ = ["DEFAULT_MEASURES", "Run", "evaluate_run", "per_query", "paired_test", "read_run", "write_run", "read_qrels"]


def _parse_measure(name: str) -> tuple[str, int | None]:
    match = _MEASURE.match(name)
    if not match:
        raise DataError(f"Unknown measure {name!r}. Use ir-measures names such as nDCG@10, R@100, RR@10, P@10, AP.")
    family, cutoff = match.group(1), match.group(2)
    if family in ("R", "P") and cutoff is None:
        raise DataError(f"Measure {name!r} needs a cutoff, e.g. {family}@10.")
    return family, int(cutoff) if cutoff else None


def _trec_order(docs: Mapping[str, float]) -> list[str]:
    """trec_eval's ranking of a query's documents: score descending, then document id descending."""
    return sorted(docs, key=lambda d: (docs[d], d), reverse=True)


def per_query(run: Run, qrels: Qrels, measures: Sequence[str] = DEFAULT_MEASURES) -> dict[str, np.ndarray]:
    """Per-query values, one array per measure, aligned with `evaluated_queries(qrels)`.

    Every query with a relevant judgement is scored; one missing from the run scores 0 (trec_eval -c).
    """
    qids = evaluated_queries(qrels)
    judged = {q: qrels[q] for q in qids}
    out: dict[str, np.ndarray] = {}
    for name in measures:
        family, cutoff = _parse_measure(name)
        trec = _TREC_NAME[family]
        sub_run = run
        if family == "RR" and cutoff is not None:  # trec_eval has no RR cutoff: truncate the ranking first
            sub_run = {q: {d: docs[d] for d in _trec_order(docs)[:cutoff]} for q, docs in run.items()}
            key, param = "recip_rank", "recip_rank"
        elif family == "nDCG" and cutoff is None:
            key, param = "ndcg", "ndcg"
        elif cutoff is None:
            key, param = trec, trec
        else:
            key, param = f"{trec}_{cutoff}", f"{trec}.{cutoff}"
        scores = pytrec_eval.RelevanceEvaluator(judged, {param}).evaluate(
            {q: {d: float(s) for d, s in sub_run[q].items()} for q in qids if sub_run.get(q)}
        )
        out[name] = np.array([scores[q][key] if q in scores else 0.0 for q in qids], dtype=np.float64)
    return out


def evaluated_queries(qrels: Qrels) -> list[str]:
    """Queries with at least one relevant (grade > 0) document, sorted: the ones every metric averages over."""
    return sorted(q for q, docs in qrels.items() if any(r > 0 for r in docs.values()))


def evaluate_run(run: Run, qrels: Qrels, measures: Sequence[str] = DEFAULT_MEASURES) -> dict[str, float]:
    """Mean of each measure over all evaluated queries."""
    values = per_query(run, qrels, measures)
    return {m: float(v.mean()) if len(v) else float("nan") for m, v in values.items()}


def clearly_better(candidate: np.ndarray, reference: np.ndarray) -> bool:
    """Whether per-query values `candidate` beat `reference` on average by more than one paired standard error
    (never with fewer than two queries): the test every "abstain when validation cannot tell" choice uses."""
    diff = np.asarray(candidate, np.float64) - np.asarray(reference, np.float64)
    return len(diff) > 1 and float(diff.mean()) > float(diff.std(ddof=1) / np.sqrt(len(diff)))


def paired_test(a: np.ndarray, b: np.ndarray, resamples: int = 10_000, seed: int = 0) -> dict[str, float]:
    """Paired two-sided tests of mean(b - a): Student's t-test and a sign-flip randomisation test."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise DataError(f"Paired test needs two equal-length 1-D arrays, got {a.shape} and {b.shape}.")
    diff = b - a
    if len(diff) < 2 or np.allclose(diff, 0):
        return {"mean_diff": float(diff.mean()) if len(diff) else 0.0, "t_test": 1.0, "randomization": 1.0}
    t_p = float(stats.ttest_rel(b, a).pvalue)
    rng = np.random.default_rng(seed)
    observed = abs(diff.mean())
    hits = 0
    for start in range(0, resamples, 1000):  # bounded memory: 1000 sign patterns at a time
        signs = rng.choice(np.array([-1.0, 1.0]), size=(min(1000, resamples - start), len(diff)))
        hits += int((np.abs((signs * diff).mean(axis=1)) >= observed - 1e-12).sum())
    return {"mean_diff": float(diff.mean()), "t_test": t_p, "randomization": (hits + 1) / (resamples + 1)}


# --------------------------------------------------------------------------- TREC runs


def read_run(path: str | Path) -> Run:
    """Read a TREC run file (`qid Q0 docid rank score tag`), validating every line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Missing run file {path}. Pass a TREC run written by `imrnn search` or any TREC tool.")
    run: Run = {}
    for number, line in numbered_lines(path):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 6:
            raise DataError(
                f"{path}:{number}: expected 6 columns `qid Q0 docid rank score tag`, got {len(fields)}: {line[:80]!r}."
            )
        qid, _, doc, _, score, _ = fields
        try:
            value = float(score)
        except ValueError:
            raise DataError(f"{path}:{number}: score {clip(score)} is not a number. The fifth column must be the score.") from None
        if not np.isfinite(value):
            raise DataError(f"{path}:{number}: score {clip(score)} is not finite. Scores must be real numbers.")
        docs = run.setdefault(qid, {})
        if doc in docs:
            raise DataError(
                f"{path}:{number}: document {clip(doc)} appears twice for query {clip(qid)}. A run lists each document once per query."
            )
        docs[doc] = value
    if not run:
        raise DataError(f"{path}: the run is empty. A TREC run holds lines `qid Q0 docid rank score tag`.")
    return run


def write_run(path: str | Path, run: Run, tag: str = "imrnn") -> None:
    """Write a TREC run atomically, each query's documents in trec_eval order (score desc, docid desc)."""
    if not re.fullmatch(r"\S+", tag):
        raise DataError(f"Run tag {tag!r} must be one word without spaces.")
    lines = (f"{qid} Q0 {doc} {rank} {run[qid][doc]:.8f} {tag}\n"
             for qid in sorted(run) for rank, doc in enumerate(_trec_order(run[qid]), start=1))
    atomic_write_text(path, "".join(lines))


def hits_to_run(query_ids: Sequence[str], doc_ids: np.ndarray, indices: np.ndarray, scores: np.ndarray) -> Run:
    """Arrays of document rows and scores -> a run keyed by string ids.

    Skips -1 padding and non-finite (-inf: masked) scores, which no TREC run can hold; a document listed twice
    for a query keeps its first (best-ranked) score. A query with nothing left maps to an empty dict."""
    run: Run = {}
    for qid, rows, vals in zip(query_ids, indices, scores):
        keep = (rows >= 0) & np.isfinite(vals)
        docs: dict[str, float] = {}
        for doc, value in zip(doc_ids[rows[keep]].tolist(), vals[keep].astype(float).tolist()):
            docs.setdefault(doc, value)
        run[qid] = docs
    return run
