"""The served tensor models (onnxruntime, torch: surge/tensor/) as KServe v2 models, apart from
the transport: REST (server/routes/kserve.py) and gRPC (server/grpc_service.py) reach them
through server/kserve_llm.py's dispatch.

A request's tensors are checked against the model's inputs (names, datatypes, shapes, batch
size) before they queue; then the dynamic batcher runs them with other requests. Errors are
KServeError: 400 for bad tensors or parameters, 429 when the model's queue is full, 503 when a
request timed out in the queue or the version is being unloaded, 400 or 500 when the model
itself fails on the request (its runtime says which).
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from surge.server.kserve_codec import InferRequest, KServeError
from surge.server.repository import TensorDeployment
from surge.tensor.batcher import BatcherClosedError, QueueFullError, QueueTimeoutError
from surge.tensor.config import datatype_of
from surge.tensor.model import InferInputError

# Triton's request parameters a tensor model honours; any other is refused by name
PARAMETERS = {"binary_data_output", "timeout", "priority"}


def metadata(deployment: TensorDeployment) -> dict[str, Any]:
    return {"name": deployment.name, "versions": [deployment.version], **deployment.model.metadata()}


def _timeout(parameters: dict[str, Any]) -> int | None:
    timeout = parameters.get("timeout")
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 0:
        raise KServeError(400, "parameter 'timeout' must be a non-negative integer (microseconds)")
    return timeout or None


def _model_failure(exc: BaseException) -> KServeError:
    """A model that raised on a request: the runtime's invalid-argument errors are the request's fault."""
    kind = type(exc).__name__
    if "InvalidArgument" in kind or isinstance(exc, (IndexError, ValueError)):
        return KServeError(400, f"the model rejected the request: {kind}: {exc}")
    return KServeError(500, f"the model failed on the request: {kind}: {exc}")


async def infer(deployment: TensorDeployment, request: InferRequest, retry_after: int
                ) -> list[tuple[str, str, np.ndarray]]:
    """The outputs (name, datatype, array) the request asks for, in its order (all, in the
    model's order, when it names none)."""
    unknown = set(request.parameters) - PARAMETERS
    if unknown:
        raise KServeError(400, f"request parameter(s) not supported by this model: {', '.join(sorted(unknown))} "
                          f"(supported: {', '.join(sorted(PARAMETERS))})")
    model = deployment.model
    wanted = [o["name"] for o in request.outputs] if request.outputs else None
    try:
        model.check(request.inputs, wanted)
    except InferInputError as exc:
        raise KServeError(400, str(exc)) from None
    (result,) = await run(deployment, [request.inputs], _timeout(request.parameters), retry_after)
    names = wanted or [s.name for s in model.outputs]
    return [(n, datatype_of(result[n].dtype), result[n]) for n in names]


async def run(deployment: TensorDeployment, requests: list[dict[str, np.ndarray]], timeout_us: int | None,
              retry_after: int) -> list[dict[str, np.ndarray]]:
    """Each checked request's outputs, all queued at once on the model's batcher (so they can
    share batches); cancelling the caller withdraws those not yet running. KServeError: 429 the
    queue is full, 503 a queue timeout or an unload, 400 / 500 the model failing on a request."""
    futures = []
    try:
        for inputs in requests:
            futures.append(deployment.model.submit(inputs, timeout_us))
        return list(await asyncio.gather(*[asyncio.wrap_future(f) for f in futures]))
    except QueueFullError as exc:
        raise KServeError(429, f"{deployment.key} is at capacity: {exc}; retry later",
                          {"Retry-After": str(retry_after)}) from None
    except QueueTimeoutError as exc:
        raise KServeError(503, f"{deployment.key}: {exc}") from None
    except BatcherClosedError as exc:
        raise KServeError(503, f"{deployment.key}: {exc}; retry") from None
    except Exception as exc:  # noqa: BLE001 - the model's own failure on this request
        raise _model_failure(exc) from None
    finally:
        for f in futures:
            f.cancel()  # those still queued: the caller went away, or another one failed or was refused
