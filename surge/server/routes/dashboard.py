"""The live dashboard: /dashboard (the page) and /dashboard/data (what it draws)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, JSONResponse

from surge.engine.data_parallel import ReplicaReport
from surge.server.dashboard import dashboard_html
from surge.server.state import ServerState


def replica_row(model: str, version: str, r: ReplicaReport) -> dict[str, Any]:
    """One data-parallel replica as the dashboard's replica table shows it."""
    stats, c = r.stats, r.router
    return {"model": model, "version": version, "replica": r.index, "state": r.state, "node": r.where,
            "pid": r.pid, "restarts": r.restarts, "routed": c.routed, "by_affinity": c.by_affinity,
            "by_load": c.by_load, "explicit": c.explicit, "outstanding": c.outstanding, "weight": c.weight,
            "running": None if stats is None else stats.num_running,
            "waiting": None if stats is None else stats.num_waiting,
            "kv_cache_usage": None if stats is None else stats.kv_cache_usage,
            "prefix_cache_hit_rate": None if stats is None else stats.prefix_cache_hit_rate}


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
        data["replicas"] = [replica_row(model, version, r) for model, version, r in state.replica_reports()]
        return JSONResponse(data)

    return api
