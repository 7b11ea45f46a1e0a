"""The embedded default model (SmolLM2-135M-Instruct Q4_1): surge generates transformers' tokens."""

from __future__ import annotations

import os

import pytest
import torch

from surge import SamplingParams
from tests.helpers import assert_logits_close, loaded_of, surge_logits

PLAIN = [
    "The capital of France is",
    "def fibonacci(n):\n",
    "Once upon a time, in a small village,",
]
CHATS = [
    [{"role": "user", "content": "What is the boiling point of water?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Name three primary colors."}],
]


@pytest.fixture(scope="module")
def reference(default_gguf_path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(default_gguf_path), gguf_file=os.path.basename(default_gguf_path), dtype=torch.float32
    ).eval()


def _prompt_ids(llm) -> list[list[int]]:
    tok = llm.tokenizer
    return [tok.encode(p) for p in PLAIN] + [tok.encode_chat(m) for m in CHATS]


def test_greedy_32_tokens_equal_transformers(default_llm, reference):
    prompts = _prompt_ids(default_llm)
    outs = default_llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    reference.generation_config.eos_token_id = None
    for ids, out in zip(prompts, outs):
        with torch.no_grad():
            full = reference.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=32, do_sample=False, pad_token_id=2,
            )
        assert out.outputs[0].token_ids == full[0, len(ids):].tolist(), default_llm.tokenizer.decode(ids)
    assert default_llm.engine.is_idle_clean()


def test_prefill_logits_match_transformers(default_llm, reference):
    ids = _prompt_ids(default_llm)[3]
    (got,) = surge_logits(loaded_of(default_llm), [ids])
    with torch.no_grad():
        want = reference(torch.tensor([ids])).logits[0]
    assert_logits_close(got, want)


def test_answers_are_sensible(default_llm):
    out = default_llm.generate("The capital of France is", SamplingParams(max_tokens=8, temperature=0))[0]
    assert "Paris" in out.outputs[0].text
    chat = default_llm.chat([{"role": "user", "content": "What is the capital of Germany?"}],
                            SamplingParams(max_tokens=24, temperature=0))[0]
    assert "Berlin" in chat.outputs[0].text
    assert chat.outputs[0].finish_reason in ("stop", "length")
