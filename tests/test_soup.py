"""The default weight soup: one adapter per validation fold of the training + validation queries, from the same
start, and the mean of their weights (`SplitPlan.validation_folds`, `train.weight_soup`, `workflow.train`)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from imrnn.candidates import ranking_set, select_queries
from imrnn.config import IMRNNConfig, TrainConfig
from imrnn.errors import ConfigError
from imrnn.model import IMRNN
from imrnn.train import TrainResult, weight_soup
from imrnn.workflow import SplitPlan, Workspace, _training_set, train

from conftest import randomised


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, write_tiny_beir, encoder):
    root = tmp_path_factory.mktemp("soup")
    workspace = Workspace.open(write_tiny_beir(root / "tiny"), encoder, k=10, cache_dir=root / "cache", progress=False)
    return workspace, SplitPlan.official(workspace.dataset, fraction=0.5, seed=1)


def test_validation_folds_partition_the_training_and_validation_queries(tiny):
    workspace, plan = tiny
    pooled = set(plan.train.ids) | set(plan.validation.ids)
    members = plan.validation_folds(2, seed=5)
    assert len(members) == 2
    searched = (workspace.ranking(plan.train), workspace.ranking(plan.validation))
    for member in members:  # a member's ranking is rows of the plan's, exactly what a new search would return
        for queries in (member.train, member.validation):
            picked, fresh = select_queries(searched, queries.ids), workspace.ranking(queries)
            assert picked.query_ids == fresh.query_ids and picked.qrels == fresh.qrels
            for field in ("query_embs", "candidates", "grades"):
                assert np.array_equal(getattr(picked, field), getattr(fresh, field)), field
    with pytest.raises(ConfigError, match="--validation-folds 1"):
        plan.validation_folds(len(pooled) + 1, seed=5)  # more folds than queries
    assert set(members[0].validation.ids).isdisjoint(members[1].validation.ids)
    assert set(members[0].validation.ids) | set(members[1].validation.ids) == pooled
    for member in members:
        assert set(member.train.ids) == pooled - set(member.validation.ids)
        assert member.test is plan.test and member.seen == plan.seen
        assert all(member.validation.qrels[q] == {**plan.train.qrels, **plan.validation.qrels}[q] for q in member.validation.ids)


def test_a_members_added_positives_and_bm25_negatives_are_built_on_its_pooled_rows(tiny):
    workspace, plan = tiny
    pooled = (workspace.ranking(plan.train), workspace.ranking(plan.validation))
    member = plan.validation_folds(2, seed=5)[0]
    plain = select_queries(pooled, member.train.ids)
    fresh = workspace.ranking(member.train)  # what a second search gives: the same lists, the same embeddings here
    ids = workspace.dataset.corpus.ids
    for config in (TrainConfig(max_added_positives=3), TrainConfig(max_added_positives=3, bm25_negatives=2)):
        built = _training_set(workspace, member, config, plain)
        assert built.query_embs is plain.query_embs  # the rows validation and search use, not a re-encoding
        expected = ranking_set(member.train.ids, fresh.query_embs, fresh.candidates, member.train.qrels, ids, 3)
        k = expected.candidates.shape[1]
        assert np.array_equal(built.candidates[:, :k], expected.candidates)
        assert np.array_equal(built.grades[:, :k], expected.grades)
        assert built.candidates.shape[1] == k + config.bm25_negatives


def test_the_weight_soup_holds_the_mean_weights_and_keeps_its_members():
    config = IMRNNConfig(embedding_dim=16, hidden_dim=8)
    members = [TrainResult(randomised(IMRNN(config), seed), epoch, score, [{"epoch": 0, "val_nDCG@10": score}], 1.5)
               for seed, epoch, score in ((1, 4, 0.5), (2, 7, 0.7))]
    soup = weight_soup(members)
    for name, tensor in soup.model.state_dict().items():
        expected = (members[0].model.state_dict()[name] + members[1].model.state_dict()[name]) / 2
        assert torch.allclose(tensor, expected), name
    assert soup.best_epoch == 7 and soup.best_validation == pytest.approx(0.6) and soup.seconds == 3.0
    assert soup.members == members and [r["member"] for r in soup.history] == [0, 1]
    assert not soup.model.training


def test_training_with_validation_folds_averages_one_adapter_per_fold(tiny):
    workspace, plan = tiny
    result = train(workspace, plan, TrainConfig(validation_folds=2, epochs=3, lr=3e-2, min_queries=0, seed=3), progress=False)
    assert len(result.members) == 2
    states = [member.model.state_dict() for member in result.members]
    for name, tensor in result.model.state_dict().items():
        assert torch.allclose(tensor, (states[0][name] + states[1][name]) / 2), name
    single = train(workspace, plan, TrainConfig(validation_folds=1, epochs=3, lr=3e-2, min_queries=0, seed=3), progress=False)
    assert single.members == [] and single.history[0].get("member") is None


def test_the_gate_and_the_acceptance_test_need_one_adapter_and_old_records_trained_one():
    for choice in ({"novelty_gate": True}, {"keep_only_if_better": True}):
        with pytest.raises(ConfigError, match="--validation-folds 1"):
            TrainConfig(**choice)
        assert TrainConfig(validation_folds=1, **choice).validation_folds == 1
    with pytest.raises(ConfigError, match="validation_folds must be at least 1"):
        TrainConfig(validation_folds=0)
    assert TrainConfig().validation_folds == 3
    assert TrainConfig.from_dict({"seed": 4, "novelty_gate": True}).validation_folds == 1  # a checkpoint from before the soup


@pytest.fixture(scope="module")
def varied(tmp_path_factory, write_tiny_beir, encoder):
    """A random collection whose queries have 1 to 6 relevant documents each, so that pooling a batch's pairs and
    averaging each query's first train different adapters (with equal counts the two losses are the same)."""
    rng = np.random.default_rng(0)
    words = ("alpha beta gamma delta sun moon river stone glass metal fire water cell gene protein light sound field "
             "wave star rock tree leaf seed root salt acid iron copper").split()
    marked = 30  # the relevant documents all come from the first 30, which share a word no query has: learnable
    docs = {f"d{i}": (f"doc {i}", " ".join(rng.choice(words, 8)) + (" zircon zircon" if i < marked else ""))
            for i in range(80)}
    queries = {f"q{i}": " ".join(rng.choice(words, 4)) for i in range(36)}
    qrels = {"train": {f"q{i}": {f"d{j}": int(rng.integers(1, 3)) for j in rng.choice(marked, 1 + i % 6, replace=False)}
                       for i in range(30)},
             "test": {f"q{i}": {f"d{j}": 1 for j in rng.choice(marked, 2, replace=False)} for i in range(30, 36)}}
    root = tmp_path_factory.mktemp("varied")
    workspace = Workspace.open(write_tiny_beir(root / "varied", docs, queries, qrels), encoder, k=20,
                               cache_dir=root / "cache", progress=False)
    return workspace, SplitPlan.official(workspace.dataset, fraction=0.3, seed=1)


