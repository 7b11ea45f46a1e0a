"""The step's attention metadata, set around a compiled forward, and attention as one opaque op.

A compiled graph must not depend on Python-int metadata (sequence lengths, query offsets):
every step would recompile. So under `torch.compile` each layer's KV write + paged attention
is a single custom op, `surge::attention`, that Inductor calls as an opaque function, and the
op reads the step's metadata from this context instead of from its arguments:

    runner:  with forward_context(meta): compiled(input_ids, positions, kv_caches)
    layer:   out = torch.ops.surge.attention(q, k, v, kv_cache, scale, window)  # reads meta
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from surge.layers.attention import AttentionMetadata, paged_attention, write_kv

_current: AttentionMetadata | None = None


@contextmanager
def forward_context(meta: AttentionMetadata) -> Iterator[None]:
    global _current
    previous, _current = _current, meta
    try:
        yield
    finally:
        _current = previous


def current_metadata() -> AttentionMetadata:
    if _current is None:
        raise RuntimeError("surge::attention called outside forward_context()")
    return _current


@torch.library.custom_op("surge::attention", mutates_args=("kv_cache",))
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, scale: float,
                 sliding_window: int) -> torch.Tensor:
    """Write this step's K/V into `kv_cache` and attend; `sliding_window` < 0 means none."""
    meta = current_metadata()
    write_kv(kv_cache, k, v, meta.slot_mapping)
    return paged_attention(q, kv_cache, meta, scale, sliding_window if sliding_window >= 0 else None)


@attention_op.register_fake
def _attention_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, scale: float,
                    sliding_window: int) -> torch.Tensor:
    return torch.empty_like(q)
