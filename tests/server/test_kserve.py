"""The KServe v2 protocol (Triton's) for the served LLM, through the real `tritonclient` (http) and
raw HTTP: health, server and model metadata, readiness, infer with binary and JSON tensors
(text equal to /v1/completions' on the same settings), the generate extension, and bad input
as `{"error": ...}` with its status, the server serving after each."""

from __future__ import annotations

import json
import struct

import httpx
import numpy as np
import pytest

from tests.server.conftest import API_KEY, MODEL_NAME

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def auth() -> dict[str, str]:
    """A fresh headers dict for each tritonclient call (it adds its own to the one it is given)."""
    return dict(AUTH)
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]


@pytest.fixture(scope="module")
def triton(server):
    import tritonclient.http as httpclient

    return httpclient.InferenceServerClient(url=server.url.removeprefix("http://"), network_timeout=120)


def completions(server, prompt: str, **settings) -> dict:
    r = httpx.post(f"{server.url}/v1/completions", headers=auth(), timeout=120,
                   json={"model": MODEL_NAME, "prompt": prompt, **settings})
    return r.json()["choices"][0]


def text_input(prompts: list[str], binary: bool, shape: list[int] | None = None):
    import tritonclient.http as httpclient

    data = np.array([p.encode() for p in prompts], dtype=np.object_).reshape(shape or [len(prompts)])
    tensor = httpclient.InferInput("text_input", list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data, binary_data=binary)
    return tensor


def texts_of(array) -> list[str]:
    """BYTES elements as text (binary outputs come back as bytes, JSON ones as str)."""
    return [t.decode() if isinstance(t, bytes) else t for t in array.reshape(-1)]


def test_health_and_metadata(triton, server):
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.get_server_metadata()["name"] == "surge"
    assert triton.is_model_ready(MODEL_NAME, headers=auth())
    meta = triton.get_model_metadata(MODEL_NAME, headers=auth())
    assert meta["name"] == MODEL_NAME and meta["versions"] == ["1"] or meta["versions"]
    assert {i["name"]: i["datatype"] for i in meta["inputs"]} == {"text_input": "BYTES", "sampling_parameters": "BYTES"}
    assert [o["name"] for o in meta["outputs"]] == ["text_output", "finish_reason"]
    version = meta["versions"][0]
    assert triton.is_model_ready(MODEL_NAME, model_version=version, headers=auth())
    assert not triton.is_model_ready("nope", headers=auth())
    assert not triton.is_model_ready(MODEL_NAME, model_version="999", headers=auth())


@pytest.mark.parametrize("binary", [True, False])
def test_infer_equals_completions(triton, server, binary):
    import tritonclient.http as httpclient

    want = [completions(server, p, max_tokens=12, temperature=0) for p in PROMPTS]
    outputs = None if binary else [httpclient.InferRequestedOutput("text_output", binary_data=False),
                                   httpclient.InferRequestedOutput("finish_reason", binary_data=False)]
    result = triton.infer(MODEL_NAME, [text_input(PROMPTS, binary)], outputs=outputs, headers=auth(),
                          parameters={"max_tokens": 12, "temperature": 0.0})
    assert texts_of(result.as_numpy("text_output")) == [w["text"] for w in want]
    assert texts_of(result.as_numpy("finish_reason")) == [w["finish_reason"] for w in want]
    assert result.get_response()["model_name"] == MODEL_NAME


def test_shapes_sampling_parameters_input_and_generate(triton, server):
    import tritonclient.http as httpclient

    settings = {"max_tokens": 8, "temperature": 0.8, "seed": 5, "stop": ["\n"]}
    want = completions(server, PROMPTS[0], **settings)["text"]
    sp = httpclient.InferInput("sampling_parameters", [1], "BYTES")
    sp.set_data_from_numpy(np.array([json.dumps(settings).encode()], dtype=np.object_))
    result = triton.infer(MODEL_NAME, [text_input(PROMPTS[:1] * 4, True, [2, 2]), sp], headers=auth())
    texts = result.as_numpy("text_output")
    assert texts.shape == (2, 2) and texts_of(texts) == [want] * 4
    # only the asked-for output comes back
    only = triton.infer(MODEL_NAME, [text_input(PROMPTS[:1], True)], headers=auth(), parameters=settings,
                        outputs=[httpclient.InferRequestedOutput("finish_reason")])
    assert only.as_numpy("text_output") is None and only.as_numpy("finish_reason") is not None
    r = httpx.post(f"{server.url}/v2/models/{MODEL_NAME}/generate", headers=auth(), timeout=120,
                   json={"text_input": PROMPTS[0], "parameters": settings})
    assert r.status_code == 200 and r.json()["text_output"] == want and r.json()["model_name"] == MODEL_NAME
    # generate_stream: text deltas as server-sent events, the finish reason in the last
    events = []
    with httpx.stream("POST", f"{server.url}/v2/models/{MODEL_NAME}/generate_stream", headers=AUTH, timeout=120,
                      json={"text_input": PROMPTS[0], "parameters": {**settings, "stream": True}}) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        for line in s.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert len(events) > 1 and "".join(e["text_output"] for e in events) == want
    assert [e["finish_reason"] for e in events[:-1]] == [None] * (len(events) - 1)
    assert events[-1]["finish_reason"] == r.json()["finish_reason"]


