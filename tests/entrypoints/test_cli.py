"""The `surge` command on the embedded default model, as a user runs it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys


def _surge(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("surge")
    cmd = [exe] if exe else [sys.executable, "-m", "surge.entrypoints.cli"]
    return subprocess.run(cmd + list(args), input=stdin, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_generate_default_model():
    proc = _surge("generate", "The capital of France is", "--max-tokens", "12")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("The capital of France is")
    assert "Paris" in proc.stdout


def test_generate_several_prompts_with_chat_template():
    proc = _surge("generate", "--chat", "--max-tokens", "24", "What is the capital of Germany?",
                  "What is the capital of France?")
    assert proc.returncode == 0, proc.stderr
    assert "Berlin" in proc.stdout and "Paris" in proc.stdout


def test_chat_keeps_history():
    # the second question's first token has a clear margin: after /reset it starts from a
    # prefix-cache hit, whose few rows round differently from a whole prefill, and France's
    # first token ("The" / "L") is a tie in bf16 on this model
    proc = _surge("chat", "--max-tokens", "40",
                  stdin="What is the capital of Germany?\n/reset\nWhat is the capital of Japan?\n")
    assert proc.returncode == 0, proc.stderr
    replies = [line for line in proc.stdout.splitlines() if line.strip()]
    assert "Berlin" in proc.stdout and "Tokyo" in proc.stdout, replies


def test_usage_errors_exit_2():
    assert _surge("generate").returncode == 2  # no prompt
    assert _surge("nonsense").returncode == 2
    too_long = _surge("generate", "--max-model-len", "100000", "hi")  # SmolLM2's context is 8192
    assert too_long.returncode == 2 and "max_model_len 100000 is longer than the context" in too_long.stderr


def test_bench_latency_and_throughput_report_numbers():
    import json

    proc = _surge("bench", "latency", "--input-len", "16", "--output-len", "4", "--iters", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["quantization"].startswith("int4-g32") and result["input_len"] == 16
    assert result["prefill_tok_s"] > 0 and result["decode_tok_s"] > 0
    step = result["step"]  # one prefill step and three decode steps were timed, split by part
    assert step["steps"] == 4 and step["forward_ms"] > 0 and 0 < step["overhead_pct"] < 100
    proc = _surge("bench", "throughput", "--num-prompts", "3", "--input-len", "8", "--output-len", "4", "--json",
                  "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}')
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["output_tok_s"] > 0 and result["step"]["steps"] >= 2
    assert result["spec_method"] == "ngram" and 0 <= result["spec_acceptance_rate"] <= 1
    bad = _surge("bench", "latency", "--input-len", "0")
    assert bad.returncode == 2 and "input-len" in bad.stderr
    bad = _surge("bench", "latency", "--speculative-config", '{"method": "eagle"}')
    assert bad.returncode == 2 and "unknown method 'eagle'" in bad.stderr
