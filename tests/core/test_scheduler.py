"""Scheduler, KV cache manager and block pool: pure Python, exact block ids."""

from __future__ import annotations

import subprocess
import sys

import pytest

from surge.core.block_pool import BlockPool
from surge.core.prefix_hash import hash_block_tokens
from surge.core.request import FinishReason, Request, RequestStatus
from surge.config import CacheConfig, SchedulerConfig
from surge.core.scheduler import Scheduler
from surge.errors import InvalidArgumentError

BS = 4


def req(rid: str, tokens, max_tokens: int = 4, arrival: float = 0.0, priority: int = 0) -> Request:
    tokens = list(range(100, 100 + tokens)) if isinstance(tokens, int) else list(tokens)
    return Request(rid, tokens, max_tokens, arrival=arrival, priority=priority)


def sched(num_blocks: int = 8, block_size: int = BS, enable_prefix_caching: bool = True, **kw) -> Scheduler:
    args = dict(max_num_seqs=8, max_num_batched_tokens=64)
    args.update(kw)
    cache = CacheConfig(block_size=block_size, enable_prefix_caching=enable_prefix_caching)
    return Scheduler(SchedulerConfig(**args), cache, num_blocks)


def run_step(s: Scheduler, token: int = 1):
    """Schedule, then pretend the model ran: every sampling request gets `token`."""
    out = s.schedule()
    s.update(out, {r.request_id: token for r in out.requests if r.sample})
    return out


def layout(out):
    return [(r.request_id, r.start_position, len(r.token_ids), r.block_ids, r.sample) for r in out.requests]


def test_core_does_not_import_torch():
    code = "import sys, surge.core.scheduler; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---- block pool ---------------------------------------------------------------------------


def test_pool_allocates_lowest_first_and_frees_to_tail():
    pool = BlockPool(4)
    a = pool.allocate(2)
    assert [b.block_id for b in a] == [0, 1] and pool.num_free == 2
    pool.free(list(reversed(a)))  # tail first: block 1 then block 0
    assert [b.block_id for b in pool.allocate(4)] == [2, 3, 1, 0]
    with pytest.raises(MemoryError):
        pool.allocate(1)


def test_pool_lru_eviction_of_cached_blocks():
    pool = BlockPool(3)
    blocks = pool.allocate(3)
    hashes = []
    parent = None
    for i, b in enumerate(blocks):
        parent = hash_block_tokens(parent, [i] * BS)
        hashes.append(parent)
        pool.cache_block(b, parent)
    pool.free([blocks[2], blocks[1], blocks[0]])
    assert pool.num_free == 3 and pool.num_cached == 3
    # the first freed (block 2) is the first evicted
    (taken,) = pool.allocate(1)
    assert taken.block_id == 2 and pool.lookup(hashes[2]) is None and pool.num_evictions == 1
    assert pool.lookup(hashes[0]) is blocks[0]
    pool.touch([blocks[0]])  # a hit takes it out of the free queue
    assert pool.num_free == 1 and blocks[0].ref_cnt == 1
    assert [b.block_id for b in pool.allocate(1)] == [1]


def test_hash_lookup_checks_tokens_and_chain():
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    h = hash_block_tokens(None, [1, 2, 3, 4])
    pool.cache_block(b, h)
    assert pool.lookup(hash_block_tokens(None, [1, 2, 3, 4])) is b
    other_parent = hash_block_tokens(hash_block_tokens(None, [9, 9, 9, 9]), [1, 2, 3, 4])
    assert pool.lookup(other_parent) is None
    assert pool.lookup(hash_block_tokens(None, [1, 2, 3, 4], extra="lora-a")) is None


# ---- scheduling -----------------------------------------------------------------------------


def test_prefill_then_decode_with_exact_blocks():
    s = sched()
    s.add_request(req("a", 6, max_tokens=3))
    s.add_request(req("b", 3, max_tokens=1))
    out = run_step(s, token=7)
    assert layout(out) == [("a", 0, 6, [0, 1], True), ("b", 0, 3, [2], True)]
    assert out.requests[0].new is not None
    out = run_step(s, token=8)  # decode: one token each, a third block for "a" at position 8
    assert layout(out) == [("a", 6, 1, [0, 1], True), ("b", 3, 1, [2], True)]
    assert out.requests[0].new is None and out.requests[0].token_ids == [7]
    a, b = s.running
    s.finish(b, FinishReason.LENGTH)
    assert s.schedule().finished_request_ids == ["b"]
    s.finish(a, FinishReason.STOP)
    assert s.all_blocks_free() and not s.has_unfinished()


