"""The IMRNN adapters as one batched torch module (no file I/O here)."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np
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


def _require_finite(x: torch.Tensor, what: str) -> None:
    """ConfigError naming the first non-finite embedding: NaN in, NaN out would be a silently wrong ranking."""
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        where = tuple(int(i) for i in torch.nonzero(~finite.all(dim=-1))[0])
        raise ConfigError(
            f"{what} embeddings hold NaN or Inf values (first at index {where}). Scores against them are meaningless; "
            "re-encode those texts or drop them (masked-out padding candidates may hold anything)."
        )


class Scored(NamedTuple):
    """Adapter output for a batch: scores plus the vectors the explanation needs (working space)."""

    scores: torch.Tensor  # [B, K], -inf at masked candidates
    query: torch.Tensor  # [B, D] projected query before refinement
    refined_query: torch.Tensor  # [B, D] after the document adapter
    docs: torch.Tensor  # [B, K, D] projected candidates before modulation
    modulated_docs: torch.Tensor  # [B, K, D] after the query adapter
    gate: torch.Tensor  # [B] weight of the adapted score (1 without a novelty gate)
    base_scores: torch.Tensor  # [B, K] frozen retriever's cosine, -inf at masked candidates


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
        if config.memory_size:
            self.register_buffer("memory", torch.zeros(config.memory_size, config.embedding_dim))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(x), dim=-1)

    def forward(self, queries: torch.Tensor, candidates: torch.Tensor, mask: torch.Tensor | None = None) -> Scored:
        """Scores `[B, K]` for queries `[B, E]` and candidates `[B, K, E]`; `mask[b, k]` False marks padding.

        Masked candidates score -inf (an all-masked row is all -inf, never NaN) and are ignored whatever they hold;
        K = 1 and K < feedback_docs are fine (the feedback uses min(m, K) candidates); zero vectors are allowed.
        NaN or Inf in a query or an unmasked candidate is a ConfigError."""
        if queries.ndim != 2 or candidates.ndim != 3 or candidates.shape[:1] != queries.shape[:1]:
            raise ConfigError(f"Expected queries [B, E] and candidates [B, K, E]; got {tuple(queries.shape)} and {tuple(candidates.shape)}.")
        if queries.shape[-1] != self.config.embedding_dim or candidates.shape[-1] != self.config.embedding_dim:
            raise ConfigError(
                f"Embeddings have dimension {queries.shape[-1]}/{candidates.shape[-1]} but the adapter expects "
                f"{self.config.embedding_dim}: use the encoder the checkpoint was trained with."
            )
        if mask is None:
            mask = torch.ones(candidates.shape[:2], dtype=torch.bool, device=candidates.device)
        elif mask.shape != candidates.shape[:2]:
            raise ConfigError(f"mask must have shape {tuple(candidates.shape[:2])} (one flag per candidate), got {tuple(mask.shape)}.")
        else:
            mask = mask.bool()
            if not bool(mask.all()):  # whatever padding holds (even NaN) must not reach the feedback mean
                candidates = candidates.masked_fill(~mask[..., None], 0.0)
        _require_finite(queries, "query")
        _require_finite(candidates, "candidate")
        query = self.project(queries)
        docs = self.project(candidates)
        current = query
        modulated = docs
        for _ in range(self.config.iterations):
            modulated = self._modulate_docs(current, docs)
            if self.config.use_doc_adapter:
                current = self._refine_query(query, current, modulated, mask)
        scores = torch.einsum("bd,bkd->bk", current, modulated)
        base = torch.einsum("bd,bkd->bk", F.normalize(queries, dim=-1), F.normalize(candidates, dim=-1))
        gate = self.gate(queries)
        scores = gate[:, None] * scores + (1.0 - gate[:, None]) * base
        if bool(torch.isnan(scores.masked_fill(~mask, 0.0)).any()):
            raise ConfigError(
                "The adapter produced NaN scores from finite inputs: embeddings of extreme magnitude overflow float32. "
                "Pass L2-normalised embeddings (as the encoder produces)."
            )
        blocked = float("-inf")
        return Scored(scores.masked_fill(~mask, blocked), query, current, docs, modulated, gate, base.masked_fill(~mask, blocked))

    def gate(self, queries: torch.Tensor) -> torch.Tensor:
        """Per-query weight of the adapted score: 1 without memory, else a sigmoid of the nearest training query's cosine."""
        if not self.config.memory_size:
            return torch.ones(queries.shape[0], dtype=queries.dtype, device=queries.device)
        nearest = (F.normalize(queries, dim=-1) @ self.memory.T).amax(dim=1)
        return torch.sigmoid((nearest - self.config.gate_threshold) / self.config.gate_width)

    def with_gate(self, memory: torch.Tensor, threshold: float, width: float | None = None) -> "IMRNN":
        """A copy with a novelty gate over `memory` (training query embeddings `[N, E]`)."""
        config = dataclasses.replace(self.config, memory_size=len(memory), gate_threshold=float(threshold),
                                     gate_width=width or self.config.gate_width)
        gated = IMRNN(config).to(next(self.parameters()).device)
        state = {k: v for k, v in self.state_dict().items() if k != "memory"}
        gated.load_state_dict({**state, "memory": F.normalize(memory.float(), dim=-1)})
        return gated.eval()

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
        if m == 0:  # no candidates at all: no feedback, as for an all-masked row
            return F.normalize(query, dim=-1)
        top = scores.topk(m, dim=1).indices
        feedback = modulated.gather(1, top[:, :, None].expand(-1, -1, modulated.shape[-1]))
        return self._refine_from_feedback(query, feedback, mask.gather(1, top))

    def _refine_from_feedback(self, query: torch.Tensor, feedback: torch.Tensor, valid_mask: torch.Tensor) -> torch.Tensor:
        """Average the document adapter's transforms over the valid feedback documents and apply them to the query."""
        valid = valid_mask.unsqueeze(-1).to(feedback.dtype)
        scale, shift = self.doc_adapter(feedback)
        count = valid.sum(1).clamp(min=1.0)
        mean_scale = (scale * valid).sum(1) / count + (1.0 - valid.amax(1))  # no valid feedback -> scale 1
        mean_shift = (shift * valid).sum(1) / count
        return F.normalize(query * mean_scale + mean_shift, dim=-1)

    @torch.inference_mode()
    def fast_scores(self, queries: torch.Tensor, projected: torch.Tensor, base: torch.Tensor,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
        """The scores of `forward` for inference, without materialising the modulated candidates.

        `projected` is `self.project(candidates)` `[B, K, D]` (computable once per corpus) and `base` the frozen
        cosine `[B, K]`. Uses q . norm(d * g + b) = (d . (q * g) + q . b) / ||d * g + b|| with
        ||d * g + b||^2 = d^2 . g^2 + 2 d . (g * b) + b . b, so each round costs a few batched mat-vec products.
        Inputs are trusted (finite, normalised): use `forward` for validation-checked scoring and explanations.
        """
        if mask is None:
            mask = torch.ones(projected.shape[:2], dtype=torch.bool, device=projected.device)
        query = self.project(queries)
        current = query
        use_q = self.config.use_query_adapter
        squared = projected * projected if use_q else projected
        scale = shift = inverse_norm = None

        def score(vector: torch.Tensor) -> torch.Tensor:
            if not use_q:
                return torch.einsum("bkd,bd->bk", projected, vector)
            raw = torch.einsum("bkd,bd->bk", projected, vector * scale) + (vector * shift).sum(-1, keepdim=True)
            return raw * inverse_norm

        for _ in range(self.config.iterations):
            if use_q:
                scale, shift = self.query_adapter(current)
                norm2 = (torch.einsum("bkd,bd->bk", squared, scale * scale)
                         + 2.0 * torch.einsum("bkd,bd->bk", projected, scale * shift)
                         + (shift * shift).sum(-1, keepdim=True))
                inverse_norm = 1.0 / norm2.clamp_min(0.0).sqrt().clamp_min(1e-12)
            if self.config.use_doc_adapter:
                m = min(self.config.feedback_docs, projected.shape[1])
                if m == 0:
                    current = query
                    continue
                top = score(current).masked_fill(~mask, float("-inf")).topk(m, dim=1).indices
                feedback = projected.gather(1, top[:, :, None].expand(-1, -1, projected.shape[-1]))
                if use_q:
                    feedback = F.normalize(feedback * scale[:, None, :] + shift[:, None, :], dim=-1)
                current = self._refine_from_feedback(query, feedback, mask.gather(1, top))
        gate = self.gate(queries)[:, None]
        scores = gate * score(current) + (1.0 - gate) * base
        return scores.masked_fill(~mask, float("-inf"))

    @torch.inference_mode()
    def project_corpus(self, docs: np.ndarray, chunk_size: int = 65536) -> torch.Tensor:
        """`project` applied to a whole (memory-mapped) corpus in chunks: the cache behind fast re-ranking."""
        device = next(self.parameters()).device
        parts = [self.project(torch.from_numpy(np.array(docs[i : i + chunk_size], dtype=np.float32)).to(device))
                 for i in range(0, len(docs), chunk_size)]
        return torch.cat(parts) if parts else torch.zeros(0, self.config.dim, device=device)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
