"""Tiny random Llama / Mistral / Qwen2 / Qwen3 / Gemma 3 / Phi-3 / GPT-2 / Mixtral / Qwen2-MoE / Qwen3-MoE
checkpoints: surge matches transformers in float32."""

from __future__ import annotations

import pytest
import torch

from surge import LLM, SamplingParams
from surge.loader import load_model
from tests.conftest import TINY_VOCAB, build_tiny_model
from tests.gguf_builder import write_gguf_from_hf
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
    # head_dim 32 != hidden 64 / 4 heads; q/k RMSNorm per head
    "qwen3": ("qwen3", {"head_dim": 32, "initializer_range": 0.15}),
    "qwen3-tied": ("qwen3", {"head_dim": 32, "tie_word_embeddings": True, "num_key_value_heads": 1}),
    # Gemma 3: a local layer with a 24-token window and its own RoPE base, then a global one;
    # scores scaled by query_pre_attn_scalar (not head_dim); tied embeddings scaled by sqrt(hidden)
    # (6 layers: the 6th global, as llama.cpp assumes of every Gemma 3 GGUF)
    "gemma3": ("gemma3", {
        "num_hidden_layers": 6, "head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 24,
        "tie_word_embeddings": True, "hidden_activation": "gelu_pytorch_tanh",
        "initializer_range": 0.04, "seed": 1,  # tied Gemmas easily repeat one token; this one does not
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}}),
    # untied head, final logit soft-capping, linear RoPE scaling on the global layers
    "gemma3-untied": ("gemma3", {
        "head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": 24, "tie_word_embeddings": False, "final_logit_softcapping": 3.0,
        "layer_types": ["full_attention", "sliding_attention"],
        "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100_000.0},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}}),
    # Phi-3: checkpoints with fused qkv_proj / gate_up_proj; a window shorter than the prompts
    "phi3": ("phi3", {"sliding_window": 24}),
    # LongRoPE of a long-context variant (context 1024 > 64 pretrained: the long factors, cos/sin
    # scaled) over half the head dimension, as Phi-4-mini; short and long factors equal, since
    # transformers picks them per forward by length (tests/layers/test_rotary.py checks each set)
    "phi3-longrope": ("phi3", {"original_max_position_embeddings": 64, "rope_parameters": {
        "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
        "original_max_position_embeddings": 64,
        "short_factor": [1.0 + 0.37 * i for i in range(4)], "long_factor": [1.0 + 0.37 * i for i in range(4)]}}),
    # GPT-2: LayerNorm, learned positions, Conv1D weights, tied head; with n_inner given
    "gpt2": ("gpt2", {}),
    "gpt2-inner": ("gpt2", {"n_inner": 96, "activation_function": "gelu"}),
    # MoE: top-2 of 4 experts (renormalised), and top-1 of 8, more experts than a decode step's
    # tokens; Mixtral with a sliding window shorter than the prompts
    "mixtral": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 24}),
    "mixtral-top1": ("mixtral", {"num_local_experts": 8, "num_experts_per_tok": 1, "sliding_window": None}),
    # Qwen2-MoE: a gated shared expert, top-k not renormalised, layer 1 dense (mlp_only_layers)
    "qwen2-moe": ("qwen2_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                "shared_expert_intermediate_size": 48, "mlp_only_layers": [1]}),
    # Qwen3-MoE: q/k norm, explicit head_dim, top-3 of 6 renormalised
    "qwen3-moe": ("qwen3_moe", {"num_experts": 6, "num_experts_per_tok": 3, "moe_intermediate_size": 32,
                                "head_dim": 32, "norm_topk_prob": True, "initializer_range": 0.15}),
}
PROMPT_LENGTHS = (1, 5, 17, 64)
# variants llama.cpp's converter writes as these GGUF architectures (the others use settings
# its GGUF metadata cannot carry: rope scaling baked into tensors, per-layer windows, biases
# it would permute)
GGUF_ARCH = {"llama": "llama", "llama-gqa1": "llama", "llama-tied": "llama", "qwen2": "qwen2",
             "qwen3": "qwen3", "qwen3-tied": "qwen3", "gemma3": "gemma3", "phi3": "phi3", "phi3-longrope": "phi3", "gpt2": "gpt2",
             "mixtral-top1": "llama",
             "qwen2-moe": "qwen2moe", "qwen3-moe": "qwen3moe"}


