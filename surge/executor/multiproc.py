"""The worker in a process of its own (--distributed-executor-backend mp).

    engine process                                 worker process (python -m surge.executor.worker_process)
    MultiprocExecutor ── calls: (method, args) ──>  Worker.<method>(*args)
                      <── ("ok", result) | ("error", exception)
    monitor thread    <── heartbeat: a byte every 0.5 s, from a thread of the worker

Both channels are socket pairs made before the worker starts and handed to it as file
descriptors. Every wait blocks in the kernel (recv, select with a timeout): nothing spins, the
two cores stay the model's. The worker is started with `python -m`, not multiprocessing's
spawn, so a user's script is never imported again in the worker.

Failure: the heartbeat's end-of-file says the worker died; no heartbeat for HANG_TIMEOUT_S
says it hangs (it is killed then). Either way the executor turns dead: every call, the one in
flight included, raises EngineDeadError naming the cause, and the callbacks registered with
on_failure run. The worker exits on its own when its engine process goes away.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing.connection as mpc
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import surge
from surge.config import EngineConfig
from surge.core.runner_output import ModelRunnerOutput
from surge.core.scheduler_output import SchedulerOutput
from surge.errors import EngineDeadError
from surge.executor.abstract import Executor

logger = logging.getLogger(__name__)

HANG_TIMEOUT_S = 5.0  # no heartbeat (worker_process.HEARTBEAT_INTERVAL_S) this long: the worker is stuck (stopped, or holding the GIL)
SHUTDOWN_TIMEOUT_S = 5.0
POLL_S = 0.5  # how often a waiting call looks whether the monitor found the worker dead


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "stopped responding"
    if code < 0:
        try:
            return f"was killed by signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class _Link:
    """The worker process and both channels to it. The monitor thread and the finalizer hold
    this, not the executor, so an executor nobody references is collected (and its worker
    stopped) like any object."""

    def __init__(self, proc: subprocess.Popen, conn: mpc.Connection, beats: socket.socket,
                 callbacks: list[Callable[[BaseException], None]]):
        self.proc = proc
        self.pid = proc.pid
        self.conn = conn
        self.beats = beats
        self.callbacks = callbacks
        self.lock = threading.Lock()
        self.dead: EngineDeadError | None = None
        self.closing = False
        self.posted = 0  # calls sent with post() whose answers take() has not read

    def exit_code(self) -> int | None:
        try:
            return self.proc.wait(1.0)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(SHUTDOWN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass

    def fail(self, reason: str) -> EngineDeadError:
        """Turn dead (once): kill what is left of the worker, tell the callbacks."""
        if self.dead is not None:
            return self.dead
        self.dead = EngineDeadError(reason)
        if not self.closing:
            logger.error("%s; the engine is dead", reason)
        self.kill()
        if not self.closing:
            for callback in list(self.callbacks):
                callback(self.dead)
        return self.dead

    def watch(self) -> None:
        """Read heartbeats until the worker ends or goes quiet."""
        self.beats.settimeout(HANG_TIMEOUT_S)
        while True:
            try:
                data = self.beats.recv(4096)
            except TimeoutError:
                if not self.closing:
                    self.fail(f"the worker process {self.pid} stopped responding (no heartbeat for "
                              f"{HANG_TIMEOUT_S:.0f}s) and was killed")
                return
            except OSError:
                data = b""
            if not data:
                if not self.closing:
                    self.fail(f"the worker process {self.pid} {_describe_exit(self.exit_code())}")
                return

    def call(self, method: str, args: tuple, timeout: float | None) -> Any:
        self.begin(method, args)
        status, value = self.end(method, timeout)
        if status == "error":
            raise value
        return value

    def begin(self, method: str, args: tuple) -> None:
        """Send a call; end() waits for its answer (the link is held in between)."""
        self.lock.acquire()
        try:
            if self.dead is not None:
                raise self.dead
            assert not self.posted, "a call while posted calls are unanswered"
            self.conn.send((method, args))
        except BaseException as exc:
            self.lock.release()
            if isinstance(exc, (EOFError, OSError)):
                raise self.dead or self.fail(f"the worker process {self.pid} "
                                             f"{_describe_exit(self.exit_code())}") from exc
            raise

    def end(self, method: str, timeout: float | None) -> tuple[str, Any]:
        """("ok", result) or ("error", the worker's exception) of the call begun; EngineDeadError
        when the worker is lost first."""
        try:
            return self._receive(method, timeout)
        finally:
            self.lock.release()

    def post(self, method: str, args: tuple) -> None:
        """Send a call without waiting: answers come back in order, each read by take()."""
        with self.lock:
            if self.dead is not None:
                raise self.dead
            try:
                self.conn.send((method, args))
            except (EOFError, OSError) as exc:
                raise self.dead or self.fail(f"the worker process {self.pid} "
                                             f"{_describe_exit(self.exit_code())}") from exc
            self.posted += 1

    def take(self) -> tuple[str, Any]:
        """The answer of the oldest posted call (see end())."""
        with self.lock:
            assert self.posted > 0
            self.posted -= 1
            return self._receive("a posted call", None)

    def _receive(self, method: str, timeout: float | None) -> tuple[str, Any]:
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            while not self.conn.poll(POLL_S):
                if self.dead is not None:
                    raise self.dead
                if deadline is not None and time.monotonic() > deadline:
                    raise self.fail(f"the worker process {self.pid} did not answer {method}() within "
                                    f"{timeout:.0f}s")
            return self.conn.recv()
        except (EOFError, OSError) as exc:
            raise self.dead or self.fail(f"the worker process {self.pid} "
                                         f"{_describe_exit(self.exit_code())}") from exc

    def close(self) -> None:
        """Ask the worker to exit, kill it if it does not; idempotent (also the finalizer)."""
        if self.closing:
            return
        self.closing = True
        if self.dead is None and self.proc.poll() is None:
            try:
                if self.lock.acquire(timeout=SHUTDOWN_TIMEOUT_S):
                    try:
                        self.conn.send(("shutdown", ()))
                        if self.conn.poll(SHUTDOWN_TIMEOUT_S):
                            self.conn.recv()
                    finally:
                        self.lock.release()
                self.proc.wait(SHUTDOWN_TIMEOUT_S)
            except (OSError, EOFError, subprocess.TimeoutExpired):
                pass
        self.kill()
        self.conn.close()
        self.beats.close()
        if self.dead is None:
            self.dead = EngineDeadError("the engine was shut down")


def start_worker_process(callbacks: list[Callable[[BaseException], None]]) -> _Link:
    """A worker process (python -m surge.executor.worker_process) and the link to it; nobody
    watches its heartbeat until a thread runs the link's watch()."""
    calls, worker_calls = socket.socketpair()
    beats, worker_beats = socket.socketpair()
    env = dict(os.environ)
    # the worker imports surge from where this process did
    root = os.path.dirname(os.path.dirname(os.path.abspath(surge.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "surge.executor.worker_process", str(worker_calls.fileno()),
           str(worker_beats.fileno()), str(logging.getLogger().getEffectiveLevel())]
    proc = subprocess.Popen(cmd, pass_fds=(worker_calls.fileno(), worker_beats.fileno()), env=env)
    worker_calls.close()
    worker_beats.close()
    return _Link(proc, mpc.Connection(calls.detach()), beats, callbacks)


class MultiprocExecutor(Executor):
    def __init__(self, config: EngineConfig):
        if config.device.threads is None:
            # the thread count this process runs torch with, as the worker in process would
            import torch

            config = dataclasses.replace(config, device=dataclasses.replace(config.device,
                                                                            threads=torch.get_num_threads()))
        super().__init__(config)
        self._link = start_worker_process(self._failure_callbacks)
        self.pid = self._link.pid
        self._finalizer = weakref.finalize(self, self._link.close)  # collected or exiting: the worker goes
        self._monitor = threading.Thread(target=self._link.watch, name=f"surge-worker-monitor-{self.pid}",
                                         daemon=True)
        self._monitor.start()
        logger.info("started worker process %d for %s", self.pid, config.load.path)
        try:
            self._link.call("init", (config, 0, None), None)
        except BaseException:
            self.shutdown()
            raise

    @property
    def proc(self) -> subprocess.Popen:
        return self._link.proc

    def collective_rpc(self, method: str, *args: Any, timeout: float | None = None) -> list[Any]:
        return [self._link.call(method, args, timeout)]

    def execute_model(self, scheduled: SchedulerOutput) -> ModelRunnerOutput:
        return self._link.call("execute_model", (scheduled,), None)

    def check_health(self) -> None:
        link = self._link
        if link.dead is not None:
            raise link.dead
        if link.proc.poll() is not None:
            raise link.fail(f"the worker process {self.pid} {_describe_exit(link.proc.returncode)}")

    def shutdown(self) -> None:
        self._finalizer()  # runs _link.close once
        if self._monitor is not threading.current_thread():
            self._monitor.join(SHUTDOWN_TIMEOUT_S)
