"""The app in process on a tiny model: a request the engine fails on answers 500 (an error event
on a stream) while the others are served; a dead engine shows its cause on /health and ends the
process; settings and the front door's rules, without a network."""

from __future__ import annotations

import dataclasses
import json
import threading

import pytest
from fastapi.testclient import TestClient

from surge.engine.args import EngineArgs
from surge.entrypoints.llm import LLM
from surge.errors import InvalidArgumentError
from surge.server.budget import MemoryBudget, MiB
from surge.server.app import create_app
from surge.server.state import ServerState
from surge.server.guard import host_name, key_matches
from surge.server.repository import ModelRepository
from surge.server.settings import ServerSettings, read_key_file
from tests.conftest import build_tiny_model

ARGS = EngineArgs(dtype="float32", quantization="none", kv_cache_memory=8 * MiB, max_num_seqs=8, warmup=False)


@pytest.fixture(scope="module")
def app_state(tmp_path_factory, tiny_tokenizer_dir):
    path = build_tiny_model("llama", tmp_path_factory.mktemp("inproc") / "tiny", tiny_tokenizer_dir)
    repo = ModelRepository(lambda p, args, reserve: LLM.from_engine_args(dataclasses.replace(args, model=p), reserve).engine,
                           ARGS, MemoryBudget(1 << 30))
    repo.add_model("tiny", str(path))
    repo.start()
    state = ServerState(repo, ServerSettings())
    state.status = "ready"
    yield state
    repo.shutdown()


@pytest.fixture
def client(app_state):
    with TestClient(create_app(app_state), base_url="http://127.0.0.1:8000") as c:
        yield c


def _fail_requests_whose_prompt_starts_with(engine, marker: list[int]):
    real = engine.core.executor.execute_model

    def execute(scheduled):
        for r in scheduled.requests:
            if r.start_position == 0 and r.token_ids[: len(marker)] == marker:
                raise RuntimeError("injected fault")
        return real(scheduled)

    return execute


