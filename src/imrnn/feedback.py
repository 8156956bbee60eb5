"""Non-learned feedback, the adapters' starting point: Rocchio in embedding space, tuned on the queries a model may see.

q' = norm(q + beta * mean of the top-m candidates) re-ranks a query's candidates by cosine with q'. The document
adapter can express exactly this shift, so `IMRNNConfig.feedback_weight` (beta) and `feedback_docs` (m) build it in:
an untrained IMRNN (identity heads) *is* Rocchio feedback, training starts there, and early stopping on validation
keeps that starting point unless a trained epoch beats it. Tuning uses every training and validation query (nothing
is learned from them but two numbers) and keeps feedback only where it clearly helps; beta = 0 is the frozen retriever.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch

from .candidates import RankingSet
from .config import FEEDBACK_RULES, IMRNNConfig
from .errors import ConfigError
from .evaluate import clearly_better, hits_to_run, per_query
from .model import IMRNN, CorpusCache
from .scoring import sort_by_score

FEEDBACK_WEIGHTS = (0.1, 0.25, 0.5, 1.0)  # beta = 0 (no feedback) is always tried as well
FEEDBACK_SIZES = (1, 3, 5, 10)
SELECTION_FOLDS = 5  # folds over the tuning queries that judge the selection out of sample (`cross_validated`)
_DEPTH = 20  # nDCG@10 reads the top 10; a margin keeps score ties at rank 10 in the run, as trec_eval orders them


def feedback_ndcg(config: IMRNNConfig, rankings: Sequence[RankingSet], doc_embs: np.ndarray, doc_ids: np.ndarray,
                  corpus: CorpusCache | None = None) -> np.ndarray:
    """Per-query nDCG@10 of the untrained adapter under `config` (Rocchio with its beta and m) over `rankings`.

    Scored by `IMRNN.score_rows`, the fast inference path; `corpus` (`IMRNN.cache_corpus` of any untrained adapter:
    they all project by the identity) can be passed to share it across calls."""
    model = IMRNN(config).eval()
    corpus = corpus if corpus is not None else model.cache_corpus(doc_embs)
    values = []
    for data in rankings:
        rows = torch.from_numpy(np.asarray(data.candidates, np.int64))
        queries = torch.from_numpy(np.asarray(data.query_embs, np.float32))
        scores, _ = model.score_rows(queries, rows.clamp(min=0), rows >= 0, corpus)
        top, top_scores = sort_by_score(data.candidates, scores.numpy())
        run = hits_to_run(data.query_ids, doc_ids, top[:, :_DEPTH], top_scores[:, :_DEPTH])
        values.append(per_query(run, data.qrels, ["nDCG@10"])["nDCG@10"])
    return np.concatenate(values) if values else np.zeros(0)


def tune_feedback(config: IMRNNConfig, rankings: Sequence[RankingSet], doc_embs: np.ndarray, doc_ids: np.ndarray,
                  weights: Sequence[float] = FEEDBACK_WEIGHTS, sizes: Sequence[int] = FEEDBACK_SIZES,
                  require_clear_gain: bool = True, rule: str = "cross-validated", seed: int = 0) -> tuple[IMRNNConfig, dict]:
    """`config` with the Rocchio weight and feedback size of the best mean nDCG@10 over `rankings`, and a report.

    The best option is kept only if it beats the frozen retriever (beta = 0) by more than one paired standard error
    over these queries: where they cannot tell, no feedback (the feedback size then stays `config.feedback_docs`).
    What "beats" compares, by `rule`: `in-sample`, the best option's per-query values (flattered by being the best of
    17); `cross-validated`, each query's value under the option chosen on the other folds (`cross_validated`), an
    honest estimate of what the selection gains on queries it did not see. `require_clear_gain=False` keeps the best
    mean whatever its margin (textbook Rocchio tuning). The report lists every option's mean."""
    if rule not in FEEDBACK_RULES:
        raise ConfigError(f"feedback rule must be one of {FEEDBACK_RULES}, got {rule!r}.")
    frozen = (0.0, config.feedback_docs)
    options = [frozen] + [(w, m) for w in weights if w > 0 for m in sizes]
    corpus = IMRNN(config).eval().cache_corpus(doc_embs)
    values = {option: feedback_ndcg(dataclasses.replace(config, feedback_weight=option[0], feedback_docs=option[1]), rankings,
                                    doc_embs, doc_ids, corpus) for option in options}
    best = max(options, key=lambda option: values[option].mean())  # the frozen retriever (first) on ties
    judged = cross_validated(values, options, seed) if rule == "cross-validated" else values[best]
    chosen = best if not require_clear_gain or clearly_better(judged, values[frozen]) else frozen
    report = {"beta": chosen[0], "m": chosen[1], "queries": int(sum(len(r.query_ids) for r in rankings)),
              "best": {"beta": best[0], "m": best[1], "nDCG@10": float(values[best].mean()),
                       f"{rule} nDCG@10": float(judged.mean())},
              "rule": "the best option" + (f" if its {rule} nDCG@10 beats beta = 0 by more than one standard error"
                                           if require_clear_gain else ""),
              "nDCG@10": {"chosen": float(values[chosen].mean()), "frozen": float(values[frozen].mean()),
                          "options": {f"beta={w},m={m}": float(v.mean()) for (w, m), v in values.items()}}}
    return dataclasses.replace(config, feedback_weight=chosen[0], feedback_docs=chosen[1]), report


def cross_validated(values: dict[tuple[float, int], np.ndarray], options: Sequence[tuple[float, int]], seed: int = 0,
                    folds: int = SELECTION_FOLDS) -> np.ndarray:
    """Per-query values of the selection itself, out of sample: the queries are dealt into `folds` seeded folds and
    each fold is scored by the option with the best mean on the other folds (the frozen retriever, first, among them).
    With fewer than two queries there is nothing to hold out, and the first option's values are returned."""
    n = len(values[options[0]])
    if min(folds, n) < 2:  # nothing to hold out: the selection cannot be shown to beat the first option
        return np.array(values[options[0]], dtype=np.float64)
    fold_of = np.random.default_rng(seed).permutation(n) % min(folds, n)
    out = np.empty(n)
    for fold in np.unique(fold_of):
        inside = fold_of != fold
        pick = max(options, key=lambda option: values[option][inside].mean())
        out[~inside] = values[pick][~inside]
    return out
