"""GGUF checkpoints (llama.cpp's format) read through the `gguf` package."""

from surge.loader.gguf.reader import config_from_gguf, open_gguf, tokenizer_metadata
from surge.loader.gguf.weights import iter_gguf_weights

__all__ = ["config_from_gguf", "iter_gguf_weights", "open_gguf", "tokenizer_metadata"]
