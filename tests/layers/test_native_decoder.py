"""The native decode step (surge/layers/native_decoder.py, csrc/decoder.cpp) gives the same bits
as the eager layers: hidden states and KV caches, step after step of teacher-forced decoding
after an eager prefill, at batch 1 and 3, for every family with a plain layer and every weight
format the kernels run; and it steps aside, saying why, where it cannot run."""

from __future__ import annotations

import logging

import pytest
import torch

from surge import LLM, SamplingParams
from surge.core.scheduler_output import ScheduledRequest, SchedulerOutput
from surge.layers.native import linear_ops
from surge.layers.native_decoder import NativeDecoder, build_native_decoder
from surge.loader import load_model
from surge.worker.kv_cache import allocate_kv_caches
from surge.worker.model_runner import ModelRunner
from tests.conftest import TINY_VOCAB, build_tiny_model
from tests.gguf_builder import write_gguf_from_hf
from tests.loader.test_gguf import MIXED_TYPES

pytestmark = pytest.mark.skipif(linear_ops() is None, reason="the native decoder needs AVX-512 BF16")

BLOCK = 16
# Shapes the native linears take (output channels in blocks of 64): hidden 128, 4 heads of 32,
# 2 KV heads. Each family's layer in its own form; windows shorter than the decoded contexts.
SHAPES = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
              initializer_range=0.05)
FAMILIES = {
    "llama-bias": ("llama", {"attention_bias": True}),
    "qwen3": ("qwen3", {"head_dim": 32}),  # q/k norms per head
    "gemma3": ("gemma3", {  # sandwich norms, GELU-tanh, a local layer with its own RoPE, tied
        "num_hidden_layers": 2, "head_dim": 32, "query_pre_attn_scalar": 24, "sliding_window": 24,
        "tie_word_embeddings": True, "hidden_activation": "gelu_pytorch_tanh", "layer_types": [
            "sliding_attention", "full_attention"],
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}}),
    "phi3-partial-rope": ("phi3", {"sliding_window": 24, "original_max_position_embeddings": 64, "rope_parameters": {
        "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
        "original_max_position_embeddings": 64,
        "short_factor": [1.0 + 0.1 * i for i in range(8)], "long_factor": [1.0 + 0.1 * i for i in range(8)]}}),
}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, tiny_tokenizer_dir):
    base = tmp_path_factory.mktemp("native-decoder")
    paths = {name: build_tiny_model(kind, base / name, tiny_tokenizer_dir, **{**SHAPES, **extra})
             for name, (kind, extra) in FAMILIES.items()}
    paths["gpt2"] = build_tiny_model("gpt2", base / "gpt2", tiny_tokenizer_dir, n_embd=128, n_head=4,
                                     initializer_range=0.05)
    paths["gpt2-erf-gelu"] = build_tiny_model("gpt2", base / "gpt2-erf", tiny_tokenizer_dir, n_embd=128, n_head=4,
                                              n_inner=256, activation_function="gelu", initializer_range=0.05)
    mixed = build_tiny_model("llama", base / "mixed-hf", tiny_tokenizer_dir, hidden_size=256, intermediate_size=512,
                             num_attention_heads=4, num_key_value_heads=2, initializer_range=0.05)
    paths["gguf-every-type"] = write_gguf_from_hf(mixed, base / "mixed.gguf", MIXED_TYPES)
    return paths


