"""What int8 inputs would cost in quality: `surge eval compare` of each model as it runs today
(bf16 inputs to its block-quantized linears) and with those inputs rounded to int8 first, both
against the same weights in float32; and the int8 one against the model as it runs today (bf16
inputs: how often the two paths agree).

    python benchmarks/int8_inputs.py [--models M ...] [--max-tokens 2048] [--block 32]

The int8 inputs are simulated, not computed by an integer kernel: before every block-quantized
linear (QuantLinear: int4 / int8 groups, GGUF blocks and K-quants) the input is rounded the way
llama.cpp rounds its Q8_0 inputs (per run of --block values along K, scale = max |x| / 127,
codes rounded half to even), then dequantized and rounded to bf16 again. That last rounding is
one an int8 x codes kernel would not make, so the figures are a little pessimistic. What this
answers: would a kernel on int8 inputs (AVX-512 VNNI, twice the products an instruction of the
bf16 dot product) keep a model within the bar the quantization tests hold every scheme to
(teacher-forced top-1 >= 95% against float)? docs/performance.md keeps the results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "tests" / "data" / "gpl-3.0.txt"
DEFAULT_MODELS = ("default", "qwen2.5-coder-1.5b-instruct-q4_k_m", "gemma-3-270m-q4_k_m")


def _simulate_int8_inputs(block: int) -> None:
    """The first model load_model gives (the one measured, not the reference) takes int8 inputs."""
    import torch

    import surge.loader
    from surge.layers.quantization.quant_linear import QuantLinear

    load_model = surge.loader.load_model
    done = []

    def int8_inputs(linear: QuantLinear) -> None:
        plain = linear.forward

        def forward(x: torch.Tensor) -> torch.Tensor:
            xf = x.float().reshape(*x.shape[:-1], x.shape[-1] // block, block)
            scale = xf.abs().amax(-1, keepdim=True) / 127
            codes = torch.round(xf / torch.where(scale == 0, torch.ones_like(scale), scale)).clamp(-127, 127)
            return plain((codes * scale).reshape(x.shape).to(x.dtype))

        linear.forward = forward

    def load(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        loaded = load_model(*args, **kwargs)
        if not done:
            done.append(True)
            for module in loaded.model.modules():
                if isinstance(module, QuantLinear):
                    int8_inputs(module)
        return loaded

    surge.loader.load_model = load


def _child() -> int:
    """Run `surge eval compare` in this process (argv after --child), int8 inputs if asked."""
    block = int(os.environ.get("SURGE_BENCH_INT8_BLOCK", "0"))
    if block:
        _simulate_int8_inputs(block)
    from surge.entrypoints.cli import main

    return main(sys.argv[sys.argv.index("--child") + 1:])


def _measure(model: str, int8_block: int, against_today: bool, max_tokens: int, threads: int) -> dict:
    args = [sys.executable, __file__, "--child", "eval", "compare", "--dtype", "bfloat16", "--threads", str(threads),
            "--text", str(TEXT), "--max-tokens", str(max_tokens), "--json", "--no-progress"]
    if against_today:
        args += ["--reference-dtype", "bfloat16", "--reference-quantization", "auto"]
    if model != "default":
        args += ["-m", model]
    env = dict(os.environ, SURGE_BENCH_INT8_BLOCK=str(int8_block))
    out = subprocess.run(args, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out[out.index("{"):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                    help="'default' or what --model takes (packaged names, files)")
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--block", type=int, default=32, help="values per int8 scale along K")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    print(f"{'model':38s} {'inputs':>7s} {'against':>8s} {'d ppl':>7s} {'mean KLD':>9s} {'p99 KLD':>8s} {'top-1':>7s}")
    for model in args.models:
        for block, today in ((0, False), (args.block, False), (args.block, True)):
            r = _measure(model, block, today, args.max_tokens, args.threads)
            label = "bf16" if block == 0 else f"int8/{block}"
            print(f"{model:38s} {label:>7s} {'bf16' if today else 'float32':>8s} {r['delta_ppl_pct']:+6.2f}% "
                  f"{r['kld_mean']:9.5f} {r['kld_p99']:8.5f} {100 * r['top1_agreement']:6.2f}%", flush=True)


if __name__ == "__main__":
    if "--child" in sys.argv:
        sys.exit(_child())
    main()
