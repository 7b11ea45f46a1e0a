"""Per-request KV blocks on top of the BlockPool: prefix-cache lookups, slot allocation, freeing."""

from __future__ import annotations

from dataclasses import dataclass

from surge.core.block_pool import BlockPool, KVBlock
from surge.core.request import Request


@dataclass(slots=True)
class PrefixCacheStats:
    """Prompt tokens looked up in the prefix cache and how many were found."""

    queries: int = 0
    hits: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.req_blocks: dict[str, list[KVBlock]] = {}
        self._num_hashed: dict[str, int] = {}  # leading blocks of a request already in the cache
        self.stats = PrefixCacheStats()

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """Cached blocks holding a prefix of the request's tokens, and how many tokens they cover.

        At least the last token is always left to compute: its logits give the next token.
        """
        if not self.enable_prefix_caching or request.skip_prefix_cache:
            return [], 0
        request.update_block_hashes(self.block_size)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed: list[KVBlock] | None = None
    ) -> list[KVBlock] | None:
        """Blocks so that computed + new tokens have slots; None (nothing changed) if short."""
        blocks = self.req_blocks.get(request.request_id, [])
        computed = computed or []
        base = request.num_computed_tokens if blocks else len(computed) * self.block_size
        total = base + num_new_tokens
        need = self.blocks_for(total) - len(blocks) - len(computed)
        # cached-free blocks we are about to share stop counting as free
        reclaim = sum(1 for b in computed if b.ref_cnt == 0)
        if need > self.pool.num_free - reclaim:
            return None
        if computed:
            self.pool.touch(computed)
        new = self.pool.allocate(max(need, 0))
        blocks = self.req_blocks.setdefault(request.request_id, [])
        blocks.extend(computed)
        blocks.extend(new)
        if self.enable_prefix_caching:
            # Cache the full blocks this step will compute now: a request scheduled later in the
            # same step may share them, since every layer writes K/V before it attends.
            self._cache_full_blocks(request, blocks, total)
        return new

    def _cache_full_blocks(self, request: Request, blocks: list[KVBlock], num_tokens: int) -> None:
        request.update_block_hashes(self.block_size)
        full = min(num_tokens // self.block_size, len(request.block_hashes))
        done = self._num_hashed.get(request.request_id, 0)
        for i in range(done, full):
            self.pool.cache_block(blocks[i], request.block_hashes[i])
        self._num_hashed[request.request_id] = max(done, full)

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, [])]

    def free(self, request: Request) -> None:
        """Return the request's blocks, tail first, so the tail is evicted before the shared head."""
        blocks = self.req_blocks.pop(request.request_id, [])
        self._num_hashed.pop(request.request_id, None)
        self.pool.free(list(reversed(blocks)))

    def usage(self) -> float:
        return self.pool.num_used / self.pool.num_blocks
