"""The KServe v2 inference protocol over REST (Triton's), for the served LLMs (server/kserve_llm.py).

    GET  /v2                                          server metadata
    GET  /v2/health/live, /v2/health/ready            liveness and readiness (as /health, /ready)
    GET  /v2/models/{name}[/versions/{v}]             model metadata: inputs and outputs
    GET  /v2/models/{name}[/versions/{v}]/ready       200 when that model (version) serves
    POST /v2/models/{name}[/versions/{v}]/infer       JSON tensors or the binary-tensor extension
    POST /v2/models/{name}[/versions/{v}]/generate    Triton's generate extension (plain JSON)
    POST /v2/models/{name}[/versions/{v}]/generate_stream   the same as server-sent events, one per
                                                      text delta, the finish reason in the last

Errors are `{"error": "..."}` with the HTTP status, as tritonclient reads them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from surge.server import kserve_llm
from surge.server.kserve_codec import ProtocolError, encode_response, parse_request
from surge.server.kserve_llm import KServeError
from surge.sampling_params import RequestOutputKind, SamplingParams
from surge.server.openapi import request_body
from surge.server.plumbing import sse, until_disconnect
from surge.server.protocol import KServeGenerateRequest, KServeInferRequest
from surge.server.state import ServerState


def kserve_error(exc: KServeError) -> JSONResponse:
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)


def router(state: ServerState) -> APIRouter:
    api = APIRouter()

    @api.get("/v2")
    async def server_metadata() -> dict:
        return kserve_llm.server_metadata()

    @api.get("/v2/health/live")
    async def live() -> Response:
        return Response(status_code=200 if kserve_llm.live(state) else 503)

    @api.get("/v2/health/ready")
    async def ready() -> Response:
        return Response(status_code=200 if kserve_llm.ready(state) else 503)

    @api.get("/v2/models/{name}")
    @api.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None = None) -> Response:
        try:
            return JSONResponse(kserve_llm.model_metadata(state, name, version))
        except KServeError as exc:
            return kserve_error(exc)

    @api.get("/v2/models/{name}/ready")
    @api.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None) -> Response:
        try:
            kserve_llm.model_metadata(state, name, version)
        except KServeError as exc:
            return kserve_error(exc)
        return Response(status_code=200)

    infer_body = request_body(KServeInferRequest)
    infer_body["requestBody"]["content"]["application/octet-stream"] = {
        "schema": {"type": "string", "format": "binary",
                   "description": "the binary-tensor extension: the JSON header (Inference-Header-Content-Length "
                                  "bytes) then the inputs' raw data"}}
    generate_body = request_body(KServeGenerateRequest)

    @api.post("/v2/models/{name}/infer", openapi_extra=infer_body)
    @api.post("/v2/models/{name}/versions/{version}/infer", openapi_extra=infer_body)
    async def infer(name: str, request: Request, version: str | None = None) -> Response:
        try:
            req = parse_request(await request.body(), request.headers.get("inference-header-content-length"))
            answered, outputs = await until_disconnect(request, kserve_llm.infer(state, name, version, req))
        except ProtocolError as exc:
            return kserve_error(KServeError(400, str(exc)))
        except KServeError as exc:
            return kserve_error(exc)
        head = {"model_name": name, "model_version": answered, **({"id": req.id} if req.id else {})}
        body, header_length = encode_response(head, outputs, req)
        if header_length is None:
            return Response(body, media_type="application/json")
        return Response(body, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(header_length)})

    async def generate_request(request: Request, streaming: bool) -> tuple[str, SamplingParams]:
        """(the prompt, its settings) of a generate request; ProtocolError naming what is wrong."""
        try:
            doc = json.loads(await request.body())
        except (ValueError, RecursionError) as exc:
            raise ProtocolError(f"the request is not JSON: {exc}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("text_input"), str) or not doc["text_input"]:
            raise ProtocolError("the request needs 'text_input', a non-empty string")
        unknown = set(doc) - {"text_input", "parameters"}
        if unknown:
            raise ProtocolError(f"unknown field(s): {', '.join(sorted(unknown))} (put generation settings "
                                "in 'parameters')")
        settings = doc.get("parameters") or {}
        if not isinstance(settings, dict):
            raise ProtocolError("'parameters' must be an object")
        if "stream" in settings:  # Triton's decoupled flag: the route says it, and they must agree
            if settings["stream"] is not streaming:
                raise ProtocolError(f"'stream': {json.dumps(settings['stream'])} on "
                                    f"{'generate_stream' if streaming else 'generate'}; use "
                                    f"{'generate' if streaming else 'generate_stream'} for that")
            settings = {k: v for k, v in settings.items() if k != "stream"}
        return doc["text_input"], kserve_llm.sampling_params(settings)

    @api.post("/v2/models/{name}/generate", openapi_extra=generate_body)
    @api.post("/v2/models/{name}/versions/{version}/generate", openapi_extra=generate_body)
    async def generate(name: str, request: Request, version: str | None = None) -> Response:
        try:
            prompt, params = await generate_request(request, False)
            answered, (out,) = await until_disconnect(request, kserve_llm.generate(state, name, version, [prompt],
                                                                                    params))
        except ProtocolError as exc:
            return kserve_error(KServeError(400, str(exc)))
        except KServeError as exc:
            return kserve_error(exc)
        return JSONResponse({"model_name": name, "model_version": answered, "text_output": out.outputs[0].text,
                             "finish_reason": out.outputs[0].finish_reason})

    @api.post("/v2/models/{name}/generate_stream", openapi_extra=generate_body)
    @api.post("/v2/models/{name}/versions/{version}/generate_stream", openapi_extra=generate_body)
    async def generate_stream(name: str, request: Request, version: str | None = None) -> Response:
        try:
            prompt, params = await generate_request(request, True)
            params = dataclasses.replace(params, output_kind=RequestOutputKind.DELTA)
            gen = await kserve_llm.start(state, name, version, [prompt], params)
        except ProtocolError as exc:
            return kserve_error(KServeError(400, str(exc)))
        except KServeError as exc:
            return kserve_error(exc)
        head = {"model_name": name, "model_version": gen.lease.deployment.version}

        async def events() -> AsyncIterator[str]:
            try:
                async for _, out in kserve_llm.outputs(state, gen):
                    c = out.outputs[0]
                    if c.text or c.finish_reason is not None:
                        yield sse({**head, "text_output": c.text, "finish_reason": c.finish_reason})
            except KServeError as exc:  # the status line went out already: an error event ends the stream
                yield sse({"error": exc.message})

        return StreamingResponse(events(), media_type="text/event-stream",
                                 background=BackgroundTask(gen.lease.release))

    return api
