"""Steps in flight (pipeline parallelism hands out the next batch before the last one's tokens
are back): a request in a step whose result has not come back is never scheduled again, never
preempted, and the runner hears of it finishing only once that step is back."""

from __future__ import annotations

from surge.config import CacheConfig, SchedulerConfig
from surge.core.request import FinishReason, Request
from surge.core.scheduler import Scheduler

BS = 4


def req(rid: str, tokens: int, max_tokens: int = 4) -> Request:
    return Request(rid, list(range(100, 100 + tokens)), max_tokens)


def sched(num_blocks: int = 16, **kw) -> Scheduler:
    args = dict(max_num_seqs=8, max_num_batched_tokens=64)
    args.update(kw)
    return Scheduler(SchedulerConfig(**args), CacheConfig(block_size=BS), num_blocks)


def ids(out) -> list[str]:
    return [r.request_id for r in out.requests]


def land(s: Scheduler, out, token: int = 7) -> None:
    s.update(out, {r.request_id: token for r in out.requests if r.sample})


def test_a_request_in_flight_is_not_scheduled_again_until_its_step_lands():
    s = sched()
    s.add_request(req("a", 6))
    first = s.schedule()
    assert ids(first) == ["a"] and s.in_flight == {"a"}
    s.add_request(req("b", 5))
    second = s.schedule()  # a's token is not back: only the newcomer
    assert ids(second) == ["b"] and s.in_flight == {"a", "b"}
    assert ids(s.schedule()) == []  # everything in flight: an empty step
    land(s, first)
    third = s.schedule()
    assert ids(third) == ["a"]
    assert third.requests[0].start_position == 6 and third.requests[0].token_ids == [7]
    land(s, second)
    land(s, third)
    assert ids(s.schedule()) == ["a", "b"]


def test_chunks_of_one_prompt_are_never_in_two_steps_at_once():
    s = sched(max_num_batched_tokens=8)
    s.add_request(req("long", 20))
    chunks = []
    while True:
        out = s.schedule()
        if not out.requests:
            break
        chunks.append(out)
        assert ids(s.schedule()) == []  # the next chunk waits for this one to land
        land(s, out)
    assert [(c.requests[0].start_position, len(c.requests[0].token_ids)) for c in chunks[:3]] == [(0, 8), (8, 8),
                                                                                                  (16, 4)]


def test_a_request_finished_in_flight_is_forgotten_after_its_step_lands():
    s = sched()
    s.add_request(req("a", 4))
    s.add_request(req("b", 4))
    first = s.schedule()
    s.finish(next(r for r in s.running if r.request_id == "a"), FinishReason.ABORT)
    # the runner still has a's step to finish: it must keep a's state until then
    assert s.schedule().finished_request_ids == []
    land(s, first)
    out = s.schedule()
    assert out.finished_request_ids == ["a"] and ids(out) == ["b"]


def test_a_request_in_flight_is_never_preempted():
    s = sched(num_blocks=3)  # 12 tokens of cache
    s.add_request(req("a", 8, max_tokens=4))  # 2 blocks
    first = s.schedule()
    s.add_request(req("b", 4, max_tokens=4))  # 1 block: the last free one
    second = s.schedule()
    assert ids(second) == ["b"]
    land(s, first)
    # a needs a third block at its 9th token; none is free and b, the newest (the one to
    # preempt), is in flight: a waits rather than preempt anything now
    assert ids(s.schedule()) == [] and s.stats.num_preemptions == 0
    land(s, second)
    out = s.schedule()  # b is back: now it gives way
    assert ids(out) == ["a"] and out.preempted_request_ids == ["b"] and s.stats.num_preemptions == 1


def test_with_two_steps_in_flight_each_takes_half_the_requests():
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), CacheConfig(block_size=BS), 32,
                  max_in_flight=2)
    for name in "abcd":
        s.add_request(req(name, 3))
    first, second = s.schedule(), s.schedule()
    assert ids(first) == ["a", "b"] and ids(second) == ["c", "d"]
    land(s, first)
    assert ids(s.schedule()) == ["a", "b"]
