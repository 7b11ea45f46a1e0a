"""`surge bench latency | throughput | serve`: the numbers docs/performance.md is made of.

latency: one prompt of --input-len tokens, prefill time and decode tokens/s (batch 1).
throughput: --num-prompts prompts through LLM.generate at once (offline, continuous batching).
serve: a load generator against any OpenAI-compatible URL (surge, llama-server, vLLM) at a
fixed concurrency, streaming; TTFT / TPOT / end-to-end percentiles and output tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from typing import Any

WORDS = ("time person year way day thing man world life hand part child eye woman place work week case "
         "point government company number group problem fact river mountain music science garden window "
         "history language market energy ocean forest letter story picture kitchen morning question answer").split()


def synthetic_prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    xs = sorted(values)

    def pct(p: float) -> float:
        return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]

    return {"mean": statistics.fmean(xs), "p50": pct(50), "p90": pct(90), "p99": pct(99)}


def _emit(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2))
        return
    for key, value in result.items():
        if isinstance(value, dict):
            inner = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items())
            print(f"{key}: {inner}")
        else:
            print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")


def structured_outputs(spec: str | None) -> Any:
    """--structured-outputs: a constraint as JSON ({"json": SCHEMA}, {"regex": ...}, ...) or @FILE."""
    if spec is None:
        return None
    from surge.errors import InvalidArgumentError
    from surge.sampling_params import StructuredOutputsParams

    try:
        if spec.startswith("@"):
            with open(spec[1:], encoding="utf-8") as f:
                spec = f.read()
        fields = json.loads(spec)
    except (OSError, ValueError) as exc:
        raise InvalidArgumentError(f"--structured-outputs: {exc}") from exc
    if not isinstance(fields, dict):
        raise InvalidArgumentError("--structured-outputs must be a JSON object such as {\"regex\": \"[a-z]+\"}")
    return StructuredOutputsParams(**fields) if set(fields) <= {"json", "regex", "choice", "grammar", "json_object"} \
        else StructuredOutputsParams(json=fields)  # a bare schema


def time_request(engine: Any, ids: list[int], output_len: int, constraint: Any = None,
                 temperature: float = 0.0) -> tuple[float, float, int]:
    """(seconds to the first token, decode tokens/s after it, tokens generated) of one request
    (greedy, or sampled with seed 0) run alone on an idle engine (a constraint may end it
    before output_len)."""
    from surge.sampling_params import RequestOutputKind, SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=temperature, seed=0 if temperature else None,
                            ignore_eos=True, output_kind=RequestOutputKind.DELTA, structured_outputs=constraint)
    start = time.perf_counter()
    engine.add_request(ids, params)
    first = None
    generated = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            generated += sum(len(c.token_ids) for c in out.outputs)
            if first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    return first - start, (generated - 1) / (end - first) if generated > 1 else 0.0, generated


def _constraint_report(llm: Any, constraint: Any) -> dict[str, Any]:
    if constraint is None:
        return {}
    stats = llm.engine.structured.stats()
    return {"constraint": constraint.kind, "grammar_compile_s": stats["grammar_compile_seconds"],
            # the share of constrained rows whose whole mask was computed (the others: the
            # grammar allowed the token sampled as if free)
            "masks_computed_share": round(stats["masks_computed"] / max(1, stats["constrained_rows"]), 3)}


def _speculation_report(llm: Any) -> dict[str, Any]:
    """What speculative decoding did in the run (its counters since the engine started)."""
    stats = llm.engine.stats()
    if stats.spec_method is None:
        return {}
    return {"spec_method": stats.spec_method, "spec_draft_tokens": stats.spec_draft_tokens,
            "spec_accepted_tokens": stats.spec_accepted_tokens,
            "spec_acceptance_rate": round(stats.spec_acceptance_rate, 3),
            "spec_mean_accepted_length": round(stats.spec_mean_accepted_length, 3)}


def bench_latency(llm: Any, input_len: int, output_len: int, iters: int, constraint: Any = None) -> dict[str, Any]:
    rng = random.Random(0)
    vocab = llm.engine.vocab_size
    engine = llm.engine
    engine.warm_up()
    prefill, decode, lengths = [], [], []
    for it in range(iters + 1):  # the first run warms up (and compiles the grammar)
        if it == 1:
            engine.reset_timings()
        ttft, decode_tok_s, generated = time_request(
            engine, [rng.randrange(3, vocab) for _ in range(input_len)], output_len, constraint)
        if it:
            prefill.append(ttft)
            decode.append(decode_tok_s)
            lengths.append(generated)
    return {"input_len": input_len, "output_len": output_len, "generated": min(lengths),
            "prefill_s": statistics.median(prefill), "prefill_tok_s": input_len / statistics.median(prefill),
            "decode_tok_s": statistics.median(decode), **_constraint_report(llm, constraint),
            **_speculation_report(llm), "step": engine.timings().summary()}


def bench_throughput(llm: Any, num_prompts: int, input_len: int, output_len: int,
                     constraint: Any = None) -> dict[str, Any]:
    from surge.sampling_params import SamplingParams

    rng = random.Random(1)
    vocab = llm.engine.vocab_size
    prompts = [[rng.randrange(3, vocab) for _ in range(input_len)] for _ in range(num_prompts)]
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True, structured_outputs=constraint)
    llm.engine.warm_up()  # every decode batch size once, so a compiled forward compiles here
    if constraint is not None:
        llm.engine.validate(prompts[0], params)  # the grammar compiled before the clock starts
    llm.engine.reset_timings()
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"num_prompts": num_prompts, "input_len": input_len, "output_len": output_len, "elapsed_s": elapsed,
            "generated": generated, "output_tok_s": generated / elapsed,
            "total_tok_s": (generated + num_prompts * input_len) / elapsed, **_constraint_report(llm, constraint),
            **_speculation_report(llm), "step": llm.engine.timings().summary()}


async def _serve_load(url: str, model: str | None, concurrency: int, num_prompts: int, words: tuple[int, int],
                      output_len: int, api_key: str | None, timeout: float) -> dict[str, Any]:
    import httpx

    rng = random.Random(2)
    prompts = [synthetic_prompt(rng, rng.randint(*words)) for _ in range(num_prompts)]
    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    ttft, tpot, e2e, tokens, errors = [], [], [], [], []
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            prompt = queue.get_nowait()
            body = {"prompt": prompt, "max_tokens": output_len, "temperature": 0, "stream": True,
                    "ignore_eos": True, "stream_options": {"include_usage": True}}
            if model:
                body["model"] = model
            start = time.perf_counter()
            first = None
            count = 0
            usage = None
            try:
                async with client.stream("POST", f"{url.rstrip('/')}/v1/completions", json=body,
                                         headers=headers) as r:
                    if r.status_code != 200:
                        errors.append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                        continue
                    async for line in r.aiter_lines():
                        if not line.startswith("data:") or line.strip() == "data: [DONE]":
                            continue
                        chunk = json.loads(line[5:])
                        if chunk.get("usage"):
                            usage = chunk["usage"]
                        for choice in chunk.get("choices") or []:
                            if choice.get("text"):
                                count += 1
                                if first is None:
                                    first = time.perf_counter()
            except httpx.HTTPError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            end = time.perf_counter()
            n = usage["completion_tokens"] if usage else count
            tokens.append(n)
            e2e.append(end - start)
            if first is not None:
                ttft.append(first - start)
                if n > 1:
                    tpot.append((end - first) / (n - 1))

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=timeout) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return {"url": url, "concurrency": concurrency, "completed": len(e2e), "errors": len(errors),
            "elapsed_s": elapsed, "output_tok_s": sum(tokens) / elapsed,
            "ttft_s": percentiles(ttft), "tpot_s": percentiles(tpot), "e2e_s": percentiles(e2e),
            **({"first_error": errors[0]} if errors else {})}


def add_bench_parser(sub: Any, add_model_args: Any) -> None:
    bench = sub.add_parser("bench", help="measure latency, offline throughput, or a server under load")
    kinds = bench.add_subparsers(dest="bench", required=True)
    lat = kinds.add_parser("latency", help="batch-1 prefill time and decode tokens/s")
    add_model_args(lat)
    lat.add_argument("--input-len", type=int, default=512)
    lat.add_argument("--output-len", type=int, default=128)
    lat.add_argument("--iters", type=int, default=3)
    lat.add_argument("--json", action="store_true")
    constraint_help = ("constrain every request: a JSON object such as '{\"json\": SCHEMA}', '{\"regex\": \"...\"}' "
                       "(or a bare JSON schema), or @FILE holding one")
    lat.add_argument("--structured-outputs", default=None, help=constraint_help)
    thr = kinds.add_parser("throughput", help="offline generation over many prompts")
    add_model_args(thr)
    thr.add_argument("--num-prompts", type=int, default=32)
    thr.add_argument("--input-len", type=int, default=128)
    thr.add_argument("--output-len", type=int, default=64)
    thr.add_argument("--json", action="store_true")
    thr.add_argument("--structured-outputs", default=None, help=constraint_help)
    srv = kinds.add_parser("serve", help="load generator against an OpenAI-compatible server")
    srv.add_argument("--url", default="http://127.0.0.1:8000")
    srv.add_argument("--model", default=None, help="model name to send (default: none)")
    srv.add_argument("--api-key", default=None)
    srv.add_argument("--concurrency", type=int, default=32)
    srv.add_argument("--num-prompts", type=int, default=64)
    srv.add_argument("--prompt-words", default="20-200", help="prompt length range in words, e.g. 20-200")
    srv.add_argument("--output-len", type=int, default=64)
    srv.add_argument("--timeout", type=float, default=600.0)
    srv.add_argument("--json", action="store_true")


def cmd_bench(args: argparse.Namespace, load: Any) -> int:
    from surge.errors import InvalidArgumentError

    if args.bench == "serve":
        try:
            lo, hi = (int(x) for x in args.prompt_words.split("-"))
        except ValueError as exc:
            raise InvalidArgumentError(f"--prompt-words must look like 20-200, got {args.prompt_words!r}") from exc
        if args.concurrency < 1 or args.num_prompts < 1 or not 0 < lo <= hi:
            raise InvalidArgumentError("--concurrency, --num-prompts and --prompt-words must be positive")
        result = asyncio.run(_serve_load(args.url, args.model, args.concurrency, args.num_prompts, (lo, hi),
                                         args.output_len, args.api_key, args.timeout))
    else:
        for name in ("input_len", "output_len", "iters", "num_prompts"):
            if getattr(args, name, 1) < 1:
                raise InvalidArgumentError(f"--{name.replace('_', '-')} must be at least 1")
        constraint = structured_outputs(args.structured_outputs)
        llm = load(args)
        if args.bench == "latency":
            result = bench_latency(llm, args.input_len, args.output_len, args.iters, constraint)
        else:
            result = bench_throughput(llm, args.num_prompts, args.input_len, args.output_len, constraint)
        info = llm.engine.model_info
        result = {"model": info.name, "dtype": info.dtype, "quantization": info.quantization, **result}
    _emit(result, args.json)
    return 0 if not result.get("errors") else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `surge bench`")
