"""The FastAPI app: OpenAI's completions and chat endpoints over the AsyncEngine.

Every error a client can cause is answered in OpenAI's error JSON with its status (400, 401,
404, 408, 429, 503); nothing a client sends reaches the engine unvalidated, and a request
that ends early for any reason (disconnect, timeout, error) is aborted so its KV blocks are
freed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.background import BackgroundTask

from surge.engine.async_engine import AsyncEngine, EngineDeadError, RequestFailedError
from surge.engine.llm_engine import EngineStats, LLMEngine
from surge.errors import SurgeError
from surge.server.budget import MemoryBudgetError
from surge.outputs import PositionLogprobs, RequestOutput
from surge.sampling_params import RequestOutputKind, SamplingParams
from surge.server.dashboard import StatsHistory, dashboard_html
from surge.server.errors import APIError, bad_request, error_response
from surge.server.guard import REQUEST_ID, Guard
from surge.server.metrics import ServerMetrics
from surge.server.openapi import install_request_schemas, request_body
from surge.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmptyRequest,
    IndexRequest,
    LoadRequest,
    TokenizeRequest,
)
from surge.server.repository import (
    ModelLoadError,
    ModelRepository,
    ModelRequiredError,
    ModelUnavailableError,
    RepositoryConflictError,
)
from surge.server.response_cache import (
    ResponseCache,
    cache_key,
    is_deterministic,
    replay,
)
from surge.server.settings import ServerSettings

logger = logging.getLogger(__name__)

@dataclass
class ServerState:
    """What the routes share; `status` is loading -> ready -> draining (or failed)."""

    repository: ModelRepository
    settings: ServerSettings
    status: str = "loading"
    load_error: str | None = None
    engine_error: str | None = None  # set when an engine died: /health answers 503 with it, the process exits
    # set (on the event loop) when the shutdown grace is over: every request still running ends with 503
    aborting: asyncio.Event | None = None
    loop: asyncio.AbstractEventLoop | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    metrics: ServerMetrics = field(init=False)
    history: StatsHistory = field(init=False)
    response_cache: ResponseCache | None = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = ServerMetrics(self.engine_stats)
        self.history = StatsHistory(self.engine_stats)
        self.metrics.listeners.append(self.history.record_request)
        size = self.settings.response_cache_size
        self.response_cache = ResponseCache(size) if size > 0 else None
        if self.response_cache is not None:
            self.repository.on_unloaded.append(self.response_cache.drop_version)

    def engine_stats(self) -> list[tuple[str, str, EngineStats]]:
        return [(d.name, d.version, d.async_engine.stats()) for d in self.repository.deployments()]

    def in_flight(self) -> int:
        return self.repository.in_flight()


# ---- request plumbing ---------------------------------------------------------------------


def parse_body(raw: bytes, model: type[BaseModel]) -> Any:
    """The body as `model` (parsed and validated in one pass, strictly), or a 400 naming the
    problem: malformed JSON, nesting too deep, a number out of range, a lone surrogate, a bad
    or unknown field."""
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        raise validation_error(exc) from None


def validation_error(exc: ValidationError) -> APIError:
    err = exc.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err["loc"])
    kind = err["type"]
    if kind == "json_invalid":
        return bad_request(f"malformed JSON body: {err['msg'].removeprefix('Invalid JSON: ')}")
    if kind == "model_type" and not loc:
        return bad_request("the request body must be a JSON object")
    if kind == "extra_forbidden":
        return bad_request(f"unrecognized request argument '{loc}'", param=loc)
    message = err["msg"].removeprefix("Value error, ")
    return bad_request(f"invalid value for '{loc}': {message}" if loc else message, param=loc or None)


async def read_body(request: Request, model: type[BaseModel]) -> Any:
    return parse_body(await request.body(), model)


class Lease:
    """A request's hold on the deployment it is routed to: taken before anything is queued,
    returned when the response has been sent, so a retired version unloads only after it."""

    def __init__(self, state: ServerState, requested: str | None, sequences: int = 1):
        if state.status != "ready":
            raise APIError(503, f"the server is {state.status}; retry later", "service_unavailable")
        try:
            self.deployment, self.model = state.repository.acquire(requested, sequences)
        except ModelUnavailableError as exc:
            raise APIError(404, str(exc), "invalid_request_error", "model", "model_not_found") from exc
        except ModelRequiredError as exc:
            raise bad_request(str(exc), "model") from exc
        self.state = state
        self.sequences = sequences
        self.released = False
        self.engine: LLMEngine = self.deployment.engine
        self.aengine: AsyncEngine = self.deployment.async_engine
        if not self.aengine.is_running:
            self.release()
            raise APIError(503, f"the engine of {self.deployment.key} has stopped: {self.aengine.error}",
                           "service_unavailable")
        limit = state.settings.max_queue
        capacity = self.engine.max_num_seqs + (limit or 0)
        if limit is not None and sequences > capacity:
            self.release()
            raise bad_request(f"the request asks for {sequences} sequences (n x prompts); {self.model} takes at "
                              f"most {capacity} at once (--max-num-seqs + --max-queue)")
        if limit is not None and self.deployment.sequences > capacity:
            self.release()
            raise APIError(429, f"{self.model} is at capacity ({self.deployment.sequences - sequences} sequences in "
                                f"flight, waiting room of {limit}); retry later", "rate_limit_exceeded",
                           headers={"Retry-After": str(state.settings.retry_after_s)})

    @property
    def fingerprint(self) -> str:
        """Which version answered, as OpenAI's `system_fingerprint` and the X-Surge-Model-Version header."""
        return self.deployment.key

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.state.repository.release(self.deployment, self.sequences)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def generate(self, ids: list[int], params: SamplingParams, request_id: str, priority: int,
                 prompt_text: str | None = None) -> AsyncIterator[RequestOutput]:
        """The engine's stream for one prompt, or a replay from the response cache."""
        cache = self.state.response_cache
        if cache is None or not is_deterministic(params):
            return self.aengine.generate(ids, params, request_id, priority, prompt_text=prompt_text)
        key = cache_key(self.deployment.key, ids, params)
        hit = cache.get(key)
        self.state.metrics.record_cache(self.deployment.name, hit is not None)
        if hit is not None:
            return replay(hit, request_id)
        stream = self.aengine.generate(ids, params, request_id, priority, prompt_text=prompt_text)
        return cache.through(key, stream, cumulative=params.output_kind is RequestOutputKind.CUMULATIVE)


