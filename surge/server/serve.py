"""`surge serve`: load the model (or a repository of models) in the background (health says
503 meanwhile), serve with uvicorn, and on SIGTERM drain: refuse new work, finish in-flight
requests within a grace period, then exit 0."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from dataclasses import dataclass
from types import FrameType

import uvicorn

from surge.server.app import ServerSettings, ServerState, build_app
from surge.server.repository import ModelRepository

logger = logging.getLogger("surge.serve")


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    shutdown_grace: float = 30.0
    log_level: str = "info"


class _DrainingServer(uvicorn.Server):
    """A uvicorn server whose first SIGTERM/SIGINT drains instead of closing at once."""

    def __init__(self, config: uvicorn.Config, state: ServerState, grace: float):
        super().__init__(config)
        self.state = state
        self.grace = grace
        self.draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.draining:  # a second signal: stop now
            self.should_exit = True
            self.force_exit = sig == signal.SIGINT
            return
        self.draining = True
        logger.info("received %s: draining in-flight requests (grace %.0fs)", signal.Signals(sig).name, self.grace)
        if self.state.status == "ready":
            self.state.status = "draining"
        threading.Thread(target=self._drain, name="surge-drain", daemon=True).start()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline:
            if not self.state.in_flight():
                break
            time.sleep(0.05)
        else:
            logger.warning("grace period over with %d requests in flight; aborting them", self.state.in_flight())
        self.should_exit = True


def serve(repository: ModelRepository, settings: ServerSettings, options: ServeOptions,
          poll_interval: float | None = None, exit_on_load_failure: bool = False) -> int:
    """Serve until stopped; returns the process exit code: 0 after a drain, 2 if a model given
    on the command line failed to load (`exit_on_load_failure`)."""
    state = ServerState(repository, settings)
    app = build_app(state)
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level=options.log_level,
                            timeout_graceful_shutdown=max(1, int(options.shutdown_grace)), access_log=False)
    server = _DrainingServer(config, state, options.shutdown_grace)

    def load() -> None:
        try:
            repository.start(poll_interval)
        except BaseException as exc:  # noqa: BLE001 - reported through health and the exit code
            state.status, state.load_error = "failed", f"{type(exc).__name__}: {exc}"
        failed = [f"{row['name']}:{row['version']}: {row['reason']}" for row in repository.index()
                  if row["state"] == "FAILED"]
        if exit_on_load_failure and (failed or not repository.serving()):
            state.status = "failed"
            state.load_error = state.load_error or "; ".join(failed) or "no model loaded"
            logger.error("loading the model failed: %s", state.load_error)
            server.should_exit = True
            return
        if state.status == "loading":
            state.status = "ready"
        state.history.start()
        names = ", ".join(d.key for d in repository.serving()) or "no model yet"
        logger.info("serving %s at http://%s:%d/v1 (health: /health, metrics: /metrics, dashboard: /dashboard)",
                    names, options.host, options.port)

    loader = threading.Thread(target=load, name="surge-load", daemon=True)
    loader.start()
    try:
        asyncio.run(server.serve())
    finally:
        state.history.stop()
        repository.shutdown()
    return 2 if state.status == "failed" else 0
