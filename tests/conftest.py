"""Shared fixtures: tiny random Hugging Face checkpoints, a trained tiny tokenizer, the default model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

CORPUS = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! "
    "def main(argv):\n    return sum(x * 2 for x in argv)  # code\n\t\tindent\n"
    "Numbers 12345 and 3.14159, dates 2026-11-21. Ünïcödé façade naïve café, 東京 and 🚀🔥 emoji. "
    "Hello, world. How are you today? I am fine, thanks for asking.   multiple   spaces\n\n\n"
) * 4
TINY_VOCAB = 384


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer trained on CORPUS, saved as transformers would (tokenizer.json + config)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB - 8,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator([CORPUS], trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>"
    )
    tok.chat_template = (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    tok.save_pretrained(path)
    return path


def build_tiny_model(
    kind: str, path: Path, tokenizer_dir: Path | None = None, save_dtype: torch.dtype | None = None,
    seed: int = 0, **overrides
) -> Path:
    """Save a seeded random `kind` (llama, mistral, qwen2, qwen3, gemma3, phi3, gpt2, mixtral, qwen2_moe,
    qwen3_moe) model small enough to run in milliseconds."""
    import shutil

    import transformers

    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
        "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel),
        "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
        "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM),
        "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
    }
    config_cls, model_cls = classes[kind]
    kwargs = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        # large enough that greedy decoding does not collapse onto one token
        initializer_range=0.3,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    if kind == "phi3":
        kwargs["pad_token_id"] = 0  # its default (32000) is outside the tiny vocabulary
    if kind == "gpt2":  # its own names for the same settings; tied embeddings, no KV groups
        kwargs = dict(vocab_size=TINY_VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256, initializer_range=0.3,
                      bos_token_id=1, eos_token_id=2, layer_norm_epsilon=1e-5)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).eval()
    if kind in ("qwen3", "gemma3", "qwen3_moe"):  # norms away from their init, so each norm weight matters
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.add_(0.2 * torch.randn(param.shape))
    if save_dtype is not None:
        model = model.to(save_dtype)
    model.save_pretrained(path)
    if tokenizer_dir is not None:
        for name in os.listdir(tokenizer_dir):
            shutil.copy(tokenizer_dir / name, path / name)
    return path


@pytest.fixture(scope="session")
def default_llm():
    """The embedded default model dequantized to float32 (the reference's weights), shared."""
    from surge import LLM

    return LLM(dtype="float32", kv_cache_memory=256 << 20, quantization="none")


@pytest.fixture(scope="session")
def default_gguf_path() -> str:
    from surge.loader.hub import default_model_path

    return default_model_path()