def sampling(build: Callable[[], SamplingParams]) -> SamplingParams:
    try:
        return build()
    except SurgeError as exc:
        raise bad_request(str(exc)) from exc


def prepare_prompts(engine: LLMEngine, prompts: list[str | list[int]], params: SamplingParams
                    ) -> list[tuple[str | None, list[int]]]:
    """Tokenize and check each prompt (blocking: run it off the event loop)."""
    out = []
    try:
        for prompt in prompts:
            text, ids = engine.tokenize_prompt(prompt)
            engine.validate(ids, params)
            out.append((text, ids))
    except SurgeError as exc:
        raise bad_request(str(exc), param="prompt") from exc
    return out


def encode_chat(engine: LLMEngine, messages: list[Any], add_generation_prompt: bool) -> list[int]:
    try:
        return engine.tokenizer.encode_chat([m.as_template_dict() for m in messages], add_generation_prompt)
    except SurgeError as exc:
        raise bad_request(str(exc), "messages") from exc


@dataclass
class _Track:
    """Timing of one completion, for TTFT / TPOT / latency metrics."""

    start: float
    first: float | None = None
    tokens: int = 0

    def saw(self, out: RequestOutput) -> None:
        """Count an output's tokens; the first token's time is the engine's when it knows it
        (a non-streaming request only sees its output at the end)."""
        count = sum(len(c.token_ids) for c in out.outputs)
        if count and self.first is None:
            self.first = out.first_token_time if out.first_token_time is not None else time.monotonic()
        self.tokens += count


