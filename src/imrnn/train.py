"""Training the adapters from cached embeddings: losses, AdamW, seeds, early stopping on validation nDCG@10."""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import GATE_RULES, IMRNNConfig, TrainConfig
from .candidates import RankingSet
from .errors import CheckpointError, ConfigError
from .evaluate import clearly_better, hits_to_run, per_query
from .model import IMRNN
from .scoring import blend, frozen_scores, nearest_similarity, novelty_gate, score_candidates
from .resume import (Snapshot, TrainState, capture_rng, clear_state, load_snapshots, load_state, restore_rng, save_snapshot,
                     save_state, training_key)

@dataclass
class TrainResult:
    model: IMRNN
    best_epoch: int
    best_validation: float
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    gate: dict | None = None
    recipe: dict = field(default_factory=dict)  # what was selected on which queries (feedback, training or not)
    averaged_epochs: list[int] = field(default_factory=list)  # the epochs whose mean weights were kept
    members: list["TrainResult"] = field(default_factory=list)  # a weight soup's members (`weight_soup`)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def validation_values(model: IMRNN, data: RankingSet, doc_embs: np.ndarray | torch.Tensor, doc_ids: np.ndarray) -> np.ndarray:
    """Per-query nDCG@10 of `model` re-ranking `data`'s candidates (aligned with `evaluated_queries(data.qrels)`)."""
    scores = score_candidates(model, data.query_embs, doc_embs, data.candidates)
    return per_query(hits_to_run(data.query_ids, doc_ids, data.candidates, scores), data.qrels, ["nDCG@10"])["nDCG@10"]


def validation_ndcg(model: IMRNN, data: RankingSet, doc_embs: np.ndarray | torch.Tensor, doc_ids: np.ndarray) -> float:
    """Mean nDCG@10 of `model` re-ranking `data`'s candidates: what early stopping maximises."""
    values = validation_values(model, data, doc_embs, doc_ids)
    return float(values.mean()) if len(values) else float("nan")


def keep_if_clearly_better(trained: IMRNN, start: IMRNN, validation: RankingSet, doc_embs: np.ndarray | torch.Tensor,
                           doc_ids: np.ndarray) -> tuple[IMRNN, dict]:
    """The trained model if it is clearly better than its untrained starting point (the tuned feedback, or the
    frozen retriever) on validation, else the starting point: training never makes things worse where validation
    cannot show it helps (few or noisy validation queries)."""
    trained_values = validation_values(trained, validation, doc_embs, doc_ids)
    start_values = validation_values(start, validation, doc_embs, doc_ids)
    keep = clearly_better(trained_values, start_values)
    report = {"kept": keep, "rule": "trained only if better than its starting point by more than one standard error",
              "validation_nDCG@10": {"trained": float(trained_values.mean()), "start": float(start_values.mean())}}
    return (trained if keep else start), report


def relevant_elsewhere(train_set: RankingSet, doc_ids: np.ndarray) -> np.ndarray:
    """`[Q, K]` bool: the candidate is relevant to some training query (for its own query it is a positive, so among
    the negatives this marks the documents relevant to *other* training queries); False at padding."""
    relevant = [d for docs in train_set.qrels.values() for d, r in docs.items() if r > 0]
    marked = np.isin(np.asarray(doc_ids), relevant)
    return np.where(train_set.candidates >= 0, marked[np.maximum(train_set.candidates, 0)], False)


