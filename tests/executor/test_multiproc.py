"""The mp executor: the worker in a process of its own gives the tokens the in-process worker
gives, and a worker that dies, hangs or cannot load is reported, never waited on forever."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from surge import LLM, SamplingParams
from surge.engine.async_engine import AsyncEngine
from surge.errors import EngineDeadError, ModelFormatError
from surge.sampling_params import RequestOutputKind
from tests.conftest import TINY_VOCAB, build_tiny_model
from tests.helpers import process_alive

TINY = dict(dtype="float32", kv_cache_memory=16 << 20)


def prompts(count: int, low: int, high: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, TINY_VOCAB) for _ in range(rng.randint(low, high))] for _ in range(count)]


def wait_until(check, timeout: float) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout}s")
        time.sleep(0.05)
    return time.monotonic() - start


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny_path(request, tmp_path_factory, tiny_tokenizer_dir):
    return build_tiny_model(request.param, tmp_path_factory.mktemp("mp") / request.param, tiny_tokenizer_dir)


def _tokens(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


def test_mp_equals_uni_with_prefix_caching_chunked_prefill_and_preemption(tiny_path):
    """Greedy, seeded and n > 1 sampling with logprobs, embeddings (mean and last pooling), prompts
    sharing a prefix, prefill chunks of 24 tokens and a cache of 20 blocks (preemptions happen): the
    same tokens, logprobs and vectors."""
    shared = prompts(1, 40, 40, seed=1)[0]
    batch = [shared + p for p in prompts(6, 5, 80, seed=2)] + prompts(6, 20, 120, seed=3)
    params = [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=2) for _ in range(8)] + \
        [SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, seed=7 + i, ignore_eos=True, n=2)
         for i in range(4)]
    batch += batch[:2]
    params += [SamplingParams(pooling="mean"), SamplingParams(pooling="last")]
    settings = dict(TINY, max_num_batched_tokens=24, kv_cache_memory=None)
    uni = LLM(str(tiny_path), **{**settings, "kv_cache_memory": 16 << 20})
    per_block = uni.engine.model_info.kv_cache_bytes // uni.engine.scheduler.pool.num_blocks
    results = {}
    for backend in ("uni", "mp"):
        with LLM(str(tiny_path), **{**settings, "kv_cache_memory": per_block * 20},
                 distributed_executor_backend=backend) as llm:
            outs = llm.generate(batch, params)
            stats = llm.engine.stats()
            assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0, backend
            assert llm.engine.is_idle_clean()
            results[backend] = (_tokens(outs), [[lp for c in o.outputs for lp in (c.logprobs or [])] for o in outs],
                                [o.embedding for o in outs])
    assert results["mp"][0] == results["uni"][0]
    assert results["mp"][1] == results["uni"][1]
    assert results["mp"][2] == results["uni"][2] and all(v is not None for v in results["mp"][2][-2:])


@pytest.mark.slow
def test_mp_equals_uni_on_the_default_model(default_llm):
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    params = SamplingParams(max_tokens=24, temperature=0)
    want = _tokens(default_llm.generate(texts, params))
    with LLM(dtype="float32", quantization="none", kv_cache_memory=64 << 20,
             distributed_executor_backend="mp") as llm:
        assert _tokens(llm.generate(texts, params)) == want


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory, tiny_tokenizer_dir):
    return build_tiny_model("llama", tmp_path_factory.mktemp("mp-faults") / "m", tiny_tokenizer_dir)


def _stream_until_killed(llm: LLM, pid: int, sig: int) -> tuple[list[int], BaseException | None, float]:
    """Stream a long generation, send `sig` to the worker after the first tokens; what came."""
    engine = AsyncEngine(llm.engine)
    engine.start()
    tokens: list[int] = []
    params = SamplingParams(max_tokens=900, temperature=0, ignore_eos=True, output_kind=RequestOutputKind.DELTA)

    async def run():
        async for out in engine.generate(prompts(1, 8, 8, seed=5)[0], params):
            tokens.extend(out.outputs[0].token_ids)
            if len(tokens) >= 3 and not sent:
                sent.append(time.monotonic())
                os.kill(pid, sig)

    sent: list[float] = []
    error = None
    try:
        asyncio.run(run())
    except BaseException as exc:  # noqa: BLE001 - what the stream ended with is the result
        error = exc
    took = time.monotonic() - sent[0]
    try:
        assert not engine.is_running
        with pytest.raises(EngineDeadError):
            asyncio.run(_first(engine))
    finally:
        engine.shutdown()
    return tokens, error, took


async def _first(engine: AsyncEngine):
    async for out in engine.generate("hello", SamplingParams(max_tokens=2)):
        return out


@pytest.mark.parametrize("sig, cause", [(signal.SIGKILL, "killed by signal 9"),
                                        (signal.SIGSTOP, "stopped responding")])
def test_a_worker_killed_or_hung_mid_stream_ends_the_stream_with_an_error(llama_path, sig, cause):
    llm = LLM(str(llama_path), distributed_executor_backend="mp", **TINY)
    pid = llm.engine.core.executor.pid
    tokens, error, took = _stream_until_killed(llm, pid, sig)
    print(f"{signal.Signals(sig).name}: stream ended {took:.2f}s after the signal")
    assert 3 <= len(tokens) < 900
    assert isinstance(error, EngineDeadError) and cause in str(error) and str(pid) in str(error)
    assert took < 10
    with pytest.raises(EngineDeadError, match=cause):
        llm.engine.check_health()
    llm.shutdown()
    assert not process_alive(pid)


def test_an_idle_engine_notices_its_worker_died(llama_path):
    llm = LLM(str(llama_path), distributed_executor_backend="mp", **TINY)
    engine = AsyncEngine(llm.engine)
    engine.start()
    try:
        assert engine.is_running
        os.kill(llm.engine.core.executor.pid, signal.SIGKILL)
        took = wait_until(lambda: not engine.is_running, 10)
        print(f"an idle engine turned dead {took:.2f}s after its worker was killed")
        assert isinstance(engine.error, EngineDeadError)
    finally:
        engine.shutdown()
        llm.shutdown()


def test_a_shut_down_engine_says_so(llama_path):
    with LLM(str(llama_path), **TINY) as llm:
        assert llm.generate("hello", SamplingParams(max_tokens=2))[0].finished
    with pytest.raises(EngineDeadError, match="shut down"):
        llm.generate("hello", SamplingParams(max_tokens=2))
    llm.shutdown()  # idempotent


def test_shutdown_and_collection_leave_no_worker_process(llama_path):
    llm = LLM(str(llama_path), distributed_executor_backend="mp", **TINY)
    pid = llm.engine.core.executor.pid
    assert process_alive(pid)
    llm.shutdown()
    assert not process_alive(pid)
    llm.shutdown()  # idempotent
    with pytest.raises(EngineDeadError, match="shut down"):
        llm.generate("hello", SamplingParams(max_tokens=2))
    # an LLM nobody references stops its worker when it is collected
    import gc

    pid = LLM(str(llama_path), distributed_executor_backend="mp", **TINY).engine.core.executor.pid
    gc.collect()
    wait_until(lambda: not process_alive(pid), 10)


def test_the_worker_exits_when_its_engine_process_is_killed(llama_path, tmp_path):
    script = tmp_path / "engine.py"
    script.write_text(
        "import sys, time\n"
        "from surge import LLM\n"
        f"llm = LLM({str(llama_path)!r}, dtype='float32', kv_cache_memory=16 << 20, "
        "distributed_executor_backend='mp')\n"
        "print(llm.engine.core.executor.pid, flush=True)\n"
        "time.sleep(600)\n")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=root)
    try:
        pid = int(proc.stdout.readline())
        assert process_alive(pid)
        proc.kill()
        proc.wait(10)
        took = wait_until(lambda: not process_alive(pid), 10)
        print(f"the orphaned worker exited {took:.2f}s after its engine process was killed")
    finally:
        proc.kill()


def test_a_worker_that_cannot_load_reports_the_loaders_error(llama_path, tmp_path):
    """The config reads fine (the engine's side), the weights do not (the worker's side): the
    error is the loader's own, with its type and message, at once."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(llama_path, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    errors = {}
    for backend in ("uni", "mp"):
        start = time.monotonic()
        with pytest.raises(ModelFormatError) as info:
            LLM(str(bad), distributed_executor_backend=backend, **TINY)
        errors[backend] = (str(info.value), time.monotonic() - start)
    assert errors["mp"][0] == errors["uni"][0] and "model.safetensors" in errors["mp"][0]
    assert errors["mp"][1] < 30
