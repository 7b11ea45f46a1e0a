"""Data parallelism: N whole engines (replicas), each a process of its own with its scheduler, KV
cache and threads, behind one front that the server uses like an AsyncEngine.

    server ── generate() ──> DataParallelEngine (front: tokenizer, validation, Router)
                               │ route: prefix affinity / load / explicit (core/router.py)
                               ├── replica 0 process (engine/replica.py: LLMEngine stepping)
                               └── replica 1 process ...
             outputs <── one reader thread per replica ── ("out", outputs, stats)

A replica that dies (its socket closes) or hangs (no heartbeat for --replica-health-timeout
seconds: it is killed) is marked down at once: the requests it held that had not streamed
anything yet are sent again to another replica; the ones that had end with an error; the
replica is started again in the background and takes traffic once warmed up.

With autoscaling (--max-replicas) a monitor thread samples the ongoing requests once a second
(core/autoscaler.py): a replica added starts and warms up before the router sees it; one
removed is drained (routed nothing new, finishes what it holds) and then stopped. Replicas are
numbered 0..N-1; the highest go first.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from surge.config import EngineConfig
from surge.core.autoscaler import Autoscaler
from surge.core.router import ReplicaCounters, Router, RouterConfig
from surge.engine.args import EngineArgs
from surge.engine.async_engine import RequestFailedError
from surge.engine.engine_core import ReserveHook
from surge.engine.llm_engine import EngineStats, check_prompt, split_prompt
from surge.engine.replica_links import ProcessLink, ReplicaLink
from surge.errors import EngineDeadError, InvalidArgumentError, SurgeError
from surge.outputs import RequestOutput
from surge.sampling_params import RequestOutputKind, SamplingParams
from surge.structured.manager import StructuredOutputManager
from surge.tokenizer import Tokenizer
from surge.worker.reports import MemoryEstimate

logger = logging.getLogger(__name__)

__all__ = ["DataParallelEngine", "ReplicaReport", "build_engine"]

RESTART_ATTEMPTS = 5
RESTART_BACKOFF_S = 2.0


def build_engine(args: EngineArgs, reserve: ReserveHook | None = None) -> Any:
    """The engine `surge serve` runs for these settings: an LLMEngine, or with
    --data-parallel-size N a DataParallelEngine of N replicas."""
    from surge.engine.llm_engine import LLMEngine

    config = args.create_engine_config()
    if config.parallel.replicated:
        return DataParallelEngine(config, reserve)
    return LLMEngine(config, reserve=reserve)


# a replica slot's state
UP, DOWN, STARTING, DRAINING = "up", "down", "starting", "draining"
REMOVED = "was removed by autoscaling"  # a link's cause when the front stopped it on purpose


@dataclass(frozen=True)
class ReplicaReport:
    """One replica as /metrics and the dashboard show it."""

    index: int
    pid: int | None
    where: str  # its node (Ray), empty for a process of this machine
    state: str  # up | down (restarting) | starting (added by autoscaling) | draining (being removed)
    restarts: int
    router: ReplicaCounters
    stats: EngineStats | None

    @property
    def up(self) -> bool:
        return self.state in (UP, DRAINING)


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


class DataParallelEngine:
    """The front of N replicas, with the attributes the server reads of an LLMEngine and the
    calls it makes of an AsyncEngine (it is both)."""

    def __init__(self, config: EngineConfig, reserve: ReserveHook | None = None,
                 router: RouterConfig | None = None):
        from surge.loader import load_tokenizer
        from surge.loader.hub import ModelSource

        parallel = config.parallel
        n = parallel.initial_replicas
        scaling = parallel.autoscaling
        self.max_replicas = max(n, scaling.max_replicas if scaling else n)  # what memory is reserved for
        if config.device.threads is None:  # the machine's cores split between the replicas (at most)
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            config = dataclasses.replace(config, device=dataclasses.replace(
                config.device, threads=max(1, cores // self.max_replicas)))
        self.config = config
        # each replica is one whole engine, its model run in its own process
        ray = parallel.distributed_executor_backend == "ray"
        self._replica_config = dataclasses.replace(config, parallel=dataclasses.replace(
            parallel, data_parallel_size=1, autoscaling=None, ray_address=None,
            distributed_executor_backend="uni" if ray else parallel.distributed_executor_backend))
        load = config.load
        self.tokenizer: Tokenizer = load_tokenizer(ModelSource(load.kind, load.path, load.name), config.model)
        self.eos_ids = frozenset(config.model.eos_token_ids) | frozenset(self.tokenizer.eos_token_ids)
        self.structured = StructuredOutputManager(self.tokenizer, config.model.vocab_size, self.eos_ids)
        self.vocab_size = config.model.vocab_size
        self.max_model_len = config.scheduler.max_model_len
        self.block_size = config.cache.block_size
        self.router = Router(n, router or RouterConfig(block_size=self.block_size))
        self.autoscaler = Autoscaler(scaling) if scaling else None
        self.health_timeout = parallel.replica_health_timeout
        self.error: BaseException | None = None
        self._warmup = config.compilation.warmup
        self._lock = threading.RLock()
        self._streams: dict[str, _Stream] = {}
        # one entry per replica slot, index = replica number
        self._links: list[ReplicaLink | None] = [None] * n
        self._state: list[str] = [STARTING] * n
        self._stats: list[EngineStats | None] = [None] * n
        self._restarts = [0] * n
        self._closing = False
        self._wake = threading.Event()  # the monitor's sleep, cut short at shutdown
        self._ids = itertools.count()
        self._token_texts: dict[int, str] = {}
        self._placement: Any = None
        try:
            if ray:
                from surge.engine.ray_replicas import RayPlacement

                self._placement = RayPlacement(parallel, self.max_replicas, config.device.threads)
            self._start_all(reserve)
        except BaseException:
            self._close_links()
            raise
        info = self._links[0].info  # type: ignore[union-attr]
        self.model_info = info.model_info
        # what the server sizes its waiting room and memory by: every replica it may run
        self.max_num_seqs = info.max_num_seqs * self.max_replicas
        self.capacity_tokens = info.capacity_tokens * self.max_replicas
        self._memory = max(link.info.memory_bytes for link in self._links) * self.max_replicas  # type: ignore
        self.warmup_seconds = max(link.info.warmup_seconds for link in self._links)  # type: ignore[union-attr]
        for i, link in enumerate(self._links):
            self._state[i] = UP
            self._read(link)  # type: ignore[arg-type]
        threading.Thread(target=self._monitor, name="surge-replicas-monitor", daemon=True).start()
        logger.info("data parallel: %d replicas (%s), %d threads each, KV cache %d tokens each%s", n,
                    ", ".join(link.describe() for link in self._links),  # type: ignore[union-attr]
                    config.device.threads, info.capacity_tokens,
                    f"; autoscaling {scaling.min_replicas}..{scaling.max_replicas} at "
                    f"{scaling.target_ongoing_requests:g} ongoing requests each" if scaling else "")

    # ---- starting replicas --------------------------------------------------------------

    def _new_link(self, index: int, restart: bool = False) -> ReplicaLink:
        """Replica `index`'s process (`restart`: started again after a failure)."""
        if self._placement is not None:
            from surge.engine.ray_replicas import RayLink

            return RayLink(index, self._placement, restart)
        return ProcessLink(index)

    def _start_all(self, reserve: ReserveHook | None) -> None:
        """Replica 0's memory estimate is reserved for every replica the engine may run (they are
        alike) before the others start: a size the machine cannot hold is refused at once, not
        after N processes have started; then they all load side by side."""
        n = len(self._links)
        first = self._links[0] = self._new_link(0)
        estimate = first.start(self._replica_config, self._warmup)
        if reserve is not None:
            m = self.max_replicas
            try:
                reserve(MemoryEstimate(estimate.weight_bytes * m, estimate.kv_cache_bytes * m))
            except SurgeError as exc:  # the budget's refusal, said for the replicas
                raise type(exc)(f"{m} data-parallel replicas of the model: {exc}") from exc
        first.send("go")
        for i in range(1, n):
            self._links[i] = self._new_link(i)
        for link in self._links[1:]:
            link.start(self._replica_config, self._warmup)  # type: ignore[union-attr]
            link.send("go")  # type: ignore[union-attr]
        for link in self._links:
            link.ready()  # type: ignore[union-attr]

    def _launch(self, index: int, restart: bool = False) -> ReplicaLink:
        """Start replica `index` (its memory is held in the budget already) and wait until it is ready."""
        link = self._new_link(index, restart)
        try:
            link.start(self._replica_config, self._warmup)
            link.finish_start()
        except BaseException:
            link.abandon()
            raise
        return link

    def _restart(self, index: int) -> None:
        """Start replica `index` again, then let it serve."""
        for attempt in range(1, RESTART_ATTEMPTS + 1):
            if self._closing:
                return
            try:
                link = self._launch(index, restart=True)
            except BaseException as exc:
                logger.error("replica %d did not restart (attempt %d of %d): %s", index, attempt, RESTART_ATTEMPTS,
                             exc)
                time.sleep(RESTART_BACKOFF_S * attempt)
                continue
            if not self._serve(index, link, restart=True):
                return
            logger.info("replica %d is back (%s)", index, link.describe())
            return
        with self._lock:
            if not self.router.any_up():
                self.error = EngineDeadError(f"every replica is down and replica {index} did not restart")

    def _serve(self, index: int, link: ReplicaLink, restart: bool) -> bool:
        """Put a started replica in its slot and route to it (False: shutting down, it was stopped)."""
        with self._lock:
            if self._closing:
                link.close()
                return False
            self._links[index] = link
            self._state[index] = UP
            if restart:
                self._restarts[index] += 1
            self.router.set_up(index, True)
        self._read(link)
        return True

    def _grow(self, target: int) -> None:
        """Autoscaling: add replicas one at a time up to `target`; each is routed to once warmed up."""
        while not self._closing:
            with self._lock:
                if len(self._links) >= target:
                    return
                index = self.router.add_replica()
                self._links.append(None)
                self._state.append(STARTING)
                self._stats.append(None)
                self._restarts.append(0)
            try:
                link = self._launch(index)
            except BaseException as exc:
                logger.error("autoscaling: replica %d did not start: %s", index, exc)
                with self._lock:
                    self._drop_slot(index)
                return
            if not self._serve(index, link, restart=False):
                return
            logger.info("autoscaling: replica %d added (%s); %d replicas", index, link.describe(), index + 1)

    def _drop_slot(self, index: int) -> None:
        """Forget the last replica slot (under the lock)."""
        assert index == len(self._links) - 1
        self.router.remove_replica()
        for slots in (self._links, self._state, self._stats, self._restarts):
            slots.pop()

    def _shrink(self, target: int) -> None:
        """Autoscaling: drain the replicas above `target` (under the lock); the monitor stops each
        once it holds nothing."""
        for index in range(target, len(self._links)):
            if self._state[index] == UP:
                self._state[index] = DRAINING
                self.router.drain(index)
                logger.info("autoscaling: draining replica %d", index)

    def _read(self, link: ReplicaLink) -> None:
        threading.Thread(target=self._reader, args=(link,), name=f"surge-replica-{link.index}", daemon=True).start()

    # ---- health checks and autoscaling, once a second -----------------------------------

    def _monitor(self) -> None:
        while not self._wake.wait(1.0):
            try:
                self._tick(time.monotonic())
            except Exception:  # the monitor must outlive anything one tick meets
                logger.exception("replica monitor")

    def _tick(self, now: float) -> None:
        stopping: list[ReplicaLink] = []
        with self._lock:
            if self._closing:
                return
            for index, link in enumerate(self._links):
                if link is None or self._state[index] not in (UP, DRAINING) or link.cause is not None:
                    continue
                silent = now - link.last_seen
                if silent > self.health_timeout:
                    link.cause = f"sent no heartbeat for {silent:.0f}s (hung) and was killed"
                    logger.error("replica %d (%s) %s", index, link.describe(), link.cause)
                    link.kill()  # its reader sees the connection close and reports it lost
            # drained replicas at the top go, highest first
            while len(self._links) > 1 and self._state[-1] == DRAINING and not any(
                    s.replica == len(self._links) - 1 for s in self._streams.values()):
                link = self._links[-1]
                if link is not None:
                    link.cause = REMOVED
                    stopping.append(link)
                self._drop_slot(len(self._links) - 1)
            if self.autoscaler is not None:
                if any(state != UP for state in self._state):
                    self.autoscaler.hold()
                else:
                    n = len(self._links)
                    target = self.autoscaler.observe(now, len(self._streams), n)
                    if target != n:
                        logger.info("autoscaling: %.1f ongoing requests over %d replicas: scaling to %d",
                                    self.autoscaler.load(), n, target)
                    if target > n:
                        threading.Thread(target=self._grow, args=(target,), name="surge-replicas-grow",
                                         daemon=True).start()
                    elif target < n:
                        self._shrink(target)
        for link in stopping:
            link.close()
            logger.info("autoscaling: replica %d stopped", link.index)

    # ---- the replicas' messages ---------------------------------------------------------

    def _reader(self, link: ReplicaLink) -> None:
        cause = "closed its connection"
        while True:
            try:
                message = link.conn.recv()
            except (EOFError, OSError):
                break
            link.last_seen = time.monotonic()
            kind = message[0]
            if kind == "out":
                self._outputs(link, message[1], message[2])
            elif kind == "reject":
                self._reject(link, message[1], message[2])
            elif kind == "dead":
                cause = f"failed: {type(message[1]).__name__}: {message[1]}"
        if self._closing or link.cause == REMOVED:
            return
        code = link.exit_code(2.0)
        if code is None:
            link.kill()
        self._lost(link, f"replica {link.index} ({link.describe()}) {link.cause or cause}"
                         f"{'' if code is None else f', exit code {code}'}")

    def _current(self, link: ReplicaLink) -> bool:
        """Whether `link` still holds its slot (under the lock; a removed replica's last words are dropped)."""
        return link.index < len(self._links) and self._links[link.index] is link

    def _outputs(self, link: ReplicaLink, outputs: list[RequestOutput], stats: EngineStats) -> None:
        index = link.index
        with self._lock:
            if not self._current(link):
                return
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

    def _reject(self, link: ReplicaLink, request_id: str, error: BaseException) -> None:
        index = link.index
        with self._lock:
            if not self._current(link):
                return
            stream = self._streams.get(request_id)
            if stream is None or stream.replica != index:
                return
            self._streams.pop(request_id, None)
            self.router.finished(index)
            self._deliver(stream, error)

    def _lost(self, link: ReplicaLink, reason: str) -> None:
        index = link.index
        logger.error("%s; its requests that had not started go to another replica", reason)
        with self._lock:
            if not self._current(link):
                return
            draining = self._state[index] == DRAINING
            self.router.set_up(index, False)
            self._stats[index] = None
            if draining:  # it was going anyway: the monitor drops its slot
                self._links[index] = None
            else:
                self._state[index] = DOWN
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
        if draining:
            return
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
            return [ReplicaReport(i, link.info.pid if link is not None and link.info else None,
                                  link.info.where if link is not None and link.info else "", self._state[i],
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
        self._wake.set()
        with self._lock:
            streams = list(self._streams.values())
            self._streams.clear()
        for stream in streams:
            self._deliver(stream, EngineDeadError("the engine has shut down"))
        self._close_links()

    def _close_links(self) -> None:
        self._closing = True
        self._wake.set()
        with self._lock:
            links = list(self._links)
        for link in links:
            if link is not None:
                link.close()
        if self._placement is not None:
            self._placement.close()
