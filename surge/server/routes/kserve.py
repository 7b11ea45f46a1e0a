"""The KServe v2 inference protocol over REST (Triton's), for the served LLMs: text in, text out.

    GET  /v2                                          server metadata
    GET  /v2/health/live, /v2/health/ready            liveness and readiness (as /health, /ready)
    GET  /v2/models/{name}[/versions/{v}]             model metadata: inputs and outputs
    GET  /v2/models/{name}[/versions/{v}]/ready       200 when that model (version) serves
    POST /v2/models/{name}[/versions/{v}]/infer       JSON tensors or the binary-tensor extension
    POST /v2/models/{name}[/versions/{v}]/generate    Triton's generate extension (plain JSON)

An LLM takes `text_input` (BYTES, one prompt per element, any shape) and gives `text_output`
(BYTES, the generated text, same shape) and `finish_reason`. The generation settings are the
request's `parameters` (Triton's way) or a `sampling_parameters` input holding them as JSON
(Triton's vLLM backend's way): max_tokens, temperature, top_p, top_k, min_p, seed, stop,
repetition_penalty, presence_penalty, frequency_penalty, ignore_eos, min_tokens. Errors are
`{"error": "..."}` with the HTTP status (400 bad input, 404 unknown model or version, 503 not
ready, 429 at capacity), as tritonclient reads them.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

import surge
from surge.engine.async_engine import EngineDeadError, RequestFailedError
from surge.engine.llm_engine import LLMEngine
from surge.errors import SurgeError
from surge.outputs import RequestOutput
from surge.sampling_params import SamplingParams
from surge.server.errors import APIError
from surge.server.generation import Generation, Prompt, merged, prepare_prompts
from surge.server.kserve_codec import InferRequest, ProtocolError, encode_response, parse_request
from surge.server.lease import Lease
from surge.server.plumbing import engine_error, until_disconnect
from surge.server.state import ServerState

PLATFORM = "surge_llm"
INPUTS = [{"name": "text_input", "datatype": "BYTES", "shape": [-1]},
          {"name": "sampling_parameters", "datatype": "BYTES", "shape": [1], "optional": True}]
OUTPUTS = [{"name": "text_output", "datatype": "BYTES", "shape": [-1]},
           {"name": "finish_reason", "datatype": "BYTES", "shape": [-1]}]
SETTINGS = {"max_tokens": int, "temperature": (int, float), "top_p": (int, float), "top_k": int,
            "min_p": (int, float), "seed": int, "stop": (str, list), "repetition_penalty": (int, float),
            "presence_penalty": (int, float), "frequency_penalty": (int, float), "ignore_eos": bool,
            "min_tokens": int}
# Triton's reserved request parameters: the ones surge honours, and the ones it refuses by name
HONOURED = {"binary_data_output", "priority"}
REFUSED = {"sequence_id", "sequence_start", "sequence_end", "timeout"}


def kserve_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _model_key(name: str, version: str | None) -> str:
    return f"{name}:{version}" if version else name


def sampling_params(settings: dict[str, Any]) -> SamplingParams:
    """SamplingParams of the request's generation settings; ProtocolError naming a bad one."""
    unknown = set(settings) - set(SETTINGS)
    if unknown:
        raise ProtocolError(f"unknown generation parameter(s): {', '.join(sorted(unknown))} "
                            f"(known: {', '.join(sorted(SETTINGS))})")
    for key, value in settings.items():
        kinds = SETTINGS[key]
        if isinstance(value, bool) and kinds is not bool or not isinstance(value, kinds):
            raise ProtocolError(f"parameter '{key}' has the wrong type ({type(value).__name__})")
    stop = settings.get("stop")
    if isinstance(stop, list) and not all(isinstance(s, str) for s in stop):
        raise ProtocolError("parameter 'stop' must be a string or a list of strings")
    kwargs = {**settings, "stop": [stop] if isinstance(stop, str) else (stop or [])}
    try:
        return SamplingParams(**kwargs)
    except SurgeError as exc:
        raise ProtocolError(str(exc)) from None


def _settings(request: InferRequest) -> dict[str, Any]:
    """The generation settings: the request's parameters beside Triton's reserved ones, and a
    `sampling_parameters` input's JSON."""
    refused = REFUSED & set(request.parameters)
    if refused:
        raise ProtocolError(f"request parameter(s) not supported by this server: {', '.join(sorted(refused))}")
    settings = {k: v for k, v in request.parameters.items() if k not in HONOURED}
    given = request.inputs.get("sampling_parameters")
    if given is not None:
        if given.size != 1 or given.dtype != np.object_:
            raise ProtocolError("input 'sampling_parameters' must be one BYTES element holding a JSON object")
        try:
            extra = json.loads(given.reshape(-1)[0])
        except (ValueError, UnicodeDecodeError) as exc:
            raise ProtocolError(f"input 'sampling_parameters' is not JSON: {exc}") from None
        if not isinstance(extra, dict):
            raise ProtocolError("input 'sampling_parameters' must be a JSON object")
        both = set(extra) & set(settings)
        if both:
            raise ProtocolError(f"set both as a request parameter and in sampling_parameters: {', '.join(sorted(both))}")
        settings.update(extra)
    return settings


