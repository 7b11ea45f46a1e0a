"""The data-parallel router, pure Python: affinity, balance, weights, explicit routes, failures."""

import random
from collections import OrderedDict

import pytest

from surge.core.router import Router, RouterConfig, prompt_block_hashes
from surge.errors import InvalidArgumentError

BS = 16


def family_prompt(family: int, variant: int, shared: int = 12) -> list[int]:
    """A prompt of `shared` blocks common to its family, then a few tokens of its own."""
    head = [(family * 1000 + i) % 30000 + 1 for i in range(shared * BS)]
    return head + [40000 + variant * 7 + j for j in range(5 + variant % 11)]


def test_short_prompts_rotate_between_idle_replicas():
    router = Router(3, RouterConfig(block_size=BS))
    chosen = []
    for _ in range(6):
        route = router.route([1, 2, 3])
        chosen.append(route.replica)
        router.finished(route.replica)
    assert chosen == [0, 1, 2, 0, 1, 2]
    assert all(r.reason == "load" for r in [router.route([5])])


def test_a_shared_prefix_goes_where_it_was_sent():
    router = Router(2, RouterConfig(block_size=BS))
    first = router.route(family_prompt(1, 0))
    router.finished(first.replica)
    other = router.route(family_prompt(2, 0))
    router.finished(other.replica)
    assert other.replica != first.replica  # nothing shared: the idle rotation
    again = router.route(family_prompt(1, 5))
    assert again.replica == first.replica and again.reason == "affinity"
    assert again.matched_tokens == 12 * BS


def test_affinity_needs_the_threshold_of_the_prompt():
    router = Router(2, RouterConfig(block_size=BS, affinity_threshold=0.5))
    base = list(range(1, 2 * BS + 1))
    first = router.route(base)
    router.finished(first.replica)
    # 2 of 10 blocks shared: below half, so the rotation decides
    longer = base + list(range(5000, 5000 + 8 * BS))
    route = router.route(longer)
    assert route.reason == "load" and route.replica != first.replica


def test_load_wins_over_affinity_when_imbalanced_by_both_thresholds():
    router = Router(2, RouterConfig(block_size=BS, balance_abs=4, balance_rel=1.5))
    home = router.route(family_prompt(1, 0)).replica
    routes = [router.route(family_prompt(1, v)) for v in range(1, 12)]  # none finishes
    # the family stays home until home is 5 ahead of an idle replica (abs 4, rel 1.5x of 0 + 1)
    assert [r.replica for r in routes[:4]] == [home] * 4
    assert all(r.reason == "affinity" for r in routes[:4])
    moved = [r for r in routes if r.replica != home]
    assert moved and moved[0].reason == "load"
    counters = router.counters()
    assert counters[home].by_affinity >= 4 and counters[1 - home].by_load >= 1
    assert sum(c.outstanding for c in counters) == 12


def test_explicit_replica_and_its_errors():
    router = Router(2, RouterConfig(block_size=BS))
    assert router.route([1, 2], replica=1) == router.route([1, 2], replica=1).__class__(1, "explicit", 0)
    with pytest.raises(InvalidArgumentError, match="out of range: there are 2 replicas"):
        router.route([1], replica=2)
    with pytest.raises(InvalidArgumentError, match="out of range"):
        router.route([1], replica=-1)
    router.set_up(0, False)
    with pytest.raises(InvalidArgumentError, match="that replica is down"):
        router.route([1], replica=0)
    assert router.counters()[1].explicit == 2


def test_down_replicas_get_nothing_and_come_back_empty():
    router = Router(2, RouterConfig(block_size=BS))
    home = router.route(family_prompt(3, 0)).replica
    router.set_up(home, False)
    assert not router.is_up(home) and router.any_up()
    for v in range(5):
        route = router.route(family_prompt(3, v))
        assert route.replica == 1 - home
        router.finished(route.replica)
    router.set_up(home, True)
    # its affinity table died with it; the family now lives on the other replica
    route = router.route(family_prompt(3, 9))
    assert route.replica == 1 - home and route.reason == "affinity"
    assert router.counters()[home].outstanding == 0
    router.set_up(1 - home, False)
    router.set_up(home, False)
    with pytest.raises(InvalidArgumentError, match="no replica is up"):
        router.route([1, 2, 3])


