"""Embeddings (SamplingParams.pooling, LLM.embed): the prompt's final hidden states pooled and
normalised equal transformers' on the same weights; alone, inside a batch of generations and
other embeddings, chunked, after a prefix-cache hit and through preemption; bad settings refused."""

from __future__ import annotations

import pytest
import torch

from surge import LLM, SamplingParams
from surge.errors import InvalidArgumentError
from tests.conftest import TINY_VOCAB, build_tiny_model
from tests.engine.test_engine_core import mixed_prompts


def reference_embedding(model, ids: list[int], pooling: str) -> torch.Tensor:
    """transformers' last hidden state (after the final norm), pooled and L2-normalised."""
    with torch.no_grad():
        hidden = model.model(torch.tensor([ids])).last_hidden_state[0].float()
    vector = hidden.mean(0) if pooling == "mean" else hidden[-1]
    return torch.nn.functional.normalize(vector, dim=0)


def assert_same(got: list[float], want: torch.Tensor, atol: float = 1e-5) -> None:
    got_t = torch.tensor(got)
    assert torch.nn.functional.cosine_similarity(got_t, want, dim=0) > 0.9999
    assert torch.allclose(got_t, want, atol=atol), (got_t - want).abs().max()


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory, tiny_tokenizer_dir):
    return build_tiny_model("qwen2", tmp_path_factory.mktemp("embed") / "m", tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def tiny(tiny_path):
    return LLM(str(tiny_path), dtype="float32", kv_cache_memory=16 << 20)


@pytest.fixture(scope="module")
def tiny_reference(tiny_path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32).eval()


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_alone_and_in_a_mixed_batch_equal_transformers(tiny, tiny_reference, pooling):
    prompts = mixed_prompts(TINY_VOCAB, 32, 3, 300, seed=5)
    want = [reference_embedding(tiny_reference, ids, pooling) for ids in prompts]
    for ids, w in zip(prompts[:3], want[:3]):
        assert_same(tiny.embed([ids], pooling=pooling)[0], w)
    # 32 at once, with generations interleaved: each vector as alone, the generations unchanged
    gen = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in tiny.generate(prompts[:8], gen)]
    params = [SamplingParams(pooling=pooling)] * 32 + [gen] * 8
    outs = tiny.generate(prompts + prompts[:8], params)
    for out, w in zip(outs[:32], want):
        assert out.finished and out.outputs[0].finish_reason == "stop" and out.outputs[0].token_ids == []
        assert_same(out.embedding, w)
    assert [o.outputs[0].token_ids for o in outs[32:]] == alone
    assert all(o.embedding is None for o in outs[32:])
    assert tiny.engine.is_idle_clean()


def test_chunked_prefill_prefix_hit_and_preemption(tiny, tiny_path, tiny_reference):
    prompts = mixed_prompts(TINY_VOCAB, 10, 60, 400, seed=6)
    want = {p: [reference_embedding(tiny_reference, ids, p) for ids in prompts] for p in ("mean", "last")}
    # 24-token chunks, a KV cache for about two prompts: chunked and preempted, as the generations need room
    per_block = tiny.engine.model_info.kv_cache_bytes // tiny.engine.scheduler.pool.num_blocks
    small = LLM(str(tiny_path), dtype="float32", kv_cache_memory=per_block * 60, max_num_batched_tokens=24)
    gen = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    params = [SamplingParams(pooling="mean"), SamplingParams(pooling="last")] * 5 + [gen] * 6
    outs = small.generate(prompts + prompts[:6], params)
    for i, out in enumerate(outs[:10]):
        assert_same(out.embedding, want["mean" if i % 2 == 0 else "last"][i])
    assert small.engine.stats().num_preemptions > 0, "the budget did not force preemption"
    # the same prompts again: "last" may start from the prefix cache, "mean" computes every position
    again = small.generate(prompts[:2], [SamplingParams(pooling="last"), SamplingParams(pooling="mean")])
    assert_same(again[0].embedding, want["last"][0])
    assert_same(again[1].embedding, want["mean"][1])
    assert small.engine.is_idle_clean()


def test_default_model_equals_transformers(default_llm, default_gguf_path):
    import os

    import transformers

    reference = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(default_gguf_path), gguf_file=os.path.basename(default_gguf_path), dtype=torch.float32
    ).eval()
    texts = ["The capital of France is Paris.", "def add(a, b):\n    return a + b\n", "Embeddings map text to vectors."]
    ids = [default_llm.tokenizer.encode(t) for t in texts]
    for pooling in ("mean", "last"):
        got = default_llm.embed(texts, pooling=pooling)
        for g, i in zip(got, ids):
            assert_same(g, reference_embedding(reference, i, pooling), atol=1e-4)


def test_bad_settings_are_refused(tiny):
    with pytest.raises(InvalidArgumentError, match="pooling must be one of mean, last"):
        SamplingParams(pooling="max")
    with pytest.raises(InvalidArgumentError, match="takes no n, logprobs"):
        SamplingParams(pooling="mean", n=2)
    with pytest.raises(InvalidArgumentError, match="takes no n, logprobs"):
        SamplingParams(pooling="last", logprobs=1)
    with pytest.raises(InvalidArgumentError, match="context"):
        tiny.embed([[5] * (tiny.engine.max_model_len + 1)])
    assert tiny.embed([[5] * tiny.engine.max_model_len])[0]  # the whole context is fine
    assert tiny.engine.is_idle_clean()
