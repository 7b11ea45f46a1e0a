"""Schema-driven fuzzing: every operation of the server's own /openapi.json, with bodies that fit
the schema and bodies that break it (schemathesis on hypothesis), against a live server of a
tiny model. No response may be a 5xx; afterwards the server is healthy and holds no KV block."""

from __future__ import annotations

import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.conftest import build_tiny_model
from tests.server.conftest import launch, metric

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
EXAMPLES = {GenerationMode.POSITIVE: 150, GenerationMode.NEGATIVE: 100}  # per operation
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, tiny_tokenizer_dir):
    tmp = tmp_path_factory.mktemp("fuzz")
    model = build_tiny_model("llama", tmp / "tiny", tiny_tokenizer_dir)
    srv = launch(tmp, "--model", str(model), "--served-model-name", "tiny", "--dtype", "float32",
                 "--kv-cache-memory", str(16 << 20), "--max-num-seqs", "16", "--max-queue", "16",
                 "--request-timeout", "30", "--api-key", KEY, "--no-warmup")
    yield srv
    srv.stop()


def _bounded(body):
    """Small generations: max_tokens (where it is a positive int) at most MAX_TOKENS, also among
    KServe's request parameters."""
    if isinstance(body, dict):
        for name in ("max_tokens", "max_completion_tokens"):
            value = body.get(name)
            if type(value) is int and value > MAX_TOKENS:
                body[name] = MAX_TOKENS
        if isinstance(body.get("parameters"), dict):
            _bounded(body["parameters"])
    return body


def _send(client: httpx.Client, url: str, case) -> httpx.Response:
    headers = {**(case.headers or {}), **AUTH}
    kwargs = {}
    if case.method.upper() == "POST":
        body = _bounded(case.body)
        if isinstance(body, (bytes, str)):
            kwargs["content"] = body
            headers.setdefault("Content-Type", case.media_type or "application/json")
        elif body is not None and not isinstance(body, schemathesis.core.NotSet):
            kwargs["json"] = body
    return client.request(case.method, url + case.formatted_path, params=case.query or None,
                          headers=headers, timeout=60, **kwargs)


def _fuzz(client, url, op, mode, examples, counts, failures) -> None:
    name = f"{op.method.upper()} {op.path} {mode.value}"

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case):
        counts[name] = counts.get(name, 0) + 1
        r = _send(client, url, case)
        if r.status_code >= 500:
            failures.append(f"{name}: {r.status_code} {r.text[:200]} <- {str(case.body)[:200]}")

    try:
        run()
    except Unsatisfiable:  # nothing invalid to generate (an operation without parameters)
        assert mode is GenerationMode.NEGATIVE, name


def test_fuzz_every_operation_no_5xx(fuzz_server):
    url = fuzz_server.url
    spec = httpx.get(f"{url}/openapi.json", timeout=10).json()
    schema = schemathesis.openapi.from_dict(spec)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14
    failures: list[str] = []
    counts: dict[str, int] = {}
    with httpx.Client() as client:
        for op in operations:
            for mode, examples in EXAMPLES.items():
                _fuzz(client, url, op, mode, examples, counts, failures)
    print(f"fuzzed {sum(counts.values())} cases over {len(operations)} operations")
    assert not failures, "\n".join(failures[:20])
    assert sum(counts.values()) > 1500, counts
    # healthy, idle, and every KV block back
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{url}/ready").status_code == 200
    deadline = time.monotonic() + 30
    while True:
        text = httpx.get(f"{url}/metrics", headers=AUTH).text
        idle = [metric(text, name, model="tiny") for name in
                ("surge_num_requests_running", "surge_num_requests_waiting", "surge_kv_cache_usage_ratio")]
        if idle == [0.0, 0.0, 0.0] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert idle == [0.0, 0.0, 0.0], idle
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hello", "max_tokens": 3}, headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
