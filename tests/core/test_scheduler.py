"""Scheduler and block pool, pure Python with exact block ids."""

from __future__ import annotations

import sys

import pytest

from surge.core.request import FinishReason, Request, RequestStatus
from surge.core.scheduler import Scheduler
from surge.errors import InvalidArgumentError


def _req(rid: str, n: int, max_tokens: int = 4) -> Request:
    return Request(rid, list(range(100, 100 + n)), max_tokens)


def test_core_does_not_import_torch():
    import subprocess

    code = "import sys, surge.core.scheduler; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_prefill_then_decode_with_exact_blocks():
    s = Scheduler(num_blocks=8, block_size=4, max_num_seqs=4, max_num_batched_tokens=64)
    s.add_request(_req("a", 6, max_tokens=3))  # lifetime 9 tokens -> 3 blocks
    s.add_request(_req("b", 3, max_tokens=1))  # 4 tokens -> 1 block
    out = s.schedule()
    assert [(r.request_id, r.start_position, len(r.token_ids), r.block_ids) for r in out.requests] == [
        ("a", 0, 6, [0, 1, 2]),
        ("b", 0, 3, [3]),
    ]
    changed = s.update(out, {"a": 7, "b": 8})
    assert [r.request_id for r in changed] == ["a", "b"]
    s.finish(changed[1], FinishReason.LENGTH)
    out = s.schedule()
    assert [(r.request_id, r.token_ids, r.start_position) for r in out.requests] == [("a", [7], 6)]
    assert out.finished_request_ids == ["b"]
    assert s.pool.num_free == 5
    s.finish(changed[0], FinishReason.STOP)
    assert s.all_blocks_free() and not s.has_unfinished()


def test_waiting_request_admitted_when_blocks_free():
    s = Scheduler(num_blocks=4, block_size=4, max_num_seqs=8, max_num_batched_tokens=64)
    a, b = _req("a", 8, 4), _req("b", 8, 4)  # 3 blocks each; only one fits
    s.add_request(a)
    s.add_request(b)
    assert [r.request_id for r in s.schedule().requests] == ["a"]
    assert b.status is RequestStatus.WAITING
    s.finish(a, FinishReason.ABORT)
    out = s.schedule()
    assert [(r.request_id, r.block_ids) for r in out.requests] == [("b", [3, 0, 1])]


def test_token_budget_and_max_num_seqs():
    s = Scheduler(num_blocks=64, block_size=4, max_num_seqs=2, max_num_batched_tokens=10)
    for i in range(3):
        s.add_request(_req(str(i), 6))
    out = s.schedule()
    assert [r.request_id for r in out.requests] == ["0"]  # 6 + 6 > 10
    s.update(out, {"0": 1})
    out = s.schedule()  # "0" decodes 1 token, "1" prefills 6; "2" waits on max_num_seqs
    assert [(r.request_id, len(r.token_ids)) for r in out.requests] == [("0", 1), ("1", 6)]
    assert len(s.running) == 2 and len(s.waiting) == 1


def test_request_larger_than_cache_is_refused():
    s = Scheduler(num_blocks=2, block_size=4, max_num_seqs=2, max_num_batched_tokens=64)
    with pytest.raises(InvalidArgumentError, match="needs 3 KV blocks"):
        s.add_request(_req("big", 8, 4))
