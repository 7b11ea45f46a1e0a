"""The step's forward context (KV caches and attention metadata) and attention as one opaque op.

A model's forward takes only token ids and positions; every attention layer finds its KV
cache and the step's metadata here, in eager and compiled mode alike:

    runner:  with set_forward_context(ForwardContext(kv_caches, metadata)):
                 hidden = model(input_ids, positions)
    layer:   ctx = get_forward_context(); cache = ctx.kv_caches[layer_index]

`metadata` is an AttentionMetadata (any step), a DecodeBatch (a decode-only step served by
the native kernel: its tensors go straight to it) or, inside a compiled graph, None: a graph
must not depend on Python-int metadata (sequence lengths, query offsets) or every step would
recompile, so there each layer's KV write + paged attention is the custom op
`surge::attention`, which Inductor calls as an opaque function and which reads the step's
metadata from the context at run time. The compiled forward binds its traced context with
`bind_traced` (surge/worker/compiled.py).

The context is per thread: a server runs several engines (model versions) in one process,
each stepping on its own thread. While Dynamo traces, layers read the traced context instead
(tracing is serialized by Dynamo; at run time nothing reads it).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from surge.layers.attention import AttentionMetadata, DecodeBatch, paged_attention, write_kv


class ForwardContext:
    """What one forward's attention layers read: a cache per layer and the step's metadata."""

    def __init__(self, kv_caches: list[torch.Tensor], metadata: AttentionMetadata | DecodeBatch | None):
        self.kv_caches = kv_caches
        self.metadata = metadata


_local = threading.local()
_traced: ForwardContext | None = None


@contextmanager
def set_forward_context(context: ForwardContext) -> Iterator[None]:
    previous = getattr(_local, "context", None)
    _local.context = context
    try:
        yield
    finally:
        _local.context = previous


def bind_traced(context: ForwardContext | None) -> None:
    """Set the traced context from inside a compiled function (Dynamo records the store; the
    layers traced after it read the stored value). It reads no previous value, which would
    become a guard."""
    global _traced
    _traced = context


def get_forward_context() -> ForwardContext:
    context = _traced if torch.compiler.is_compiling() else getattr(_local, "context", None)
    if context is None:
        raise RuntimeError("a model forward ran outside set_forward_context(): no KV caches or metadata")
    return context


def current_metadata() -> AttentionMetadata:
    meta = get_forward_context().metadata
    if not isinstance(meta, AttentionMetadata):
        raise RuntimeError(f"surge::attention needs the step's AttentionMetadata in the forward context, not {meta!r}")
    return meta


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
