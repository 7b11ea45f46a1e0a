"""Chained block hashes for prefix caching.

A full block is identified by (hash of the block before it, its token ids, extra keys), so
equal hashes mean equal whole prefixes, not just equal blocks:

    block 0: h0 = H(None, t[0:16], extra)
    block 1: h1 = H(h0,   t[16:32], extra)   ... a hit on h1 implies t[0:32] matched

The token ids travel with the hash so a hit is confirmed by comparing tokens, never by the
hash value alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class BlockHash:
    value: int
    parent: int | None
    token_ids: tuple[int, ...]
    extra: Any = None

    def matches(self, other: "BlockHash") -> bool:
        """Same hash, same parent, same tokens, same extra keys: a confirmed hit."""
        return (
            self.value == other.value
            and self.parent == other.parent
            and self.token_ids == other.token_ids
            and self.extra == other.extra
        )


def hash_block_tokens(parent: BlockHash | None, token_ids: list[int] | tuple[int, ...], extra: Any = None) -> BlockHash:
    tokens = tuple(token_ids)
    parent_value = parent.value if parent is not None else None
    return BlockHash(hash((parent_value, tokens, extra)), parent_value, tokens, extra)
