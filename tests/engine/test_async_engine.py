"""AsyncEngine: concurrent streams, cancellation frees blocks, errors reach the caller."""

from __future__ import annotations

import asyncio
import time

import pytest

from surge import LLM, SamplingParams
from surge.engine.async_engine import AsyncEngine, EngineDeadError
from surge.errors import InvalidArgumentError
from surge.sampling_params import RequestOutputKind
from tests.conftest import build_tiny_model

PROMPTS = ["Hello, world.", "def main(argv):", "The quick brown fox", "Numbers 12345 and", "Pack my box"] * 2


@pytest.fixture(scope="module")
def llm(tmp_path_factory, tiny_tokenizer_dir):
    path = build_tiny_model("llama", tmp_path_factory.mktemp("async") / "m", tiny_tokenizer_dir)
    return LLM(str(path), dtype="float32", kv_cache_memory=16 << 20)


@pytest.fixture
def engine(llm):
    eng = AsyncEngine(llm.engine)
    eng.start()
    yield eng
    eng.shutdown()
    assert llm.engine.is_idle_clean()


def _wait_idle(llm, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if llm.engine.is_idle_clean():
            return True
        time.sleep(0.01)
    return False


def test_concurrent_streams_equal_offline(engine, llm):
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, output_kind=RequestOutputKind.DELTA)

    async def one(prompt):
        text, tokens = "", []
        async for out in engine.generate(prompt, params):
            text += out.outputs[0].text
            tokens += out.outputs[0].token_ids
        return text, tokens

    async def main():
        return await asyncio.gather(*(one(p) for p in PROMPTS))

    results = asyncio.run(main())
    engine.shutdown()
    offline = llm.generate(PROMPTS, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    assert results == [(o.outputs[0].text, o.outputs[0].token_ids) for o in offline]


def test_cancel_aborts_and_frees_blocks(engine, llm):
    params = SamplingParams(max_tokens=500, temperature=0, ignore_eos=True, output_kind=RequestOutputKind.DELTA)

    async def main():
        async def consume():
            async for _ in engine.generate("The quick brown fox", params):
                pass

        task = asyncio.create_task(consume())
        for _ in range(200):  # until the request holds blocks
            await asyncio.sleep(0.005)
            if llm.engine.stats().kv_blocks_used:
                break
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        gen = engine.generate("Pack my box", params)
        await gen.__anext__()
        await gen.aclose()  # a client that stops reading

    asyncio.run(main())
    assert _wait_idle(llm)


def test_bad_request_raises_and_engine_keeps_serving(engine):
    async def main():
        with pytest.raises(InvalidArgumentError, match="outside the vocabulary"):
            async for _ in engine.generate([1, 10**6], SamplingParams()):
                pass
        outs = [o async for o in engine.generate("Hello", SamplingParams(max_tokens=3, temperature=0))]
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 3


def test_generate_after_shutdown_fails_clearly(llm):
    eng = AsyncEngine(llm.engine)
    eng.start()
    eng.shutdown()

    async def main():
        async for _ in eng.generate("Hello", SamplingParams(max_tokens=2)):
            pass

    with pytest.raises(EngineDeadError):
        asyncio.run(main())
