"""The quantization table of docs/quantization.md: for the default model, each scheme and method's
checkpoint size, quality against the dequantized float model (perplexity, KL divergence, top-1
agreement on a held-out text) and batch-1 decode speed, in one run.

    python benchmarks/quantization.py [--threads 2] [--only int4-g64]

Calibration text: tests/data/apache-2.0.txt; scored text: tests/data/gpl-3.0.txt (first 4096
tokens, windows of 512), the same as the CI quality gates.
"""

from __future__ import annotations

import argparse
import gc
import os
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
# label, scheme, method, act_order, policy (int4-g128 does not divide the default model's 576 inputs)
CONFIGS = [
    ("int8", "int8", "rtn", False, None),
    ("int8-g32", "int8-g32", "rtn", False, None),
    ("int4-g32", "int4-g32", "rtn", False, None),
    ("int4-g64", "int4-g64", "rtn", False, None),
    ("int4-g64", "int4-g64", "percentile", False, None),
    ("int4-g64", "int4-g64", "mse", False, None),
    ("int4-g64", "int4-g64", "gptq", False, None),
    ("int4-g64", "int4-g64", "gptq", True, None),
    ("attention int8, MLP int4-g64", None, "gptq", False, MIXED_POLICY),
]


def decode_speed(model: str | None, quantization: str) -> float:
    from surge import LLM
    from surge.entrypoints.bench import bench_latency

    llm = LLM(model, dtype="bfloat16", quantization=quantization, kv_cache_memory=128 << 20)
    result = bench_latency(llm, input_len=128, output_len=128, iters=3)
    del llm
    gc.collect()
    return result["decode_tok_s"]


def main() -> None:
    from surge.loader.hub import default_model_path
    from surge.quant.quantize import QuantizeOptions, quantize_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default=None, help="only the rows whose label contains this")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from surge.loader import load_model

    params = sum(p.numel() for p in load_model(None, "float32", "cpu", "none").model.parameters())
    print("| scheme | method | size MB | perplexity | Δppl % | mean KLD | top-1 % | decode tok/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|", flush=True)
    ref_ppl = float("nan")
    gguf = default_model_path()
    baselines = [("bf16 (the reference's weights)", 2 * params / 1e6, decode_speed(None, "none")),
                 ("Q4_1 GGUF (the source, exactly the reference)", os.path.getsize(gguf) / 1e6, decode_speed(None, "auto"))]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, scheme, method, act_order, policy) in enumerate(CONFIGS):
            if args.only and args.only not in label:
                continue
            policy_path = None
            if policy:
                policy_path = os.path.join(tmp, f"policy{i}.toml")
                Path(policy_path).write_text(policy)
            opts = QuantizeOptions(scheme, method, str(CALIB), policy_path, act_order, eval_text=str(TEXT),
                                   eval_tokens=4096, progress=False)
            out = os.path.join(tmp, f"q{i}")
            result = quantize_model(None, out, opts)
            name = method + (" act-order" if act_order else "")
            q = result.quality
            print(f"| {label} | {name} | {result.file_bytes / 1e6:.1f} | {q.perplexity:.3f} | {q.delta_ppl_pct:+.2f} | "
                  f"{q.kld_mean:.4f} | {100 * q.top1_agreement:.1f} | {decode_speed(out, 'auto'):.1f} |", flush=True)
            ref_ppl = q.reference_perplexity
            gc.collect()
    for label, mb, speed in baselines:
        print(f"| {label} | - | {mb:.1f} | {ref_ppl:.3f} | 0 | 0 | 100 | {speed:.1f} |")


if __name__ == "__main__":
    main()