def _prompts(lengths=PROMPT_LENGTHS) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, TINY_VOCAB, (n,), generator=g).tolist() for n in lengths]


def _build(variant: str, tmp_path_factory, tokenizer_dir):
    import transformers

    kind, overrides = VARIANTS[variant]
    overrides = dict(overrides)
    seed = overrides.pop("seed", 0)
    path = build_tiny_model(kind, tmp_path_factory.mktemp(variant), tokenizer_dir, seed=seed, **overrides)
    return path, transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), variant


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def tiny(request, tmp_path_factory, tiny_tokenizer_dir):
    return _build(request.param, tmp_path_factory, tiny_tokenizer_dir)


def test_logits_match_transformers(tiny):
    path, ref, _ = tiny
    loaded = load_model(str(path), "float32", "cpu")
    prompts = _prompts()
    ours = surge_logits(loaded, prompts)  # all prompts in one flat batch
    for ids, got in zip(prompts, ours):
        with torch.no_grad():
            want = ref(torch.tensor([ids])).logits[0]
        assert_logits_close(got, want)


def test_chunked_prefill_matches_transformers(tiny):
    """Prompts fed in 3 pieces read the earlier pieces back from the paged cache."""
    path, ref, _ = tiny
    loaded = load_model(str(path), "float32", "cpu")
    prompts = _prompts((40, 64))
    for ids, got in zip(prompts, surge_logits(loaded, prompts, chunks=3)):
        with torch.no_grad():
            want = ref(torch.tensor([ids])).logits[0]
        assert_logits_close(got, want)


def test_greedy_generation_matches_transformers(tiny):
    path, ref, _ = tiny
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


def test_prefix_hit_and_preemption_keep_transformers_tokens(tiny):
    """A prompt sharing 32 tokens with an earlier one starts from the prefix cache, and a KV
    budget for about two sequences forces preemptions: greedy tokens stay transformers'."""
    path, ref, _ = tiny
    first, *others = _prompts((48, 60, 40, 52))
    shared = first[:32] + others[0][:20]
    probe = LLM(str(path), dtype="float32", kv_cache_memory=1 << 20)
    per_block = probe.engine.model_info.kv_cache_bytes // probe.engine.scheduler.pool.num_blocks
    llm = LLM(str(path), dtype="float32", kv_cache_memory=per_block * 13, block_size=16)
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    outs = llm.generate([first], params) + llm.generate([shared, *others], params)
    stats = llm.engine.stats()
    assert outs[1].num_cached_tokens == 32 and stats.num_preemptions > 0
    ref.generation_config.eos_token_id = None
    for ids, out in zip([first, shared, *others], outs):
        with torch.no_grad():
            full = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=32, do_sample=False, pad_token_id=0)
        assert out.outputs[0].token_ids == full[0, len(ids):].tolist()
    assert llm.engine.is_idle_clean()


@pytest.mark.parametrize("variant", sorted(GGUF_ARCH))
def test_gguf_written_as_llama_cpp_does_gives_the_same_logits(variant, tmp_path_factory, tiny_tokenizer_dir):
    path, ref, _ = _build(variant, tmp_path_factory, tiny_tokenizer_dir)
    gguf_path = write_gguf_from_hf(path, path.parent / f"{variant}.gguf", arch=GGUF_ARCH[variant])
    loaded = load_model(str(gguf_path), "float32", "cpu")
    prompts = _prompts()
    for ids, got in zip(prompts, surge_logits(loaded, prompts)):
        with torch.no_grad():
            want = ref(torch.tensor([ids])).logits[0]
        assert_logits_close(got, want)
