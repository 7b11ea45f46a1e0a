"""The config.json `surge quantize` writes reads back into the model's own configuration, for
every family and setting the reference variants cover (per-layer RoPE, q/k norms, Gemma's
scalars, windows per layer type, experts)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from surge.loader.hf_config import config_from_hf_dir
from surge.quant.checkpoint import hf_config
from surge.quant.quantize import QuantizeOptions, quantize_model
from tests.conftest import CORPUS, build_tiny_model
from tests.helpers import assert_saved_equals_memory
from tests.models.test_reference_models import VARIANTS


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_written_config_reads_back_the_same(variant, tmp_path, tiny_tokenizer_dir):
    kind, overrides = VARIANTS[variant]
    overrides = {k: v for k, v in overrides.items() if k != "seed"}
    source = build_tiny_model(kind, tmp_path / "src", tiny_tokenizer_dir, **overrides)
    config = config_from_hf_dir(str(source))
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(hf_config(config, "bfloat16", {"quant_method": "surge"})))
    again = config_from_hf_dir(str(out))
    assert again == dataclasses.replace(config, checkpoint_dtype="bfloat16")


@pytest.mark.parametrize("variant", ["gemma3", "qwen3", "llama-bias", "llama3-rope", "phi3-longrope", "gpt2-inner"])
def test_quantized_checkpoint_of_each_family_runs_what_memory_does(variant, tmp_path, tiny_tokenizer_dir):
    """quantize -> save -> load gives the in-memory quantized model's logits bit for bit: the
    norms Gemma stores as w (run as 1 + w), q/k norms, biases, scaled RoPE and Phi-3's fused
    checkpoint tensors (written back as q/k/v and gate/up) survive the file."""
    kind, overrides = VARIANTS[variant]
    source = build_tiny_model(kind, tmp_path / "src", tiny_tokenizer_dir, **overrides)
    opts = QuantizeOptions(scheme="int8", progress=False, eval_tokens=None)
    quantize_model(str(source), str(tmp_path / "out"), opts)
    assert_saved_equals_memory(str(source), str(tmp_path / "out"), opts, CORPUS)
