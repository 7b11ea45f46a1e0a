"""Which data-parallel replica a request goes to: prefix affinity, load balance, adaptive weights.

Pure Python, no torch: the front process of `surge serve --data-parallel-size N` asks it once
per request and tells it when each request ends.

    route(prompt ids)
      explicit replica asked (X-Surge-Replica / data_parallel_rank)  -> that one ("explicit")
      longest cached prefix: each replica's recently routed prompts as surge's own chained block
        hashes (a bounded LRU per replica); the replica holding the most leading blocks of the
        prompt, when they are at least `affinity_threshold` of its full blocks      ("affinity")
        ... unless that replica is busier than the least loaded one by both `balance_abs`
        requests and `balance_rel` times                                            ("load")
      otherwise the least loaded by outstanding requests over weight, then by smooth weighted
        round robin (each replica's credit grows by its weight per request, the chosen one's
        falls by the sum: shares follow the weights when nothing is outstanding)     ("load")

Adaptive weights: every `window` finished requests, each replica's mean seconds per output
token is compared with the mean over replicas; above 1.2x its weight shrinks by 10%, below 0.8x
it grows by 10%, kept within [min_weight, max_weight] so no replica starves.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from surge.core.prefix_hash import BlockHash, hash_block_tokens
from surge.errors import InvalidArgumentError

__all__ = ["ReplicaCounters", "Route", "Router", "RouterConfig", "prompt_block_hashes"]


@dataclass(frozen=True)
class RouterConfig:
    block_size: int = 16
    affinity_threshold: float = 0.3  # fraction of a prompt's full blocks the best replica must hold
    lru_blocks: int = 16384  # block hashes remembered per replica
    balance_abs: int = 4  # outstanding requests more than the least loaded ...
    balance_rel: float = 1.5  # ... and this many times its load (+1): load wins over affinity
    window: int = 32  # finished requests between weight adjustments
    slow: float = 1.2  # a replica this much slower than the mean per token loses share
    fast: float = 0.8  # this much faster gains share
    step: float = 0.1  # share moved per adjustment
    min_weight: float = 0.25
    max_weight: float = 4.0


@dataclass
class ReplicaCounters:
    """What the router has done with one replica (for /metrics and the dashboard)."""

    routed: int = 0
    by_affinity: int = 0
    by_load: int = 0
    explicit: int = 0
    finished: int = 0
    outstanding: int = 0
    weight: float = 1.0
    up: bool = True
    draining: bool = False  # up, finishing what it holds, given nothing new (it is being removed)


@dataclass(frozen=True)
class Route:
    replica: int
    reason: str  # "affinity" | "load" | "explicit"
    matched_tokens: int  # leading prompt tokens the chosen replica was last sent (affinity's measure)


def prompt_block_hashes(token_ids: list[int], block_size: int, salt: Any = None) -> list[BlockHash]:
    """The chained hashes of a prompt's full blocks, as the replicas' prefix caches compute them."""
    hashes: list[BlockHash] = []
    parent = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block_tokens(parent, token_ids[start:start + block_size], salt)
        hashes.append(parent)
    return hashes


@dataclass
class _Replica:
    counters: ReplicaCounters = field(default_factory=ReplicaCounters)
    blocks: OrderedDict = field(default_factory=OrderedDict)  # hash value -> None, least recent first
    seconds_per_token: list[float] = field(default_factory=list)  # finished requests in this window


class Router:
    def __init__(self, num_replicas: int, config: RouterConfig | None = None):
        if num_replicas < 1:
            raise InvalidArgumentError(f"a router needs at least one replica, got {num_replicas}")
        self.config = config or RouterConfig()
        self._replicas = [_Replica() for _ in range(num_replicas)]
        self._credit = [0.0] * num_replicas  # smooth weighted round robin
        self._finished_in_window = 0

    @property
    def num_replicas(self) -> int:
        return len(self._replicas)

    # ---- replicas going down and up ------------------------------------------------------

    def set_up(self, replica: int, up: bool) -> None:
        """A replica down gets no requests; one coming back starts with an empty affinity table
        (its prefix cache died with it) and its outstanding count cleared."""
        r = self._replicas[replica]
        if not up:
            r.blocks.clear()
            r.counters.outstanding = 0
        r.counters.up = up
        self._credit = [0.0] * len(self._replicas)

    def add_replica(self) -> int:
        """A new replica slot (down until set_up): its index."""
        self._replicas.append(_Replica(ReplicaCounters(up=False)))
        self._credit = [0.0] * len(self._replicas)
        return len(self._replicas) - 1

    def remove_replica(self) -> None:
        """Drop the last replica slot (a replica scaled away)."""
        if len(self._replicas) == 1:
            raise InvalidArgumentError("a router keeps at least one replica")
        self._replicas.pop()
        self._credit = [0.0] * len(self._replicas)

    def drain(self, replica: int) -> None:
        """Route nothing new to `replica`; it finishes what it holds."""
        self._replicas[replica].counters.draining = True

    def is_up(self, replica: int) -> bool:
        return self._routable(replica)

    def any_up(self) -> bool:
        return any(self._routable(i) for i in range(len(self._replicas)))

    def _routable(self, i: int) -> bool:
        c = self._replicas[i].counters
        return c.up and not c.draining

    # ---- routing ----------------------------------------------------------------------

    def route(self, token_ids: list[int], salt: Any = None, replica: int | None = None,
              exclude: frozenset[int] = frozenset()) -> Route:
        """Choose a replica for a prompt and count it as outstanding there. `replica` forces one
        (refused when out of range or down); `exclude` leaves some out (a retry after a failure).
        Raises InvalidArgumentError when no replica can take it."""
        cfg = self.config
        hashes = prompt_block_hashes(token_ids, cfg.block_size, salt)
        if replica is not None:
            self.check(replica)
            return self._take(replica, "explicit", self._matched(replica, hashes), hashes)
        live = [i for i in range(len(self._replicas)) if self._routable(i) and i not in exclude]
        if not live:
            raise InvalidArgumentError("no replica is up to take the request")
        least = min(live, key=self._order_key(live))
        if hashes:
            matches = {i: self._matched(i, hashes) for i in live}
            best = max(live, key=lambda i: (matches[i], -self._load(i)))
            blocks = matches[best] // cfg.block_size
            if blocks >= 1 and blocks >= cfg.affinity_threshold * len(hashes):
                if not self._imbalanced(best, least):
                    return self._take(best, "affinity", matches[best], hashes)
        return self._take(least, "load", self._matched(least, hashes), hashes)

    def check(self, replica: int) -> None:
        """Raise InvalidArgumentError unless `replica` exists and is up."""
        if not 0 <= replica < len(self._replicas):
            raise InvalidArgumentError(
                f"data_parallel_rank {replica} is out of range: there are {len(self._replicas)} replicas "
                f"(0..{len(self._replicas) - 1})")
        c = self._replicas[replica].counters
        if not c.up:
            raise InvalidArgumentError(f"data_parallel_rank {replica}: that replica is down or starting")
        if c.draining:
            raise InvalidArgumentError(f"data_parallel_rank {replica}: that replica is being removed")

    def _load(self, i: int) -> float:
        c = self._replicas[i].counters
        return c.outstanding / c.weight

    def _order_key(self, live: list[int]):  # type: ignore[no-untyped-def]
        """Least loaded first (outstanding over weight), then the most credit, then the lowest index."""
        def key(i: int) -> tuple[float, float, int]:
            c = self._replicas[i].counters
            return c.outstanding / c.weight, -self._credit[i], i

        return key

    def _imbalanced(self, target: int, least: int) -> bool:
        cfg = self.config
        busy, idle = self._load(target), self._load(least)
        return busy - idle > cfg.balance_abs and busy > cfg.balance_rel * (idle + 1)

    def _matched(self, i: int, hashes: list[BlockHash]) -> int:
        """Leading prompt tokens whose blocks this replica was sent recently."""
        blocks = self._replicas[i].blocks
        n = 0
        for h in hashes:
            if h.value not in blocks:
                break
            n += 1
        return n * self.config.block_size

    def _take(self, i: int, reason: str, matched: int, hashes: list[BlockHash]) -> Route:
        r = self._replicas[i]
        c = r.counters
        c.routed += 1
        c.outstanding += 1
        if reason == "affinity":
            c.by_affinity += 1
        elif reason == "load":
            c.by_load += 1
        else:
            c.explicit += 1
        for h in hashes:
            r.blocks[h.value] = None
            r.blocks.move_to_end(h.value)
        while len(r.blocks) > self.config.lru_blocks:
            r.blocks.popitem(last=False)
        live = [j for j in range(len(self._replicas)) if self._routable(j)]
        for j in live:
            self._credit[j] += self._replicas[j].counters.weight
        self._credit[i] -= sum(self._replicas[j].counters.weight for j in live)
        return Route(i, reason, matched)

    # ---- completions and weights ------------------------------------------------------

    def finished(self, replica: int, seconds: float | None = None, output_tokens: int = 0) -> None:
        """A routed request ended on `replica` (any outcome). With its time and output tokens it
        counts toward the replica's measured speed."""
        r = self._replicas[replica]
        r.counters.outstanding = max(0, r.counters.outstanding - 1)
        r.counters.finished += 1
        if seconds is None or output_tokens <= 0:
            return
        r.seconds_per_token.append(seconds / output_tokens)
        self._finished_in_window += 1
        if self._finished_in_window >= self.config.window:
            self._adjust()

    def _adjust(self) -> None:
        cfg = self.config
        self._finished_in_window = 0
        measured = {i: sum(r.seconds_per_token) / len(r.seconds_per_token)
                    for i, r in enumerate(self._replicas) if r.seconds_per_token and self._routable(i)}
        if len(measured) >= 2:
            mean = sum(measured.values()) / len(measured)
            for i, speed in measured.items():
                c = self._replicas[i].counters
                if speed > cfg.slow * mean:
                    c.weight = max(cfg.min_weight, c.weight * (1 - cfg.step))
                elif speed < cfg.fast * mean:
                    c.weight = min(cfg.max_weight, c.weight * (1 + cfg.step))
        for r in self._replicas:
            r.seconds_per_token.clear()

    def counters(self) -> list[ReplicaCounters]:
        """A copy of each replica's counters."""
        return [ReplicaCounters(**vars(r.counters)) for r in self._replicas]
