"""Speculative decoding on the scheduler's side: n-gram proposals, which requests speculate and
how far, and proposed tokens scheduled, verified and taken back by the one num_computed rule."""

from __future__ import annotations

import pytest

from surge.config import CacheConfig, SchedulerConfig, SpeculativeConfig
from surge.core import speculation
from surge.core.ngram_proposer import NgramProposer
from surge.core.request import FinishReason, Request
from surge.core.scheduler import Scheduler
from surge.core.speculation import Speculator
from surge.errors import InvalidArgumentError

BS = 4


def req(rid: str, prompt: list[int], max_tokens: int = 32, speculate: bool = True) -> Request:
    return Request(rid, list(prompt), max_tokens, speculate=speculate)


def sched(num_blocks: int = 32, k: int = 4, **kw) -> Scheduler:
    args = dict(max_num_seqs=8, max_num_batched_tokens=64)
    args.update(kw)
    spec = SpeculativeConfig("ngram", k, 2, 3)
    return Scheduler(SchedulerConfig(**args), CacheConfig(block_size=BS), num_blocks, spec)


# ---- n-gram proposals --------------------------------------------------------------------


def test_proposes_what_followed_the_latest_longest_match():
    p = NgramProposer(2, 3)
    #            0  1  2  3  4  5  6  7  8  9 10 11
    r = req("a", [1, 2, 3, 9, 9, 7, 2, 3, 8, 5, 2, 3])
    # the last 3-gram [5, 2, 3] never occurred; 2-gram [2, 3] at 1..2 and 6..7: the latest wins
    assert p.propose(r, 4) == [8, 5, 2, 3]
    assert p.propose(r, 2) == [8, 5]
    r.output_token_ids.append(9)  # [.., 2, 3, 9]: the 3-gram [2, 3, 9] at 1..3 beats any 2-gram
    assert p.propose(r, 3) == [9, 7, 2]


def test_no_proposal_below_the_minimum_match():
    p = NgramProposer(2, 4)
    assert p.propose(req("a", [1, 2, 3, 4, 5]), 4) == []  # nothing repeats
    assert p.propose(req("b", [1, 2, 3, 1]), 4) == []  # a 1-gram only
    assert p.propose(req("c", [7]), 4) == [] and p.propose(req("d", [1, 2, 1, 2]), 0) == []


def test_the_index_follows_the_request_and_is_forgotten():
    p = NgramProposer(2, 2)
    r = req("a", [5, 6, 1, 2])
    assert p.propose(r, 2) == []
    r.output_token_ids += [5, 6]  # [5, 6] occurred at 0..1, followed by 1, 2
    assert p.propose(r, 2) == [1, 2]
    del r.output_token_ids[1:]  # output taken back (past a stop): the index is rebuilt, not stale
    r.output_token_ids[0] = 1  # [5, 6, 1, 2, 1]: the 1-gram [1] alone
    assert p.propose(r, 2) == []
    p.forget("a")
    assert "a" not in p._contexts


def test_a_proposal_stops_at_the_context_end():
    p = NgramProposer(2, 2)
    assert p.propose(req("a", [4, 4, 4, 4]), 5) == [4]  # the latest match ends one token before the last


def test_candidates_are_bounded(monkeypatch: pytest.MonkeyPatch):
    """Only the latest MAX_CANDIDATES occurrences of the last token are tried."""
    from surge.core import ngram_proposer
    monkeypatch.setattr(ngram_proposer, "MAX_CANDIDATES", 2)
    p = NgramProposer(2, 2)
    prompt = [1, 2, 8] + [2, 9] * 5 + [1, 2]  # [1, 2] matches only at 0..1, before six other 2s
    assert p.propose(req("a", prompt), 1) == []
    monkeypatch.setattr(ngram_proposer, "MAX_CANDIDATES", 64)
    assert NgramProposer(2, 2).propose(req("b", prompt), 1) == [8]


# ---- who speculates, how far --------------------------------------------------------------


def copy_request(rid: str, max_tokens: int = 64, speculate: bool = True) -> Request:
    """A request whose context repeats: its next tokens are always proposable."""
    return req(rid, list(range(10, 30)) + list(range(10, 14)), max_tokens, speculate)


