"""The adapter module, training and checkpoints: hand-computed cases, fast vs slow paths, reproducibility."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import randomised, unit
from safetensors.torch import load_file, save_file

from imrnn.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from imrnn.encode import EncoderConfig
from imrnn.errors import CheckpointError, ConfigError
from imrnn.index import exact_search
from imrnn.config import IMRNNConfig, TrainConfig
from imrnn import model as model_module
from imrnn.model import IMRNN
from imrnn.candidates import ranking_set
from imrnn.scoring import score_candidates
from imrnn.resume import Snapshot
from imrnn.train import _loss, plateau_average, relevant_elsewhere, train_adapter


def test_untrained_identity_adapter_reproduces_base_ranking():
    rng = np.random.default_rng(0)
    docs, queries = unit(rng, 2000, 64), unit(rng, 50, 64)
    hits = exact_search(queries, docs, 100)
    model = IMRNN(IMRNNConfig(embedding_dim=64, feedback_docs=5, iterations=2))
    scores = score_candidates(model, queries, docs, hits.indices)
    np.testing.assert_allclose(scores, hits.scores, atol=1e-5)
    order = np.argsort(-scores, axis=1, kind="stable")
    # the base ranking, up to ties: only documents whose base scores agree to float32 rounding may swap
    assert (np.diff(np.take_along_axis(hits.scores, order, 1), axis=1) <= 1e-6).all()
    assert (np.take_along_axis(hits.indices, order, 1) == hits.indices).mean() > 0.99


def test_hand_computed_scores_with_query_adapter_only():
    config = IMRNNConfig(embedding_dim=2, hidden_dim=1, dropout=0.0, use_doc_adapter=False)
    model = IMRNN(config).eval()
    with torch.no_grad():  # scale = 1 + tanh(0) = 1 on dim 0, 1 + tanh(atanh(0.5)) = 1.5 on dim 1; shift 0
        model.query_adapter.out.weight.zero_()
        model.query_adapter.out.bias.copy_(torch.tensor([0.0, float(np.arctanh(0.5)), 0.0, 0.0]))
    q = torch.tensor([[0.6, 0.8]])
    d = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]])
    got = model(q, d).scores[0].detach().numpy()
    modulated = np.array([[1.0, 0.0], [0.0, 1.5], [0.6, 1.2]])
    modulated /= np.linalg.norm(modulated, axis=1, keepdims=True)
    np.testing.assert_allclose(got, modulated @ np.array([0.6, 0.8]), atol=1e-6)


def test_batched_forward_equals_per_query_forward_and_mask_isolates_padding():
    rng = np.random.default_rng(1)
    model = randomised(IMRNN(IMRNNConfig(embedding_dim=16, hidden_dim=8, feedback_docs=3, iterations=2)))
    q, d = torch.from_numpy(unit(rng, 6, 16)), torch.from_numpy(unit(rng, 6, 10, 16))
    mask = torch.ones(6, 10, dtype=torch.bool)
    mask[2, 7:] = False
    batched = model(q, d, mask).scores
    for i in range(6):
        k = int(mask[i].sum())
        single = model(q[i : i + 1], d[i : i + 1, :k]).scores[0]
        torch.testing.assert_close(batched[i, :k], single, atol=1e-5, rtol=1e-5)
    assert torch.isneginf(batched[2, 7:]).all()
    assert not torch.isnan(batched).any()


def test_doc_adapter_refines_query_from_top_m_feedback():
    model = randomised(IMRNN(IMRNNConfig(embedding_dim=8, hidden_dim=4, feedback_docs=2, use_query_adapter=False)))
    rng = np.random.default_rng(2)
    q, d = torch.from_numpy(unit(rng, 1, 8)), torch.from_numpy(unit(rng, 1, 5, 8))
    qp, dp = model.project(q), model.project(d)
    top = (dp[0] @ qp[0]).topk(2).indices
    scale, shift = model.doc_adapter(dp[0, top])
    refined = F.normalize(qp[0] * scale.mean(0) + shift.mean(0), dim=-1)
    torch.testing.assert_close(model(q, d).scores[0], dp[0] @ refined, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [{"embedding_dim": 0}, {"working_dim": 32, "embedding_dim": 64}, {"feedback_docs": 0}, {"iterations": 0}, {"dropout": 1.0}],
)
def test_invalid_model_config_is_refused(kwargs):
    with pytest.raises(ConfigError):
        IMRNNConfig(**kwargs)


def test_invalid_train_config_is_refused():
    with pytest.raises(ConfigError, match="loss must be one of"):
        TrainConfig(loss="pointwise")
    with pytest.raises(ConfigError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ConfigError, match="feedback_rule must be one of"):
        TrainConfig(feedback_rule="lucky")
    for half_life in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ConfigError, match="ema_half_life"):
            TrainConfig(ema_half_life=half_life)
    for weight in (-1.0, float("nan")):
        with pytest.raises(ConfigError, match="relevant_negative_weight must be a finite number"):
            TrainConfig(relevant_negative_weight=weight)
    with pytest.raises(ConfigError, match="use it with loss=margin"):
        TrainConfig(relevant_negative_weight=3.0, loss="listwise")
    with pytest.raises(ConfigError, match="query_balanced averages the margin loss per query.*use it with loss=margin"):
        TrainConfig(query_balanced=True, loss="listwise")


def synthetic_task(seed: int = 0, n_docs: int = 600, dim: int = 32):
    """Relevance lives in a re-weighted space the base cosine ignores; an adapter can learn the weighting."""
    rng = np.random.default_rng(seed)
    docs = unit(rng, n_docs, dim)
    weights = np.ones(dim, np.float32)
    weights[:4] = 6.0
    targets = rng.integers(0, n_docs, size=240)
    queries = docs[targets] * weights + rng.standard_normal((240, dim)).astype(np.float32) * 1.2
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    ids = np.array([f"d{i}" for i in range(n_docs)], dtype=object)
    qids = [f"q{i}" for i in range(240)]
    qrels = {q: {f"d{t}": 1} for q, t in zip(qids, targets)}
    hits = exact_search(queries, docs, 50)
    make = lambda sl, add: ranking_set(qids[sl], queries[sl], hits.indices[sl], qrels, ids, add)  # noqa: E731
    return docs, ids, make(slice(0, 180), 5), make(slice(180, 240), 0)


@pytest.mark.parametrize("loss", ["listwise", "margin"])
def test_training_improves_validation_and_is_reproducible(loss):
    docs, ids, train_set, val_set = synthetic_task()
    config = TrainConfig(loss=loss, epochs=6, batch_size=32, lr=3e-3, candidates=50, seed=7, patience=6,
                         ema_half_life=0.0)  # the raw weights (weight averaging: the test below)
    model_config = IMRNNConfig(embedding_dim=32, hidden_dim=32, dropout=0.0)
    first = train_adapter(model_config, config, docs, ids, train_set, val_set, progress=False)
    assert first.best_validation > first.history[0]["val_nDCG@10"] + 0.02
    second = train_adapter(model_config, config, docs, ids, train_set, val_set, progress=False)
    for name, tensor in first.model.state_dict().items():
        torch.testing.assert_close(tensor, second.model.state_dict()[name], rtol=0, atol=0)


def test_relevant_negatives_weigh_more_in_the_margin_loss_and_weight_one_changes_nothing():
    config = TrainConfig(margin=0.5, hard_negatives=2)
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1], [0.2, 0.6, 0.5, float("-inf")]])  # row 1: padding at the end
    grades = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    # hinges: row 0 positive 0.9 vs the two hardest negatives 0.8, 0.7 -> 0.4, 0.3; row 1 positive 0.6 (grade 2)
    # vs 0.5, 0.2 -> 0.4, 0.1. Marking row 0's 0.7 candidate (weight 4) leaves the others at 1.
    plain = (0.4 + 0.3 + 2 * 0.4 + 2 * 0.1) / (1 + 1 + 2 + 2)
    assert _loss(config, scores, grades).item() == pytest.approx(plain)
    assert _loss(config, scores, grades, torch.ones(2, 4)).item() == _loss(config, scores, grades).item()
    weights = torch.tensor([[1.0, 1.0, 4.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    assert _loss(config, scores, grades, weights).item() == pytest.approx((0.4 + 4 * 0.3 + 2 * 0.4 + 2 * 0.1) / (1 + 4 + 2 + 2))


def test_the_query_balanced_margin_loss_averages_each_query_first():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1], [0.2, 0.6, 0.5, float("-inf")], [0.3, 0.2, 0.1, 0.0]])
    grades = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])  # row 2: no positive
    # the hinges of the test above: row 0 (0.4 + 0.3) / 2, row 1 (2 * 0.4 + 2 * 0.1) / 4; row 2 has no pair
    balanced = _loss(TrainConfig(margin=0.5, hard_negatives=2, query_balanced=True), scores, grades)
    assert balanced.item() == pytest.approx(((0.4 + 0.3) / 2 + (2 * 0.4 + 2 * 0.1) / 4) / 2)
    pooled = _loss(TrainConfig(margin=0.5, hard_negatives=2, query_balanced=False), scores, grades)
    assert pooled.item() == pytest.approx((0.4 + 0.3 + 2 * 0.4 + 2 * 0.1) / (1 + 1 + 2 + 2))
    weights = torch.tensor([[1.0, 1.0, 4.0, 1.0], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    assert _loss(TrainConfig(margin=0.5, hard_negatives=2, query_balanced=True), scores, grades, weights).item() == \
        pytest.approx(((0.4 + 4 * 0.3) / 5 + (2 * 0.4 + 2 * 0.1) / 4) / 2)


def test_training_with_the_query_balanced_loss_runs_and_differs_from_the_pooled_one():
    docs, ids, train_set, val_set = synthetic_task()
    model_config = IMRNNConfig(embedding_dim=32, hidden_dim=32, dropout=0.0)
    base = TrainConfig(epochs=2, batch_size=32, lr=3e-3, candidates=50, seed=7, ema_half_life=0.0, plateau_average=False)
    pooled = train_adapter(model_config, base, docs, ids, train_set, val_set, progress=False)
    balanced = train_adapter(model_config, dataclasses.replace(base, query_balanced=True), docs, ids, train_set, val_set,
                             progress=False)
    assert pooled.history[1]["loss"] != balanced.history[1]["loss"]


def test_relevant_elsewhere_marks_candidates_relevant_to_any_training_query():
    docs, ids, train_set, _ = synthetic_task()
    marked = relevant_elsewhere(train_set, ids)
    relevant = {d for judged in train_set.qrels.values() for d, r in judged.items() if r > 0}
    for row, columns in enumerate(train_set.candidates):
        for column, doc in enumerate(columns):
            assert marked[row, column] == (doc >= 0 and ids[doc] in relevant)
    assert marked.any() and not marked.all()


def test_training_with_relevant_negative_weight_runs_and_differs_from_the_plain_margin_loss():
    docs, ids, train_set, val_set = synthetic_task()
    model_config = IMRNNConfig(embedding_dim=32, hidden_dim=32, dropout=0.0)
    base = TrainConfig(epochs=2, batch_size=32, lr=3e-3, candidates=50, seed=7, ema_half_life=0.0, plateau_average=False)
    plain = train_adapter(model_config, base, docs, ids, train_set, val_set, progress=False)
    weighted = train_adapter(model_config, dataclasses.replace(base, relevant_negative_weight=3.0), docs, ids, train_set,
                             val_set, progress=False)
    assert plain.history[1]["loss"] != weighted.history[1]["loss"]
    assert any(not torch.equal(tensor, weighted.model.state_dict()[name]) for name, tensor in plain.model.state_dict().items())


def test_a_frozen_projection_stays_the_identity_while_the_adapters_train():
    docs, ids, train_set, val_set = synthetic_task()
    config = TrainConfig(epochs=2, batch_size=32, lr=3e-3, candidates=50, seed=7, ema_half_life=0.0, plateau_average=False,
                         patience=5)
    trained = train_adapter(IMRNNConfig(embedding_dim=32, hidden_dim=32, dropout=0.0, train_projection=False), config,
                            docs, ids, train_set, val_set, progress=False)
    assert trained.best_epoch > 0  # something was kept beyond the untrained start
    assert torch.equal(trained.model.projection.weight, torch.eye(32))
    assert trained.model.query_adapter.out.weight.abs().sum() > 0
    moving = train_adapter(IMRNNConfig(embedding_dim=32, hidden_dim=32, dropout=0.0), config, docs, ids, train_set, val_set,
                           progress=False)
    assert not torch.equal(moving.model.projection.weight, torch.eye(32))


def interrupted_and_resumed(model_config, config, docs, ids, train_set, val_set, state_dir, on_stop=lambda state: None):
    """`train_adapter` interrupted after epoch 3 (its state saved in `state_dir`), then resumed to the end."""
    def stop_at_epoch_3(record: dict) -> None:
        if record["epoch"] == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train_adapter(model_config, config, docs, ids, train_set, val_set, progress=False, on_epoch=stop_at_epoch_3,
                      state_dir=state_dir)
    on_stop(state_dir)
    return train_adapter(model_config, config, docs, ids, train_set, val_set, progress=False, state_dir=state_dir, resume=True)


def test_weight_averaging_keeps_the_moving_average_and_resumes_exactly(tmp_path):
    docs, ids, train_set, val_set = synthetic_task()
    model_config = IMRNNConfig(embedding_dim=32, hidden_dim=32, dropout=0.1)
    config = TrainConfig(epochs=6, batch_size=32, lr=3e-3, candidates=50, seed=7, patience=6, ema_half_life=1.0)
    averaged = train_adapter(model_config, config, docs, ids, train_set, val_set, progress=False)
    assert averaged.best_validation > averaged.history[0]["val_nDCG@10"] + 0.01
    raw = train_adapter(model_config, TrainConfig(**{**config.to_dict(), "ema_half_life": 0.0}), docs, ids, train_set,
                        val_set, progress=False)
    assert [r["loss"] for r in raw.history] == [r["loss"] for r in averaged.history]  # the same optimisation ...
    assert any(not torch.equal(a, b) for a, b in zip(raw.model.state_dict().values(), averaged.model.state_dict().values()))

    resumed = interrupted_and_resumed(model_config, config, docs, ids, train_set, val_set, tmp_path / "state")
    assert resumed.history == averaged.history
    for name, tensor in averaged.model.state_dict().items():  # ... but the average is what is kept, and it resumes
        torch.testing.assert_close(tensor, resumed.model.state_dict()[name], rtol=0, atol=0)


def test_a_training_state_without_its_weight_average_is_refused_with_a_clear_error(tmp_path):
    docs, ids, train_set, val_set = synthetic_task()
    model_config = IMRNNConfig(embedding_dim=32, hidden_dim=32, dropout=0.0)
    config = TrainConfig(epochs=2, batch_size=32, lr=3e-3, candidates=50, seed=7, patience=6, ema_half_life=1.0)
    train_adapter(model_config, config, docs, ids, train_set, val_set, progress=False, state_dir=tmp_path / "state")
    (saved,) = (tmp_path / "state").glob("epoch-*/state.safetensors")
    save_file({k: v for k, v in load_file(str(saved)).items() if not k.startswith("averaged/")}, str(saved))
    with pytest.raises(CheckpointError, match="does not fit this model"):
        train_adapter(model_config, config, docs, ids, train_set, val_set, progress=False, state_dir=tmp_path / "state",
                      resume=True)


def test_plateau_average_is_the_mean_of_the_epochs_validation_cannot_tell_from_the_best():
    rng = np.random.default_rng(0)
    best = rng.uniform(0.5, 1.0, 200)
    tied = best - rng.normal(0.0, 0.05, 200)  # differs per query, not on average: within one standard error
    worse = best - 0.2
    snapshots = [Snapshot(e, {"w": torch.full((2, 2), float(e))}, v) for e, v in ((0, worse), (1, tied), (2, best), (3, tied))]
    weights, epochs = plateau_average(snapshots, best_epoch=2)
    assert epochs == [1, 2, 3]
    torch.testing.assert_close(weights["w"], torch.full((2, 2), 2.0))
    weights, epochs = plateau_average(snapshots[:1], best_epoch=0)  # nothing trained better: the start alone
    assert epochs == [0] and torch.equal(weights["w"], torch.zeros(2, 2))


def test_plateau_averaging_keeps_the_mean_of_its_epochs_resumes_exactly_and_records_them(tmp_path):
    docs, ids, train_set, val_set = synthetic_task()
    model_config = IMRNNConfig(embedding_dim=32, hidden_dim=32, dropout=0.1)
    config = TrainConfig(epochs=12, batch_size=32, lr=1e-2, candidates=50, seed=7, patience=12)
    assert config.plateau_average  # the default
    averaged = train_adapter(model_config, config, docs, ids, train_set, val_set, progress=False)
    single = train_adapter(model_config, TrainConfig(**{**config.to_dict(), "plateau_average": False}), docs, ids,
                           train_set, val_set, progress=False)
    assert single.averaged_epochs == [single.best_epoch] and averaged.best_epoch == single.best_epoch
    assert len(averaged.averaged_epochs) > 1 and averaged.best_epoch in averaged.averaged_epochs
    assert averaged.best_validation > averaged.history[0]["val_nDCG@10"] + 0.01
    assert any(not torch.equal(a, b) for a, b in zip(single.model.state_dict().values(), averaged.model.state_dict().values()))

    saved = []
    resumed = interrupted_and_resumed(model_config, config, docs, ids, train_set, val_set, tmp_path / "state",
                                      on_stop=lambda state: saved.extend(sorted(p.name for p in (state / "snapshots").iterdir())))
    assert saved == [f"epoch-0000{e}.safetensors" for e in range(4)]
    assert resumed.averaged_epochs == averaged.averaged_epochs and resumed.history == averaged.history
    for name, tensor in averaged.model.state_dict().items():
        torch.testing.assert_close(tensor, resumed.model.state_dict()[name], rtol=0, atol=0)
    train_adapter(model_config, config, docs, ids, train_set, val_set, progress=False, state_dir=tmp_path / "state")
    assert len(list((tmp_path / "state" / "snapshots").iterdir())) == len(averaged.history)  # a fresh run starts over


def test_a_training_state_with_a_lost_snapshot_is_refused_with_a_clear_error(tmp_path):
    docs, ids, train_set, val_set = synthetic_task()
    model_config = IMRNNConfig(embedding_dim=32, hidden_dim=32, dropout=0.0)
    config = TrainConfig(epochs=2, batch_size=32, lr=3e-3, candidates=50, seed=7, patience=6)
    train_adapter(model_config, config, docs, ids, train_set, val_set, progress=False, state_dir=tmp_path / "state")
    (tmp_path / "state" / "snapshots" / "epoch-00001.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="snapshot of epoch 1"):
        train_adapter(model_config, config, docs, ids, train_set, val_set, progress=False, state_dir=tmp_path / "state",
                      resume=True)


def test_a_very_long_averaging_half_life_stays_at_the_untrained_start():
    docs, ids, train_set, val_set = synthetic_task()
    model_config = IMRNNConfig(embedding_dim=32, hidden_dim=32, dropout=0.0)
    config = TrainConfig(epochs=3, batch_size=32, lr=3e-3, candidates=50, seed=7, patience=6, ema_half_life=1e9)
    result = train_adapter(model_config, config, docs, ids, train_set, val_set, progress=False)
    torch.manual_seed(7)
    start = IMRNN(model_config).eval()
    for name, tensor in start.state_dict().items():
        torch.testing.assert_close(result.model.state_dict()[name], tensor, rtol=0, atol=1e-6)


def test_checkpoint_round_trip_gives_identical_scores(tmp_path):
    rng = np.random.default_rng(3)
    model = randomised(IMRNN(IMRNNConfig(embedding_dim=16, hidden_dim=8)))
    save_checkpoint(Checkpoint(model, EncoderConfig(), TrainConfig(), {"seed": 1}), tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt")
    q, d = torch.from_numpy(unit(rng, 4, 16)), torch.from_numpy(unit(rng, 4, 9, 16))
    torch.testing.assert_close(loaded.model(q, d).scores, model(q, d).scores, rtol=0, atol=0)
    assert loaded.train_config == TrainConfig() and loaded.metadata["seed"] == 1
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["encoder"]["dimension"] == 16


def test_checkpoint_refuses_mismatched_encoder_dimension(tmp_path):
    save_checkpoint(Checkpoint(IMRNN(IMRNNConfig(embedding_dim=16, hidden_dim=8)), EncoderConfig()), tmp_path / "c")
    with pytest.raises(CheckpointError, match=r"expects 16-d embeddings but the encoder gives 384-d"):
        load_checkpoint(tmp_path / "c", expected_dim=384)


@pytest.mark.parametrize("tamper", ["nan", "shape", "extra", "missing"])
def test_tampered_checkpoint_is_refused(tmp_path, tamper):
    folder = save_checkpoint(Checkpoint(IMRNN(IMRNNConfig(embedding_dim=16, hidden_dim=8)), EncoderConfig()), tmp_path / "c")
    state = load_file(str(folder / "model.safetensors"))
    if tamper == "nan":
        state["projection.weight"][0, 0] = float("nan")
    elif tamper == "shape":
        state["projection.weight"] = torch.zeros(16, 15)
    elif tamper == "extra":
        state["backdoor"] = torch.zeros(1)
    else:
        del state["doc_adapter.out.bias"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match={"nan": "NaN", "shape": "shape", "extra": "unexpected", "missing": "missing"}[tamper]):
        load_checkpoint(folder)


def test_incomplete_checkpoint_folder_is_refused(tmp_path):
    folder = save_checkpoint(Checkpoint(IMRNN(IMRNNConfig(embedding_dim=16, hidden_dim=8)), EncoderConfig()), tmp_path / "c")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        load_checkpoint(folder)


def test_novelty_gate_uses_adapter_near_training_queries_and_frozen_scores_far_from_them(tmp_path):
    rng = np.random.default_rng(4)
    model = randomised(IMRNN(IMRNNConfig(embedding_dim=16, hidden_dim=8, dropout=0.0)))
    memory = torch.zeros(1, 16)
    memory[0, 0] = 1.0
    gated = model.with_gate(memory, threshold=0.5, width=0.02)
    near = torch.zeros(1, 16)
    near[0, 0] = 1.0
    far = torch.zeros(1, 16)
    far[0, 1] = 1.0
    d = torch.from_numpy(unit(rng, 1, 7, 16))
    torch.testing.assert_close(gated(near, d).scores, model(near, d).scores, atol=1e-6, rtol=0)
    torch.testing.assert_close(gated(far, d).scores[0], d[0] @ far[0], atol=1e-6, rtol=0)
    assert gated(near, d).gate.item() > 0.999 and gated(far, d).gate.item() < 1e-6
    save_checkpoint(Checkpoint(gated, EncoderConfig()), tmp_path / "g")
    loaded = load_checkpoint(tmp_path / "g")
    assert loaded.model_config.gate_threshold == 0.5 and loaded.model_config.memory_size == 1
    torch.testing.assert_close(loaded.model(far, d).scores, gated(far, d).scores, rtol=0, atol=0)


def test_gate_config_must_be_complete():
    with pytest.raises(ConfigError, match="novelty gate"):
        IMRNNConfig(memory_size=3)


# --------------------------------------------------------------------------- hostile checkpoint files


class _Payload:
    """Unpickling this would create a file: proof that a loader executed code from the checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _small_checkpoint(tmp_path):
    return save_checkpoint(Checkpoint(IMRNN(IMRNNConfig(embedding_dim=16, hidden_dim=8)), EncoderConfig(), TrainConfig()), tmp_path / "c")


