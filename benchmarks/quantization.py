"""The quantization table of docs/quantization.md: for the default model, each scheme and method's
checkpoint size, quality against the dequantized float model (perplexity, KL divergence, top-1
agreement on a held-out text) and speed (prefill of a 512-token prompt, batch-1 decode after
it, output tokens/s of 32 requests decoded together), in one run.

    python benchmarks/quantization.py [--threads 2] [--only w8a8]
    python benchmarks/quantization.py --speed 2      # the speed rows interleaved, medians, x bf16

Calibration text: tests/data/apache-2.0.txt; scored text: tests/data/gpl-3.0.txt (first 4096
tokens, windows of 512), the same as the CI quality gates.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CALIB = ROOT / "tests" / "data" / "apache-2.0.txt"
TEXT = ROOT / "tests" / "data" / "gpl-3.0.txt"
MIXED_POLICY = """\
default = "int4-g64"
[modules]
"*.self_attn.*" = "int8"
"""
W8A8_LM_HEAD = """\
default = "w8a8"
[modules]
"lm_head" = "w8a8"
"""
W8A8_DOWN_INT8 = """\
default = "w8a8"
[modules]
"*.down_proj" = "int8"
"""
# label, scheme, method, options, policy (int4-g128 does not divide the default model's 576 inputs)
CONFIGS = [
    ("int8", "int8", "rtn", {}, None),
    ("int8-g32", "int8-g32", "rtn", {}, None),
    ("int4-g32", "int4-g32", "rtn", {}, None),
    ("int4-g64", "int4-g64", "rtn", {}, None),
    ("int4-g64", "int4-g64", "percentile", {}, None),
    ("int4-g64", "int4-g64", "mse", {}, None),
    ("int4-g64", "int4-g64", "gptq", {}, None),
    ("int4-g64", "int4-g64", "gptq", {"act_order": True}, None),
    ("attention int8, MLP int4-g64", None, "gptq", {}, MIXED_POLICY),
    ("w8a8, no smoothing", "w8a8", "rtn", {"act_method": "minmax", "smooth_alpha": 0.0}, None),
    ("w8a8", "w8a8", "rtn", {"act_method": "minmax"}, None),
    ("w8a8", "w8a8", "rtn", {"act_method": "percentile"}, None),
    ("w8a8", "w8a8", "rtn", {"act_method": "kl"}, None),
    ("w8a8, down_proj int8", None, "rtn", {"act_method": "minmax"}, W8A8_DOWN_INT8),
    ("w8a8, LM head w8a8 too", None, "rtn", {"act_method": "minmax"}, W8A8_LM_HEAD),
]


def speed(model: str | None, quantization: str) -> tuple[float, float, float]:
    """Prefill tok/s (512-token prompt), batch-1 decode tok/s after it, batch-32 output tok/s."""
    from surge import LLM
    from surge.entrypoints.bench import bench_latency, bench_throughput

    llm = LLM(model, dtype="bfloat16", quantization=quantization, kv_cache_memory=512 << 20)
    latency = bench_latency(llm, input_len=512, output_len=64, iters=2)
    batch = bench_throughput(llm, num_prompts=32, input_len=64, output_len=64)
    del llm
    gc.collect()
    return latency["prefill_tok_s"], latency["decode_tok_s"], batch["output_tok_s"]


# --speed: the rows whose speed differs, interleaved (label, scheme, policy, quantization)
SPEED_ROWS = [
    ("bf16", None, None, "none"),
    ("int8 (weight-only, per channel)", None, None, "int8"),
    ("Q4_1 GGUF", None, None, "auto"),
    ("w8a8", "w8a8", None, "auto"),
    ("w8a8, down_proj int8", None, W8A8_DOWN_INT8, "auto"),
    ("w8a8, LM head w8a8 too", None, W8A8_LM_HEAD, "auto"),
]


def quantize(tmp: str, i: int, scheme: str | None, method: str, policy: str | None, **options) -> tuple[str, object]:
    """Row i's checkpoint written under tmp (its policy file beside it): (directory, QuantizeResult)."""
    from surge.quant.quantize import QuantizeOptions, quantize_model

    policy_path = None
    if policy:
        policy_path = os.path.join(tmp, f"policy{i}.toml")
        Path(policy_path).write_text(policy)
    out = os.path.join(tmp, f"q{i}")
    return out, quantize_model(None, out, QuantizeOptions(scheme, method, str(CALIB), policy_path, progress=False,
                                                          **options))


