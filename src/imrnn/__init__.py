"""imrnn: Interpretable Modular Retrieval Neural Networks over frozen dense retrievers."""

__version__ = "0.1.0"