@pytest.mark.parametrize("damage", ["truncated", "header_only", "empty", "pickle", "torch_save", "inf", "float64"])
def test_damaged_or_foreign_weights_are_refused_without_unpickling(tmp_path, damage):
    import pickle

    folder = _small_checkpoint(tmp_path)
    weights = folder / "model.safetensors"
    marker = tmp_path / "code-was-executed"
    raw = weights.read_bytes()
    if damage == "truncated":
        weights.write_bytes(raw[: len(raw) - 100])
    elif damage == "header_only":
        weights.write_bytes(raw[:8])
    elif damage == "empty":
        weights.write_bytes(b"")
    elif damage == "pickle":
        weights.write_bytes(pickle.dumps({"projection.weight": _Payload(marker)}))
    elif damage == "torch_save":
        torch.save({"projection.weight": torch.zeros(16, 16), "x": _Payload(marker)}, weights)
    else:
        state = load_file(str(weights))
        if damage == "inf":
            state["query_adapter.out.bias"][3] = float("inf")
        else:
            state["projection.weight"] = state["projection.weight"].double()
        save_file(state, str(weights))
    match = {"inf": "NaN or Inf", "float64": "dtype F64, expected F32"}.get(damage, "not a readable safetensors file")
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(folder)
    assert not marker.exists()


