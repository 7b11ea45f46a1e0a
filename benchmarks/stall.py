"""One long prompt against a running stream: the stream's longest gap between chunks.

    python benchmarks/stall.py http://127.0.0.1:8000 [stream_tokens]

A stream of `stream_tokens` (default 300) runs; two seconds in, an ~8k-token prompt with
echo and 20 logprobs per position is sent. Prints how long the echo took and the stream's
longest and median gap. Watch the server's RSS (VmHWM) around it for memory.
"""

from __future__ import annotations

import sys
import threading
import time

import httpx


def main() -> None:
    url = sys.argv[1]
    stream_tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 300
    gaps: list[float] = []

    def stream() -> None:
        last = None
        body = {"prompt": "Once upon a time", "max_tokens": stream_tokens, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
            for line in r.iter_lines():
                now = time.monotonic()
                if line.startswith("data: "):
                    if last is not None:
                        gaps.append(now - last)
                    last = now

    t = threading.Thread(target=stream)
    t.start()
    time.sleep(2)
    t0 = time.monotonic()
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "hello " * 7990, "max_tokens": 1, "echo": True,
                                                  "logprobs": 20}, timeout=600)
    print(f"echo: status {r.status_code}, {time.monotonic() - t0:.1f}s, {len(r.content)} bytes")
    t.join()
    gaps.sort()
    print(f"stream: {len(gaps) + 1} chunks, longest gap {gaps[-1]:.2f}s, median {gaps[len(gaps) // 2]:.3f}s")


if __name__ == "__main__":
    main()
