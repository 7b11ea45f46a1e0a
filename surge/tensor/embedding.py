"""Embeddings from an encoder served by a tensor backend: text tokenized with the model's own
tokenizer, run through the dynamic batcher (inputs of different lengths padded together), the
per-token hidden states pooled and L2-normalised. Declared in the model's surge.toml:

    [embedding]
    output = "last_hidden_state"   # [batch, sequence, hidden] (or [batch, hidden]: pooled by the model)
    pooling = "mean"               # "mean" over the attention mask, "cls" (the first token), "last"
    tokenizer = "tokenizer.json"   # a Hugging Face tokenizers file in the version directory
    max_length = 512               # longer inputs are refused (default: none)

The model takes `input_ids`, and where it has them `attention_mask` (ones) and `token_type_ids`
(zeros), all INT64 or INT32.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from surge.errors import InvalidArgumentError
from surge.tensor.config import NUMPY_TYPES, TensorSpec

POOLING = ("mean", "cls", "last")
KNOWN = {"output", "pooling", "tokenizer", "max_length"}
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class EmbeddingConfig:
    output: str
    pooling: str = "mean"
    tokenizer: str = "tokenizer.json"
    max_length: int | None = None


def embedding_config(table: Any, source: str) -> EmbeddingConfig:
    if not isinstance(table, Mapping):
        raise InvalidArgumentError(f"{source}: [embedding] must be a table")
    unknown = set(table) - KNOWN
    if unknown:
        raise InvalidArgumentError(f"{source}: [embedding]: unknown key(s) {', '.join(sorted(unknown))} "
                                   f"(known: {', '.join(sorted(KNOWN))})")
    output = table.get("output")
    if not isinstance(output, str) or not output:
        raise InvalidArgumentError(f"{source}: [embedding] needs 'output', the model output holding the hidden states")
    pooling = table.get("pooling", "mean")
    if pooling not in POOLING:
        raise InvalidArgumentError(f"{source}: [embedding] pooling must be one of {', '.join(POOLING)}")
    tokenizer = table.get("tokenizer", "tokenizer.json")
    if not isinstance(tokenizer, str):
        raise InvalidArgumentError(f"{source}: [embedding] tokenizer must be a file name")
    max_length = table.get("max_length")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise InvalidArgumentError(f"{source}: [embedding] max_length must be a positive integer")
    return EmbeddingConfig(output, pooling, tokenizer, max_length)


class Embedder:
    """Turns inputs (text or token ids) into the model's tensors and its outputs into vectors."""

    def __init__(self, config: EmbeddingConfig, version_path: str, inputs: tuple[TensorSpec, ...],
                 outputs: tuple[TensorSpec, ...], batched: bool):
        from tokenizers import Tokenizer

        where = os.path.join(version_path, "surge.toml")
        self.config = config
        names = {s.name: s for s in inputs}
        if "input_ids" not in names or set(names) - set(INPUTS):
            raise InvalidArgumentError(f"{where}: an embedding model takes input_ids (and optionally attention_mask, "
                                       f"token_type_ids); this one takes {', '.join(names)}")
        self.inputs = [names[n] for n in INPUTS if n in names]
        for spec in self.inputs:
            if spec.datatype not in ("INT64", "INT32"):
                raise InvalidArgumentError(f"{where}: input '{spec.name}' is {spec.datatype}; an embedding model "
                                           "takes INT64 or INT32 token ids")
        out = {s.name: s for s in outputs}.get(config.output)
        if out is None:
            raise InvalidArgumentError(f"{where}: [embedding] output '{config.output}' is not one of the model's "
                                       f"outputs: {', '.join(s.name for s in outputs)}")
        self.pooled = len(out.dims) == 1  # [hidden] after the batch dimension: the model pooled already
        if not batched or len(out.dims) not in (1, 2):
            raise InvalidArgumentError(f"{where}: [embedding] output '{config.output}' must be [batch, sequence, "
                                       "hidden] or [batch, hidden] on a model that batches")
        self.hidden_size = out.dims[-1] if out.dims[-1] > 0 else None
        path = os.path.join(version_path, config.tokenizer)
        if not os.path.isfile(path):
            raise InvalidArgumentError(f"{where}: [embedding] tokenizer {config.tokenizer} is not in {version_path}")
        self.tokenizer = Tokenizer.from_file(path)
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)

    def pad_values(self) -> dict[str, int]:
        """What each input is padded with when inputs of different lengths share a batch."""
        return {s.name: 0 for s in self.inputs}

    def tokens(self, item: str | list[int]) -> list[int]:
        """The token ids of one input; InvalidArgumentError for an empty, too long or out-of-vocabulary one."""
        ids = self.tokenizer.encode(item).ids if isinstance(item, str) else list(item)
        if not ids:
            raise InvalidArgumentError("an input is empty after tokenization")
        if self.config.max_length is not None and len(ids) > self.config.max_length:
            raise InvalidArgumentError(f"an input has {len(ids)} tokens; this model takes at most "
                                       f"{self.config.max_length}")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidArgumentError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        return ids

    def arrays(self, ids: list[int]) -> dict[str, np.ndarray]:
        """One input's tensors, a batch of one."""
        values = {"input_ids": ids, "attention_mask": [1] * len(ids), "token_type_ids": [0] * len(ids)}
        return {s.name: np.array([values[s.name]], dtype=NUMPY_TYPES[s.datatype]) for s in self.inputs}

    def vector(self, outputs: dict[str, np.ndarray], length: int) -> list[float]:
        """The pooled, L2-normalised vector of one input's outputs."""
        hidden = np.asarray(outputs[self.config.output][0], dtype=np.float64)
        if not self.pooled:
            hidden = hidden[:length]
            hidden = {"mean": lambda h: h.mean(axis=0), "cls": lambda h: h[0], "last": lambda h: h[-1]}[
                self.config.pooling](hidden)
        norm = np.linalg.norm(hidden)
        return (hidden / norm if norm > 0 else hidden).astype(np.float32).tolist()
