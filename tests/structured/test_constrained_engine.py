"""Constrained decoding in the engine, on the default model (float32): outputs match their
constraint, free requests in the same batch are untouched, and every sampling setting (n > 1,
seeds, stop strings, logprobs, min_tokens, ignore_eos, preemption, prefix caching, the mp
executor) behaves as without a constraint. Bad constraints are refused before anything is
queued, and a request whose grammar fails ends alone."""

from __future__ import annotations

import json
import math

import jsonschema
import pytest
import torch

from surge import LLM, SamplingParams
from surge.errors import StructuredOutputError
from surge.layers.sampler import apply_token_bitmask
from surge.sampling_params import StructuredOutputsParams
from tests.structured.schemas import SCHEMAS

PROMPTS = ["Describe a person as JSON:", "Write a JSON object about a city:", "Give me some data:",
           "The answer, as JSON, is", "Here is a product record:", "A weather report in JSON:",
           "List three colors:", "My favourite number is", "Once upon a time", "def add(a, b):",
           "The capital of France is", "Translate to French: cheese", "Q: What is 2+2? A:",
           "The best way to learn is", "import numpy as np\n", "Dear team,"]
CONSTRAINED = ["person", "color_enum", "nested_address", "tags_minmax", "anyof_id", "defs_ref", "status_response",
               "two_enums", "phone_pattern", "integer_list", "nullable_middle", "unique_enum_tags", "multiple_of",
               "all_of", "boolean_flags", "optional_fields"]


def tokens(outs) -> list[list[int]]:
    return [list(c.token_ids) for o in outs for c in o.outputs]


def valid(text: str, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def json_params(name: str, **kw) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 200, "temperature": 0, **kw,
                             "structured_outputs": StructuredOutputsParams(json=SCHEMAS[name])})


def test_free_requests_are_untouched_by_constrained_ones_in_the_batch(default_llm):
    """32 requests, 16 constrained with 16 schemas and 16 free: the free ones' tokens are those of
    a run without the constrained ones (float32, greedy)."""
    free = SamplingParams(max_tokens=24, temperature=0)
    default_llm.engine.scheduler.pool.reset_prefix_cache()
    alone = tokens(default_llm.generate(PROMPTS, free))
    default_llm.engine.scheduler.pool.reset_prefix_cache()
    prompts = [p for pair in zip(PROMPTS, PROMPTS) for p in pair]
    params = [x for name in CONSTRAINED for x in (json_params(name), free)]
    outs = default_llm.generate(prompts, params)
    assert tokens(outs[1::2]) == alone
    for name, out in zip(CONSTRAINED, outs[0::2]):
        c = out.outputs[0]
        assert c.finish_reason == "stop" and valid(c.text, SCHEMAS[name]), (name, c.text)
        # an end of sequence only where the grammar is complete (llguidance's matchers end there
        # by themselves, xgrammar's on the end-of-sequence token they then allow alone)
        assert not set(c.token_ids[:-1]) & default_llm.engine.eos_ids
    assert default_llm.engine.is_idle_clean()
    assert not default_llm.engine.structured.active  # every matcher freed


def test_regex_choice_grammar_and_json_object(default_llm):
    specs = [({"regex": "^[0-9]{3}-[a-z]{2,8}$"}, lambda t: len(t) >= 6 and t[3] == "-" and t[:3].isdigit()),
             ({"choice": ["positive", "negative", "neutral"]}, lambda t: t in ("positive", "negative", "neutral")),
             ({"grammar": 'root ::= "(" [a-z]+ ("," [a-z]+)? ")"'}, lambda t: t.startswith("(") and t.endswith(")")),
             ({"json_object": True}, lambda t: isinstance(json.loads(t), dict))]
    prompts = ["Phone extension and team:", "The review says:", "Two words in brackets:",
               'A JSON object with one key, like {"ok": true}:']
    for seed in (None, 3, 4):
        # any object at all is tested greedy only: sampled, the small model's keys run on to max_tokens
        todo = specs if seed is None else specs[:3]
        params = [SamplingParams(max_tokens=100, temperature=0 if seed is None else 0.9, seed=seed,
                                 structured_outputs=spec) for spec, _ in todo]
        outs = default_llm.generate(prompts[:len(todo)], params)
        for (spec, check), out in zip(todo, outs):
            c = out.outputs[0]
            assert c.finish_reason == "stop" and check(c.text), (spec, seed, c.text)


