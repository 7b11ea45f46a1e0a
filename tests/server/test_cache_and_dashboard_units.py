"""Pure units of the serving layer: response-cache keys and replay, the dashboard's rates and
percentiles, engine settings and sizes."""

from __future__ import annotations

import asyncio

import pytest

from surge.engine.args import EngineArgs, parse_bytes
from surge.engine.llm_engine import EngineStats
from surge.errors import InvalidArgumentError
from surge.outputs import CompletionOutput, Logprob, RequestOutput
from surge.sampling_params import RequestOutputKind, SamplingParams
from surge.server.dashboard import StatsHistory, percentile
from surge.server.response_cache import (
    ResponseCache,
    cache_key,
    is_deterministic,
    replay,
)


def test_only_deterministic_requests_are_cacheable():
    assert is_deterministic(SamplingParams(temperature=0))
    assert is_deterministic(SamplingParams(temperature=0.8, seed=3))
    assert not is_deterministic(SamplingParams(temperature=0.8))
    assert is_deterministic(SamplingParams(pooling="mean"))  # an embedding is a function of its input


def test_cache_key_ignores_delivery_but_not_settings():
    base = SamplingParams(temperature=0, max_tokens=8, stop=["x"], logit_bias={5: 1.0})
    stream = SamplingParams(temperature=0, max_tokens=8, stop=["x"], logit_bias={5: 1.0},
                            output_kind=RequestOutputKind.DELTA)
    assert cache_key("m:1", [1, 2], base) == cache_key("m:1", [1, 2], stream)
    assert hash(cache_key("m:1", [1, 2], base))
    for other in (cache_key("m:2", [1, 2], base), cache_key("m:1", [1, 3], base),
                  cache_key("m:1", [1, 2], SamplingParams(temperature=0, max_tokens=9, stop=["x"],
                                                          logit_bias={5: 1.0}))):
        assert other != cache_key("m:1", [1, 2], base)


def test_cache_key_of_constrained_requests():
    """An output constraint is part of the key (by its kind and text): the same constraint hits,
    another or none misses."""
    def key(constraint):  # type: ignore[no-untyped-def]
        return cache_key("m:1", [1, 2], SamplingParams(temperature=0, max_tokens=8, structured_outputs=constraint))

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert hash(key({"json": schema})) and key({"json": schema}) == key({"json": dict(schema)})
    assert len({key({"json": schema}), key({"json": {"type": "object"}}), key({"regex": "a+"}), key(None)}) == 4


def _deltas() -> list[RequestOutput]:
    lp = {7: Logprob(-0.5, 1, "a")}
    return [
        RequestOutput("r", "p", [1, 2], [CompletionOutput(0, "He", [7], None, None, [lp])]),
        RequestOutput("r", "p", [1, 2], [CompletionOutput(0, "llo", [8], "length", None, [lp], -1.0)], True),
    ]


async def _drain(gen):
    return [x async for x in gen]


def _source(items):
    async def gen():
        for item in items:
            yield item
    return gen()


def test_recorded_deltas_replay_as_one_finished_output():
    cache = ResponseCache(2)
    seen = asyncio.run(_drain(cache.through("k", _source(_deltas()), cumulative=False)))
    assert len(seen) == 2  # passed through unchanged
    entry = cache.get("k")
    out = asyncio.run(_drain(replay(entry, "new-id")))
    assert len(out) == 1 and out[0].finished and out[0].request_id == "new-id"
    c = out[0].outputs[0]
    assert (c.text, c.token_ids, c.finish_reason, c.cumulative_logprob) == ("Hello", [7, 8], "length", -1.0)
    assert len(c.logprobs) == 2


def test_an_embedding_replays_with_its_vector():
    cache = ResponseCache(2)
    done = RequestOutput("r", "hi", [5, 6], [CompletionOutput(0, "", [], "stop")], True, embedding=[0.6, 0.8])
    asyncio.run(_drain(cache.through("e", _source([done]), cumulative=True)))
    (out,) = asyncio.run(_drain(replay(cache.get("e"), "again")))
    assert out.embedding == [0.6, 0.8] and out.outputs[0].finish_reason == "stop" and out.request_id == "again"


def test_unfinished_stream_is_not_stored_and_lru_evicts():
    cache = ResponseCache(2)
    asyncio.run(_drain(cache.through("partial", _source(_deltas()[:1]), cumulative=False)))
    assert cache.get("partial") is None and cache.misses == 1
    for key in ("a", "b"):
        asyncio.run(_drain(cache.through(key, _source(_deltas()), cumulative=False)))
    assert cache.get("a") is not None  # a is now the most recent
    asyncio.run(_drain(cache.through("c", _source(_deltas()), cumulative=False)))
    assert cache.get("b") is None and cache.get("a") is not None and len(cache) == 2
    cache.put(("m:1", (), ()), cache.get("a"))
    cache.drop_version("m:1")
    assert cache.get(("m:1", (), ())) is None


