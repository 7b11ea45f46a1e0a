"""`surge serve --data-parallel-size 2`: two whole engines in processes of their own behind one
endpoint. Outputs equal one engine's, both replicas serve, prefixes go where they are cached,
a slow replica loses share, a replica killed or frozen mid-stream is survived and comes back;
with --max-replicas the replica count follows the load."""

from __future__ import annotations

import concurrent.futures as cf
import os
import random
import re
import signal
import time

import httpx
import pytest
from openai import OpenAI

from surge import LLM, SamplingParams
from tests.helpers import process_alive
from tests.server.conftest import MODEL_NAME, chromium_or_skip, launch, metric

pytestmark = pytest.mark.slow

# 64 MiB of float32 KV: ~90 blocks a replica, four of the affinity test's families' openings, not eight
ARGS = ("--dtype", "float32", "--quantization", "none", "--kv-cache-memory", str(64 << 20), "--no-warmup",
        "--served-model-name", MODEL_NAME)
WORDS = "apple river stone cloud paper garden window silver candle forest music winter".split()


def prompt(i: int) -> str:
    return f"Story {i}: the {WORDS[i % 12]} and the {WORDS[(i * 5) % 12]} met"


def replica_pids(log: str) -> list[int]:
    return sorted({int(p) for p in re.findall(r"\[replica (\d+)\]", log)})


def client(url: str) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)


def replica_metric(url: str, name: str, replica: int, **labels: str) -> float:
    value = metric(httpx.get(f"{url}/metrics").text, name, replica=str(replica), **labels)
    assert value is not None, name
    return value


@pytest.fixture(scope="module")
def dp_server(tmp_path_factory):
    srv = launch(tmp_path_factory.mktemp("dp"), "-dp", "2", "--replica-health-timeout", "5", *ARGS)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def single_engine(default_gguf_path):
    llm = LLM(default_gguf_path, dtype="float32", quantization="none", kv_cache_memory=96 << 20)
    yield llm
    llm.shutdown()


def test_200_concurrent_requests_equal_one_engine(dp_server, single_engine):
    prompts = [prompt(i) for i in range(200)]
    before = [replica_metric(dp_server.url, "surge_replica_requests_total", r) for r in (0, 1)]
    c = client(dp_server.url)

    def one(p: str) -> str:
        return c.completions.create(model=MODEL_NAME, prompt=p, max_tokens=6, temperature=0).choices[0].text

    with cf.ThreadPoolExecutor(32) as pool:
        got = list(pool.map(one, prompts))
    want = [o.outputs[0].text for o in single_engine.generate(prompts, SamplingParams(max_tokens=6, temperature=0))]
    assert got == want
    served = [replica_metric(dp_server.url, "surge_replica_requests_total", r) - before[r] for r in (0, 1)]
    assert sum(served) == 200 and min(served) > 200 / 3, served
    assert len(replica_pids(dp_server.log())) == 2
    assert httpx.get(f"{dp_server.url}/health").json() == {"status": "ok"}


def test_dashboard_shows_the_replicas(dp_server):
    """/dashboard/data lists each replica; the page's replica table shows them, up, with their counts."""
    from playwright.sync_api import sync_playwright

    client(dp_server.url).completions.create(model=MODEL_NAME, prompt=prompt(1), max_tokens=2)
    rows = httpx.get(f"{dp_server.url}/dashboard/data").json()["replicas"]
    assert [(r["replica"], r["state"], r["node"]) for r in rows] == [(0, "up", ""), (1, "up", "")]
    assert sum(r["routed"] for r in rows) >= 1 and all(isinstance(r["pid"], int) for r in rows)
    browser_path = chromium_or_skip()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.goto(f"{dp_server.url}/dashboard")
            page.wait_for_function("document.querySelectorAll('#replicas tbody tr[data-state=up]').length === 2",
                                   timeout=30_000)
            assert page.is_visible("#replicas")
            routed = page.eval_on_selector_all("#replicas tbody tr", "rows => rows.map(r => Number(r.dataset.routed))")
            assert sum(routed) >= 1
        finally:
            browser.close()


