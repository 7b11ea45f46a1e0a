"""The FastAPI app: error handlers, middleware and the route modules (surge/server/routes/).

Every error a client can cause is answered in OpenAI's error JSON with its status (400, 401,
404, 408, 429, 503); nothing a client sends reaches the engine unvalidated, and a request
that ends early for any reason (disconnect, timeout, error) is aborted so its KV blocks are
freed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

from surge.engine.async_engine import EngineDeadError, RequestFailedError
from surge.server.errors import APIError, error_response
from surge.server.guard import REQUEST_ID, Guard
from surge.server.openapi import install_request_schemas
from surge.server.plumbing import engine_error
from surge.server.routes import chat, completions, dashboard, embeddings, health, kserve, models, tokenize
from surge.server.state import ServerState

logger = logging.getLogger(__name__)

ROUTE_MODULES = (health, models, dashboard, tokenize, completions, chat, embeddings, kserve)


def create_app(state: ServerState) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.loop = asyncio.get_running_loop()
        state.aborting = asyncio.Event()
        grpc_server = None
        if state.settings.grpc_port is not None:
            from surge.server import grpc_service

            grpc_server = await grpc_service.start(state, state.settings.host, state.settings.grpc_port)
        try:
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop(state.settings.shutdown_grace)

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
    for module in ROUTE_MODULES:
        app.include_router(module.router(state))
    install_request_schemas(app)
    return app