def test_exclude_leaves_a_replica_out():
    router = Router(3, RouterConfig(block_size=BS))
    assert router.route([1], exclude=frozenset({0})).replica == 1
    with pytest.raises(InvalidArgumentError, match="no replica"):
        router.route([1], exclude=frozenset({0, 1, 2}))


def test_a_slow_replica_loses_share_within_bounds():
    cfg = RouterConfig(block_size=BS, window=10, min_weight=0.25)
    router = Router(2, cfg)
    shares = []
    for rounds in range(40):
        counts = [0, 0]
        for _ in range(20):
            route = router.route([rounds, 1, 2])
            counts[route.replica] += 1
            router.finished(route.replica, seconds=0.3 if route.replica == 1 else 0.1, output_tokens=10)
        shares.append(counts[1] / 20)
    weights = [c.weight for c in router.counters()]
    assert weights[1] < 1.0 < weights[0]
    assert weights[1] >= cfg.min_weight and weights[0] <= cfg.max_weight
    assert shares[-1] < 0.5 - 0.1  # below its fair share, the other above
    assert shares[-1] > 0  # never starved


def test_equal_replicas_keep_equal_weights():
    router = Router(2, RouterConfig(block_size=BS, window=8))
    for i in range(200):
        route = router.route([i])
        router.finished(route.replica, seconds=0.1 * (1 + 0.05 * (i % 3)), output_tokens=10)
    assert [c.weight for c in router.counters()] == [1.0, 1.0]


def simulated_hit_rate(choose, prompts, replicas: int, capacity_blocks: int) -> float:
    """Prompt tokens found in each replica's LRU prefix cache, as the engines would count them."""
    caches = [OrderedDict() for _ in range(replicas)]
    hits = total = 0
    for n, ids in enumerate(prompts):
        i = choose(n, ids)
        hashes = prompt_block_hashes(ids, BS)
        for h in hashes:
            if h.value not in caches[i]:
                break
            hits += BS
        total += len(ids)
        for h in hashes:
            caches[i][h.value] = None
            caches[i].move_to_end(h.value)
        while len(caches[i]) > capacity_blocks:
            caches[i].popitem(last=False)
    return hits / total


def test_affinity_beats_round_robin_on_interleaved_families():
    rng = random.Random(0)
    prompts = [family_prompt(rng.randrange(8), v) for v in range(400)]
    router = Router(2, RouterConfig(block_size=BS))

    def routed(n: int, ids: list[int]) -> int:
        route = router.route(ids)
        router.finished(route.replica)
        return route.replica

    # each replica's cache holds ~3 families' prefixes: 8 families fit only when split
    affinity = simulated_hit_rate(routed, prompts, 2, capacity_blocks=64)
    round_robin = simulated_hit_rate(lambda n, ids: n % 2, prompts, 2, capacity_blocks=64)
    assert affinity >= 1.5 * round_robin
    counters = router.counters()
    assert all(c.routed > 400 / 3 for c in counters)


def test_bad_router_sizes():
    with pytest.raises(InvalidArgumentError, match="at least one replica"):
        Router(0)


def test_added_replicas_take_traffic_once_up_and_drained_ones_none():
    router = Router(1, RouterConfig(block_size=BS))
    index = router.add_replica()
    assert index == 1 and router.num_replicas == 2
    with pytest.raises(InvalidArgumentError, match="down or starting"):
        router.route([1, 2, 3], replica=1)
    assert {router.route([i]).replica for i in range(4)} == {0}  # still starting
    router.set_up(1, True)
    assert router.route([9]).replica == 1  # the idle one
    router.drain(1)
    with pytest.raises(InvalidArgumentError, match="being removed"):
        router.check(1)
    assert {router.route([i]).replica for i in range(4)} == {0}
    router.finished(1)
    assert router.counters()[1].outstanding == 0  # what it held still ends there
    router.remove_replica()
    assert router.num_replicas == 1
    with pytest.raises(InvalidArgumentError, match="at least one"):
        router.remove_replica()
