"""The pool of KV-cache blocks: reference counts, the free queue in eviction order, the prefix cache.

A block is in one of three states:

    in use        ref_cnt > 0                  not in the free queue
    cached free   ref_cnt == 0, has a hash     in the free queue, still findable by hash
    free          ref_cnt == 0, no hash        in the free queue

Allocation takes from the head of the free queue (least recently freed first); taking a
cached-free block evicts its hash. Freed blocks go to the tail, so the cache is LRU.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from surge.core.prefix_hash import BlockHash


@dataclass(slots=True, eq=False)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None


class BlockPool:
    """Blocks [0, num_blocks); with `enable_caching`, full blocks stay findable until evicted."""

    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks <= 0:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[int, KVBlock] = {}  # hash value -> block
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (free or cached-free)."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def lookup(self, block_hash: BlockHash) -> KVBlock | None:
        """The cached block holding exactly this prefix block, if any (token-checked)."""
        block = self._cached.get(block_hash.value)
        if block is not None and block.block_hash is not None and block.block_hash.matches(block_hash):
            return block
        return None

    def touch(self, blocks: list[KVBlock]) -> None:
        """Take a reference on cached blocks a new request shares."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def allocate(self, count: int) -> list[KVBlock]:
        if count > len(self._free):
            raise MemoryError(f"asked for {count} KV blocks, {len(self._free)} free")
        out = []
        for _ in range(count):
            _, block = self._free.popitem(last=False)
            if block.block_hash is not None:
                self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def _evict(self, block: KVBlock) -> None:
        assert block.block_hash is not None
        if self._cached.get(block.block_hash.value) is block:
            del self._cached[block.block_hash.value]
        block.block_hash = None
        self.num_evictions += 1

    def free(self, blocks: list[KVBlock]) -> None:
        """Drop one reference from each block; unreferenced ones join the tail of the queue.

        Callers pass a request's blocks last-first, so a sequence's tail (least likely to be
        shared) is evicted before its head.
        """
        for block in blocks:
            block.ref_cnt -= 1
            assert block.ref_cnt >= 0, f"block {block.block_id} freed twice"
            if block.ref_cnt == 0:
                if block.block_hash is None or not self.enable_caching:
                    block.block_hash = None
                self._free[block.block_id] = block

    def cache_block(self, block: KVBlock, block_hash: BlockHash) -> None:
        """Make a full block findable by its hash (first writer wins on duplicates)."""
        if not self.enable_caching or block.block_hash is not None:
            return
        block.block_hash = block_hash
        self._cached.setdefault(block_hash.value, block)

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (after a failed step whose blocks may hold garbage)."""
        for block in self.blocks:
            block.block_hash = None
        self._cached.clear()

    def all_free(self) -> bool:
        """Idle self-check: every block unreferenced and in the free queue exactly once."""
        return len(self._free) == self.num_blocks and all(b.ref_cnt == 0 for b in self.blocks)
