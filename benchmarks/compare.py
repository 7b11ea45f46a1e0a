"""Side-by-side speed of surge, llama.cpp (llama-cpp-python) and transformers on the same model.

    python benchmarks/compare.py [--threads 2] [--skip-llama-cpp] [--skip-transformers] [--serve]
                                 [--compile] [--rounds N] [--json OUT]

Everything runs in this one process, one engine at a time, on the same GGUF file (the
default model unless --gguf is given) and the same token ids, and the script prints each
number and the ratios docs/performance.md records. llama-cpp-python is installed from its
source distribution when missing (it compiles llama.cpp: about 4 minutes on 2 cores); nothing
built from llama.cpp belongs in the repository.

--rounds N then repeats every measurement N more times with all the engines loaded side by
side, one run of each engine in turn, and reports the medians and the median of the per-round
ratios: single runs move by up to ~20% on a shared 2-core machine (docs/performance.md), so a
target ratio is read from the rounds.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

DECODE_TOKENS = 128
PREFILL_TOKENS = 512
BATCH = 32
BATCH_TOKENS = 64
BATCH_PROMPT_TOKENS = 48

WORKLOADS = ("decode_b1", "prefill_512", "decode_b32")
# (workload, engine, baseline): the ratios issue 5's targets are stated in
RATIOS = (
    ("decode_b1", "surge_4bit_bf16", "llama_cpp_python"),
    ("prefill_512", "surge_4bit_bf16", "llama_cpp_python"),
    ("decode_b1", "surge_bf16", "transformers_bf16"),
    ("decode_b1", "surge_4bit_bf16", "transformers_bf16"),
    ("decode_b32", "surge_bf16", "transformers_bf16"),
    ("decode_b32", "surge_4bit_bf16", "transformers_bf16"),
)
LABELS = {"surge_4bit_bf16": "surge-4bit", "surge_bf16": "surge-bf16", "llama_cpp_python": "llama.cpp",
          "transformers_bf16": "transformers-bf16"}


def ensure_llama_cpp() -> bool:
    try:
        import llama_cpp  # noqa: F401

        return True
    except ImportError as exc:
        if exc.name != "llama_cpp":  # installed, but a dependency is missing
            subprocess.run([sys.executable, "-m", "pip", "install", "llama-cpp-python==0.3.36"])
            return True
    print("installing llama-cpp-python from source (compiles llama.cpp, ~4 min)...", file=sys.stderr)
    env = {**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=ON"}
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-binary", "llama-cpp-python",
                           "llama-cpp-python==0.3.36"], env=env)
    return proc.returncode == 0


def prompt_ids(vocab: int, n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


def batch_prompts(vocab: int) -> list[list[int]]:
    """The batch-32 workload, the same for every engine (equal lengths: transformers batches
    without padding)."""
    return [prompt_ids(vocab, BATCH_PROMPT_TOKENS, 100 + i) for i in range(BATCH)]


Run = Callable[[], float]  # one measurement: runs the workload once, returns tokens/s


def surge_runs(llm: Any) -> dict[str, Run]:
    """The three workloads through a warmed-up `llm`; each call uses fresh prompt ids for the
    single prompts, so the prefix cache never shortens one."""
    from surge import SamplingParams
    from surge.entrypoints.bench import time_request

    engine = llm.engine
    vocab = engine.vocab_size
    seeds = iter(range(10_000, 1 << 30))

    def single(prompt_len: int, max_tokens: int) -> tuple[float, float]:
        return time_request(engine, prompt_ids(vocab, prompt_len, next(seeds)), max_tokens)

    prompts = batch_prompts(vocab)
    params = SamplingParams(max_tokens=BATCH_TOKENS, temperature=0, ignore_eos=True)

    def batch() -> float:
        start = time.perf_counter()
        llm.generate(prompts, params)
        return BATCH * BATCH_TOKENS / (time.perf_counter() - start)

    return {"decode_b1": lambda: single(8, DECODE_TOKENS)[1],
            "prefill_512": lambda: PREFILL_TOKENS / single(PREFILL_TOKENS, 1)[0],
            "decode_b32": batch}


def bench_surge(gguf: str, threads: int, dtype: str, quantization: str, compile: bool = False,
                keep: bool = False) -> tuple[dict[str, float], dict[str, Run]]:
    """decode b1, prefill 512 and decode b32 tok/s (the median of two runs each after warm-up,
    one for batch 32); with `keep`, also the workloads (the engine stays loaded for --rounds)."""
    from surge import LLM, SamplingParams

    llm = LLM(gguf, dtype=dtype, quantization=quantization, threads=threads, compile=compile)
    llm.engine.warm_up()  # every decode batch size and some prefill lengths once: compiles here
    runs = surge_runs(llm)
    llm.generate(batch_prompts(llm.engine.vocab_size)[:2], SamplingParams(max_tokens=4))
    out = {"decode_b1": statistics.median([runs["decode_b1"]() for _ in range(2)]),
           "prefill_512": statistics.median([runs["prefill_512"]() for _ in range(2)]),
           "decode_b32": runs["decode_b32"]()}
    return out, runs if keep else {}


def bench_llama_cpp(gguf: str, threads: int, keep: bool = False) -> tuple[dict[str, float], dict[str, Run]]:
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=2048, n_batch=512,
                verbose=False)
    vocab = llm.n_vocab()
    ids = prompt_ids(vocab, PREFILL_TOKENS, 0)
    llm.reset()
    llm.eval(ids[:16])  # warm up

    def prefill() -> float:
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        return PREFILL_TOKENS / (time.perf_counter() - start)

    def decode() -> float:
        llm.reset()
        llm.eval(prompt_ids(vocab, 8, 1))
        start = time.perf_counter()
        for _ in range(DECODE_TOKENS):
            token = llm.sample(temp=0.0)
            llm.eval([token])
        return DECODE_TOKENS / (time.perf_counter() - start)

    runs = {"prefill_512": prefill, "decode_b1": decode}
    return {"prefill_512": prefill(), "decode_b1": decode()}, runs if keep else {}


def dense_bf16_checkpoint(gguf: str) -> str:
    """The GGUF dequantized once into a plain bf16 safetensors directory (cached).

    transformers loading a GGUF keeps a GGUF quantization config on the model; from this
    directory it runs its ordinary dense bf16 path, the baseline issue 5 names."""
    from transformers import AutoModelForCausalLM

    out = os.path.join(CACHE, os.path.splitext(os.path.basename(gguf))[0] + "-bf16")
    if not os.path.exists(os.path.join(out, "model.safetensors")):
        model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                                     dtype=torch.bfloat16)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(out)
    return out


def bench_transformers(gguf: str, threads: int, keep: bool = False) -> tuple[dict[str, float], dict[str, Run]]:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(dense_bf16_checkpoint(gguf), dtype=torch.bfloat16).eval()
    vocab = model.config.vocab_size
    ids = torch.tensor([prompt_ids(vocab, 8, 1)])
    batch = torch.tensor(batch_prompts(vocab))

    @torch.no_grad()
    def generate(inputs: torch.Tensor, new_tokens: int) -> float:
        start = time.perf_counter()
        model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False)
        return inputs.shape[0] * new_tokens / (time.perf_counter() - start)

    generate(ids, 4)  # warm up
    runs = {"decode_b1": lambda: generate(ids, DECODE_TOKENS), "decode_b32": lambda: generate(batch, BATCH_TOKENS)}
    out = {name: run() for name, run in runs.items()}
    return out, runs if keep else {}  # the model goes with the function's frame unless kept


def interleaved_rounds(runs: dict[str, dict[str, Run]], rounds: int) -> dict[str, dict[str, list[float]]]:
    """engine -> workload -> one value per round; each round runs every engine's workloads once,
    in turn, so that a slow minute of the machine falls on all of them alike."""
    out: dict[str, dict[str, list[float]]] = {e: {w: [] for w in r} for e, r in runs.items()}
    for _ in range(rounds):
        for workload in WORKLOADS:
            for engine, engine_runs in runs.items():
                if workload in engine_runs:
                    out[engine][workload].append(engine_runs[workload]())
    return out


LLAMA_CPP_VERSION = "0.3.36"
CACHE = os.path.expanduser("~/.cache/surge-bench")


def ensure_llama_server() -> str | None:
    """Build llama.cpp's llama-server from the llama-cpp-python sdist (which vendors llama.cpp)."""
    import glob
    import shutil
    import tarfile

    src = os.path.join(CACHE, f"llama_cpp_python-{LLAMA_CPP_VERSION}", "vendor", "llama.cpp")
    build = os.path.join(src, "build")
    exe = os.path.join(build, "bin", "llama-server")
    if os.path.exists(exe):
        return exe
    if shutil.which("cmake") is None:
        print("cmake not found: skipping llama-server", file=sys.stderr)
        return None
    os.makedirs(CACHE, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={LLAMA_CPP_VERSION}", "-d", CACHE], check=True)
    (sdist,) = glob.glob(os.path.join(CACHE, f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz"))
    with tarfile.open(sdist) as tar:
        tar.extractall(CACHE, filter="data")
    print("building llama-server (several minutes)...", file=sys.stderr)
    subprocess.run(["cmake", "-B", build, "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_SERVER=ON", "-DCMAKE_BUILD_TYPE=Release"], cwd=src, check=True)
    subprocess.run(["cmake", "--build", build, "--target", "llama-server", "-j", str(os.cpu_count() or 2)],
                   cwd=src, check=True)
    return exe


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout}s")


SERVE_LOADS = {"c1": (1, 8), "c32": (32, 64)}  # name: (concurrent streams, requests)


def bench_serving(gguf: str, threads: int, concurrency: int = 32,
                  compile: bool = False) -> dict[str, dict]:
    """The same loads (streams of 20-200-word prompts, 64 tokens, ignore_eos: one client alone,
    then 32 at once) against llama-server with `concurrency` slots and against `surge serve`
    with its defaults, one server after the other; results under "<server>" (32 streams) and
    "<server>_c1"."""
    import asyncio

    from surge.entrypoints.bench import _serve_load

    out: dict[str, dict] = {}
    servers = {}
    exe = ensure_llama_server()
    if exe:
        servers["llama_server"] = ([exe, "-m", gguf, "--port", "8731", "-t", str(threads), "-tb", str(threads),
                                    "-np", str(concurrency), "-c", str(concurrency * 512), "--host", "127.0.0.1"],
                                   "http://127.0.0.1:8731", "/health")
    servers["surge"] = ([sys.executable, "-m", "surge.entrypoints.cli", "serve", "--model", gguf, "--port", "8732",
                         "--threads", str(threads), "--log-level", "warning", *(["--compile"] if compile else [])],
                        "http://127.0.0.1:8732", "/ready")
    for name, (cmd, url, health) in servers.items():
        # llama-server finds its shared libraries next to it
        env = {**os.environ, "LD_LIBRARY_PATH": os.path.dirname(cmd[0])} if name == "llama_server" else None
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        try:
            _wait_http(url + health, proc)
            asyncio.run(_serve_load(url, None, 4, 4, (20, 40), 8, None, 300))  # warm up
            for load, (streams, requests) in SERVE_LOADS.items():
                key = name if load == "c32" else f"{name}_{load}"
                out[key] = asyncio.run(_serve_load(url, None, streams, requests, (20, 200), 64, None, 600))
        finally:
            proc.terminate()
            proc.wait(60)
    return out


def main() -> int:
    from surge.loader.hub import default_model_path

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", default=None, help="GGUF file (default: the embedded default model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-llama-cpp", action="store_true")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--serve", action="store_true",
                    help="also compare serving (1 stream, then 32) against llama-server, built from source if needed")
    ap.add_argument("--compile", action="store_true", help="surge with --compile (torch.compile, C++ wrapper)")
    ap.add_argument("--skip-surge-bf16", action="store_true", help="skip surge with dequantized bf16 weights")
    ap.add_argument("--rounds", type=int, default=0,
                    help="then N interleaved rounds of every measurement, all engines loaded side by side")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args()
    if args.rounds < 0:
        ap.error("--rounds must be >= 0")
    gguf = args.gguf or default_model_path()
    torch.set_num_threads(args.threads)
    keep = args.rounds > 0
    results: dict[str, dict[str, float]] = {}
    runs: dict[str, dict[str, Run]] = {}

    def record(name: str, outcome: tuple[dict[str, float], dict[str, Run]]) -> None:
        results[name], engine_runs = outcome
        if engine_runs:
            runs[name] = engine_runs
        gc.collect()

    record("surge_4bit_bf16", bench_surge(gguf, args.threads, "bfloat16", "auto", args.compile, keep))
    if not args.skip_surge_bf16:
        record("surge_bf16", bench_surge(gguf, args.threads, "bfloat16", "none", args.compile, keep))
    if not args.skip_llama_cpp and ensure_llama_cpp():
        record("llama_cpp_python", bench_llama_cpp(gguf, args.threads, keep))
    if not args.skip_transformers:
        record("transformers_bf16", bench_transformers(gguf, args.threads, keep))
    rounds = interleaved_rounds(runs, args.rounds) if keep else {}

    print(f"\nmodel {os.path.basename(gguf)}, {args.threads} threads, torch {torch.__version__}")
    print(f"{'engine':<20}{'decode b1 tok/s':>17}{'prefill 512 tok/s':>19}{'decode b32 tok/s':>18}")
    for name, r in results.items():
        cells = [f"{r[k]:.1f}" if k in r else "-" for k in WORKLOADS]
        print(f"{name:<20}{cells[0]:>17}{cells[1]:>19}{cells[2]:>18}")
    ratios = {}
    for workload, engine, base in RATIOS:
        if engine in results and base in results:
            ratios[f"{workload} {LABELS[engine]} / {LABELS[base]}"] = results[engine][workload] / results[base][workload]
    if rounds:
        for workload in WORKLOADS:
            print(f"\n{workload}, {args.rounds} interleaved rounds (tok/s):")
            for name, values in rounds.items():
                if values.get(workload):
                    v = values[workload]
                    print(f"{name:<20}" + " ".join(f"{x:7.1f}" for x in v) + f"   median {statistics.median(v):.1f}")
        for workload, engine, base in RATIOS:  # the median of the per-round ratios
            if engine in rounds and base in rounds:
                per_round = [a / b for a, b in zip(rounds[engine][workload], rounds[base][workload], strict=True)]
                ratios[f"{workload} {LABELS[engine]} / {LABELS[base]}, median of {args.rounds} rounds"] = (
                    statistics.median(per_round))
    serving = bench_serving(gguf, args.threads, compile=args.compile) if args.serve else {}
    for name, r in serving.items():
        print(f"serving {name:<17} output {r['output_tok_s']:.1f} tok/s, TTFT p50 {r['ttft_s'].get('p50', 0):.2f} s "
              f"p99 {r['ttft_s'].get('p99', 0):.2f} s, TPOT p50 {r['tpot_s'].get('p50', 0) * 1000:.0f} ms, "
              f"{r['completed']} done, {r['errors']} errors" + (f" (first: {r['first_error']})" if r["errors"] else ""))
    if "llama_server_c1" in serving and "surge_c1" in serving:
        ratios["serving c=1 TPOT p50 surge / llama-server (lower is better)"] = (
            serving["surge_c1"]["tpot_s"]["p50"] / serving["llama_server_c1"]["tpot_s"]["p50"])
    if "llama_server" in serving and "surge" in serving:
        ratios["serving output tok/s surge / llama-server"] = (
            serving["surge"]["output_tok_s"] / serving["llama_server"]["output_tok_s"])
        ratios["serving TTFT p99 llama-server / surge"] = (
            serving["llama_server"]["ttft_s"]["p99"] / serving["surge"]["ttft_s"]["p99"])
    print()
    for name, value in ratios.items():
        print(f"{name:<64}{value:6.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "rounds": rounds, "serving": serving, "ratios": ratios,
                       "threads": args.threads}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
