"""Metrics against pytrec_eval and slow references, TREC run I/O, paired significance tests."""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import pytest
import pytrec_eval
from scipy import stats

from imrnn.errors import DataError
from imrnn.evaluate import (
    DEFAULT_MEASURES,
    evaluate_run,
    evaluated_queries,
    hits_to_run,
    paired_test,
    per_query,
    read_run,
    write_run,
)

OURS_TO_TREC = {
    "nDCG@10": ("ndcg_cut.10", "ndcg_cut_10"),
    "R@10": ("recall.10", "recall_10"),
    "R@100": ("recall.100", "recall_100"),
    "P@10": ("P.10", "P_10"),
    "AP": ("map", "map"),
}


def random_qrels_and_run(seed: int, n_queries: int = 40, n_docs: int = 150):
    """Graded qrels (0..3, some queries without any relevant doc) and a run with ties, gaps and extras."""
    rng = np.random.default_rng(seed)
    docs = [f"d{i}" for i in range(n_docs)]  # "d10" < "d9" as strings: tie-breaks by id are visible
    qrels: dict[str, dict[str, int]] = {}
    run: dict[str, dict[str, float]] = {}
    for q in range(n_queries):
        qid = f"q{q}"
        judged = rng.choice(n_docs, size=int(rng.integers(1, 25)), replace=False)
        grades = rng.choice([0, 0, 1, 1, 2, 3], size=len(judged))
        if q % 9 == 0:
            grades[:] = 0  # judged, but nothing relevant: not an evaluated query
        qrels[qid] = {docs[d]: int(g) for d, g in zip(judged, grades)}
        if q % 7 == 3:
            continue  # missing from the run
        retrieved = rng.choice(n_docs, size=int(rng.integers(1, 130)), replace=False)
        # coarse scores make many ties; trec_eval must break them by docid
        scores = np.round(rng.normal(size=len(retrieved)), 1)
        run[qid] = {docs[d]: float(s) for d, s in zip(retrieved, scores)}
    run["q_not_judged"] = {"d1": 1.0, "d2": 0.5}
    return qrels, run


def reference_per_query(run, qrels, trec_measure: str, key: str) -> np.ndarray:
    """Direct pytrec_eval over the full qrels; an evaluated query absent from its output scores 0."""
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {trec_measure})
    result = evaluator.evaluate(run)
    wanted = sorted(q for q, d in qrels.items() if any(r > 0 for r in d.values()))
    return np.array([result[q][key] if q in result else 0.0 for q in wanted])


def _trec_cmp(a: tuple[str, float], b: tuple[str, float]) -> int:
    """trec_eval's order: higher score first; equal scores -> larger docid (string compare) first."""
    if a[1] != b[1]:
        return -1 if a[1] > b[1] else 1
    if a[0] != b[0]:
        return -1 if a[0] > b[0] else 1
    return 0


def slow_rr_at_10(run, qrels) -> np.ndarray:
    values = []
    for qid in sorted(qrels):
        relevant = {d for d, r in qrels[qid].items() if r > 0}
        if not relevant:
            continue
        ranking = sorted(run.get(qid, {}).items(), key=functools.cmp_to_key(_trec_cmp))
        rr = 0.0
        for rank, (doc, _) in enumerate(ranking[:10], start=1):
            if doc in relevant:
                rr = 1.0 / rank
                break
        values.append(rr)
    return np.array(values)


@pytest.mark.parametrize("seed", range(6))
def test_metrics_equal_pytrec_eval(seed):
    qrels, run = random_qrels_and_run(seed)
    ours = per_query(run, qrels, list(OURS_TO_TREC) + ["RR@10"])
    means = evaluate_run(run, qrels, list(OURS_TO_TREC) + ["RR@10"])
    n_evaluated = sum(any(r > 0 for r in d.values()) for d in qrels.values())
    for name, (trec, key) in OURS_TO_TREC.items():
        expected = reference_per_query(run, qrels, trec, key)
        assert len(ours[name]) == n_evaluated
        np.testing.assert_array_equal(ours[name], expected, err_msg=name)
        assert means[name] == float(expected.mean())
    rr = slow_rr_at_10(run, qrels)
    np.testing.assert_allclose(ours["RR@10"], rr, rtol=0, atol=1e-12)
    assert means["RR@10"] == pytest.approx(rr.mean(), abs=1e-12)
    assert 0.0 < means["nDCG@10"] < 1.0  # the random data is not degenerate


