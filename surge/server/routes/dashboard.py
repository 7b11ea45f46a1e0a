"""The live dashboard: /dashboard (the page) and /dashboard/data (what it draws)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, JSONResponse

from surge.server.dashboard import dashboard_html
from surge.server.state import ServerState


def router(state: ServerState) -> APIRouter:
    api = APIRouter()

    @api.get("/dashboard")
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(dashboard_html())

    @api.get("/dashboard/data")
    async def dashboard_data(since: float | None = None) -> JSONResponse:
        data = state.history.data(since)
        data["repository"] = [{k: v for k, v in row.items() if k != "path"} for row in state.repository.index()]
        cache = state.response_cache
        data["response_cache"] = None if cache is None else {
            "size": len(cache), "capacity": cache.capacity, "hits": cache.hits, "misses": cache.misses}
        data["status"] = state.status
        return JSONResponse(data)

    return api
