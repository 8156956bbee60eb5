"""Numerical guards at the public boundary: zero vectors, NaN/Inf, short or empty or duplicated candidate lists,
K = 1. Each case has a defined result or a ConfigError naming the problem, and no output ever holds a NaN score.

Decisions (also in the docstrings):
* exact_search / FaissIndex / encode_cached: NaN or Inf in an embedding is a ConfigError naming the first bad row.
  Zero vectors are allowed and score 0. k > N pads with row -1 and score -inf.
* IMRNN.forward: NaN/Inf in a query or an unmasked candidate is a ConfigError; masked candidates may hold
  anything and score -inf; an all-masked row is all -inf (never NaN); K = 1 and K < feedback_docs work.
* score_candidates: a repeated row in one list is scored once (later copies -inf); a query with no candidates
  gets all -inf; hits_to_run leaves -inf and repeated entries out of the run (the query maps to {}).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import randomised, unit
from imrnn.checkpoint import Checkpoint
from imrnn.config import IMRNNConfig
from imrnn.encode import Encoder, EncoderConfig, encode_cached
from imrnn.errors import ConfigError
from imrnn.evaluate import evaluate_run, hits_to_run, read_run, write_run
from imrnn.index import FaissIndex, exact_search, search
from imrnn.model import IMRNN
from imrnn.retriever import IMRNNRetriever
from imrnn.scoring import repeated_rows, score_candidates


def no_nan(x) -> bool:
    return not np.isnan(np.asarray(x, dtype=np.float64)).any()


@pytest.fixture(scope="module")
def model() -> IMRNN:
    return randomised(IMRNN(IMRNNConfig(embedding_dim=8, hidden_dim=4, feedback_docs=3, iterations=2)))


# --------------------------------------------------------------------------- first stage


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_exact_search_refuses_non_finite_queries_and_documents(bad):
    rng = np.random.default_rng(0)
    docs, queries = unit(rng, 50, 8), unit(rng, 3, 8)
    queries[1, 2] = bad
    with pytest.raises(ConfigError, match=r"1 query embedding\(s\) hold NaN or Inf values \(first: query row 1\)"):
        exact_search(queries, docs, 5)
    queries[1, 2] = 0.5
    docs[37, 0] = bad  # in the third chunk of 16: the error names the corpus row, not the row within the chunk
    with pytest.raises(ConfigError, match=r"first: document row 37"):
        exact_search(queries, docs, 5, chunk_size=16)
    with pytest.raises(ConfigError, match="document row 37"):
        search(queries, docs, 5, backend="faiss-flat")


def test_zero_vectors_score_zero_and_ties_break_by_row():
    rng = np.random.default_rng(1)
    docs = unit(rng, 20, 8)
    docs[[3, 11]] = 0.0
    queries = np.vstack([np.zeros((1, 8), np.float32), unit(rng, 1, 8)])
    hits = exact_search(queries, docs, 4, chunk_size=7)
    assert hits.indices[0].tolist() == [0, 1, 2, 3] and (hits.scores[0] == 0).all()  # all tied: row order
    assert no_nan(hits.scores) and np.isfinite(hits.scores).all()
    flat = FaissIndex("flat").build(docs).search(queries, 4)
    np.testing.assert_array_equal(flat.indices, hits.indices)


def test_k_larger_than_corpus_and_k_equal_one():
    rng = np.random.default_rng(2)
    docs, queries = unit(rng, 3, 8), unit(rng, 4, 8)
    hits = exact_search(queries, docs, 5)
    assert (hits.indices[:, 3:] == -1).all() and np.isneginf(hits.scores[:, 3:]).all() and no_nan(hits.scores)
    top1 = exact_search(queries, docs, 1)
    np.testing.assert_array_equal(top1.indices[:, 0], np.argmax(queries @ docs.T, axis=1))
    for kind in ("flat", "hnsw"):
        padded = FaissIndex(kind).build(docs).search(queries, 5)
        assert padded.indices.shape == (4, 5) and (padded.indices[:, 3:] == -1).all() and no_nan(padded.scores)


def test_faiss_index_guards():
    rng = np.random.default_rng(3)
    docs = unit(rng, 30, 8)
    index = FaissIndex("flat").build(docs)
    with pytest.raises(ConfigError, match="query row 0"):
        index.search(np.full((1, 8), np.nan, np.float32), 3)
    with pytest.raises(ConfigError, match=r"queries must be a \(Q, 8\) array"):
        index.search(unit(rng, 2, 7), 3)
    with pytest.raises(ConfigError, match="k must be at least 1"):
        index.search(unit(rng, 2, 8), 0)
    docs[29, 1] = np.inf
    with pytest.raises(ConfigError, match="document row 29"):
        FaissIndex("flat").build(docs, chunk_size=8)


# --------------------------------------------------------------------------- the adapter


def test_all_masked_row_scores_minus_inf_and_leaves_other_rows_alone(model):
    rng = np.random.default_rng(4)
    q, d = torch.from_numpy(unit(rng, 3, 8)), torch.from_numpy(unit(rng, 3, 6, 8))
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1] = False
    mask[2, 4:] = False
    scores = model(q, d, mask).scores
    assert torch.isneginf(scores[1]).all() and torch.isneginf(scores[2, 4:]).all() and not torch.isnan(scores).any()
    torch.testing.assert_close(scores[0], model(q[:1], d[:1]).scores[0])
    torch.testing.assert_close(scores[2, :4], model(q[2:], d[2:, :4]).scores[0])


def test_masked_padding_may_hold_nan_but_unmasked_candidates_may_not(model):
    rng = np.random.default_rng(5)
    q, d = torch.from_numpy(unit(rng, 2, 8)), torch.from_numpy(unit(rng, 2, 5, 8))
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 3:] = False
    clean = model(q, d, mask).scores
    poisoned = d.clone()
    poisoned[0, 3:] = float("nan")
    torch.testing.assert_close(model(q, poisoned, mask).scores, clean)
    poisoned[1, 2, 5] = float("inf")
    with pytest.raises(ConfigError, match=r"candidate embeddings hold NaN or Inf values \(first at index \(1, 2\)\)"):
        model(q, poisoned, mask)
    bad_q = q.clone()
    bad_q[1, 0] = float("nan")
    with pytest.raises(ConfigError, match=r"query embeddings hold NaN or Inf values \(first at index \(1,\)\)"):
        model(bad_q, d, mask)
    with pytest.raises(ConfigError, match="mask must have shape"):
        model(q, d, mask[:, :4])


def test_zero_vectors_k_equal_one_and_fewer_candidates_than_feedback(model):
    rng = np.random.default_rng(6)
    q = torch.from_numpy(unit(rng, 3, 8))
    q[0] = 0.0
    d = torch.from_numpy(unit(rng, 3, 1, 8))
    d[1] = 0.0
    scores = model(q, d).scores
    assert scores.shape == (3, 1) and torch.isfinite(scores).all()
    two = torch.from_numpy(unit(rng, 3, 2, 8))  # K = 2 < feedback_docs = 3
    assert torch.isfinite(model(q, two).scores).all()


def test_extreme_magnitudes_never_give_nan(model):
    rng = np.random.default_rng(7)
    q, d = torch.from_numpy(unit(rng, 2, 8) * 1e38), torch.from_numpy(unit(rng, 2, 4, 8) * 1e38)
    try:
        scores = model(q, d).scores
    except ConfigError as err:
        assert "NaN" in str(err)
    else:
        assert not torch.isnan(scores).any()


def test_query_with_no_candidates_and_empty_candidate_lists(model):
    rng = np.random.default_rng(8)
    out = model(torch.from_numpy(unit(rng, 2, 8)), torch.zeros(2, 0, 8)).scores
    assert out.shape == (2, 0)


# --------------------------------------------------------------------------- scoring candidate rows, runs


def test_score_candidates_scores_a_repeated_row_once(model, tmp_path):
    rng = np.random.default_rng(9)
    docs, queries = unit(rng, 30, 8), unit(rng, 3, 8)
    cands = np.array([[3, 5, 3, -1, 7], [-1, -1, -1, -1, -1], [8, 9, 10, 11, 12]])
    scores = score_candidates(model, queries, docs, cands)
    assert np.isneginf(scores[0, [2, 3]]).all() and np.isfinite(scores[0, [0, 1, 4]]).all()
    dedup = score_candidates(model, queries, docs, np.array([[3, 5, 7, -1, -1]] * 3))
    np.testing.assert_allclose(scores[0, [0, 1, 4]], dedup[0, :3], atol=1e-6)  # the copy does not weigh twice
    assert np.isneginf(scores[1]).all() and no_nan(scores)
    memmapped = np.lib.format.open_memmap(tmp_path / "d.npy", mode="w+", dtype=np.float32, shape=docs.shape)
    memmapped[:] = docs
    np.testing.assert_array_equal(score_candidates(model, queries, memmapped, cands), scores)

    ids = np.array([f"d{i}" for i in range(30)], dtype=object)
    run = hits_to_run(["q0", "q1", "q2"], ids, cands, scores)
    assert set(run["q0"]) == {"d3", "d5", "d7"} and run["q0"]["d3"] == pytest.approx(float(scores[0, 0]))
    assert run["q1"] == {} and len(run["q2"]) == 5
    write_run(tmp_path / "r.run", run)
    back = read_run(tmp_path / "r.run")
    assert set(back) == {"q0", "q2"} and all(back[q] == pytest.approx(run[q], rel=1e-6) for q in back)
    qrels = {"q0": {"d3": 1}, "q1": {"d1": 1}, "q2": {"d8": 1}}
    assert math.isfinite(evaluate_run(run, qrels, ["nDCG@10"])["nDCG@10"])  # q1 counts as 0, not skipped


def test_score_candidates_agrees_with_the_checked_forward_and_names_bad_rows(model):
    """Validation and evaluation score by `score_rows` (as search does): the same scores as `forward` on gathered
    candidates, in batches smaller than the query set too; a NaN row is refused by its corpus row, padding never."""
    rng = np.random.default_rng(12)
    docs, queries = unit(rng, 40, 8), unit(rng, 5, 8)
    cands = rng.integers(0, 40, size=(5, 6))
    cands[1, 4:] = -1
    cands = np.where(repeated_rows(cands), -1, cands)
    mask = torch.from_numpy(cands >= 0)
    expected = model(torch.from_numpy(queries), torch.from_numpy(docs[np.maximum(cands, 0)]), mask).scores.detach().numpy()
    for batch_size in (1024, 2):
        got = score_candidates(model, queries, docs, cands, batch_size=batch_size)
        np.testing.assert_allclose(got, expected, atol=1e-6)
    poisoned = docs.copy()
    poisoned[0] = np.nan  # row 0 is no candidate here: never gathered
    cands[cands == 0] = 1
    score_candidates(model, queries, poisoned, cands)
    poisoned[int(cands[2, 0])] = np.inf
    with pytest.raises(ConfigError, match=rf"candidate embeddings hold NaN or Inf values \(first: corpus row {int(cands[2, 0])}\)"):
        score_candidates(model, queries, poisoned, cands)
    bad_queries = queries.copy()
    bad_queries[3, 1] = np.nan
    with pytest.raises(ConfigError, match=r"query embeddings hold NaN or Inf values \(first: query row 3\)"):
        score_candidates(model, bad_queries, docs, cands, batch_size=2)


def test_hits_to_run_keeps_the_first_copy_of_a_repeated_document():
    ids = np.array(["a", "b", "c"], dtype=object)
    run = hits_to_run(["q"], ids, np.array([[1, 0, 1, 2]]), np.array([[0.9, 0.5, 0.1, -np.inf]], np.float32))
    assert run == {"q": {"b": pytest.approx(0.9), "a": pytest.approx(0.5)}}


def test_score_candidates_refuses_rows_outside_the_corpus(model):
    rng = np.random.default_rng(10)
    with pytest.raises(ConfigError, match="candidate row 30 is out of range for a corpus of 30 documents"):
        score_candidates(model, unit(rng, 1, 8), unit(rng, 30, 8), np.array([[1, 30]]))
    with pytest.raises(ConfigError, match=r"\(Q, K\) array"):
        score_candidates(model, unit(rng, 1, 8), unit(rng, 30, 8), np.array([1, 2]))


# --------------------------------------------------------------------------- the retriever


@pytest.fixture
def retriever(model):
    rng = np.random.default_rng(11)
    r = IMRNNRetriever(Checkpoint(model, EncoderConfig()), candidates=10)
    r.doc_ids, r.doc_embs = np.array([f"d{i}" for i in range(6)], dtype=object), unit(rng, 6, 8)
    return r


def test_retriever_with_fewer_documents_than_k(retriever):
    rankings = retriever.search_embeddings(unit(np.random.default_rng(12), 2, 8), k=20)
    assert [len(r) for r in rankings] == [6, 6]
    for r in rankings:
        assert sorted(r.ids) == [f"d{i}" for i in range(6)] and np.isfinite(r.scores).all() and np.isfinite(r.base_scores).all()
        assert (np.diff(r.scores) <= 0).all()
    one = retriever.search_embeddings(unit(np.random.default_rng(12), 2, 8), k=1)
    assert [len(r) for r in one] == [1, 1]


def test_retriever_refuses_non_finite_queries(retriever):
    queries = unit(np.random.default_rng(13), 2, 8)
    queries[1, 3] = np.nan
    with pytest.raises(ConfigError, match="query row 1"):
        retriever.search_embeddings(queries, k=3)
    retriever.doc_embs[4, 0] = np.inf
    with pytest.raises(ConfigError, match="document row 4"):
        retriever.search_embeddings(unit(np.random.default_rng(13), 1, 8), k=3)


def test_rerank_embeddings_masks_and_types(retriever):
    rng = np.random.default_rng(14)
    q, c = unit(rng, 2, 8), unit(rng, 2, 4, 8)
    mask = np.array([[True, True, False, False], [False] * 4])
    out = retriever.rerank_embeddings(q, c, mask=mask)
    assert isinstance(out, np.ndarray) and np.isneginf(out[1]).all() and np.isneginf(out[0, 2:]).all() and no_nan(out)
    as_torch = retriever.rerank_embeddings(torch.from_numpy(q), torch.from_numpy(c), torch.from_numpy(mask))
    assert isinstance(as_torch, torch.Tensor)
    np.testing.assert_array_equal(as_torch.numpy(), out)
    c[0, 1, 0] = np.nan
    with pytest.raises(ConfigError, match="candidate embeddings hold NaN"):
        retriever.rerank_embeddings(q, c, mask=mask)
    assert retriever.rerank_embeddings(q, np.zeros((2, 0, 8), np.float32)).shape == (2, 0)


def test_rerank_ids_equals_the_checked_forward_on_the_same_candidates(retriever, model):
    rng = np.random.default_rng(15)
    queries = unit(rng, 3, 8)
    lists = [["d4", "d1", "d0"], ["d2", "d5"], ["d3"]]  # ragged: shorter lists are padded internally
    rankings = retriever.rerank_ids(queries, lists)
    for query, ids, ranking in zip(queries, lists, rankings):
        rows = [int(i[1:]) for i in ids]
        scored = model(torch.from_numpy(query[None]), torch.from_numpy(retriever.doc_embs[rows][None]))
        expected = dict(zip(ids, scored.scores[0].detach().numpy()))
        assert sorted(ranking.ids) == sorted(ids) and (np.diff(ranking.scores) <= 0).all()
        np.testing.assert_allclose(ranking.scores, [expected[i] for i in ranking.ids], atol=1e-5)
        np.testing.assert_allclose(ranking.base_scores, retriever.doc_embs[[int(i[1:]) for i in ranking.ids]] @ query, atol=1e-6)
    as_rows = retriever.rerank_ids(queries, np.array([[4, 1, 0], [2, 5, -1], [3, -1, -1]]))
    assert [r.ids for r in as_rows] == [r.ids for r in rankings]
    assert [len(r) for r in retriever.rerank_ids(queries, lists, k=1)] == [1, 1, 1]


def test_index_embeddings_then_search_and_rerank_ids(model):
    rng = np.random.default_rng(20)
    docs = unit(rng, 30, 8)
    retriever = IMRNNRetriever(Checkpoint(model, EncoderConfig()), candidates=5).index_embeddings(docs)
    top = retriever.search_embeddings(docs[:2], k=5)  # all 5 first-stage candidates, re-ranked
    assert all(len(r) == 5 for r in top)
    again = retriever.rerank_ids(docs[:2], [r.ids[::-1] for r in top])  # the same candidates, in another order
    assert [r.ids for r in again] == [r.ids for r in top]
    np.testing.assert_allclose(np.stack([r.scores for r in again]), np.stack([r.scores for r in top]), atol=1e-6)
    named = IMRNNRetriever(Checkpoint(model, EncoderConfig())).index_embeddings(docs, ids=[f"x{i}" for i in range(30)])
    assert named.rerank_ids(docs[:1], [["x3", "x4"]])[0].ids[0] in {"x3", "x4"}


@pytest.mark.parametrize("change, fragment", [
    (lambda d: d[0], r"non-empty \(N, d\) array"),
    (lambda d: d[:, :7], "Embeddings are 7-d but the adapter expects 8-d"),
    (lambda d: np.where(np.arange(30)[:, None] == 4, np.nan, d), "document row 4"),
])
def test_index_embeddings_refuses_bad_arrays(model, change, fragment):
    docs = unit(np.random.default_rng(21), 30, 8)
    with pytest.raises(ConfigError, match=fragment):
        IMRNNRetriever(Checkpoint(model, EncoderConfig())).index_embeddings(change(docs))
    with pytest.raises(ConfigError, match="ids must be unique"):
        IMRNNRetriever(Checkpoint(model, EncoderConfig())).index_embeddings(docs, ids=["a"] * 30)


def test_rerank_ids_counts_a_repeated_id_once(retriever):
    q = unit(np.random.default_rng(16), 1, 8)
    once, twice = retriever.rerank_ids(q, [["d1", "d2"]])[0], retriever.rerank_ids(q, [["d1", "d2", "d1"]])[0]
    assert twice.ids == once.ids
    np.testing.assert_allclose(twice.scores, once.scores, atol=1e-6)


@pytest.mark.parametrize("candidates, fragment", [
    ([["d1", "nope"]], r"Candidate list 0 names document id 'nope'"),
    ([["d1"], ["d2", "d9"]], r"Candidate list 1 names document id 'd9'"),
    (["d1", "d2"], "one list of document ids per query"),
    (np.array([[0, 6]]), r"rows must lie in \[-1, 6\)"),
    (np.array([0, 1]), r"\(Q, K\) integer array"),
    ([["d1"], ["d2"]], "Q = 2 candidate lists"),
    (None, "one list of document ids per query"),
    ([["d1"], 7], "one list of document ids per query"),
])
def test_rerank_ids_refuses_bad_candidates(retriever, candidates, fragment):
    with pytest.raises(ConfigError, match=fragment):
        retriever.rerank_ids(unit(np.random.default_rng(17), 1, 8), candidates)


def test_rerank_ids_and_index_embeddings_refuse_non_numeric_arrays(retriever):
    with pytest.raises(ConfigError, match="Query embeddings must be numbers"):
        retriever.rerank_ids([["a", "b"]], [["d1"]])
    with pytest.raises(ConfigError, match="Document embeddings must be numbers"):
        retriever.index_embeddings([["x"] * 8, [1.0] * 8])


def test_rerank_ids_needs_an_index(model):
    fresh = IMRNNRetriever(Checkpoint(model, EncoderConfig()))
    with pytest.raises(ConfigError, match=r"index_embeddings\(embeddings\) before rerank_ids"):
        fresh.rerank_ids(unit(np.random.default_rng(18), 1, 8), [["d1"]])


def test_rerank_ids_refuses_non_finite_inputs(retriever):
    queries = unit(np.random.default_rng(19), 2, 8)
    queries[1, 2] = np.nan
    with pytest.raises(ConfigError, match="query row 1"):
        retriever.rerank_ids(queries, [["d1"], ["d2"]])
    retriever.doc_embs = retriever.doc_embs.copy()
    retriever.doc_embs[3, 0] = np.inf
    with pytest.raises(ConfigError, match="document row 3"):
        retriever.rerank_ids(queries[:1], [["d3", "d1"]])


def test_rerank_refuses_duplicate_ids(retriever):
    with pytest.raises(ConfigError, match="ids must be unique"):
        retriever.rerank("query", ["a", "b"], ids=["x", "x"])


# --------------------------------------------------------------------------- the embedding cache


class StandInEncoder(Encoder):
    """A 4-d encoder without a model: NaN for texts containing 'NaN!' (what a broken model or bf16 overflow gives)."""

    def __init__(self) -> None:
        super().__init__(EncoderConfig(model="stand-in"))

    @property
    def identity(self) -> str:
        return "stand-in"

    @property
    def dimension(self) -> int:
        return 4

    def encode(self, texts, prefix="", progress=False):
        out = np.array([[len(t) + 1.0, 1.0, 0.0, 0.0] for t in texts], np.float32)
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        out[["NaN!" in t for t in texts]] = np.nan
        return out


def test_encode_cached_refuses_non_finite_embeddings_and_publishes_nothing(tmp_path):
    texts = ["fine", "also fine", "this one NaN! breaks", "ok"]
    with pytest.raises(ConfigError, match=r"NaN or Inf for 1 of 2 passages \(first: id 't2'"):
        encode_cached(StandInEncoder(), [f"t{i}" for i in range(4)], texts, tmp_path, chunk_size=2, progress=False)
    entries = [p for p in (tmp_path / "embeddings").iterdir() if p.is_dir()]
    assert all(p.name.endswith(".partial") for p in entries)  # no complete entry was published
    good = encode_cached(StandInEncoder(), [f"t{i}" for i in range(4)], ["a", "bb", "ccc", "d"], tmp_path, chunk_size=2, progress=False)
    assert np.isfinite(good).all()
