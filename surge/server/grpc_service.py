"""The KServe v2 protocol over gRPC (`inference.GRPCInferenceService`, Triton's standard
grpc_service.proto, whose generated bindings `tritonclient[grpc]` ships), on `--grpc-port`, in
the server's event loop: ServerLive, ServerReady, ServerMetadata, ModelReady, ModelMetadata,
ModelInfer and ModelStreamInfer (what REST answers, server/kserve_llm.py; streamed text deltas)
and the repository calls RepositoryIndex, RepositoryModelLoad and RepositoryModelUnload (the
control API's). Keys as on REST, from the
`authorization` metadata: the API key for the model calls, the admin key for the repository ones.
Errors are gRPC status codes with the message REST would give.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import numpy as np

from surge.errors import InvalidArgumentError, SurgeError
from surge.sampling_params import RequestOutputKind
from surge.server import kserve_llm
from surge.server.guard import key_matches
from surge.server.kserve_codec import (DTYPES, InferRequest, ProtocolError, array_from_raw, check_tensor,
                                       to_raw)
from surge.server.kserve_llm import KServeError
from surge.server.state import ServerState

try:  # the optional extra: pip install "surge[grpc]"
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc
except ImportError:  # pragma: no cover - checked at start with a clear message
    grpc = pb = pb_grpc = None

# HTTP statuses as gRPC codes
_CODES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
          408: "DEADLINE_EXCEEDED", 409: "ABORTED", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED",
          500: "INTERNAL", 503: "UNAVAILABLE", 507: "RESOURCE_EXHAUSTED"}
# where a tensor's values sit in InferTensorContents, per datatype
_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
             "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
             "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
             "FP64": "fp64_contents", "BYTES": "bytes_contents"}


def require_grpc() -> None:
    if grpc is None:
        raise InvalidArgumentError('--grpc-port needs the gRPC extra: pip install "surge[grpc]"')


def _parameters(params: Any) -> dict[str, Any]:
    out = {}
    for key, value in params.items():
        kind = value.WhichOneof("parameter_choice")
        out[key] = getattr(value, kind) if kind is not None else None
    return out


def infer_request(request: Any) -> InferRequest:
    """A ModelInferRequest as the protocol's InferRequest (raw contents or typed contents)."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise ProtocolError(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    if not request.inputs:
        raise ProtocolError("'inputs' must be a non-empty list")
    inputs: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        name, shape = tensor.name, list(tensor.shape)
        if name in inputs:
            raise ProtocolError(f"input '{name}' is given twice")
        count = check_tensor(name, tensor.datatype, shape)
        if raw:
            array = array_from_raw(raw[i], tensor.datatype, count, name)
        else:
            values = list(getattr(tensor.contents, _CONTENTS[tensor.datatype]))
            if len(values) != count:
                raise ProtocolError(f"input '{name}': {len(values)} elements for a shape of {count}")
            array = np.array(values, dtype=DTYPES[tensor.datatype])
        inputs[name] = array.reshape(shape)
    outputs = [{"name": o.name, "parameters": _parameters(o.parameters)} for o in request.outputs] or None
    return InferRequest(inputs, _parameters(request.parameters), outputs, request.id or None)


def _response(request: Any, req: InferRequest, answered: str, outputs: list[tuple[str, str, np.ndarray]],
              final: bool | None = None) -> Any:
    """A ModelInferResponse of the outputs the request asked for (all when it named none), raw;
    `final`: Triton's triton_final_response flag of a streamed response."""
    out = pb.ModelInferResponse(model_name=request.model_name, model_version=answered, id=request.id)
    wanted = {o["name"] for o in req.outputs} if req.outputs is not None else None
    for name, datatype, array in outputs:
        if wanted is None or name in wanted:
            out.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
            out.raw_output_contents.append(to_raw(array, datatype))
    if final is not None:
        out.parameters["triton_final_response"].bool_param = final
    return out


