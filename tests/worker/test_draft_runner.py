"""The draft model's bookkeeping (worker/draft_runner.py): what it has computed of a request,
and which blocks hold its KV of which prefix."""

from __future__ import annotations

from types import SimpleNamespace

from surge.core.scheduler_output import ScheduledRequest, SchedulerOutput
from surge.worker.draft_runner import DraftProposer

BS = 4


def proposer() -> DraftProposer:
    p = DraftProposer(SimpleNamespace(block_size=BS), vocab_size=100, max_chunk=64, min_probability=0.5)
    p._run = lambda step, depth: {r.request_id: (7, 0.9) for r in step if r.sample}  # no model: the bookkeeping only
    return p


def decoding(rid: str, context: list[int], blocks: list[int], num_draft: int = 2) -> ScheduledRequest:
    return ScheduledRequest(rid, [context[-1]] + [-1] * num_draft, len(context) - 1, blocks, True,
                            num_draft=num_draft)


def test_a_prefix_block_is_kept_until_the_draft_writes_into_it():
    p = proposer()
    ctx = list(range(10, 21))  # 11 tokens: two full blocks before the current token's block
    a = decoding("a", ctx, [5, 6, 7, 8])
    step = p.propose(SchedulerOutput(requests=[a]), {"a": ctx})
    assert step.requests[0].token_ids == [20, 7, 7] and p.proposed == {"a": 2}  # the placeholders filled in
    assert a.token_ids == [20, -1, -1]  # the scheduler's own step untouched
    assert p.computed["a"] == 11  # through the current token, before any verification
    assert set(p.held) == {5, 6}  # the full blocks through the current token
    b = decoding("b", ctx, [5, 6, 9, 10])  # the same prefix in the same blocks: kept
    assert p._kept(b, ctx) == 2 * BS
    other = decoding("c", ctx, [5, 11, 12, 13])  # block 5 again, then another
    assert p._kept(other, ctx) == BS
    changed = ctx[:5] + [99] + ctx[6:]  # another second block: only the first is the same prefix
    assert p._kept(decoding("d", changed, [5, 6, 9, 10]), changed) == BS
    # a pass that writes into block 6 (positions 4..7) for another prefix: block 6 holds nothing now
    p._timed([ScheduledRequest("e", [1, 2, 3], 4, [9, 6], True)], 1)
    assert 6 not in p.held and 5 in p.held
    assert p._kept(b, ctx) == BS


def test_a_doubted_proposal_ends_the_requests_proposals():
    p = proposer()
    probs = {1: 0.9, 2: 0.3, 3: 0.9}  # the second proposal doubted
    p._run = lambda step, depth: {r.request_id: (depth, probs[depth]) for r in step if r.sample}
    ctx = list(range(10, 21))
    a = decoding("a", ctx, [5, 6, 7, 8], num_draft=3)
    got = p.propose(SchedulerOutput(requests=[a]), {"a": ctx}).requests[0]
    assert got.token_ids == [20, 1] and got.num_draft == 1 and p.proposed == {"a": 1}
    assert p.decode_passes == 1  # the second pass (one token) ran, the third did not
    probs[1] = 0.1
    b = decoding("b", ctx, [5, 6, 7, 8], num_draft=3)
    got = p.propose(SchedulerOutput(requests=[b]), {"b": ctx}).requests[0]
    assert got.token_ids == [20] and got.num_draft == 0 and p.proposed == {"b": 0}


def test_settle_trusts_the_accepted_proposals_only():
    p = proposer()
    p.settle("a", 10, num_draft=4, accepted=2)
    assert p.computed["a"] == 13  # 10 (current), 11 and 12 (accepted proposals fed to the draft)
    p.settle("a", 10, num_draft=4, accepted=4)
    assert p.computed["a"] == 14  # the last proposal was never fed
    p.forget("a")
    assert "a" not in p.computed


def test_ids_past_the_drafts_vocabulary_are_fed_as_zero():
    """A target whose embedding has rows the draft lacks (padding): such an id reaches the draft
    as 0 instead of indexing past its table; the proposal is the draft's to make, as ever."""
    p = DraftProposer(SimpleNamespace(block_size=BS), vocab_size=100, max_chunk=64, draft_vocab_size=50)
    fed = []
    p._run = lambda step, depth: fed.extend(t for r in step for t in r.token_ids) or \
        {r.request_id: (7, 0.9) for r in step if r.sample}
    ctx = [10, 60, 20, 99]
    p.propose(SchedulerOutput(requests=[decoding("a", ctx, [5, 6], num_draft=1)]), {"a": ctx})
    assert fed == [10, 0, 20, 0]
