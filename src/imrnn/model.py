"""The IMRNN adapters as one batched torch module (no file I/O here)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import IMRNNConfig
from .errors import ConfigError


class _AffineHead(nn.Module):
    """x -> (scale, shift) with scale = 1 + tanh(.) and shift; the last layer starts at zero (identity map)."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout))
        self.out = nn.Linear(hidden, 2 * dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw_scale, shift = self.out(self.body(x)).chunk(2, dim=-1)
        return 1.0 + torch.tanh(raw_scale), shift


class Scored(NamedTuple):
    """Adapter output for a batch: scores plus the vectors the explanation needs (working space)."""

    scores: torch.Tensor  # [B, K], -inf at masked candidates
    query: torch.Tensor  # [B, D] projected query before refinement
    refined_query: torch.Tensor  # [B, D] after the document adapter
    docs: torch.Tensor  # [B, K, D] projected candidates before modulation
    modulated_docs: torch.Tensor  # [B, K, D] after the query adapter


class IMRNN(nn.Module):
    """Query adapter (modulates candidates from the query) + document adapter (refines the query from feedback)."""

    def __init__(self, config: IMRNNConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.dim
        self.projection = nn.Linear(config.embedding_dim, dim, bias=False)
        if config.identity_init:
            with torch.no_grad():
                self.projection.weight.copy_(torch.eye(dim))
        self.query_adapter = _AffineHead(dim, config.hidden_dim, config.dropout)
        self.doc_adapter = _AffineHead(dim, config.hidden_dim, config.dropout)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(x), dim=-1)

    def forward(self, queries: torch.Tensor, candidates: torch.Tensor, mask: torch.Tensor | None = None) -> Scored:
        """Scores `[B, K]` for queries `[B, E]` and candidates `[B, K, E]`; `mask[b, k]` False marks padding."""
        if queries.ndim != 2 or candidates.ndim != 3 or candidates.shape[:1] != queries.shape[:1]:
            raise ConfigError(f"Expected queries [B, E] and candidates [B, K, E]; got {tuple(queries.shape)} and {tuple(candidates.shape)}.")
        if queries.shape[-1] != self.config.embedding_dim or candidates.shape[-1] != self.config.embedding_dim:
            raise ConfigError(
                f"Embeddings have dimension {queries.shape[-1]}/{candidates.shape[-1]} but the adapter expects "
                f"{self.config.embedding_dim}: use the encoder the checkpoint was trained with."
            )
        if mask is None:
            mask = torch.ones(candidates.shape[:2], dtype=torch.bool, device=candidates.device)
        query = self.project(queries)
        docs = self.project(candidates)
        current = query
        modulated = docs
        for _ in range(self.config.iterations):
            modulated = self._modulate_docs(current, docs)
            if self.config.use_doc_adapter:
                current = self._refine_query(query, current, modulated, mask)
        scores = torch.einsum("bd,bkd->bk", current, modulated)
        return Scored(scores.masked_fill(~mask, float("-inf")), query, current, docs, modulated)

    def _modulate_docs(self, query: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
        """d_hat = norm(d * gamma_q + beta_q), gamma/beta predicted from the (current) query."""
        if not self.config.use_query_adapter:
            return docs
        scale, shift = self.query_adapter(query)
        return F.normalize(docs * scale[:, None, :] + shift[:, None, :], dim=-1)

    def _refine_query(self, query: torch.Tensor, current: torch.Tensor, modulated: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q_hat = norm(q * mean(gamma_d) + mean(beta_d)) over the top-m candidates under the current query."""
        scores = torch.einsum("bd,bkd->bk", current, modulated).masked_fill(~mask, float("-inf"))
        m = min(self.config.feedback_docs, modulated.shape[1])
        top = scores.topk(m, dim=1).indices
        feedback = modulated.gather(1, top[:, :, None].expand(-1, -1, modulated.shape[-1]))
        valid = mask.gather(1, top).unsqueeze(-1).to(feedback.dtype)
        scale, shift = self.doc_adapter(feedback)
        count = valid.sum(1).clamp(min=1.0)
        mean_scale = (scale * valid).sum(1) / count + (1.0 - valid.amax(1))  # no valid feedback -> scale 1
        mean_shift = (shift * valid).sum(1) / count
        return F.normalize(query * mean_scale + mean_shift, dim=-1)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
