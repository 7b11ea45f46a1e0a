"""The FastAPI app: OpenAI's completions and chat endpoints over the AsyncEngine.

Every error a client can cause is answered in OpenAI's error JSON with its status (400, 401,
404, 408, 429, 503); nothing a client sends reaches the engine unvalidated, and a request
that ends early for any reason (disconnect, timeout, error) is aborted so its KV blocks are
freed at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.background import BackgroundTask

from surge.engine.async_engine import AsyncEngine, EngineDeadError
from surge.engine.llm_engine import EngineStats, LLMEngine
from surge.errors import SurgeError
from surge.loader.memory import MemoryBudgetError
from surge.outputs import PositionLogprobs, RequestOutput
from surge.sampling_params import RequestOutputKind, SamplingParams
from surge.server.dashboard import StatsHistory, dashboard_html
from surge.server.errors import APIError, bad_request, error_response
from surge.server.metrics import ServerMetrics
from surge.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
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

logger = logging.getLogger(__name__)

PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")
ADMIN_PREFIX = "/v2/"


@dataclass
class ServerSettings:
    api_key: str | None = None
    admin_key: str | None = None  # guards /v2 (the model control API); the api key does when unset
    max_queue: int | None = None  # requests allowed to wait beyond the running slots, per model
    request_timeout: float | None = None  # seconds
    response_cache_size: int = 0  # finished deterministic generations kept; 0: off
    retry_after_s: int = 1


@dataclass
class ServerState:
    """What the routes share; `status` is loading -> ready -> draining (or failed)."""

    repository: ModelRepository
    settings: ServerSettings
    status: str = "loading"
    load_error: str | None = None
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


async def parse_body(request: Request, model: type[BaseModel]) -> Any:
    """The body as `model`, or a 400 that names the bad field."""
    try:
        raw = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"malformed JSON body: {exc}") from exc
    if not isinstance(raw, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise bad_request(f"invalid value for '{loc}': {err['msg']}", param=loc or None) from exc


class Lease:
    """A request's hold on the deployment it is routed to: taken before anything is queued,
    returned when the response has been sent, so a retired version unloads only after it."""

    def __init__(self, state: ServerState, requested: str | None):
        if state.status != "ready":
            raise APIError(503, f"the server is {state.status}; retry later", "service_unavailable")
        try:
            self.deployment, self.model = state.repository.acquire(requested)
        except ModelUnavailableError as exc:
            raise APIError(404, str(exc), "invalid_request_error", "model", "model_not_found") from exc
        except ModelRequiredError as exc:
            raise bad_request(str(exc), "model") from exc
        self.state = state
        self.released = False
        self.engine: LLMEngine = self.deployment.engine
        self.aengine: AsyncEngine = self.deployment.async_engine
        if not self.aengine.is_running:
            self.release()
            raise APIError(503, f"the engine of {self.deployment.key} has stopped: {self.aengine.error}",
                           "service_unavailable")
        limit = state.settings.max_queue
        if limit is not None and self.deployment.in_flight > self.engine.scheduler.max_num_seqs + limit:
            self.release()
            raise APIError(429, f"{self.model} is at capacity ({self.deployment.in_flight - 1} requests in flight, "
                                f"waiting room of {limit}); retry later", "rate_limit_exceeded",
                           headers={"Retry-After": str(state.settings.retry_after_s)})

    @property
    def fingerprint(self) -> str:
        """Which version answered, as OpenAI's `system_fingerprint` and the X-Surge-Model-Version header."""
        return self.deployment.key

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.state.repository.release(self.deployment)

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


def prepare_prompt(engine: LLMEngine, prompt: str | list[int], params: SamplingParams) -> tuple[str | None, list[int]]:
    try:
        text, ids = engine.tokenize_prompt(prompt)
        engine.validate(ids, params)
    except SurgeError as exc:
        raise bad_request(str(exc), param="prompt") from exc
    return text, ids


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


