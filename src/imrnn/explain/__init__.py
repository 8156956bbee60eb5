"""Explanations of IMRNN re-rankings, and a built-in check that they are faithful.

For one query over its candidate list an :class:`Explanation` gives each shown candidate's base and adapted
score and rank, the score change split exactly into projection, modulation (A_q) and refinement (A_d), the
concepts the adapters moved toward and away from (back-projection through the pseudo-inverse of the
projection), and attributions on the user's own words. The submodules:

* `records`: the JSON-round-tripping result dataclasses and `ExplainError`;
* `vocabulary`: concept vocabularies ("encoder": tokens through the full encoder, cached; "input": the
  transformer's input word embeddings);
* `attribution`: the :class:`Explainer` (score split, concepts, query-word occlusion, document-word
  gradient x input);
* `faithfulness`: the deletion test: deleting the top-n attributed query words must lower the adapted score of
  the most-promoted document more than deleting n random words;
* `datasets`: the same over a dataset split or a JSONL file of documents.
"""

from .attribution import CONCEPT_NOISE, MODULATION_NOISE, Explainer, delete_words, most_promoted, pseudo_inverse, words
from .datasets import explain_dataset_query, read_documents, split_deletion_test
from .faithfulness import CONCEPT_SOURCES, deletion_test
from .records import (
    CandidateExplanation,
    Concept,
    DeletionPair,
    DeletionReport,
    ExplainError,
    Explanation,
    Word,
)
from .vocabulary import (
    VOCAB_FORMAT,
    VOCABULARIES,
    ConceptVocabulary,
    encoder_vocabulary,
    input_embeddings,
    input_vocabulary,
    vocabulary_tokens,
)

__all__ = [
    "CONCEPT_NOISE",
    "CONCEPT_SOURCES",
    "MODULATION_NOISE",
    "VOCABULARIES",
    "VOCAB_FORMAT",
    "CandidateExplanation",
    "Concept",
    "ConceptVocabulary",
    "DeletionPair",
    "DeletionReport",
    "ExplainError",
    "Explainer",
    "Explanation",
    "Word",
    "delete_words",
    "deletion_test",
    "encoder_vocabulary",
    "explain_dataset_query",
    "input_embeddings",
    "input_vocabulary",
    "most_promoted",
    "pseudo_inverse",
    "read_documents",
    "split_deletion_test",
    "vocabulary_tokens",
    "words",
]
