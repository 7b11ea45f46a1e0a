"""Sizing and allocating the per-layer paged KV cache tensors from a memory budget."""

from __future__ import annotations

import torch

from surge.config import CacheConfig, ModelConfig
from surge.errors import InvalidArgumentError

DEFAULT_CPU_KV_BYTES = 2 << 30  # what vLLM's CPU backend reserves by default is of this order


def available_memory(device: str) -> int:
    """Bytes free for the cache: MemAvailable on CPU, free device memory on CUDA."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return DEFAULT_CPU_KV_BYTES * 2


def cache_dtype(cache: CacheConfig, model_dtype: torch.dtype) -> torch.dtype:
    """The cache tensors' dtype: the model's, or int8 rows with their scales."""
    return torch.int8 if cache.cache_dtype == "int8" else model_dtype


def row_size(model: ModelConfig, dtype: torch.dtype) -> int:
    """Elements of one token's head in the cache: head_dim, and an int8 row's fp16 scale."""
    from surge.layers.attention import INT8_SCALE_BYTES

    return model.head_dim + (INT8_SCALE_BYTES if dtype == torch.int8 else 0)


def bytes_per_block(model: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    element = torch.tensor([], dtype=dtype).element_size()
    return 2 * len(model.local_layers) * block_size * model.num_key_value_heads * row_size(model, dtype) * element


def kv_cache_budget(cache: CacheConfig, device: str) -> int:
    """The configured bytes, or a fraction of free memory (capped at 2 GiB on CPU)."""
    if cache.kv_cache_memory is not None:
        return cache.kv_cache_memory
    budget = int(available_memory(device) * cache.memory_fraction)
    return budget if device.startswith("cuda") else min(budget, DEFAULT_CPU_KV_BYTES)


def num_kv_blocks(model: ModelConfig, cache: CacheConfig, dtype: torch.dtype, device: str,
                  draft: ModelConfig | None = None) -> int:
    """Blocks that fit the budget; with a draft model, each block is also one of its cache's."""
    per_block = bytes_per_block(model, cache.block_size, dtype)
    if draft is not None:
        per_block += bytes_per_block(draft, cache.block_size, dtype)
    budget = kv_cache_budget(cache, device)
    blocks = budget // per_block
    if blocks < 1:
        raise InvalidArgumentError(
            f"the KV cache budget ({budget} bytes) is smaller than one block "
            f"({per_block} bytes); raise --kv-cache-memory"
        )
    return int(blocks)


def allocate_kv_caches(
    model: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: str
) -> list[torch.Tensor]:
    shape = (2, num_blocks, block_size, model.num_key_value_heads, row_size(model, dtype))
    mine = model.local_layers  # a pipeline stage's; the others' places hold empty tensors
    empty = (2, 0, block_size, model.num_key_value_heads, row_size(model, dtype))
    return [torch.zeros(shape if i in mine else empty, dtype=dtype, device=device)
            for i in range(model.num_hidden_layers)]