async def merged(gens: list[AsyncIterator[RequestOutput]], deadline: float | None,
                 aborting: asyncio.Event | None = None) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several engine streams as they come, tagged with the stream's index.

    Leaving early (timeout, disconnect, error, the shutdown's abort) cancels every stream,
    which aborts its request.
    """
    queue: asyncio.Queue = asyncio.Queue()
    done = object()
    stopped = object()

    async def watch_abort() -> None:
        assert aborting is not None
        await aborting.wait()
        await queue.put((-1, stopped))

    async def pump(i: int, gen: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in gen:
                await queue.put((i, out))
        except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer
            await queue.put((i, exc))
            return
        await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    remaining = len(tasks)
    if aborting is not None:
        tasks.append(asyncio.create_task(watch_abort()))
    try:
        while remaining:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                i, item = await asyncio.wait_for(queue.get(), timeout)
            except asyncio.TimeoutError:
                raise APIError(408, "the request exceeded the server's --request-timeout and was aborted",
                               "timeout_error", code="request_timeout") from None
            if item is stopped:
                raise APIError(503, "the server is shutting down: the request was aborted after the grace period",
                               "service_unavailable", code="shutting_down")
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def until_disconnect(request: Request, coro: Any) -> Any:
    """Run `coro`; if the client goes away first, cancel it (aborting its requests)."""
    task = asyncio.ensure_future(coro)

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)

    watcher = asyncio.create_task(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise APIError(499, "client disconnected", "client_closed_request")
    return task.result()


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def sse_chunk(lease: "Lease", rid: str, created: int, obj: str, choice: dict, include_usage: bool) -> str:
    """One streamed chunk; with include_usage every chunk carries "usage": null, as OpenAI's do."""
    payload: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": lease.model,
                               "system_fingerprint": lease.fingerprint, "choices": [choice]}
    if include_usage:
        payload["usage"] = None
    return sse(payload)


