"""server/kserve_tensor.py on a fake backend: the statuses a tensor model's request can end
with (400 bad tensors or parameters, 429 a full queue, 503 a queue timeout or an unload, 400 /
500 the model failing on a request) and outputs in the order asked for."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from surge.server.kserve_codec import InferRequest, KServeError
from surge.server.kserve_tensor import infer, metadata
from surge.server.repository import TensorDeployment
from surge.tensor.config import TensorSpec, tensor_config
from surge.tensor.model import TensorModel


class Backend:
    platform = "fake"
    memory_bytes = 0
    inputs = (TensorSpec("x", "FP32", (2,)),)
    outputs = (TensorSpec("double", "FP32", (2,)), TensorSpec("total", "FP64", ()))
    max_batch_size = 4

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def run(self, instance: int, inputs: dict) -> dict:
        self.entered.set()
        assert self.gate.wait(10)
        x = inputs["x"]
        if np.isnan(x).any():
            raise ValueError("NaN in the input")
        if np.isinf(x).any():
            raise RuntimeError("the kernel crashed")
        return {"double": x * 2, "total": x.sum(axis=1).astype(np.float64)}

    def close(self) -> None:
        pass


@pytest.fixture
def deployment():
    backend = Backend()
    model = TensorModel(backend, tensor_config({"max_queue_size": 1}, "onnxruntime", "test"))
    yield TensorDeployment("fake", "3", model, 0)
    backend.gate.set()
    model.close()


def request(x, **parameters) -> InferRequest:
    return InferRequest({"x": np.asarray(x, dtype=np.float32)}, parameters)


def status(deployment, req) -> tuple[int, str]:
    with pytest.raises(KServeError) as info:
        asyncio.run(infer(deployment, req, 1))
    return info.value.status, info.value.message


def test_outputs_in_the_order_asked_for(deployment):
    outs = asyncio.run(infer(deployment, request([[1, 2]]), 1))
    assert [(n, d) for n, d, _ in outs] == [("double", "FP32"), ("total", "FP64")]
    req = request([[1, 2], [3, 4]])
    req.outputs = [{"name": "total"}]
    ((name, datatype, total),) = asyncio.run(infer(deployment, req, 1))
    assert name == "total" and total.tolist() == [3.0, 7.0]
    assert metadata(deployment)["versions"] == ["3"] and metadata(deployment)["inputs"][0]["shape"] == [-1, 2]


def test_bad_requests_are_400(deployment):
    assert status(deployment, request([[1, 2, 3]]))[0] == 400
    assert status(deployment, request([[1, 2]] * 5))[1].endswith("this model takes 1 to 4 (max_batch_size)")
    assert "sequence_id" in status(deployment, request([[1, 2]], sequence_id=3))[1]
    assert "'timeout'" in status(deployment, request([[1, 2]], timeout=-1))[1]


def test_model_failures_name_whose_fault(deployment):
    assert status(deployment, request([[np.nan, 1]])) == (400, "the model rejected the request: ValueError: NaN "
                                                              "in the input")
    assert status(deployment, request([[np.inf, 1]]))[0] == 500
    assert asyncio.run(infer(deployment, request([[1, 1]]), 1))[1][2].tolist() == [2.0]


def test_full_queue_is_429_and_a_queue_timeout_503(deployment):
    backend = deployment.model.backend
    backend.gate.clear()

    async def scenario() -> list:
        running = asyncio.ensure_future(infer(deployment, request([[1, 1]]), 1))
        while not backend.entered.is_set():
            await asyncio.sleep(0.01)
        timed = asyncio.ensure_future(infer(deployment, request([[2, 2]], timeout=20_000), 1))
        await asyncio.sleep(0.01)
        results = []
        for coro in (infer(deployment, request([[3, 3]]), 7),):
            try:
                await coro
            except KServeError as exc:
                results.append((exc.status, exc.headers))
        try:
            await timed
        except KServeError as exc:
            results.append((exc.status, None))
        backend.gate.set()
        results.append((await running)[1][2].tolist())
        return results

    full, timeout, first = asyncio.run(scenario())
    assert full == (429, {"Retry-After": "7"})
    assert timeout == (503, None)
    assert first == [2.0]


def test_unloaded_model_is_503(deployment):
    deployment.close()
    assert status(deployment, request([[1, 2]]))[0] == 503
