"""N-gram proposals (prompt lookup): a request's next tokens guessed from its own context.

Where the last n tokens of a request (n from `max_n` down to `min_n`) occurred before in its
prompt or output, the tokens that followed that occurrence are proposed: code being edited,
a document quoted or summarised, a list being continued repeat their own text. The longest
match wins and, among equally long ones, the latest.

Each request keeps an index from a token to the positions where it occurs, extended as tokens
arrive, so a proposal costs the occurrences of the last token checked backwards (at most
MAX_CANDIDATES of them, the latest), not a scan of the context.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from surge.core.request import Request

MAX_CANDIDATES = 128  # latest occurrences of the last token tried per proposal


@dataclass(slots=True)
class _Context:
    tokens: list[int] = field(default_factory=list)
    where: dict[int, list[int]] = field(default_factory=dict)  # token -> its positions, ascending


class NgramProposer:
    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n
        self._contexts: dict[str, _Context] = {}

    def propose(self, request: Request, k: int) -> list[int]:
        """Up to k tokens that followed the latest longest match of the request's last n tokens."""
        if k <= 0:
            return []
        ctx = self._sync(request)
        tokens = ctx.tokens
        last = len(tokens) - 1
        if last < 1:
            return []
        best_len, best_at = 0, -1
        seen = ctx.where.get(tokens[last], ())
        # occurrences before the last token itself, latest first
        stop = len(seen) - 1 if seen and seen[-1] == last else len(seen)
        for i in range(stop - 1, max(stop - 1 - MAX_CANDIDATES, -1), -1):
            p = seen[i]
            n = 1
            while n < self.max_n and p - n >= 0 and tokens[p - n] == tokens[last - n]:
                n += 1
            if n > best_len:
                best_len, best_at = n, p
                if n == self.max_n:
                    break
        if best_len < self.min_n:
            return []
        return tokens[best_at + 1: best_at + 1 + k]

    def forget(self, request_id: str) -> None:
        self._contexts.pop(request_id, None)

    def _sync(self, request: Request) -> _Context:
        """The request's context index, extended by the tokens it gained since the last call
        (and rebuilt if it lost some: output taken back after a stop)."""
        ctx = self._contexts.get(request.request_id)
        total = request.num_tokens
        if ctx is None or len(ctx.tokens) > total:
            ctx = self._contexts[request.request_id] = _Context()
        start = len(ctx.tokens)
        if start < total:
            new = request.token_slice(start, total)
            ctx.tokens.extend(new)
            where = ctx.where
            for offset, token in enumerate(new, start):
                positions = where.get(token)
                if positions is None:
                    where[token] = [offset]
                else:
                    positions.append(offset)
        return ctx
