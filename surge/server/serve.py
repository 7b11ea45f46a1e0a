"""`surge serve`: load the model in the background (health says 503 meanwhile), serve with
uvicorn, and on SIGTERM drain: refuse new work, finish in-flight requests within a grace
period, then exit 0."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

import uvicorn

from surge.engine.async_engine import AsyncEngine
from surge.server.app import ServerSettings, ServerState, build_app

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
        engine = self.state.async_engine
        while time.monotonic() < deadline:
            busy = self.state.in_flight or (engine is not None and engine.num_unfinished())
            if not busy:
                break
            time.sleep(0.05)
        else:
            logger.warning("grace period over with %d requests in flight; aborting them", self.state.in_flight)
        self.should_exit = True


def _load(state: ServerState, load: Callable[[], object], on_fail: Callable[[], None]) -> None:
    try:
        engine = load()
        state.engine = engine  # type: ignore[assignment]
        aengine = AsyncEngine(engine)  # type: ignore[arg-type]
        aengine.start()
        state.async_engine = aengine
        if state.status == "loading":
            state.status = "ready"
    except BaseException as exc:  # noqa: BLE001 - reported through health and the exit code
        state.status = "failed"
        state.load_error = f"{type(exc).__name__}: {exc}"
        logger.error("loading the model failed: %s", state.load_error)
        on_fail()


def serve(load: Callable[[], object], model_name: str, settings: ServerSettings, options: ServeOptions,
          describe: Callable[[object], str]) -> int:
    """Serve until stopped; returns the process exit code (0 after a drain, 2 if loading failed)."""
    state = ServerState(model_name, settings)
    app = build_app(state)
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level=options.log_level,
                            timeout_graceful_shutdown=max(1, int(options.shutdown_grace)), access_log=False)
    server = _DrainingServer(config, state, options.shutdown_grace)

    def on_fail() -> None:
        server.should_exit = True

    def after_load() -> None:
        _load(state, load, on_fail)
        if state.status == "ready":
            logger.info("%s", describe(state.engine))
            logger.info("serving %s at http://%s:%d/v1 (health: /health, metrics: /metrics)",
                        model_name, options.host, options.port)

    loader = threading.Thread(target=after_load, name="surge-load", daemon=True)
    loader.start()
    try:
        asyncio.run(server.serve())
    finally:
        if state.async_engine is not None:
            state.async_engine.shutdown()
    return 2 if state.status == "failed" else 0