def test_explicit_replica_by_field_and_header(dp_server):
    c = client(dp_server.url)
    for rank in (0, 1):
        before = replica_metric(dp_server.url, "surge_replica_routed_total", rank, reason="explicit")
        c.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2, extra_body={"data_parallel_rank": rank})
        c.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                  extra_headers={"X-Surge-Replica": str(rank)})
        assert replica_metric(dp_server.url, "surge_replica_routed_total", rank, reason="explicit") == before + 2
    body = {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 2}
    r = httpx.post(f"{dp_server.url}/v1/completions", json={**body, "data_parallel_rank": 2})
    assert r.status_code == 400 and "out of range: there are 2 replicas" in r.json()["error"]["message"]
    r = httpx.post(f"{dp_server.url}/v1/completions", json=body, headers={"X-Surge-Replica": "one"})
    assert r.status_code == 400 and "X-Surge-Replica" in r.json()["error"]["message"]
    r = httpx.post(f"{dp_server.url}/v1/completions", json={**body, "data_parallel_rank": -1})
    assert r.status_code == 400
    assert httpx.post(f"{dp_server.url}/v1/completions", json=body).status_code == 200


def family_prompts(seed: int, n: int) -> list[str]:
    """8 families of prompts, each sharing an opening of 320 tokens (20 blocks), in a random order."""
    heads = [" ".join(WORDS[(seed * 7 + f * 3 + k) % 12] + str(seed * 100 + f) for k in range(80))
             for f in range(8)]
    rng = random.Random(seed)
    return [f"{heads[rng.randrange(8)]} question {i}:" for i in range(n)]


def hit_tokens(url: str) -> float:
    return sum(replica_metric(url, "surge_replica_prefix_cache_hits_total", r) for r in (0, 1))


def test_prefix_affinity_beats_round_robin(dp_server):
    c = client(dp_server.url)

    def run(prompts: list[str], round_robin: bool) -> float:
        before = hit_tokens(dp_server.url)
        for i, p in enumerate(prompts):  # one at a time: counters, not timing
            extra = {"X-Surge-Replica": str(i % 2)} if round_robin else None
            c.completions.create(model=MODEL_NAME, prompt=p, max_tokens=1, extra_headers=extra)
        return hit_tokens(dp_server.url) - before

    # fresh families for each run, so neither finds the other's blocks. Round robin puts every
    # family on both replicas, whose caches then hold about half of what they are asked for
    affinity = run(family_prompts(1, 48), round_robin=False)
    round_robin = run(family_prompts(2, 48), round_robin=True)
    print("prefix-cache hit tokens, affinity vs round robin:", affinity, round_robin)
    assert affinity >= 1.5 * round_robin > 0, (affinity, round_robin)


def test_a_slow_replica_gets_less_than_its_share(tmp_path):
    srv = launch(tmp_path, "-dp", "2", *ARGS, env={"SURGE_FAULT_REPLICA_STEP_DELAY": "1:0.05"})
    c = client(srv.url)

    def one(i: int) -> str:
        return c.completions.create(model=MODEL_NAME, prompt=prompt(i), max_tokens=8, temperature=0,
                                    extra_body={"ignore_eos": True}).choices[0].finish_reason

    with cf.ThreadPoolExecutor(4) as pool:
        reasons = list(pool.map(one, range(96)))  # three of the router's windows of 32
    assert reasons == ["length"] * 96
    served = [replica_metric(srv.url, "surge_replica_requests_total", r) for r in (0, 1)]
    weights = [replica_metric(srv.url, "surge_replica_weight", r) for r in (0, 1)]
    assert served[1] < 0.5 * sum(served) < served[0], served
    assert weights[1] < 1.0 < weights[0], weights
    srv.stop()