def test_n_and_seeds(default_llm):
    params = json_params("person", n=4, temperature=1.0, seed=11)
    first = default_llm.generate(["A person:"], params)[0]
    again = default_llm.generate(["A person:"], params)[0]
    assert [c.text for c in first.outputs] == [c.text for c in again.outputs]
    assert all(valid(c.text, SCHEMAS["person"]) for c in first.outputs), [c.text for c in first.outputs]
    assert len({c.text for c in first.outputs}) > 1  # four samples, four streams


def test_stop_strings_logprobs_and_min_tokens(default_llm):
    choice = StructuredOutputsParams(choice=["yes", "no"])
    out = default_llm.generate(["Is the sky blue? Answer:"], SamplingParams(
        max_tokens=10, temperature=0, logprobs=3, structured_outputs=choice))[0].outputs[0]
    assert out.text in ("yes", "no") and out.finish_reason == "stop"
    first = out.logprobs[0]
    # logprobs are of the constrained distribution: the alternatives are tokens the grammar allows
    assert all(math.isfinite(lp.logprob) for lp in first.values())
    assert all("yes".startswith(lp.decoded_token) or "no".startswith(lp.decoded_token) for lp in first.values())
    # a stop string cuts a constrained output as it cuts any other
    stopped = default_llm.generate(["A person:"], json_params("person", stop=[","]))[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == "," and "," not in stopped.text
    assert stopped.text.startswith('{"name": ')
    # the grammar ends the output even where min_tokens or ignore_eos would go on
    for extra in ({"min_tokens": 8}, {"ignore_eos": True}):
        short = default_llm.generate(["Answer:"], SamplingParams(max_tokens=20, temperature=0, structured_outputs=choice,
                                                                 **extra))[0].outputs[0]
        assert short.text in ("yes", "no") and short.finish_reason == "stop", extra


def test_prefix_caching_and_preemption(default_llm, default_gguf_path):
    names = CONSTRAINED[:8]
    prompts = [f"Record {i} as JSON, with every field filled in carefully:" for i in range(len(names))]
    params = [json_params(name, max_tokens=120) for name in names]
    want = tokens(default_llm.generate(prompts, params))
    cached = tokens(default_llm.generate(prompts, params))  # the prompts now come from the prefix cache
    assert cached == want
    per_block = default_llm.engine.model_info.kv_cache_bytes // default_llm.engine.scheduler.pool.num_blocks
    small = LLM(default_gguf_path, dtype="float32", kv_cache_memory=per_block * 14, quantization="none")
    outs = small.generate(prompts, params)
    assert small.engine.stats().num_preemptions > 0, "the budget did not force preemption"
    assert tokens(outs) == want
    for name, out in zip(names, outs):
        assert valid(out.outputs[0].text, SCHEMAS[name]), (name, out.outputs[0].text)
    assert small.engine.is_idle_clean()


@pytest.mark.slow
def test_mp_executor_equals_uni(default_llm):
    params = [json_params(name, max_tokens=80) for name in CONSTRAINED[:4]]
    prompts = PROMPTS[:4]
    want = tokens(default_llm.generate(prompts, params))
    with LLM(dtype="float32", quantization="none", kv_cache_memory=64 << 20,
             distributed_executor_backend="mp") as llm:
        assert tokens(llm.generate(prompts, params)) == want


@pytest.mark.parametrize("spec, message", [
    ({"json": {"type": "foo"}}, "invalid JSON schema"),
    ({"json": "{not json"}, "not valid JSON"),
    ({"json": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}}, "uniqueItems"),
    ({"json": {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}}, "not"),
    ({"json": {"type": "string", "pattern": "^(?=a)b$"}}, "look-around"),
    ({"json": {"$ref": "#/$defs/missing"}}, "missing"),
    ({"regex": "a(b"}, "regex"),
    ({"grammar": "root ::= ("}, "grammar"),
    ({"choice": []}, "choice"),
    ({"regex": "a", "choice": ["a"]}, "exactly one"),
    ({}, "exactly one"),
])
def test_bad_constraints_are_refused_before_queueing(default_llm, spec, message):
    with pytest.raises(StructuredOutputError, match=message):
        default_llm.generate(["hi"], SamplingParams(max_tokens=4, structured_outputs=spec))
    assert default_llm.engine.is_idle_clean() and not default_llm.engine.structured.active
    assert default_llm.generate(["hi"], SamplingParams(max_tokens=2, temperature=0))[0].finished