def _own_fold_values(workspace, plan, result, config):
    """Each member's nDCG@10 on its own validation fold, computed here without the workflow's helper."""
    from imrnn.train import validation_values

    sets = (workspace.ranking(plan.train), workspace.ranking(plan.validation))
    folds = plan.validation_folds(config.validation_folds, config.seed)
    return np.concatenate([validation_values(m.model, select_queries(sets, f.validation.ids), workspace.doc_embs,
                                             workspace.dataset.corpus.ids) for m, f in zip(result.members, folds)])


def test_choosing_the_loss_keeps_the_query_balanced_adapters_only_if_out_of_fold_validation_clearly_prefers_them(varied, tmp_path):
    from imrnn.evaluate import clearly_better

    workspace, plan = varied
    config = TrainConfig(validation_folds=2, epochs=3, lr=3e-2, min_queries=0, seed=3)
    pooled = train(workspace, plan, dataclasses.replace(config, choose_query_balanced=False), progress=False)
    balanced_config = TrainConfig(validation_folds=2, epochs=3, lr=3e-2, min_queries=0, seed=3, query_balanced=True)
    balanced = train(workspace, plan, balanced_config, progress=False)
    pooled_values, balanced_values = (_own_fold_values(workspace, plan, r, config) for r in (pooled, balanced))
    assert not np.allclose(pooled_values, balanced_values)  # the two losses trained different adapters

    chosen = train(workspace, plan, config, progress=False, state_dir=tmp_path / "state")
    report = chosen.recipe["loss_averaging"]
    expected = "query-balanced" if clearly_better(balanced_values, pooled_values) else "pooled"
    assert report["chosen"] == expected and report["queries"] == len(plan.train) + len(plan.validation)
    assert report["validation_nDCG@10"] == pytest.approx({"pooled": pooled_values.mean(), "query-balanced": balanced_values.mean()})
    kept = balanced if expected == "query-balanced" else pooled
    for name, tensor in chosen.model.state_dict().items():
        assert torch.equal(tensor, kept.model.state_dict()[name]), name
    assert (tmp_path / "state" / "query-balanced" / "member1").is_dir()  # each arm's training state apart, resumable

    resumed = train(workspace, plan, config, progress=False, state_dir=tmp_path / "state", resume=True)
    assert resumed.recipe["loss_averaging"] == report
    for name, tensor in resumed.model.state_dict().items():
        assert torch.equal(tensor, chosen.model.state_dict()[name]), name


def test_choosing_the_loss_with_one_adapter_compares_the_validation_split(varied):
    workspace, plan = varied
    chosen = train(workspace, plan, TrainConfig(validation_folds=1, epochs=2, lr=3e-2, min_queries=0, seed=3), progress=False)
    assert chosen.recipe["loss_averaging"]["queries"] == len(plan.validation)


def test_the_loss_is_chosen_by_default_unless_the_config_settles_it():
    assert TrainConfig().chooses_loss_averaging
    for settled in ({"query_balanced": True}, {"loss": "listwise"}, {"choose_query_balanced": False}):
        assert not TrainConfig(**settled).chooses_loss_averaging
    assert not TrainConfig.from_dict({"seed": 4}).chooses_loss_averaging  # a record from before the choice existed
