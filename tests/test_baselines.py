"""The benchmark's baselines (benchmarks/baselines.py) on the tiny BEIR folder: they run on the same candidates and
never end below what they were chosen against on validation."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from imrnn.config import IMRNNConfig, TrainConfig
from imrnn.evaluate import evaluate_run, hits_to_run
from imrnn.model import IMRNN
from imrnn.train import validation_values
from imrnn.workflow import SplitPlan, Workspace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import all_collections  # noqa: E402
import baselines  # noqa: E402
import document_prior  # noqa: E402
import frozen_blend  # noqa: E402


@pytest.fixture(scope="module")
def tiny_workspace(tmp_path_factory, write_tiny_beir, encoder):
    root = tmp_path_factory.mktemp("baselines")
    workspace = Workspace.open(write_tiny_beir(root / "tiny"), encoder, k=10, cache_dir=root / "cache", progress=False)
    return workspace, SplitPlan.official(workspace.dataset, fraction=0.5, seed=1)


def frozen_validation(workspace: Workspace, plan: SplitPlan) -> float:
    data = workspace.ranking(plan.validation)
    run = hits_to_run(data.query_ids, workspace.dataset.corpus.ids, data.candidates, workspace.frozen_scores(data))
    return evaluate_run(run, data.qrels, ["nDCG@10"])["nDCG@10"]


def test_the_linear_adapter_reranks_the_same_candidates_and_keeps_its_best_validation_epoch(tiny_workspace):
    workspace, plan = tiny_workspace
    run, report = baselines.linear_adapter(workspace, plan, rates=(1e-3, 1e-2), epochs=3)
    test = workspace.ranking(plan.test)
    assert set(run) == set(test.query_ids)
    for row, query in enumerate(test.query_ids):  # only the first stage's candidates are re-ranked
        assert set(run[query]) == {workspace.dataset.corpus.ids[i] for i in test.candidates[row] if i >= 0}
    positives = sum(r > 0 for docs in plan.train.qrels.values() for r in docs.values())
    assert report["lr"] in (1e-3, 1e-2) and report["pairs"] == positives > 0  # one pair per training positive
    assert report["validation_nDCG@10"] >= frozen_validation(workspace, plan) - 1e-9  # epoch 0 is the identity


def test_rocchio_is_tuned_without_the_clear_gain_test(tiny_workspace):
    workspace, plan = tiny_workspace
    run, report = baselines.rocchio(workspace, plan)
    assert report["rule"] == "the best option" and set(run) == set(workspace.ranking(plan.test).query_ids)
    assert report["nDCG@10"]["chosen"] == max(report["nDCG@10"]["options"].values())


def test_held_out_halves_split_validation_in_two_and_each_scoring_half_is_unseen(tiny_workspace):
    _, plan = tiny_workspace
    first, second = all_collections.held_out_plans(plan, seed=3)
    assert set(first.validation.ids) == set(second.test.ids) and set(first.test.ids) == set(second.validation.ids)
    assert set(first.validation.ids) | set(first.test.ids) == set(plan.validation.ids)
    assert not set(first.validation.ids) & set(first.test.ids)
    for half in (first, second):  # a plan's judgements never include the half it is scored on
        assert not set(half.test.qrels) & set(half.seen) and set(half.train.ids) == set(plan.train.ids)


def test_the_frozen_blend_runs_from_the_adapter_alone_to_the_frozen_retriever(tiny_workspace):
    workspace, plan = tiny_workspace
    data = workspace.ranking(plan.validation)
    scrambled = IMRNN(IMRNNConfig(embedding_dim=workspace.doc_embs.shape[1], identity_init=False)).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # an adapter that ranks differently from the frozen retriever
        for parameter in scrambled.parameters():
            parameter.normal_()
    values = frozen_blend.blended_values(workspace, scrambled, plan.validation)
    np.testing.assert_allclose(values[0.0], validation_values(scrambled, data, workspace.doc_embs, workspace.dataset.corpus.ids))
    assert values["base"].mean() == pytest.approx(frozen_validation(workspace, plan))
    assert values[0.0].mean() < values["base"].mean()  # so alpha 0 is the adapter, not the frozen retriever
    untrained = IMRNN(IMRNNConfig(embedding_dim=workspace.doc_embs.shape[1])).eval()  # scores = the frozen cosine
    for alpha, blended in frozen_blend.blended_values(workspace, untrained, plan.validation).items():
        np.testing.assert_allclose(blended, values["base"], atol=1e-6, err_msg=f"alpha {alpha}")


def test_the_novelty_gate_candidates_run_from_the_adapter_to_the_frozen_retriever(tiny_workspace):
    workspace, plan = tiny_workspace
    scrambled = IMRNN(IMRNNConfig(embedding_dim=workspace.doc_embs.shape[1], identity_init=False)).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in scrambled.parameters():
            parameter.normal_()
    memory = frozen_blend.training_memory(workspace, plan)
    np.testing.assert_allclose(memory.norm(dim=1).numpy(), 1.0, rtol=1e-6)
    thresholds = frozen_blend.gate_thresholds(workspace, plan, memory)
    nearest = frozen_blend.nearest_training_similarity(workspace.ranking(plan.validation).query_embs, memory).numpy()
    for q in frozen_blend.GATE_QUANTILES:  # quantile thresholds come from the plan's own validation queries
        assert thresholds[f"gate q{q}"] == pytest.approx(np.quantile(nearest, q))
    gates = {"always adapted": -2.0, "always frozen": 3.0, **thresholds}
    values = frozen_blend.blended_values(workspace, scrambled, plan.validation, memory, gates)
    assert set(thresholds) <= set(values)
    np.testing.assert_allclose(values["always adapted"], values[0.0], atol=1e-6)  # gate 1 everywhere
    np.testing.assert_allclose(values["always frozen"], values["base"], atol=1e-6)  # gate 0 everywhere
    assert values[0.0].mean() != values["base"].mean()  # so the two ends differ and the test can tell them apart


def test_the_document_prior_share_counts_marked_documents_in_each_top_ten_and_skips_padding():
    candidates = np.array([list(range(12)), [5, 6, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1]])
    scores = np.array([np.arange(12, 0, -1), [2.0, 1.0] + [-np.inf] * 10])  # row 0: top-10 = docs 0..9
    marked = np.zeros(12, bool)
    marked[[0, 5, 11]] = True  # doc 11 is ranked 12th: outside the top-10
    np.testing.assert_allclose(document_prior.top_share(scores, candidates, marked), [0.2, 0.1])


def test_the_document_prior_figures_are_the_frozen_and_adapted_test_rankings(tiny_workspace):
    workspace, plan = tiny_workspace
    values = document_prior.plan_values(workspace, plan, TrainConfig(epochs=2, min_queries=1))
    test = workspace.ranking(plan.test)
    run = hits_to_run(test.query_ids, workspace.dataset.corpus.ids, test.candidates, workspace.frozen_scores(test))
    assert values["base nDCG@10"].mean() == pytest.approx(evaluate_run(run, test.qrels, ["nDCG@10"])["nDCG@10"])
    assert len(values["unseen"]) == len(values["adapted share"]) == len(test.qrels)
    for key in ("base share", "adapted share"):
        assert ((values[key] >= 0) & (values[key] <= 1)).all()


def test_held_out_validation_keeps_each_scored_query_with_its_values(tiny_workspace):
    workspace, plan = tiny_workspace
    recipe = TrainConfig(epochs=2, validation_folds=1, seed=1)
    values = all_collections.held_out_validation(workspace, plan, recipe, IMRNNConfig())
    halves = all_collections.held_out_plans(plan, seed=1)
    expected = [q for half in halves for q in sorted(q for q, docs in half.test.qrels.items() if any(r > 0 for r in docs.values()))]
    assert values["query_ids"].tolist() == expected  # the scoring halves' judged queries, in the order of the values
    assert len(values["base"]) == len(values["recipe"]) == len(values["unseen"]) == len(expected) > 0
