"""The KServe v2 inference protocol over REST (Triton's), for the served LLMs (server/kserve_llm.py).

    GET  /v2                                          server metadata
    GET  /v2/health/live, /v2/health/ready            liveness and readiness (as /health, /ready)
    GET  /v2/models/{name}[/versions/{v}]             model metadata: inputs and outputs
    GET  /v2/models/{name}[/versions/{v}]/ready       200 when that model (version) serves
    POST /v2/models/{name}[/versions/{v}]/infer       JSON tensors or the binary-tensor extension
    POST /v2/models/{name}[/versions/{v}]/generate    Triton's generate extension (plain JSON)

Errors are `{"error": "..."}` with the HTTP status, as tritonclient reads them.
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from surge.server import kserve_llm
from surge.server.kserve_codec import ProtocolError, encode_response, parse_request
from surge.server.kserve_llm import KServeError
from surge.server.plumbing import until_disconnect
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

    @api.post("/v2/models/{name}/infer")
    @api.post("/v2/models/{name}/versions/{version}/infer")
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

    @api.post("/v2/models/{name}/generate")
    @api.post("/v2/models/{name}/versions/{version}/generate")
    async def generate(name: str, request: Request, version: str | None = None) -> Response:
        try:
            try:
                doc = json.loads(await request.body())
            except ValueError as exc:
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
            params = kserve_llm.sampling_params(settings)
            answered, (out,) = await until_disconnect(
                request, kserve_llm.generate(state, name, version, [doc["text_input"]], params))
        except ProtocolError as exc:
            return kserve_error(KServeError(400, str(exc)))
        except KServeError as exc:
            return kserve_error(exc)
        return JSONResponse({"model_name": name, "model_version": answered, "text_output": out.outputs[0].text,
                             "finish_reason": out.outputs[0].finish_reason})

    return api
