"""Entry point of a worker process: `python -m surge.executor.worker_process CALLS_FD BEATS_FD LOG_LEVEL`.

Answers the executor's calls one at a time with a Worker (see multiproc.py). A heartbeat
thread writes a byte every HEARTBEAT_INTERVAL_S and ends the process if the engine's process
is gone. Only the standard library is imported before the heartbeat runs, so a slow import of
torch never looks like a hang.
"""

from __future__ import annotations

import logging
import multiprocessing.connection as mpc
import os
import pickle
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any

HEARTBEAT_INTERVAL_S = 0.5


def _heartbeat(beats: socket.socket, parent: int) -> None:
    while True:
        if os.getppid() != parent:  # the engine's process died: nobody to work for
            os._exit(1)
        try:
            beats.sendall(b".")
        except OSError:
            os._exit(1)
        time.sleep(HEARTBEAT_INTERVAL_S)


def portable(exc: BaseException) -> BaseException:
    """The exception itself if it survives pickling, else a WorkerError with its text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        from surge.errors import WorkerError

        return WorkerError(f"{type(exc).__name__}: {exc}")


def main(argv: list[str]) -> int:
    calls_fd, beats_fd, level = int(argv[0]), int(argv[1]), int(argv[2])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the engine's to handle: it shuts us down
    beats = socket.socket(fileno=beats_fd)
    threading.Thread(target=_heartbeat, args=(beats, os.getppid()), name="surge-heartbeat", daemon=True).start()
    logging.basicConfig(level=level, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s %(name)s [worker {os.getpid()}]: %(message)s")
    log = logging.getLogger("surge.worker")
    conn = mpc.Connection(calls_fd)
    worker: Any = None
    while True:
        try:
            method, args = conn.recv()
        except (EOFError, OSError):
            return 0  # the engine closed the channel
        if method == "shutdown":
            if worker is not None:
                worker.shutdown()
            conn.send(("ok", None))
            return 0
        try:
            if method == "init":
                from surge.worker.worker import Worker

                worker = Worker(*args)  # (config, rank, rendezvous)
                worker.init_device()
                result: Any = None
            else:
                result = getattr(worker, method)(*args)
            reply: tuple[str, Any] = ("ok", result)
        except BaseException as exc:  # sent back: the engine decides what it means
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            log.debug("%s() failed:\n%s", method, traceback.format_exc())
            reply = ("error", portable(exc))
        try:
            conn.send(reply)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:  # a result that cannot travel
            conn.send(("error", portable(exc)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