def _json_infer(inputs: list[dict], **extra) -> dict:
    return {"inputs": inputs, **extra}


TEXT = {"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["hello"]}


@pytest.mark.parametrize("path, body, headers, status, needle", [
    ("/v2/models/nope/infer", _json_infer([TEXT]), {}, 404, "does not exist"),
    (f"/v2/models/{MODEL_NAME}/versions/999/infer", _json_infer([TEXT]), {}, 404, "version 999"),
    (f"/v2/models/{MODEL_NAME}/infer", b"{oops", {}, 400, "not JSON"),
    (f"/v2/models/{MODEL_NAME}/infer", _json_infer([]), {}, 400, "non-empty list"),
    (f"/v2/models/{MODEL_NAME}/infer", _json_infer([{**TEXT, "name": "prompt"}]), {}, 400, "unknown input"),
    (f"/v2/models/{MODEL_NAME}/infer", _json_infer([{**TEXT, "datatype": "FP32", "data": [1.0]}]), {}, 400,
     "non-empty BYTES"),
    (f"/v2/models/{MODEL_NAME}/infer", _json_infer([{**TEXT, "datatype": "STRING"}]), {}, 400, "unknown datatype"),
    (f"/v2/models/{MODEL_NAME}/infer", _json_infer([{**TEXT, "datatype": ["BYTES"]}]), {}, 400, "unknown datatype"),
    (f"/v2/models/{MODEL_NAME}/infer", _json_infer([{**TEXT, "parameters": [1]}]), {}, 400, "must be an object"),
    (f"/v2/models/{MODEL_NAME}/infer", b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}, 400,
     "not JSON"),
    (f"/v2/models/{MODEL_NAME}/infer", _json_infer([{**TEXT, "shape": [2]}]), {}, 400, "1 elements for a shape of 2"),
    (f"/v2/models/{MODEL_NAME}/infer", _json_infer([TEXT], parameters={"temprature": 0}), {}, 400,
     "unknown generation parameter"),
    (f"/v2/models/{MODEL_NAME}/infer", _json_infer([TEXT], parameters={"max_tokens": "ten"}), {}, 400, "wrong type"),
    (f"/v2/models/{MODEL_NAME}/infer", _json_infer([TEXT], parameters={"temperature": -1.0}), {}, 400, "temperature"),
    (f"/v2/models/{MODEL_NAME}/infer", _json_infer([TEXT], parameters={"sequence_id": 3}), {}, 400, "sequence_id"),
    (f"/v2/models/{MODEL_NAME}/infer", _json_infer([TEXT], outputs=[{"name": "logits"}]), {}, 400, "unknown output"),
    (f"/v2/models/{MODEL_NAME}/infer", _json_infer([TEXT, {"name": "sampling_parameters", "datatype": "INT32",
                                                           "shape": [1], "data": [3]}]), {}, 400, "one BYTES element"),
    (f"/v2/models/{MODEL_NAME}/infer", _json_infer([TEXT, {"name": "sampling_parameters", "datatype": "BYTES",
                                                           "shape": [1], "data": ["[1]"]}]), {}, 400, "JSON object"),
    (f"/v2/models/{MODEL_NAME}/infer", _json_infer([{**TEXT, "data": ["x" * 40000]}],
                                                   parameters={"max_tokens": 4}), {}, 400, "context"),
    # binary: a header length past the body, data that belongs to no input, a BYTES element cut short
    (f"/v2/models/{MODEL_NAME}/infer", json.dumps(_json_infer([TEXT])).encode(),
     {"Inference-Header-Content-Length": "9999"}, 400, "outside the body"),
    (f"/v2/models/{MODEL_NAME}/infer", json.dumps(_json_infer([TEXT])).encode() + b"junk",
     {"Inference-Header-Content-Length": str(len(json.dumps(_json_infer([TEXT]))))}, 400, "belong to no input"),
    (f"/v2/models/{MODEL_NAME}/infer", None, {}, 400, "runs past its data"),
    (f"/v2/models/{MODEL_NAME}/generate", {"text_input": "", "parameters": {}}, {}, 400, "non-empty string"),
    (f"/v2/models/{MODEL_NAME}/generate", {"text_input": "hi", "max_tokens": 3}, {}, 400, "unknown field"),
    (f"/v2/models/{MODEL_NAME}/generate", {"text_input": "hi", "parameters": {"stream": True}}, {}, 400,
     "use generate_stream"),
    (f"/v2/models/{MODEL_NAME}/generate_stream", {"text_input": "hi", "parameters": {"top_k": "x"}}, {}, 400,
     "wrong type"),
    ("/v2/models/nope/generate_stream", {"text_input": "hi"}, {}, 404, "does not exist"),
])
def test_bad_requests_are_errors_in_the_protocols_shape(triton, server, path, body, headers, status, needle):
    if body is None:  # a binary BYTES input whose element says it is longer than its data
        head = json.dumps(_json_infer([{"name": "text_input", "datatype": "BYTES", "shape": [1],
                                        "parameters": {"binary_data_size": 6}}])).encode()
        body, headers = head + struct.pack("<I", 99) + b"hi", {"Inference-Header-Content-Length": str(len(head))}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server.url}{path}", content=content, timeout=120,
                   headers={**AUTH, "Content-Type": "application/octet-stream" if path.endswith("/infer")
                            else "application/json", **headers})
    assert r.status_code == status, r.text
    assert needle in r.json()["error"], r.json()
    assert triton.is_server_ready()
    ok = triton.infer(MODEL_NAME, [text_input(["still serving"], True)], headers=auth(), parameters={"max_tokens": 2})
    assert ok.as_numpy("text_output").shape == (1,)