def speed_table(rounds: int) -> None:
    """SPEED_ROWS measured in turn, `rounds` times; medians and ratios to bf16."""
    with tempfile.TemporaryDirectory() as tmp:
        models = [None if scheme is None and policy is None else quantize(tmp, i, scheme, "rtn", policy,
                                                                          eval_tokens=512)[0]
                  for i, (_, scheme, policy, _) in enumerate(SPEED_ROWS)]
        runs: list[list[tuple[float, float, float]]] = [[] for _ in SPEED_ROWS]
        for _ in range(rounds):
            for i, (model, row) in enumerate(zip(models, SPEED_ROWS)):
                runs[i].append(speed(model, row[3]))
    medians = [[statistics.median(r[j] for r in row_runs) for j in range(3)] for row_runs in runs]
    print("| model | prefill tok/s | decode tok/s | batch-32 tok/s |")
    print("|---|---:|---:|---:|")
    for (label, *_), m in zip(SPEED_ROWS, medians):
        cells = " | ".join(f"{v:.{1 if j == 1 else 0}f} ({v / medians[0][j]:.2f}x)" for j, v in enumerate(m))
        print(f"| {label} | {cells} |", flush=True)


def _name(method: str, options: dict) -> str:
    if "act_method" in options:
        return f"{method} weights, {options['act_method']} inputs"
    return method + (" act-order" if options.get("act_order") else "")


def main() -> None:
    from surge.loader.hub import default_model_path

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default=None, help="only the rows whose label contains this")
    parser.add_argument("--speed", type=int, default=0, metavar="ROUNDS",
                        help="instead: the speed of bf16, int8, Q4_1 and the w8a8 rows, interleaved ROUNDS times")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.speed:
        speed_table(args.speed)
        return

    from surge.loader import load_model

    params = sum(p.numel() for p in load_model(None, "float32", "cpu", "none").model.parameters())
    print("| scheme | method | size MB | perplexity | Δppl % | mean KLD | top-1 % | prefill tok/s | decode tok/s "
          "| batch-32 tok/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    ref_ppl = float("nan")
    gguf = default_model_path()
    baselines = [("bf16 (the reference's weights)", 2 * params / 1e6, speed(None, "none")),
                 ("Q4_1 GGUF (the source, exactly the reference)", os.path.getsize(gguf) / 1e6, speed(None, "auto"))]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, scheme, method, options, policy) in enumerate(CONFIGS):
            if args.only and args.only not in label:
                continue
            out, result = quantize(tmp, i, scheme, method, policy, eval_text=str(TEXT), eval_tokens=4096, **options)
            q = result.quality
            prefill, decode, batch = speed(out, "auto")
            print(f"| {label} | {_name(method, options)} | {result.file_bytes / 1e6:.1f} | {q.perplexity:.3f} | "
                  f"{q.delta_ppl_pct:+.2f} | {q.kld_mean:.4f} | {100 * q.top1_agreement:.1f} | {prefill:.0f} | "
                  f"{decode:.1f} | {batch:.0f} |", flush=True)
            ref_ppl = q.reference_perplexity
            shutil.rmtree(out)
            gc.collect()
    for label, mb, (prefill, decode, batch) in baselines:
        print(f"| {label} | - | {mb:.1f} | {ref_ppl:.3f} | 0 | 0 | 100 | {prefill:.0f} | {decode:.1f} | {batch:.0f} |")


if __name__ == "__main__":
    main()
