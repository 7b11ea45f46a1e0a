"""The cost of structured outputs: grammar compile times, and constrained against free decode
side by side in one process (runs interleaved, ratios pair by pair).

    python benchmarks/structured.py [--pairs 6] [--model M] [--temperature T] [SCHEMA_FILE ...]

For each schema file (default: benchmarks/schemas/*.json) it prints which grammar engine
enforces it, its compile time, and the decode tokens/s of one request (batch 1) and of 32 at
once, each constrained and free over the same prompts, with the median of the per-pair ratios.
The records schemas need at least 40 objects, so every constrained run decodes its full length;
they are the `surge bench latency|throughput --structured-outputs @FILE` workloads. Then it
compiles every schema of the structured-output tests once and prints the compile times.
"""

from __future__ import annotations

import argparse
import glob
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from surge import LLM, SamplingParams  # noqa: E402
from surge.entrypoints.bench import time_request  # noqa: E402
from surge.sampling_params import StructuredOutputsParams  # noqa: E402


def batch_tok_s(llm: LLM, prompts: list[list[int]], output_len: int, constraint,  # type: ignore[no-untyped-def]
                temperature: float = 0.0) -> float:
    params = SamplingParams(max_tokens=output_len, temperature=temperature, seed=0 if temperature else None,
                            ignore_eos=True, structured_outputs=constraint)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - start)


def compare(llm: LLM, constraint: StructuredOutputsParams, pairs: int, output_len: int,
            temperature: float = 0.0) -> dict[str, float]:
    engine = llm.engine
    rng = random.Random(0)
    one = [rng.randrange(3, engine.vocab_size) for _ in range(64)]
    many = [[rng.randrange(3, engine.vocab_size) for _ in range(64)] for _ in range(32)]
    time_request(engine, one, output_len, constraint, temperature)  # warm: compile, lexer states, allocations
    batch_tok_s(llm, many, output_len, constraint, temperature)
    out: dict[str, float] = {}
    structured = engine.structured
    for name, run in (("batch1", lambda c: time_request(engine, one, output_len, c, temperature)[1]),
                      ("batch32", lambda c: batch_tok_s(llm, many, output_len, c, temperature))):
        free, constrained = [], []
        rows, computed = structured.rows, structured.masks_computed
        for _ in range(pairs):
            free.append(run(None))
            constrained.append(run(constraint))
        # rows whose whole mask was computed (the others: the token sampled as if free was allowed)
        out[f"{name}_masks_computed_share"] = (structured.masks_computed - computed) / max(1, structured.rows - rows)
        out[f"{name}_free_tok_s"] = statistics.median(free)
        out[f"{name}_constrained_tok_s"] = statistics.median(constrained)
        out[f"{name}_ratio"] = statistics.median(c / f for c, f in zip(constrained, free))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("schemas", nargs="*")
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--model", default=None)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else sampled (seed 0)")
    args = parser.parse_args()
    llm = LLM(args.model) if args.model else LLM()
    llm.engine.warm_up()
    structured = llm.engine.structured
    for path in args.schemas or sorted(glob.glob(str(ROOT / "benchmarks/schemas/*.json"))):
        with open(path, encoding="utf-8") as f:
            spec = StructuredOutputsParams(json=json.load(f))
        start = time.perf_counter()
        grammar = structured.grammar(spec)
        compile_s = time.perf_counter() - start
        result = compare(llm, spec, args.pairs, args.output_len, args.temperature)
        print(json.dumps({"schema": Path(path).name, "engine": grammar.backend, "compile_s": round(compile_s, 4),
                          **{k: round(v, 3) for k, v in result.items()}}))
    from tests.structured.schemas import SCHEMAS

    times: dict[str, list[float]] = {}
    for name, schema in SCHEMAS.items():
        start = time.perf_counter()
        grammar = structured.grammar(StructuredOutputsParams(json=schema))
        times.setdefault(grammar.backend, []).append(time.perf_counter() - start)
    for backend, values in sorted(times.items()):
        print(json.dumps({"test_schemas": len(values), "engine": backend,
                          "compile_ms_median": round(1e3 * statistics.median(values), 2),
                          "compile_ms_max": round(1e3 * max(values), 2), "compile_s_total": round(sum(values), 3)}))


if __name__ == "__main__":
    main()