def test_chunked_prefill_within_budget():
    s = sched(max_num_batched_tokens=5)
    s.add_request(req("a", 12))
    s.add_request(req("b", 3))
    assert layout(run_step(s)) == [("a", 0, 5, [0, 1], False)]
    assert layout(run_step(s)) == [("a", 5, 5, [0, 1, 2], False)]
    # a finishes its prompt (2 tokens) and b starts with the 3 left in the budget
    assert layout(run_step(s)) == [("a", 10, 2, [0, 1, 2], True), ("b", 0, 3, [3], True)]
    assert layout(run_step(s)) == [("a", 12, 1, [0, 1, 2, 4], True), ("b", 3, 1, [3], True)]


def test_without_chunking_a_long_prompt_waits_for_budget():
    s = sched(max_num_batched_tokens=8, enable_chunked_prefill=False)
    s.add_request(req("a", 6))
    s.add_request(req("b", range(6)))
    assert [r.request_id for r in run_step(s).requests] == ["a"]
    with pytest.raises(InvalidArgumentError, match="max_num_batched_tokens"):
        s.add_request(req("c", 9))


def test_max_num_seqs():
    s = sched(max_num_seqs=2)
    for i in range(3):
        s.add_request(req(str(i), 2))
    assert [r.request_id for r in run_step(s).requests] == ["0", "1"]
    assert [r.request_id for r in s.waiting] == ["2"]


def test_prefix_cache_hit_computes_only_suffix_and_shares_blocks():
    s = sched(num_blocks=10)
    prompt = list(range(50, 61))  # 11 tokens: blocks [50..53] [54..57] + 3
    s.add_request(req("a", prompt))
    run_step(s)
    s.add_request(req("b", prompt[:8] + [1, 2, 3, 4, 5]))
    out = run_step(s)
    assert layout(out)[1] == ("b", 8, 5, [0, 1, 3, 4], True)  # blocks 0 and 1 shared
    (a, b) = s.running
    assert b.num_cached_tokens == 8 and s.kv.stats.hits == 8
    assert [blk.ref_cnt for blk in s.kv.req_blocks["a"][:2]] == [2, 2]
    s.finish(a, FinishReason.STOP)
    s.finish(b, FinishReason.STOP)
    assert s.all_blocks_free() and s.pool.num_cached >= 2
    # a whole-prompt hit still leaves the last token to compute
    s.add_request(req("c", prompt[:8]))
    out = run_step(s)
    assert layout(out) == [("c", 4, 4, [0, 5], True)]  # never-used block 5 before cached ones


def test_same_step_sharing_for_identical_prompts():
    """Blocks are cached when allocated, so a request later in the same step shares them."""
    s = sched(num_blocks=10)
    s.add_request(req("a", 9))
    s.add_request(req("b", 9))
    out = run_step(s)
    assert layout(out) == [("a", 0, 9, [0, 1, 2], True), ("b", 8, 1, [0, 1, 3], True)]


def test_prefix_caching_off():
    s = sched(num_blocks=10, enable_prefix_caching=False)
    s.add_request(req("a", 9))
    s.add_request(req("b", 9))
    assert layout(run_step(s))[1] == ("b", 0, 9, [3, 4, 5], True)


