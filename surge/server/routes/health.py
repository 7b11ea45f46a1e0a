"""Liveness (/health), readiness (/ready) and Prometheus metrics (/metrics)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from surge.server.state import ServerState


def router(state: ServerState) -> APIRouter:
    api = APIRouter()

    @api.get("/health")
    async def health() -> Response:
        """Liveness: 200 while the process can serve (loading and draining included); 503 with the
        cause once an engine has died or the model failed to load (the process then exits)."""
        if state.engine_error is not None or state.status == "failed":
            return JSONResponse({"status": "dead", "error": state.engine_error or state.load_error},
                                status_code=503)
        down = [f"{model}:{version} replica {r.index}" for model, version, r in state.replica_reports()
                if r.state == "down"]
        if down and state.status == "ready":  # serving on the other replicas while these restart
            return JSONResponse({"status": "degraded", "replicas_down": down})
        return JSONResponse({"status": "ok" if state.status == "ready" else state.status})

    @api.get("/ready")
    async def ready() -> Response:
        """Readiness: 200 when requests are taken (with the serving versions), 503 while loading,
        draining, failed or with no model."""
        serving = [d for d in state.repository.serving() if d.running]
        if state.status == "ready" and serving and state.engine_error is None:
            return JSONResponse({"status": "ready", "models": sorted(d.key for d in serving)})
        status = state.status if state.status != "ready" else ("dead" if state.engine_error else "no model ready")
        return JSONResponse({"status": status, "error": state.engine_error or state.load_error}, status_code=503)

    @api.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return api