def test_percentile_nearest_rank():
    assert percentile([], 0.5) is None
    assert percentile([1.0], 0.99) == 1.0
    values = sorted(float(i) for i in range(1, 101))
    assert percentile(values, 0.5) == 50.0 and percentile(values, 0.99) == 99.0


def _stats(tokens: int, waiting: int = 0, **spec) -> EngineStats:
    return EngineStats(num_running=2, num_waiting=waiting, kv_blocks_used=5, kv_blocks_total=10, kv_cache_usage=0.5,
                       prefix_cache_queries=10, prefix_cache_hits=4, prefix_cache_hit_rate=0.4, num_preemptions=0,
                       prompt_tokens=10, computed_prompt_tokens=6, generation_tokens=tokens, **spec)


def test_speculation_in_the_dashboard_and_metrics():
    from prometheus_client import generate_latest

    from surge.server.metrics import ServerMetrics

    spec = dict(spec_method="ngram", spec_drafts=10, spec_draft_tokens=40, spec_accepted_tokens=30)
    assert _stats(0, **spec).spec_acceptance_rate == 0.75 and _stats(0, **spec).spec_mean_accepted_length == 4.0
    rows = [("m", "1", _stats(0, **spec)), ("plain", "1", _stats(0))]
    history = StatsHistory(lambda: rows, interval=1.0)
    history.sample(now=10.0)
    rows[0] = ("m", "1", _stats(0, **dict(spec, spec_draft_tokens=60, spec_accepted_tokens=35)))
    history.sample(now=11.0)
    data = history.data()["models"]
    assert data["m"]["spec_acceptance_rate"][-1] == pytest.approx(0.25)  # 5 of the 20 proposed since
    assert data["plain"]["spec_acceptance_rate"][-1] is None  # nothing proposed: no point
    text = generate_latest(ServerMetrics(lambda: rows).registry).decode()
    assert 'surge_spec_decode_num_draft_tokens_total{method="ngram",model="m",version="1"} 60.0' in text
    assert 'surge_spec_decode_num_accepted_tokens_total{method="ngram",model="m",version="1"} 35.0' in text
    assert 'surge_spec_decode_num_drafts_total{method="ngram",model="m",version="1"} 10.0' in text
    assert 'model="plain"' not in "".join(line for line in text.splitlines() if "spec_decode" in line)


def test_history_turns_counters_into_rates():
    rows = [("m", "1", _stats(0))]
    history = StatsHistory(lambda: rows, interval=1.0)
    history.sample(now=100.0)
    rows[:] = [("m", "1", _stats(50, waiting=3))]
    history.record_request("m", 100.5, ttft=0.2, tpot=0.01)
    history.record_request("m", 100.7, ttft=0.4, tpot=0.03)
    history.sample(now=102.0)  # two seconds later
    m = history.data()["models"]["m"]
    assert m["tokens_per_s"][-1] == pytest.approx(25.0)
    assert m["requests_per_s"][-1] == pytest.approx(1.0)
    assert (m["ttft_p50"][-1], m["ttft_p99"][-1], m["tpot_p99"][-1]) == (0.2, 0.4, 0.03)
    assert (m["queue_depth"][-1], m["running"][-1], m["kv_cache_usage"][-1]) == (3, 2, 0.5)
    assert m["prefix_cache_hit_rate"][-1] == pytest.approx(0.4)
    # a new version starts its counters at zero: no negative rate, its tokens count
    rows[:] = [("m", "2", _stats(10))]
    history.sample(now=103.0)
    assert history.data()["models"]["m"]["tokens_per_s"][-1] == pytest.approx(10.0)
    assert len(history.data(since=history.data()["models"]["m"]["t"][-2])["models"]["m"]["t"]) == 1


@pytest.mark.parametrize("text, size", [("512MiB", 512 << 20), ("2G", 2 * 10**9), ("1.5GiB", 3 << 29),
                                        ("1000", 1000), (4096, 4096), ("64 kib", 64 << 10)])
def test_parse_bytes(text, size):
    assert parse_bytes(text, "x") == size


@pytest.mark.parametrize("bad", ["lots", "-1", "0", "1.5 parsecs", True, 0])
def test_parse_bytes_errors(bad):
    with pytest.raises(InvalidArgumentError, match="x"):
        parse_bytes(bad, "x")


def test_engine_args_from_settings():
    args = EngineArgs().updated({"max_num_seqs": 4, "kv_cache_memory": "8MiB", "warmup": False,
                                 "kv_cache_fraction": 0.25, "dtype": "float32"}, "f.toml")
    assert (args.max_num_seqs, args.kv_cache_memory, args.warmup, args.kv_cache_fraction) == (4, 8 << 20, False, 0.25)
    for bad, needle in (({"nope": 1}, "unknown setting 'nope'"), ({"max_num_seqs": 0}, "positive integer"),
                        ({"warmup": "yes"}, "true or false"), ({"kv_cache_fraction": 2}, "in (0, 1]"),
                        ({"dtype": 3}, "must be a string")):
        with pytest.raises(InvalidArgumentError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            EngineArgs().updated(bad, "f.toml")