@pytest.mark.parametrize("edit, fragment", [
    (lambda p: p["model_config"].update(embedding_dim="16"), "embedding_dim must be int, got str"),
    (lambda p: p["model_config"].update(embedding_dim=16.5), "embedding_dim must be int, got float"),
    (lambda p: p["model_config"].update(identity_init="yes"), "identity_init must be bool"),
    (lambda p: p["model_config"].update(feedback_docs=True), "feedback_docs must be int, got bool"),
    (lambda p: p["model_config"].update(dropout=None), "dropout must be float"),
    (lambda p: p["model_config"].update(hidden_dim=10**9), "has shape"),  # checked from the header: no huge allocation
    (lambda p: p["model_config"].update(surprise=1), "Unknown IMRNNConfig fields"),
    (lambda p: p.update(model_config=[16, 8]), '"model_config" must be a JSON object'),
    (lambda p: p.update(encoder="minilm"), '"encoder" must be a JSON object'),
    (lambda p: p["encoder"].update(query_prefix=5), "query_prefix must be str"),
    (lambda p: p["encoder"].update(max_length="512"), "max_length must be int or None"),
    (lambda p: p["train_config"].update(lr=float("nan")), "lr must be float, got float nan"),
    (lambda p: p["train_config"].update(epochs="30"), "epochs must be int"),
    (lambda p: p.update(format="1"), "checkpoint format '1'"),
])
def test_config_json_with_wrong_types_is_refused(tmp_path, edit, fragment):
    folder = _small_checkpoint(tmp_path)
    payload = json.loads((folder / "config.json").read_text())
    edit(payload)
    (folder / "config.json").write_text(json.dumps(payload))
    with pytest.raises(CheckpointError, match=re.escape(fragment)):
        load_checkpoint(folder)