def stream_error(exc: BaseException) -> str:
    if isinstance(exc, (RequestFailedError, EngineDeadError)):
        exc = engine_error(exc)
    if isinstance(exc, APIError):
        return sse({"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}})
    logger.error("stream failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
    return sse({"error": {"message": f"internal error (request {REQUEST_ID.get()}); see the server log",
                          "type": "server_error", "param": None, "code": None}})


def engine_error(exc: RequestFailedError | EngineDeadError) -> APIError:
    """The engine's failures as HTTP answers: this request alone (500) or the engine (503)."""
    if isinstance(exc, RequestFailedError):
        return APIError(500, str(exc), "server_error", code="engine_error")
    return APIError(503, str(exc), "service_unavailable", code="engine_dead")


# ---- logprob formats ------------------------------------------------------------------------


def _token_text(engine: LLMEngine, token_id: int, lp: PositionLogprobs | None) -> str:
    if lp is not None and token_id in lp and lp[token_id].decoded_token is not None:
        return lp[token_id].decoded_token  # type: ignore[return-value]
    return engine.token_text(token_id)


def completion_logprobs(
    engine: LLMEngine, token_ids: list[int], positions: list[PositionLogprobs | None], top_n: int, offset: int
) -> dict[str, list]:
    """The legacy completions format: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for tid, pos in zip(token_ids, positions):
        text = _token_text(engine, tid, pos)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if pos is None:
            token_lps.append(None)
            tops.append(None)
            continue
        token_lps.append(pos[tid].logprob)
        best = sorted(pos.items(), key=lambda kv: kv[1].rank)[: max(top_n, 0)]
        tops.append({(lp.decoded_token or ""): lp.logprob for _, lp in best} if top_n else {})
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(engine: LLMEngine, token_ids: list[int], positions: list[PositionLogprobs], top_n: int) -> dict:
    content = []
    for tid, pos in zip(token_ids, positions):
        text = _token_text(engine, tid, pos)
        alts = sorted((kv for kv in pos.items() if kv[1].rank <= top_n), key=lambda kv: kv[1].rank)[:top_n]
        content.append({
            "token": text,
            "logprob": pos[tid].logprob,
            "bytes": list(text.encode("utf-8")),
            "top_logprobs": [
                {"token": lp.decoded_token or "", "logprob": lp.logprob,
                 "bytes": list((lp.decoded_token or "").encode("utf-8"))}
                for _, lp in alts
            ],
        })
    return {"content": content, "refusal": None}


async def off_loop(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) in a worker thread, so tokenizing a long prompt never blocks other requests. A
    Rust extension's panic (a BaseException) comes back as a RuntimeError: a JSON 500, not a
    plain-text one."""
    try:
        return await asyncio.to_thread(fn, *args)
    except (Exception, asyncio.CancelledError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - pyo3's PanicException
        raise RuntimeError(f"{type(exc).__name__}: {exc}") from exc


async def _off_loop(size: int, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args), in a worker thread when `size` (positions) makes it slow enough to stall the loop."""
    return await off_loop(fn, *args) if size > 64 else fn(*args)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ---- the app --------------------------------------------------------------------------------


def repository_error(exc: Exception, name: str) -> APIError:
    """The HTTP answer to a failed model control operation."""
    if isinstance(exc, ModelUnavailableError):
        return APIError(404, str(exc), "invalid_request_error", "name", "model_not_found")
    if isinstance(exc, RepositoryConflictError):
        return APIError(409, str(exc), "conflict_error", code="conflict")
    if isinstance(exc, MemoryBudgetError):
        return APIError(507, str(exc), "insufficient_memory_error", code="memory_budget_exceeded")
    if isinstance(exc, ModelLoadError):
        return APIError(500, f"loading {name} failed: {exc}", "server_error", code="load_failed")
    return APIError(400, f"loading {name} failed: {exc}", "invalid_request_error", code="load_failed")


def version_headers(lease: Lease) -> dict[str, str]:
    return {"X-Surge-Model-Version": lease.fingerprint}


def build_app(state: ServerState) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.loop = asyncio.get_running_loop()
        state.aborting = asyncio.Event()
        yield

    app = FastAPI(title="surge", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible completions and chat, tokenizer routes, Triton's model "
                              "repository API, health, readiness and metrics.")
    app.state.surge = state

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestFailedError)
    @app.exception_handler(EngineDeadError)
    async def _engine_error(_: Request, exc: RequestFailedError | EngineDeadError) -> JSONResponse:
        return engine_error(exc).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:  # the last line of defence
        logger.exception("unexpected error")
        return error_response(500, f"internal error (request {REQUEST_ID.get()}); see the server log",
                              "server_error")

    if state.settings.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(state.settings.allowed_origins),
                           allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["*"],
                           expose_headers=["X-Request-Id", "X-Surge-Model-Version", "Retry-After"])
    app.add_middleware(Guard, settings=state.settings, record_status=state.metrics.record_status)

    @app.get("/health")
    async def health() -> Response:
        """Liveness: 200 while the process can serve (loading and draining included); 503 with the
        cause once an engine has died or the model failed to load (the process then exits)."""
        if state.engine_error is not None or state.status == "failed":
            return JSONResponse({"status": "dead", "error": state.engine_error or state.load_error},
                                status_code=503)
        return JSONResponse({"status": "ok" if state.status == "ready" else state.status})

    @app.get("/ready")
    async def ready() -> Response:
        """Readiness: 200 when requests are taken (with the serving versions), 503 while loading,
        draining, failed or with no model."""
        serving = [d for d in state.repository.serving() if d.async_engine.is_running]
        if state.status == "ready" and serving and state.engine_error is None:
            return JSONResponse({"status": "ready", "models": sorted(d.key for d in serving)})
        status = state.status if state.status != "ready" else ("dead" if state.engine_error else "no model ready")
        return JSONResponse({"status": status, "error": state.engine_error or state.load_error}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # ---- model control (Triton's repository API) -------------------------------------------

    @app.get("/v2/repository/index")
    async def repository_index() -> JSONResponse:
        return JSONResponse(state.repository.index())

    @app.post("/v2/repository/index", openapi_extra=request_body(IndexRequest, required=False))
    async def repository_index_post(request: Request) -> JSONResponse:
        """Triton's form: {"ready": true} lists only the versions that can serve now."""
        body = await read_body(request, IndexRequest)
        rows = state.repository.index()
        return JSONResponse([r for r in rows if r["state"] == "READY"] if body.ready else rows)

    @app.post("/v2/repository/models/{name}/load", openapi_extra=request_body(LoadRequest, required=False))
    async def load_model(name: str, request: Request) -> JSONResponse:
        body = await read_body(request, LoadRequest)
        version = None if body.version is None else str(body.version)
        try:
            record = await asyncio.to_thread(state.repository.load, name, version)
        except SurgeError as exc:
            raise repository_error(exc, f"{name}:{version or 'newest'}") from exc
        return JSONResponse({"name": name, "version": record.version, "state": record.state.value,
                             "serving": True})

    @app.post("/v2/repository/models/{name}/unload", openapi_extra=request_body(EmptyRequest, required=False))
    async def unload_model(name: str, request: Request) -> JSONResponse:
        await read_body(request, EmptyRequest)
        try:
            await asyncio.to_thread(state.repository.unload, name)
        except SurgeError as exc:
            raise repository_error(exc, name) from exc
        return JSONResponse({"name": name, "state": "UNAVAILABLE"})

    @app.post("/v2/repository/models/{name}/rollback", openapi_extra=request_body(EmptyRequest, required=False))
    async def rollback_model(name: str, request: Request) -> JSONResponse:
        await read_body(request, EmptyRequest)
        try:
            record = await asyncio.to_thread(state.repository.rollback, name)
        except SurgeError as exc:
            raise repository_error(exc, name) from exc
        return JSONResponse({"name": name, "version": record.version, "state": record.state.value,
                             "serving": True})

    # ---- dashboard ---------------------------------------------------------------------------

    @app.get("/dashboard")
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(dashboard_html())

    @app.get("/dashboard/data")
    async def dashboard_data(since: float | None = None) -> JSONResponse:
        data = state.history.data(since)
        data["repository"] = [{k: v for k, v in row.items() if k != "path"} for row in state.repository.index()]
        cache = state.response_cache
        data["response_cache"] = None if cache is None else {
            "size": len(cache), "capacity": cache.capacity, "hits": cache.hits, "misses": cache.misses}
        data["status"] = state.status
        return JSONResponse(data)

    # ---- OpenAI API ----------------------------------------------------------------------------

    @app.get("/v1/models")
    async def models() -> dict:
        data = []
        for dep in sorted(state.repository.serving(), key=lambda d: d.name):
            data.append({"id": dep.name, "object": "model", "created": state.created, "owned_by": "surge",
                         "max_model_len": dep.engine.max_model_len, "version": dep.version})
        return {"object": "list", "data": data}

    @app.post("/tokenize", openapi_extra=request_body(TokenizeRequest))
    async def tokenize(request: Request) -> dict:
        body = await read_body(request, TokenizeRequest)
        with Lease(state, body.model) as lease:
            engine = lease.engine
            if (body.prompt is None) == (body.messages is None):
                raise bad_request("give exactly one of 'prompt' or 'messages'")

            def encode() -> list[int]:
                if body.messages is not None:
                    return encode_chat(engine, body.messages, body.add_generation_prompt)
                try:
                    return engine.tokenizer.encode(body.prompt or "", add_special_tokens=body.add_special_tokens)
                except SurgeError as exc:
                    raise bad_request(str(exc), "prompt") from exc

            ids = await off_loop(encode)
            return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len}

    @app.post("/detokenize", openapi_extra=request_body(DetokenizeRequest))
    async def detokenize(request: Request) -> dict:
        body = await read_body(request, DetokenizeRequest)
        with Lease(state, body.model) as lease:
            engine = lease.engine
            bad = [t for t in body.tokens if not 0 <= t < engine.vocab_size]
            if bad:
                raise bad_request(f"token id {bad[0]} is outside the vocabulary [0, {engine.vocab_size})", "tokens")
            text = await off_loop(lambda: engine.tokenizer.decode(body.tokens, skip_special_tokens=False))
            return {"prompt": text}

    @app.post("/v1/completions", openapi_extra=request_body(CompletionRequest))
    async def completions(request: Request) -> Response:
        body = await read_body(request, CompletionRequest)
        raw_prompts = body.prompts()
        limit = state.settings.max_prompts
        if len(raw_prompts) > limit:
            raise bad_request(f"the request has {len(raw_prompts)} prompts; at most {limit} per request "
                              "(--max-prompts)", "prompt")
        want_prompt_lps = bool(body.echo) and body.logprobs is not None
        params = sampling(lambda: body.sampling_params(body.effective_max_tokens(), body.logprobs,
                                                       body.logprobs if want_prompt_lps else None))
        lease = Lease(state, body.model, body.n * len(raw_prompts))
        try:
            engine = lease.engine
            prompts = await off_loop(prepare_prompts, engine, raw_prompts, params)
            rid = f"cmpl-{uuid.uuid4().hex}"
            created = int(time.time())
            deadline = _deadline(state)
            gens = [lease.generate(ids, params, f"{rid}-{i}", body.priority, prompt_text=text)
                    for i, (text, ids) in enumerate(prompts)]
        except BaseException:
            lease.release()
            raise
        n = params.n

        def prompt_text(i: int) -> str:
            text, ids = prompts[i]
            return text if text is not None else engine.tokenizer.decode(ids, skip_special_tokens=False)

        if body.streaming:
            return StreamingResponse(
                _stream_completion(state, lease, body, gens, prompts, prompt_text, rid, created, deadline),
                media_type="text/event-stream", background=BackgroundTask(lease.release),
                headers=version_headers(lease))

        async def collect() -> dict:
            finals: dict[int, RequestOutput] = {}
            tracks = [_Track(time.monotonic()) for _ in prompts]
            async for i, out in merged(gens, deadline, state.aborting):
                tracks[i].saw(out)
                finals[i] = out

            def build() -> list[dict]:  # logprobs of an 8k-token echo take a while: off the event loop
                choices = []
                for i in range(len(prompts)):
                    out = finals[i]
                    for c in sorted(out.outputs, key=lambda c: c.index):
                        text = c.text
                        lps = None
                        if body.logprobs is not None:
                            ids, positions = c.token_ids, list(c.logprobs or [])
                            if body.echo:
                                ids = prompts[i][1] + ids
                                positions = list(out.prompt_logprobs or [None] * len(prompts[i][1])) + positions
                            lps = completion_logprobs(engine, ids, positions, body.logprobs, 0)
                        if body.echo:
                            text = prompt_text(i) + text
                        choices.append({"index": i * n + c.index, "text": text, "logprobs": lps,
                                        "finish_reason": c.finish_reason})
                return choices

            choices = await off_loop(build) if body.logprobs is not None or body.echo else build()
            completion_tokens = 0
            end = time.monotonic()
            for i in range(len(prompts)):
                for c in finals[i].outputs:
                    completion_tokens += len(c.token_ids)
                    state.metrics.record_finish(lease.deployment.name, c.finish_reason)
                state.metrics.record_request(lease.deployment.name, tracks[i].start, tracks[i].first, end,
                                             tracks[i].tokens)
            return {"id": rid, "object": "text_completion", "created": created, "model": lease.model,
                    "system_fingerprint": lease.fingerprint, "choices": choices,
                    "usage": usage(sum(len(p[1]) for p in prompts), completion_tokens)}

        try:
            return JSONResponse(await until_disconnect(request, collect()), headers=version_headers(lease))
        finally:
            lease.release()

    @app.post("/v1/chat/completions", openapi_extra=request_body(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        body = await read_body(request, ChatCompletionRequest)
        if body.top_logprobs is not None and not body.logprobs:
            raise bad_request("'top_logprobs' requires 'logprobs' to be true", "top_logprobs")
        top_n = (body.top_logprobs or 0) if body.logprobs else None
        params = sampling(lambda: body.sampling_params(
            body.effective_max_tokens(state.settings.max_tokens_default), top_n, None))
        lease = Lease(state, body.model, body.n)
        try:
            engine = lease.engine

            def prepare() -> list[int]:
                ids = encode_chat(engine, body.messages, body.add_generation_prompt)
                return prepare_prompts(engine, [ids], params)[0][1]

            ids = await off_loop(prepare)
            rid = f"chatcmpl-{uuid.uuid4().hex}"
            created = int(time.time())
            deadline = _deadline(state)
            gens = [lease.generate(ids, params, rid, body.priority)]
        except BaseException:
            lease.release()
            raise
        if body.streaming:
            return StreamingResponse(
                _stream_chat(state, lease, body, gens[0], len(ids), rid, created, deadline, top_n),
                media_type="text/event-stream", background=BackgroundTask(lease.release),
                headers=version_headers(lease))

        async def collect() -> dict:
            final: RequestOutput | None = None
            track = _Track(time.monotonic())
            async for _, out in merged(gens, deadline, state.aborting):
                track.saw(out)
                final = out
            assert final is not None
            choices = []
            for c in sorted(final.outputs, key=lambda c: c.index):
                choices.append({
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": chat_logprobs(engine, c.token_ids, c.logprobs or [], top_n)
                    if top_n is not None else None,
                    "finish_reason": c.finish_reason,
                })
                state.metrics.record_finish(lease.deployment.name, c.finish_reason)
            state.metrics.record_request(lease.deployment.name, track.start, track.first, time.monotonic(),
                                         track.tokens)
            completion_tokens = sum(len(c.token_ids) for c in final.outputs)
            return {"id": rid, "object": "chat.completion", "created": created, "model": lease.model,
                    "system_fingerprint": lease.fingerprint, "choices": choices,
                    "usage": usage(len(ids), completion_tokens)}

        try:
            return JSONResponse(await until_disconnect(request, collect()), headers=version_headers(lease))
        finally:
            lease.release()

    install_request_schemas(app)
    return app


def _deadline(state: ServerState) -> float | None:
    timeout = state.settings.request_timeout
    return time.monotonic() + timeout if timeout else None


async def _stream_completion(
    state: ServerState, lease: Lease, body: CompletionRequest, gens: list, prompts: list,
    prompt_text: Callable[[int], str], rid: str, created: int, deadline: float | None,
) -> AsyncIterator[str]:
    n = body.n
    engine = lease.engine
    model = lease.deployment.name
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    tracks = [_Track(time.monotonic()) for _ in prompts]
    echoed: set[int] = set()
    offsets: dict[int, int] = {}
    completion_tokens = 0

    def chunk(index: int, text: str, logprobs: Any, finish: str | None) -> str:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return sse_chunk(lease, rid, created, "text_completion", choice, include_usage)

    try:
        async for i, out in merged(gens, deadline, state.aborting):
            tracks[i].saw(out)
            for c in out.outputs:
                index = i * n + c.index
                text = c.text
                lps = None
                ids, positions = list(c.token_ids), list(c.logprobs or [])
                if body.echo and index not in echoed:
                    echoed.add(index)
                    text = prompt_text(i) + text
                    if body.logprobs is not None:
                        ids = prompts[i][1] + ids
                        positions = list(out.prompt_logprobs or [None] * len(prompts[i][1])) + positions
                if body.logprobs is not None:
                    lps = await _off_loop(len(ids), completion_logprobs, engine, ids, positions, body.logprobs,
                                          offsets.get(index, 0))
                    offsets[index] = offsets.get(index, 0) + sum(len(t) for t in lps["tokens"])
                completion_tokens += len(c.token_ids)
                if c.finish_reason is not None:
                    state.metrics.record_finish(model, c.finish_reason)
                yield chunk(index, text, lps, c.finish_reason)
            if out.finished:
                state.metrics.record_request(model, tracks[i].start, tracks[i].first, time.monotonic(),
                                             tracks[i].tokens)
        if include_usage:
            yield sse({"id": rid, "object": "text_completion", "created": created, "model": lease.model,
                       "system_fingerprint": lease.fingerprint, "choices": [],
                       "usage": usage(sum(len(p[1]) for p in prompts), completion_tokens)})
    except Exception as exc:  # noqa: BLE001 - every failure ends the stream with an error event
        yield stream_error(exc)
    finally:
        lease.release()
    yield sse("[DONE]")


async def _stream_chat(
    state: ServerState, lease: Lease, body: ChatCompletionRequest, gen: Any, prompt_tokens: int,
    rid: str, created: int, deadline: float | None, top_n: int | None,
) -> AsyncIterator[str]:
    engine = lease.engine
    model = lease.deployment.name
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    track = _Track(time.monotonic())
    completion_tokens = 0

    def chunk(index: int, delta: dict, logprobs: Any, finish: str | None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return sse_chunk(lease, rid, created, "chat.completion.chunk", choice, include_usage)

    try:
        for index in range(body.n):  # the role comes first, as OpenAI sends it
            yield chunk(index, {"role": "assistant", "content": ""}, None, None)
        async for _, out in merged([gen], deadline, state.aborting):
            track.saw(out)
            for c in out.outputs:
                completion_tokens += len(c.token_ids)
                if c.text or c.token_ids:
                    lps = chat_logprobs(engine, c.token_ids, c.logprobs or [], top_n) if top_n is not None else None
                    if c.text or lps:
                        yield chunk(c.index, {"content": c.text}, lps, None)
                if c.finish_reason is not None:
                    state.metrics.record_finish(model, c.finish_reason)
                    yield chunk(c.index, {}, None, c.finish_reason)
        state.metrics.record_request(model, track.start, track.first, time.monotonic(), track.tokens)
        if include_usage:
            yield sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": lease.model,
                       "system_fingerprint": lease.fingerprint, "choices": [],
                       "usage": usage(prompt_tokens, completion_tokens)})
    except Exception as exc:  # noqa: BLE001 - every failure ends the stream with an error event
        yield stream_error(exc)
    finally:
        lease.release()
    yield sse("[DONE]")
