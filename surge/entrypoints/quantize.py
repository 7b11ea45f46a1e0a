"""`surge quantize`: write a quantized checkpoint that `surge serve DIR` and `LLM(DIR)` load,
and print what it costs in size and quality."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

from surge.quant.activations import (
    ACT_METHODS,
    DEFAULT_ACT_METHOD,
    DEFAULT_ACT_PERCENTILE,
    DEFAULT_SMOOTH_ALPHA,
)
from surge.layers.quantization.schemes import METHODS, SCHEMES

MB = 1e6


def add_quantize_parser(sub: Any) -> None:
    p = sub.add_parser("quantize", help="quantize a model (rtn, percentile, mse, gptq; w8a8) into a surge checkpoint")
    p.add_argument("--model", "-m", default=None,
                   help="a .gguf file, a Hugging Face directory or hub id (default: the embedded SmolLM2-135M "
                        "Q4_1, dequantized)")
    p.add_argument("--scheme", default=None, choices=SCHEMES, help="scheme of every decoder linear (a policy's "
                   "'default' wins); the LM head defaults to int8-g32 and the embedding to bf16")
    p.add_argument("--method", default="rtn", choices=METHODS,
                   help="rtn: min-max round-to-nearest; percentile: clip to a percentile range; mse: the clipping "
                        "with the least (activation-weighted, with --calib) squared error per group; gptq: Hessian-"
                        "based error compensation, needs --calib (default: rtn)")
    p.add_argument("--calib", default=None, metavar="FILE",
                   help="UTF-8 calibration text (gptq and w8a8 need it; mse weighs errors by it)")
    p.add_argument("--policy", default=None, metavar="FILE",
                   help="mixed precision: a TOML/JSON file of module-name patterns -> schemes (docs/quantization.md)")
    p.add_argument("--act-order", action="store_true", help="gptq: quantize the most active input columns first")
    p.add_argument("--damp", type=float, default=0.01, help="gptq: damping, a fraction of the Hessian's mean diagonal")
    p.add_argument("--percentile", type=float, default=99.9, help="percentile: the range kept (default: 99.9)")
    p.add_argument("--act-method", default=DEFAULT_ACT_METHOD, choices=ACT_METHODS,
                   help="w8a8: how each linear's static input scale is calibrated: minmax, percentile, or kl "
                        f"(TensorRT's entropy calibration; default: {DEFAULT_ACT_METHOD})")
    p.add_argument("--act-percentile", type=float, default=DEFAULT_ACT_PERCENTILE,
                   help=f"w8a8 with --act-method percentile: the share of |inputs| kept (default: {DEFAULT_ACT_PERCENTILE})")
    p.add_argument("--smooth-alpha", type=float, default=DEFAULT_SMOOTH_ALPHA,
                   help="w8a8: SmoothQuant's migration strength, 0 (no smoothing) to 1 "
                        f"(default: {DEFAULT_SMOOTH_ALPHA})")
    p.add_argument("--ctx", type=int, default=512, help="tokens per calibration and evaluation window (default: 512)")
    p.add_argument("--calib-tokens", type=int, default=None, metavar="N", help="use at most N calibration tokens")
    p.add_argument("--eval-text", default=None, metavar="FILE",
                   help="text for the quality summary (default: the calibration text; none: size only)")
    p.add_argument("--eval-tokens", type=int, default=4096, metavar="N", help="tokens of it to score (default: 4096)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's choice)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    p.add_argument("-v", "--verbose", action="store_true", help="log loading details to stderr")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="new directory for the checkpoint")
    p.set_defaults(func=cmd_quantize)


def summary(result: Any) -> str:
    """The table printed at the end: size per scheme, total, and quality against the float model."""
    rows = [("scheme", "modules", "MB")]
    for scheme in sorted(result.scheme_counts):
        rows.append((scheme, str(result.scheme_counts[scheme]), f"{result.scheme_bytes[scheme] / MB:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.append(f"checkpoint: {result.output}  {result.file_bytes / MB:.1f} MB "
                 f"(bf16: {result.bf16_bytes / MB:.1f} MB, {result.bf16_bytes / result.file_bytes:.2f}x smaller)")
    if result.calibration_tokens:
        lines.append(f"calibration: {result.calibration_tokens} tokens")
    q = result.quality
    if q is None:
        lines.append("quality: not measured (no --eval-text or --calib)")
    else:
        lines.append(f"quality on {result.eval_text} ({q.tokens} tokens, ctx {q.ctx}) against the float model:")
        lines.append(f"  perplexity {q.perplexity:.4f} vs {q.reference_perplexity:.4f} ({q.delta_ppl_pct:+.2f}%)  "
                     f"KLD mean {q.kld_mean:.5f} p99 {q.kld_p99:.5f}  top-1 {100 * q.top1_agreement:.2f}%")
    lines.append(f"seconds: {result.seconds:.1f}")
    return "\n".join(lines)


def cmd_quantize(args: argparse.Namespace) -> int:
    import torch

    from surge.errors import InvalidArgumentError
    from surge.quant.quantize import QuantizeOptions, quantize_model

    if args.threads is not None:
        if args.threads < 1:
            raise InvalidArgumentError(f"threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    opts = QuantizeOptions(args.scheme, args.method, args.calib, args.policy, args.act_order, args.damp,
                           args.percentile, args.ctx, args.calib_tokens, args.eval_text, args.eval_tokens,
                           not args.no_progress, args.act_method, args.act_percentile, args.smooth_alpha)
    result = quantize_model(args.model, args.output, opts)
    print(json.dumps(asdict(result), indent=2) if args.json else summary(result))
    return 0
