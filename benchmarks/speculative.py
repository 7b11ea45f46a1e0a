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
"""

from __future__ import annotations

import argparse
import json
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
    if args.json:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
