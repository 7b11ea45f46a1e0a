"""LLM / LLMEngine on a tiny model: batching, stop conditions, seeds, aborts, no leaked blocks."""

from __future__ import annotations

import pytest

from surge import LLM, SamplingParams
from tests.conftest import build_tiny_model

PROMPTS = ["Hello, world.", "def main(argv):", "The quick brown fox", "Numbers 12345 and"]


@pytest.fixture(scope="module")
def llm(tmp_path_factory, tiny_tokenizer_dir):
    path = build_tiny_model("llama", tmp_path_factory.mktemp("engine") / "m", tiny_tokenizer_dir)
    return LLM(str(path), dtype="float32", kv_cache_memory=8 << 20)


GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def test_batch_equals_one_by_one(llm):
    together = llm.generate(PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, together):
        alone = llm.generate(prompt, GREEDY)[0]
        assert alone.outputs[0].token_ids == out.outputs[0].token_ids
        assert alone.outputs[0].text == out.outputs[0].text
        assert out.prompt == prompt and out.finished
        assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 24
    assert llm.engine.is_idle_clean()


def test_text_is_decoded_tokens(llm):
    out = llm.generate(PROMPTS[0], GREEDY)[0].outputs[0]
    assert out.text == llm.tokenizer.decode(out.token_ids)


def test_stop_string_across_token_boundary(llm):
    base = llm.generate(PROMPTS[1], GREEDY)[0].outputs[0]
    pieces = [llm.tokenizer.decode([t]) for t in base.token_ids]
    # a stop string made of the end of token 5 and the start of token 6
    left, right = pieces[5], pieces[6]
    assert left and right
    stop = left[-2:] + right[:2]
    cut = base.text.find(stop)
    out = llm.generate(PROMPTS[1], SamplingParams(max_tokens=24, temperature=0, stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == base.text[:cut]
    assert stop not in out.text


def test_stop_token_ids_and_min_tokens(llm):
    base = llm.generate(PROMPTS[2], GREEDY)[0].outputs[0].token_ids
    stop_id = base[2]
    out = llm.generate(PROMPTS[2], SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[stop_id]))[0]
    assert out.outputs[0].token_ids == base[: base.index(stop_id) + 1]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop_id
    held = llm.generate(PROMPTS[2], SamplingParams(
        max_tokens=24, temperature=0, stop_token_ids=[stop_id], min_tokens=6))[0].outputs[0]
    assert len(held.token_ids) >= 6 and stop_id not in held.token_ids[:6]


def test_seeded_sampling_reproducible_alone_and_in_batch(llm):
    seeded = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    alone = llm.generate(PROMPTS[0], seeded)[0].outputs[0].token_ids
    again = llm.generate(PROMPTS[0], seeded)[0].outputs[0].token_ids
    mixed = llm.generate(
        [PROMPTS[1], PROMPTS[0], PROMPTS[2]],
        [SamplingParams(max_tokens=9, temperature=0.8), seeded, GREEDY],
    )[1].outputs[0].token_ids
    assert alone == again == mixed
    other = llm.generate(PROMPTS[0], SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=99,
                                                    ignore_eos=True))[0].outputs[0].token_ids
    assert other != alone


def test_abort_frees_blocks_at_once(llm):
    engine = llm.engine
    free_before = engine.scheduler.pool.num_free
    ids = [engine.add_request(p, GREEDY) for p in PROMPTS]
    engine.step()
    assert engine.scheduler.pool.num_free < free_before
    for rid in ids:
        engine.abort_request(rid)
    assert engine.scheduler.pool.num_free == free_before
    assert engine.is_idle_clean()


def test_chat_uses_template(llm):
    messages = [{"role": "user", "content": "Hello"}]
    out = llm.chat(messages, GREEDY)[0]
    assert out.prompt_token_ids == llm.tokenizer.encode(llm.tokenizer.apply_chat_template(messages),
                                                        add_special_tokens=False)
    several = llm.chat([messages, [{"role": "user", "content": "Bye"}]], GREEDY)
    assert len(several) == 2 and several[0].outputs[0].token_ids == out.outputs[0].token_ids
