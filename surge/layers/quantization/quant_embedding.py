"""An embedding table looked up from quantized rows: GGUF tables stay in their blocks (Q6_K,
Q8_0, ...), and a tied output head and its embedding share one packed weight."""

from __future__ import annotations

import torch
from torch import nn

from surge.layers.quantization.quant_linear import QuantLinear


class QuantEmbedding(nn.Module):
    """nn.Embedding's lookup, each row dequantized from `table` (a QuantLinear whose output rows
    are the vocabulary) in float32 and rounded once to `dtype`: the values a dequantized float
    table would hold."""

    def __init__(self, table: QuantLinear, dtype: torch.dtype):
        super().__init__()
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features
        self.dtype = dtype
        self.table = table

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.table.rows(input_ids.reshape(-1).to(torch.int64))
        return rows.to(self.dtype).reshape(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, from {self.table.kind}"
