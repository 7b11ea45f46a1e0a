"""AsyncEngine: the LLMEngine stepped in a background thread, results fed to asyncio queues.

The model forward is blocking CPU/GPU work, so it runs on its own thread and the event loop
stays free for HTTP. Prompts are tokenized and validated on the caller's side (errors come
back at once, nothing is queued); the engine thread owns every engine mutation, applying
queued adds and aborts between steps.

    caller (event loop)                       engine thread
    generate() -> validate -> cmd queue  -->  drain adds/aborts, step()
    async for out in queue   <-- call_soon_threadsafe(queue.put_nowait, out)
    cancelled / closed -> abort -> cmd queue  -->  abort_request: blocks freed
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass

from surge.engine.llm_engine import EngineStats, LLMEngine
from surge.errors import EngineDeadError, InvalidArgumentError, SurgeError
from surge.outputs import RequestOutput
from surge.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["AsyncEngine", "EngineDeadError", "RequestFailedError"]


class RequestFailedError(SurgeError):
    """The engine failed on this one request (finish_reason "error") and went on serving the others."""


@dataclass
class _Add:
    request_id: str
    ids: list[int]
    text: str | None
    params: SamplingParams
    priority: int
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    accepted: asyncio.Future


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Dead:
    """The executor lost its worker: the engine thread stops, even while idle."""

    error: BaseException


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self._stats: EngineStats = engine.stats()
        engine.on_failure(_wake_on_failure(weakref.ref(self)))

    # ---- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="surge-engine", daemon=True)
            self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def shutdown(self, timeout: float | None = 10.0) -> None:
        self._stop.set()
        self._commands.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- requests -----------------------------------------------------------------------

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        priority: int = 0,
        prompt_text: str | None = None,
        data_parallel_rank: int | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as the engine produces them; closing the iterator aborts it.
        `data_parallel_rank`: only 0 (or None) names this one engine."""
        self.check_replica(data_parallel_rank)
        if not self.is_running:
            raise EngineDeadError(f"the engine is not running ({self.error or 'shut down'})")
        text, ids = self.engine.tokenize_prompt(prompt)
        text = text if text is not None else prompt_text
        if params.structured_outputs is not None:  # a grammar to compile (or find cached): not on the loop
            await asyncio.to_thread(self.engine.validate, ids, params)
        else:
            self.engine.validate(ids, params)  # raises InvalidArgumentError before anything is queued
        loop = asyncio.get_running_loop()
        request_id = request_id or f"async-{next(self._ids)}"
        stream: asyncio.Queue = asyncio.Queue()
        accepted = loop.create_future()
        self._commands.put(_Add(request_id, ids, text, params, priority, loop, stream, accepted))
        finished = False
        try:
            await accepted
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
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

    @staticmethod
    def check_replica(data_parallel_rank: int | None) -> None:
        """One engine is replica 0: any other rank asked for is refused."""
        if data_parallel_rank not in (None, 0):
            raise InvalidArgumentError(f"data_parallel_rank {data_parallel_rank} is out of range: this model runs "
                                       f"one replica (0)")

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    def stats(self) -> EngineStats:
        """The counters as of the last step (a snapshot, safe to read from any thread)."""
        return self._stats

    def num_unfinished(self) -> int:
        return len(self._streams)

    # ---- engine thread ------------------------------------------------------------------

    def _apply(self, command: _Add | _Abort | _Dead | None) -> None:
        if isinstance(command, _Dead):
            raise command.error
        if isinstance(command, _Add):
            try:
                self.engine.add_request(command.ids, command.params, command.request_id, command.priority,
                                        prompt_text=command.text)
            except Exception as exc:  # bad input found by the engine: reject this request only
                if not command.loop.is_closed():
                    command.loop.call_soon_threadsafe(_set_exception, command.accepted, exc)
                return
            self._streams[command.request_id] = (command.loop, command.out)
            try:
                command.loop.call_soon_threadsafe(_set_result, command.accepted, command.request_id)
            except RuntimeError:  # the caller's loop is gone already
                self._streams.pop(command.request_id, None)
                self.engine.abort_request(command.request_id)
        elif isinstance(command, _Abort):
            self.engine.abort_request(command.request_id)
            self._streams.pop(command.request_id, None)

    def _drain(self, block: bool) -> None:
        try:
            # idle: sleep until a command (or the shutdown sentinel) arrives
            command = self._commands.get() if block else self._commands.get_nowait()
        except queue.Empty:
            return
        self._apply(command)
        while True:
            try:
                self._apply(self._commands.get_nowait())
            except queue.Empty:
                return

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        """Hand an output to its caller's loop; a caller whose loop is gone is aborted."""
        loop, stream = self._streams[request_id]
        try:
            loop.call_soon_threadsafe(stream.put_nowait, item)
        except RuntimeError:  # the event loop was closed under us
            self._streams.pop(request_id, None)
            self.engine.abort_request(request_id)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain(block=not self.engine.has_unfinished_requests())
                if not self.engine.has_unfinished_requests():
                    self._stats = self.engine.stats()
                    continue
                for out in self.engine.step():
                    if out.request_id in self._streams:
                        self._deliver(out.request_id, out)
                        if out.finished:
                            self._streams.pop(out.request_id, None)
                self._stats = self.engine.stats()
        except BaseException as exc:  # a failed step: every waiting client gets the error
            logger.exception("engine step failed")
            self.error = exc
            dead = exc if isinstance(exc, EngineDeadError) else \
                EngineDeadError(f"the engine failed: {type(exc).__name__}: {exc}")
            for request_id in list(self._streams):
                self._deliver(request_id, dead)
                self.engine.abort_request(request_id)
            self._streams.clear()
        finally:
            # requests submitted but never applied are answered too
            while True:
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    break
                if isinstance(command, _Add) and not command.loop.is_closed():
                    command.loop.call_soon_threadsafe(
                        _set_exception, command.accepted, EngineDeadError("the engine has shut down"))


def _wake_on_failure(ref: "weakref.ref[AsyncEngine]"):  # type: ignore[no-untyped-def]
    """A lost worker stops the engine thread even while it sleeps (weakly: the engine stays collectable)."""
    def wake(error: BaseException) -> None:
        engine = ref()
        if engine is not None:
            engine._commands.put(_Dead(error))

    return wake


def _set_result(future: asyncio.Future, value: object) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
