"""Bad input: each mistake a user can make gives a typed error naming the file and the problem,
and the CLI prints it as one line and exits with code 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import gguf
import pytest

from surge import SamplingParams
from surge.errors import (
    InvalidArgumentError,
    ModelFormatError,
    ModelNotFoundError,
    UnsupportedArchitectureError,
    UnsupportedTensorTypeError,
)
from surge.loader import load_model
from tests.conftest import build_tiny_model
from tests.gguf_builder import rewrite_gguf, write_gguf_from_hf

T = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_tokenizer_dir):
    return build_tiny_model("llama", tmp_path_factory.mktemp("err") / "hf", tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def tiny_gguf(tiny_dir):
    return write_gguf_from_hf(tiny_dir, tiny_dir.parent / "tiny.gguf")


def test_missing_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such file"):
        load_model(str(tmp_path / "nope.gguf"))


def test_truncated_gguf(tiny_gguf, tmp_path):
    data = tiny_gguf.read_bytes()
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelFormatError, match="truncated"):
        load_model(str(bad))
    bad.write_bytes(data[:5000])  # cut inside the metadata
    with pytest.raises(ModelFormatError, match=str(bad)):
        load_model(str(bad))


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    with pytest.raises(ModelFormatError, match="not a valid GGUF"):
        load_model(str(bad))


def test_file_that_is_not_gguf(tmp_path):
    bad = tmp_path / "weights.bin"
    bad.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ModelFormatError, match="not a GGUF file"):
        load_model(str(bad))


def test_unsupported_architecture_gguf(tiny_gguf, tmp_path):
    bad = rewrite_gguf(tiny_gguf, tmp_path / "mamba.gguf", arch="mamba")
    with pytest.raises(UnsupportedArchitectureError, match="'mamba'"):
        load_model(str(bad))


def test_unsupported_architecture_hf(tiny_dir, tmp_path):
    bad = tmp_path / "mamba"
    shutil.copytree(tiny_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["architectures"] = ["MambaForCausalLM"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="MambaForCausalLM"):
        load_model(str(bad))


@pytest.mark.parametrize("key, value, what", [
    ("attn_logit_softcapping", 50.0, "attention logit soft-capping"),
    ("use_bidirectional_attention", True, "bidirectional attention"),
])
def test_unimplemented_setting_of_a_supported_architecture(tiny_dir, tmp_path, key, value, what):
    bad = tmp_path / key
    shutil.copytree(tiny_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config[key] = value
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match=f"{what} \\({key}=.*\\) is not supported"):
        load_model(str(bad))


def test_unsupported_tensor_type(tiny_gguf, tmp_path):
    bad = rewrite_gguf(tiny_gguf, tmp_path / "tq1.gguf", tensor_type=T.IQ4_NL)
    with pytest.raises(UnsupportedTensorTypeError, match=r"blk\.0\.ffn_up\.weight.*IQ4_NL"):
        load_model(str(bad))


def test_k_quant_rows_not_a_multiple_of_its_block(tiny_gguf, tmp_path):
    bad = rewrite_gguf(tiny_gguf, tmp_path / "rows.gguf", tensor_type=T.Q4_K, row_length=96)
    with pytest.raises(ModelFormatError, match=rf"{bad}.*blk\.0\.ffn_up\.weight.*Q4_K.*rows of 96 values.*block of 256"):
        load_model(str(bad))


def test_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelFormatError, match="no config.json"):
        load_model(str(tmp_path))


def test_hf_directory_without_weights(tiny_dir, tmp_path):
    bad = tmp_path / "noweights"
    shutil.copytree(tiny_dir, bad)
    os.remove(bad / "model.safetensors")
    with pytest.raises(ModelFormatError, match="no \\*.safetensors"):
        load_model(str(bad))


def test_hub_id_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="offline") as info:
        load_model("some-org/some-model")
    assert "local path" in str(info.value)


def test_bad_dtype(tiny_dir):
    with pytest.raises(InvalidArgumentError, match="unknown dtype 'float8'"):
        load_model(str(tiny_dir), dtype="float8")


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"top_k": -5}, "top_k"),
    ({"min_p": 2}, "min_p"),
    ({"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
])
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        SamplingParams(**kwargs)


def test_prompt_errors_leave_engine_clean(tiny_dir):
    from surge import LLM

    llm = LLM(str(tiny_dir), dtype="float32", kv_cache_memory=4 << 20)
    with pytest.raises(InvalidArgumentError, match=r"prompt \(1000 tokens\) \+ max_tokens \(100\).*1024"):
        llm.generate([[5] * 1000], SamplingParams(max_tokens=100))
    with pytest.raises(InvalidArgumentError, match="outside the vocabulary"):
        llm.generate([[5, 10_000]])
    with pytest.raises(InvalidArgumentError, match="empty"):
        llm.generate([[]])
    # a bad prompt among good ones: nothing stays queued, and the engine still serves
    with pytest.raises(InvalidArgumentError):
        llm.generate([[5, 6], [10_000]])
    assert llm.engine.is_idle_clean()
    assert llm.generate([[5, 6]], SamplingParams(max_tokens=3))[0].outputs[0].finish_reason


def test_kv_cache_too_small(tiny_dir):
    from surge import LLM

    with pytest.raises(InvalidArgumentError, match="smaller than one block"):
        LLM(str(tiny_dir), dtype="float32", kv_cache_memory=1000)
    llm = LLM(str(tiny_dir), dtype="float32", kv_cache_memory=32 << 10)  # 4 blocks of 16 tokens
    with pytest.raises(InvalidArgumentError, match="--kv-cache-memory"):
        llm.generate([[5] * 60], SamplingParams(max_tokens=10))
    assert llm.engine.is_idle_clean()


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "surge.entrypoints.cli", *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("case", ["missing", "corrupt", "noconfig", "dtype"])
def test_cli_prints_one_line_and_exits_2(case, tmp_path):
    target = {"missing": str(tmp_path / "missing.gguf"), "noconfig": str(tmp_path)}.get(case)
    if case == "corrupt":
        target = str(tmp_path / "c.gguf")
        (tmp_path / "c.gguf").write_bytes(b"GGUF" + b"\xff" * 64)
    args = ["generate", "hello"] + (["--model", target] if target else []) + (
        ["--dtype", "int3"] if case == "dtype" else [])
    proc = _cli(*args)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("surge: error: "), proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("key, value, what", [
    ("scale_attn_weights", False, r"unscaled attention scores \(scale_attn_weights=False\)"),
    ("scale_attn_by_inverse_layer_idx", True, r"scores scaled by the inverse layer index"),
])
def test_gpt2_settings_surge_does_not_implement(tmp_path, tiny_tokenizer_dir, key, value, what):
    gpt2 = build_tiny_model("gpt2", tmp_path / "gpt2", tiny_tokenizer_dir)
    config = json.loads((gpt2 / "config.json").read_text())
    config[key] = value
    (gpt2 / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match=f"config.json: {what}"):
        load_model(str(gpt2))
