"""imrnn: Interpretable Modular Retrieval Neural Networks over frozen dense retrievers."""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# Public names -> defining module. Imported lazily so `imrnn --help` does not pay for torch.
_EXPORTS = {
    "IMRNN": "model",
    "IMRNNConfig": "config",
    "IMRNNError": "errors",
    "IMRNNRetriever": "retriever",
    "Encoder": "encode",
    "EncoderConfig": "config",
    "Ranking": "retriever",
    "TrainConfig": "config",
    "EvaluationReport": "workflow",
    "SplitPlan": "workflow",
    "Workspace": "workspace",
    "evaluate_run": "evaluate",
    "load_checkpoint": "checkpoint",
    "load_dataset": "data",
    "save_checkpoint": "checkpoint",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'imrnn' has no attribute {name!r}")
