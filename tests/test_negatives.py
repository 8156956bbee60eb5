"""Candidate sets and hard negatives against slow obvious constructions."""

from __future__ import annotations

import numpy as np

from imrnn.negatives import bm25_negatives, dense_negatives, gather_grades, relevance_matrix, training_candidates

DOC_IDS = np.array([f"d{i}" for i in range(8)], dtype=object)


def test_gather_grades_matches_lookup_and_ignores_padding():
    qrels = {"a": {"d1": 2, "d3": 1, "d9": 1}, "b": {"d0": 0, "d7": 1}}
    relevance = relevance_matrix(["a", "b"], qrels, DOC_IDS)  # d9 is not in the corpus: skipped
    candidates = np.array([[3, 1, 0, -1], [7, 0, 2, 5]])
    expected = np.array([[1, 2, 0, 0], [1, 0, 0, 0]], dtype=np.float32)
    np.testing.assert_array_equal(gather_grades(relevance, candidates), expected)


def test_training_candidates_put_missing_positives_at_the_tail():
    relevance = relevance_matrix(["a"], {"a": {"d6": 2, "d7": 1, "d0": 1}}, DOC_IDS)
    base = np.array([[0, 1, 2, 3]])
    cands, grades = training_candidates(base, relevance, max_added_positives=1)
    assert cands.tolist() == [[0, 1, 2, 6]] and grades.tolist() == [[1, 0, 0, 2]]  # the higher grade goes in first
    cands, grades = training_candidates(base, relevance, max_added_positives=5)
    assert sorted(cands[0].tolist()) == [0, 1, 6, 7] and grades[0, 0] == 1
    unchanged, _ = training_candidates(base, relevance, max_added_positives=0)
    assert unchanged.tolist() == base.tolist()


def test_dense_negatives_keep_rank_order_and_skip_positives():
    cands = np.array([[5, 2, 7, 1], [3, -1, -1, -1]])
    grades = np.array([[0, 1, 0, 0], [1, 0, 0, 0]], dtype=np.float32)
    assert dense_negatives(cands, grades, 2).tolist() == [[5, 7], [-1, -1]]


def test_bm25_negatives_are_lexical_matches_that_are_not_relevant():
    corpus = ["solar panels convert sunlight", "sunlight and solar energy storage", "bread baking with yeast",
              "solar eclipse of the sun", "dogs and cats", "yeast fermentation in beer", "solar wind particles", "cats"]
    relevance = relevance_matrix(["q"], {"q": {"d0": 1}}, DOC_IDS)
    negatives = bm25_negatives(corpus, ["solar sunlight"], relevance, count=3)
    assert negatives.shape == (1, 3)
    assert 0 not in negatives[0] and negatives[0, 0] == 1  # the best non-relevant lexical match comes first
    assert set(negatives[0]) <= {1, 3, 6}
