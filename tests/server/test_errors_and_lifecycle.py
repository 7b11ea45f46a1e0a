"""Every error path answers with its status and OpenAI's error body and the server keeps
serving; disconnects free KV blocks; SIGTERM drains in-flight streams and exits 0."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from tests.server.conftest import API_KEY, MODEL_NAME, metric, start_server, wait_ready

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def post(server, path, body=None, *, raw=None, headers=AUTH, timeout=60):
    content = raw if raw is not None else json.dumps(body)
    return httpx.post(f"{server.url}{path}", content=content, timeout=timeout,
                      headers={"Content-Type": "application/json", **(headers or {})})


def assert_error(r: httpx.Response, status: int, *needles: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for needle in needles:
        assert needle in err["message"], err
    return err


def still_serving(server) -> None:
    r = post(server, "/v1/completions", {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text


def test_malformed_json(server):
    assert_error(post(server, "/v1/completions", raw="{not json"), 400, "malformed JSON")
    assert_error(post(server, "/v1/chat/completions", raw="[1, 2]"), 400, "JSON object")
    still_serving(server)


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": 42}, "prompt"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "temperature": 3.5}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "logprobs": 50}, "logprobs"),
    ({"prompt": "x", "presence_penalty": 9}, "presence_penalty"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": []}, "prompt"),
])
def test_wrong_types_and_ranges(server, body, param):
    err = assert_error(post(server, "/v1/completions", {"model": MODEL_NAME, **body}), 400)
    assert err["param"] is not None and err["param"].startswith(param)


def test_chat_field_errors(server):
    assert_error(post(server, "/v1/chat/completions", {"messages": []}), 400, "messages")
    assert_error(post(server, "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}), 400)
    assert_error(post(server, "/v1/chat/completions",
                      {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}), 400, "logprobs")
    still_serving(server)


def test_context_overflow_names_both_numbers(server):
    err = assert_error(post(server, "/v1/completions", {"prompt": "Hello there", "max_tokens": 9000}), 400,
                       "9000", "8192")
    assert "prompt (2 tokens)" in err["message"]
    assert_error(post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                       "max_completion_tokens": 100000}), 400, "100000")


def test_token_ids_outside_vocabulary(server):
    assert_error(post(server, "/v1/completions", {"prompt": [1, 2, 60000]}), 400, "60000", "vocabulary")
    assert_error(post(server, "/detokenize", {"tokens": [-1]}), 400, "vocabulary")
    still_serving(server)


def test_unknown_model(server):
    err = assert_error(post(server, "/v1/completions", {"model": "gpt-9", "prompt": "x"}), 404, "gpt-9")
    assert err["code"] == "model_not_found"


def test_api_key(server):
    assert_error(post(server, "/v1/completions", {"prompt": "x"}, headers=None), 401, "API key")
    assert_error(post(server, "/v1/completions", {"prompt": "x"}, headers={"Authorization": "Bearer nope"}), 401)
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    assert httpx.get(f"{server.url}/health").status_code == 200  # liveness and readiness stay open
    assert httpx.get(f"{server.url}/ready").status_code == 200
    # with an API key and no --metrics-key, the API key guards /metrics and the dashboard
    for path in ("/metrics", "/dashboard", "/dashboard/data"):
        r = httpx.get(f"{server.url}{path}")
        assert r.status_code == 401 and "Basic" in r.headers["WWW-Authenticate"], path
        assert httpx.get(f"{server.url}{path}", headers=AUTH).status_code == 200, path
        assert httpx.get(f"{server.url}{path}", auth=("any", API_KEY)).status_code == 200, path
    still_serving(server)


def test_metrics_reflect_requests(server):
    text = httpx.get(f"{server.url}/metrics", headers=AUTH).text
    for status in ("200", "400", "401", "404"):
        assert metric(text, "surge_requests_total", status=status), status
    for name in ("surge_e2e_request_latency_seconds_count", "surge_time_to_first_token_seconds_count",
                 "surge_time_per_output_token_seconds_count", "surge_prompt_tokens_total",
                 "surge_generation_tokens_total"):
        assert metric(text, name, model=MODEL_NAME), name
    for name in ("surge_num_requests_running", "surge_num_requests_waiting", "surge_kv_cache_usage_ratio",
                 "surge_prefix_cache_hit_rate", "surge_num_preemptions_total"):
        assert metric(text, name, model=MODEL_NAME) is not None, name


def _kv_idle(server, timeout=20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = httpx.get(f"{server.url}/metrics", headers=AUTH).text
        if metric(text, "surge_kv_cache_usage_ratio", model=MODEL_NAME) == 0.0 and \
                metric(text, "surge_num_requests_running", model=MODEL_NAME) == 0.0:
            return True
        time.sleep(0.1)
    return False


def test_disconnect_mid_stream_frees_blocks(server):
    body = {"model": MODEL_NAME, "prompt": "Tell me a very long story.", "max_tokens": 2000, "temperature": 0,
            "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{server.url}/v1/completions", json=body, headers=AUTH) as r:
            assert r.status_code == 200
            lines = 0
            for line in r.iter_lines():
                lines += line.startswith("data:")
                if lines >= 3:
                    break
    assert _kv_idle(server), "KV blocks were not freed after the client went away"
    # a non-streaming client that gives up is aborted too
    with pytest.raises(httpx.ReadTimeout):
        post(server, "/v1/completions", {**body, "stream": False}, timeout=1.5)
    assert _kv_idle(server)
    still_serving(server)


def test_queue_full_gets_429(limited_server):
    url = f"{limited_server.url}/v1/completions"
    long = {"prompt": "Count to a thousand:", "max_tokens": 1000, "temperature": 0, "ignore_eos": True}
    results: list[int] = []

    def hold():
        results.append(httpx.post(url, json=long, timeout=30).status_code)

    threads = [threading.Thread(target=hold) for _ in range(2)]  # one running, one waiting
    for t in threads:
        t.start()
    time.sleep(0.5)
    r = httpx.post(url, json={"prompt": "x", "max_tokens": 2}, timeout=30)
    err = assert_error(r, 429, "capacity")
    assert r.headers["Retry-After"] == "1" and err["type"] == "rate_limit_exceeded"
    for t in threads:
        t.join()
    assert results == [408, 408]  # both ran into the 2 s request timeout


def test_request_timeout_aborts(limited_server):
    url = f"{limited_server.url}/v1/completions"
    body = {"prompt": "Count to a thousand:", "max_tokens": 1000, "temperature": 0, "ignore_eos": True}
    err = assert_error(httpx.post(url, json=body, timeout=30), 408, "request-timeout")
    assert err["type"] == "timeout_error"
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=30) as r:
        events = [line for line in r.iter_lines() if line.startswith("data:")]
    assert "request-timeout" in events[-2] and events[-1] == "data: [DONE]"
    assert _kv_idle(limited_server)
    text = httpx.get(f"{limited_server.url}/metrics").text
    assert metric(text, "surge_requests_total", status="408")
    r = httpx.post(url, json={"prompt": "Hi", "max_tokens": 2}, timeout=30)
    assert r.status_code == 200


def test_sigterm_drains_streams_and_exits_0(tmp_path):
    srv = start_server(tmp_path, "--shutdown-grace", "60")
    try:
        body = {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 48, "temperature": 0,
                "stream": True, "ignore_eos": True}
        events: list[str] = []
        health: list[int] = []
        with httpx.Client(timeout=120) as client:
            with client.stream("POST", f"{srv.url}/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    events.append(line)
                    if len(events) == 2:
                        srv.proc.send_signal(signal.SIGTERM)
                        time.sleep(0.3)
                        health.append(client.get(f"{srv.url}/health").status_code)  # alive
                        health.append(client.get(f"{srv.url}/ready").status_code)  # not taking work
                        refused = client.post(f"{srv.url}/v1/completions", json={"prompt": "x", "max_tokens": 2})
                        health.append(refused.status_code)
        assert events[-1] == "data: [DONE]"
        finals = [json.loads(e[5:])["choices"][0]["finish_reason"] for e in events[:-1]]
        assert finals[-1] == "length" and len(events) - 1 == 48
        assert health == [200, 503, 503]
        assert srv.proc.wait(60) == 0, srv.log()
    finally:
        srv.stop()


def test_ready_503_while_loading_health_200(tmp_path):
    srv = start_server(tmp_path, wait=False)
    try:
        seen, alive = set(), set()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and 200 not in seen:
            try:
                seen.add(httpx.get(f"{srv.url}/ready", timeout=2).status_code)
                r = httpx.get(f"{srv.url}/health", timeout=2)
                alive.add((r.status_code, r.json()["status"]))
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        assert seen == {503, 200}, seen
        assert (200, "loading") in alive and all(code == 200 for code, _ in alive), alive
        wait_ready(srv)
    finally:
        srv.stop()
