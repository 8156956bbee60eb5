"""LlamaIndex integration: IMRNN as a node postprocessor (re-ranker), and the checkpoint's frozen encoder as an
embedding model.

- `IMRNNNodePostprocessor` (a `BaseNodePostprocessor`): re-ranks a query's retrieved nodes in one batched pass,
  using a node's `embedding` when it carries one and embedding its text otherwise (the text LlamaIndex embeds,
  `MetadataMode.EMBED`). Put it in `index.as_query_engine(node_postprocessors=[...])`.
- `IMRNNEmbedding` (a `BaseEmbedding`): the checkpoint's encoder, so a `VectorStoreIndex` stores the vectors the
  adapters were trained on, with no network.

Needs the extra: `pip install 'imrnn[llama-index]'`.
"""

from __future__ import annotations

import asyncio
from typing import Any, List, Optional

try:
    from llama_index.core.base.embeddings.base import BaseEmbedding
    from llama_index.core.bridge.pydantic import Field
    from llama_index.core.postprocessor.types import BaseNodePostprocessor
    from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle
except ImportError as err:  # the optional extra is missing
    raise ImportError(f"imrnn.integrations.llama_index needs llama-index-core ({err}); install it with "
                      "pip install 'imrnn[llama-index]'") from err

from ..encode import Encoder
from ..errors import ConfigError
from ..retriever import IMRNNRetriever
from . import rerank_candidates

__all__ = ["IMRNNEmbedding", "IMRNNNodePostprocessor"]


class IMRNNEmbedding(BaseEmbedding):
    """The checkpoint's frozen encoder (default: the bundled all-MiniLM-L6-v2) as a LlamaIndex embedding model.

    Pass `encoder=retriever.encoder` so that node vectors are the ones the adapters were trained on."""

    encoder: Encoder = Field(exclude=True, description="imrnn's frozen encoder.")

    def __init__(self, encoder: Encoder | None = None, **kwargs: Any) -> None:
        encoder = encoder or Encoder()
        kwargs.setdefault("model_name", encoder.config.model)
        kwargs.setdefault("embed_batch_size", encoder.batch_size)
        super().__init__(encoder=encoder, **kwargs)

    @classmethod
    def class_name(cls) -> str:
        return "IMRNNEmbedding"

    def _get_query_embedding(self, query: str) -> List[float]:
        return self.encoder.encode_queries([query])[0].tolist()

    async def _aget_query_embedding(self, query: str) -> List[float]:
        return await asyncio.to_thread(self._get_query_embedding, query)

    def _get_text_embedding(self, text: str) -> List[float]:
        return self._get_text_embeddings([text])[0]

    def _get_text_embeddings(self, texts: List[str]) -> List[List[float]]:
        return self.encoder.encode(list(texts), self.encoder.config.passage_prefix).tolist()

    async def _aget_text_embeddings(self, texts: List[str]) -> List[List[float]]:
        return await asyncio.to_thread(self._get_text_embeddings, texts)


class IMRNNNodePostprocessor(BaseNodePostprocessor):
    """Re-ranks retrieved nodes with IMRNN adapters; each node's score becomes its adapted score.

    A node's vector is its `embedding` when present and `use_node_embeddings` is on (it must come from the
    checkpoint's encoder, e.g. `IMRNNEmbedding`), else its embedded text. Keeps the best `top_n` (all when None)."""

    retriever: IMRNNRetriever = Field(exclude=True, description="An imrnn.IMRNNRetriever (from_pretrained).")
    top_n: Optional[int] = Field(default=None, ge=1, description="How many nodes to keep (None: all, re-ordered).")
    use_node_embeddings: bool = Field(default=True, description="Use nodes' stored embeddings when they have them.")

    @classmethod
    def class_name(cls) -> str:
        return "IMRNNNodePostprocessor"

    def _postprocess_nodes(self, nodes: List[NodeWithScore],
                           query_bundle: Optional[QueryBundle] = None) -> List[NodeWithScore]:
        if query_bundle is None:
            raise ConfigError("IMRNNNodePostprocessor re-ranks for a query but got none: call "
                              "postprocess_nodes(nodes, query_str='...') or pass a QueryBundle.")
        if not nodes:
            return []
        texts = [item.node.get_content(metadata_mode=MetadataMode.EMBED) for item in nodes]
        stored = [item.node.embedding for item in nodes] if self.use_node_embeddings else [None] * len(nodes)
        order, scores, _ = rerank_candidates(self.retriever, query_bundle.query_str, texts, stored)
        return [NodeWithScore(node=nodes[i].node, score=float(score)) for i, score in zip(order[: self.top_n], scores)]
