"""Data parallelism: N whole engines (replicas), each a process of its own with its scheduler, KV
cache and threads, behind one front that the server uses like an AsyncEngine.

    server ── generate() ──> DataParallelEngine (front: tokenizer, validation, Router)
                               │ route: prefix affinity / load / explicit (core/router.py)
                               ├── replica 0 process (engine/replica.py: LLMEngine stepping)
                               └── replica 1 process ...
             outputs <── one reader thread per replica ── ("out", outputs, stats)

A replica that dies (its socket closes) is marked down at once: the requests it held that had
not streamed anything yet are sent again to another replica; the ones that had end with an
error; the replica is started again in the background and takes traffic once warmed up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import multiprocessing.connection as mpc
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import surge
from surge.config import EngineConfig
from surge.core.router import ReplicaCounters, Router, RouterConfig
from surge.engine.args import EngineArgs
from surge.engine.async_engine import RequestFailedError
from surge.engine.engine_core import ReserveHook
from surge.engine.llm_engine import EngineStats, check_prompt, split_prompt
from surge.engine.replica import ReplicaInfo
from surge.errors import EngineDeadError, InvalidArgumentError
from surge.outputs import RequestOutput
from surge.sampling_params import RequestOutputKind, SamplingParams
from surge.structured.manager import StructuredOutputManager
from surge.tokenizer import Tokenizer
from surge.worker.reports import MemoryEstimate

logger = logging.getLogger(__name__)

__all__ = ["DataParallelEngine", "ReplicaReport", "build_engine"]

START_TIMEOUT_S = 600.0  # a replica's load and warm-up
RESTART_ATTEMPTS = 5
RESTART_BACKOFF_S = 2.0


def build_engine(args: EngineArgs, reserve: ReserveHook | None = None) -> Any:
    """The engine `surge serve` runs for these settings: an LLMEngine, or with
    --data-parallel-size N a DataParallelEngine of N replicas."""
    from surge.engine.llm_engine import LLMEngine

    config = args.create_engine_config()
    if config.parallel.data_parallel_size > 1:
        return DataParallelEngine(config, reserve)
    return LLMEngine(config, reserve=reserve)


@dataclass(frozen=True)
class ReplicaReport:
    """One replica as /metrics and the dashboard show it."""

    index: int
    pid: int | None
    up: bool
    restarts: int
    router: ReplicaCounters
    stats: EngineStats | None


@dataclass(eq=False)
class _Stream:
    request_id: str
    ids: list[int]
    text: str | None
    params: SamplingParams
    priority: int
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    replica: int = -1
    started: bool = False  # an output reached the caller: it cannot move to another replica
    tokens: int = 0  # output tokens so far (the most of its n completions)
    t0: float = field(default_factory=time.monotonic)


class _Link:
    """One replica process and the socket to it."""

    def __init__(self, index: int, config: EngineConfig, warmup: bool):
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.abspath(surge.__file__)))
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        cmd = [sys.executable, "-m", "surge.engine.replica", str(theirs.fileno()),
               str(logging.getLogger().getEffectiveLevel())]
        self.proc = subprocess.Popen(cmd, pass_fds=(theirs.fileno(),), env=env)
        theirs.close()
        self.index = index
        self.conn = mpc.Connection(ours.detach())
        self.send_lock = threading.Lock()
        self.info: ReplicaInfo | None = None
        self.conn.send(("init", config, warmup, index))

    def expect(self, kind: str, timeout: float = START_TIMEOUT_S) -> Any:
        if not self.conn.poll(timeout):
            raise EngineDeadError(f"replica {self.index} (process {self.proc.pid}) did not report within "
                                  f"{timeout:.0f}s")
        try:
            message = self.conn.recv()
        except (EOFError, OSError) as exc:
            raise EngineDeadError(f"replica {self.index} (process {self.proc.pid}) exited while starting "
                                  f"(code {self.proc.poll()})") from exc
        if message[0] == "error":
            raise message[1]
        if message[0] != kind:
            raise EngineDeadError(f"replica {self.index}: expected {kind!r}, got {message[0]!r}")
        return message[1]

    def send(self, message: Any) -> bool:
        try:
            with self.send_lock:
                self.conn.send(message)
            return True
        except (OSError, ValueError):
            return False  # it is dying: its reader thread reports it

    def close(self, timeout: float = 5.0) -> None:
        self.send(("stop",))
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)
        self.conn.close()


class DataParallelEngine:
    """The front of N replicas, with the attributes the server reads of an LLMEngine and the
    calls it makes of an AsyncEngine (it is both)."""

    def __init__(self, config: EngineConfig, reserve: ReserveHook | None = None,
                 router: RouterConfig | None = None):
        from surge.loader import load_tokenizer
        from surge.loader.hub import ModelSource

        n = config.parallel.data_parallel_size
        if config.device.threads is None:  # the machine's cores split between the replicas
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            config = dataclasses.replace(config, device=dataclasses.replace(config.device,
                                                                            threads=max(1, cores // n)))
        self.config = config
        # each replica is one whole engine
        self._replica_config = dataclasses.replace(
            config, parallel=dataclasses.replace(config.parallel, data_parallel_size=1))
        load = config.load
        self.tokenizer: Tokenizer = load_tokenizer(ModelSource(load.kind, load.path, load.name), config.model)
        self.eos_ids = frozenset(config.model.eos_token_ids) | frozenset(self.tokenizer.eos_token_ids)
        self.structured = StructuredOutputManager(self.tokenizer, config.model.vocab_size, self.eos_ids)
        self.vocab_size = config.model.vocab_size
        self.max_model_len = config.scheduler.max_model_len
        self.block_size = config.cache.block_size
        self.router = Router(n, router or RouterConfig(block_size=self.block_size))
        self.error: BaseException | None = None
        self._warmup = config.compilation.warmup
        self._lock = threading.RLock()
        self._streams: dict[str, _Stream] = {}
        self._stats: list[EngineStats | None] = [None] * n
        self._restarts = [0] * n
        self._closing = False
        self._ids = itertools.count()
        self._token_texts: dict[int, str] = {}
        self._links: list[_Link | None] = [None] * n
        try:
            self._start_all(reserve)
        except BaseException:
            self._close_links()
            raise
        info = self._links[0].info  # type: ignore[union-attr]
        self.model_info = info.model_info
        self.max_num_seqs = sum(link.info.max_num_seqs for link in self._links)  # type: ignore[union-attr]
        self.capacity_tokens = sum(link.info.capacity_tokens for link in self._links)  # type: ignore[union-attr]
        self._memory = sum(link.info.memory_bytes for link in self._links)  # type: ignore[union-attr]
        self.warmup_seconds = max(link.info.warmup_seconds for link in self._links)  # type: ignore[union-attr]
        for link in self._links:
            self._read(link)  # type: ignore[arg-type]
        logger.info("data parallel: %d replicas (processes %s), %d threads each, KV cache %d tokens each", n,
                    ", ".join(str(link.proc.pid) for link in self._links),  # type: ignore[union-attr]
                    config.device.threads, info.capacity_tokens)

    # ---- starting replicas --------------------------------------------------------------

    def _start_all(self, reserve: ReserveHook | None) -> None:
        n = len(self._links)
        for i in range(n):  # they load side by side
            self._links[i] = _Link(i, self._replica_config, self._warmup)
        estimates = [link.expect("estimate") for link in self._links]  # type: ignore[union-attr]
        if reserve is not None:
            reserve(MemoryEstimate(sum(e.weight_bytes for e in estimates), sum(e.kv_cache_bytes for e in estimates)))
        for link in self._links:
            link.send("go")  # type: ignore[union-attr]
        for link in self._links:
            link.info = link.expect("ready")  # type: ignore[union-attr]

    def _restart(self, index: int) -> None:
        """Start replica `index` again (its memory is still held in the budget), then let it serve."""
        for attempt in range(1, RESTART_ATTEMPTS + 1):
            if self._closing:
                return
            link = None
            try:
                link = _Link(index, self._replica_config, self._warmup)
                link.expect("estimate")
                link.send("go")
                link.info = link.expect("ready")
            except BaseException as exc:
                logger.error("replica %d did not restart (attempt %d of %d): %s", index, attempt, RESTART_ATTEMPTS,
                             exc)
                if link is not None:
                    link.proc.kill()
                    link.conn.close()
                time.sleep(RESTART_BACKOFF_S * attempt)
                continue
            with self._lock:
                if self._closing:
                    link.close()
                    return
                self._links[index] = link
                self._restarts[index] += 1
                self.router.set_up(index, True)
            self._read(link)
            logger.info("replica %d is back (process %d)", index, link.proc.pid)
            return
        with self._lock:
            if not self.router.any_up():
                self.error = EngineDeadError(f"every replica is down and replica {index} did not restart")

    def _read(self, link: _Link) -> None:
        threading.Thread(target=self._reader, args=(link,), name=f"surge-replica-{link.index}", daemon=True).start()

    # ---- the replicas' messages ---------------------------------------------------------

    def _reader(self, link: _Link) -> None:
        cause = "closed its connection"
        while True:
            try:
                message = link.conn.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "out":
                self._outputs(link.index, message[1], message[2])
            elif kind == "reject":
                self._reject(link.index, message[1], message[2])
            elif kind == "dead":
                cause = f"failed: {type(message[1]).__name__}: {message[1]}"
        if self._closing:
            return
        code = link.proc.poll()
        if code is None:
            try:
                code = link.proc.wait(2.0)
            except subprocess.TimeoutExpired:
                link.proc.kill()
        self._lost(link, f"replica {link.index} (process {link.proc.pid}) {cause}"
                         f"{'' if code is None else f', exit code {code}'}")

    def _outputs(self, index: int, outputs: list[RequestOutput], stats: EngineStats) -> None:
        with self._lock:
            self._stats[index] = stats
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is None or stream.replica != index:
                    continue
                stream.started = True
                new = max((len(c.token_ids) for c in out.outputs), default=0)
                # a delta output carries its new tokens only; the others every token so far
                stream.tokens = stream.tokens + new if stream.params.output_kind is RequestOutputKind.DELTA else new
                self._deliver(stream, out)
                if out.finished:
                    self._streams.pop(out.request_id, None)
                    self.router.finished(index, time.monotonic() - stream.t0, stream.tokens)

    def _reject(self, index: int, request_id: str, error: BaseException) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
            if stream is None or stream.replica != index:
                return
            self._streams.pop(request_id, None)
            self.router.finished(index)
            self._deliver(stream, error)

    def _lost(self, link: _Link, reason: str) -> None:
        index = link.index
        logger.error("%s; its requests that had not started go to another replica", reason)
        with self._lock:
            if self._links[index] is not link:
                return
            self.router.set_up(index, False)
            self._stats[index] = None
            moved = failed = 0
            for stream in [s for s in self._streams.values() if s.replica == index]:
                if not stream.started and self.router.any_up():
                    self._send_to_replica(stream, exclude=frozenset({index}))
                    moved += 1
                else:
                    self._streams.pop(stream.request_id, None)
                    self._deliver(stream, RequestFailedError(f"{reason} while this request was running"))
                    failed += 1
        if moved or failed:
            logger.warning("replica %d down: %d requests sent again elsewhere, %d ended with an error",
                           index, moved, failed)
        threading.Thread(target=self._restart, args=(index,), name=f"surge-replica-restart-{index}",
                         daemon=True).start()

    def _deliver(self, stream: _Stream, item: RequestOutput | BaseException) -> None:
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop is gone
            self._streams.pop(stream.request_id, None)
            if stream.replica >= 0:
                link = self._links[stream.replica]
                if link is not None:
                    link.send(("abort", stream.request_id))

    def _send_to_replica(self, stream: _Stream, replica: int | None = None,
                         exclude: frozenset[int] = frozenset()) -> None:
        """Route a stream and send it (under the lock)."""
        route = self.router.route(stream.ids, None, replica, exclude)
        stream.replica = route.replica
        stream.t0 = time.monotonic()
        self._streams[stream.request_id] = stream
        link = self._links[route.replica]
        assert link is not None
        link.send(("add", stream.request_id, stream.ids, stream.text, stream.params, stream.priority))

    # ---- what the server calls ----------------------------------------------------------

    def start(self) -> None:
        """The replicas run from construction; here for AsyncEngine's interface."""

    @property
    def is_running(self) -> bool:
        return not self._closing and self.error is None

    def tokenize_prompt(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        return split_prompt(self.tokenizer, prompt)

    def validate(self, ids: list[int], params: SamplingParams) -> int:
        return check_prompt(ids, params, self.vocab_size, self.max_model_len, self.structured)

    def token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def check_replica(self, data_parallel_rank: int | None) -> None:
        """Refuse a replica asked for that does not exist or is down (InvalidArgumentError)."""
        if data_parallel_rank is None:
            return
        with self._lock:
            self.router.check(data_parallel_rank)

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        priority: int = 0,
        prompt_text: str | None = None,
        data_parallel_rank: int | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request from the replica the router chose; closing the iterator aborts it."""
        if not self.is_running:
            raise EngineDeadError(f"the engine is not running ({self.error or 'shut down'})")
        text, ids = self.tokenize_prompt(prompt)
        text = text if text is not None else prompt_text
        if params.structured_outputs is not None:
            await asyncio.to_thread(self.validate, ids, params)
        else:
            self.validate(ids, params)
        request_id = request_id or f"dp-{next(self._ids)}"
        stream = _Stream(request_id, ids, text, params, priority, asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if request_id in self._streams:
                raise InvalidArgumentError(f"request id {request_id!r} is already in use")
            if not self.router.any_up():
                raise EngineDeadError("no replica is up (restarting)")
            self._send_to_replica(stream, data_parallel_rank)
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True  # it is over on the replica already
                    raise item
                finished = item.finished
                if item.error is not None:
                    raise RequestFailedError(item.error)
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        with self._lock:
            stream = self._streams.pop(request_id, None)
            if stream is None:
                return
            self.router.finished(stream.replica)
            link = self._links[stream.replica]
        if link is not None:
            link.send(("abort", request_id))

    def num_unfinished(self) -> int:
        return len(self._streams)

    def stats(self) -> EngineStats:
        """The replicas' counters summed (as of each one's last step)."""
        parts = [s for s in self._stats if s is not None]
        if not parts:
            return EngineStats(0, 0, 0, 0, 0.0, 0, 0, 0.0, 0, 0, 0, 0)
        total: dict[str, Any] = {}
        for f in dataclasses.fields(EngineStats):
            values = [getattr(s, f.name) for s in parts]
            total[f.name] = values[0] if f.name == "spec_method" else sum(values)
        used, blocks = total["kv_blocks_used"], total["kv_blocks_total"]
        total["kv_cache_usage"] = used / blocks if blocks else 0.0
        queries = total["prefix_cache_queries"]
        total["prefix_cache_hit_rate"] = total["prefix_cache_hits"] / queries if queries else 0.0
        return EngineStats(**total)

    def replicas(self) -> list[ReplicaReport]:
        with self._lock:
            counters = self.router.counters()
            return [ReplicaReport(i, link.proc.pid if link is not None else None, counters[i].up,
                                  self._restarts[i], counters[i], self._stats[i])
                    for i, link in enumerate(self._links)]

    def memory_bytes(self) -> int:
        return self._memory

    def check_health(self) -> None:
        if self.error is not None:
            raise self.error

    def shutdown(self, timeout: float | None = 10.0) -> None:
        if self._closing:
            return
        self._closing = True
        with self._lock:
            streams = list(self._streams.values())
            self._streams.clear()
        for stream in streams:
            self._deliver(stream, EngineDeadError("the engine has shut down"))
        self._close_links()

    def _close_links(self) -> None:
        self._closing = True
        for link in self._links:
            if link is not None:
                link.close()
