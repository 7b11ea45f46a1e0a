"""A hostile client against the shared server: every request of the hardening findings is a 200
or a 400 (never a 500, never a dead engine), cross-site requests never reach the engine, an
8k-token echo with logprobs does not stall a running stream, and the API says what it does."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tests.server.conftest import MODEL_NAME, metric
from tests.server.test_errors_and_lifecycle import AUTH, assert_error, post, still_serving

HELLO = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 4}
CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}

# finding 1: each of these killed the engine for good
FINDING_1 = [
    {**HELLO, "top_p": 5e-324},
    {**HELLO, "top_p": 1e-46, "temperature": 1.0},
    {**HELLO, "repetition_penalty": 1e-39, "temperature": 1.0},
    {**HELLO, "repetition_penalty": 2e-38},
    {**HELLO, "seed": 2**64},
    {**HELLO, "seed": -(2**63) - 1},
    {**HELLO, "n": 2, "seed": 2**64 - 1, "temperature": 1.0},
    {**HELLO, "top_k": 2**63, "temperature": 1.0},
    {**HELLO, "top_k": 2**63 - 1, "temperature": 1.0},
    {**HELLO, "logit_bias": {"³": 1}},
    {**HELLO, "logit_bias": {"٣": 1}},
]
RAW_FINDINGS = [  # finding 1 (lone surrogates) and finding 6 (500s with internal text)
    ("/v1/completions", '{"prompt": "\\ud800", "max_tokens": 4}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a\\udfff"}], "max_tokens": 4}'),
    ("/tokenize", '{"prompt": "\\ud800"}'),
    ("/v1/completions", "[" * 5000 + "]" * 5000),
    ("/v1/completions", '{"prompt": "x", "max_tokens": ' + "9" * 5000 + "}"),
    ("/v1/completions", '{"prompt": "x", "seed": ' + "9" * 5000 + "}"),
    ("/v1/completions", '{"prompt": ' + '{"a": ' * 3000 + "1" + "}" * 3000 + "}"),
    ("/v1/completions", '{"prompt": "x", "temperature": NaN}'),
    ("/v1/completions", '{"prompt": "x", "temperature": 1e999}'),
    ("/v1/completions", b'{"prompt": "\xff\xfe"}'),
]
NUMERIC_FIELDS = ["temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
                  "top_k", "seed", "n", "max_tokens", "min_tokens", "logprobs", "priority"]
EXTREMES = [5e-324, 1e-45, 1e-38, 1e308, -1e308, -1, -0.0, 0, 1, 2**70, -(2**70), 2**63, 2**64 - 1, 1.5]


def _ok_or_400(r: httpx.Response) -> None:
    assert r.status_code in (200, 400), (r.status_code, r.text[:300])
    if r.status_code == 400:
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["message"], err
        assert "Error" not in err["message"].split(":")[0], err  # no exception class names


@pytest.mark.parametrize("body", FINDING_1, ids=lambda b: json.dumps({k: v for k, v in b.items() if k not in HELLO
                                                                       or v != HELLO[k]})[:60])
def test_finding_1_requests_never_kill_the_engine(server, body):
    _ok_or_400(post(server, "/v1/completions", body))
    chat = {**CHAT, **{k: v for k, v in body.items() if k not in ("prompt", "max_tokens")}}
    _ok_or_400(post(server, "/v1/chat/completions", chat))
    still_serving(server)


@pytest.mark.parametrize("path, raw", RAW_FINDINGS, ids=lambda x: str(x)[:40])
def test_malformed_bodies_are_400s(server, path, raw):
    err = assert_error(post(server, path, raw=raw), 400)
    assert "internal" not in err["message"] and "Recursion" not in err["message"]
    still_serving(server)


def test_extreme_numbers_in_every_sampling_field(server):
    for field in NUMERIC_FIELDS:
        for value in EXTREMES:
            body = {**HELLO, "max_tokens": 2, field: value}
            _ok_or_400(post(server, "/v1/completions", body))
        still_serving(server)
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


@pytest.mark.parametrize("body, needle", [
    ({**HELLO, "best_of": 3}, "best_of"),
    ({**HELLO, "suffix": " the end"}, "suffix"),
    ({**HELLO, "max_tokens": True}, "max_tokens"),
    ({**HELLO, "n": True}, "n"),
    ({**HELLO, "prompt": [True, False]}, "prompt"),
    ({**HELLO, "max_tokens": 4.0}, "max_tokens"),
    ({**HELLO, "temperature": "0.5"}, "temperature"),
    ({**HELLO, "stream": "yes"}, "stream"),
    ({**HELLO, "frobnicate": 1}, "frobnicate"),
    ({**HELLO, "stop": ["x"] * 17}, "stop"),
])
def test_completions_fields_that_are_not_implemented_or_wrongly_typed(server, body, needle):
    err = assert_error(post(server, "/v1/completions", body), 400, needle)
    assert err["param"] is None or needle in err["param"]


@pytest.mark.parametrize("extra, needle", [
    ({"echo": True}, "echo"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "response_format": {"type": "json_object"}},
     "cannot be combined"),  # tools are implemented; with an output format they are not
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),  # implemented; this one lacks its schema
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"audio": {"voice": "alloy"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"best_of": 2}, "best_of"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "image_url"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "1"}]}]}, "tool_calls"),
    ({"max_tokens": False}, "max_tokens"),
])
def test_chat_fields_that_are_not_implemented(server, extra, needle):
    assert_error(post(server, "/v1/chat/completions", {**CHAT, **extra}), 400, needle)


def test_hints_and_neutral_values_are_accepted(server):
    """OpenAI's service hints are ignored, and what an SDK echoes back from a response is fine."""
    body = {**CHAT, "user": "u1", "store": False, "metadata": {"k": "v"}, "service_tier": "auto",
            "parallel_tool_calls": True, "tools": [], "tool_choice": "none", "response_format": {"type": "text"},
            "modalities": ["text"], "stream_options": None,
            "messages": [{"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello!", "refusal": None, "tool_calls": None,
                          "function_call": None, "audio": None, "annotations": []},
                         {"role": "user", "content": [{"type": "text", "text": "More"}]}]}
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    r = post(server, "/v1/completions", {**HELLO, "best_of": 1, "suffix": None, "echo": None, "user": "u"})
    assert r.status_code == 200, r.text


