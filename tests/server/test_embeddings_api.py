"""/v1/embeddings through the openai client against `surge serve` (the default model in float32):
vectors equal the engine's own (LLM.embed on the same weights, itself equal to transformers in
tests/engine/test_embeddings.py), alone and in a batch of 32; every input form; float and base64;
usage; bad input a 400 in OpenAI's shape, the server serving after each."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
from openai import OpenAI

from tests.server.conftest import API_KEY, MODEL_NAME

TEXTS = ["The capital of France is Paris.", "def add(a, b):\n    return a + b\n", "Embeddings map text to vectors."]
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def post(server, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/embeddings", json={"model": MODEL_NAME, **body}, headers=HEADERS, timeout=120)


def test_vectors_equal_the_engine_alone_and_in_a_batch(client, default_llm):
    for pooling in ("last", "mean"):
        want = np.array(default_llm.embed(TEXTS, pooling=pooling))
        alone = [client.embeddings.create(model=MODEL_NAME, input=t, extra_body={"pooling": pooling}).data[0].embedding
                 for t in TEXTS]
        np.testing.assert_allclose(np.array(alone), want, atol=1e-5)
        batch = TEXTS * 10 + TEXTS[:2]  # 32 inputs in one request
        r = client.embeddings.create(model=MODEL_NAME, input=batch, extra_body={"pooling": pooling})
        assert [d.index for d in r.data] == list(range(32))
        got = np.array([d.embedding for d in r.data])
        np.testing.assert_allclose(got, np.array([want[i % 3] for i in range(32)]), atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # the server's default pooling is the last token's
    default = client.embeddings.create(model=MODEL_NAME, input=TEXTS[0]).data[0].embedding
    np.testing.assert_allclose(default, default_llm.embed([TEXTS[0]], pooling="last")[0], atol=1e-5)


def test_input_forms_encodings_and_usage(server, default_llm):
    ids = [default_llm.tokenizer.encode(t) for t in TEXTS]
    as_text = post(server, {"input": TEXTS, "encoding_format": "float"}).json()
    as_ids = post(server, {"input": ids}).json()
    one_ids = post(server, {"input": ids[0]}).json()
    assert as_text["object"] == "list" and as_text["model"] == MODEL_NAME
    assert as_text["usage"] == {"prompt_tokens": sum(map(len, ids)), "total_tokens": sum(map(len, ids))}
    vectors = [d["embedding"] for d in as_text["data"]]
    # the same prompts as token ids (batched differently: equal to float32 rounding)
    np.testing.assert_allclose([d["embedding"] for d in as_ids["data"]], vectors, atol=1e-5)
    np.testing.assert_allclose(one_ids["data"][0]["embedding"], vectors[0], atol=1e-5)
    packed = post(server, {"input": TEXTS, "encoding_format": "base64"}).json()
    decoded = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in packed["data"]]
    np.testing.assert_array_equal(np.array(decoded), np.array(vectors, dtype=np.float32))
    size = len(vectors[0])
    assert post(server, {"input": "x", "dimensions": size}).status_code == 200


@pytest.mark.parametrize("body, param, needle", [
    ({"input": []}, None, "must not be an empty list"),
    ({"input": ""}, None, "at least 1 character"),
    ({"input": ["a", ""]}, None, "may be empty"),
    ({"input": [[5, 6], []]}, None, "may be empty"),
    ({"input": [1, 10**9]}, "input", "outside the vocabulary"),
    ({"input": [5] * 100_000}, "input", "context"),
    ({"input": "x", "dimensions": 64}, "dimensions", "embedding size"),
    ({"input": "x", "encoding_format": "int8"}, None, "encoding_format"),
    ({"input": "x", "pooling": "max"}, None, "pooling"),
    ({"input": "x", "truncate": True}, None, "truncate"),
    ({"input": ["x"] * 257}, "input", "--max-prompts"),
])
def test_bad_input_is_a_400(server, client, body, param, needle):
    r = post(server, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert needle in error["message"] and error["type"] == "invalid_request_error", error
    if param is not None:
        assert error["param"] == param, error
    assert len(client.embeddings.create(model=MODEL_NAME, input="still serving").data[0].embedding) > 0
