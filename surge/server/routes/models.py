"""The served models: OpenAI's GET /v1/models and Triton's repository API (index, load,
unload, rollback), which drive the repository's version state machine."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from surge.errors import SurgeError
from surge.server.budget import MemoryBudgetError
from surge.server.errors import APIError
from surge.server.openapi import request_body
from surge.server.plumbing import read_body
from surge.server.protocol import EmptyRequest, IndexRequest, LoadRequest
from surge.server.repository import Deployment, ModelLoadError, ModelUnavailableError, RepositoryConflictError
from surge.server.state import ServerState


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


def router(state: ServerState) -> APIRouter:
    api = APIRouter()

    @api.get("/v1/models")
    async def models() -> dict:
        data = []
        for dep in sorted(state.repository.serving(), key=lambda d: d.name):
            if isinstance(dep, Deployment):
                max_len = dep.engine.max_model_len
            elif dep.model.embedder is not None:  # an encoder: /v1/embeddings; other tensor models: /v2 only
                max_len = dep.model.embedder.config.max_length
            else:
                continue
            data.append({"id": dep.name, "object": "model", "created": state.created, "owned_by": "surge",
                         "max_model_len": max_len, "version": dep.version})
        return {"object": "list", "data": data}

    @api.get("/v2/repository/index")
    async def repository_index() -> JSONResponse:
        return JSONResponse(state.repository.index())

    @api.post("/v2/repository/index", openapi_extra=request_body(IndexRequest, required=False))
    async def repository_index_post(request: Request) -> JSONResponse:
        """Triton's form: {"ready": true} lists only the versions that can serve now."""
        body = await read_body(request, IndexRequest)
        rows = state.repository.index()
        return JSONResponse([r for r in rows if r["state"] == "READY"] if body.ready else rows)

    @api.post("/v2/repository/models/{name}/load", openapi_extra=request_body(LoadRequest, required=False))
    async def load_model(name: str, request: Request) -> JSONResponse:
        body = await read_body(request, LoadRequest)
        version = None if body.version is None else str(body.version)
        try:
            record = await asyncio.to_thread(state.repository.load, name, version)
        except SurgeError as exc:
            raise repository_error(exc, f"{name}:{version or 'newest'}") from exc
        return JSONResponse({"name": name, "version": record.version, "state": record.state.value,
                             "serving": True})

    @api.post("/v2/repository/models/{name}/unload", openapi_extra=request_body(EmptyRequest, required=False))
    async def unload_model(name: str, request: Request) -> JSONResponse:
        await read_body(request, EmptyRequest)
        try:
            await asyncio.to_thread(state.repository.unload, name)
        except SurgeError as exc:
            raise repository_error(exc, name) from exc
        return JSONResponse({"name": name, "state": "UNAVAILABLE"})

    @api.post("/v2/repository/models/{name}/rollback", openapi_extra=request_body(EmptyRequest, required=False))
    async def rollback_model(name: str, request: Request) -> JSONResponse:
        await read_body(request, EmptyRequest)
        try:
            record = await asyncio.to_thread(state.repository.rollback, name)
        except SurgeError as exc:
            raise repository_error(exc, name) from exc
        return JSONResponse({"name": name, "version": record.version, "state": record.state.value,
                             "serving": True})

    return api
