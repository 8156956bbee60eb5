"""The IMRNN adapters as one batched torch module (no file I/O here)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import IMRNNConfig
from .errors import ConfigError
from .files import tensor_view
from .scoring import blend, frozen_cosine, nearest_similarity, novelty_gate


class _AffineHead(nn.Module):
    """x -> (scale, shift) with scale = 1 + tanh(.) and shift; the last layer starts at zero (identity map).

    1 + tanh(x) is computed as the equal 2 * sigmoid(2x): torch's CPU sigmoid is about 10x faster than its tanh."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout))
        self.dim = dim
        self.out = nn.Linear(hidden, 2 * dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.body(x)
        return 2.0 * self._half_scale(hidden), F.linear(hidden, *self._shift_layer())

    def averaged(self, x: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Weighted means over dim 1 of (scale, shift) for `x` `[B, m, dim]` and `weights` `[B, m, 1]`.

        The shift is linear in the hidden layer, so its mean is taken there: a third less work than averaging
        `forward`'s output (this is on the re-ranking hot path)."""
        hidden = self.body(x)
        weight, bias = self._shift_layer()
        mean_scale = (self._half_scale(hidden) * (2.0 * weights)).sum(1)
        return mean_scale, F.linear((hidden * weights).sum(1), weight) + bias * weights.sum(1)

    def _half_scale(self, hidden: torch.Tensor) -> torch.Tensor:
        """sigmoid(2 * raw scale), with the 2 folded into the (small) weights rather than applied to the output."""
        return torch.sigmoid(F.linear(hidden, 2.0 * self.out.weight[: self.dim], 2.0 * self.out.bias[: self.dim]))

    def _shift_layer(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.out.weight[self.dim :], self.out.bias[self.dim :]


def _require_finite(x: torch.Tensor, what: str) -> None:
    """ConfigError naming the first non-finite embedding: NaN in, NaN out would be a silently wrong ranking."""
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        where = tuple(int(i) for i in torch.nonzero(~finite.all(dim=-1))[0])
        raise ConfigError(
            f"{what} embeddings hold NaN or Inf values (first at index {where}). Scores against them are meaningless; "
            "re-encode those texts or drop them (masked-out padding candidates may hold anything)."
        )


_CHUNK_BYTES = 4 << 20  # candidate floats per inference chunk: fits the L3 cache; fewer chunks, fewer op launches


def _queries_per_chunk(floats_per_query: int) -> int:
    return max(1, _CHUNK_BYTES // (4 * max(floats_per_query, 1)))


@dataclass(frozen=True)
class CorpusCache:
    """Per-corpus tensors for `IMRNN.score_rows`, made once by `IMRNN.cache_corpus`."""

    projected: torch.Tensor  # [N, D] IMRNN.project(embeddings): unit vectors in the working space
    embeddings: torch.Tensor  # [N, E] the frozen retriever's embeddings (may share memory with a memmap)
    norms: torch.Tensor  # [N] their L2 norms, for the frozen cosine


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
        self.projection.weight.requires_grad_(config.train_projection)
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
        scored = self._score(queries, self.project(candidates), frozen_cosine(queries, candidates), mask)
        if bool(torch.isnan(scored.scores.masked_fill(~mask, 0.0)).any()):
            raise ConfigError(
                "The adapter produced NaN scores from finite inputs: embeddings of extreme magnitude overflow float32. "
                "Pass L2-normalised embeddings (as the encoder produces)."
            )
        return scored

    def _score(self, queries: torch.Tensor, docs: torch.Tensor, base: torch.Tensor, mask: torch.Tensor) -> Scored:
        """Blended scores for raw queries `[B, E]`, projected candidates `docs` `[B, K, D]` and frozen cosines `base`."""
        query = self.project(queries)
        current, modulated = query, docs
        for _ in range(self.config.iterations):
            modulated = self._modulate_docs(current, docs)
            if self.config.use_doc_adapter:
                current = self._refine_query(query, current, modulated, mask)
        gate = self.gate(queries)
        scores = blend(gate, torch.linalg.vecdot(modulated, current[:, None, :]), base)
        blocked = float("-inf")
        return Scored(scores.masked_fill(~mask, blocked), query, current, docs, modulated, gate, base.masked_fill(~mask, blocked))

    def gate(self, queries: torch.Tensor) -> torch.Tensor:
        """Per-query weight of the adapted score: 1 without memory, else a sigmoid of the nearest training query's cosine."""
        if not self.config.memory_size:
            return torch.ones(queries.shape[0], dtype=queries.dtype, device=queries.device)
        return novelty_gate(nearest_similarity(queries, self.memory), self.config.gate_threshold, self.config.gate_width)

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
        return self._modulate(docs, *self.query_adapter(query))

    @staticmethod
    def _modulate(docs: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return F.normalize(torch.addcmul(shift[:, None, :], docs, scale[:, None, :]), dim=-1)

    def _refine_query(self, query: torch.Tensor, current: torch.Tensor, modulated: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q_hat = norm(q * mean(gamma_d) + mean(beta_d)) over the top-m candidates under the current query."""
        scores = torch.linalg.vecdot(modulated, current[:, None, :]).masked_fill(~mask, float("-inf"))
        m = min(self.config.feedback_docs, modulated.shape[1])
        if m == 0:  # no candidates at all: no feedback, as for an all-masked row
            return F.normalize(query, dim=-1)
        top = scores.topk(m, dim=1).indices
        feedback = modulated.gather(1, top[:, :, None].expand(-1, -1, modulated.shape[-1]))
        return self._refine_from_feedback(query, feedback, mask.gather(1, top))

    def _refine_from_feedback(self, query: torch.Tensor, feedback: torch.Tensor, valid_mask: torch.Tensor) -> torch.Tensor:
        """Average the document adapter's transforms over the valid feedback documents and apply them to the query,
        plus the Rocchio term beta * mean(feedback): untrained (identity heads), this is exactly Rocchio feedback."""
        valid = valid_mask.unsqueeze(-1).to(feedback.dtype)
        weights = valid / valid.sum(1, keepdim=True).clamp(min=1.0)
        mean_scale, mean_shift = self.doc_adapter.averaged(feedback, weights)
        mean_scale = mean_scale + (1.0 - valid.amax(1))  # no valid feedback -> scale 1
        refined = query * mean_scale + mean_shift
        if self.config.feedback_weight:
            refined = refined + self.config.feedback_weight * (feedback * weights).sum(1)
        return F.normalize(refined, dim=-1)

    @torch.inference_mode()
    def score_embeddings(self, queries: torch.Tensor, candidates: torch.Tensor,
                         mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward`'s (scores, base scores) for inference: a few queries at a time, so intermediates stay in cache.

        Checks stay cheap: a non-finite value in a query or an unmasked candidate makes its frozen cosine
        non-finite, and then (or on a bad shape) the checked `forward` runs on the whole input and raises."""
        shapes_ok = (queries.ndim == 2 and candidates.ndim == 3 and candidates.shape[:1] == queries.shape[:1]
                     and candidates.shape[-1] == queries.shape[-1] == self.config.embedding_dim
                     and (mask is None or mask.shape == candidates.shape[:2]))
        if not shapes_ok:
            return self._checked(queries, candidates, mask)
        mask = torch.ones(candidates.shape[:2], dtype=torch.bool, device=candidates.device) if mask is None else mask.bool()
        scores, base = torch.empty(mask.shape, device=candidates.device), torch.empty(mask.shape, device=candidates.device)
        step = _queries_per_chunk(candidates.shape[1] * candidates.shape[2])
        for start in range(0, len(queries), step):
            part = slice(start, start + step)
            keep, cands = mask[part], candidates[part]
            if not bool(keep.all()):  # whatever padding holds (even NaN) must not reach the feedback mean
                cands = cands.masked_fill(~keep[..., None], 0.0)
            cosine = frozen_cosine(queries[part], cands)
            scored = self._score(queries[part], self.project(cands), cosine, keep)
            if not bool(torch.isfinite(cosine.masked_fill(~keep, 0.0)).all()) or bool(torch.isnan(scored.scores).any()):
                return self._checked(queries, candidates, mask)
            scores[part], base[part] = scored.scores, scored.base_scores
        return scores, base

    def _checked(self, queries: torch.Tensor, candidates: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The validating `forward` (raises a ConfigError naming the problem on bad input)."""
        scored = self(queries, candidates, mask)
        return scored.scores, scored.base_scores

    @torch.inference_mode()
    def cache_corpus(self, embeddings: np.ndarray | torch.Tensor, chunk_size: int = 65536) -> CorpusCache:
        """What `score_rows` needs per corpus, computed once: `project` of every document (in chunks, so a
        memory-mapped corpus is never copied whole) and the raw embeddings' norms. Raw rows are shared, not copied."""
        device = next(self.parameters()).device
        raw = embeddings if isinstance(embeddings, torch.Tensor) else tensor_view(embeddings)
        projected = torch.empty(len(raw), self.config.dim, device=device)  # filled in place: no second copy to concat
        norms = torch.empty(len(raw), device=device)
        for start in range(0, len(raw), chunk_size):
            block = raw[start : start + chunk_size].to(device, torch.float32)
            projected[start : start + len(block)] = self.project(block)
            norms[start : start + len(block)] = torch.linalg.vector_norm(block, dim=-1).clamp_min_(1e-12)
        return CorpusCache(projected, raw.to(device), norms)

    @torch.inference_mode()
    def score_rows(self, queries: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor,
                   corpus: CorpusCache) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward`'s (scores, base scores) for candidates given as corpus `rows` `[B, K]`: the fastest path.

        Candidates are only gathered from `corpus` (`cache_corpus`), never projected again. Everything per query
        (projection, adapters, gate) runs once on the whole batch; per candidate, cache-sized chunks of queries
        stream through a few passes (top-m feedback, final scores, frozen cosine), each gathering afresh rather
        than keeping [B, K, D] tensors. Uses q . norm(d * g + b) = (d . (g * q) + b . q) / ||d * g + b||, so the
        modulated norms of the feedback pass serve the final pass too.
        Inputs are trusted: finite (checked when the corpus was searched or indexed) and rows in range."""
        if rows.shape[1] == 0:
            empty = torch.empty(rows.shape, device=queries.device)
            return empty, empty.clone()
        step = _queries_per_chunk(rows.shape[1] * corpus.projected.shape[1])
        parts = [slice(start, start + step) for start in range(0, len(queries), step)]
        query = self.project(queries)
        current, scale, shift = query, None, None
        norms = torch.ones(rows.shape, device=queries.device)  # ||d * scale + shift||, per candidate
        workspace = torch.empty(step * rows.shape[1] * max(corpus.projected.shape[1], corpus.embeddings.shape[1]),
                                device=queries.device)  # reused by every gather: no allocation per chunk

        def gathered(part: slice, table: torch.Tensor) -> torch.Tensor:
            index = rows[part].reshape(-1)
            out = workspace[: len(index) * table.shape[1]].view(len(index), table.shape[1])
            return torch.index_select(table, 0, index, out=out).view(*rows[part].shape, table.shape[1])

        def adapted(part: slice, with_norms: bool) -> torch.Tensor:
            """current . norm(d * scale + shift) for the chunk's candidates, computed in place in the workspace."""
            docs = gathered(part, corpus.projected)
            vector = current[part, None, :]
            if scale is None:
                return docs.mul_(vector).sum(-1)
            if not with_norms:  # the norms of this modulation are known: skip forming d * scale + shift
                offset = torch.linalg.vecdot(shift[part], current[part])[:, None]
                return docs.mul_(scale[part, None, :] * vector).sum(-1).add_(offset).div_(norms[part])
            torch.addcmul(shift[part, None, :], docs, scale[part, None, :], out=docs)
            norms[part] = torch.linalg.vector_norm(docs, dim=-1).clamp_min_(1e-12)
            return docs.mul_(vector).sum(-1).div_(norms[part])

        for _ in range(self.config.iterations):
            if self.config.use_query_adapter:
                scale, shift = self.query_adapter(current)
            if self.config.use_doc_adapter:
                m = min(self.config.feedback_docs, rows.shape[1])
                top = torch.cat([adapted(part, True).masked_fill_(~mask[part], float("-inf")).topk(m, dim=1).indices
                                 for part in parts])
                feedback = F.embedding(rows.gather(1, top), corpus.projected)
                if scale is not None:
                    feedback = self._modulate(feedback, scale, shift)
                current = self._refine_from_feedback(query, feedback, mask.gather(1, top))
        scores = torch.cat([adapted(part, not self.config.use_doc_adapter) for part in parts])
        query_direction = F.normalize(queries, dim=-1)
        base = torch.cat([gathered(part, corpus.embeddings).mul_(query_direction[part, None, :]).sum(-1)
                          for part in parts]).div_(corpus.norms[rows])
        blocked = float("-inf")
        return blend(self.gate(queries), scores, base).masked_fill_(~mask, blocked), base.masked_fill_(~mask, blocked)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