def test_a_good_record_proposes_up_to_k_and_a_bad_one_stops():
    s = Speculator(SpeculativeConfig("ngram", 6, 2, 3))
    r = copy_request("a")
    first = s.plan([r], 1)["a"]
    assert 1 <= len(first) < 6  # the prior (0.5) bets a couple of tokens
    for _ in range(10):
        s.record("a", 6, 6)
    assert s.plan([r], 1)["a"] == list(range(14, 20))  # all six
    for _ in range(20):
        s.record("a", 2, 0)
    assert s.plan([r], 1) == {}  # a record of refusals: no bet pays
    for _ in range(200):  # not speculating, the estimate drifts back towards the prior: it tries again
        if s.plan([r], 1):
            break
    else:
        pytest.fail("a request that stopped speculating never tried again")


def test_large_batches_back_off():
    s = Speculator(SpeculativeConfig("ngram", 4, 2, 3))
    batch = [copy_request(str(i)) for i in range(32)]
    assert s.plan(batch, 32) == {}  # at the prior, a bet costs 32 rows' worth of a step
    for r in batch:
        for _ in range(20):
            s.record(r.request_id, 20, 19)  # 19 of 20 accepted
    plan = s.plan(batch, 32)  # likely proposals still pay, fewer of them
    assert len(plan) == 32 and all(len(v) == 1 for v in plan.values())
    assert len(s.plan(batch[:1], 1)["0"]) == 4


def test_proposals_respect_the_request_and_its_room():
    s = Speculator(SpeculativeConfig("ngram", 4, 2, 3))
    assert s.plan([copy_request("a", speculate=False)], 1) == {}
    r = copy_request("b", max_tokens=3)
    r.output_token_ids += [14]  # 2 more tokens at most: one proposed, one sampled after it
    assert s.plan([r], 1) == {"b": [15]}
    r.output_token_ids += [15]
    assert s.plan([r], 1) == {}


def test_a_draft_model_gets_placeholders_and_its_passes_are_paid_for():
    """Method "draft": the plan holds placeholders for the worker's draft to fill in, in any
    context; each new depth also costs a draft pass, so an expensive draft proposes less."""
    s = Speculator(SpeculativeConfig("draft", 6, model="d.gguf"))
    r = req("a", [1, 2, 3, 4, 5])  # nothing repeats: no n-gram would propose
    for _ in range(20):
        s.record("a", 6, 6)
    assert s.plan([r], 1) == {"a": [speculation.DRAFT_PLACEHOLDER] * 6}
    assert s.pass_rows == speculation.DRAFT_PASS_ROWS  # nothing measured: the prior
    for i in range(300):  # the target: 5 ms a step plus 1 ms a row
        rows = 1 + i % 6
        s.observe(rows, 0.005 + 0.001 * rows)
    s.observe_draft(4, 0.004)  # a pass costs one row
    assert s.pass_rows == pytest.approx(1.0, rel=1e-6)
    assert len(s.plan([r], 1)["a"]) == 6  # a near-certain record: every depth pays its pass
    for _ in range(40):
        s.record("a", 5, 4)  # four of five accepted: a ~ 0.8
    assert len(s.plan([r], 1)["a"]) == 3  # 0.8^3 (6 + 3 * 2) > 2.44 x 2; 0.8^4 x 12 < 2.95 x 2
    for _ in range(1000):
        s.observe_draft(2, 0.006)  # 3 ms a pass: 3 rows
    assert s.pass_rows == pytest.approx(3.0, rel=1e-3)
    assert len(s.plan([r], 1)["a"]) == 1  # 0.8 x 6 > 4; then 0.64 x 10 < 1.8 x 4
    for _ in range(40):
        s.record("a", 4, 1)  # a poor record: no bet pays a pass
    assert s.plan([r], 1) == {}
    assert Speculator(SpeculativeConfig("ngram", 4)).pass_rows == 0.0


def test_stats_and_forget():
    s = Speculator(SpeculativeConfig("ngram", 4, 2, 3))
    s.record("a", 4, 2)
    s.record("a", 3, 3)
    assert (s.stats.num_drafts, s.stats.num_draft_tokens, s.stats.num_accepted_tokens) == (2, 7, 5)
    assert s.stats.acceptance_rate == pytest.approx(5 / 7) and s.stats.mean_accepted_length == 3.5
    s.forget("a")
    assert "a" not in s._records


# ---- scheduling proposed tokens -----------------------------------------------------------


def prefill(s: Scheduler, token: int | dict) -> None:
    out = s.schedule()
    s.update(out, {r.request_id: token if isinstance(token, int) else token[r.request_id]
                   for r in out.requests if r.sample})


