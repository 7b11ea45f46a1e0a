"""One request fails alone: extreme sampling settings never kill a step, and a step that raises
for one request ends that request with an error while every other stream finishes correctly."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from surge import LLM, SamplingParams
from surge.engine.async_engine import AsyncEngine, RequestFailedError
from surge.errors import InvalidArgumentError
from surge.layers.sampler import Sampler, SamplingRow, filter_logits
from surge.sampling_params import RequestOutputKind
from tests.conftest import build_tiny_model

EXTREMES = [0.0, 5e-324, 1e-45, 1.4e-45, 3e-38, 1e-30, 1e-5, 0.5, 1.0, 2.0, 10.0, 1e308, -1.0, -1e308,
            2.0**70, -(2.0**70), math.inf, math.nan]
INT_EXTREMES = [-(2**70), -(2**63) - 1, -(2**63), -1, 0, 1, 2, 383, 384, 2**31, 2**63 - 1, 2**63, 2**64 - 1,
                2**64, 2**70]
FLOAT_FIELDS = ["temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"]
INT_FIELDS = ["top_k", "seed", "min_tokens"]


@pytest.fixture(scope="module")
def llm(tmp_path_factory, tiny_tokenizer_dir):
    path = build_tiny_model("llama", tmp_path_factory.mktemp("isolation") / "m", tiny_tokenizer_dir)
    return LLM(str(path), dtype="float32", kv_cache_memory=16 << 20)


def _settings():
    for name in FLOAT_FIELDS:
        for value in EXTREMES:
            yield {name: value, "temperature": 0.7} if name != "temperature" else {name: value}
    for name in INT_FIELDS:
        for value in INT_EXTREMES:
            yield {name: value, "temperature": 0.7}
    yield {"n": 2, "seed": 2**64 - 1, "temperature": 1.0}
    yield {"n": 3, "seed": -(2**63), "temperature": 1.0}
    yield {"logit_bias": {5: 100.0, 6: -100.0}, "temperature": 0.9}
    yield {"logit_bias": {5: 1e308}}
    yield {"logit_bias": {5: math.nan}}
    yield {"repetition_penalty": 1e-37, "temperature": 1e-5, "top_p": 1e-45, "top_k": 2**63 - 1, "min_p": 1.0}


def test_every_extreme_setting_is_rejected_or_generates(llm):
    """Each setting is refused with InvalidArgumentError or decodes to the end; never a crash."""
    engine = llm.engine
    ran = refused = 0
    for setting in _settings():
        try:
            params = SamplingParams(max_tokens=4, ignore_eos=True, **setting)
        except InvalidArgumentError:
            refused += 1
            continue
        try:
            outs = llm.generate(["Hello, world."], params)
        except InvalidArgumentError:  # the engine's own checks (min_tokens > max_tokens ...)
            refused += 1
            continue
        assert all(len(c.token_ids) == 4 and c.finish_reason == "length" for c in outs[0].outputs), setting
        assert all(0 <= t < engine.vocab_size for c in outs[0].outputs for t in c.token_ids)
        ran += 1
    assert engine.is_idle_clean()
    assert ran > 60 and refused > 20  # both kinds happened
    ok = llm.generate(["Hello"], SamplingParams(max_tokens=3, temperature=0))[0]
    assert len(ok.outputs[0].token_ids) == 3


def test_seed_outside_64_bits_is_refused():
    for seed in (2**64, -(2**63) - 1, 2**70):
        with pytest.raises(InvalidArgumentError, match="seed"):
            SamplingParams(seed=seed)
    for bad in ({"top_k": True}, {"max_tokens": 2.5}, {"temperature": math.inf}, {"top_p": math.nan}):
        with pytest.raises(InvalidArgumentError):
            SamplingParams(**bad)


def test_top_p_zero_in_float32_keeps_the_best_token():
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.0, 0.0, 5.0]])
    out = filter_logits(logits, torch.tensor([0, 2**31]), torch.tensor([5e-324, 1e-45]), torch.tensor([0.0, 0.0]))
    assert out.argmax(-1).tolist() == [1, 2]
    assert torch.isfinite(out).sum(-1).tolist() == [1, 1]


def test_degenerate_rows_fall_back_to_greedy():
    """NaN logits (from a broken forward) or inf after a penalty: a valid token, no exception."""
    sampler = Sampler()
    logits = torch.tensor([[math.nan] * 4, [0.0, math.inf, 1.0, 2.0], [1.0, 2.0, 3.0, 4.0]])
    rows = [SamplingRow(SamplingParams(temperature=1.0), None, [0], []) for _ in range(3)]
    rows[1].params = SamplingParams(temperature=1.0, repetition_penalty=1e-37)
    tokens, _ = sampler(logits, rows)
    assert all(0 <= t < 4 for t in tokens)
    assert tokens[1] == 1
    # every sampled row degenerate (nothing left to draw from), seeded or not
    seeded = SamplingRow(SamplingParams(temperature=0.5, seed=3), torch.Generator().manual_seed(3), [0], [])
    tokens, _ = sampler(torch.full((2, 300), math.nan), [rows[0], seeded])
    assert all(0 <= t < 300 for t in tokens)


def test_prompt_logprobs_in_slices_equal_one_slice(llm, monkeypatch):
    import surge.worker.model_runner as model_runner

    prompt = "The quick brown fox jumps over the lazy dog. " * 6
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=3, logprobs=0)
    whole = llm.generate([prompt], params)[0].prompt_logprobs
    monkeypatch.setattr(model_runner, "PROMPT_LOGPROBS_ROWS", 7)
    sliced = llm.generate([prompt], params)[0].prompt_logprobs
    assert len(whole) == len(sliced) > 20
    for a, b in zip(whole[1:], sliced[1:]):
        assert a.keys() == b.keys()
        for t in a:
            assert a[t].rank == b[t].rank and abs(a[t].logprob - b[t].logprob) < 1e-4


def test_prompt_logprobs_once_per_position_when_the_prompt_is_recomputed(tmp_path, tiny_tokenizer_dir):
    """A request preempted (its prompt recomputed) scores each prompt position once, as it would
    without the preemption."""
    import random

    path = build_tiny_model("llama", tmp_path / "m", tiny_tokenizer_dir)
    rng = random.Random(5)
    batch = [[rng.randrange(3, 384) for _ in range(rng.randint(60, 120))] for _ in range(8)]
    params = [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, prompt_logprobs=1 if i % 2 else None)
              for i in range(len(batch))]
    with LLM(str(path), dtype="float32", kv_cache_memory=16 << 20) as roomy:
        want = [o.prompt_logprobs for o in roomy.generate(batch, params)]
        per_block = roomy.engine.model_info.kv_cache_bytes // roomy.engine.scheduler.pool.num_blocks
    with LLM(str(path), dtype="float32", kv_cache_memory=20 * per_block, max_num_batched_tokens=24) as tight:
        got = [o.prompt_logprobs for o in tight.generate(batch, params)]
        assert tight.engine.stats().num_preemptions > 0
    for prompt, w, g in zip(batch, want, got):
        if w is None:
            continue
        assert len(g) == len(w) == len(prompt)
        assert [sorted(d) if d else d for d in g] == [sorted(d) if d else d for d in w]


PROMPTS = [f"Request number {i}: tell me about {word}" for i, word in
           enumerate(["cats", "dogs", "rain", "code", "tea", "maps", "jazz", "salt"] * 2)]


def _fail_for(engine, culprit: str, calls: list[int]):
    """A test hook: the runner raises whenever the culprit is in the step."""
    real = engine.core.executor.execute_model

    def execute(scheduled):
        if any(r.request_id == culprit for r in scheduled.requests):
            calls[0] += 1
            raise RuntimeError("injected fault")
        return real(scheduled)

    return execute


def test_a_step_failing_for_one_request_fails_it_alone(llm, monkeypatch):
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    reference = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    culprit = "req-7"
    calls = [0]
    monkeypatch.setattr(llm.engine.core.executor, "execute_model", _fail_for(llm.engine, culprit, calls))
    engine = AsyncEngine(llm.engine)
    engine.start()

    async def one(i: int, prompt: str):
        tokens: list[int] = []
        try:
            async for out in engine.generate(prompt, params, request_id=f"req-{i}"):
                tokens += out.outputs[0].token_ids
        except RequestFailedError as exc:
            return exc
        return tokens

    async def main():
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS)))

    try:
        results = asyncio.run(main())
        assert engine.is_running
    finally:
        engine.shutdown()
    assert calls[0] >= 1
    assert isinstance(results[7], RequestFailedError) and "injected fault" in str(results[7])
    for i, (got, ref) in enumerate(zip(results, reference)):
        if i != 7:
            assert got == ref.outputs[0].token_ids, i
    assert llm.engine.is_idle_clean()
    monkeypatch.undo()
    again = llm.generate([PROMPTS[7]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert again[0].outputs[0].token_ids == reference[7].outputs[0].token_ids


def test_offline_generate_reports_the_failed_request(llm, monkeypatch):
    calls = [0]
    monkeypatch.setattr(llm.engine.core.executor, "execute_model", _fail_for(llm.engine, "bad", calls))
    llm.engine.add_request("Hello", SamplingParams(max_tokens=3), request_id="bad")
    llm.engine.add_request("Hello there", SamplingParams(max_tokens=3, temperature=0), request_id="good")
    finished = {}
    while llm.engine.has_unfinished_requests():
        for out in llm.engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert finished["bad"].outputs[0].finish_reason == "error" and "injected fault" in finished["bad"].error
    assert finished["good"].error is None and len(finished["good"].outputs[0].token_ids) == 3
    assert llm.engine.is_idle_clean()


def test_an_engine_failing_for_everyone_raises_broken(llm, monkeypatch):
    from surge.engine.llm_engine import MAX_FAILED_STEPS, EngineBrokenError

    def broken(scheduled):
        raise RuntimeError("device lost")

    monkeypatch.setattr(llm.engine.core.executor, "execute_model", broken)
    engine = llm.engine
    for i in range(2):
        engine.add_request(PROMPTS[i], SamplingParams(max_tokens=3), request_id=f"b{i}")
    with pytest.raises(EngineBrokenError, match="device lost"):
        engine.step()
    for i in range(2):
        engine.abort_request(f"b{i}")
    # single-request steps: each request fails alone, until too many in a row
    failed = 0
    with pytest.raises(EngineBrokenError):
        for i in range(MAX_FAILED_STEPS + 1):
            engine.add_request(PROMPTS[i], SamplingParams(max_tokens=3), request_id=f"s{i}")
            outs = engine.step()
            failed += sum(o.error is not None for o in outs)
    assert failed == MAX_FAILED_STEPS - 1
    engine.abort_request(f"s{MAX_FAILED_STEPS - 1}")
    monkeypatch.undo()
    assert engine.is_idle_clean()
    assert len(llm.generate(["Hello"], SamplingParams(max_tokens=2))[0].outputs[0].token_ids) == 2