def test_metrics_label_kserve_paths_by_template(server):
    from tests.server.conftest import metric

    text = httpx.get(f"{server.url}/metrics", headers=AUTH, timeout=60).text
    assert metric(text, "surge_requests_total", endpoint="/v2/models/{name}/infer", status="200") >= 1
    assert metric(text, "surge_requests_total", endpoint="/v2/models/{name}/infer", status="404") >= 1
    assert "/v2/models/nope" not in text  # a client's model names never become labels


def test_inference_paths_need_the_api_key(server):
    r = httpx.post(f"{server.url}/v2/models/{MODEL_NAME}/infer", json=_json_infer([TEXT]), timeout=60)
    assert r.status_code == 401
    assert httpx.get(f"{server.url}/v2/health/ready", timeout=60).status_code == 200  # health is open


# ---- gRPC -----------------------------------------------------------------------------------

ADMIN = "admin-key"


@pytest.fixture(scope="module")
def grpc_server(tmp_path_factory):
    from tests.server.conftest import free_port, start_server

    port = free_port()
    srv = start_server(tmp_path_factory.mktemp("grpc"), "--api-key", API_KEY, "--admin-key", ADMIN,
                       "--grpc-port", str(port))
    srv.grpc_port = port
    yield srv
    srv.stop()


def grpc_client(srv):
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(url=f"127.0.0.1:{srv.grpc_port}")


def grpc_text(prompts: list[str]):
    import tritonclient.grpc as grpcclient

    tensor = grpcclient.InferInput("text_input", [len(prompts)], "BYTES")
    tensor.set_data_from_numpy(np.array([p.encode() for p in prompts], dtype=np.object_))
    return tensor


