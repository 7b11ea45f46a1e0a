"""The pool of KV-cache blocks: which are free, handed out lowest id first."""

from __future__ import annotations

from collections import deque


class BlockPool:
    """Fixed set of block ids [0, num_blocks); a block is either free or owned by one request."""

    def __init__(self, num_blocks: int):
        if num_blocks <= 0:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise MemoryError(f"asked for {count} KV blocks, {len(self._free)} free")
        return [self._free.popleft() for _ in range(count)]

    def free(self, block_ids: list[int]) -> None:
        self._free.extend(block_ids)

    def all_free(self) -> bool:
        return len(self._free) == self.num_blocks and len(set(self._free)) == self.num_blocks
