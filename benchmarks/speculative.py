"""Speculative decoding against plain decoding, side by side in one process (runs
interleaved, ratios pair by pair).

    python benchmarks/speculative.py [--pairs 5] [--model M] [--k 4] [--batch 1 32] [--dtype D]
                                     [--draft-model D] [--workloads copy free]

Two engines on the same model, one with `--speculative-config '{"method": "ngram", ...}'`, or
with --draft-model `{"method": "draft", "model": D, ...}` (e.g. `--model
qwen2.5-coder-1.5b-instruct-q4_k_m --draft-model qwen2.5-coder-0.5b-instruct`).
Workloads, each greedy with up to --output-len tokens:
  copy:  chat requests that rewrite a given text (code with a renamed function, a passage
         with one word changed): most of the answer is in the prompt;
  free:  chat requests for new text (stories, explanations): little to look up.
For each workload and batch size it prints both engines' output tokens/s, the median of the
per-pair ratios, the acceptance rate and tokens gained per verification, and whether the
greedy outputs were identical.

--compare-llama-cpp (with --draft-model): the same chat requests at batch 1 against llama.cpp's
llama-server (built from the sources of the other comparisons, benchmarks/compare.py) without
and with its own speculative decoding on the same pair (`-md DRAFT --spec-type draft-simple
--spec-draft-n-max K`, its defaults otherwise),
both servers up and their requests interleaved; tokens/s as completion tokens over each
request's wall time, and llama-server's own draft counts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from surge import LLM, SamplingParams  # noqa: E402

CODE = (ROOT / "surge" / "core" / "ngram_proposer.py").read_text().split("class NgramProposer")[1][:1400]
TEXT = (ROOT / "README.md").read_text()[:1500]

COPY = [
    f"Rename the method `propose` to `suggest` in this code and give back the whole code:\n```python\n"
    f"class NgramProposer{CODE}\n```",
    f"Repeat this text exactly, word for word:\n\n{TEXT}",
    f"Rewrite this code with the variable `ctx` renamed to `context`; change nothing else:\n```python\n"
    f"class NgramProposer{CODE}\n```",
]
FREE = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator works to a ten-year-old.",
    "Give me ten ideas for a birthday party for my grandmother.",
    "Describe a walk through a busy market on a summer morning.",
]


def run(llm: LLM, conversations: list, output_len: int) -> tuple[float, list[list[int]]]:
    params = SamplingParams(max_tokens=output_len, temperature=0)
    start = time.perf_counter()
    outs = llm.chat(conversations, params)
    elapsed = time.perf_counter() - start
    tokens = [o.outputs[0].token_ids for o in outs]
    return sum(len(t) for t in tokens) / elapsed, tokens


def llama_cpp_rows(model: str, draft: str, workloads: list[str], pairs: int, output_len: int, k: int,
                   threads: int) -> list[dict]:
    """llama-server plain vs `-md draft` on the same chat requests (batch 1), interleaved."""
    import subprocess

    import httpx

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from compare import _wait_http, ensure_llama_server

    from surge.loader import resolve_model

    exe = ensure_llama_server()
    if exe is None:
        return []
    target, small = resolve_model(model).path, resolve_model(draft).path
    common = ["-m", target, "-t", str(threads), "-tb", str(threads), "-np", "1", "-c", "4096", "--host", "127.0.0.1"]
    servers = {"plain": common + ["--port", "8741"],
               "draft": common + ["--port", "8742", "-md", small, "-td", str(threads), "--spec-type", "draft-simple",
                                  "--spec-draft-n-max", str(k)]}
    urls = {"plain": "http://127.0.0.1:8741", "draft": "http://127.0.0.1:8742"}
    env = {**os.environ, "LD_LIBRARY_PATH": os.path.dirname(exe)}
    procs = {name: subprocess.Popen([exe, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
             for name, args in servers.items()}
    rows = []
    try:
        for name, proc in procs.items():
            _wait_http(urls[name] + "/health", proc)

        def ask(name: str, content: str, n: int) -> tuple[float, dict]:
            body = {"messages": [{"role": "user", "content": content}], "max_tokens": n, "temperature": 0}
            start = time.perf_counter()
            r = httpx.post(urls[name] + "/v1/chat/completions", json=body, timeout=600).json()
            return r["usage"]["completion_tokens"] / (time.perf_counter() - start), r.get("timings", {})

        for workload in workloads:
            prompts = {"copy": COPY, "free": FREE}[workload]
            for name in urls:
                ask(name, prompts[0], 8)  # the prompt into each server's cache
            speeds: dict[str, list[float]] = {"plain": [], "draft": []}
            drafted = accepted = 0
            for _ in range(pairs):
                for name in urls:
                    tok_s, timings = ask(name, prompts[0], output_len)
                    speeds[name].append(tok_s)
                    if name == "draft":
                        drafted += timings.get("draft_n", 0)
                        accepted += timings.get("draft_n_accepted", 0)
            ratios = [b / a for a, b in zip(speeds["plain"], speeds["draft"])]
            rows.append(dict(engine="llama.cpp", workload=workload, batch=1,
                             plain_tok_s=round(statistics.median(speeds["plain"]), 1),
                             spec_tok_s=round(statistics.median(speeds["draft"]), 1),
                             ratio=round(statistics.median(ratios), 3),
                             acceptance=round(accepted / drafted, 3) if drafted else 0.0))
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(60)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--draft-model", default=None, help="speculate with this draft model instead of n-grams")
    ap.add_argument("--workloads", nargs="+", default=["copy", "free"], choices=["copy", "free"])
    ap.add_argument("--compare-llama-cpp", action="store_true",
                    help="with --draft-model: llama-server without and with -md on the same requests")
    ap.add_argument("--threads", type=int, default=2, help="llama-server's threads")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.draft_model:
        spec = {"method": "draft", "model": args.draft_model, "num_speculative_tokens": args.k}
    else:
        spec = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
    base = LLM(model=args.model, dtype=args.dtype)
    fast = LLM(model=args.model, dtype=args.dtype, speculative_config=spec)
    results = []
    for name, prompts in [(w, {"copy": COPY, "free": FREE}[w]) for w in args.workloads]:
        for batch in args.batch:
            convs = [[{"role": "user", "content": prompts[i % len(prompts)]}] for i in range(batch)]
            run(base, convs, 8)  # prompts into both prefix caches
            run(fast, convs, 8)
            before = fast.engine.stats()
            plain, spec_runs, ratios, same = [], [], [], True
            for _ in range(args.pairs):
                a, ta = run(base, convs, args.output_len)
                b, tb = run(fast, convs, args.output_len)
                plain.append(a)
                spec_runs.append(b)
                ratios.append(b / a)
                same &= ta == tb
            after = fast.engine.stats()
            drafts = after.spec_drafts - before.spec_drafts
            proposed = after.spec_draft_tokens - before.spec_draft_tokens
            accepted = after.spec_accepted_tokens - before.spec_accepted_tokens
            row = dict(workload=name, batch=batch, plain_tok_s=round(statistics.median(plain), 1),
                       spec_tok_s=round(statistics.median(spec_runs), 1), ratio=round(statistics.median(ratios), 3),
                       acceptance=round(accepted / proposed, 3) if proposed else 0.0,
                       tokens_per_verification=round(1 + accepted / drafts, 2) if drafts else 0.0,
                       proposed_per_step=round(proposed / max(1, drafts), 2), identical=same,
                       fixed_rows=round(fast.engine.scheduler.speculator.fixed_rows, 2),
                       pass_rows=round(fast.engine.scheduler.speculator.pass_rows, 2))
            results.append(row)
            if not args.json:
                print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    if args.compare_llama_cpp and args.draft_model:
        del base, fast  # their memory back before the servers start
        for row in llama_cpp_rows(args.model, args.draft_model, args.workloads, args.pairs, args.output_len,
                                  args.k, args.threads):
            results.append(row)
            if not args.json:
                print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    if args.json:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
