"""Training the adapters from cached embeddings: losses, AdamW, seeds, early stopping on validation nDCG@10."""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import IMRNNConfig, TrainConfig
from .data import Qrels
from .evaluate import evaluate_run, hits_to_run
from .model import IMRNN

@dataclass
class RankingSet:
    """A query set as arrays: query embeddings, candidate corpus rows `(Q, K)` and their grades."""

    query_ids: list[str]
    query_embs: np.ndarray
    candidates: np.ndarray
    grades: np.ndarray
    qrels: Qrels


@dataclass
class TrainResult:
    model: IMRNN
    best_epoch: int
    best_validation: float
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def score_candidates(
    model: IMRNN, query_embs: np.ndarray, doc_embs: np.ndarray | torch.Tensor, candidates: np.ndarray, batch_size: int = 512
) -> np.ndarray:
    """Adapted scores `(Q, K)` for candidate rows `(Q, K)` (-1 = padding -> -inf), in batches, no grad."""
    model.eval()
    device = next(model.parameters()).device
    docs = torch.as_tensor(np.asarray(doc_embs, dtype=np.float32)) if not isinstance(doc_embs, torch.Tensor) else doc_embs
    out = np.empty(candidates.shape, dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(candidates), batch_size):
            rows = torch.as_tensor(candidates[start : start + batch_size])
            mask = rows >= 0
            cands = docs[rows.clamp(min=0)].to(device)
            queries = torch.as_tensor(np.asarray(query_embs[start : start + batch_size], dtype=np.float32)).to(device)
            out[start : start + len(rows)] = model(queries, cands, mask.to(device)).scores.float().cpu().numpy()
    return out


def rerank(candidates: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Re-order each row of candidates by score (descending; ties keep the first-stage order)."""
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(candidates, order, 1), np.take_along_axis(scores, order, 1)


def validation_ndcg(model: IMRNN, data: RankingSet, doc_embs: torch.Tensor, doc_ids: np.ndarray) -> float:
    scores = score_candidates(model, data.query_embs, doc_embs, data.candidates)
    run = hits_to_run(data.query_ids, doc_ids, data.candidates, scores)
    return evaluate_run(run, data.qrels, ["nDCG@10"])["nDCG@10"]


def _loss(config: TrainConfig, scores: torch.Tensor, grades: torch.Tensor) -> torch.Tensor:
    """Listwise: cross-entropy to the grade distribution over the candidates; margin: pairwise hinge."""
    positive = grades > 0
    valid_rows = positive.any(1)
    scores, grades, positive = scores[valid_rows], grades[valid_rows], positive[valid_rows]
    if config.loss == "listwise":
        target = grades / grades.sum(1, keepdim=True)
        log_probs = F.log_softmax(scores / config.temperature, dim=1).masked_fill(~positive, 0.0)
        return -(target * log_probs).sum(1).mean()
    finite = torch.isfinite(scores)
    negative_scores = scores.masked_fill(positive | ~finite, float("-inf"))
    hardest = negative_scores.topk(min(config.hard_negatives, scores.shape[1]), dim=1).values  # [B, n]
    pos_scores = scores.masked_fill(~positive, float("nan"))  # [B, K]
    hinge = F.relu(config.margin - pos_scores[:, :, None] + hardest[:, None, :])  # [B, K, n]
    usable = positive[:, :, None] & torch.isfinite(hardest)[:, None, :]
    weight = grades[:, :, None].expand_as(hinge) * usable
    return (torch.nan_to_num(hinge) * weight).sum() / weight.sum().clamp(min=1.0)


def train(
    model_config: IMRNNConfig,
    config: TrainConfig,
    doc_embs: np.ndarray,
    doc_ids: np.ndarray,
    train_set: RankingSet,
    validation_set: RankingSet,
    device: str = "cpu",
    progress: bool = True,
    on_epoch: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train on `train_set`, keep the epoch with the best validation nDCG@10, stop after `patience` epochs without gain."""
    seed_everything(config.seed)
    start = time.perf_counter()
    model = IMRNN(model_config).to(device)
    docs = torch.as_tensor(np.asarray(doc_embs, dtype=np.float32))
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    queries = torch.as_tensor(np.asarray(train_set.query_embs, dtype=np.float32))
    candidates = torch.as_tensor(train_set.candidates)
    grades = torch.as_tensor(train_set.grades)

    best_state, best_score, best_epoch = copy.deepcopy(model.state_dict()), validation_ndcg(model, validation_set, docs, doc_ids), 0
    history = [{"epoch": 0, "loss": None, "val_nDCG@10": best_score}]
    stale = 0
    bar = tqdm(range(1, config.epochs + 1), desc="training", disable=not progress, dynamic_ncols=True)
    for epoch in bar:
        model.train()
        order = torch.randperm(len(queries), generator=generator)
        total, batches = 0.0, 0
        for batch in order.split(config.batch_size):
            rows = candidates[batch]
            mask = rows >= 0
            scored = model(queries[batch].to(device), docs[rows.clamp(min=0)].to(device), mask.to(device))
            loss = _loss(config, scored.scores, grades[batch].to(device))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total, batches = total + loss.item(), batches + 1
        val = validation_ndcg(model, validation_set, docs, doc_ids)
        record = {"epoch": epoch, "loss": total / max(batches, 1), "val_nDCG@10": val}
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
        if val > best_score + 1e-6:
            best_state, best_score, best_epoch, stale = copy.deepcopy(model.state_dict()), val, epoch, 0
        else:
            stale += 1
        bar.set_postfix(loss=f"{record['loss']:.4f}", val=f"{val:.4f}", best=f"{best_score:.4f}@{best_epoch}")
        if stale >= config.patience:
            break
    bar.close()
    model.load_state_dict(best_state)
    model.eval()
    return TrainResult(model, best_epoch, best_score, history, time.perf_counter() - start)


def ranking_set(
    query_ids: Sequence[str], query_embs: np.ndarray, base_candidates: np.ndarray, qrels: Qrels, doc_ids: np.ndarray,
    max_added_positives: int = 0, extra_negatives: np.ndarray | None = None,
) -> RankingSet:
    """Arrays for a query set: base candidates (plus missing positives for training, and extra negatives)."""
    from .negatives import relevance_matrix, training_candidates

    relevance = relevance_matrix(query_ids, qrels, doc_ids)
    candidates, grades = training_candidates(base_candidates, relevance, max_added_positives)
    if extra_negatives is not None and extra_negatives.shape[1] > 0:
        candidates, grades = _append_negatives(candidates, grades, extra_negatives)
    return RankingSet(list(query_ids), query_embs, candidates, grades, {q: qrels[q] for q in query_ids})


def _append_negatives(candidates: np.ndarray, grades: np.ndarray, negatives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Append extra negatives as new columns, masking (-1) those already among the candidates."""
    present = (negatives[:, :, None] == candidates[:, None, :]).any(2)
    negatives = np.where(present, -1, negatives)
    return np.concatenate([candidates, negatives], 1), np.concatenate([grades, np.zeros(negatives.shape, np.float32)], 1)