def test_preemption_newest_first_and_recompute():
    s = sched(num_blocks=4)
    s.add_request(req("old", 4, max_tokens=8, arrival=1.0))
    s.add_request(req("new", range(200, 204), max_tokens=8, arrival=2.0))
    assert layout(run_step(s)) == [("old", 0, 4, [0], True), ("new", 0, 4, [1], True)]
    for _ in range(4):  # positions 4..7: each takes a second block (2, 3)
        run_step(s)
    # position 8 needs a third block for "old": none free, so the newest is preempted
    out = run_step(s)
    assert out.preempted_request_ids == ["new"]
    assert layout(out) == [("old", 8, 1, [0, 2, 3], True)]
    new = s.waiting[0]
    assert new.status is RequestStatus.PREEMPTED and new.num_computed_tokens == 0
    assert s.stats.num_preemptions == 1 and len(new.output_token_ids) == 5
    old = s.running[0]
    s.finish(old, FinishReason.STOP)
    out = run_step(s)  # resumed: recomputes prompt + generated tokens (prefix cache hits first)
    (r,) = out.requests
    assert r.request_id == "new" and r.start_position + len(r.token_ids) == 9 and r.sample
    assert r.start_position == 4  # its prompt block survived in the prefix cache


def test_priority_policy_orders_waiting_and_picks_victims():
    s = sched(num_blocks=3, max_num_seqs=1, policy="priority")
    s.add_request(req("low", 2, arrival=1.0, priority=5))
    s.add_request(req("high", 2, arrival=2.0, priority=0))
    s.add_request(req("mid", 2, arrival=0.5, priority=1))
    assert [r.request_id for r in s.waiting] == ["high", "mid", "low"]
    assert [r.request_id for r in run_step(s).requests] == ["high"]

    s = sched(num_blocks=3, policy="priority")
    s.add_request(req("a", 4, max_tokens=8, priority=0))
    s.add_request(req("b", 4, max_tokens=8, priority=9))
    s.add_request(req("c", 4, max_tokens=8, priority=1))
    run_step(s)  # blocks 0,1,2
    out = run_step(s)  # everyone needs a second block: lowest priority "b" goes first
    assert out.preempted_request_ids[0] == "b"


def test_abort_frees_blocks_at_once():
    s = sched()
    s.add_request(req("a", 6))
    run_step(s)
    assert s.pool.num_free == 6
    s.finish(s.running[0], FinishReason.ABORT)
    assert s.pool.num_free == 8 and s.all_blocks_free()


def test_request_larger_than_cache_is_refused():
    s = sched(num_blocks=2)
    with pytest.raises(InvalidArgumentError, match="needs 3 KV blocks"):
        s.add_request(req("big", 8, 4))


def test_long_prefill_is_capped_only_while_others_decode():
    s = sched(num_blocks=64, max_num_batched_tokens=64, long_prefill_token_threshold=8)
    s.add_request(req("a", 3, max_tokens=20))
    assert layout(run_step(s)) == [("a", 0, 3, [0], True)]
    s.add_request(req("b", 40))
    # a decodes, so b's prompt advances 8 tokens a step, not the 63 left in the budget
    assert [(r.request_id, len(r.token_ids)) for r in run_step(s).requests] == [("a", 1), ("b", 8)]
    assert [(r.request_id, len(r.token_ids)) for r in run_step(s).requests] == [("a", 1), ("b", 8)]
    # alone, a long prompt takes the budget
    lone = sched(num_blocks=64, max_num_batched_tokens=64, long_prefill_token_threshold=8)
    lone.add_request(req("c", 40))
    assert layout(run_step(lone)) == [("c", 0, 40, list(range(10)), True)]


def test_long_prefill_cap_shrinks_with_the_context():
    """chunk = threshold * parity / (parity + context), at least one block."""
    s = sched(num_blocks=64, max_num_batched_tokens=64, long_prefill_token_threshold=16,
              attention_parity_tokens=16)
    s.add_request(req("a", 2, max_tokens=40))
    run_step(s)
    s.add_request(req("b", 60))
    chunks = []
    for _ in range(5):
        out = run_step(s)
        chunks += [len(r.token_ids) for r in out.requests if r.request_id == "b"]
    # context 0 -> 16, 16 -> 8, 24 -> 6 (256/40), 30 -> 5 (256/46), 35 -> 5 (256/51)
    assert chunks == [16, 8, 6, 5, 5]
    deep = sched(num_blocks=64, long_prefill_token_threshold=16, attention_parity_tokens=16)
    assert deep._prefill_cap(200) == BS  # never below one block
    with pytest.raises(InvalidArgumentError):
        sched(long_prefill_token_threshold=-1)
