"""Speculative decoding end to end: the same greedy tokens as without it, the same sampled
distribution, stops and lengths inside a verified proposal, metrics, bad settings."""

from __future__ import annotations

import random

import pytest
import torch

from surge import LLM, SamplingParams
from surge.core import speculation
from surge.core.ngram_proposer import NgramProposer
from surge.engine.args import EngineArgs
from surge.errors import InvalidArgumentError

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 3}
WORDS = ("apple river stone cloud seven green market window paper light orange table music north "
         "silver garden friday number engine").split()


def prompts(n: int, seed: int = 0) -> list[str]:
    """Half that repeat themselves (lists, patterns, code): proposals get accepted; half that do not."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = rng.sample(WORDS, 5)
        kind = i % 4
        if kind == 0:
            out.append(f"Repeat the list three times: {', '.join(words)}. {', '.join(words)}. {', '.join(words[:2])}")
        elif kind == 1:
            out.append("def f(x):\n    return x + 1\n\ndef g(x):\n    return x + 2\n\ndef h(x):\n    return x +")
        elif kind == 2:
            out.append(f"Tell me about the {words[0]} and the {words[1]}.")
        else:
            out.append(f"{rng.randint(1, 50)}, {rng.randint(1, 50)}, 1, 2, 3, 1, 2, 3, 1, 2,")
    return out


@pytest.fixture(scope="module")
def pair():
    """The default model in float32, with and without speculation: a KV cache small enough to
    preempt, chunked prefill in small chunks, prefix caching on."""
    common = dict(dtype="float32", quantization="none", kv_cache_memory=8 << 20, max_num_batched_tokens=64,
                  long_prefill_token_threshold=32, max_num_seqs=8)
    return LLM(**common), LLM(**common, speculative_config=NGRAM)


@pytest.fixture(scope="module")
def pair_bf16():
    """The default model as served (bf16, its quantized weights, the native decode step)."""
    return LLM(), LLM(speculative_config=NGRAM)


@pytest.mark.slow
def test_greedy_tokens_identical_with_and_without_speculation(pair):
    """120 prompts in batches of 1 to 8 (prefills chunked beside decodes, preemptions, prefix
    hits): every token the same."""
    plain, spec = pair
    texts = prompts(120)
    params = SamplingParams(max_tokens=10, temperature=0.0)
    sizes = [1, 3, 8, 2, 5, 4, 6, 8]
    batches, i = [], 0
    while i < len(texts):
        batches.append(texts[i:i + sizes[len(batches) % len(sizes)]])
        i += len(batches[-1])
    before = spec.engine.stats()
    for batch in batches:
        a = [o.outputs[0] for o in plain.generate(batch, params)]
        b = [o.outputs[0] for o in spec.generate(batch, params)]
        assert [(x.token_ids, x.finish_reason) for x in b] == [(x.token_ids, x.finish_reason) for x in a], batch
    stats = spec.engine.stats()
    assert stats.num_preemptions > before.num_preemptions  # the cache was short
    assert stats.prefix_cache_hits > before.prefix_cache_hits
    assert stats.spec_method == "ngram"
    drafts = stats.spec_drafts - before.spec_drafts
    accepted = stats.spec_accepted_tokens - before.spec_accepted_tokens
    assert drafts > 100 and accepted > drafts  # it speculated, and often more than one token a step
    assert spec.engine.scheduler.all_blocks_free()


@pytest.mark.slow
@pytest.mark.parametrize("stop", [dict(stop=[" 3"]), dict(stop_token_ids=None), dict(max_tokens=7),
                                  dict(n=2, seed=5, temperature=0.0)])
def test_stops_and_lengths_inside_a_verified_proposal(pair, stop):
    """A stop reached in the middle of accepted proposals ends the output there, as without."""
    plain, spec = pair
    text = "1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2,"
    if "stop_token_ids" in stop:
        three = plain.tokenizer.encode(" 3", add_special_tokens=False)[0]
        stop = dict(stop_token_ids=[three])
    params = SamplingParams(**{"max_tokens": 20, "temperature": 0.0, **stop})
    for delta in (False, True):
        a, b = (llm.generate([text], params)[0] for llm in pair)
        assert [(c.text, c.token_ids, c.finish_reason, c.stop_reason) for c in b.outputs] == \
            [(c.text, c.token_ids, c.finish_reason, c.stop_reason) for c in a.outputs]
    assert spec.engine.scheduler.all_blocks_free()


@pytest.mark.slow
def test_streamed_deltas_join_to_the_whole(pair):
    """Deltas of several tokens a step (a verified proposal) join to the final text and tokens."""
    from surge.sampling_params import RequestOutputKind

    _, spec = pair
    text = "a b c a b c a b c a b c a b"
    engine = spec.engine
    engine.add_request(text, SamplingParams(max_tokens=16, temperature=0.0, output_kind=RequestOutputKind.DELTA))
    pieces, tokens, sizes = [], [], []
    while engine.has_unfinished_requests():
        for out in engine.step():
            pieces.append(out.outputs[0].text)
            tokens += out.outputs[0].token_ids
            sizes.append(len(out.outputs[0].token_ids))
    whole = spec.generate([text], SamplingParams(max_tokens=16, temperature=0.0))[0].outputs[0]
    assert "".join(pieces) == whole.text and tokens == whole.token_ids
    assert max(sizes) > 1  # some step gave several tokens


def chi_square_p(a: list[int], b: list[int]) -> float:
    """p-value of the chi-square test that two samples of categories come from one distribution
    (categories seen fewer than 10 times in both pooled into one)."""
    cats = sorted(set(a) | set(b))
    counts = torch.tensor([[a.count(c), b.count(c)] for c in cats], dtype=torch.float64)
    small = counts.sum(1) < 10
    if bool(small.any()):
        counts = torch.cat([counts[~small], counts[small].sum(0, keepdim=True)])
    total = counts.sum()
    expected = counts.sum(1, keepdim=True) * counts.sum(0, keepdim=True) / total
    stat = float(((counts - expected) ** 2 / expected).sum())
    dof = counts.shape[0] - 1
    return float(1 - torch.special.gammainc(torch.tensor(dof / 2, dtype=torch.float64),
                                            torch.tensor(stat / 2, dtype=torch.float64)))


@pytest.mark.slow
def test_sampled_tokens_follow_the_same_distribution(pair_bf16, monkeypatch: pytest.MonkeyPatch):
    """Temperature 0.8, top-p 0.9: the second and third tokens (the first verified ones) with and
    without speculation agree by a chi-square test at p = 0.01."""
    monkeypatch.setattr(speculation.Speculator, "fixed_rows", 1e9)  # every proposal taken, at any batch
    plain, spec = pair_bf16
    text = "red blue green red blue green red blue green red blue green red"
    n = 1000
    samples = {}
    for name, llm, offset in (("plain", plain, 0), ("spec", spec, 10**6)):
        before = llm.engine.stats().spec_drafts
        params = [SamplingParams(max_tokens=3, temperature=0.8, top_p=0.9, seed=offset + i) for i in range(n)]
        outs = []
        for start in range(0, n, 50):
            chunk = params[start:start + 50]
            outs += [o.outputs[0].token_ids for o in llm.generate([text] * len(chunk), chunk)]
        samples[name] = [tuple(t[1:3]) for t in outs]
        if name == "spec":
            assert llm.engine.stats().spec_drafts - before >= n // 3  # verification produced many of them
    a, b = samples["plain"], samples["spec"]
    assert chi_square_p([x[0] for x in a], [x[0] for x in b]) > 0.01
    assert chi_square_p(a, b) > 0.01  # the pairs


@pytest.mark.slow
def test_seeded_requests_give_the_same_tokens_in_any_batch_and_as_without(pair, monkeypatch: pytest.MonkeyPatch):
    """A seeded request draws its uniforms in the same order whether its tokens come from
    verified proposals or plain steps: the same tokens alone, in a batch, and without speculation."""
    monkeypatch.setattr(speculation.Speculator, "fixed_rows", 1e9)  # every proposal verified, at any batch
    plain, spec = pair
    text = "red blue green red blue green red blue green red blue green red"
    params = SamplingParams(max_tokens=32, temperature=0.7, top_k=40, seed=11)
    before = spec.engine.stats()
    alone = spec.generate([text], params)[0].outputs[0].token_ids
    others = [SamplingParams(max_tokens=32, temperature=0.9, seed=s) for s in range(5)]
    batch = spec.generate([text] * 4 + ["Tell me a joke."] * 2, others[:3] + [params] + others[3:])
    assert batch[3].outputs[0].token_ids == alone
    assert plain.generate([text], params)[0].outputs[0].token_ids == alone
    stats = spec.engine.stats()
    assert stats.spec_drafts - before.spec_drafts > 5 and stats.spec_accepted_tokens > before.spec_accepted_tokens


@pytest.mark.parametrize("value, message", [
    ('{"method": "medusa"}', "unknown method 'medusa'"),
    ('{"method": "ngram", "num_speculative_tokens": 0}', "positive integer"),
    ('{"method": "ngram", "num_speculative_tokens": 100000}', "more than 32"),
    ('{"method": "draft"}', "method 'draft' needs 'model'"),
    ('{"method": "draft", "model": ""}', "method 'draft' needs 'model'"),
    ('{"method": "ngram", "lookahead": 3}', "unknown key 'lookahead'"),
    ("{method: ngram}", "not JSON"),
    ("[1, 2]", "must be a JSON object"),
])
def test_bad_speculative_configs_are_one_clear_error(value, message):
    with pytest.raises(InvalidArgumentError, match=message):
        EngineArgs(speculative_config=value)
    with pytest.raises(InvalidArgumentError, match=message):
        LLM(speculative_config=value)


def test_the_flag_and_the_keyword_agree():
    import argparse

    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    args = parser.parse_args(["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 6}'])
    from_flag = EngineArgs.from_cli_args(args).speculative_config
    assert from_flag == EngineArgs(speculative_config={"method": "ngram", "num_speculative_tokens": 6}).speculative_config
    assert from_flag.num_speculative_tokens == 6 and from_flag.prompt_lookup_max == 4
    with pytest.raises(SystemExit):
        parser.parse_args(["--speculative-config", '{"method": "eagle"}'])


def test_proposals_beside_embeddings_and_in_a_worker_process(tmp_path_factory, tiny_tokenizer_dir,
                                                              monkeypatch: pytest.MonkeyPatch):
    """A step that verifies proposals beside an embedding request's prompt, in this process and
    in a worker process: the tokens and vectors of plain decoding."""
    from tests.conftest import build_tiny_model

    monkeypatch.setattr(speculation.Speculator, "fixed_rows", 1e9)  # every proposal verified
    # a random model repeats little: propose its own last tokens every step, whatever they are
    monkeypatch.setattr(NgramProposer, "propose", lambda self, request, k: request.output_token_ids[-k:] if k else [])
    path = str(build_tiny_model("llama", tmp_path_factory.mktemp("spec_mixed") / "m", tiny_tokenizer_dir))
    config = NGRAM
    # small steps: the long prompt to embed is prefilled in chunks while the others decode
    small = dict(dtype="float32", kv_cache_memory=16 << 20, max_num_batched_tokens=24, long_prefill_token_threshold=16)
    plain = LLM(path, **small)
    texts = ["the quick brown fox the quick brown fox the", "def main(argv): return main(argv) def", "hello hello",
             "an embedding of this long text " * 12]
    params = [SamplingParams(max_tokens=30, temperature=0.0)] * 3 + [SamplingParams(pooling="mean")]
    expected = plain.generate(texts, params)
    for backend in ("uni", "mp"):
        with LLM(path, **small, speculative_config=config, distributed_executor_backend=backend) as spec:
            got = spec.generate(texts, params)
            assert [o.outputs[0].token_ids for o in got[:3]] == [o.outputs[0].token_ids for o in expected[:3]]
            assert got[3].embedding == pytest.approx(expected[3].embedding, abs=1e-6)
            assert spec.engine.stats().spec_drafts > 0, backend


def test_the_engine_feeds_decode_steps_timings(tmp_path_factory, tiny_tokenizer_dir):
    from tests.conftest import build_tiny_model

    path = build_tiny_model("llama", tmp_path_factory.mktemp("fit") / "m", tiny_tokenizer_dir)
    llm = LLM(str(path), dtype="float32", kv_cache_memory=8 << 20, speculative_config={"method": "ngram"})
    llm.generate(["a b a b a b", "c d"], SamplingParams(max_tokens=6, temperature=0.0))
    n = llm.engine.scheduler.speculator._fit[0]
    assert 4 <= n <= 6  # the decode steps (not the prefill)