class InferenceService(pb_grpc.GRPCInferenceServiceServicer if pb_grpc is not None else object):  # type: ignore[misc]
    def __init__(self, state: ServerState):
        self.state = state

    async def _fail(self, context: Any, status: int, message: str) -> None:
        await context.abort(getattr(grpc.StatusCode, _CODES.get(status, "UNKNOWN")), message)

    async def _authorize(self, context: Any, admin: bool = False) -> None:
        s = self.state.settings
        if admin and s.admin_key is None:
            await self._fail(context, 403, "the model control API is disabled: start the server with --admin-key")
        keys = (s.admin_key,) if admin else s.api_keys
        if not keys:
            return
        supplied = dict(context.invocation_metadata() or ()).get("authorization", "")
        if not key_matches(supplied, keys, False):  # type: ignore[arg-type]
            await self._fail(context, 401, f"missing or invalid {'admin' if admin else 'API'} key: send "
                                           "'authorization: Bearer <key>' metadata")

    async def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: N802 - the proto's names
        return pb.ServerLiveResponse(live=kserve_llm.live(self.state))

    async def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        return pb.ServerReadyResponse(ready=kserve_llm.ready(self.state))

    async def ServerMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        return pb.ServerMetadataResponse(**kserve_llm.server_metadata())

    async def ModelReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        await self._authorize(context)
        return pb.ModelReadyResponse(ready=kserve_llm.model_ready(self.state, request.name, request.version or None))

    async def ModelMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        await self._authorize(context)
        try:
            meta = kserve_llm.model_metadata(self.state, request.name, request.version or None)
        except KServeError as exc:
            await self._fail(context, exc.status, exc.message)
        tensors = lambda rows: [pb.ModelMetadataResponse.TensorMetadata(  # noqa: E731
            name=r["name"], datatype=r["datatype"], shape=r["shape"]) for r in rows]
        return pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                                        inputs=tensors(meta["inputs"]), outputs=tensors(meta["outputs"]))

    async def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802
        await self._authorize(context)
        try:
            req = infer_request(request)
            answered, outputs = await kserve_llm.infer(self.state, request.model_name,
                                                       request.model_version or None, req)
        except ProtocolError as exc:
            await self._fail(context, 400, str(exc))
        except KServeError as exc:
            await self._fail(context, exc.status, exc.message)
        return _response(request, req, answered, outputs)

    async def ModelStreamInfer(self, request_iterator: Any, context: Any) -> Any:  # noqa: N802
        """Triton's decoupled streaming: each request on the stream answered as it runs, all at
        once; with the parameter `stream: true` one response per text delta (one prompt per such
        request), the last marked `triton_final_response` (or an empty final one, when the
        client asks with `triton_enable_empty_final_response`). A failed request is an
        `error_message` response; the stream goes on."""
        await self._authorize(context)
        queue: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()

        async def serve(request: Any) -> None:
            try:
                async for response in self._stream_one(request):
                    await queue.put(pb.ModelStreamInferResponse(infer_response=response))
            except (ProtocolError, KServeError) as exc:
                await queue.put(pb.ModelStreamInferResponse(error_message=str(exc)))

        async def read() -> None:
            async for request in request_iterator:
                task = asyncio.create_task(serve(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            while tasks:
                await asyncio.gather(*list(tasks), return_exceptions=True)
            await queue.put(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await queue.get()) is not None:
                yield item
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    async def _stream_one(self, request: Any) -> Any:
        req = infer_request(request)
        empty_final = bool(req.parameters.pop("triton_enable_empty_final_response", False))
        streaming = req.parameters.pop("stream", False)
        if not isinstance(streaming, bool):
            raise ProtocolError("parameter 'stream' must be true or false")
        name, version = request.model_name, request.model_version or None

        def response(answered: str, outputs: list[tuple[str, str, np.ndarray]], final: bool) -> Any:
            return _response(request, req, answered, outputs, final)

        if not streaming:
            answered, outputs = await kserve_llm.infer(self.state, name, version, req)
            yield response(answered, outputs, True)
            return
        kserve_llm.require_llm(self.state, name, version)
        plan = kserve_llm.plan_infer(name, req)
        if len(plan.prompts) != 1:
            raise ProtocolError(f"a streamed request takes one prompt, got {len(plan.prompts)}")
        params = dataclasses.replace(plan.params, output_kind=RequestOutputKind.DELTA)
        gen = await kserve_llm.start(self.state, name, version, plan.prompts, params, plan.priority)
        answered = gen.lease.deployment.version
        async for _, out in kserve_llm.outputs(self.state, gen):
            c = out.outputs[0]
            if c.text or out.finished:
                text = np.array([c.text.encode("utf-8")], dtype=np.object_)
                reason = np.array([(c.finish_reason or "").encode()], dtype=np.object_)
                yield response(answered, [("text_output", "BYTES", text), ("finish_reason", "BYTES", reason)],
                               out.finished and not empty_final)
        if empty_final:
            yield response(answered, [], True)

    async def RepositoryIndex(self, request: Any, context: Any) -> Any:  # noqa: N802
        await self._authorize(context, admin=self.state.settings.admin_key is not None)
        rows = self.state.repository.index()
        if request.ready:
            rows = [r for r in rows if r["state"] == "READY"]
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(
            name=r["name"], version=str(r["version"]), state=r["state"], reason=r.get("reason") or "")
            for r in rows])

    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:  # noqa: N802
        await self._authorize(context, admin=True)
        params = _parameters(request.parameters)
        unknown = set(params) - {"version"}
        if unknown:
            await self._fail(context, 400, f"unknown load parameter(s): {', '.join(sorted(unknown))} (known: version)")
        version = params.get("version")
        await self._control(context, request.model_name, self.state.repository.load, request.model_name,
                            None if version is None else str(version))
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:  # noqa: N802
        await self._authorize(context, admin=True)
        await self._control(context, request.model_name, self.state.repository.unload, request.model_name)
        return pb.RepositoryModelUnloadResponse()

    async def _control(self, context: Any, name: str, fn: Any, *args: Any) -> None:
        from surge.server.routes.models import repository_error

        try:
            await asyncio.to_thread(fn, *args)
        except SurgeError as exc:
            error = repository_error(exc, name)
            await self._fail(context, error.status, error.message)


async def start(state: ServerState, host: str, port: int) -> Any:
    """The gRPC server, listening; stop it with `await server.stop(grace)`."""
    require_grpc()
    # no SO_REUSEPORT (gRPC's default): a second server on the port must fail, not share its calls
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(state), server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as exc:
        raise InvalidArgumentError(f"--grpc-port {port}: cannot listen on {host}:{port} ({exc})") from None
    if bound == 0:
        raise InvalidArgumentError(f"--grpc-port {port}: cannot listen on {host}:{port}")
    await server.start()
    return server
