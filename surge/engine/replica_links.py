"""The front's end of one data-parallel replica: how it is started, talked to, and stopped.

A link owns one replica and the connection to it (`engine/replica.py` speaks the protocol on
the other end). `ProcessLink` runs the replica as a child process of this machine over a socket
pair; every link answers the same calls, so the front (`engine/data_parallel.py`) does not care
where a replica runs.
"""

from __future__ import annotations

import logging
import multiprocessing.connection as mpc
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import surge
from surge.config import EngineConfig
from surge.engine.replica import ReplicaInfo
from surge.errors import EngineDeadError

logger = logging.getLogger(__name__)

__all__ = ["ProcessLink", "ReplicaLink", "START_TIMEOUT_S"]

START_TIMEOUT_S = 600.0  # a replica's load and warm-up


def surge_root() -> str:
    """The directory surge is imported from, for a replica's PYTHONPATH."""
    return os.path.dirname(os.path.dirname(os.path.abspath(surge.__file__)))


class ReplicaLink:
    """One replica and the connection to it. `last_seen` is when it last sent anything (its
    heartbeat included); `cause` says why the front ended it, when it did."""

    index: int
    conn: mpc.Connection | None = None  # None until connected (a Ray actor's, in start())
    info: ReplicaInfo | None = None

    def __init__(self, index: int) -> None:
        self.index = index
        self.send_lock = threading.Lock()
        self.last_seen = time.monotonic()
        self.cause: str | None = None

    def describe(self) -> str:
        raise NotImplementedError

    def kill(self) -> None:
        """End it at once (it hung); its connection closes, which its reader reports."""
        raise NotImplementedError

    def exit_code(self, wait: float) -> int | None:
        """Its exit code once ended (within `wait` seconds), else None."""
        raise NotImplementedError

    def _stop(self, timeout: float) -> None:
        """Wait for it to exit after "stop", ending it when it does not."""
        raise NotImplementedError

    def expect(self, kind: str, timeout: float = START_TIMEOUT_S) -> Any:
        assert self.conn is not None
        if not self.conn.poll(timeout):
            raise EngineDeadError(f"replica {self.index} ({self.describe()}) did not report within {timeout:.0f}s")
        try:
            message = self.conn.recv()
        except (EOFError, OSError) as exc:
            raise EngineDeadError(f"replica {self.index} ({self.describe()}) exited while starting "
                                  f"(code {self.exit_code(0)})") from exc
        if message[0] == "error":
            raise message[1]
        if message[0] != kind:
            raise EngineDeadError(f"replica {self.index}: expected {kind!r}, got {message[0]!r}")
        return message[1]

    def start(self, config: EngineConfig, warmup: bool) -> Any:
        """Send the replica its configuration; its memory estimate."""
        assert self.conn is not None
        self.conn.send(("init", config, warmup, self.index))
        return self.expect("estimate")

    def finish_start(self) -> ReplicaInfo:
        """Let it load (its estimate was accepted); what it reports once ready."""
        assert self.conn is not None
        self.conn.send("go")
        return self.ready()

    def ready(self) -> ReplicaInfo:
        """Wait for it to report loaded (it was let go); what it reports."""
        self.info = self.expect("ready")
        self.last_seen = time.monotonic()
        return self.info

    def send(self, message: Any) -> bool:
        if self.conn is None:
            return False
        try:
            with self.send_lock:
                self.conn.send(message)
            return True
        except (OSError, ValueError):
            return False  # it is dying: its reader thread reports it

    def close(self, timeout: float = 5.0) -> None:
        self.send(("stop",))
        self._stop(timeout)
        if self.conn is not None:
            self.conn.close()

    def abandon(self) -> None:
        """Give up on a replica that failed to start."""
        self.kill()
        if self.conn is not None:
            self.conn.close()


class ProcessLink(ReplicaLink):
    """A replica in a child process of this machine (`python -m surge.engine.replica FD LEVEL`)."""

    def __init__(self, index: int) -> None:
        super().__init__(index)
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([surge_root(), *filter(None, [env.get("PYTHONPATH")])])
        cmd = [sys.executable, "-m", "surge.engine.replica", str(theirs.fileno()),
               str(logging.getLogger().getEffectiveLevel())]
        self.proc = subprocess.Popen(cmd, pass_fds=(theirs.fileno(),), env=env)
        theirs.close()
        self.conn = mpc.Connection(ours.detach())

    def describe(self) -> str:
        return f"process {self.proc.pid}"

    def kill(self) -> None:
        self.proc.kill()

    def exit_code(self, wait: float) -> int | None:
        try:
            return self.proc.wait(wait) if wait > 0 else self.proc.poll()
        except subprocess.TimeoutExpired:
            return None

    def _stop(self, timeout: float) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)