def test_a_failing_grammar_fails_its_request_alone(default_llm, monkeypatch):
    """A matcher that refuses the sampled token (a grammar engine's fault) ends that request with
    an error; the other requests of the batch finish as they would have."""
    free = SamplingParams(max_tokens=12, temperature=0)
    want = tokens(default_llm.generate(PROMPTS[:3], free))
    structured = default_llm.engine.structured
    real_add = structured.add

    class Refusing:
        def __init__(self, inner):
            self.inner = inner

        def fill(self, bitmask, row):
            self.inner.fill(bitmask, row)

        def allows(self, token):
            return self.inner.allows(token)

        def accept(self, token):
            return False

        def is_terminated(self):
            return False

    def add(request_id, spec):
        real_add(request_id, spec)
        structured._matchers[request_id] = Refusing(structured._matchers[request_id])

    monkeypatch.setattr(structured, "add", add)
    outs = default_llm.generate(PROMPTS[:3] + ["x"], [free] * 3 + [json_params("person")])
    assert tokens(outs[:3]) == want
    bad = outs[3]
    assert bad.outputs[0].finish_reason == "error" and "not allowed by the request's grammar" in bad.error
    monkeypatch.undo()
    assert not structured.active and default_llm.engine.is_idle_clean()


@pytest.mark.parametrize("where", ["mask", "check"])
def test_a_matcher_that_raises_fails_its_request_alone(default_llm, monkeypatch, where):
    """A grammar engine raising while it computes a mask, or while it checks a sampled token
    against the grammar (the deferred mask's first question), ends that request with an error
    naming it; the rest of the batch (constrained ones too) finishes as it would have."""
    free = SamplingParams(max_tokens=12, temperature=0)
    good = json_params("color_enum", max_tokens=40)
    want = tokens(default_llm.generate(PROMPTS[:2] + ["y"], [free, free, good]))
    structured = default_llm.engine.structured
    real_add = structured.add

    class Raising:
        parallel = False

        def fill(self, bitmask, row):
            raise ValueError("mask computation exploded")

        def allows(self, token):
            if where == "check":
                raise ValueError("mask computation exploded")
            return False  # so the mask is computed

    def add(request_id, spec):
        real_add(request_id, spec)
        if spec.kind == "json" and "age" in json.dumps(spec.json):  # the person schema only
            structured._matchers[request_id] = Raising()

    monkeypatch.setattr(structured, "add", add)
    outs = default_llm.generate(PROMPTS[:2] + ["y", "x"], [free, free, good, json_params("person")])
    assert tokens(outs[:3]) == want
    assert outs[3].outputs[0].finish_reason == "error" and "mask computation exploded" in outs[3].error
    monkeypatch.undo()
    assert not structured.active and default_llm.engine.is_idle_clean()


def test_grammars_are_compiled_once_and_cached(default_llm):
    structured = default_llm.engine.structured
    spec = {"json": {"type": "object", "properties": {"cache_probe": {"type": "integer"}}, "required": ["cache_probe"]}}
    before = structured.compiles
    for _ in range(3):
        default_llm.generate(["x"], SamplingParams(max_tokens=10, temperature=0, structured_outputs=spec))
    assert structured.compiles == before + 1
    with pytest.raises(StructuredOutputError):
        default_llm.generate(["x"], SamplingParams(max_tokens=4, structured_outputs={"regex": "(("}))
    count = structured.compiles
    with pytest.raises(StructuredOutputError):  # the refusal is cached too
        default_llm.generate(["x"], SamplingParams(max_tokens=4, structured_outputs={"regex": "(("}))
    assert structured.compiles == count


@pytest.mark.parametrize("vocab", [49152, 1000, 37])
def test_bitmask_kernel_equals_unpacked_bits(vocab):
    """The native kernel against the bits unpacked with tensor ops, rows in any order, the words
    past the vocabulary ignored, all-ones words skipped."""
    gen = torch.Generator().manual_seed(vocab)
    words = (vocab + 31) // 32
    logits = torch.randn(5, vocab, generator=gen)
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, words + 1), dtype=torch.int32, generator=gen)
    bitmask[1, : words // 2] = -1
    rows = [4, 0, 2]
    got = logits.clone()
    apply_token_bitmask(got, bitmask, rows)
    bits = ((bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).view(3, -1)[:, :vocab].bool()
    want = logits.clone()
    for i, r in enumerate(rows):
        want[r] = want[r].masked_fill(~bits[i], float("-inf"))
    assert torch.equal(got, want)
    strided = logits.T.contiguous().T  # not unit stride along the vocabulary: the tensor-op path
    apply_token_bitmask(strided, bitmask, rows)
    assert torch.equal(strided, want)
