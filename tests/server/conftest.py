"""Live `surge serve` processes on free ports, for tests that talk HTTP to them."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

MODEL_NAME = "smollm2"
API_KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    proc: subprocess.Popen
    port: int
    log_path: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_server(tmp_path, *extra: str, wait: bool = True) -> LiveServer:
    """The default model in float32 under MODEL_NAME, with `extra` flags."""
    return launch(tmp_path, "--dtype", "float32", "--quantization", "none", "--kv-cache-memory", str(384 << 20),
                  "--served-model-name", MODEL_NAME, *extra, wait=wait)


_LAUNCHED: list[LiveServer] = []


@pytest.fixture(autouse=True)
def _no_server_outlives_its_test():
    """Servers a test started itself are stopped after it, even when it failed half-way (those
    of module fixtures are started before this runs and stopped by their fixtures)."""
    before = len(_LAUNCHED)
    yield
    for server in _LAUNCHED[before:]:
        server.stop()
    del _LAUNCHED[before:]


def launch(tmp_path, *args: str, wait: bool = True, env: dict[str, str] | None = None) -> LiveServer:
    """`surge serve ARGS` on a free port, logging to a file under tmp_path."""
    port = free_port()
    exe = shutil.which("surge")
    cmd = ([exe] if exe else [sys.executable, "-m", "surge.entrypoints.cli"]) + ["serve", "--port", str(port), *args]
    log_path = str(tmp_path / f"server-{port}.log")
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    server = LiveServer(proc, port, log_path)
    _LAUNCHED.append(server)
    if wait:
        wait_ready(server)
    return server


def wait_ready(server: LiveServer, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {server.proc.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"server not ready after {timeout}s:\n{server.log()}")


@dataclass
class KilledEngine:
    """What a client and the server showed after an engine's process was killed mid-stream."""

    events: list[str]  # the stream's `data:` lines
    errors: list[dict]  # its error events
    health: int | str | None  # /health's last answer (503), or "gone" once the server exited
    took: float  # seconds from the kill to that answer
    code: int  # the server's exit code


def kill_mid_stream(server: LiveServer, model: str, pid: int, headers: dict[str, str] | None = None) -> KilledEngine:
    """Start a long streamed completion of `model`, SIGKILL `pid` once it streams, then watch
    /health (at most 10 s) and wait for the server to exit."""
    import json
    import signal
    import threading

    events: list[str] = []
    first = threading.Event()

    def stream() -> None:
        body = {"model": model, "prompt": "Once upon a time", "max_tokens": 900, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60, headers=headers or {}) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    events.append(line)
                    first.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert first.wait(60)
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    reader.join(30)
    assert not reader.is_alive()
    errors = [json.loads(e[5:]) for e in events if e != "data: [DONE]" and "error" in json.loads(e[5:])]
    health = None
    while time.monotonic() - killed < 10:
        try:
            health = httpx.get(f"{server.url}/health", timeout=2).status_code
        except httpx.HTTPError:
            health = "gone" if server.proc.poll() is not None else health
        if health in (503, "gone"):
            break
        time.sleep(0.05)
    took = time.monotonic() - killed
    return KilledEngine(events, errors, health, took, server.proc.wait(30))


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("server"), "--api-key", API_KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def limited_server(tmp_path_factory):
    """One running slot, one waiting place, two-second timeout, four connections: for 429, 503 and
    timeout tests."""
    srv = start_server(tmp_path_factory.mktemp("limited"), "--max-num-seqs", "1", "--max-queue", "1",
                       "--request-timeout", "2", "--limit-concurrency", "4")
    yield srv
    srv.stop()


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text format."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric_name = head.split("{", 1)[0]
        if metric_name != name:
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            return float(value)
    return None


@pytest.fixture(scope="session")
def tiny_versions(tmp_path_factory, tiny_tokenizer_dir) -> dict[int, Path]:
    """Three different tiny Llama checkpoints (seeds 0, 1, 2), built outside any repository."""
    from tests.conftest import build_tiny_model

    base = tmp_path_factory.mktemp("tiny_versions")
    return {v: build_tiny_model("llama", base / f"v{v}", tiny_tokenizer_dir, seed=v - 1) for v in (1, 2, 3)}


def chromium_or_skip() -> str:
    """Debian's chromium for the dashboard tests (CI installs it; elsewhere the test skips)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("CI must install Debian's chromium for the dashboard test (.ci/run does)")
    pytest.skip("no chromium on this machine: apt-get install chromium")


def put(repo: Path, name: str, version: int, source: Path) -> Path:
    """Copy a checkpoint into a model repository as <name>/<version>, atomically (built aside,
    then renamed into place, as an operator should)."""
    staging = repo / f".staging-{name}-{version}"
    shutil.copytree(source, staging)
    target = repo / name / str(version)
    target.parent.mkdir(exist_ok=True)
    os.rename(staging, target)
    return target
