"""Hugging Face directories: sharded safetensors, checkpoint dtype honoured or overridden."""

from __future__ import annotations

import torch

from surge.loader import load_model
from surge.platform import cpu_has_fast_bf16, resolve_dtype
from tests.conftest import build_tiny_model
from tests.helpers import assert_logits_close, surge_logits


def test_sharded_checkpoint_loads_like_single(tmp_path, tiny_tokenizer_dir):
    import transformers

    single = build_tiny_model("qwen2", tmp_path / "single", tiny_tokenizer_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(single)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="40KB")
    for f in tiny_tokenizer_dir.iterdir():
        (sharded / f.name).write_bytes(f.read_bytes())
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    a = load_model(str(single), "float32", "cpu")
    b = load_model(str(sharded), "float32", "cpu")
    for (name, p), (_, q) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(p, q), name


def test_checkpoint_dtype_honoured_and_overridden(tmp_path, tiny_tokenizer_dir):
    path = build_tiny_model("llama", tmp_path / "bf16", tiny_tokenizer_dir, save_dtype=torch.bfloat16)
    import json

    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    auto = load_model(str(path), "auto", "cpu")
    expected = torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    assert auto.dtype == expected and next(auto.model.parameters()).dtype == expected
    forced = load_model(str(path), "float32", "cpu")
    assert next(forced.model.parameters()).dtype == torch.float32
    half = load_model(str(path), "fp16", "cpu")
    assert next(half.model.parameters()).dtype == torch.float16


def test_auto_dtype_rules():
    assert resolve_dtype("bf16", "cpu") == "bfloat16"
    assert resolve_dtype("auto", "cpu", "float32") == ("bfloat16" if cpu_has_fast_bf16() else "float32")


def test_bf16_model_close_to_float32(tmp_path, tiny_tokenizer_dir):
    """bf16 runs the same network: logits within bf16 precision of float32's."""
    path = build_tiny_model("llama", tmp_path / "m", tiny_tokenizer_dir)
    ids = [[5, 9, 30, 44, 100, 7]]
    (ref,) = surge_logits(load_model(str(path), "float32", "cpu"), ids)
    (got,) = surge_logits(load_model(str(path), "bfloat16", "cpu"), ids)
    assert_logits_close(got, ref, rel=0.05)