def replica_infos(url: str) -> list[dict[str, str]]:
    """The labels of each surge_replica_info series."""
    rows = []
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("surge_replica_info{"):
            rows.append(dict(re.findall(r'(\w+)="([^"]*)"', line[line.index("{"):line.index("}")])))
    return rows


def streams_through(c: OpenAI, n: int, fault) -> dict[int, str]:  # type: ignore[no-untyped-def]
    """n streams of 48 tokens; `fault()` 1.5 s in (some streams started, some still queued). Each
    stream's outcome: "ok", "empty" or "error: ..." (an error event ends a stream)."""
    results: dict[int, str] = {}

    def stream(i: int) -> None:
        try:
            text = "".join(ch.choices[0].text or "" for ch in c.completions.create(
                model=MODEL_NAME, prompt=prompt(i), max_tokens=48, temperature=0, stream=True,
                extra_body={"ignore_eos": True}))
            results[i] = "ok" if text else "empty"
        except Exception as exc:
            results[i] = f"error: {exc}"

    with cf.ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(stream, i) for i in range(n)]
        time.sleep(1.5)
        fault()
        for f in futures:
            f.result(timeout=300)
    return results


@pytest.mark.parametrize("fault", ["kill", "freeze"])
def test_a_killed_replica_is_survived_and_comes_back(dp_server, fault):
    """kill -9, or SIGSTOP (a hung process: its socket stays open, its heartbeat stops)."""
    pids = [int(r["pid"]) for r in replica_infos(dp_server.url)]
    assert len(pids) == 2
    victim = pids[0] if fault == "kill" else pids[1]
    restarts = sum(replica_metric(dp_server.url, "surge_replica_restarts_total", r) for r in (0, 1))
    c = client(dp_server.url)
    results = streams_through(c, 32, lambda: os.kill(victim, signal.SIGKILL if fault == "kill" else signal.SIGSTOP))
    assert len(results) == 32
    errors = [r for r in results.values() if r.startswith("error")]
    assert all(r == "ok" for r in results.values() if not r.startswith("error")), results
    assert len(errors) < 32  # the other replica's, and the re-sent ones, completed
    assert all("replica" in e or "Error" in e or "error" in e for e in errors)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if replica_metric(dp_server.url, "surge_replica_up", 0) == 1 and \
                replica_metric(dp_server.url, "surge_replica_up", 1) == 1:
            break
        health = httpx.get(f"{dp_server.url}/health").json()
        assert health["status"] in ("degraded", "ok")
        time.sleep(0.5)
    else:
        pytest.fail(f"the {fault} replica did not come back within 60 s")
    assert not process_alive(victim)
    assert sum(replica_metric(dp_server.url, "surge_replica_restarts_total", r) for r in (0, 1)) == restarts + 1
    if fault == "freeze":
        assert "sent no heartbeat for" in dp_server.log()
    # a second run after recovery: no errors, both replicas serving
    before = [replica_metric(dp_server.url, "surge_replica_requests_total", r) for r in (0, 1)]
    with cf.ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(lambda i: c.completions.create(model=MODEL_NAME, prompt=prompt(i), max_tokens=4)
                              .choices[0].text, range(32)))
    assert len(texts) == 32
    after = [replica_metric(dp_server.url, "surge_replica_requests_total", r) for r in (0, 1)]
    assert all(a > b for a, b in zip(after, before))
    assert httpx.get(f"{dp_server.url}/health").json() == {"status": "ok"}


