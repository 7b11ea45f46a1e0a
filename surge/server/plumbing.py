"""HTTP plumbing every route uses: strict body parsing, blocking work off the event loop,
cancelling on disconnect, server-sent events, and the engine's failures as HTTP answers."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ValidationError

from surge.engine.async_engine import EngineDeadError, RequestFailedError
from surge.server.errors import APIError, bad_request
from surge.server.guard import REQUEST_ID

logger = logging.getLogger(__name__)


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


async def off_loop_if_long(size: int, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args), in a worker thread when `size` (positions) makes it slow enough to stall the loop."""
    return await off_loop(fn, *args) if size > 64 else fn(*args)


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


def engine_error(exc: RequestFailedError | EngineDeadError) -> APIError:
    """The engine's failures as HTTP answers: this request alone (500) or the engine (503)."""
    if isinstance(exc, RequestFailedError):
        return APIError(500, str(exc), "server_error", code="engine_error")
    return APIError(503, str(exc), "service_unavailable", code="engine_dead")


def stream_error(exc: BaseException) -> str:
    """The error event that ends a stream whatever went wrong (the status line was sent already)."""
    if isinstance(exc, (RequestFailedError, EngineDeadError)):
        exc = engine_error(exc)
    if isinstance(exc, APIError):
        return sse({"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}})
    logger.error("stream failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
    return sse({"error": {"message": f"internal error (request {REQUEST_ID.get()}); see the server log",
                          "type": "server_error", "param": None, "code": None}})
