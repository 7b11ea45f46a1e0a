"""Tiny random Llama / Mistral / Qwen2 checkpoints: surge matches transformers in float32."""

from __future__ import annotations

import pytest
import torch

from surge import LLM, SamplingParams
from surge.loader import load_model
from tests.conftest import TINY_VOCAB, build_tiny_model
from tests.helpers import assert_logits_close, surge_logits

VARIANTS = {
    "llama": ("llama", {}),
    "llama-gqa1": ("llama", {"num_key_value_heads": 1}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama-bias": ("llama", {"attention_bias": True}),
    "llama3-rope": ("llama", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    "linear-rope": ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}}),
    "yarn-rope": ("llama", {"rope_parameters": {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128}}),
    # a window shorter than the prompts, so the sliding-window mask really matters
    "mistral": ("mistral", {"sliding_window": 24}),
    "qwen2": ("qwen2", {}),
    # per-layer attention: layer 0 full, layer 1 sliding (Qwen2's max_window_layers)
    "qwen2-window": ("qwen2", {"use_sliding_window": True, "sliding_window": 24, "max_window_layers": 1}),
}
PROMPT_LENGTHS = (1, 5, 17, 64)


def _prompts(lengths=PROMPT_LENGTHS) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, TINY_VOCAB, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def tiny(request, tmp_path_factory, tiny_tokenizer_dir):
    kind, overrides = VARIANTS[request.param]
    path = build_tiny_model(kind, tmp_path_factory.mktemp(request.param), tiny_tokenizer_dir, **overrides)
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, ref


def test_logits_match_transformers(tiny):
    path, ref = tiny
    loaded = load_model(str(path), "float32", "cpu")
    prompts = _prompts()
    ours = surge_logits(loaded, prompts)  # all prompts in one flat batch
    for ids, got in zip(prompts, ours):
        with torch.no_grad():
            want = ref(torch.tensor([ids])).logits[0]
        assert_logits_close(got, want)


def test_chunked_prefill_matches_transformers(tiny):
    """Prompts fed in 3 pieces read the earlier pieces back from the paged cache."""
    path, ref = tiny
    loaded = load_model(str(path), "float32", "cpu")
    prompts = _prompts((40, 64))
    for ids, got in zip(prompts, surge_logits(loaded, prompts, chunks=3)):
        with torch.no_grad():
            want = ref(torch.tensor([ids])).logits[0]
        assert_logits_close(got, want)


def test_greedy_generation_matches_transformers(tiny):
    path, ref = tiny
    llm = LLM(str(path), dtype="float32", kv_cache_memory=8 << 20)
    prompts = _prompts()
    ref.generation_config.eos_token_id = None  # like ignore_eos: EOS is a token like any other
    outs = llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    for ids, out in zip(prompts, outs):
        with torch.no_grad():
            full = ref.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=32, do_sample=False, pad_token_id=0,
            )
        want = full[0, len(ids):].tolist()
        assert out.outputs[0].token_ids == want
        assert len(set(want)) > 3, "degenerate reference output proves nothing"
    assert llm.engine.is_idle_clean()