def test_autoscaling_follows_the_load_with_no_failed_request(tmp_path):
    """1 replica; 16 streaming clients (4 a replica wanted) add a second, which serves; 2 clients
    then drain it away while it may hold some of theirs; nothing fails."""
    srv = launch(tmp_path, "--max-replicas", "2", "--target-ongoing-requests", "4", "--upscale-delay", "2",
                 "--downscale-delay", "3", *ARGS)
    c = client(srv.url)
    assert len(replica_infos(srv.url)) == 1
    failures: list[str] = []
    done = [0]

    def clients(n: int, until) -> None:  # type: ignore[no-untyped-def]
        def loop(i: int) -> None:
            while not until():
                try:
                    text = "".join(ch.choices[0].text or "" for ch in c.completions.create(
                        model=MODEL_NAME, prompt=prompt(i), max_tokens=24, temperature=0, stream=True,
                        extra_body={"ignore_eos": True}))
                    assert text
                    done[0] += 1
                except Exception as exc:
                    failures.append(repr(exc))
                    return
        with cf.ThreadPoolExecutor(n) as pool:
            list(pool.map(loop, range(n)))

    deadline = time.monotonic() + 120

    def scaled_out() -> bool:
        if time.monotonic() > deadline or failures:
            return True
        rows = replica_infos(srv.url)
        return len(rows) == 2 and rows[1]["state"] == "up" and \
            replica_metric(srv.url, "surge_replica_requests_total", 1) >= 8

    clients(16, scaled_out)
    assert not failures, failures[:3]
    assert len(replica_infos(srv.url)) == 2, "no second replica within 120 s under 16 clients"
    assert metric(httpx.get(f"{srv.url}/metrics").text, "surge_replica_requests_total", replica="1") >= 8
    deadline = time.monotonic() + 60
    clients(2, lambda: time.monotonic() > deadline or failures or len(replica_infos(srv.url)) == 1)
    assert not failures, failures[:3]
    rows = replica_infos(srv.url)
    assert len(rows) == 1 and rows[0]["state"] == "up", rows
    assert "autoscaling: replica 1 stopped" in srv.log()
    assert httpx.get(f"{srv.url}/health").json() == {"status": "ok"}
    assert done[0] > 16
    srv.stop()


def test_no_replica_outlives_the_server(tmp_path):
    srv = launch(tmp_path, "-dp", "2", *ARGS)
    pids = replica_pids(srv.log())
    assert len(pids) == 2 and all(process_alive(p) for p in pids)
    srv.proc.send_signal(signal.SIGTERM)
    srv.proc.wait(60)
    deadline = time.monotonic() + 15
    while any(process_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(process_alive(p) for p in pids)


def test_bad_data_parallel_sizes(tmp_path):
    from surge.engine.args import EngineArgs
    from surge.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="data_parallel_size must be between 1 and 64"):
        EngineArgs(data_parallel_size=65).create_engine_config()
    with pytest.raises(InvalidArgumentError, match="replicas run behind `surge serve --data-parallel-size`"):
        LLM(data_parallel_size=2)
    srv = launch(tmp_path, "-dp", "0", *ARGS, wait=False)
    assert srv.proc.wait(60) == 2
    assert "data_parallel_size must be a positive integer" in srv.log()
    for args, message in ((("--max-replicas", "2", "--min-replicas", "3"), "min_replicas <= max_replicas"),
                          (("--min-replicas", "2"), "min_replicas needs max_replicas"),
                          (("--max-replicas", "2", "-dp", "3"), "outside the autoscaling bounds"),
                          (("--max-replicas", "2", "--target-ongoing-requests", "0"), "must be a number above 0")):
        srv = launch(tmp_path, *args, *ARGS, wait=False)
        assert srv.proc.wait(60) == 2
        assert message in srv.log(), srv.log()
    # more replicas than the memory holds: refused on the first replica's estimate, before the others start
    start = time.monotonic()
    srv = launch(tmp_path, "-dp", "16", "--memory-budget", "2GiB", *ARGS, wait=False)
    assert srv.proc.wait(120) != 0
    assert time.monotonic() - start < 60
    assert "16 data-parallel replicas of the model: not enough memory" in srv.log(), srv.log()[-2000:]
