"""EngineArgs, the one table of engine settings: CLI flags, surge.toml keys and LLM(**kwargs)
all come from it and are checked by it; --max-model-len caps the context."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from surge import LLM, SamplingParams
from surge.engine.args import EngineArgs
from surge.errors import InvalidArgumentError
from tests.conftest import build_tiny_model


def parser(serve: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(exit_on_error=False)
    EngineArgs.add_cli_args(p, serve=serve)
    return p


def test_every_field_is_a_flag_with_its_default():
    args = EngineArgs.from_cli_args(parser(serve=True).parse_args([]))
    assert args == EngineArgs()
    flags = {a.dest: a.option_strings for a in parser(serve=True)._actions if a.dest != "help"}
    assert set(flags) == {f.name for f in dataclasses.fields(EngineArgs)}
    assert flags["enable_prefix_caching"] == ["--no-prefix-caching"] and flags["model"] == ["--model", "-m"]
    assert "warmup" not in {a.dest for a in parser()._actions}  # a server's setting only


def test_flags_parse_and_check():
    args = EngineArgs.from_cli_args(parser().parse_args(
        ["--max-model-len", "512", "--kv-cache-memory", "8MiB", "--no-prefix-caching", "-q", "int8",
         "--distributed-executor-backend", "mp", "--long-prefill-token-threshold", "0"]))
    assert (args.max_model_len, args.kv_cache_memory, args.enable_prefix_caching, args.quantization,
            args.distributed_executor_backend, args.long_prefill_token_threshold) == (512, 8 << 20, False, "int8",
                                                                                       "mp", 0)
    for bad in (["--max-num-seqs", "x"], ["--kv-cache-memory", "lots"], ["--quantization", "int3"]):
        with pytest.raises(argparse.ArgumentError):
            parser().parse_args(bad)
    with pytest.raises(InvalidArgumentError, match="max_model_len must be a positive integer"):
        EngineArgs.from_cli_args(parser().parse_args(["--max-model-len", "0"]))


def test_kwargs_and_settings_files_are_checked_against_the_table():
    with pytest.raises(InvalidArgumentError, match="unknown setting 'max_seqs'.*max_num_seqs"):
        LLM(max_seqs=4)
    with pytest.raises(InvalidArgumentError, match="distributed_executor_backend must be one of uni, mp, ray"):
        EngineArgs(distributed_executor_backend="slurm")
    with pytest.raises(InvalidArgumentError, match="target_ongoing_requests must be a number above 0"):
        EngineArgs(target_ongoing_requests=-1)
    with pytest.raises(InvalidArgumentError, match="replicas run behind `surge serve"):
        LLM(distributed_executor_backend="ray")
    with pytest.raises(InvalidArgumentError, match="f.toml: unknown setting 'model'"):
        EngineArgs().updated({"model": "x"}, "f.toml")  # the repository names the model, not the file
    assert EngineArgs().updated({"max_model_len": 64}, "f.toml").max_model_len == 64


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory, tiny_tokenizer_dir):
    return build_tiny_model("llama", tmp_path_factory.mktemp("args") / "m", tiny_tokenizer_dir)


def test_max_model_len_caps_the_context(tiny_path):
    llm = LLM(str(tiny_path), dtype="float32", kv_cache_memory=4 << 20, max_model_len=40)
    assert llm.engine.max_model_len == 40
    out = llm.generate(list(range(10, 30)), SamplingParams(max_tokens=None, temperature=0, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 20  # max_tokens unset: up to the capped context
    with pytest.raises(InvalidArgumentError, match="exceeds the model's context of 40 tokens"):
        llm.generate(list(range(10, 30)), SamplingParams(max_tokens=21))
    with pytest.raises(InvalidArgumentError, match="longer than the context of m \\(1024 tokens\\)"):
        LLM(str(tiny_path), max_model_len=4096)