def test_a_failing_request_is_a_500_and_the_others_are_served(client, app_state, monkeypatch):
    engine = app_state.repository.deployments()[0].engine
    marker = engine.tokenizer.encode("POISON")
    monkeypatch.setattr(engine.core.executor, "execute_model", _fail_requests_whose_prompt_starts_with(engine, marker))
    results: dict[str, object] = {}

    def good(i: int) -> None:
        r = client.post("/v1/completions", json={"prompt": f"Hello {i}", "max_tokens": 6, "temperature": 0,
                                                 "ignore_eos": True})
        results[f"good{i}"] = (r.status_code, r.json()["choices"][0]["finish_reason"] if r.status_code == 200 else r.text)

    threads = [threading.Thread(target=good, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    bad = client.post("/v1/completions", json={"prompt": "POISON pill", "max_tokens": 6})
    with client.stream("POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                             "stream": True, "max_tokens": 4}) as r:
        chat_events = [line for line in r.iter_lines() if line.startswith("data:")]
    with client.stream("POST", "/v1/completions", json={"prompt": "POISON again", "stream": True}) as r:
        events = [line for line in r.iter_lines() if line.startswith("data:")]
    for t in threads:
        t.join()
    assert bad.status_code == 500, bad.text
    err = bad.json()["error"]
    assert err["code"] == "engine_error" and "injected fault" in err["message"]
    assert events[-1] == "data: [DONE]" and "injected fault" in json.loads(events[-2][5:])["error"]["message"]
    assert chat_events[-1] == "data: [DONE]" and "error" not in chat_events[-2]
    assert results == {f"good{i}": (200, "length") for i in range(6)}
    assert client.get("/health").json() == {"status": "ok"}
    monkeypatch.undo()
    assert engine.is_idle_clean()


def test_a_dead_engine_is_reported_and_ends_the_process(app_state, tmp_path):
    from surge.server.serve import _watch_engines

    dep = app_state.repository.deployments()[0]

    class Server:
        should_exit = False

    stop = threading.Event()
    server = Server()
    dep.async_engine.error = RuntimeError("device lost")
    try:
        watcher = threading.Thread(target=_watch_engines, args=(app_state, server, stop))
        watcher.start()
        watcher.join(5)
        assert server.should_exit and "device lost" in app_state.engine_error
        with TestClient(create_app(app_state), base_url="http://127.0.0.1:8000") as c:
            r = c.get("/health")
            assert r.status_code == 503 and r.json()["status"] == "dead" and "device lost" in r.json()["error"]
            assert c.get("/ready").status_code == 503
            r = c.post("/v1/completions", json={"prompt": "x"})
            assert r.status_code == 503 and "device lost" in r.json()["error"]["message"]
    finally:
        stop.set()
        dep.async_engine.error = None
        app_state.engine_error = None


def test_settings_refuse_bad_values(tmp_path):
    for bad in ({"max_request_bytes": 0}, {"header_timeout": -1}, {"max_queue": 0}, {"api_keys": ("",)},
                {"api_keys": ("has space",)}, {"allowed_origins": ("evil.com",)}, {"response_cache_size": -1},
                {"grpc_port": 8000}, {"grpc_port": 70000}, {"grpc_port": 0}):
        with pytest.raises(InvalidArgumentError):
            ServerSettings(**bad)
    with pytest.raises(InvalidArgumentError, match="cannot read"):
        ServerSettings(api_key_file=str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n\n")
    with pytest.raises(InvalidArgumentError, match="holds no key"):
        read_key_file(str(empty))
    keys = tmp_path / "keys"
    keys.write_text("a1\n  b2  \n# c3\n")
    assert ServerSettings(api_keys=("z",), api_key_file=str(keys)).api_keys == ("z", "a1", "b2")


def test_key_matching():
    import base64

    keys = ("alpha", "beta")
    assert key_matches("Bearer alpha", keys, False) and key_matches("bearer beta", keys, False)
    assert not key_matches("Bearer alph", keys, False) and not key_matches("alpha", keys, False)
    basic = "Basic " + base64.b64encode(b"user:beta").decode()
    assert key_matches(basic, keys, True) and not key_matches(basic, keys, False)
    assert not key_matches("Basic !!!", keys, True) and not key_matches("Bearer ", keys, False)


def test_host_names():
    assert host_name("127.0.0.1:8000") == "127.0.0.1"
    assert host_name("[::1]:8000") == "::1" and host_name("LocalHost") == "localhost"
    assert host_name("::1") == "::1"


def test_host_and_origin_rules(app_state):
    settings = ServerSettings(allowed_hosts=("api.example",), allowed_origins=("https://app.example",))
    old = app_state.settings
    app_state.settings = settings
    try:
        with TestClient(create_app(app_state), base_url="http://127.0.0.1:8000") as c:
            assert c.get("/v1/models", headers={"Host": "api.example"}).status_code == 200
            assert c.get("/v1/models", headers={"Host": "10.1.2.3:8000"}).status_code == 200  # an address
            assert c.get("/v1/models", headers={"Host": "rebind.example"}).status_code == 403
            r = c.get("/v1/models", headers={"Origin": "https://app.example"})
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
            pre = c.options("/v1/completions", headers={"Origin": "https://app.example",
                                                        "Access-Control-Request-Method": "POST",
                                                        "Access-Control-Request-Headers": "content-type"})
            assert pre.status_code == 200, pre.text
            assert c.get("/v1/models", headers={"Origin": "https://other.example"}).status_code == 403
            assert c.get("/v1/models", headers={"Origin": "null"}).status_code == 403
        # bound to a network address, any name (it is reachable there anyway), unless narrowed
        app_state.settings = ServerSettings(host="0.0.0.0")
        with TestClient(create_app(app_state), base_url="http://surge.internal:8000") as c:
            assert c.get("/v1/models").status_code == 200
        app_state.settings = ServerSettings(host="0.0.0.0", allowed_hosts=("surge.internal",))
        with TestClient(create_app(app_state), base_url="http://surge.internal:8000") as c:
            assert c.get("/v1/models").status_code == 200
            assert c.get("/v1/models", headers={"Host": "other.example"}).status_code == 403
    finally:
        app_state.settings = old


def test_max_tokens_default_caps_chat_without_max_tokens(app_state):
    old = app_state.settings
    app_state.settings = ServerSettings(max_tokens_default=3)
    try:
        with TestClient(create_app(app_state), base_url="http://127.0.0.1:8000") as c:
            body = {"messages": [{"role": "user", "content": "Hi"}], "ignore_eos": True}
            r = c.post("/v1/chat/completions", json=body)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text
            r = c.post("/v1/chat/completions", json={**body, "max_tokens": 5})  # explicit wins
            assert r.json()["usage"]["completion_tokens"] == 5
            r = c.post("/v1/chat/completions", json={**body, "max_tokens": None})
            assert r.json()["usage"]["completion_tokens"] == 3
    finally:
        app_state.settings = old


def test_repository_index_ready_filter(client):
    rows = client.get("/v2/repository/index").json()
    assert [r["state"] for r in rows] == ["READY"]
    assert client.post("/v2/repository/index", json={"ready": True}).json() == rows
    assert client.post("/v2/repository/index").json() == rows
    r = client.post("/v2/repository/index", json={"ready": "yes"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "ready"