def test_max_tokens_null_is_the_default(server):
    r = post(server, "/v1/completions", {**HELLO, "max_tokens": None, "ignore_eos": True, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16  # OpenAI's default


def test_cross_site_requests_never_reach_the_engine(server):
    before = metric(httpx.get(f"{server.url}/metrics", headers=AUTH).text, "surge_prompt_tokens_total",
                    model=MODEL_NAME)
    attack = json.dumps({**HELLO, "top_p": 5e-324})
    # a page's form or fetch in no-cors mode: text/plain, a foreign Origin, no preflight
    r = httpx.post(f"{server.url}/v1/completions", content=attack, headers={
        "Content-Type": "text/plain", "Origin": "http://evil.example", **AUTH})
    err = assert_error(r, 403, "evil.example")
    assert err["code"] == "origin_not_allowed"
    # text/plain from a non-browser client: refused as not JSON
    assert_error(httpx.post(f"{server.url}/v1/completions", content=attack,
                            headers={"Content-Type": "text/plain", **AUTH}), 415, "application/json")
    assert_error(httpx.post(f"{server.url}/v1/completions", content=attack, headers=AUTH), 415, "Content-Type")
    # DNS rebinding: the page's own name in Host
    assert_error(httpx.post(f"{server.url}/v1/completions", content=attack, headers={
        "Content-Type": "application/json", "Host": "evil.example:8000", **AUTH}), 403, "evil.example")
    # same origin (the dashboard's page) and no Origin at all are fine
    host = server.url.removeprefix("http://")
    ok = post(server, "/v1/completions", HELLO, headers={"Origin": server.url, "Host": host, **AUTH})
    assert ok.status_code == 200, ok.text
    after = metric(httpx.get(f"{server.url}/metrics", headers=AUTH).text, "surge_prompt_tokens_total",
                   model=MODEL_NAME)
    hello = post(server, "/tokenize", {"model": MODEL_NAME, "prompt": "Hello"}).json()["count"]
    assert after - before == hello  # only the same-origin request's prompt was computed


def test_model_control_is_off_without_an_admin_key(server):
    for action in ("unload", "load", "rollback"):
        err = assert_error(post(server, f"/v2/repository/models/{MODEL_NAME}/{action}", {}), 403, "--admin-key")
        assert err["code"] == "admin_disabled"
    assert_error(post(server, f"/v2/repository/models/{MODEL_NAME}/unload", {}, headers=None), 403)
    still_serving(server)


def test_body_limit_413_before_parsing(server):
    big = b'{"prompt": "' + b"a" * (10 << 20) + b'"}'
    start = time.monotonic()
    r = httpx.post(f"{server.url}/v1/completions", content=big,
                   headers={"Content-Type": "application/json", **AUTH}, timeout=30)
    took = time.monotonic() - start
    err = assert_error(r, 413, "--max-request-bytes")
    assert err["code"] == "request_too_large"
    assert took < 1.0, took
    t0 = time.monotonic()
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
    assert time.monotonic() - t0 < 0.5
    still_serving(server)


def test_prompt_list_is_capped(server):
    assert_error(post(server, "/v1/completions", {**HELLO, "prompt": ["x"] * 257}), 400, "257", "--max-prompts")


def test_every_response_has_a_request_id(server):
    r = post(server, "/v1/completions", HELLO, headers={"X-Request-Id": "client-id-42", **AUTH})
    assert r.headers["X-Request-Id"] == "client-id-42"
    r = post(server, "/v1/completions", {"prompt": 1})
    assert len(r.headers["X-Request-Id"]) == 32
    r = httpx.get(f"{server.url}/nope", headers={"X-Request-Id": "bad id with spaces"})
    assert r.status_code == 404 and r.headers["X-Request-Id"] != "bad id with spaces"


def test_openapi_describes_every_request_body(server):
    spec = httpx.get(f"{server.url}/openapi.json").json()
    posts = {path: ops["post"] for path, ops in spec["paths"].items() if "post" in ops}
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        schema = posts[path]["requestBody"]["content"]["application/json"]["schema"]
        assert schema["additionalProperties"] is False and schema["properties"], path
    chat = posts["/v1/chat/completions"]["requestBody"]["content"]["application/json"]["schema"]
    assert chat["properties"]["messages"]["items"]["$ref"] == "#/components/schemas/ChatMessage"
    assert "ChatMessage" in spec["components"]["schemas"]
    assert all("requestBody" in op for op in posts.values())


def test_api_keys_several_and_from_a_file(tmp_path):
    from tests.server.conftest import start_server

    keys = tmp_path / "keys.txt"
    keys.write_text("# team keys\nkey-from-file\n\n")
    srv = start_server(tmp_path, "--api-key", "k1", "--api-key", "k2", "--api-key-file", str(keys),
                       "--metrics-key", "m-key", "--no-warmup", "--max-num-seqs", "4")
    try:
        for key in ("k1", "k2", "key-from-file"):
            r = httpx.post(f"{srv.url}/v1/completions", json=HELLO, headers={"Authorization": f"Bearer {key}"},
                           timeout=60)
            assert r.status_code == 200, (key, r.text)
        for bad in ("k", "k1x", "m-key", "Bearer k1"):
            assert httpx.get(f"{srv.url}/v1/models", headers={"Authorization": f"Bearer {bad}"}).status_code == 401
        # the metrics key guards /metrics and the dashboard; API keys do not open them
        assert httpx.get(f"{srv.url}/metrics", headers={"Authorization": "Bearer k1"}).status_code == 401
        assert httpx.get(f"{srv.url}/metrics", headers={"Authorization": "Bearer m-key"}).status_code == 200
        assert httpx.get(f"{srv.url}/dashboard", auth=("me", "m-key")).status_code == 200
        assert httpx.get(f"{srv.url}/dashboard/data").status_code == 401
    finally:
        srv.stop()


@pytest.mark.slow
def test_long_echo_with_logprobs_does_not_stall_a_stream(server):
    """Finding 3: an ~8k-token echo with 20 logprobs per position, while a stream runs."""
    pid = server.proc.pid

    def rss_kb(field: str) -> int:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field))

    gaps: list[float] = []
    first_chunk = threading.Event()

    def stream() -> None:
        last = None
        body = {**HELLO, "prompt": "Once upon a time", "max_tokens": 120, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=600) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    now = time.monotonic()
                    if last is not None:
                        gaps.append(now - last)
                    last = now
                    first_chunk.set()

    rss_before = rss_kb("VmRSS")
    t = threading.Thread(target=stream)
    t.start()
    assert first_chunk.wait(60)
    r = post(server, "/v1/completions", {"model": MODEL_NAME, "prompt": "hello " * 7990, "max_tokens": 1,
                                         "echo": True, "logprobs": 20}, timeout=600)
    t.join(600)
    assert r.status_code == 200, r.text[:300]
    lps = r.json()["choices"][0]["logprobs"]
    assert len(lps["tokens"]) > 7900 and len(lps["top_logprobs"][5]) == 20
    assert gaps and max(gaps) < 2.0, f"longest gap {max(gaps):.2f}s"
    growth_gb = (rss_kb("VmHWM") - rss_before) / (1 << 20)
    assert growth_gb < 1.0, f"peak RSS grew {growth_gb:.2f} GB"
    still_serving(server)
