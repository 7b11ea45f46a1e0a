"""The served models as KServe v2 models (Triton's protocol), apart from the transport: what REST
(server/routes/kserve.py) and gRPC (server/grpc_service.py) both answer. The LLMs are answered
here; metadata and infer requests for a tensor model go on to server/kserve_tensor.py.

An LLM takes `text_input` (BYTES, one prompt per element, any shape) and gives `text_output`
(BYTES, the generated text, same shape) and `finish_reason`. The generation settings are the
request's parameters (Triton's way) or a `sampling_parameters` input holding them as JSON
(Triton's vLLM backend's way): max_tokens, temperature, top_p, top_k, min_p, seed, stop,
repetition_penalty, presence_penalty, frequency_penalty, ignore_eos, min_tokens. A failure is a
KServeError with the HTTP status it means (400 bad input, 404 unknown model or version, 429 at
capacity, 500 the request failed, 503 not ready); gRPC maps it to its status codes.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from surge.engine.async_engine import EngineDeadError, RequestFailedError
from surge.engine.llm_engine import LLMEngine
from surge.errors import SurgeError
from surge.outputs import RequestOutput
from surge.sampling_params import SamplingParams
from surge.server.errors import APIError
from surge.server.generation import Generation, Prompt, merged, prepare_prompts
from surge.server import kserve_tensor
from surge.server.kserve_codec import InferRequest, KServeError, ProtocolError
from surge.server.lease import Lease
from surge.server.repository import TensorDeployment
from surge.server.plumbing import engine_error
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


def _key(name: str, version: str | None) -> str:
    return f"{name}:{version}" if version else name


def _hold(state: ServerState, name: str, version: str | None) -> Lease:
    """A hold on the model (version), of any backend, for metadata and readiness: no sequences,
    so a model at capacity still answers."""
    try:
        return Lease(state, _key(name, version), 0, llm=False)
    except APIError as exc:
        raise KServeError(exc.status, exc.message, exc.headers) from None


def server_metadata() -> dict[str, Any]:
    import surge

    return {"name": "surge", "version": surge.__version__, "extensions": ["binary_tensor_data", "generate"]}


def live(state: ServerState) -> bool:
    return state.engine_error is None and state.status != "failed"


def ready(state: ServerState) -> bool:
    serving = [d for d in state.repository.serving() if d.running]
    return state.status == "ready" and bool(serving) and state.engine_error is None


def model_metadata(state: ServerState, name: str, version: str | None) -> dict[str, Any]:
    with _hold(state, name, version) as lease:
        if isinstance(lease.deployment, TensorDeployment):
            return {**kserve_tensor.metadata(lease.deployment), "name": name}
        return {"name": name, "versions": [lease.deployment.version], "platform": PLATFORM,
                "inputs": INPUTS, "outputs": OUTPUTS}


def require_llm(state: ServerState, name: str, version: str | None) -> None:
    """KServeError (400) unless the model is an LLM (for what only LLMs do: streaming, generate)."""
    with _hold(state, name, version) as lease:
        if isinstance(lease.deployment, TensorDeployment):
            raise KServeError(400, f"model {name} is an {lease.deployment.kind} model: it takes infer requests, "
                                   "not streamed generation")


def model_ready(state: ServerState, name: str, version: str | None) -> bool:
    try:
        _hold(state, name, version).release()
    except KServeError:
        return False
    return True


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


@dataclass
class Plan:
    """A checked inference request: its prompts (in text_input's shape), settings and priority."""

    prompts: list[str]
    shape: tuple[int, ...]
    params: SamplingParams
    priority: int


def plan_infer(name: str, request: InferRequest) -> Plan:
    """Check an infer request against the LLM's inputs and outputs; ProtocolError (400) otherwise."""
    unknown = set(request.inputs) - {i["name"] for i in INPUTS}
    if unknown:
        raise ProtocolError(f"unknown input(s) {', '.join(sorted(unknown))}; {name} takes text_input "
                            "and sampling_parameters")
    text = request.inputs.get("text_input")
    if text is None:
        raise ProtocolError("input 'text_input' is required")
    if text.dtype != np.object_ or text.size == 0:
        raise ProtocolError("input 'text_input' must be non-empty BYTES")
    try:
        prompts = [v.decode("utf-8") for v in text.reshape(-1)]
    except UnicodeDecodeError:
        raise ProtocolError("input 'text_input' must be UTF-8 text") from None
    for o in request.outputs or ():
        if o["name"] not in {x["name"] for x in OUTPUTS}:
            raise ProtocolError(f"unknown output '{o['name']}'; {name} gives text_output and finish_reason")
    priority = request.parameters.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ProtocolError("parameter 'priority' must be an integer")
    return Plan(prompts, text.shape, sampling_params(_settings(request)), priority)


async def start(state: ServerState, name: str, version: str | None, prompts: list[str], params: SamplingParams,
                priority: int = 0) -> Generation:
    """The prompts queued under a lease (release it with gen.lease.release())."""
    def prepare(engine: LLMEngine) -> list[Prompt]:
        return prepare_prompts(engine, list(prompts), params)

    try:
        return await Generation.start(state, _key(name, version), len(prompts), prepare, params, "infer",
                                      priority, False, numbered=True)
    except APIError as exc:
        raise KServeError(exc.status, exc.message, exc.headers) from None


async def outputs(state: ServerState, gen: Generation) -> AsyncIterator[tuple[int, RequestOutput]]:
    """The generation's outputs as they come (prompt index, output); engine failures and the
    server's deadline or shutdown as KServeError; the lease returned at the end."""
    model = gen.lease.deployment.name
    try:
        async for i, out in merged(gen.gens, gen.deadline, state.aborting):
            if out.finished:
                state.metrics.record_finish(model, out.outputs[0].finish_reason)
            yield i, out
    except (RequestFailedError, EngineDeadError) as exc:
        raise KServeError(engine_error(exc).status, str(exc)) from None
    except APIError as exc:
        raise KServeError(exc.status, exc.message, exc.headers) from None
    finally:
        gen.lease.release()


async def generate(state: ServerState, name: str, version: str | None, prompts: list[str],
                   params: SamplingParams, priority: int = 0) -> tuple[str, list[RequestOutput]]:
    """(the version that answered, each prompt's final output) through the one generation path;
    cancelling the caller aborts the requests."""
    gen = await start(state, name, version, prompts, params, priority)
    finals: dict[int, RequestOutput] = {}
    async for i, out in outputs(state, gen):
        finals[i] = out
    return gen.lease.deployment.version, [finals[i] for i in range(len(prompts))]


async def infer(state: ServerState, name: str, version: str | None, request: InferRequest
                ) -> tuple[str, list[tuple[str, str, np.ndarray]]]:
    """(the version that answered, the outputs as (name, datatype, array)) of an infer request,
    to whichever backend serves the model."""
    hold = _hold(state, name, version)
    try:
        if isinstance(hold.deployment, TensorDeployment):
            outs = await kserve_tensor.infer(hold.deployment, request, state.settings.retry_after_s)
            return hold.deployment.version, outs
    finally:
        hold.release()
    try:
        plan = plan_infer(name, request)
    except ProtocolError as exc:
        raise KServeError(400, str(exc)) from None
    answered, outs = await generate(state, name, version, plan.prompts, plan.params, plan.priority)
    texts = np.array([o.outputs[0].text.encode("utf-8") for o in outs], dtype=np.object_).reshape(plan.shape)
    reasons = np.array([(o.outputs[0].finish_reason or "").encode() for o in outs],
                       dtype=np.object_).reshape(plan.shape)
    return answered, [("text_output", "BYTES", texts), ("finish_reason", "BYTES", reasons)]
