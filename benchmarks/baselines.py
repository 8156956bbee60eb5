"""The re-rankers a user would pick instead of imrnn, on the same candidates and tuned on the same non-test queries.

* `rocchio`: non-learned feedback in embedding space, q' = norm(q + beta * mean(top-m candidates)), beta and m of the
  best mean nDCG@10 on the training and validation queries (imrnn's `tune_feedback` without its clear-gain test);
* `linear_adapter`: the query-only linear adapter of LlamaIndex's `EmbeddingAdapterFinetuneEngine` and the OpenAI
  "customizing embeddings" cookbook: q' = W q with W initialised to the identity, trained on (query, positive)
  pairs with in-batch negatives (multiple-negatives ranking loss, cosine x 20, batch 10 as LlamaIndex), early-stopped
  on validation nDCG@10 (patience 5), its learning rate chosen on validation from `LINEAR_RATES`.
Each returns the test run and what was chosen, with the validation nDCG@10 it was chosen on.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from imrnn.candidates import RankingSet
from imrnn.config import IMRNNConfig
from imrnn.evaluate import Run, evaluate_run, hits_to_run
from imrnn.feedback import feedback_ndcg, tune_feedback
from imrnn.model import IMRNN
from imrnn.scoring import score_candidates
from imrnn.workflow import SplitPlan, Workspace

LINEAR_RATES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
LINEAR_EPOCHS = 25
LINEAR_PATIENCE = 5  # epochs without a better validation nDCG@10 before stopping


def rocchio(workspace: Workspace, plan: SplitPlan) -> tuple[Run, dict]:
    """Rocchio tuned on `plan`'s training and validation queries, run on its test queries."""
    train, validation = workspace.ranking(plan.train), workspace.ranking(plan.validation)
    config, report = tune_feedback(IMRNNConfig(embedding_dim=workspace.dimension), [train, validation],
                                   workspace.doc_embs, workspace.dataset.corpus.ids, require_clear_gain=False)
    report["validation_nDCG@10"] = float(feedback_ndcg(config, [validation], workspace.doc_embs,
                                                       workspace.dataset.corpus.ids).mean())
    test = workspace.ranking(plan.test)
    scores = score_candidates(IMRNN(config).eval(), test.query_embs, workspace.doc_embs, test.candidates)
    return hits_to_run(test.query_ids, workspace.dataset.corpus.ids, test.candidates, scores), report


def _linear_run(weight: torch.Tensor, data: RankingSet, docs: np.ndarray, doc_ids: np.ndarray) -> Run:
    queries = F.normalize(torch.from_numpy(np.array(data.query_embs, np.float32)) @ weight.T, dim=-1).numpy()
    cands = docs[np.maximum(data.candidates, 0)]
    cands = cands / np.linalg.norm(cands, axis=-1, keepdims=True).clip(1e-12)
    scores = np.where(data.candidates >= 0, np.einsum("qd,qkd->qk", queries, cands), -np.inf)
    return hits_to_run(data.query_ids, doc_ids, data.candidates, scores)


def _train_linear(pairs: tuple[np.ndarray, np.ndarray], validation: RankingSet, docs: np.ndarray, doc_ids: np.ndarray,
                  lr: float, epochs: int, batch_size: int, seed: int) -> tuple[torch.Tensor, float, int]:
    """W from the identity by MNRL over (query, positive) pairs; the epoch of best validation nDCG@10 (0 = identity)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    queries, positives = (torch.from_numpy(np.asarray(a, np.float32)) for a in pairs)
    positives = F.normalize(positives, dim=-1)
    weight = torch.nn.Parameter(torch.eye(queries.shape[1]))
    optimiser = torch.optim.Adam([weight], lr=lr)  # LlamaIndex's adapter engine uses Adam

    def score() -> float:
        return evaluate_run(_linear_run(weight.detach(), validation, docs, doc_ids), validation.qrels, ["nDCG@10"])["nDCG@10"]

    best, best_score, best_epoch = weight.detach().clone(), score(), 0
    for epoch in range(1, epochs + 1):
        for batch in torch.randperm(len(queries), generator=generator).split(batch_size):
            q = F.normalize(queries[batch] @ weight.T, dim=-1)
            logits = 20.0 * q @ positives[batch].T
            loss = F.cross_entropy(logits, torch.arange(len(batch)))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        value = score()
        if value > best_score + 1e-9:
            best, best_score, best_epoch = weight.detach().clone(), value, epoch
        elif epoch - best_epoch >= LINEAR_PATIENCE:
            break
    return best, best_score, best_epoch


def linear_adapter(workspace: Workspace, plan: SplitPlan, rates: Sequence[float] = LINEAR_RATES,
                   epochs: int = LINEAR_EPOCHS, batch_size: int = 10, seed: int = 42) -> tuple[Run, dict]:
    """The LlamaIndex/OpenAI-cookbook linear query adapter, learning rate and epoch chosen on validation."""
    docs, doc_ids = np.asarray(workspace.doc_embs, np.float32), workspace.dataset.corpus.ids
    train, validation = workspace.ranking(plan.train), workspace.ranking(plan.validation)
    row_of = {d: i for i, d in enumerate(doc_ids)}
    pair_rows = [(i, row_of[d]) for i, q in enumerate(train.query_ids) for d, r in train.qrels[q].items() if r > 0 and d in row_of]
    pairs = (train.query_embs[[i for i, _ in pair_rows]], docs[[j for _, j in pair_rows]])
    results = {lr: _train_linear(pairs, validation, docs, doc_ids, lr, epochs, batch_size, seed) for lr in rates}
    lr = max(results, key=lambda rate: results[rate][1])
    weight, value, epoch = results[lr]
    report = {"lr": lr, "best_epoch": epoch, "pairs": len(pair_rows), "validation_nDCG@10": value,
              "validation_by_lr": {str(rate): r[1] for rate, r in results.items()}}
    return _linear_run(weight, workspace.ranking(plan.test), docs, doc_ids), report
