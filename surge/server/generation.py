"""The one generation path of the OpenAI routes (completions and chat alike).

A route parses its body and builds a Generation: the lease on a deployment, the prompts
(tokenized and checked off the event loop), one engine stream per prompt. Generation.respond
then streams server-sent events or collects the final answer; what the two APIs differ in
(chunk and choice shapes, echo, logprobs formats) is an OutputFormat (surge/server/routes/).
Either way the request is aborted the moment it ends early (timeout, disconnect, the
shutdown's abort, an error), the metrics see every finished sequence, and the lease is
returned once the answer is sent.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from surge.engine.llm_engine import LLMEngine
from surge.errors import InvalidArgumentError, StructuredOutputError, SurgeError
from surge.outputs import RequestOutput
from surge.sampling_params import SamplingParams
from surge.server.errors import APIError, bad_request
from surge.server.formatting import envelope, usage
from surge.server.lease import Lease, version_headers
from surge.server.plumbing import off_loop, sse, stream_error, until_disconnect
from surge.server.state import ServerState

Prompt = tuple[str | None, list[int]]  # (text if given as text, token ids)


def sampling(build: Callable[[], SamplingParams], constraint_param: str | None = None) -> SamplingParams:
    try:
        return build()
    except StructuredOutputError as exc:
        raise bad_request(str(exc), constraint_param) from exc
    except SurgeError as exc:
        raise bad_request(str(exc)) from exc


def check_prompt_count(state: ServerState, count: int, what: str = "prompt") -> None:
    """A 400 for a request carrying more prompts than --max-prompts allows."""
    limit = state.settings.max_prompts
    if count > limit:
        raise bad_request(f"the request has {count} {what}s; at most {limit} per request (--max-prompts)", what)


def prepare_prompts(engine: LLMEngine, prompts: list[str | list[int]], params: SamplingParams,
                    constraint_param: str | None = None, prompt_param: str = "prompt") -> list[Prompt]:
    """Tokenize and check each prompt, and compile the output constraint (blocking: run it off
    the event loop; the compiled grammar is cached for the engine's thread)."""
    out = []
    try:
        for prompt in prompts:
            text, ids = engine.tokenize_prompt(prompt)
            engine.validate(ids, params)
            out.append((text, ids))
    except StructuredOutputError as exc:
        raise bad_request(str(exc), param=constraint_param) from exc
    except SurgeError as exc:
        raise bad_request(str(exc), param=prompt_param) from exc
    return out


def render_chat(engine: LLMEngine, messages: list[dict[str, Any]], add_generation_prompt: bool,
                template_kwargs: dict[str, Any] | None = None) -> str:
    """The text of messages (as template dicts) through the model's chat template."""
    try:
        return engine.tokenizer.apply_chat_template(messages, add_generation_prompt, **(template_kwargs or {}))
    except SurgeError as exc:
        raise bad_request(str(exc), "messages") from exc
    except Exception as exc:  # the template itself failed on these messages (raise_exception, a type error)
        raise bad_request(f"the chat template cannot render these messages: {exc}", "messages") from exc


def encode_chat(engine: LLMEngine, messages: list[dict[str, Any]], add_generation_prompt: bool,
                template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """Token ids of messages (as template dicts) through the model's chat template (the template
    writes any BOS itself)."""
    return engine.tokenizer.encode(render_chat(engine, messages, add_generation_prompt, template_kwargs),
                                   add_special_tokens=False)


@dataclass
class Track:
    """Timing of one prompt's completion, for TTFT / TPOT / latency metrics."""

    start: float = field(default_factory=time.monotonic)
    first: float | None = None
    tokens: int = 0

    def saw(self, out: RequestOutput) -> None:
        """Count an output's tokens; the first token's time is the engine's when it knows it
        (a non-streaming request only sees its output at the end)."""
        count = sum(len(c.token_ids) for c in out.outputs)
        if count and self.first is None:
            self.first = out.first_token_time if out.first_token_time is not None else time.monotonic()
        self.tokens += count


async def merged(gens: list[AsyncIterator[RequestOutput]], deadline: float | None,
                 aborting: asyncio.Event | None = None) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several engine streams as they come, tagged with the stream's index.

    Leaving early (timeout, disconnect, error, the shutdown's abort) cancels every stream,
    which aborts its request.
    """
    queue: asyncio.Queue = asyncio.Queue()
    done = object()
    stopped = object()

    async def watch_abort() -> None:
        assert aborting is not None
        await aborting.wait()
        await queue.put((-1, stopped))

    async def pump(i: int, gen: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in gen:
                await queue.put((i, out))
        except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer
            await queue.put((i, exc))
            return
        await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    remaining = len(tasks)
    if aborting is not None:
        tasks.append(asyncio.create_task(watch_abort()))
    try:
        while remaining:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                i, item = await asyncio.wait_for(queue.get(), timeout)
            except asyncio.TimeoutError:
                raise APIError(408, "the request exceeded the server's --request-timeout and was aborted",
                               "timeout_error", code="request_timeout") from None
            if item is stopped:
                raise APIError(503, "the server is shutting down: the request was aborted after the grace period",
                               "service_unavailable", code="shutting_down")
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class OutputFormat(Protocol):
    """How one API shapes a generation's outputs."""

    object: str  # of the final answer: "text_completion", "chat.completion"
    chunk_object: str  # of a streamed chunk

    def prelude(self) -> list[dict]:
        """Choices streamed before any output (chat's role)."""

    async def chunks(self, index: int, out: RequestOutput) -> list[dict]:
        """The streamed choices for one output of prompt `index`."""

    async def choices(self, finals: dict[int, RequestOutput]) -> list[dict]:
        """The final answer's choices from each prompt's last output."""


REPLICA_HEADER = "x-surge-replica"


def requested_replica(request: Any, body_rank: int | None) -> int | None:
    """The data-parallel replica a request asks for: the body's `data_parallel_rank`, else the
    X-Surge-Replica header (a 400 when it is not a non-negative integer), else None."""
    if body_rank is not None:
        return body_rank
    raw = request.headers.get(REPLICA_HEADER)
    if raw is None:
        return None
    if not raw.strip().isdigit() or len(raw.strip()) > 4:
        raise bad_request(f"X-Surge-Replica must be a replica's number (0, 1, ...), got {raw!r}")
    return int(raw)


class Generation:
    """One OpenAI request's engine streams under its lease (see the module docstring)."""

    def __init__(self, state: ServerState, lease: Lease, prompts: list[Prompt], params: SamplingParams,
                 rid_prefix: str, priority: int, include_usage: bool, numbered: bool, replica: int | None = None):
        self.state, self.lease, self.prompts, self.params = state, lease, prompts, params
        self.rid = f"{rid_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.deadline = state.deadline()
        self.include_usage = include_usage
        # engine request ids: "<rid>-<i>" per prompt where a request may have several (numbered)
        ids = [f"{self.rid}-{i}" for i in range(len(prompts))] if numbered else [self.rid] * len(prompts)
        self.gens = [lease.generate(p_ids, params, rid, priority, prompt_text=text, replica=replica)
                     for rid, (text, p_ids) in zip(ids, prompts)]

    @classmethod
    async def start(cls, state: ServerState, model: str | None, sequences: int,
                    prepare: Callable[[LLMEngine], list[Prompt]], params: SamplingParams, rid_prefix: str,
                    priority: int, include_usage: bool, numbered: bool = False,
                    replica: int | None = None) -> "Generation":
        """Lease a deployment for `sequences` sequences, run prepare(engine) off the event loop
        and queue every prompt; the lease is returned if any of it fails."""
        lease = Lease(state, model, sequences)
        try:
            try:
                lease.aengine.check_replica(replica)
            except InvalidArgumentError as exc:
                raise bad_request(str(exc), "data_parallel_rank") from exc
            prompts = await off_loop(prepare, lease.engine)
            return cls(state, lease, prompts, params, rid_prefix, priority, include_usage, numbered, replica)
        except BaseException:
            lease.release()
            raise

    @property
    def engine(self) -> LLMEngine:
        return self.lease.engine

    @property
    def prompt_tokens(self) -> int:
        return sum(len(ids) for _, ids in self.prompts)

    def _envelope(self, obj: str, choices: list[dict], **extra: Any) -> dict[str, Any]:
        return envelope(self.rid, obj, self.created, self.lease.model, self.lease.fingerprint, choices, **extra)

    def _chunk(self, fmt: OutputFormat, choice: dict) -> str:
        """One streamed chunk; with include_usage every chunk carries "usage": null, as OpenAI's do."""
        extra = {"usage": None} if self.include_usage else {}
        return sse(self._envelope(fmt.chunk_object, [choice], **extra))

    async def respond(self, request: Request, fmt: OutputFormat, streaming: bool) -> Response:
        headers = version_headers(self.lease)
        if streaming:
            return StreamingResponse(self.stream(fmt), media_type="text/event-stream",
                                     background=BackgroundTask(self.lease.release), headers=headers)
        try:
            return JSONResponse(await until_disconnect(request, self.collect(fmt)), headers=headers)
        finally:
            self.lease.release()

    async def stream(self, fmt: OutputFormat) -> AsyncIterator[str]:
        metrics, model = self.state.metrics, self.lease.deployment.name
        tracks = [Track() for _ in self.prompts]
        completion_tokens = 0
        cached: dict[int, int] = {}
        try:
            for choice in fmt.prelude():
                yield self._chunk(fmt, choice)
            async for i, out in merged(self.gens, self.deadline, self.state.aborting):
                tracks[i].saw(out)
                cached[i] = out.num_cached_tokens
                completion_tokens += sum(len(c.token_ids) for c in out.outputs)
                for c in out.outputs:
                    if c.finish_reason is not None:
                        metrics.record_finish(model, c.finish_reason)
                for choice in await fmt.chunks(i, out):
                    yield self._chunk(fmt, choice)
                if out.finished:
                    metrics.record_request(model, tracks[i].start, tracks[i].first, time.monotonic(), tracks[i].tokens)
            if self.include_usage:
                yield sse(self._envelope(fmt.chunk_object, [], usage=usage(self.prompt_tokens, completion_tokens,
                                                                           sum(cached.values()))))
        except Exception as exc:  # noqa: BLE001 - every failure ends the stream with an error event
            yield stream_error(exc)
        finally:
            self.lease.release()
        yield sse("[DONE]")

    async def collect(self, fmt: OutputFormat) -> dict:
        finals: dict[int, RequestOutput] = {}
        tracks = [Track() for _ in self.prompts]
        async for i, out in merged(self.gens, self.deadline, self.state.aborting):
            tracks[i].saw(out)
            finals[i] = out
        choices = await fmt.choices(finals)
        metrics, model = self.state.metrics, self.lease.deployment.name
        end = time.monotonic()
        completion_tokens = 0
        for i, track in enumerate(tracks):
            for c in finals[i].outputs:
                completion_tokens += len(c.token_ids)
                metrics.record_finish(model, c.finish_reason)
            metrics.record_request(model, track.start, track.first, end, track.tokens)
        return self._envelope(fmt.object, choices, usage=usage(self.prompt_tokens, completion_tokens,
                                                               sum(f.num_cached_tokens for f in finals.values())))