@pytest.mark.parametrize("raw", [b"", b"[1, 2]", b'{"format": 1', b"[" * 100_000, b'{"format": 1, "x": "\xff"}'])
def test_unreadable_config_json_is_refused(tmp_path, raw):
    folder = _small_checkpoint(tmp_path)
    (folder / "config.json").write_bytes(raw)
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(folder)


def test_train_config_refuses_non_finite_numbers():
    with pytest.raises(ConfigError, match="finite"):
        TrainConfig(lr=float("nan"))
    with pytest.raises(ConfigError, match="finite"):
        TrainConfig(temperature=float("inf"))


@pytest.mark.parametrize("kwargs", [{}, {"iterations": 2}, {"use_query_adapter": False}, {"use_doc_adapter": False}, {"feedback_docs": 50}])
@pytest.mark.parametrize("chunk_bytes", [1, 1 << 20])  # one query per chunk, and all queries in one chunk
def test_fast_inference_scores_equal_forward(kwargs, chunk_bytes, monkeypatch):
    monkeypatch.setattr(model_module, "_CHUNK_BYTES", chunk_bytes)
    rng = np.random.default_rng(5)
    model = randomised(IMRNN(IMRNNConfig(embedding_dim=32, hidden_dim=8, dropout=0.0, identity_init=False, working_dim=16, **kwargs)))
    model = model.with_gate(torch.from_numpy(unit(rng, 5, 32)), threshold=0.2)
    corpus = torch.from_numpy(rng.normal(size=(20, 32)).astype(np.float32))  # not normalised: base must be the cosine
    q = torch.from_numpy(rng.normal(size=(4, 32)).astype(np.float32))
    rows = torch.from_numpy(rng.integers(0, 20, size=(4, 9)))
    mask = torch.ones(4, 9, dtype=torch.bool)
    mask[1, 6:] = False
    slow = model(q, corpus[rows], mask)
    for scores, base in (model.score_embeddings(q, corpus[rows], mask),
                         model.score_rows(q, rows, mask, model.cache_corpus(corpus.numpy()))):
        torch.testing.assert_close(scores, slow.scores.detach(), atol=1e-5, rtol=0)
        torch.testing.assert_close(base, slow.base_scores.detach(), atol=1e-6, rtol=0)
        assert torch.isneginf(scores[1, 6:]).all() and torch.isneginf(base[1, 6:]).all()


def test_fast_inference_falls_back_to_the_checked_forward_on_bad_input():
    model = IMRNN(IMRNNConfig(embedding_dim=8, hidden_dim=4)).eval()
    rng = np.random.default_rng(6)
    q, c = torch.from_numpy(unit(rng, 3, 8)), torch.from_numpy(unit(rng, 3, 5, 8))
    c[2, 4, 1] = float("inf")
    with pytest.raises(ConfigError, match=r"candidate embeddings hold NaN or Inf values \(first at index \(2, 4\)\)"):
        model.score_embeddings(q, c)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2, 4] = False  # masked padding may hold anything
    assert torch.isfinite(model.score_embeddings(q, c, mask)[0][:, :4]).all()
    with pytest.raises(ConfigError, match="dimension 8/7"):
        model.score_embeddings(q, c[..., :7])
