"""Connection-level defences and clean ends against live servers: slow-loris headers are cut,
slow bodies get 408, --max-queue counts sequences, a shutdown past its grace answers every
client (JSON 503, or an error event then [DONE]) and exits in time, and 64 clients with
disconnects leave the server idle, clean and at flat memory."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import socket
import threading
import time

import httpx
import pytest

from tests.server.conftest import MODEL_NAME, metric, start_server
from tests.server.test_errors_and_lifecycle import AUTH, assert_error

GRACE = 3.0


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("guarded"), "--header-timeout", "1", "--body-timeout", "1",
                       "--shutdown-grace", str(GRACE), "--access-log", "--no-warmup")
    yield srv
    srv.stop()


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.settimeout(5)
    return s


def test_slow_headers_are_cut(guarded):
    socks = []
    for _ in range(300):
        s = _connect(guarded.port)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the rest
        socks.append(s)
    # the server keeps answering meanwhile
    r = httpx.post(f"{guarded.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=30)
    assert r.status_code == 200
    time.sleep(2.5)
    closed = 0
    for s in socks:
        try:
            closed += s.recv(1) == b""
        except (ConnectionResetError, TimeoutError, socket.timeout):
            closed += 0
        finally:
            s.close()
    assert closed == len(socks)


def _read_reply(s) -> str:
    """Headers and body of one response (they may come in several segments), up to 5 s."""
    s.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _content_length(data):
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.decode()


def _content_length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def test_slow_body_gets_408(guarded):
    s = _connect(guarded.port)
    try:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"prompt\":")
        start = time.monotonic()
        reply = _read_reply(s)
        took = time.monotonic() - start
        assert reply.startswith("HTTP/1.1 408"), reply[:200]
        assert "body-timeout" in reply and took < 3
    finally:
        s.close()


def test_max_queue_counts_sequences(limited_server):
    """--max-num-seqs 1 --max-queue 1: room for two sequences, whatever the number of requests."""
    url = f"{limited_server.url}/v1/completions"
    assert_error(httpx.post(url, json={"prompt": "x", "max_tokens": 2, "n": 3}, timeout=30), 400, "3 sequences")
    assert_error(httpx.post(url, json={"prompt": ["a", "b", "c"], "max_tokens": 2}, timeout=30), 400, "3 sequences")
    holder = threading.Thread(target=lambda: httpx.post(url, json={
        "prompt": "Count:", "max_tokens": 1000, "ignore_eos": True}, timeout=30))
    holder.start()
    time.sleep(0.5)
    r = httpx.post(url, json={"prompt": "x", "max_tokens": 2, "n": 2}, timeout=30)  # 1 + 2 > 2
    assert_error(r, 429, "capacity")
    holder.join()
    assert httpx.post(url, json={"prompt": "x", "max_tokens": 2, "n": 2}, timeout=30).status_code == 200


def test_connections_beyond_the_limit_get_503(limited_server):
    """--limit-concurrency 4: four idle connections held open, the fifth is refused."""
    held = [_connect(limited_server.port) for _ in range(4)]
    try:
        time.sleep(0.2)
        r = httpx.get(f"{limited_server.url}/v1/models", timeout=10)
        assert r.status_code == 503
    finally:
        for s in held:
            s.close()
    time.sleep(0.2)
    assert httpx.get(f"{limited_server.url}/v1/models", timeout=10).status_code == 200


def test_shutdown_past_the_grace_answers_every_client(guarded):
    body = {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": True}
    results: dict[str, object] = {}
    started = threading.Barrier(9)

    def stream(i: int) -> None:
        events = []
        with httpx.stream("POST", f"{guarded.url}/v1/completions", json={**body, "stream": True},
                          timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    events.append(line)
                    if len(events) == 1:
                        started.wait()
        results[f"s{i}"] = events

    def plain(i: int) -> None:
        started.wait()
        r = httpx.post(f"{guarded.url}/v1/completions", json=body, timeout=60)
        results[f"p{i}"] = (r.status_code, r.headers.get("content-type"), r.json())

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    threads += [threading.Thread(target=plain, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    started.wait()
    time.sleep(1.0)
    signalled = time.monotonic()
    guarded.proc.send_signal(signal.SIGTERM)
    code = guarded.proc.wait(GRACE + 10)
    took = time.monotonic() - signalled
    for t in threads:
        t.join(10)
    print(f"shutdown: exit {code} {took:.1f}s after SIGTERM (grace {GRACE:g}s)")
    assert code == 0, guarded.log()
    assert took < GRACE + 5, took
    for i in range(4):
        events = results[f"s{i}"]
        assert events[-1] == "data: [DONE]", events[-3:]
        err = json.loads(events[-2][5:])["error"]
        assert err["code"] == "shutting_down", err
        status, ctype, payload = results[f"p{i}"]
        assert status == 503 and ctype == "application/json", (status, payload)
        assert payload["error"]["code"] == "shutting_down"
    # the access log: one line per request, each naming its request id
    log = guarded.log()
    lines = [line for line in log.splitlines() if "surge.access" in line]
    assert any(re.search(r"\[[0-9a-f]{32}\].* POST /v1/completions 200 ", line) for line in lines), lines[:5]
    assert any(" POST /v1/completions 503 " in line for line in lines), lines[-5:]


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@pytest.mark.slow
def test_soak_64_clients_with_disconnects(server):
    seconds = float(os.environ.get("SURGE_SOAK_SECONDS", "50"))
    url = f"{server.url}/v1/completions"
    chat_url = f"{server.url}/v1/chat/completions"
    errors: list[str] = []
    done = {"ok": 0, "gone": 0}
    rss: list[tuple[float, float]] = []

    async def client(i: int, http: httpx.AsyncClient, until: float) -> None:
        rng = random.Random(i)
        while time.monotonic() < until:
            kind = rng.choice(["plain", "stream", "chat", "stream_cut", "plain_cut"])
            body = {"model": MODEL_NAME, "prompt": f"Client {i} says", "max_tokens": rng.randint(4, 24),
                    "temperature": rng.choice([0, 0.8]), "seed": rng.randint(0, 1000)}
            try:
                if kind == "plain":
                    r = await http.post(url, json=body)
                    if r.status_code != 200 or not r.json()["choices"][0]["finish_reason"]:
                        errors.append(f"plain {r.status_code} {r.text[:120]}")
                    done["ok"] += 1
                elif kind == "chat":
                    r = await http.post(chat_url, json={"model": MODEL_NAME, "max_tokens": body["max_tokens"],
                                                        "messages": [{"role": "user", "content": body["prompt"]}]})
                    if r.status_code != 200:
                        errors.append(f"chat {r.status_code} {r.text[:120]}")
                    done["ok"] += 1
                elif kind in ("stream", "stream_cut"):
                    async with http.stream("POST", url, json={**body, "stream": True}) as r:
                        if r.status_code != 200:
                            errors.append(f"stream {r.status_code}")
                        events = []
                        async for line in r.aiter_lines():
                            if line.startswith("data:"):
                                events.append(line)
                                if kind == "stream_cut" and len(events) == 2:
                                    break
                    if kind == "stream":
                        if events[-1] != "data: [DONE]" or '"error"' in "".join(events):
                            errors.append(f"stream ended {events[-2:]}")
                        done["ok"] += 1
                    else:
                        done["gone"] += 1
                else:  # a client that gives up before the answer
                    try:
                        await http.post(url, json={**body, "max_tokens": 200, "ignore_eos": True}, timeout=0.3)
                    except httpx.TimeoutException:
                        pass
                    done["gone"] += 1
            except httpx.HTTPError as exc:
                errors.append(f"{kind}: {type(exc).__name__}: {exc}")

    async def watch(until: float) -> None:
        start = time.monotonic()
        while time.monotonic() < until:
            rss.append((time.monotonic() - start, _rss_mb(server.proc.pid)))
            await asyncio.sleep(1.0)

    async def main() -> None:
        limits = httpx.Limits(max_connections=80, max_keepalive_connections=80)
        async with httpx.AsyncClient(headers=AUTH, timeout=120, limits=limits) as http:
            until = time.monotonic() + seconds
            await asyncio.gather(watch(until), *(client(i, http, until) for i in range(64)))

    asyncio.run(main())
    assert not errors, errors[:10]
    assert done["ok"] > 200 and done["gone"] > 50, done
    deadline = time.monotonic() + 30
    while True:
        text = httpx.get(f"{server.url}/metrics", headers=AUTH).text
        idle = [metric(text, name, model=MODEL_NAME) for name in
                ("surge_num_requests_running", "surge_num_requests_waiting", "surge_kv_cache_usage_ratio")]
        if idle == [0.0, 0.0, 0.0] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert idle == [0.0, 0.0, 0.0], idle
    # flat after warm-up: the last third of the run against the middle third
    third = seconds / 3
    middle = [m for t, m in rss if third <= t < 2 * third]
    last = [m for t, m in rss if t >= 2 * third]
    assert middle and last
    print(f"soak: {done['ok']} answered, {done['gone']} abandoned by their clients, 0 errors; "
          f"RSS peak {max(middle):.0f} MB in the middle third, {max(last):.0f} MB in the last")
    assert max(last) - max(middle) < 64, (max(middle), max(last))
