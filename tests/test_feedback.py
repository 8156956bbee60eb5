"""Rocchio feedback as the adapters' starting point, its tuning, the gate rules and the few-query fallback."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import randomised, unit
from imrnn.candidates import ranking_set
from imrnn.config import IMRNNConfig, TrainConfig
from imrnn.errors import ConfigError
from imrnn.feedback import cross_validated, feedback_ndcg, tune_feedback
from imrnn.index import exact_search
from imrnn.model import IMRNN
from imrnn.evaluate import clearly_better
from imrnn.train import calibrate_gate, keep_if_clearly_better, train_adapter
from test_model import synthetic_task


def rocchio_scores(queries: np.ndarray, cands: np.ndarray, beta: float, m: int) -> np.ndarray:
    """Textbook Rocchio in embedding space: q' = norm(q + beta * mean of the top-m by cosine), scores = cos(q', d)."""
    order = np.argsort(-np.einsum("qd,qkd->qk", queries, cands), axis=1, kind="stable")[:, :m]
    centroid = np.take_along_axis(cands, order[:, :, None], 1).mean(1)
    refined = queries + beta * centroid
    refined /= np.linalg.norm(refined, axis=1, keepdims=True)
    return np.einsum("qd,qkd->qk", refined, cands)


@pytest.mark.parametrize("beta, m", [(0.0, 5), (0.5, 3), (1.0, 1), (0.25, 12)])
def test_an_untrained_adapter_is_exactly_rocchio_feedback(beta, m):
    rng = np.random.default_rng(0)
    queries, cands = unit(rng, 6, 16), unit(rng, 6, 12, 16)
    model = IMRNN(IMRNNConfig(embedding_dim=16, hidden_dim=8, feedback_docs=m, feedback_weight=beta)).eval()
    scores = model(torch.from_numpy(queries), torch.from_numpy(cands)).scores.detach().numpy()
    np.testing.assert_allclose(scores, rocchio_scores(queries, cands, beta, m), atol=1e-5)


def test_the_fast_corpus_path_scores_feedback_as_forward_does():
    rng = np.random.default_rng(1)
    corpus, queries = unit(rng, 40, 16), unit(rng, 5, 16)
    rows = torch.from_numpy(rng.choice(40, size=(5, 9), replace=True))
    model = randomised(IMRNN(IMRNNConfig(embedding_dim=16, hidden_dim=8, feedback_docs=3, feedback_weight=0.5)))
    mask = torch.ones(rows.shape, dtype=torch.bool)
    fast, _ = model.score_rows(torch.from_numpy(queries), rows, mask, model.cache_corpus(corpus))
    slow = model(torch.from_numpy(queries), torch.from_numpy(corpus)[rows], mask).scores
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_negative_or_non_finite_feedback_weight_is_refused():
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="feedback_weight"):
            IMRNNConfig(feedback_weight=bad)


def feedback_task(seed: int = 0, n_docs: int = 400, dim: int = 24, helps: bool = True):
    """Each query has a cluster of relevant documents; with `helps`, its top candidates sit in that cluster, so a
    shift towards them finds the rest; without, the query points at its cluster directly and feedback only blurs."""
    rng = np.random.default_rng(seed)
    centres = unit(rng, 40, dim)
    cluster = rng.integers(0, 40, size=n_docs)
    docs = centres[cluster] + 0.5 / np.sqrt(dim) * rng.standard_normal((n_docs, dim)).astype(np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    targets = rng.integers(0, 40, size=120)
    noise = (1.2 if helps else 0.3) / np.sqrt(dim) * rng.standard_normal((120, dim)).astype(np.float32)
    queries = centres[targets] + noise
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    ids = np.array([f"d{i}" for i in range(n_docs)], dtype=object)
    qids = [f"q{i}" for i in range(120)]
    qrels = {q: {f"d{j}": 1 for j in np.flatnonzero(cluster == t)} for q, t in zip(qids, targets)}
    hits = exact_search(queries, docs, 30)
    return docs, ids, ranking_set(qids, queries, hits.indices, qrels, ids)


def test_tuning_keeps_the_frozen_retriever_unless_feedback_measurably_helps():
    config = IMRNNConfig(embedding_dim=24, hidden_dim=8)
    docs, ids, data = feedback_task(helps=True)
    tuned, report = tune_feedback(config, [data], docs, ids)
    assert tuned.feedback_weight > 0 and report["nDCG@10"]["chosen"] > report["nDCG@10"]["frozen"] + 0.01
    assert report["nDCG@10"]["chosen"] == pytest.approx(feedback_ndcg(tuned, [data], docs, ids).mean())
    assert report["nDCG@10"]["chosen"] == max(report["nDCG@10"]["options"].values())
    docs, ids, data = feedback_task(helps=False, seed=1)
    single = dataclasses.replace(data, qrels={q: {f"d{data.candidates[i, 0]}": 1} for i, q in enumerate(data.query_ids)})
    tuned, report = tune_feedback(config, [single], docs, ids)  # the top candidate is the only relevant one
    assert tuned.feedback_weight == 0.0 and tuned.feedback_docs == config.feedback_docs


def test_cross_validated_selection_scores_each_query_by_an_option_chosen_without_it():
    rng = np.random.default_rng(0)
    options = [(0.0, 5)] + [(w, m) for w in (0.1, 0.25, 0.5, 1.0) for m in (1, 3, 5, 10)]
    noise = {option: rng.random(40) for option in options}
    honest = cross_validated(noise, options)
    assert all(any(honest[i] == noise[o][i] for o in options) for i in range(40))
    assert honest.mean() < max(v.mean() for v in noise.values())  # the best of 17 noisy options flatters itself
    dominant = {option: np.full(40, 0.5) for option in options} | {(0.5, 3): np.full(40, 0.6)}
    np.testing.assert_array_equal(cross_validated(dominant, options), np.full(40, 0.6))
    single = {option: np.array([0.3 + option[0]]) for option in options}  # one query: nothing to hold out
    np.testing.assert_array_equal(cross_validated(single, options), single[options[0]])


def test_cross_validated_tuning_keeps_feedback_that_helps():
    config = IMRNNConfig(embedding_dim=24, hidden_dim=8)
    docs, ids, data = feedback_task(helps=True)
    tuned, report = tune_feedback(config, [data], docs, ids, rule="cross-validated")
    assert tuned.feedback_weight > 0 and report["best"]["cross-validated nDCG@10"] > report["nDCG@10"]["frozen"]
    with pytest.raises(ConfigError, match="feedback rule must be one of"):
        tune_feedback(config, [data], docs, ids, rule="lucky")


def test_training_starts_at_rocchio_and_never_ends_below_it_on_validation():
    docs, ids, data = feedback_task(helps=True)
    train_set, val_set = (dataclasses.replace(data, query_ids=data.query_ids[s], query_embs=data.query_embs[s],
                                              candidates=data.candidates[s], grades=data.grades[s],
                                              qrels={q: data.qrels[q] for q in data.query_ids[s]})
                          for s in (slice(0, 90), slice(90, 120)))
    tuned, report = tune_feedback(IMRNNConfig(embedding_dim=24, hidden_dim=8, dropout=0.0), [train_set, val_set], docs, ids)
    start = float(feedback_ndcg(tuned, [val_set], docs, ids).mean())
    result = train_adapter(tuned, TrainConfig(epochs=3, lr=5e-2, seed=3, novelty_gate=False), docs, ids, train_set, val_set,
                           progress=False)  # a learning rate far too high: trained epochs may be worse
    assert result.history[0]["val_nDCG@10"] == pytest.approx(start)
    assert result.best_validation >= start


def test_the_abstaining_gate_rule_keeps_no_gate_when_validation_cannot_tell():
    docs, ids, train_set, val_set = synthetic_task()
    model_config = IMRNNConfig(embedding_dim=32, hidden_dim=32, dropout=0.0)
    trained = train_adapter(model_config, TrainConfig(epochs=4, lr=3e-3, seed=7, novelty_gate=False), docs, ids, train_set,
                            val_set, progress=False).model
    few = dataclasses.replace(val_set, query_ids=val_set.query_ids[:3], query_embs=val_set.query_embs[:3],
                              candidates=val_set.candidates[:3], grades=val_set.grades[:3],
                              qrels={q: val_set.qrels[q] for q in val_set.query_ids[:3]})
    _, abstained = calibrate_gate(trained, train_set.query_embs, few, torch.from_numpy(docs), ids, "abstain")
    _, conservative = calibrate_gate(trained, train_set.query_embs, few, torch.from_numpy(docs), ids, "one-standard-error")
    assert abstained["threshold"] is None  # three queries cannot show a gate helps
    assert conservative["threshold"] == 0.95  # the old rule switches the adapter off instead
    with pytest.raises(ConfigError, match="gate_rule"):
        TrainConfig(gate_rule="sometimes")


def test_a_trained_adapter_is_kept_only_when_validation_clearly_prefers_it():
    docs, ids, train_set, val_set = synthetic_task()
    model_config = IMRNNConfig(embedding_dim=32, hidden_dim=32, dropout=0.0)
    start = IMRNN(model_config).eval()
    fast = TrainConfig(epochs=6, lr=3e-3, seed=7, ema_half_life=0.0)  # raw weights: clearly better within 6 epochs
    trained = train_adapter(model_config, fast, docs, ids, train_set, val_set, progress=False).model
    kept, report = keep_if_clearly_better(trained, start, val_set, docs, ids)
    assert kept is trained and report["kept"] and report["validation_nDCG@10"]["trained"] > report["validation_nDCG@10"]["start"]
    scrambled = randomised(IMRNN(model_config), seed=5)  # an adapter that learned nothing useful
    kept, report = keep_if_clearly_better(scrambled, start, val_set, docs, ids)
    assert kept is start and not report["kept"]
    assert not clearly_better(np.array([0.9]), np.array([0.1]))  # one query never shows anything
    assert clearly_better(np.array([0.5, 0.6, 0.7]), np.array([0.4, 0.5, 0.6]))


def test_a_checkpoint_keeps_its_feedback(tmp_path):
    from imrnn.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from imrnn.config import EncoderConfig

    rng = np.random.default_rng(4)
    model = randomised(IMRNN(IMRNNConfig(embedding_dim=16, hidden_dim=8, feedback_docs=3, feedback_weight=0.25)))
    save_checkpoint(Checkpoint(model, EncoderConfig(), TrainConfig(), {}), tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt").model
    assert loaded.config.feedback_weight == 0.25 and loaded.config.feedback_docs == 3
    q, d = torch.from_numpy(unit(rng, 4, 16)), torch.from_numpy(unit(rng, 4, 9, 16))
    torch.testing.assert_close(loaded(q, d).scores, model(q, d).scores, rtol=0, atol=0)
