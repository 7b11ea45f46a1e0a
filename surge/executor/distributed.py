"""Model-parallel ranks (--tensor-parallel-size N x --pipeline-parallel-size M): rank 0's worker in
the engine's process, ranks 1..N*M-1 in worker processes of their own, joined by torch.distributed
(surge/distributed/comm.py); rank r is tensor rank r % N of stage r // N.

    engine process                              worker processes (python -m surge.executor.worker_process)
    DistributedExecutor                         Worker(config, rank r, rendezvous)
      ── each step's SchedulerOutput ──>        ... their part of the forward, LM head ... -> None
      rank 0's Worker: forward, LM head, samples ── all-reduce / gather / send-recv (127.0.0.1) ──

Every call goes to every rank: the remote ones are sent first, rank 0 runs its own, then the
remote answers are read (each rank's result, in rank order). Only rank 0 samples: the tokens come
back in the next step's schedule, so the others keep no sampler state. With pipeline stages,
steps are submitted and collected apart (up to M in flight): `execute_start` on every rank, and
`execute_finish` on the first stage's ranks when the step is collected; a later stage's answer
to a step's start is read then, without waiting for the steps after it.

Failure: each worker's heartbeat is watched (multiproc.py's link); one that dies or goes quiet
(kill -9, SIGSTOP) kills every other rank, so a collective rank 0 waits in fails at once (its
peers' connections close) and the executor turns dead: every call raises EngineDeadError naming
the rank. A step that fails on every rank alike (bad input the same everywhere) is an ordinary
failed step; one that fails on some ranks only leaves the group out of step: dead; a pipelined
step that fails at all: dead.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any

from surge.config import EngineConfig
from surge.core.runner_output import ModelRunnerOutput
from surge.core.scheduler_output import SchedulerOutput
from surge.distributed.comm import Rendezvous, free_port
from surge.errors import EngineDeadError
from surge.executor.abstract import Executor
from surge.executor.multiproc import SHUTDOWN_TIMEOUT_S, _describe_exit, _Link, start_worker_process
from surge.worker.reports import MemoryEstimate, ModelInfo, StepTimings
from surge.worker.worker import Worker

logger = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT_S = 30.0  # a collective a rank waits in longer fails (a lost rank is found sooner: heartbeats)


def default_threads(world_size: int) -> int:
    """Each rank's share of the machine's cores (at least one)."""
    return max(1, (os.cpu_count() or 1) // world_size)


class _Ranks:
    """The remote ranks' links and the group's fate; the monitor threads and the finalizer hold
    this, not the executor (an executor nobody references is collected, its workers stopped)."""

    def __init__(self, callbacks: list[Callable[[BaseException], None]]):
        self.callbacks = callbacks
        self.links: list[_Link] = []
        self.dead: EngineDeadError | None = None
        self.lock = threading.Lock()
        self.closing = False

    def lost(self, error: BaseException) -> None:
        """A rank is gone (a link's failure callback): stop the others, the group is dead."""
        with self.lock:
            if self.dead is not None or self.closing:
                return
            self.dead = error if isinstance(error, EngineDeadError) else EngineDeadError(str(error))
        self._stop_all()
        for callback in list(self.callbacks):
            callback(self.dead)

    def fail(self, reason: str) -> EngineDeadError:
        with self.lock:
            if self.dead is None:
                self.dead = EngineDeadError(reason)
                logger.error("%s; the engine is dead", reason)
                notify = not self.closing
            else:
                notify = False
        self._stop_all()
        if notify:
            for callback in list(self.callbacks):
                callback(self.dead)
        return self.dead

    def _stop_all(self) -> None:
        for link in self.links:
            link.closing = True  # its watcher ends quietly: the group's death is told once
            link.kill()

    def close(self) -> None:
        self.closing = True
        for link in self.links:
            link.close()


class DistributedExecutor(Executor):
    in_process = True  # rank 0's worker runs here (a step may carry live objects: they stay here)

    def __init__(self, config: EngineConfig):
        world = config.parallel.world_size
        if config.device.threads is None:
            config = dataclasses.replace(config, device=dataclasses.replace(config.device,
                                                                            threads=default_threads(world)))
        super().__init__(config)
        self.rendezvous = Rendezvous(free_port(), world, COLLECTIVE_TIMEOUT_S)
        self._ranks = _Ranks(self._failure_callbacks)
        self.driver = Worker(config, 0, self.rendezvous)
        # collected or exiting: rank 0's worker gives back what it took (its groups, torch's
        # thread count in this process), the others are stopped
        self._finalizer = weakref.finalize(self, _close, self.driver, self._ranks)
        self._lock = threading.Lock()  # one call at a time goes to the ranks
        self._monitors: list[threading.Thread] = []
        try:
            for rank in range(1, world):
                link = start_worker_process([self._ranks.lost])
                self._ranks.links.append(link)
                monitor = threading.Thread(target=link.watch, name=f"surge-rank-{rank}-monitor", daemon=True)
                monitor.start()
                self._monitors.append(monitor)
            self.pids = [link.pid for link in self._ranks.links]
            logger.info("model parallel: rank 0 in this process, ranks 1..%d in processes %s, %d threads each",
                        world - 1, ", ".join(map(str, self.pids)), config.device.threads)
            self._on_all("init_device", (), remote=("init", lambda rank: (config, rank, self.rendezvous)))
        except BaseException:
            self.shutdown()
            raise

    # ---- calls on every rank ------------------------------------------------------------

    def _on_all(self, method: str, args: tuple, timeout: float | None = None,
                remote: tuple[str, Callable[[int], tuple]] | None = None) -> tuple[Any, BaseException | None,
                                                                                 list[tuple[str, Any]]]:
        """(rank 0's result, rank 0's exception, the remote ranks' (status, value) answers)."""
        remote_method, remote_args = remote if remote is not None else (method, lambda rank: args)
        with self._lock:
            if self._ranks.dead is not None:
                raise self._ranks.dead
            begun: list[_Link] = []
            try:
                for rank, link in enumerate(self._ranks.links, 1):
                    link.begin(remote_method, remote_args(rank))
                    begun.append(link)
            except BaseException:
                for link in begun:
                    link.end(remote_method, timeout)
                raise
            result, error = None, None
            try:
                result = getattr(self.driver, method)(*args)
            except BaseException as exc:  # the remote answers decide what it means
                error = exc
            answers: list[tuple[str, Any]] = []
            lost: EngineDeadError | None = None
            for link in begun:
                try:
                    answers.append(link.end(remote_method, timeout))
                except EngineDeadError as exc:  # the link's own account of how its rank was lost
                    lost = lost or exc
                    answers.append(("dead", exc))
        if lost is not None:
            self._ranks.lost(lost)
            raise self._ranks.dead or lost
        return result, error, answers

    def collective_rpc(self, method: str, *args: Any, timeout: float | None = None) -> list[Any]:
        result, error, answers = self._on_all(method, args, timeout)
        if error is not None:
            raise error
        for status, value in answers:
            if status == "error":
                raise value
        return [result, *(value for _, value in answers)]

    def execute_model(self, scheduled: SchedulerOutput) -> ModelRunnerOutput:
        result, error, answers = self._on_all("execute_model", (scheduled,),
                                              remote=("execute_model", lambda rank: (_for_remote(scheduled),)))
        failed = [rank for rank, (status, _) in enumerate(answers, 1) if status == "error"]
        if error is None and not failed:
            return result
        if error is not None and len(failed) == len(answers):
            raise error  # every rank stopped at the same place: the step failed, the group is in step
        where = ", ".join(f"rank {r}: {answers[r - 1][1]}" for r in failed) if failed else "rank 0"
        raise self._ranks.fail(f"a step failed on some tensor-parallel ranks only ({where}"
                               f"{f'; rank 0: {error}' if error is not None and failed else ''}); "
                               "the ranks are out of step")

    # ---- steps in flight (pipeline parallelism) -------------------------------------------

    @property
    def max_in_flight(self) -> int:  # type: ignore[override]
        """A pipeline of M stages works on up to M steps: each stage on another one."""
        return self.config.parallel.pipeline_parallel_size

    def submit(self, scheduled: SchedulerOutput) -> Any:
        """Every rank runs its stage's part of the step and hands it on; rank 0's part is the
        first stage's (embedding and its layers). The answers are read by collect()."""
        if self.max_in_flight == 1:
            return scheduled
        with self._lock:
            if self._ranks.dead is not None:
                raise self._ranks.dead
            remote = _for_remote(scheduled)
            for link in self._ranks.links:
                link.post("execute_start", (remote,))
            try:
                self.driver.execute_start(scheduled)
            except BaseException as exc:
                raise self._fail_in_flight("rank 0", exc) from exc
        return scheduled

    def collect(self, handle: Any) -> ModelRunnerOutput:
        """The oldest submitted step's result: rank 0 receives the last stage's output, samples;
        every rank's answers to that step's calls are read and must be fine (a failed pipelined
        step leaves the stages out of step: the engine is dead)."""
        if self.max_in_flight == 1:
            return self.execute_model(handle)
        with self._lock:
            if self._ranks.dead is not None:
                raise self._ranks.dead
            tp = self.config.parallel.tensor_parallel_size
            first_stage = self._ranks.links[: tp - 1]  # rank 0's peers: they finish the step with it
            for link in first_stage:
                link.post("execute_finish", ())
            error: BaseException | None = None
            where = "rank 0"
            try:
                result = self.driver.execute_finish()
            except BaseException as exc:
                error = exc
            try:
                # a first-stage rank: every answer not read yet, in order (this step's start, the
                # starts submitted since, this step's finish, the last call posted); a later
                # stage's rank: this step's start only (it may be at work on the next step already)
                for rank, link in enumerate(self._ranks.links, 1):
                    for _ in range(link.posted if rank < tp else 1):
                        status, value = link.take()
                        if status == "error" and error is None:
                            error, where = value, f"rank {rank}"
            except EngineDeadError as exc:
                self._ranks.lost(exc)
                raise self._ranks.dead or exc
            if error is not None:
                raise self._fail_in_flight(where, error) from error
        return result

    def _fail_in_flight(self, where: str, error: BaseException) -> EngineDeadError:
        return self._ranks.fail(f"a pipelined step failed on {where} ({type(error).__name__}: {error}); "
                                "the stages are out of step")

    def timings(self) -> StepTimings:
        return self.driver.timings()  # rank 0's, the one that samples (no call while steps are in flight)

    def reset_timings(self) -> None:
        self.driver.reset_timings()

    def estimate_memory(self) -> MemoryEstimate:
        """Every rank's share, summed: they all live on this machine."""
        estimates = self.collective_rpc("estimate_memory")
        return MemoryEstimate(sum(e.weight_bytes for e in estimates), sum(e.kv_cache_bytes for e in estimates))

    def initialize_cache(self, num_blocks: int, eos_token_ids: frozenset[int]) -> ModelInfo:
        infos = self.rank_infos = self.collective_rpc("initialize_cache", num_blocks, eos_token_ids)
        parts = [layout.describe() for layout in (self.driver.layout, self.driver.stages) if layout is not None]
        logger.info("%s; per rank: weights %s MiB, a KV cache of %d tokens (%d blocks) for its heads and layers, "
                    "%s MiB", "; ".join(parts), "/".join(f"{i.weight_bytes / 2**20:.1f}" for i in infos),
                    num_blocks * self.config.cache.block_size, num_blocks,
                    "/".join(f"{i.kv_cache_bytes / 2**20:.1f}" for i in infos))
        # the engine's footprint: every rank's weights and cache (the ranks share this machine)
        return dataclasses.replace(infos[0], weight_bytes=sum(i.weight_bytes for i in infos),
                                   kv_cache_bytes=sum(i.kv_cache_bytes for i in infos))

    def check_health(self) -> None:
        ranks = self._ranks
        if ranks.dead is not None:
            raise ranks.dead
        for rank, link in enumerate(ranks.links, 1):
            if link.proc.poll() is not None:
                raise ranks.fail(f"tensor-parallel rank {rank} (process {link.pid}) "
                                 f"{_describe_exit(link.proc.returncode)}")

    def shutdown(self) -> None:
        self._finalizer()
        for monitor in self._monitors:
            if monitor is not threading.current_thread():
                monitor.join(SHUTDOWN_TIMEOUT_S)


def _close(driver: Worker, ranks: _Ranks) -> None:
    driver.shutdown()
    ranks.close()


def _for_remote(scheduled: SchedulerOutput) -> SchedulerOutput:
    """The step as the non-sampling ranks get it: without constrained requests' masks (live
    objects of this process; only rank 0 samples)."""
    if not any(r.allowed is not None for r in scheduled.requests):
        return scheduled
    return dataclasses.replace(scheduled, requests=[dataclasses.replace(r, allowed=None) if r.allowed is not None
                                                    else r for r in scheduled.requests])