def _loss(config: TrainConfig, scores: torch.Tensor, grades: torch.Tensor,
          negative_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Listwise: cross-entropy to the grade distribution over the candidates; margin: pairwise hinge, each pair
    weighted by the positive's grade and, if given, by the negative's `negative_weights` `[B, K]`, averaged over the
    batch's pairs (`query_balanced`: over each query's pairs, then over the queries)."""
    positive = grades > 0
    valid_rows = positive.any(1)
    scores, grades, positive = scores[valid_rows], grades[valid_rows], positive[valid_rows]
    if config.loss == "listwise":
        target = grades / grades.sum(1, keepdim=True)
        log_probs = F.log_softmax(scores / config.temperature, dim=1).masked_fill(~positive, 0.0)
        return -(target * log_probs).sum(1).mean()
    finite = torch.isfinite(scores)
    negative_scores = scores.masked_fill(positive | ~finite, float("-inf"))
    hardest, hardest_columns = negative_scores.topk(min(config.hard_negatives, scores.shape[1]), dim=1)  # [B, n]
    pos_scores = scores.masked_fill(~positive, float("nan"))  # [B, K]
    hinge = F.relu(config.margin - pos_scores[:, :, None] + hardest[:, None, :])  # [B, K, n]
    usable = positive[:, :, None] & torch.isfinite(hardest)[:, None, :]
    weight = grades[:, :, None].expand_as(hinge) * usable
    if negative_weights is not None:
        weight = weight * negative_weights[valid_rows].gather(1, hardest_columns)[:, None, :]
    weighted = torch.nan_to_num(hinge) * weight
    if config.query_balanced:
        per_query = weighted.sum((1, 2)) / weight.sum((1, 2)).clamp(min=1.0)
        return per_query.sum() / (weight.sum((1, 2)) > 0).sum().clamp(min=1)
    return weighted.sum() / weight.sum().clamp(min=1.0)


def train_adapter(
    model_config: IMRNNConfig,
    config: TrainConfig,
    doc_embs: np.ndarray,
    doc_ids: np.ndarray,
    train_set: RankingSet,
    validation_set: RankingSet,
    device: str = "cpu",
    progress: bool = True,
    on_epoch: Callable[[dict], None] | None = None,
    state_dir: Path | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train on `train_set`, keep the epoch with the best validation nDCG@10 (with `plateau_average`, the mean of the
    epochs validation cannot tell from it), stop after `patience` epochs without gain.

    With `state_dir`, the whole training state (model, optimiser, RNG streams, best epoch, history) is saved there
    atomically after every epoch; with `resume`, training continues from the last saved epoch and ends with the
    same weights as an uninterrupted run (a state saved for other configs or data is refused: CheckpointError).
    """
    seed_everything(config.seed)
    start = time.perf_counter()
    model = IMRNN(model_config).to(device)
    docs = torch.from_numpy(np.array(doc_embs, dtype=np.float32))  # a writable in-RAM copy of the (memory-mapped) corpus
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    queries = torch.from_numpy(np.array(train_set.query_embs, dtype=np.float32))
    candidates = torch.as_tensor(train_set.candidates)
    grades = torch.as_tensor(train_set.grades)
    negative_weights = (1.0 + config.relevant_negative_weight * torch.from_numpy(relevant_elsewhere(train_set, doc_ids)).float()
                        if config.relevant_negative_weight else None)

    key = training_key(model_config, config, doc_embs, doc_ids, train_set, validation_set) if state_dir is not None else ""
    restored = load_state(state_dir, key) if state_dir is not None and resume else None
    averaged = _MovingAverage(model, config.ema_half_life, -(-len(queries) // config.batch_size))
    snapshots: list[Snapshot] = []

    def keep_snapshot(epoch: int, weights: dict[str, torch.Tensor], values: np.ndarray) -> None:
        if config.plateau_average:
            snapshots.append(Snapshot(epoch, copy.deepcopy(weights), values))
            if state_dir is not None:
                save_snapshot(state_dir, snapshots[-1])

    if restored is None:
        if state_dir is not None:
            clear_state(state_dir)
        start_values = validation_values(model, validation_set, docs, doc_ids)
        best_state, best_score, best_epoch = copy.deepcopy(model.state_dict()), float(start_values.mean()), 0
        keep_snapshot(0, best_state, start_values)
        history = [{"epoch": 0, "loss": None, "val_nDCG@10": best_score}]
        stale, first_epoch = 0, 1
    else:  # continue exactly where the saved epoch ended
        try:
            model.load_state_dict(restored.model)
            if averaged.model is not None:
                averaged.model.load_state_dict(restored.averaged)
        except RuntimeError as err:  # tensors missing or of another shape: a damaged state
            raise CheckpointError(f"The training state in {state_dir} does not fit this model ({str(err).splitlines()[0]}). "
                                  f"Delete {state_dir} (or train without --resume) to start over.") from None
        optimiser.load_state_dict({**optimiser.state_dict(), "state": restored.optimiser})
        restore_rng(restored.rng, generator, device)
        best_state, best_score, best_epoch, stale = restored.best, restored.best_score, restored.best_epoch, restored.stale
        history, first_epoch = restored.history, restored.epoch + 1
        if config.plateau_average:
            snapshots[:] = load_snapshots(state_dir, restored.epoch)
    last_epoch = config.epochs if stale < config.patience else first_epoch - 1
    bar = tqdm(range(first_epoch, last_epoch + 1), desc="training", disable=not progress, dynamic_ncols=True)
    for epoch in bar:
        model.train()
        order = torch.randperm(len(queries), generator=generator)
        total, batches = 0.0, 0
        for batch in order.split(config.batch_size):
            rows = candidates[batch]
            mask = rows >= 0
            scored = model(queries[batch].to(device), docs[rows.clamp(min=0)].to(device), mask.to(device))
            loss = _loss(config, scored.scores, grades[batch].to(device),
                         None if negative_weights is None else negative_weights[batch].to(device))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            averaged.update(model)
            total, batches = total + loss.item(), batches + 1
        kept = averaged.model if averaged.model is not None else model  # what this epoch validates and may keep
        values = validation_values(kept, validation_set, docs, doc_ids)
        val = float(values.mean())
        keep_snapshot(epoch, kept.state_dict(), values)
        record = {"epoch": epoch, "loss": total / max(batches, 1), "val_nDCG@10": val}
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
        if val > best_score + 1e-6:
            best_state, best_score, best_epoch, stale = copy.deepcopy(kept.state_dict()), val, epoch, 0
        else:
            stale += 1
        bar.set_postfix(loss=f"{record['loss']:.4f}", val=f"{val:.4f}", best=f"{best_score:.4f}@{best_epoch}")
        if state_dir is not None:
            save_state(state_dir, TrainState(epoch, best_epoch, best_score, stale, history, model.state_dict(), best_state,
                                             optimiser.state_dict()["state"], capture_rng(generator, device),
                                             averaged.model.state_dict() if averaged.model is not None else {}), key)
        if stale >= config.patience:
            break
    bar.close()
    model.load_state_dict(best_state)
    averaged_epochs = [best_epoch]
    if config.plateau_average:
        mean_model, epochs = _plateau_model(model, snapshots, best_epoch, state_dir)
        mean_score = validation_ndcg(mean_model, validation_set, docs, doc_ids)
        if mean_score >= history[0]["val_nDCG@10"]:  # never below the untrained start (the tuned feedback) on validation
            model, best_score, averaged_epochs = mean_model, mean_score, epochs
    model.eval()
    gate = None
    if config.novelty_gate:
        model, gate = calibrate_gate(model, train_set.query_embs, validation_set, docs, doc_ids, config.gate_rule)
    return TrainResult(model, best_epoch, best_score, history, time.perf_counter() - start, gate,
                       averaged_epochs=averaged_epochs)


def weight_soup(members: Sequence[TrainResult]) -> TrainResult:
    """One adapter holding the mean weights of `members`, adapters trained from the same initialisation (the same
    seed) with different validation queries; their facts stay in `members`. The soup's `best_epoch` is the latest of
    theirs, its `best_validation` the mean of theirs (each on its own validation queries), its `history` theirs,
    each record marked with its member's index."""
    states = [member.model.state_dict() for member in members]
    mean = {name: torch.stack([state[name].float() for state in states]).mean(0).to(tensor.dtype)
            for name, tensor in states[0].items()}
    model = copy.deepcopy(members[0].model)
    model.load_state_dict(mean)
    return TrainResult(model.eval(), max(m.best_epoch for m in members), float(np.mean([m.best_validation for m in members])),
                       [{"member": i, **record} for i, m in enumerate(members) for record in m.history],
                       sum(m.seconds for m in members), members=list(members))


def _plateau_model(model: IMRNN, snapshots: Sequence[Snapshot], best_epoch: int,
                   state_dir: Path | None) -> tuple[IMRNN, list[int]]:
    """A copy of `model` holding `plateau_average`'s weights, and the epochs averaged."""
    weights, epochs = plateau_average(snapshots, best_epoch)
    averaged = copy.deepcopy(model)
    try:
        averaged.load_state_dict(weights)
    except RuntimeError as err:  # a resumed snapshot of another shape
        raise CheckpointError(f"The training state in {state_dir} does not fit this model ({str(err).splitlines()[0]}). "
                              f"Delete {state_dir} (or train without --resume) to start over.") from None
    return averaged, epochs


def plateau_average(snapshots: Sequence[Snapshot], best_epoch: int) -> tuple[dict[str, torch.Tensor], list[int]]:
    """The mean weights of the epochs validation cannot tell from the best (the best does not beat them by more
    than one paired standard error), and those epochs.

    Early stopping's best epoch is an argmax over a plateau: a tiny change (bf16 instead of fp32 embeddings, another
    thread count) moves it along the plateau, and with it the test score. The plateau's mean moves far less under
    such changes and, as in stochastic weight averaging, can generalise better than any one of its epochs."""
    best = next(s.validation for s in snapshots if s.epoch == best_epoch)
    plateau = [s for s in snapshots if not clearly_better(best, s.validation)]
    mean = {name: torch.stack([s.weights[name].float() for s in plateau]).mean(0).to(tensor.dtype)
            for name, tensor in plateau[0].weights.items()}
    return mean, [s.epoch for s in plateau]


class _MovingAverage:
    """An exponential moving average of a model's weights, updated after every optimiser step with the decay that
    halves a step's weight after `half_life_epochs` epochs (so its smoothing does not depend on the training set's size).
    It starts at the untrained model (the tuned feedback or the frozen retriever), which it shrinks the training
    trajectory towards; `model` is None when averaging is off (half-life 0)."""

    def __init__(self, model: IMRNN, half_life_epochs: float, steps_per_epoch: int) -> None:
        self.model = copy.deepcopy(model).eval() if half_life_epochs > 0 else None
        self.weight = 1.0 - 0.5 ** (1.0 / (half_life_epochs * steps_per_epoch)) if half_life_epochs > 0 else 0.0

    @torch.no_grad()
    def update(self, model: IMRNN) -> None:
        if self.model is not None:
            for average, current in zip(self.model.parameters(), model.parameters()):
                average.lerp_(current, self.weight)


GATE_THRESHOLDS = tuple(round(0.30 + 0.05 * i, 2) for i in range(14))  # 0.30 ... 0.95


def calibrate_gate(model: IMRNN, memory: np.ndarray, validation: RankingSet, doc_embs: torch.Tensor, doc_ids: np.ndarray,
                   rule: str = "abstain", thresholds: Sequence[float] = GATE_THRESHOLDS) -> tuple[IMRNN, dict]:
    """Choose the novelty-gate threshold (or no gate) on validation nDCG@10 by `rule`.

    Queries close to a training query keep the adapted score, novel ones fall back towards the frozen retriever.
    Rules, given the per-query validation nDCG@10 of "no gate" and of each threshold:
    * `abstain`: the best threshold, but only if it beats "no gate" by more than one paired standard error; when
      validation cannot tell them apart, no gate (a small validation set then never switches the adapter off);
    * `one-standard-error`: the most conservative (highest) threshold within one paired standard error of the best
      option (the rule of earlier versions: with few validation queries it always picks the most conservative);
    * `best`: the best mean, no gate on ties.
    """
    if rule not in GATE_RULES:
        raise ConfigError(f"gate rule must be one of {GATE_RULES}, got {rule!r}.")
    adapted = torch.from_numpy(score_candidates(model, validation.query_embs, doc_embs, validation.candidates))
    base = torch.from_numpy(frozen_scores(validation.query_embs, np.asarray(doc_embs), validation.candidates))
    queries = torch.from_numpy(np.array(validation.query_embs, dtype=np.float32))
    nearest = nearest_similarity(queries, F.normalize(torch.from_numpy(np.array(memory, np.float32)), dim=-1))

    def ndcg(scores: torch.Tensor) -> np.ndarray:
        run = hits_to_run(validation.query_ids, doc_ids, validation.candidates, scores.numpy())
        return per_query(run, validation.qrels, ["nDCG@10"])["nDCG@10"]

    width = model.config.gate_width
    per_option: dict[str, np.ndarray] = {"none": ndcg(adapted)}
    for threshold in thresholds:
        per_option[str(threshold)] = ndcg(blend(novelty_gate(nearest, threshold, width), adapted, base))
    best = max(per_option, key=lambda name: per_option[name].mean())  # the first (no gate) on ties
    chosen = best
    if rule == "one-standard-error":
        for name, values in per_option.items():  # ordered from least to most conservative
            if not clearly_better(per_option[best], values):
                chosen = name
    elif rule == "abstain" and best != "none" and not clearly_better(per_option[best], per_option["none"]):
        chosen = "none"
    report = {"threshold": None if chosen == "none" else float(chosen), "width": width, "rule": rule,
              "validation_nDCG@10": {name: float(v.mean()) for name, v in per_option.items()}}
    if chosen == "none":
        return model, report
    return model.with_gate(torch.from_numpy(np.array(memory, np.float32)), float(chosen)), report
