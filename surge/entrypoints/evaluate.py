"""`surge eval perplexity | compare`: a model's quality on a text, with the engine flags of serve.

perplexity: sliding-window perplexity of the model on --text.
compare: the model against a reference (by default the same checkpoint in float32, unquantized,
so a GGUF's dequantized weights): perplexity of both, KL divergence of the next-token
distributions (mean, median, p99, max) and top-1 agreement, as llama.cpp's
`llama-perplexity --kl-divergence` reports them.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import asdict
from typing import Any


def add_eval_parser(sub: Any, add_model_args: Callable[[argparse.ArgumentParser], None]) -> None:
    ev = sub.add_parser("eval", help="quality on a text: perplexity, KL divergence against a reference")
    kinds = ev.add_subparsers(dest="eval_command", required=True)
    ppl = kinds.add_parser("perplexity", help="perplexity of the model on a text file")
    cmp = kinds.add_parser("compare", help="the model against a reference: perplexity, KL divergence, top-1 agreement")
    for p in (ppl, cmp):
        add_model_args(p)
        p.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text to score")
        p.add_argument("--ctx", type=int, default=512, help="tokens per window (default: 512)")
        p.add_argument("--stride", type=int, default=None,
                       help="tokens between window starts (default: ctx, windows side by side; less: sliding)")
        p.add_argument("--max-tokens", type=int, default=None, metavar="N", help="score only the text's first N tokens")
        p.add_argument("--json", action="store_true", help="print the result as JSON")
        p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    cmp.add_argument("--reference", default=None, metavar="MODEL",
                     help="the reference checkpoint (default: the same as --model)")
    cmp.add_argument("--reference-dtype", default="float32", help="the reference's dtype (default: float32)")
    cmp.add_argument("--reference-quantization", default="none", choices=["auto", "none", "int8", "int4"],
                     help="the reference's quantization (default: none, its weights dequantized)")


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from surge.engine.args import EngineArgs
    from surge.loader import load_model
    from surge.quant.evaluate import (
        WindowRunner, check_windows, compare, perplexity, read_text, same_tokens, tokenize_text)

    engine_args = EngineArgs.from_cli_args(args)  # every engine flag checked, before the load
    if engine_args.threads is not None:
        torch.set_num_threads(engine_args.threads)
    check_windows(args.ctx, args.stride)  # before the load
    text = read_text(args.text)
    loaded = load_model(args.model, args.dtype, args.device, args.quantization, args.group_size)
    ids = tokenize_text(loaded, text, args.max_tokens)
    runner = WindowRunner(loaded, args.ctx, args.block_size, args.max_num_batched_tokens, args.compile,
                          args.kv_cache_dtype)
    progress = not args.no_progress
    if args.eval_command == "perplexity":
        result: Any = perplexity(runner, ids, args.stride, progress)
        lines = [f"model: {result.model} ({result.quantization})",
                 f"tokens scored: {result.tokens} in {result.windows} windows of {result.ctx} (stride {result.stride})",
                 f"perplexity: {result.perplexity:.4f}  (mean NLL {result.nll:.4f} nats)",
                 f"seconds: {result.seconds:.1f}"]
    else:
        ref = load_model(args.reference if args.reference is not None else args.model, args.reference_dtype,
                         args.device, args.reference_quantization, args.group_size)
        same_tokens(ref, text, ids, args.max_tokens)
        ref_runner = WindowRunner(ref, args.ctx, args.block_size, args.max_num_batched_tokens)
        result = compare(runner, ref_runner, ids, args.stride, progress)
        lines = [f"model: {result.model} ({result.quantization})",
                 f"reference: {result.reference} ({result.reference_quantization}, {args.reference_dtype})",
                 f"tokens scored: {result.tokens} in {result.windows} windows of {result.ctx} (stride {result.stride})",
                 f"perplexity: {result.perplexity:.4f}  reference {result.reference_perplexity:.4f}  "
                 f"({result.delta_ppl_pct:+.2f}%)",
                 f"KL divergence: mean {result.kld_mean:.5f}  median {result.kld_median:.5f}  "
                 f"p99 {result.kld_p99:.5f}  max {result.kld_max:.5f}",
                 f"top-1 agreement: {100 * result.top1_agreement:.2f}%",
                 f"seconds: {result.seconds:.1f}"]
    print(json.dumps(asdict(result), indent=2) if args.json else "\n".join(lines))
    return 0
