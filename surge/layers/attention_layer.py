"""Attention as a layer: a model gives it q, k, v; it finds its KV cache and the step's
metadata in the forward context (surge/layers/forward_context.py) and picks the path.

    DecodeBatch            every sequence decodes: one native call writes K/V and attends
    None (compiled graph)  the opaque surge::attention op, which reads the metadata at run time
    AttentionMetadata      eager: write K/V at their slots, then paged attention
"""

from __future__ import annotations

import torch
from torch import nn

from surge.layers.attention import DecodeBatch, decode_step, paged_attention, write_kv
from surge.layers.forward_context import get_forward_context


class Attention(nn.Module):
    """Paged attention of layer `layer_index`: q [T, Hq, D], k/v [T, Hk, D] -> [T, Hq, D]."""

    def __init__(self, layer_index: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 sliding_window: int | None = None, scale: float | None = None):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.sliding_window = sliding_window
        self.scale = head_dim**-0.5 if scale is None else scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        context = get_forward_context()
        kv_cache = context.kv_caches[self.layer_index]
        meta = context.metadata
        if isinstance(meta, DecodeBatch):
            return decode_step(q, k, v, kv_cache, meta, self.scale, self.sliding_window)
        if meta is None:
            window = -1 if self.sliding_window is None else self.sliding_window
            return torch.ops.surge.attention(q, k, v, kv_cache, self.scale, window)
        write_kv(kv_cache, k, v, meta.slot_mapping)
        return paged_attention(q, kv_cache, meta, self.scale, self.sliding_window)

    def extra_repr(self) -> str:
        window = f", sliding_window={self.sliding_window}" if self.sliding_window is not None else ""
        return f"layer {self.layer_index}, heads {self.num_heads}/{self.num_kv_heads} x {self.head_dim}{window}"
