"""The dynamic batcher's worth: one `surge serve --model-repository` serving the same ONNX model
twice, batched (max_batch_size 16, a queue delay) and not (max_batch_size 1), both hit by 64
connections with one request in flight each; runs interleaved, ratios pair by pair.

    python benchmarks/tensor_batching.py [--pairs 5] [--requests 512] [--model bert|vision]

bert: a BERT-style classifier (4 layers, hidden 256, 32 tokens a request); vision: five conv
layers on 3x64x64 images. Prints requests/s of each and the median batched / unbatched ratio,
with the mean batch size the server's /metrics report.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import httpx
import numpy as np
import torch

BATCHED = "max_batch_size = 16\nmax_queue_delay_us = 2000\n"
UNBATCHED = "max_batch_size = 1\n"


def build(kind: str, path: Path) -> tuple[dict[str, np.ndarray], str]:
    """model.onnx under `path`; one request's inputs and the output name."""
    torch.manual_seed(0)
    if kind == "bert":
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                            intermediate_size=1024, num_labels=4, max_position_embeddings=128)
        bert = BertForSequenceClassification(config)

        class Classifier(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.bert = bert

            def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
                return self.bert(input_ids=input_ids, attention_mask=attention_mask).logits

        model: torch.nn.Module = Classifier().eval()
        ids = np.random.default_rng(0).integers(1, 1000, (1, 32)).astype(np.int64)
        inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        axes = {n: {0: "batch", 1: "sequence"} for n in inputs} | {"out": {0: "batch"}}
    else:
        layers: list[torch.nn.Module] = []
        channels = 3
        for width in (16, 32, 32, 64, 64):
            layers += [torch.nn.Conv2d(channels, width, 3, stride=2 if width != channels else 1, padding=1),
                       torch.nn.ReLU()]
            channels = width
        model = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                    torch.nn.Linear(channels, 10)).eval()
        inputs = {"pixels": np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)}
        axes = {"pixels": {0: "batch"}, "out": {0: "batch"}}
    path.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, tuple(torch.from_numpy(v) for v in inputs.values()), str(path / "model.onnx"),
                          input_names=list(inputs), output_names=["out"], dynamic_axes=axes, dynamo=False)
    return inputs, "out"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request_bytes(host: str, model: str, inputs: dict[str, np.ndarray]) -> bytes:
    """One KServe v2 infer request (JSON tensors) as raw HTTP/1.1 bytes, keep-alive."""
    body = json.dumps({"inputs": [{"name": n, "datatype": "INT64" if v.dtype == np.int64 else "FP32",
                                   "shape": list(v.shape), "data": v.ravel().tolist()}
                                  for n, v in inputs.items()]}).encode()
    head = (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def _connection(host: str, port: int, payload: bytes, count: int) -> None:
    """`count` requests one after another on one keep-alive connection."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for _ in range(count):
            writer.write(payload)
            status = await reader.readline()
            if b" 200 " not in status:
                raise RuntimeError(f"the server answered {status!r}")
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
    finally:
        writer.close()


def run(url: str, model: str, inputs: dict[str, np.ndarray], requests: int) -> float:
    """requests/s of `requests` single-item requests, 64 connections each with one in flight. A
    client on raw asyncio streams: it costs the shared cores little (tritonclient's own
    concurrency serialised its requests on this box, and httpx's pool took more CPU than the
    server; the tests use tritonclient for correctness)."""
    host, port = url.split(":")
    payload = request_bytes(url, model, inputs)

    async def all_connections() -> None:
        await asyncio.gather(*[_connection(host, int(port), payload, requests // 64) for _ in range(64)])

    start, cpu = time.perf_counter(), time.process_time()
    asyncio.run(all_connections())
    seconds = time.perf_counter() - start
    rate = 64 * (requests // 64) / seconds
    print(f"  {model}: {rate:.0f} req/s, client CPU {100 * (time.process_time() - cpu) / seconds:.0f}%", flush=True)
    return rate


def mean_batch(url: str, model: str) -> float:
    text = httpx.get(f"http://{url}/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        for suffix in ("sum", "count"):
            if line.startswith(f"surge_batch_size_{suffix}") and f'model="{model}"' in line:
                values[suffix] = float(line.rsplit(" ", 1)[1])
    return values.get("sum", 0.0) / max(values.get("count", 1.0), 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--model", choices=("bert", "vision"), default="bert")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="surge-tensor-bench-"))
    try:
        inputs, _ = build(args.model, root / "staging")
        for name, toml in (("batched", BATCHED), ("unbatched", UNBATCHED)):
            shutil.copytree(root / "staging", root / "repo" / name / "1")
            (root / "repo" / name / "surge.toml").write_text(toml)
        port = free_port()
        log = open(root / "server.log", "w")
        server = subprocess.Popen([sys.executable, "-m", "surge.entrypoints.cli", "serve", "--model-repository",
                                   str(root / "repo"), "--port", str(port), "--log-level", "warning"],
                                  stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        url = f"127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"http://{url}/v2/health/ready", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.3)
            for name in ("batched", "unbatched"):  # warm-up
                run(url, name, inputs, 128)
            ratios = []
            for i in range(args.pairs):
                order = ("batched", "unbatched") if i % 2 == 0 else ("unbatched", "batched")
                rates = {name: run(url, name, inputs, args.requests) for name in order}
                ratios.append(rates["batched"] / rates["unbatched"])
                print(f"pair {i + 1}: batched {rates['batched']:.0f} req/s, unbatched {rates['unbatched']:.0f} req/s, "
                      f"ratio {ratios[-1]:.2f}", flush=True)
            print(f"{args.model}: median ratio batched / unbatched {statistics.median(ratios):.2f} "
                  f"(mean batch {mean_batch(url, 'batched'):.1f} vs {mean_batch(url, 'unbatched'):.1f})")
        finally:
            server.terminate()
            server.wait(30)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
