"""Engine core on real models: batch invariance, prefix caching, chunked prefill, preemption,
n > 1, logprobs, streaming deltas; every workload ends with all KV blocks free."""

from __future__ import annotations

import pytest
import torch

from surge import LLM, SamplingParams
from surge.sampling_params import RequestOutputKind
from tests.conftest import TINY_VOCAB, build_tiny_model

GREEDY16 = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


def mixed_prompts(vocab: int, count: int = 16, low: int = 5, high: int = 500, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.linspace(low, high, count).round().int().tolist()
    perm = torch.randperm(count, generator=g).tolist()
    return [torch.randint(3, vocab, (lengths[i],), generator=g).tolist() for i in perm]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory, tiny_tokenizer_dir):
    return build_tiny_model("llama", tmp_path_factory.mktemp("core") / "m", tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def tiny(tiny_path):
    return LLM(str(tiny_path), dtype="float32", kv_cache_memory=16 << 20)


@pytest.fixture(autouse=True)
def no_leaks(request):
    yield
    for name in ("tiny", "default_llm"):
        if name in request.fixturenames:
            llm = request.getfixturevalue(name)
            assert llm.engine.is_idle_clean(), f"{name}: KV blocks leaked"


def _tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("model", ["tiny", "default_llm"])
def test_batch_invariance(model, request):
    llm = request.getfixturevalue(model)
    prompts = mixed_prompts(llm.engine.vocab_size)
    together = _tokens(llm.generate(prompts, GREEDY16))
    alone = [_tokens(llm.generate([p], GREEDY16))[0] for p in prompts]
    assert together == alone


def test_prefix_caching_on_off_identical_and_suffix_only(tiny, tiny_path):
    prefix = mixed_prompts(TINY_VOCAB, 1, 400, 400, seed=5)[0]
    first, second = prefix + [7, 8, 9], prefix + [10, 11, 12, 13, 14]
    out_first = tiny.generate([first], GREEDY16)[0]
    before = tiny.engine.stats()
    out_second = tiny.generate([second], GREEDY16)[0]
    after = tiny.engine.stats()
    assert out_second.num_cached_tokens == 400
    assert after.computed_prompt_tokens - before.computed_prompt_tokens == len(second) - 400
    assert after.prefix_cache_hits - before.prefix_cache_hits == 400
    off = LLM(str(tiny_path), dtype="float32", kv_cache_memory=16 << 20, enable_prefix_caching=False)
    assert _tokens(off.generate([first, second], GREEDY16)) == [out_first.outputs[0].token_ids,
                                                               out_second.outputs[0].token_ids]
    assert off.engine.stats().prefix_cache_hits == 0 and off.engine.is_idle_clean()


def test_chunked_prefill_small_budget_equals_unchunked(tiny, tiny_path):
    prompts = mixed_prompts(TINY_VOCAB, 6, 20, 300, seed=2)
    want = _tokens(tiny.generate(prompts, GREEDY16))
    small = LLM(str(tiny_path), dtype="float32", kv_cache_memory=16 << 20, max_num_batched_tokens=24,
                enable_prefix_caching=False)
    assert _tokens(small.generate(prompts, GREEDY16)) == want
    assert small.engine.is_idle_clean()


@pytest.mark.parametrize("model", ["tiny", "default_llm"])
def test_preemption_with_kv_for_two_sequences(model, request, tiny_path, default_gguf_path):
    llm = request.getfixturevalue(model)
    prompts = mixed_prompts(llm.engine.vocab_size, 12, 40, 120, seed=3)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    want = _tokens(llm.generate(prompts, params))
    # room for about two sequences of prompt + output (~200 tokens each)
    per_block = llm.engine.model_info.kv_cache_bytes // llm.engine.scheduler.pool.num_blocks
    path = str(tiny_path) if model == "tiny" else default_gguf_path
    small = LLM(path, dtype="float32", kv_cache_memory=per_block * 26, quantization="none")
    outs = small.generate(prompts, params)
    stats = small.engine.stats()
    assert stats.num_preemptions > 0, "the budget did not force preemption"
    assert all(o.finished for o in outs) and _tokens(outs) == want
    assert small.engine.is_idle_clean()


def test_seeded_sampling_survives_preemption(tiny, tiny_path):
    prompts = mixed_prompts(TINY_VOCAB, 8, 40, 120, seed=4)
    params = [SamplingParams(max_tokens=40, temperature=1.0, top_p=0.9, seed=100 + i, ignore_eos=True)
              for i in range(8)]
    want = _tokens(tiny.generate(prompts, params))
    per_block = tiny.engine.model_info.kv_cache_bytes // tiny.engine.scheduler.pool.num_blocks
    small = LLM(str(tiny_path), dtype="float32", kv_cache_memory=per_block * 20)
    assert _tokens(small.generate(prompts, params)) == want
    assert small.engine.stats().num_preemptions > 0


def test_n_greater_than_one_shares_prompt_blocks(tiny):
    prompt = mixed_prompts(TINY_VOCAB, 1, 160, 160, seed=6)[0]
    before = tiny.engine.stats()
    out = tiny.generate([prompt], SamplingParams(n=4, max_tokens=8, temperature=1.0, seed=3, ignore_eos=True))[0]
    after = tiny.engine.stats()
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    # the prompt ran once; the other three children found its 9 full blocks cached
    assert after.computed_prompt_tokens - before.computed_prompt_tokens == 160 + 3 * (160 - 144)
    again = tiny.generate([prompt], SamplingParams(n=4, max_tokens=8, temperature=1.0, seed=3,
                                                    ignore_eos=True))[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]


def test_logprobs_match_reference(tiny, tiny_path):
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32).eval()
    prompt = [5, 17, 99, 240, 31, 8]
    out = tiny.generate([prompt], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=3,
                                                 prompt_logprobs=2))[0]
    tokens = out.outputs[0].token_ids
    with torch.no_grad():
        ref_lp = ref(torch.tensor([prompt + tokens])).logits[0].log_softmax(-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        assert entry[prompt[pos]].logprob == pytest.approx(ref_lp[pos - 1, prompt[pos]].item(), abs=1e-4)
        assert len(entry) in (2, 3)  # the prompt token plus the top 2 (which may include it)
    cumulative = 0.0
    for i, (tok, entry) in enumerate(zip(tokens, out.outputs[0].logprobs)):
        row = ref_lp[len(prompt) - 1 + i]
        assert entry[tok].rank == 1  # greedy
        assert entry[tok].logprob == pytest.approx(row[tok].item(), abs=1e-4)
        top = row.topk(3)
        assert list(entry)[:3] == top.indices.tolist() or set(entry) == set(top.indices.tolist())
        cumulative += entry[tok].logprob
    assert out.outputs[0].cumulative_logprob == pytest.approx(cumulative, abs=1e-4)


def test_streaming_deltas_never_emit_part_of_a_stop_string(tiny):
    engine = tiny.engine
    base = tiny.generate(["The quick brown fox"], GREEDY16)[0].outputs[0].text
    stop = base[6:9]
    params = SamplingParams(max_tokens=16, temperature=0, stop=[stop], output_kind=RequestOutputKind.DELTA)
    rid = engine.add_request("The quick brown fox", params)
    pieces, finished = [], False
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == rid
            pieces.append(out.outputs[0].text)
            assert stop not in "".join(pieces)
            finished = out.finished
    assert finished and "".join(pieces) == base[: base.find(stop)]


def test_delta_tokens_concatenate_to_final(tiny):
    engine = tiny.engine
    rid = engine.add_request("Hello, world.", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                             output_kind=RequestOutputKind.DELTA))
    toks, text = [], ""
    while engine.has_unfinished_requests():
        for out in engine.step():
            toks += out.outputs[0].token_ids
            text += out.outputs[0].text
    final = tiny.generate(["Hello, world."], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    assert toks == final.outputs[0].token_ids and text == final.outputs[0].text and rid


def test_engine_stats(tiny):
    stats = tiny.engine.stats()
    assert stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_blocks_used == 0
    assert stats.kv_blocks_total > 0 and 0.0 <= stats.prefix_cache_hit_rate <= 1.0
    assert stats.generation_tokens > 0 and stats.prompt_tokens > 0
