"""Tensor models served beside the default LLM by one `surge serve --model-repository`: a BERT
classifier and a conv vision model, each as ONNX and as TorchScript, reached with the real
tritonclient over http and grpc. Metadata, outputs equal to onnxruntime / torch run directly
(1e-5), 64 concurrent single requests batched, a new ONNX version hot-reloaded under load with
no failed request, and bad input on REST and gRPC answered with the protocol's errors while the
server goes on serving."""

from __future__ import annotations

import base64
import json
import os
import threading
import time

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from tests.server.conftest import chromium_or_skip, free_port, launch, metric, put
from tests.tensor.builders import bert_inputs, export, export_encoder, reference, vision_inputs

ADMIN = {"Authorization": "Bearer admin-secret"}
MODELS = {"bert": ("bert", "onnx"), "bert_ts": ("bert", "ts"), "vision": ("vision", "onnx"),
          "vision_ts": ("vision", "ts")}
INPUTS = {"bert": bert_inputs, "vision": vision_inputs}
OUTPUT = {"bert": "logits", "vision": "scores"}


@pytest.fixture(scope="module")
def served(tmp_path_factory, default_gguf_path, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("tensor_repo")
    staging = tmp_path_factory.mktemp("tensor_models")
    (root / "smollm2" / "1").mkdir(parents=True)
    os.symlink(default_gguf_path, root / "smollm2" / "1" / "model.gguf")
    refs = {}
    for kind in ("bert", "vision"):
        refs[kind] = export(kind, 0, staging / f"{kind}_onnx", staging / f"{kind}_ts")
        put(root, kind, 1, staging / f"{kind}_onnx")
        put(root, f"{kind}_ts", 1, staging / f"{kind}_ts")
    for version in (1, 2):  # the hot-reload model: version 2 is copied in by its test
        refs[f"reload{version}"] = export("vision", 10 + version, staging / f"reload{version}")
    put(root, "reload", 1, staging / "reload1")
    refs["encoder"] = export_encoder(3, tiny_tokenizer_dir, staging / "encoder")
    put(root, "encoder", 1, staging / "encoder")
    srv_tokenizer = tiny_tokenizer_dir / "tokenizer.json"
    grpc_port = free_port()
    srv = launch(tmp_path_factory.mktemp("tensor_server"), "--model-repository", str(root), "--grpc-port",
                 str(grpc_port), "--admin-key", "admin-secret", "--repository-poll-interval", "0.3",
                 "--log-level", "warning")
    srv.grpc_port, srv.root, srv.refs, srv.staging, srv.tokenizer = grpc_port, root, refs, staging, srv_tokenizer
    yield srv
    srv.stop()


def http_client(srv):
    """A tritonclient http client: one per thread (it is not thread-safe)."""
    import tritonclient.http as httpclient

    return httpclient.InferenceServerClient(url=srv.url.removeprefix("http://"), network_timeout=60)


def grpc_client(srv):
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(url=f"127.0.0.1:{srv.grpc_port}")


def tensors(module, inputs: dict[str, np.ndarray], binary: bool = True) -> list:
    out = []
    for name, value in inputs.items():
        t = module.InferInput(name, list(value.shape), "INT64" if value.dtype == np.int64 else "FP32")
        if module.__name__.endswith("http"):
            t.set_data_from_numpy(value, binary_data=binary)
        else:
            t.set_data_from_numpy(value)
        out.append(t)
    return out


def direct(srv, model: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The model run directly: onnxruntime on the served file, or torch on the module."""
    kind, form = MODELS[model]
    if form == "onnx":
        session = ort.InferenceSession(str(srv.root / model / "1" / "model.onnx"))
        return session.run(None, inputs)[0]
    return reference(srv.refs[kind], inputs)


def test_metadata_over_http_and_grpc(served):
    bert_in = [{"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
               {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1]}]
    expected = {
        "bert": ("onnxruntime_onnx", bert_in, [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]}]),
        "bert_ts": ("pytorch_libtorch", bert_in, [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]}]),
        "vision": ("onnxruntime_onnx", [{"name": "pixels", "datatype": "FP32", "shape": [-1, 3, 32, 32]}],
                   [{"name": "scores", "datatype": "FP32", "shape": [-1, 10]}]),
        "vision_ts": ("pytorch_libtorch", [{"name": "pixels", "datatype": "FP32", "shape": [-1, 3, 32, 32]}],
                      [{"name": "scores", "datatype": "FP32", "shape": [-1, 10]}]),
    }
    http, grpc = http_client(served), grpc_client(served)
    for model, (platform, inputs, outputs) in expected.items():
        for meta in (http.get_model_metadata(model), grpc.get_model_metadata(model, as_json=True)):
            assert meta["name"] == model and meta["versions"] == ["1"] and meta["platform"] == platform
            assert [{**i, "shape": [int(d) for d in i["shape"]]} for i in meta["inputs"]] == inputs, model
            assert [{**o, "shape": [int(d) for d in o["shape"]]} for o in meta["outputs"]] == outputs, model
        assert http.is_model_ready(model) and grpc.is_model_ready(model)
        assert http.is_model_ready(model, model_version="1") and not http.is_model_ready(model, model_version="2")
    assert [i["name"] for i in http.get_model_metadata("smollm2")["inputs"]] == ["text_input", "sampling_parameters"]


@pytest.mark.parametrize("model", sorted(MODELS))
def test_outputs_equal_the_runtimes(served, model):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    kind, _ = MODELS[model]
    rng = np.random.default_rng(7)
    http, grpc = http_client(served), grpc_client(served)
    for rows in (1, 3):
        inputs = INPUTS[kind](rng, rows)
        want = direct(served, model, inputs)
        np.testing.assert_allclose(want, reference(served.refs[kind], inputs), atol=1e-5, rtol=0)
        for binary in (True, False):
            outputs = [httpclient.InferRequestedOutput(OUTPUT[kind], binary_data=binary)]
            got = http.infer(model, tensors(httpclient, inputs, binary), outputs=outputs).as_numpy(OUTPUT[kind])
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        got = grpc.infer(model, tensors(grpcclient, inputs)).as_numpy(OUTPUT[kind])
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_the_llm_is_served_beside_and_the_openai_routes_name_the_difference(served):
    listed = httpx.get(f"{served.url}/v1/models", timeout=10).json()["data"]
    assert [m["id"] for m in listed] == ["encoder", "smollm2"]  # the encoder serves /v1/embeddings
    r = httpx.post(f"{served.url}/v1/completions", json={"model": "smollm2", "prompt": "Hello", "max_tokens": 4},
                   timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    r = httpx.post(f"{served.url}/v1/completions", json={"model": "bert", "prompt": "Hello"}, timeout=10)
    assert r.status_code == 400 and "/v2/models/bert/infer" in r.json()["error"]["message"]
    r = httpx.post(f"{served.url}/v2/models/vision/generate", json={"text_input": "hi"}, timeout=10)
    assert r.status_code == 400 and "onnxruntime model" in r.json()["error"]
    index = {(row["name"], row["version"]): row for row in
             httpx.get(f"{served.url}/v2/repository/index", headers=ADMIN, timeout=10).json()}
    assert index[("bert", "1")]["state"] == "READY" and index[("bert", "1")]["memory_bytes"] > 0


def test_64_concurrent_requests_are_batched_and_each_equals_its_own_result(served):
    import tritonclient.http as httpclient

    before = httpx.get(f"{served.url}/metrics", timeout=10).text
    rng = np.random.default_rng(11)
    requests = [bert_inputs(rng, 1) for _ in range(64)]  # lengths 3..15: padded to batch together
    session = ort.InferenceSession(str(served.root / "bert" / "1" / "model.onnx"))
    # the client's own concurrency (one client is not for several threads): 64 requests in flight at once
    client = httpclient.InferenceServerClient(url=served.url.removeprefix("http://"), network_timeout=60,
                                              concurrency=64)
    pending = [client.async_infer("bert", tensors(httpclient, r)) for r in requests]
    results = [p.get_result().as_numpy("logits") for p in pending]
    for inputs, got in zip(requests, results):
        assert got is not None
        np.testing.assert_allclose(got, session.run(None, inputs)[0], atol=1e-5, rtol=0)
    after = httpx.get(f"{served.url}/metrics", timeout=10).text
    count = lambda text, suffix: metric(text, f"surge_batch_size_{suffix}", model="bert") or 0.0  # noqa: E731
    batches, rows = count(after, "count") - count(before, "count"), count(after, "sum") - count(before, "sum")
    assert rows == 64 and batches < 64, (batches, rows)
    single = metric(after, "surge_batch_size_bucket", model="bert", le="1.0") - \
        (metric(before, "surge_batch_size_bucket", model="bert", le="1.0") or 0.0)
    assert single < batches  # some batches held more than one request
    assert metric(after, "surge_queue_time_seconds_count", model="bert") >= 64


def _bad_rest_cases(url: str) -> list[tuple[str, bytes, dict, int, str]]:
    ids = np.ones((1, 4), dtype=np.int64)

    def body(inputs: list[dict]) -> bytes:
        return json.dumps({"inputs": inputs}).encode()

    good_ids = {"name": "input_ids", "datatype": "INT64", "shape": [1, 4], "data": ids.ravel().tolist()}
    mask = {**good_ids, "name": "attention_mask"}
    nine = {"datatype": "INT64", "shape": [9, 4], "data": [1] * 36}
    header = json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 3, 32, 32],
                                     "parameters": {"binary_data_size": 12288}}]}).encode()
    return [
        ("bert", body([{**good_ids, "name": "token_ids"}, mask]), {}, 400, "unknown input(s) token_ids"),
        ("bert", body([{**good_ids, "datatype": "INT32"}, mask]), {}, 400, "is INT32; the model takes INT64"),
        ("bert", body([{**good_ids, "data": [1.5, 2, 3, 4]}, mask]), {}, 400, "INT64 data must be integers"),
        ("bert", body([{**good_ids, "data": [1, 2, 3]}, mask]), {}, 400, "3 elements for a shape of 4"),
        ("vision", body([{"name": "pixels", "datatype": "FP32", "shape": [1, 3, 16, 16], "data": [0.0] * 768}]),
         {}, 400, "has shape [1, 3, 16, 16]; the model takes [-1, 3, 32, 32]"),
        ("bert", body([{**nine, "name": "input_ids"}, {**nine, "name": "attention_mask"}]), {}, 400,
         "batch size 9; this model takes 1 to 8"),
        ("vision", header + b"\0" * 100, {"Inference-Header-Content-Length": str(len(header)),
                                          "Content-Type": "application/octet-stream"}, 400, "'pixels'"),
        ("nope", body([good_ids]), {}, 404, "does not exist"),
        ("bert/versions/7", body([good_ids, mask]), {}, 404, "version 7"),
    ]


def test_bad_input_over_rest_and_the_server_goes_on(served):
    for model, data, headers, status, message in _bad_rest_cases(served.url):
        r = httpx.post(f"{served.url}/v2/models/{model}/infer", content=data,
                       headers={"Content-Type": "application/json", **headers}, timeout=30)
        assert r.status_code == status, (model, r.text)
        assert message in r.json()["error"], (model, r.text)
        ok = httpx.post(f"{served.url}/v2/models/vision/infer", timeout=30, json={"inputs": [
            {"name": "pixels", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.5] * 3072}]})
        assert ok.status_code == 200 and ok.json()["outputs"][0]["shape"] == [1, 10]


def test_bad_input_over_grpc_and_the_server_goes_on(served):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpc_client(served)
    rng = np.random.default_rng(3)
    good = bert_inputs(rng, 1)
    wrong_dtype = tensors(grpcclient, good)
    wrong_dtype[0] = grpcclient.InferInput("input_ids", [1, good["input_ids"].shape[1]], "INT32")
    wrong_dtype[0].set_data_from_numpy(good["input_ids"].astype(np.int32))
    cases = [
        ("bert", tensors(grpcclient, {"token_ids": good["input_ids"], "attention_mask": good["attention_mask"]}),
         "", "INVALID_ARGUMENT", "unknown input(s) token_ids"),
        ("bert", wrong_dtype, "", "INVALID_ARGUMENT", "is INT32"),
        ("vision", tensors(grpcclient, {"pixels": np.zeros((1, 3, 8, 8), np.float32)}), "", "INVALID_ARGUMENT",
         "has shape [1, 3, 8, 8]"),
        ("vision", tensors(grpcclient, vision_inputs(rng, 9)), "", "INVALID_ARGUMENT", "batch size 9"),
        ("nope", tensors(grpcclient, good), "", "NOT_FOUND", "does not exist"),
        ("bert", tensors(grpcclient, good), "5", "NOT_FOUND", "version 5"),
    ]
    for model, inputs, version, code, message in cases:
        with pytest.raises(InferenceServerException) as info:
            client.infer(model, inputs, model_version=version)
        assert info.value.status() == f"StatusCode.{code}" and message in info.value.message(), (model, info.value)
        assert client.infer("bert", tensors(grpcclient, good)).as_numpy("logits").shape == (1, 3)
    # a malformed raw tensor: fewer bytes than the shape needs
    short = grpcclient.InferInput("pixels", [1, 3, 32, 32], "FP32")
    short._raw_content = b"\0" * 64
    with pytest.raises(InferenceServerException) as info:
        client.infer("vision", [short])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT", info.value


def test_hot_reload_of_a_new_onnx_version_under_load(served):
    import tritonclient.http as httpclient

    rng = np.random.default_rng(5)
    probe = vision_inputs(rng, 1)
    want = {v: reference(served.refs[f"reload{v}"], probe) for v in ("1", "2")}
    assert not np.allclose(want["1"], want["2"], atol=1e-3)
    failures, answers, stop = [], [], threading.Event()

    def hammer() -> None:
        client = http_client(served)
        while not stop.is_set():
            try:
                result = client.infer("reload", tensors(httpclient, probe))
                answers.append((result.get_response()["model_version"], result.as_numpy("scores")))
            except Exception as exc:  # noqa: BLE001 - every failure counts
                failures.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        put(served.root, "reload", 2, served.staging / "reload2")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            rows = {(r["name"], r["version"]): r for r in
                    httpx.get(f"{served.url}/v2/repository/index", headers=ADMIN, timeout=10).json()}
            if rows.get(("reload", "2"), {}).get("serving") and rows[("reload", "1")]["state"] == "UNAVAILABLE":
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"version 2 not serving: {rows}")
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not failures, failures[:3]
    versions = [v for v, _ in answers]
    assert "1" in versions and versions[-1] == "2"
    for version, scores in answers:
        np.testing.assert_allclose(scores, want[version], atol=1e-5, rtol=0)


def test_dashboard_shows_the_batcher(served):
    """/dashboard/data gives a tensor model its batch sizes and queue times; the page draws them."""
    import tritonclient.http as httpclient
    from playwright.sync_api import sync_playwright

    browser_path = chromium_or_skip()
    stop = threading.Event()
    rng = np.random.default_rng(9)
    probes = [vision_inputs(rng, 1) for _ in range(16)]

    def load() -> None:  # 16 requests in flight at a time on the vision model
        client = httpclient.InferenceServerClient(url=served.url.removeprefix("http://"), concurrency=16)
        while not stop.is_set():
            for pending in [client.async_infer("vision", tensors(httpclient, p)) for p in probes]:
                pending.get_result()

    thread = threading.Thread(target=load, daemon=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1200})
            page.goto(f"{served.url}/dashboard")
            thread.start()
            for chart, least in (("requests", 0), ("batch", 1), ("queue_time", 0)):
                page.wait_for_function(
                    "([c, least]) => { const b = document.querySelector(`section[data-model='vision'] "
                    "[data-chart='${c}']`); return b && Number(b.dataset.max) > least; }",
                    arg=[chart, least], timeout=60_000)
            assert page.query_selector("section[data-model='vision'] [data-chart='tokens']") is None
        finally:
            stop.set()
            thread.join(30)
            browser.close()
    data = httpx.get(f"{served.url}/dashboard/data", timeout=10).json()
    assert data["kinds"]["vision"] == "tensor" and data["kinds"]["smollm2"] == "llm"
    assert max(v for v in data["models"]["vision"]["batch_size_max"] if v is not None) > 1


TEXTS = ["The quick brown fox", "Hello, world. How are you today?", "def main(argv):\n    return 1",
         "Numbers 12345 and 3.14159", "I am fine, thanks for asking."]


def encoder_reference(served, text: str) -> np.ndarray:
    """transformers' BertModel on the same token ids: the mean of the last hidden state, L2-normalised."""
    import torch
    from tokenizers import Tokenizer

    ids = torch.tensor([Tokenizer.from_file(str(served.tokenizer)).encode(text).ids])
    with torch.inference_mode():
        hidden = served.refs["encoder"].bert(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
    vector = hidden.double().mean(dim=0).numpy()
    return vector / np.linalg.norm(vector)


def test_encoder_embeddings_with_the_openai_client(served):
    from openai import OpenAI

    client = OpenAI(base_url=f"{served.url}/v1", api_key="unused")
    want = {t: encoder_reference(served, t) for t in TEXTS}
    for text in TEXTS[:2]:
        got = np.array(client.embeddings.create(model="encoder", input=text).data[0].embedding)
        assert float(got @ want[text]) > 0.9999
        np.testing.assert_allclose(got, want[text], atol=1e-5, rtol=0)
    before = httpx.get(f"{served.url}/metrics", timeout=10).text
    batch = [TEXTS[i % len(TEXTS)] + " " * (i // len(TEXTS)) + "x" * (i % 7) for i in range(32)]
    alone = {t: np.array(client.embeddings.create(model="encoder", input=t).data[0].embedding) for t in set(batch)}
    reply = client.embeddings.create(model="encoder", input=batch, encoding_format="base64")
    assert [d.index for d in reply.data] == list(range(32)) and reply.usage.prompt_tokens > 32
    for text, d in zip(batch, reply.data):  # asked for explicitly, base64 comes back undecoded
        np.testing.assert_allclose(np.frombuffer(base64.b64decode(d.embedding), "<f4"), alone[text], atol=1e-5, rtol=0)
    after = httpx.get(f"{served.url}/metrics", timeout=10).text
    batches = metric(after, "surge_batch_size_count", model="encoder") - metric(before, "surge_batch_size_count",
                                                                                model="encoder")
    rows = metric(after, "surge_batch_size_sum", model="encoder") - metric(before, "surge_batch_size_sum",
                                                                          model="encoder")
    assert rows == 32 + len(set(batch)) and batches < rows  # the 32 inputs shared batches


def test_encoder_embedding_errors(served):
    cases = [
        ({"model": "encoder", "input": "hello " * 80}, "takes at most 64"),
        ({"model": "encoder", "input": [[1, 2, 100000]]}, "outside the vocabulary"),
        ({"model": "encoder", "input": "hi", "pooling": "last"}, "pools as its [embedding] table says (mean)"),
        ({"model": "encoder", "input": "hi", "dimensions": 8}, "embedding size, 48"),
        ({"model": "bert", "input": "hi"}, "without an [embedding] table"),
        ({"model": "nope", "input": "hi"}, "does not exist"),
    ]
    for body, message in cases:
        r = httpx.post(f"{served.url}/v1/embeddings", json=body, timeout=30)
        assert r.status_code in (400, 404) and message in r.json()["error"]["message"], (body, r.text)
    r = httpx.post(f"{served.url}/v1/embeddings", json={"model": "encoder", "input": "hi"}, timeout=30)
    assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 48
