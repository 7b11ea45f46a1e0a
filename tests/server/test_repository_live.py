"""`surge serve --model-repository` over HTTP: two models at once, hot reload and rollback under
16 streaming clients, a corrupt version, the control API and its errors, the memory budget,
the response cache, and the dashboard in a real headless browser."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from surge.entrypoints.cli import main
from surge.sampling_params import SamplingParams
from tests.server.conftest import chromium_or_skip, launch, metric, put

ADMIN = {"Authorization": "Bearer admin-secret"}
PROMPT = "Hello, world. How are you"
ARTIFACTS = Path(os.environ.get("SURGE_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))
COMMON = ("--dtype", "float32", "--quantization", "none", "--kv-cache-memory", "16MiB", "--max-num-seqs", "32",
          "--log-level", "warning")


def expected_text(path: str, prompt: str, max_tokens: int) -> str:
    from surge import LLM

    llm = LLM(path, dtype="float32", quantization="none", kv_cache_memory=16 << 20)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return llm.generate(prompt, params)[0].outputs[0].text


def complete(url: str, model: str | None, prompt: str = PROMPT, **extra) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True, **extra}
    if model is not None:
        body["model"] = model
    return httpx.post(f"{url}/v1/completions", json=body, timeout=120)


def index(url: str) -> dict[tuple[str, str], dict]:
    rows = httpx.get(f"{url}/v2/repository/index", headers=ADMIN, timeout=30).json()
    return {(r["name"], r["version"]): r for r in rows}


def wait_until(predicate, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


# ---- two models ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, tiny_versions, default_gguf_path):
    """The default GGUF and a tiny Hugging Face model from one repository, with an admin key,
    a response cache and a memory budget that holds both but not a second default model."""
    root = tmp_path_factory.mktemp("repo")
    (root / "smollm2" / "1").mkdir(parents=True)
    os.symlink(default_gguf_path, root / "smollm2" / "1" / "model.gguf")
    put(root, "tiny", 1, tiny_versions[1])
    srv = launch(tmp_path_factory.mktemp("two"), "--model-repository", str(root), *COMMON,
                 "--admin-key", "admin-secret", "--response-cache-size", "16", "--memory-budget", "1GiB")
    srv.root = root
    yield srv
    srv.stop()


def test_two_models_route_correctly(two_models, tiny_versions, default_llm):
    url = two_models.url
    listed = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
    assert sorted((m["id"], m["version"]) for m in listed) == [("smollm2", "1"), ("tiny", "1")]
    prompt = "The capital of France is"
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    expected = {"smollm2": default_llm.generate(prompt, greedy)[0].outputs[0].text,
                "tiny": expected_text(str(tiny_versions[1]), prompt, 8)}
    assert expected["smollm2"] != expected["tiny"]
    for model in ("smollm2", "tiny", "tiny:1"):
        r = complete(url, model, prompt)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["text"] == expected[model.split(":")[0]], model
        assert body["model"] == model
        assert body["system_fingerprint"] == r.headers["x-surge-model-version"] == model.split(":")[0] + ":1"
    chat = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0})
    assert chat.status_code == 200 and chat.json()["system_fingerprint"] == "tiny:1"
    tokens = httpx.post(f"{url}/tokenize", json={"model": "smollm2", "prompt": prompt}, timeout=10).json()
    assert tokens["count"] == 5  # SmolLM2's tokenizer, not the tiny one's
    for model, status, needle in (("nope", 404, "does not exist"), ("tiny:7", 404, "version 7 of model `tiny`"),
                                  (None, 400, "'model' field is required")):
        r = complete(url, model)
        assert r.status_code == status, r.text
        assert needle in r.json()["error"]["message"]


def test_control_api_errors(two_models):
    url = two_models.url
    assert httpx.get(f"{url}/v2/repository/index", timeout=10).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert httpx.post(f"{url}/v2/repository/models/tiny/unload", headers=wrong, timeout=10).status_code == 401
    cases = [
        ("ghost/load", None, 404, "no model 'ghost'"),
        ("tiny/load", {"version": "x"}, 400, "'version' must be a positive integer"),
        ("tiny/load", {"version": 9}, 404, "has no version '9'"),
        ("tiny/rollback", None, 409, "no earlier version"),
    ]
    for path, body, status, needle in cases:
        r = httpx.post(f"{url}/v2/repository/models/{path}", json=body, headers=ADMIN, timeout=30)
        assert r.status_code == status, (path, r.text)
        assert needle in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v2/repository/models/tiny/load", content=b"{not json",
                   headers={**ADMIN, "Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400 and "malformed JSON" in r.text
    r = httpx.post(f"{url}/v2/repository/models/tiny/load", content=b"{not json", headers=ADMIN, timeout=30)
    assert r.status_code == 415 and "application/json" in r.text  # a body must say it is JSON
    r = httpx.post(f"{url}/v2/repository/models/tiny/load", json={"version": 1, "extra": 1}, headers=ADMIN,
                   timeout=30)
    assert r.status_code == 400 and "'extra'" in r.text
    # unload, then requests for it get 404 while the other model serves; load brings it back
    r = httpx.post(f"{url}/v2/repository/models/tiny/unload", headers=ADMIN, timeout=60)
    assert r.status_code == 200, r.text
    assert index(url)[("tiny", "1")]["state"] == "UNAVAILABLE"
    r = complete(url, "tiny")
    assert r.status_code == 404 and "not being served" in r.text
    assert complete(url, "smollm2").status_code == 200
    r = httpx.post(f"{url}/v2/repository/models/tiny/load", headers=ADMIN, timeout=60)
    assert r.status_code == 200 and r.json()["version"] == "1"
    assert complete(url, "tiny").status_code == 200


def test_load_beyond_the_memory_budget_is_refused(two_models, default_gguf_path):
    url = two_models.url
    (two_models.root / "smollm2" / "2").mkdir()
    os.symlink(default_gguf_path, two_models.root / "smollm2" / "2" / "model.gguf")
    r = httpx.post(f"{url}/v2/repository/models/smollm2/load", json={"version": 2}, headers=ADMIN, timeout=120)
    assert r.status_code == 507, r.text
    message = r.json()["error"]["message"]
    assert "smollm2:2" in message and "budget is 1024 MiB" in message and "--memory-budget" in message
    rows = index(url)
    assert rows[("smollm2", "2")]["state"] == "FAILED" and "memory budget" in rows[("smollm2", "2")]["reason"]
    assert rows[("smollm2", "1")]["state"] == "READY" and rows[("smollm2", "1")]["serving"]
    assert complete(url, "smollm2").status_code == 200
    assert two_models.proc.poll() is None


def cache_count(url: str, result: str) -> float:
    return metric(httpx.get(f"{url}/metrics", timeout=10).text, "surge_response_cache_total", model="tiny",
                  result=result) or 0.0


def test_response_cache(two_models):
    url = two_models.url
    hits, misses = cache_count(url, "hit"), cache_count(url, "miss")
    first = complete(url, "tiny", "Pack my box", max_tokens=12)
    second = complete(url, "tiny", "Pack my box", max_tokens=12)
    assert first.status_code == second.status_code == 200
    strip = lambda b: {k: v for k, v in b.items() if k not in ("id", "created", "usage")}  # noqa: E731
    assert strip(first.json()) == strip(second.json())
    # a hit ran nothing: its usage says the whole prompt came from a cache
    usages = [r.json()["usage"] for r in (first, second)]
    cached = [u.pop("prompt_tokens_details")["cached_tokens"] for u in usages]
    assert usages[0] == usages[1] and cached[1] == usages[1]["prompt_tokens"] >= cached[0]
    assert (cache_count(url, "hit"), cache_count(url, "miss")) == (hits + 1, misses + 1)
    # the same request streamed is a hit too, with the same text
    with httpx.stream("POST", f"{url}/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": "Pack my box", "max_tokens": 12, "temperature": 0, "ignore_eos": True,
            "stream": True}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == first.json()["choices"][0]["text"]
    assert cache_count(url, "hit") == hits + 2
    # sampling without a seed is never cached (not even looked up); with a seed it is
    for _ in range(2):
        assert complete(url, "tiny", "Pack my box", max_tokens=12, temperature=1.0).status_code == 200
    assert (cache_count(url, "hit"), cache_count(url, "miss")) == (hits + 2, misses + 1)
    seeded = [complete(url, "tiny", "Pack my box", max_tokens=12, temperature=1.0, seed=7) for _ in range(2)]
    assert seeded[0].json()["choices"] == seeded[1].json()["choices"]
    assert (cache_count(url, "hit"), cache_count(url, "miss")) == (hits + 3, misses + 2)
    # different parameters are a different entry
    assert complete(url, "tiny", "Pack my box", max_tokens=11).status_code == 200
    assert cache_count(url, "miss") == misses + 3
    # an embedding is a function of its input: the repeat is a hit with the same vector
    vectors = [httpx.post(f"{url}/v1/embeddings", json={"model": "tiny", "input": "Pack my box", "pooling": "mean"},
                          timeout=60).json()["data"][0]["embedding"] for _ in range(2)]
    assert vectors[0] == vectors[1] and len(vectors[0]) == 64
    assert (cache_count(url, "hit"), cache_count(url, "miss")) == (hits + 4, misses + 4)


def test_dashboard_in_a_headless_browser(two_models):
    browser_path = chromium_or_skip()
    from playwright.sync_api import sync_playwright

    url = two_models.url
    stop = threading.Event()

    def load() -> None:  # steady streaming traffic on both models while the page watches
        i = 0
        while not stop.is_set():
            i += 1
            for model in ("tiny", "smollm2"):
                httpx.post(f"{url}/v1/completions", timeout=60, json={
                    "model": model, "prompt": f"Request {i}: tell me", "max_tokens": 16, "temperature": 0.7,
                    "ignore_eos": True})

    threads = [threading.Thread(target=load, daemon=True) for _ in range(3)]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1200})
            page.goto(f"{url}/dashboard")
            assert page.title() == "surge dashboard"
            for t in threads:
                t.start()
            for model in ("tiny", "smollm2"):
                for chart in ("tokens", "requests", "ttft", "tpot"):
                    page.wait_for_function(
                        "([m, c]) => { const b = document.querySelector(`section[data-model='${m}'] "
                        "[data-chart='${c}']`); return b && Number(b.dataset.max) > 0; }",
                        arg=[model, chart], timeout=60_000)
            rows = page.eval_on_selector_all("#repository tbody tr", "rows => rows.map(r => [r.dataset.model, "
                                             "r.dataset.version, r.dataset.state])")
            assert ["tiny", "1", "READY"] in rows and ["smollm2", "1", "READY"] in rows
            refreshes = int(page.eval_on_selector("body", "b => b.dataset.refreshes"))
            page.wait_for_timeout(2500)
            assert int(page.eval_on_selector("body", "b => b.dataset.refreshes")) >= refreshes + 2  # live
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shot = ARTIFACTS / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
        finally:
            stop.set()
            browser.close()
    for t in threads:
        t.join(60)
    data = httpx.get(f"{url}/dashboard/data", timeout=10).json()
    tiny = data["models"]["tiny"]
    assert max(tiny["tokens_per_s"]) > 0 and max(v or 0 for v in tiny["ttft_p99"]) > 0
    assert data["response_cache"]["capacity"] == 16 and "path" not in data["repository"][0]


def test_deploy_files_use_exported_metrics(two_models):
    """The Prometheus config and the Grafana dashboard in deploy/ only query metrics surge exports."""
    import re

    import yaml

    deploy = Path(__file__).resolve().parents[2] / "deploy"
    scrape = yaml.safe_load((deploy / "prometheus.yml").read_text())
    job = scrape["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"]
    grafana = json.loads((deploy / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in grafana["panels"] for t in panel.get("targets", [])]
    assert len(exprs) >= 8
    complete(two_models.url, "tiny")  # histograms have samples
    exported = {line.split("{")[0].split(" ")[0] for line in httpx.get(f"{two_models.url}/metrics").text.splitlines()
                if line.startswith("surge_")}
    used = {name for expr in exprs for name in re.findall(r"surge_[a-z0-9_]+", expr)}
    assert used and used <= exported, used - exported


# ---- hot reload under load -------------------------------------------------------------------


@dataclass
class Result:
    start: float
    end: float
    status: int
    versions: set[str] = field(default_factory=set)
    text: str = ""
    done: bool = False
    error: str | None = None


def stream_forever(url: str, stop: threading.Event, results: list[Result]) -> None:
    with httpx.Client(timeout=60) as client:
        while not stop.is_set():
            res = Result(time.monotonic(), 0.0, 0)
            try:
                with client.stream("POST", f"{url}/v1/completions", json={
                        "model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
                        "stream": True}) as r:
                    res.status = r.status_code
                    for line in r.iter_lines():
                        if not line.startswith("data: "):
                            continue
                        if line == "data: [DONE]":
                            res.done = True
                            break
                        event = json.loads(line[6:])
                        if "error" in event:
                            res.error = event["error"]["message"]
                            continue
                        res.versions.add(event["system_fingerprint"])
                        res.text += event["choices"][0]["text"]
                    if r.status_code != 200:
                        res.error = r.read().decode()
            except httpx.HTTPError as exc:
                res.error = repr(exc)
            res.end = time.monotonic()
            results.append(res)


def test_hot_reload_and_rollback_under_load(tmp_path, tiny_versions):
    root = tmp_path / "repo"
    root.mkdir()
    put(root, "tiny", 1, tiny_versions[1])
    srv = launch(tmp_path, "--model-repository", str(root), "--repository-poll-interval", "0.3", *COMMON,
                 "--admin-key", "admin-secret")
    expected = {f"tiny:{v}": expected_text(str(tiny_versions[v]), PROMPT, 12) for v in (1, 2)}
    assert expected["tiny:1"] != expected["tiny:2"]
    stop = threading.Event()
    results: list[Result] = []
    clients = [threading.Thread(target=stream_forever, args=(srv.url, stop, results), daemon=True)
               for _ in range(16)]
    try:
        for c in clients:
            c.start()
        wait_until(lambda: len(results) >= 32, what="traffic")
        before_put = time.monotonic()
        put(root, "tiny", 2, tiny_versions[2])
        wait_until(lambda: index(srv.url).get(("tiny", "2"), {}).get("serving"), what="version 2 serving")
        switched = time.monotonic()
        wait_until(lambda: index(srv.url)[("tiny", "1")]["state"] == "UNAVAILABLE", what="version 1 unloaded")
        wait_until(lambda: sum(r.start > switched for r in results) >= 32, what="traffic on version 2")

        rollback_called = time.monotonic()
        r = httpx.post(f"{srv.url}/v2/repository/models/tiny/rollback", headers=ADMIN, timeout=120)
        assert r.status_code == 200 and r.json()["version"] == "1", r.text
        rolled_back = time.monotonic()
        wait_until(lambda: sum(r.start > rolled_back for r in results) >= 32, what="traffic after rollback")

        # a corrupt version 3 fails to load; version 1 keeps serving
        broken = tmp_path / "broken"
        shutil.copytree(tiny_versions[2], broken)
        (broken / "model.safetensors").write_bytes(b"\x00" * 64)
        put(root, "tiny", 3, broken)
        wait_until(lambda: index(srv.url).get(("tiny", "3"), {}).get("state") == "FAILED", what="version 3 failed")
        failed_seen = time.monotonic()
        wait_until(lambda: sum(r.start > failed_seen for r in results) >= 16, what="traffic after the failure")
    finally:
        stop.set()
        for c in clients:
            c.join(60)
    rows = index(srv.url)
    srv.stop()

    bad = [r for r in results if r.status != 200 or r.error or not r.done]
    assert not bad, bad[:3]
    for r in results:  # one version per response, and that version's exact text
        assert len(r.versions) == 1, r.versions
        assert r.text == expected[next(iter(r.versions))]
    version = lambda r: next(iter(r.versions))  # noqa: E731
    assert {version(r) for r in results if r.end < before_put} == {"tiny:1"}
    assert {version(r) for r in results if switched < r.start < rollback_called} == {"tiny:2"}
    assert {version(r) for r in results if r.start > rolled_back} == {"tiny:1"}
    assert rows[("tiny", "1")]["serving"] and rows[("tiny", "1")]["state"] == "READY"
    assert rows[("tiny", "2")]["state"] == "UNAVAILABLE" and "rolled back" in rows[("tiny", "2")]["reason"]
    assert rows[("tiny", "3")]["state"] == "FAILED" and "model.safetensors" in rows[("tiny", "3")]["reason"]
    assert "loading tiny:3" in srv.log() and "failed" in srv.log()
    assert len(results) > 100


# ---- command line ----------------------------------------------------------------------------------


@pytest.mark.parametrize("args, needle", [
    (["--model-repository", "/nonexistent/repo"], "--model-repository /nonexistent/repo: no such directory"),
    (["--model-repository", "/tmp", "--model", "x.gguf"], "either --model"),
    (["--repository-poll-interval", "1"], "--repository-poll-interval needs --model-repository"),
    (["--model-repository", "/tmp", "--repository-poll-interval", "0"], "must be positive"),
    (["--memory-budget", "lots"], "cannot read 'lots' as a size"),
    (["--response-cache-size", "-1"], "--response-cache-size must be 0"),
])
def test_serve_argument_errors(args, needle, capsys):
    try:
        code = main(["serve", *args])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    assert needle in capsys.readouterr().err