def trust(s: Scheduler, *request_ids: str) -> None:
    """A record of accepted proposals: the requests bet as far as they can."""
    for rid in request_ids:
        for _ in range(20):
            s.speculator.record(rid, 8, 8)
    s.speculator.stats = speculation.SpeculationStats()


def test_proposed_tokens_are_scheduled_like_prompt_tokens_and_rejected_ones_recomputed():
    s = sched(k=3)
    r = req("a", [1, 2, 3, 4, 5, 6, 7, 1, 2])
    s.add_request(r)
    trust(s, "a")
    prefill(s, 3)  # tokens [1..7, 1, 2, 3]: [2, 3] matched at 1..2, followed by 4, 5, 6
    out = s.schedule()
    (sr,) = out.requests
    assert (sr.start_position, sr.token_ids, sr.num_draft, sr.sample) == (9, [3, 4, 5, 6], 3, True)
    assert len(sr.block_ids) == 4  # slots for positions 9..12
    # the runner accepted 4 and 5, refused 6 and sampled 9 instead
    changed = s.update(out, {"a": 4}, {"a": [5, 9]})
    assert changed == [r] and r.output_token_ids == [3, 4, 5, 9]
    assert r.num_computed_tokens == 12 and r.num_tokens == 13  # position 12 (the refused 6) is computed again
    assert s.speculator.stats.num_draft_tokens == 3 and s.speculator.stats.num_accepted_tokens == 2
    out = s.schedule()  # [.., 5, 9] occurred nowhere: a plain decode step
    assert (out.requests[0].start_position, out.requests[0].token_ids, out.requests[0].num_draft) == (12, [9], 0)
    assert s.stats.num_generated_tokens == 4


def test_prefix_blocks_never_hold_proposed_tokens(monkeypatch):
    """A block is cached for its known tokens only: refused proposals never reach the cache."""
    monkeypatch.setattr(speculation, "PRIOR_ACCEPTED", 0.9 * speculation.PRIOR_TRIALS)
    s = sched(k=4)
    r = req("a", [1, 2, 3, 1, 2, 3, 1])  # then 2: [3, 1, 2] matched at 2..4, followed by 3, 1, 2
    s.add_request(r)
    trust(s, "a")
    prefill(s, 2)
    out = s.schedule()
    assert out.requests[0].token_ids == [2, 3, 1, 2]  # positions 7..10, known up to 7
    s.update(out, {"a": 50}, {"a": []})  # the first proposal refused
    assert len(r.block_hashes) == 2  # blocks 0 and 1 (positions 0..7) are known; 8..10 held proposals
    s.finish(r, FinishReason.STOP)
    again = req("b", [1, 2, 3, 1, 2, 3, 1, 2, 50, 7, 7, 7, 7], speculate=False)
    s.add_request(again)
    out = s.schedule()
    assert out.requests[0].start_position == 8  # the two known blocks hit; nothing of the proposals


def test_proposals_fit_the_token_budget_and_a_prefill_gets_its_turn():
    s = sched(k=6, max_num_batched_tokens=4, long_prefill_token_threshold=0)
    s.add_request(req("a", [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3]))
    trust(s, "a")
    for _ in range(3):
        prefill(s, 4)  # a 12-token prompt in chunks of 4; then it decodes [.., 2, 3, 4]
    out = s.schedule()
    assert out.requests[0].num_draft == 3 and len(out.requests[0].token_ids) == 4  # trimmed to the budget
    s.update(out, {"a": 5}, {"a": [6, 7]})
    s.add_request(req("b", [9, 9, 9, 9, 9, 9], speculate=False))
    out = s.schedule()
    assert sum(len(x.token_ids) for x in out.requests) <= 4


def test_preemption_drops_a_victims_proposals():
    s = sched(num_blocks=6, k=4)
    a = req("a", [1, 2, 3, 1, 2, 3, 1], max_tokens=12)
    b = req("b", [5, 6, 7, 5, 6, 7, 5], max_tokens=12)
    s.add_request(a)
    s.add_request(b)
    trust(s, "a", "b")
    prefill(s, {"a": 2, "b": 6})  # both decode with 3 proposals: 2 x 3 blocks = 6, the cache is full
    out = s.schedule()
    assert [x.num_draft for x in out.requests] == [3, 3]  # positions 7..10 each
    s.update(out, {"a": 3, "b": 99}, {"a": [1, 2, 3], "b": []})
    out = s.schedule()  # a needs a 4th block: b (the newest) is preempted, with its proposals
    assert [x.request_id for x in out.requests] == ["a"] and out.preempted_request_ids == ["b"]
    assert b.num_computed_tokens == 0 and b.output_token_ids == [6, 99]
    s.update(out, {"a": 7}, {"a": []})
    assert s.kv.block_ids("b") == []