def test_grpc_equals_rest(grpc_server):
    from tritonclient.utils import InferenceServerException

    client = grpc_client(grpc_server)
    key = {"authorization": f"Bearer {API_KEY}"}
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata(as_json=True)["name"] == "surge"
    assert client.is_model_ready(MODEL_NAME, headers=key) and not client.is_model_ready("nope", headers=key)
    meta = client.get_model_metadata(MODEL_NAME, headers=key, as_json=True)
    assert [i["name"] for i in meta["inputs"]] == ["text_input", "sampling_parameters"]
    want = [completions(grpc_server, p, max_tokens=10, temperature=0) for p in PROMPTS]
    result = client.infer(MODEL_NAME, [grpc_text(PROMPTS)], headers=key, parameters={"max_tokens": 10,
                                                                                     "temperature": 0.0})
    assert texts_of(result.as_numpy("text_output")) == [w["text"] for w in want]
    assert texts_of(result.as_numpy("finish_reason")) == [w["finish_reason"] for w in want]
    # errors: their status codes, and the server goes on
    cases = [
        (dict(model_name="nope", inputs=[grpc_text(["x"])], headers=key), "NOT_FOUND"),
        (dict(model_name=MODEL_NAME, inputs=[grpc_text(["x"])]), "UNAUTHENTICATED"),
        (dict(model_name=MODEL_NAME, inputs=[grpc_text(["x"])], headers=key, parameters={"temprature": 1}),
         "INVALID_ARGUMENT"),
        (dict(model_name=MODEL_NAME, inputs=[grpc_text(["x"])], headers=key, model_version="999"), "NOT_FOUND"),
    ]
    for kwargs, code in cases:
        with pytest.raises(InferenceServerException) as err:
            client.infer(**kwargs)
        assert code in str(err.value.status()), err.value
    assert client.infer(MODEL_NAME, [grpc_text(["still"])], headers=key,
                        parameters={"max_tokens": 2}).as_numpy("text_output").shape == (1,)


def test_grpc_repository_calls_take_the_admin_key(grpc_server):
    from tritonclient.utils import InferenceServerException

    client = grpc_client(grpc_server)
    admin = {"authorization": f"Bearer {ADMIN}"}
    index = client.get_model_repository_index(headers=admin, as_json=True)
    assert [m["name"] for m in index["models"]] == [MODEL_NAME] and index["models"][0]["state"] == "READY"
    with pytest.raises(InferenceServerException) as err:
        client.get_model_repository_index(headers={"authorization": f"Bearer {API_KEY}"})
    assert "UNAUTHENTICATED" in str(err.value.status())
    with pytest.raises(InferenceServerException) as err:
        client.load_model("nope", headers=admin)
    assert "NOT_FOUND" in str(err.value.status()) and "nope" in err.value.message(), err.value
    with pytest.raises(InferenceServerException) as err:
        client.load_model(MODEL_NAME, headers=admin, config="{}")  # Triton's config override: not supported
    assert "INVALID_ARGUMENT" in str(err.value.status()) and "config" in err.value.message(), err.value
    assert client.is_server_ready()


def test_a_grpc_port_in_use_stops_the_start_with_a_clear_error(tmp_path, grpc_server):
    from tests.server.conftest import start_server

    with pytest.raises(RuntimeError) as err:
        start_server(tmp_path, "--grpc-port", str(grpc_server.grpc_port))
    assert f"--grpc-port {grpc_server.grpc_port}: cannot listen" in str(err.value)


def test_grpc_stream_infer_streams_text_deltas(grpc_server):
    import queue

    client = grpc_client(grpc_server)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)),
                        headers={"authorization": f"Bearer {API_KEY}"})
    try:
        want = completions(grpc_server, PROMPTS[1], max_tokens=12, temperature=0)
        settings = {"max_tokens": 12, "temperature": 0.0}
        client.async_stream_infer(MODEL_NAME, [grpc_text([PROMPTS[1]])], request_id="s1",
                                  parameters={**settings, "stream": True}, enable_empty_final_response=True)
        deltas, finals = [], []
        while True:
            result, error = results.get(timeout=120)
            assert error is None, error
            response = result.get_response()
            final = response.parameters["triton_final_response"].bool_param
            if result.as_numpy("text_output") is not None:
                deltas.append(texts_of(result.as_numpy("text_output"))[0])
                finals.append(texts_of(result.as_numpy("finish_reason"))[0])
            if final:
                break
        assert len(deltas) > 1 and "".join(deltas) == want["text"] and finals[-1] == want["finish_reason"]
        assert response.id == "s1" and result.as_numpy("text_output") is None  # the empty final response
        # a bad request on the stream is an error there; the stream goes on with the next
        client.async_stream_infer(MODEL_NAME, [grpc_text(["x", "y"])], parameters={"stream": True})
        result, error = results.get(timeout=120)
        assert result is None and "one prompt" in str(error)
        client.async_stream_infer(MODEL_NAME, [grpc_text([PROMPTS[1]])], parameters=settings)  # not streamed
        result, error = results.get(timeout=120)
        assert error is None and texts_of(result.as_numpy("text_output")) == [want["text"]]
        assert result.get_response().parameters["triton_final_response"].bool_param
    finally:
        client.stop_stream()