def decode(model, decoder: NativeDecoder | None, batch: int, steps: int = 12, kv_dtype=torch.bfloat16,
           seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """Prefill `batch` prompts of different lengths in one eager step, then decode `steps`
    teacher-forced tokens a step: (hidden states of each decode step, the caches, the
    decoder's calls)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [30, 7, 19][:batch]
    prompts = [torch.randint(3, TINY_VOCAB, (n,), generator=gen).tolist() for n in lengths]
    forced = torch.randint(3, TINY_VOCAB, (batch, steps), generator=gen).tolist()
    per_seq = -(-(max(lengths) + steps) // BLOCK)
    caches = allocate_kv_caches(model.config, 1 + batch * per_seq, BLOCK, kv_dtype, "cpu")
    calls = []
    runner = ModelRunner(model, caches, BLOCK, "cpu",
                         decoder=None if decoder is None else (lambda *a: calls.append(1) or decoder(*a)))
    # the blocks interleaved between sequences (and block 0 unused), as a busy pool hands them out
    tables = [[1 + i + batch * b for b in range(per_seq)] for i in range(batch)]
    runner.hidden_states(SchedulerOutput([ScheduledRequest(str(i), p, 0, tables[i], True)
                                          for i, p in enumerate(prompts)]))
    hidden = []
    for s in range(steps):
        step = [ScheduledRequest(str(i), [forced[i][s]], lengths[i] + s, tables[i], True) for i in range(batch)]
        hidden.append(runner.hidden_states(SchedulerOutput(step))[0].clone())
    return hidden, caches, len(calls)


def assert_same_decode(model, batch: int, kv_dtype=torch.bfloat16) -> None:
    decoder = build_native_decoder(model, allocate_kv_caches(model.config, 2, BLOCK, kv_dtype, "cpu"))
    assert decoder is not None
    eager, eager_caches, _ = decode(model, None, batch, kv_dtype=kv_dtype)
    native, native_caches, calls = decode(model, decoder, batch, kv_dtype=kv_dtype)
    assert calls == len(native)  # every decode step went through the stack
    for step, (a, b) in enumerate(zip(eager, native)):
        assert torch.equal(a, b), f"step {step}: max difference {(a.float() - b.float()).abs().max()}"
    for a, b in zip(eager_caches, native_caches):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", [*FAMILIES, "gpt2", "gpt2-erf-gelu"])
@pytest.mark.parametrize("batch", [1, 3])
def test_native_step_equals_eager_bf16(tiny_models, name, batch):
    model = load_model(str(tiny_models[name]), "bfloat16", "cpu", quantization="none").model
    assert_same_decode(model, batch)


@pytest.mark.parametrize("quantization", ["int4", "auto"])
def test_native_step_equals_eager_quantized(tiny_models, quantization):
    """int4 groups from a float checkpoint; a GGUF with every tensor type (GGUF blocks, int4 / int8
    groups, dequantized kinds, fused projections of mixed formats as parts)."""
    name = "gguf-every-type" if quantization == "auto" else "llama-bias"
    model = load_model(str(tiny_models[name]), "bfloat16", "cpu", quantization=quantization).model
    assert_same_decode(model, 3)


@pytest.mark.parametrize("batch", [1, 3])
def test_native_step_equals_eager_default_model(batch):
    """The default GGUF (Q4_1 body as int4 groups, Q8_0 tied table): real widths, where a norm
    summed in another order than the eager one already differs in the last bits."""
    assert_same_decode(load_model(None, "bfloat16", "cpu").model, batch)


def test_native_step_equals_eager_int8_cache(tiny_models):
    model = load_model(str(tiny_models["gemma3"]), "bfloat16", "cpu", quantization="none").model
    assert_same_decode(model, 3, kv_dtype=torch.int8)


@pytest.mark.parametrize(("name", "dtype", "quantization", "reason"), [
    ("llama-bias", "float32", "none", "activations are float32"),
    ("llama-bias", "bfloat16", "int8", "has no native kernel"),
])
def test_falls_back_with_the_reason(tiny_models, caplog, name, dtype, quantization, reason):
    model = load_model(str(tiny_models[name]), dtype, "cpu", quantization=quantization).model
    caches = allocate_kv_caches(model.config, 2, BLOCK, model.dtype, "cpu")
    with caplog.at_level(logging.INFO, logger="surge.layers.native_decoder"):
        assert build_native_decoder(model, caches) is None
    assert reason in caplog.text and "decoding in PyTorch" in caplog.text


def test_experts_fall_back(tmp_path, tiny_tokenizer_dir, caplog):
    path = build_tiny_model("mixtral", tmp_path / "moe", tiny_tokenizer_dir, **SHAPES, num_local_experts=4,
                            num_experts_per_tok=2)
    model = load_model(str(path), "bfloat16", "cpu", quantization="none").model
    with caplog.at_level(logging.INFO, logger="surge.layers.native_decoder"):
        assert build_native_decoder(model, allocate_kv_caches(model.config, 2, BLOCK, model.dtype, "cpu")) is None
    assert "mixture of experts" in caplog.text


def test_decoder_refuses_bad_inputs(tiny_models):
    model = load_model(str(tiny_models["llama-bias"]), "bfloat16", "cpu", quantization="none").model
    caches = allocate_kv_caches(model.config, 4, BLOCK, model.dtype, "cpu")
    decoder = build_native_decoder(model, caches)
    ids, positions = torch.tensor([5]), torch.tensor([0])
    from surge.layers.attention import DecodeBatch

    batch = DecodeBatch(torch.tensor([16]), torch.tensor([[1, 2]]), torch.tensor([1]))
    with pytest.raises(RuntimeError, match="one KV cache per layer"):
        decoder(ids, positions, caches[:1], batch)
    with pytest.raises(RuntimeError, match="outside the cache"):
        decoder(ids, positions, caches, DecodeBatch(torch.tensor([10**6]), batch.block_tables, batch.seq_lens))
    # an incomplete stack is refused when built, not when run
    stack = torch.classes.surge_native.Decoder(128)
    stack.add_layer([0, 4, 2, 32, -1, 0, 1], 0.1)
    with pytest.raises(RuntimeError, match="final norm"):
        stack.validate()


def test_engine_uses_it_by_default_and_outputs_are_unchanged():
    """The default model through the engine: greedy tokens with and without the native step,
    one request alone and five at once (their prompts prefilled while others decode)."""
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time,", "List three colors:", "1, 2,"]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outputs = {}
    for native in (True, False):
        llm = LLM(native_decode=native)
        runner = llm.engine.core.executor.worker.runner
        assert (runner.decoder is not None) == native
        alone = llm.generate(prompts[:1], params)
        together = llm.generate(prompts, params)
        outputs[native] = [o.outputs[0].token_ids for o in alone + together]
        llm.engine.shutdown()
    assert outputs[True] == outputs[False]
