"""`surge serve`: load the model (or a repository of models) in the background (/ready says 503
meanwhile), serve with uvicorn, and stop cleanly.

    SIGTERM / SIGINT -> draining: new requests get 503, in-flight ones run on for the grace
    grace over       -> every request still running ends now: JSON 503, or an error event then
                        [DONE] on a stream; then exit 0 (a few seconds after the grace at most)
    an engine dies   -> /health answers 503 with the cause, clients get 503, exit code 3
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from types import FrameType

import uvicorn

from surge.server.app import create_app
from surge.server.state import ServerState
from surge.server.connection import header_timeout_protocol
from surge.server.repository import ModelRepository
from surge.server.settings import ServerSettings

logger = logging.getLogger("surge.serve")

EXIT_LOAD_FAILED = 2
EXIT_ENGINE_DIED = 3
FLUSH_S = 2.0  # after the grace, time for the aborted requests' 503s and error events to go out


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
        self.drain()

    def drain(self) -> None:
        if self.state.status == "ready":
            self.state.status = "draining"
        threading.Thread(target=self._drain, name="surge-drain", daemon=True).start()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline and self.state.in_flight():
            time.sleep(0.05)
        if self.state.in_flight():
            logger.warning("grace period over with %d requests in flight; aborting them", self.state.in_flight())
            self._abort_all()
        self.should_exit = True

    def _abort_all(self) -> None:
        """End every request still running with a 503 / an error event (on the event loop),
        then give the answers a moment to reach the clients."""
        loop, aborting = self.state.loop, self.state.aborting
        if loop is not None and aborting is not None and not loop.is_closed():
            loop.call_soon_threadsafe(aborting.set)
        flush_until = time.monotonic() + FLUSH_S
        while time.monotonic() < flush_until and self.state.in_flight():
            time.sleep(0.02)


def _watch_engines(state: ServerState, server: _DrainingServer, stop: threading.Event) -> None:
    """An engine that died cannot serve again: report it on /health and end the process
    (exit code 3) so a supervisor restarts it."""
    while not stop.wait(0.25):
        for dep in state.repository.deployments():
            error = dep.error
            if error is not None and state.engine_error is None:
                state.engine_error = f"the engine of {dep.key} died: {type(error).__name__}: {error}"
                logger.error("%s; exiting with code %d", state.engine_error, EXIT_ENGINE_DIED)
                server.should_exit = True
                return


def serve(repository: ModelRepository, settings: ServerSettings,
          poll_interval: float | None = None, exit_on_load_failure: bool = False) -> int:
    """Serve until stopped; returns the process exit code: 0 after a drain, 2 if a model given
    on the command line failed to load (`exit_on_load_failure`), 3 if an engine died."""
    state = ServerState(repository, settings)
    app = create_app(state)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False,
        http=header_timeout_protocol(settings.header_timeout),  # type: ignore[arg-type]
        limit_concurrency=settings.limit_concurrency, timeout_keep_alive=int(max(1, settings.timeout_keep_alive)),
        # the drain has ended every request when uvicorn shuts down; this bounds what is left
        timeout_graceful_shutdown=int(FLUSH_S) + 1,
    )
    server = _DrainingServer(config, state, settings.shutdown_grace)
    stop_watch = threading.Event()

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
        threading.Thread(target=_watch_engines, args=(state, server, stop_watch), name="surge-watch",
                         daemon=True).start()
        names = ", ".join(d.key for d in repository.serving()) or "no model yet"
        logger.info("serving %s at http://%s:%d/v1 (liveness: /health, readiness: /ready, metrics: /metrics, "
                    "dashboard: /dashboard)", names, settings.host, settings.port)

    loader = threading.Thread(target=load, name="surge-load", daemon=True)
    loader.start()
    try:
        asyncio.run(server.serve())
    finally:
        stop_watch.set()
        state.history.stop()
        repository.shutdown()
    if state.engine_error is not None:
        return EXIT_ENGINE_DIED
    return EXIT_LOAD_FAILED if state.status == "failed" else 0