def router(state: ServerState) -> APIRouter:
    api = APIRouter()

    def lease_or_error(name: str, version: str | None) -> Lease | JSONResponse:
        """A hold on the model (version) for metadata and readiness: no sequences, so a model at
        capacity still answers."""
        try:
            return Lease(state, _model_key(name, version), 0)
        except APIError as exc:
            return kserve_error(exc.status, exc.message, exc.headers)

    @api.get("/v2")
    async def server_metadata() -> dict:
        return {"name": "surge", "version": surge.__version__, "extensions": ["binary_tensor_data", "generate"]}

    @api.get("/v2/health/live")
    async def live() -> Response:
        dead = state.engine_error is not None or state.status == "failed"
        return Response(status_code=503 if dead else 200)

    @api.get("/v2/health/ready")
    async def ready() -> Response:
        serving = [d for d in state.repository.serving() if d.async_engine.is_running]
        ok = state.status == "ready" and serving and state.engine_error is None
        return Response(status_code=200 if ok else 503)

    @api.get("/v2/models/{name}")
    @api.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None = None) -> Response:
        lease = lease_or_error(name, version)
        if isinstance(lease, JSONResponse):
            return lease
        with lease:
            return JSONResponse({"name": name, "versions": [lease.deployment.version], "platform": PLATFORM,
                                 "inputs": INPUTS, "outputs": OUTPUTS})

    @api.get("/v2/models/{name}/ready")
    @api.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None) -> Response:
        lease = lease_or_error(name, version)
        if isinstance(lease, JSONResponse):
            return lease
        lease.release()
        return Response(status_code=200)

    async def run(name: str, version: str | None, prompts: list[str], params: SamplingParams,
                  priority: int, request: Request) -> tuple[Generation, list[RequestOutput]] | JSONResponse:
        def prepare(engine: LLMEngine) -> list[Prompt]:
            return prepare_prompts(engine, list(prompts), params)

        try:
            gen = await Generation.start(state, _model_key(name, version), len(prompts), prepare, params, "infer",
                                         priority, False, numbered=True)
        except APIError as exc:
            return kserve_error(exc.status, exc.message, exc.headers)

        async def collect() -> list[RequestOutput]:
            finals: dict[int, RequestOutput] = {}
            async for i, out in merged(gen.gens, gen.deadline, state.aborting):
                finals[i] = out
            return [finals[i] for i in range(len(prompts))]

        try:
            outs = await until_disconnect(request, collect())
        except (RequestFailedError, EngineDeadError) as exc:
            return kserve_error(engine_error(exc).status, str(exc))
        except APIError as exc:
            return kserve_error(exc.status, exc.message, exc.headers)
        finally:
            gen.lease.release()
        model = gen.lease.deployment.name
        for out in outs:
            state.metrics.record_finish(model, out.outputs[0].finish_reason)
        return gen, outs

    @api.post("/v2/models/{name}/infer")
    @api.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(name: str, request: Request, version: str | None = None) -> Response:
        try:
            req = parse_request(await request.body(), request.headers.get("inference-header-content-length"))
            unknown = set(req.inputs) - {i["name"] for i in INPUTS}
            if unknown:
                raise ProtocolError(f"unknown input(s) {', '.join(sorted(unknown))}; {name} takes text_input "
                                    "and sampling_parameters")
            text = req.inputs.get("text_input")
            if text is None:
                raise ProtocolError("input 'text_input' is required")
            if text.dtype != np.object_ or text.size == 0:
                raise ProtocolError("input 'text_input' must be non-empty BYTES")
            try:
                prompts = [v.decode("utf-8") for v in text.reshape(-1)]
            except UnicodeDecodeError:
                raise ProtocolError("input 'text_input' must be UTF-8 text") from None
            for o in req.outputs or ():
                if o["name"] not in {x["name"] for x in OUTPUTS}:
                    raise ProtocolError(f"unknown output '{o['name']}'; {name} gives text_output and finish_reason")
            priority = req.parameters.get("priority", 0)
            if isinstance(priority, bool) or not isinstance(priority, int):
                raise ProtocolError("parameter 'priority' must be an integer")
            params = sampling_params(_settings(req))
        except ProtocolError as exc:
            return kserve_error(400, str(exc))
        result = await run(name, version, prompts, params, priority, request)
        if isinstance(result, JSONResponse):
            return result
        gen, outs = result
        shape = text.shape
        texts = np.array([o.outputs[0].text.encode("utf-8") for o in outs], dtype=np.object_).reshape(shape)
        reasons = np.array([(o.outputs[0].finish_reason or "").encode() for o in outs],
                           dtype=np.object_).reshape(shape)
        head = {"model_name": name, "model_version": gen.lease.deployment.version, **({"id": req.id} if req.id else {})}
        body, header_length = encode_response(head, [("text_output", "BYTES", texts),
                                                     ("finish_reason", "BYTES", reasons)], req)
        headers = {"Inference-Header-Content-Length": str(header_length)} if header_length is not None else None
        media = "application/octet-stream" if header_length is not None else "application/json"
        return Response(body, media_type=media, headers=headers)

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
            params = sampling_params(settings)
        except ProtocolError as exc:
            return kserve_error(400, str(exc))
        result = await run(name, version, [doc["text_input"]], params, 0, request)
        if isinstance(result, JSONResponse):
            return result
        gen, (out,) = result
        return JSONResponse({"model_name": name, "model_version": gen.lease.deployment.version,
                             "text_output": out.outputs[0].text, "finish_reason": out.outputs[0].finish_reason})

    return api