def test_a_verification_of_fewer_proposals_than_scheduled():
    """A draft model that doubted some of its scheduled proposals verified fewer: the tokens and
    the stats follow what was verified."""
    s = sched(k=3)
    s.add_request(req("a", [1, 2, 3, 1, 2]))
    trust(s, "a")
    prefill(s, 3)
    out = s.schedule()
    assert out.requests[0].num_draft == 3
    with pytest.raises(ValueError, match="from 1 proposed"):
        s.update(out, {"a": 1}, {"a": [2, 3]}, {"a": 1})
    computed = s.running[0].num_computed_tokens
    s.update(out, {"a": 1}, {"a": [2]}, {"a": 1})
    assert s.running[0].num_computed_tokens == computed + 2  # the known token and the accepted proposal
    assert (s.speculator.stats.num_draft_tokens, s.speculator.stats.num_accepted_tokens) == (1, 1)
    record = s.speculator._records["a"]
    before = record.trials
    out = s.schedule()
    s.update(out, {"a": 5}, {}, {"a": 0})  # the draft doubted them all: a refusal, no verification
    assert s.speculator.stats.num_drafts == 1 and record.trials < before + 1.01 and record.rate < 1


def test_update_refuses_more_tokens_than_proposed():
    s = sched(k=2)
    s.add_request(req("a", [1, 2, 3, 1, 2]))
    trust(s, "a")
    prefill(s, 3)
    out = s.schedule()
    with pytest.raises(ValueError, match="3 proposed|proposed"):
        s.update(out, {"a": 1}, {"a": [1, 2, 3, 4]})


@pytest.mark.parametrize("bad, message", [
    ({"method": "eagle"}, "unknown method 'eagle'"),
    ({"method": "draft"}, "method 'draft' needs 'model'"),
    ({"method": "draft", "model": "  "}, "method 'draft' needs 'model'"),
    ({"method": "draft", "model": "d.gguf", "draft_p_min": 1.5}, "draft_p_min must be a probability"),
    ({"num_speculative_tokens": 0}, "num_speculative_tokens must be a positive integer"),
    ({"num_speculative_tokens": 1000}, "more than 32"),
    ({"num_speculative_tokens": 2.5}, "positive integer"),
    ({"prompt_lookup_min": 5, "prompt_lookup_max": 2}, "above prompt_lookup_max"),
    ({"model": "x.gguf"}, "method 'ngram' has none"),
])
def test_bad_configs_are_refused(bad, message):
    with pytest.raises(InvalidArgumentError, match=message):
        SpeculativeConfig(**bad)


def test_a_steps_fixed_cost_is_fitted_from_its_timings():
    s = Speculator(SpeculativeConfig("ngram", 4, 2, 3))
    assert s.fixed_rows == speculation.STEP_FIXED_ROWS  # nothing seen: the prior
    for _ in range(50):
        s.observe(1, 0.005 + 0.001)  # every step one row: no line to fit yet
    assert s.fixed_rows == speculation.STEP_FIXED_ROWS
    for i in range(300):  # 5 ms a step plus 1 ms a row
        rows = 1 + i % 6
        s.observe(rows, 0.005 + 0.001 * rows)
    assert s.fixed_rows == pytest.approx(5.0, rel=1e-6)
    for i in range(1000):  # the context grew: 4 ms a row now; the old steps are forgotten
        rows = 1 + i % 6
        s.observe(rows, 0.006 + 0.004 * rows)
    assert s.fixed_rows == pytest.approx(1.5, rel=1e-3)
    cheap = Speculator(SpeculativeConfig("ngram", 4, 2, 3))
    for i in range(100):  # rows nearly free: the fit is bounded
        cheap.observe(1 + i % 4, 0.010 + 1e-9 * (i % 4))
    assert cheap.fixed_rows == speculation.FIXED_ROWS_RANGE[1]
    # the fit decides the bets: at batch 1 and a prior-level record, a cheap row buys more proposals
    r = copy_request("a")
    assert len(cheap.plan([r], 1)["a"]) > len(s.plan([copy_request("b")], 1).get("b", []))