def test_rr_at_10_ignores_hits_below_rank_10_and_breaks_ties_by_docid_descending():
    qrels = {"a": {"d5": 1}, "b": {"d1": 1}, "c": {"x": 1}}
    run = {
        # eleven docs tie; descending docid order is d9 d8 d7 d6 d5 d4 d3 d2 d11 d10 d1 -> d5 is 5th
        "a": {f"d{i}": 1.0 for i in range(1, 12)},
        # the same ranking: d1 is 11th, beyond the cutoff
        "b": {f"d{i}": 1.0 for i in range(1, 12)},
        "c": {"y": 3.0, "x": 2.0},
    }
    values = per_query(run, qrels, ["RR@10", "RR"])
    np.testing.assert_allclose(values["RR@10"], [1 / 5, 0.0, 1 / 2])
    np.testing.assert_allclose(values["RR"], [1 / 5, 1 / 11, 1 / 2])


def test_ndcg_is_linear_gain():
    qrels = {"q": {"a": 2, "b": 1}}
    run = {"q": {"b": 2.0, "a": 1.0}}
    dcg = 1 / math.log2(2) + 2 / math.log2(3)
    ideal = 2 / math.log2(2) + 1 / math.log2(3)
    assert evaluate_run(run, qrels, ["nDCG@10"])["nDCG@10"] == pytest.approx(dcg / ideal, abs=1e-12)
    assert dcg / ideal == pytest.approx(0.859719, abs=1e-6)  # exponential gain would give 0.7967


def test_queries_without_retrieved_relevant_or_missing_from_run_count_as_zero():
    qrels = {
        "q1": {"a": 1},
        "q2": {"b": 1, "c": 0},
        "q3": {"d": 2},
        "q4": {"e": 1},
        "q5": {"f": 0},  # nothing relevant: not evaluated
    }
    run = {"q1": {"a": 1.0, "z": 0.5}, "q2": {"c": 2.0, "z": 1.0}, "q4": {}, "q5": {"f": 1.0}, "qx": {"a": 1.0}}
    assert evaluated_queries(qrels) == ["q1", "q2", "q3", "q4"]
    values = per_query(run, qrels, DEFAULT_MEASURES)
    for name in DEFAULT_MEASURES:
        assert len(values[name]) == 4
        assert values[name][0] > 0 and list(values[name][1:]) == [0.0, 0.0, 0.0], name
    means = evaluate_run(run, qrels, ["nDCG@10", "R@100", "RR@10", "AP"])
    assert means == {"nDCG@10": 0.25, "R@100": 0.25, "RR@10": 0.25, "AP": 0.25}
    assert evaluate_run(run, qrels, ["P@10"])["P@10"] == pytest.approx(0.1 / 4)


def test_no_evaluated_queries_gives_nan():
    assert math.isnan(evaluate_run({"q": {"a": 1.0}}, {"q": {"a": 0}}, ["nDCG@10"])["nDCG@10"])


@pytest.mark.parametrize("name,match", [("MRR@10", "Unknown measure"), ("R", "needs a cutoff"),
                                        ("P", "needs a cutoff"), ("ndcg@10", "Unknown measure")])
def test_bad_measure_names(name, match):
    with pytest.raises(DataError, match=match):
        per_query({"q": {"a": 1.0}}, {"q": {"a": 1}}, [name])


# --------------------------------------------------------------------------- TREC runs


def test_write_run_read_run_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    run = {
        f"q{q}": {f"d{d}": float(np.round(rng.normal(), 6)) for d in rng.choice(500, 40, replace=False)}
        for q in range(12)
    }
    run["q3"]["tie_a"] = run["q3"]["tie_b"] = 9.5
    path = tmp_path / "runs" / "nested" / "base.run"
    write_run(path, run, tag="base")
    assert read_run(path) == run
    assert [p.name for p in path.parent.iterdir()] == ["base.run"]  # no temporary file left
    lines = [line.split() for line in path.read_text().splitlines()]
    assert len(lines) == sum(len(d) for d in run.values())
    assert all(f[1] == "Q0" and f[5] == "base" for f in lines)
    q3 = [f for f in lines if f[0] == "q3"]
    assert [int(f[3]) for f in q3] == list(range(1, len(q3) + 1))
    assert [f[2] for f in q3[:2]] == ["tie_b", "tie_a"]  # equal scores: docid descending
    scores = [float(f[4]) for f in q3]
    assert scores == sorted(scores, reverse=True)
    assert evaluate_run(read_run(path), {"q3": {"tie_a": 1}}, ["RR@10"])["RR@10"] == 0.5


def test_write_run_rejects_a_tag_with_spaces(tmp_path):
    with pytest.raises(DataError, match="must be one word"):
        write_run(tmp_path / "r.run", {"q": {"d": 1.0}}, tag="two words")
    assert not (tmp_path / "r.run").exists()


