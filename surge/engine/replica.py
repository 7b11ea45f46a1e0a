"""A data-parallel replica: one whole engine (scheduler, KV cache, worker, output processing) in a
process of its own, driven by the front process over one socket (`engine/data_parallel.py`).

    front                                          replica (python -m surge.engine.replica FD LEVEL)
    ("init", config, warmup, index)       ──>      LLMEngine(config, reserve=ask the front)
                                          <──      ("estimate", MemoryEstimate)
    "go" | "stop"                         ──>      loads, warms up
                                          <──      ("ready", ReplicaInfo) | ("error", exception)
    ("add", id, ids, text, params, prio)  ──>      engine.add_request   (refused: ("reject", id, error))
    ("abort", id) | ("stop",)             ──>
                                          <──      ("out", [RequestOutput], EngineStats) after each step
                                          <──      ("dead", exception): the engine broke; the process exits
                                          <──      ("beat",) every second from a thread of its own

Commands are read by a thread into a queue; the main thread owns the engine, so nothing spins:
it sleeps on the queue when idle. Sends share one lock with the heartbeat thread, whose beat
tells the front that the process is alive and not frozen (a replica silent for
--replica-health-timeout seconds is killed and restarted). The replica exits when the front's
end of the socket closes (the front died or let it go).

Fault injection for tests: SURGE_FAULT_REPLICA_STEP_DELAY="INDEX:SECONDS" makes replica INDEX
sleep that long after every step (a slow machine, as the router's adaptive weights see one).
"""

from __future__ import annotations

import logging
import multiprocessing.connection as mpc
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from surge.errors import SurgeError
from surge.executor.worker_process import portable

logger = logging.getLogger(__name__)

EXIT_BROKEN = 3
HEARTBEAT_S = 1.0
FAULT_STEP_DELAY = "SURGE_FAULT_REPLICA_STEP_DELAY"


def step_delay(index: int) -> float:
    """Seconds replica `index` sleeps after each step (fault injection; 0 normally)."""
    spec = os.environ.get(FAULT_STEP_DELAY, "")
    target, _, seconds = spec.partition(":")
    return float(seconds) if target.strip().isdigit() and int(target) == index else 0.0


@dataclass(frozen=True)
class ReplicaInfo:
    """What a loaded replica reports to the front."""

    model_info: Any  # worker.reports.ModelInfo
    capacity_tokens: int
    memory_bytes: int
    max_num_seqs: int
    warmup_seconds: float
    pid: int
    where: str  # its node (a Ray node id), empty for a process of this machine


class LoadRefused(SurgeError):
    """The front refused the replica's memory estimate (its budget is full) or is shutting down."""


def serve(conn: mpc.Connection, where: str = "") -> int:
    """Run one replica over `conn` until told to stop or the front goes away; `where`: the
    process's place as the front reports it (a Ray node id; empty for a local process)."""
    from surge.engine.llm_engine import LLMEngine

    _, config, warmup, index = conn.recv()
    delay = step_delay(index)
    lock = threading.Lock()
    stopped = threading.Event()

    def send(message: Any) -> None:
        with lock:
            conn.send(message)

    def beat() -> None:
        while not stopped.wait(HEARTBEAT_S):
            try:
                send(("beat",))
            except OSError:
                return

    def reserve(estimate: Any) -> None:
        conn.send(("estimate", estimate))
        if conn.recv() != "go":
            raise LoadRefused("the front refused this replica's memory estimate")

    try:
        engine = LLMEngine(config, reserve=reserve)
        seconds = engine.warm_up().seconds if warmup else 0.0
    except BaseException as exc:
        conn.send(("error", portable(exc)))
        return 1
    conn.send(("ready", ReplicaInfo(engine.model_info, engine.capacity_tokens, engine.memory_bytes(),
                                    engine.max_num_seqs, seconds, os.getpid(), where)))
    threading.Thread(target=beat, name="surge-replica-heartbeat", daemon=True).start()
    commands: queue.SimpleQueue = queue.SimpleQueue()

    def read() -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                message = ("stop",)
            commands.put(message)
            if message[0] == "stop":
                return

    threading.Thread(target=read, name="surge-replica-reader", daemon=True).start()

    def apply(message: tuple) -> bool:
        """False once asked to stop."""
        if message[0] == "add":
            _, request_id, ids, text, params, priority = message
            try:
                engine.add_request(ids, params, request_id, priority, prompt_text=text)
            except Exception as exc:
                send(("reject", request_id, portable(exc)))
        elif message[0] == "abort":
            engine.abort_request(message[1])
        elif message[0] == "stop":
            return False
        return True

    try:
        while True:
            block = not engine.has_unfinished_requests()
            if block:
                send(("out", [], engine.stats()))  # idle: the front's counters catch up
            message = commands.get() if block else None
            if message is not None and not apply(message):
                break
            while True:
                try:
                    if not apply(commands.get_nowait()):
                        return 0
                except queue.Empty:
                    break
            if engine.has_unfinished_requests():
                outputs = engine.step()
                if delay:
                    time.sleep(delay)
                send(("out", outputs, engine.stats()))
    except (BrokenPipeError, ConnectionResetError, EOFError):
        return 0  # the front is gone
    except BaseException as exc:
        logger.exception("replica engine failed")
        try:
            send(("dead", portable(exc)))
        except OSError:
            pass
        return EXIT_BROKEN
    finally:
        stopped.set()
        engine.shutdown()
    return 0


def main() -> None:
    fd, level = int(sys.argv[1]), int(sys.argv[2])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the front's to handle: it stops us
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s [replica %(process)d]: %(message)s")
    from surge.engine.replica import serve as run  # this module by its name, so what it pickles unpickles

    sys.exit(run(mpc.Connection(fd)))


if __name__ == "__main__":
    main()