async def merged(gens: list[AsyncIterator[RequestOutput]], deadline: float | None) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several engine streams as they come, tagged with the stream's index.

    Leaving early (timeout, disconnect, error) cancels every stream, which aborts its request.
    """
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

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
    try:
        while remaining:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                i, item = await asyncio.wait_for(queue.get(), timeout)
            except asyncio.TimeoutError:
                raise APIError(408, "the request exceeded the server's --request-timeout and was aborted",
                               "timeout_error", code="request_timeout") from None
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
    if isinstance(exc, APIError):
        return sse({"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}})
    return sse({"error": {"message": str(exc), "type": "server_error", "param": None, "code": None}})


# ---- logprob formats ------------------------------------------------------------------------


def _token_text(engine: LLMEngine, token_id: int, lp: PositionLogprobs | None) -> str:
    if lp is not None and token_id in lp and lp[token_id].decoded_token is not None:
        return lp[token_id].decoded_token  # type: ignore[return-value]
    return engine.tokenizer.decode([token_id], skip_special_tokens=False)


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


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ---- the app --------------------------------------------------------------------------------


class AuthAndStatusMiddleware:
    """Checks bearer keys (the API key on /v1 and the tokenizer routes, the admin key on /v2)
    and counts responses by status.

    Plain ASGI (not BaseHTTPMiddleware), so endpoints still see the client's disconnect.
    """

    def __init__(self, app: Any, state: ServerState):
        self.app = app
        self.state = state

    def _required_key(self, path: str) -> str | None:
        settings = self.state.settings
        if path.startswith(ADMIN_PREFIX):
            return settings.admin_key or settings.api_key
        return settings.api_key

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if not path.startswith((*PROTECTED_PREFIXES, ADMIN_PREFIX)):
            await self.app(scope, receive, send)
            return
        key = self._required_key(path)
        if key is not None:
            headers = dict(scope.get("headers") or [])
            if headers.get(b"authorization", b"").decode("latin-1") != f"Bearer {key}":
                which = "admin key" if path.startswith(ADMIN_PREFIX) and self.state.settings.admin_key else "API key"
                response = error_response(401, f"missing or invalid {which}: send 'Authorization: Bearer <key>'",
                                          "authentication_error", code="invalid_api_key")
                self.state.metrics.record_status(path, 401)
                await response(scope, receive, send)
                return
        status = 500

        async def send_and_note(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.state.metrics.record_status(path, status)


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
    app = FastAPI(title="surge", version="0.1.0")
    app.state.surge = state

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:  # the last line of defence
        logger.exception("unexpected error")
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    app.add_middleware(AuthAndStatusMiddleware, state=state)

    @app.get("/health")
    async def health() -> Response:
        serving = [d for d in state.repository.serving() if d.async_engine.is_running]
        if state.status == "ready" and serving:
            return JSONResponse({"status": "ok", "models": sorted(d.key for d in serving)})
        return JSONResponse({"status": state.status if state.status != "ready" else "no model ready",
                             "error": state.load_error}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # ---- model control (Triton's repository API) -------------------------------------------

    @app.api_route("/v2/repository/index", methods=["GET", "POST"])
    async def repository_index() -> JSONResponse:
        return JSONResponse(state.repository.index())

    async def control_body(request: Request) -> dict:
        raw = await request.body()
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise bad_request(f"malformed JSON body: {exc}") from exc
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object")
        return body

    @app.post("/v2/repository/models/{name}/load")
    async def load_model(name: str, request: Request) -> JSONResponse:
        body = await control_body(request)
        version = body.get("version")
        if version is not None and (isinstance(version, bool) or not str(version).isdigit()):
            raise bad_request(f"'version' must be a positive integer, got {version!r}", "version")
        try:
            record = await asyncio.to_thread(state.repository.load, name, None if version is None else str(version))
        except SurgeError as exc:
            raise repository_error(exc, f"{name}:{version or 'newest'}") from exc
        return JSONResponse({"name": name, "version": record.version, "state": record.state.value,
                             "serving": True})

    @app.post("/v2/repository/models/{name}/unload")
    async def unload_model(name: str, request: Request) -> JSONResponse:
        await control_body(request)
        try:
            await asyncio.to_thread(state.repository.unload, name)
        except SurgeError as exc:
            raise repository_error(exc, name) from exc
        return JSONResponse({"name": name, "state": "UNAVAILABLE"})

    @app.post("/v2/repository/models/{name}/rollback")
    async def rollback_model(name: str, request: Request) -> JSONResponse:
        await control_body(request)
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

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        body = await parse_body(request, TokenizeRequest)
        with Lease(state, body.model) as lease:
            engine = lease.engine
            if (body.prompt is None) == (body.messages is None):
                raise bad_request("give exactly one of 'prompt' or 'messages'")
            try:
                if body.messages is not None:
                    ids = engine.tokenizer.encode_chat([m.as_template_dict() for m in body.messages],
                                                       body.add_generation_prompt)
                else:
                    ids = engine.tokenizer.encode(body.prompt or "", add_special_tokens=body.add_special_tokens)
            except SurgeError as exc:
                raise bad_request(str(exc)) from exc
            return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        body = await parse_body(request, DetokenizeRequest)
        with Lease(state, body.model) as lease:
            engine = lease.engine
            bad = [t for t in body.tokens if not 0 <= t < engine.vocab_size]
            if bad:
                raise bad_request(f"token id {bad[0]} is outside the vocabulary [0, {engine.vocab_size})", "tokens")
            return {"prompt": engine.tokenizer.decode(body.tokens, skip_special_tokens=False)}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await parse_body(request, CompletionRequest)
        lease = Lease(state, body.model)
        try:
            engine = lease.engine
            want_prompt_lps = body.echo and body.logprobs is not None
            params = sampling(lambda: body.sampling_params(body.max_tokens, body.logprobs,
                                                           body.logprobs if want_prompt_lps else None))
            prompts = [prepare_prompt(engine, p, params) for p in body.prompts()]
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

        if body.stream:
            return StreamingResponse(
                _stream_completion(state, lease, body, gens, prompts, prompt_text, rid, created, deadline),
                media_type="text/event-stream", background=BackgroundTask(lease.release),
                headers=version_headers(lease))

        async def collect() -> dict:
            finals: dict[int, RequestOutput] = {}
            tracks = [_Track(time.monotonic()) for _ in prompts]
            async for i, out in merged(gens, deadline):
                tracks[i].saw(out)
                finals[i] = out
            choices = []
            completion_tokens = 0
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
                    completion_tokens += len(c.token_ids)
                    choices.append({"index": i * n + c.index, "text": text, "logprobs": lps,
                                    "finish_reason": c.finish_reason})
                    state.metrics.record_finish(lease.deployment.name, c.finish_reason)
                end = time.monotonic()
                state.metrics.record_request(lease.deployment.name, tracks[i].start, tracks[i].first, end,
                                             tracks[i].tokens)
            return {"id": rid, "object": "text_completion", "created": created, "model": lease.model,
                    "system_fingerprint": lease.fingerprint, "choices": choices,
                    "usage": usage(sum(len(p[1]) for p in prompts), completion_tokens)}

        try:
            return JSONResponse(await until_disconnect(request, collect()), headers=version_headers(lease))
        finally:
            lease.release()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await parse_body(request, ChatCompletionRequest)
        lease = Lease(state, body.model)
        try:
            engine = lease.engine
            if body.top_logprobs is not None and not body.logprobs:
                raise bad_request("'top_logprobs' requires 'logprobs' to be true", "top_logprobs")
            top_n = (body.top_logprobs or 0) if body.logprobs else None
            params = sampling(lambda: body.sampling_params(body.effective_max_tokens(), top_n, None))
            try:
                ids = engine.tokenizer.encode_chat([m.as_template_dict() for m in body.messages],
                                                   body.add_generation_prompt)
            except SurgeError as exc:
                raise bad_request(str(exc), "messages") from exc
            _, ids = prepare_prompt(engine, ids, params)
            rid = f"chatcmpl-{uuid.uuid4().hex}"
            created = int(time.time())
            deadline = _deadline(state)
            gens = [lease.generate(ids, params, rid, body.priority)]
        except BaseException:
            lease.release()
            raise
        if body.stream:
            return StreamingResponse(
                _stream_chat(state, lease, body, gens[0], len(ids), rid, created, deadline, top_n),
                media_type="text/event-stream", background=BackgroundTask(lease.release),
                headers=version_headers(lease))

        async def collect() -> dict:
            final: RequestOutput | None = None
            track = _Track(time.monotonic())
            async for _, out in merged(gens, deadline):
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
        async for i, out in merged(gens, deadline):
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
                    lps = completion_logprobs(engine, ids, positions, body.logprobs, offsets.get(index, 0))
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
    except (APIError, EngineDeadError) as exc:
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
        async for _, out in merged([gen], deadline):
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
    except (APIError, EngineDeadError) as exc:
        yield stream_error(exc)
    finally:
        lease.release()
    yield sse("[DONE]")