VALID = "q1 Q0 d1 1 2.5 t\nq1 Q0 d2 2 1.5 t\n"


@pytest.mark.parametrize(
    "bad_line,fragment",
    [
        ("q1 Q0 d3 3 1.0", "expected 6 columns `qid Q0 docid rank score tag`, got 5"),
        ("q1 Q0 d3 3 1.0 t extra", "expected 6 columns `qid Q0 docid rank score tag`, got 7"),
        ("q1 Q0 d3 3 high t", "score 'high' is not a number"),
        ("q1 Q0 d3 3 nan t", "score 'nan' is not finite"),
        ("q1 Q0 d1 3 0.5 t", "document 'd1' appears twice for query 'q1'"),
    ],
)
def test_read_run_errors_name_file_and_line(tmp_path, bad_line, fragment):
    path = tmp_path / "bad.run"
    path.write_text(VALID + "\n" + bad_line + "\nq2 Q0 d1 1 1.0 t\n")
    with pytest.raises(DataError) as info:
        read_run(path)
    assert f"{path}:4: " in str(info.value)
    assert fragment in str(info.value)


def test_read_run_missing_and_empty(tmp_path):
    with pytest.raises(DataError, match="Missing run file .*absent.run"):
        read_run(tmp_path / "absent.run")
    (tmp_path / "empty.run").write_text("\n\n")
    with pytest.raises(DataError, match="the run is empty"):
        read_run(tmp_path / "empty.run")
    (tmp_path / "latin.run").write_bytes(b"q1 Q0 caf\xe9 1 1.0 t\n")
    with pytest.raises(DataError, match=r"latin.run:1: bytes that are not UTF-8"):
        read_run(tmp_path / "latin.run")


def test_hits_to_run_skips_padding():
    doc_ids = np.array(["a", "b", "c"], dtype=object)
    indices = np.array([[2, 0, -1], [1, -1, -1]])
    scores = np.array([[0.9, 0.5, -np.inf], [0.7, -np.inf, -np.inf]], dtype=np.float32)
    run = hits_to_run(["q1", "q2"], doc_ids, indices, scores)
    assert run == {"q1": {"c": pytest.approx(0.9), "a": 0.5}, "q2": {"b": pytest.approx(0.7)}}


# --------------------------------------------------------------------------- significance


def test_paired_test_identical_runs():
    a = np.random.default_rng(1).uniform(size=50)
    result = paired_test(a, a.copy())
    assert result == {"mean_diff": 0.0, "t_test": 1.0, "randomization": 1.0}


def test_paired_test_clearly_better_run():
    rng = np.random.default_rng(2)
    a = rng.uniform(0, 0.6, size=100)
    b = a + 0.15 + rng.normal(0, 0.05, size=100)
    result = paired_test(a, b, resamples=5000)
    assert result["mean_diff"] == pytest.approx((b - a).mean())
    assert result["t_test"] < 1e-20
    assert result["randomization"] == pytest.approx(1 / 5001)  # no sign pattern reaches the observed mean
    assert paired_test(b, a, resamples=5000)["mean_diff"] == pytest.approx(-(b - a).mean())


@pytest.mark.parametrize("seed", range(4))
def test_paired_t_test_equals_scipy(seed):
    rng = np.random.default_rng(seed)
    a = rng.uniform(size=60)
    b = np.clip(a + rng.normal(0.02 * seed, 0.2, size=60), 0, 1)
    assert paired_test(a, b)["t_test"] == pytest.approx(stats.ttest_rel(b, a).pvalue, rel=1e-12, abs=0)
    assert paired_test(a, b)["t_test"] == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-12, abs=0)


def test_randomization_test_matches_exact_enumeration():
    rng = np.random.default_rng(5)
    a = rng.uniform(size=12)
    b = a + rng.normal(0.1, 0.2, size=12)
    diff = b - a
    observed = abs(diff.mean())
    exact = np.mean([abs((np.array(s) * diff).mean()) >= observed - 1e-12
                     for s in itertools.product([-1.0, 1.0], repeat=len(diff))])
    result = paired_test(a, b, resamples=20_000, seed=3)
    assert 0.01 < exact < 0.9
    assert result["randomization"] == pytest.approx(exact, abs=0.015)
    assert paired_test(a, b, resamples=20_000, seed=3) == result  # seeded: reproducible


def test_paired_test_rejects_mismatched_shapes():
    with pytest.raises(DataError, match="equal-length 1-D arrays"):
        paired_test(np.zeros(3), np.zeros(4))
