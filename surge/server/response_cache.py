"""Response cache: finished generations of deterministic requests, replayed without the engine.

Keyed by (model version, prompt token ids, sampling parameters); only requests whose output
is a function of that key are cached: greedy ones (temperature 0) and seeded ones. A hit is
replayed as one finished output, so the streaming and the non-streaming paths both serve it.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Hashable
from dataclasses import dataclass, field

from surge.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from surge.sampling_params import SamplingParams, StructuredOutputsParams

# fields that change how outputs are delivered, not what is generated
_DELIVERY_FIELDS = {"output_kind"}


def is_deterministic(params: SamplingParams) -> bool:
    """Greedy, sampled from a fixed seed, or an embedding: the same request always gives the same
    answer."""
    return params.temperature == 0 or params.seed is not None or params.pooling is not None


def cache_key(version_key: str, prompt_ids: list[int], params: SamplingParams) -> Hashable:
    settings = tuple(
        (f.name, _hashable(getattr(params, f.name)))
        for f in dataclasses.fields(params) if f.name not in _DELIVERY_FIELDS
    )
    return version_key, tuple(prompt_ids), settings


def _hashable(value: object) -> Hashable:
    if isinstance(value, StructuredOutputsParams):
        return value.key()
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple, set, frozenset)):
        return tuple(_hashable(v) for v in (sorted(value) if isinstance(value, (set, frozenset)) else value))
    return value  # type: ignore[return-value]


@dataclass
class _Completion:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float | None = None


@dataclass
class CachedGeneration:
    """A whole generation: what a FINAL_ONLY output of the same request would hold."""

    prompt: str | None
    prompt_token_ids: list[int]
    completions: list[_Completion]
    prompt_logprobs: list[PositionLogprobs | None] | None
    embedding: list[float] | None = None

    def as_output(self, request_id: str) -> RequestOutput:
        outputs = [CompletionOutput(c.index, c.text, list(c.token_ids), c.finish_reason, c.stop_reason,
                                    list(c.logprobs) if c.logprobs is not None else None, c.cumulative_logprob)
                   for c in self.completions]
        prompt_lps = list(self.prompt_logprobs) if self.prompt_logprobs is not None else None
        return RequestOutput(request_id, self.prompt, list(self.prompt_token_ids), outputs, True, prompt_lps,
                             len(self.prompt_token_ids),
                             embedding=list(self.embedding) if self.embedding is not None else None)


class _Recorder:
    """Accumulates a request's outputs (deltas or cumulative) into the whole generation."""

    def __init__(self, cumulative: bool):
        self.cumulative = cumulative
        self.completions: dict[int, _Completion] = {}
        self.prompt: str | None = None
        self.prompt_ids: list[int] = []
        self.prompt_logprobs: list[PositionLogprobs | None] | None = None
        self.embedding: list[float] | None = None

    def add(self, out: RequestOutput) -> None:
        self.prompt, self.prompt_ids = out.prompt, out.prompt_token_ids
        if out.embedding is not None:
            self.embedding = out.embedding
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        for c in out.outputs:
            done = self.completions.setdefault(c.index, _Completion(c.index))
            if self.cumulative:
                done.text, done.token_ids = c.text, list(c.token_ids)
                done.logprobs = list(c.logprobs) if c.logprobs is not None else None
            else:
                done.text += c.text
                done.token_ids += c.token_ids
                if c.logprobs is not None:
                    done.logprobs = (done.logprobs or []) + list(c.logprobs)
            done.finish_reason, done.stop_reason = c.finish_reason, c.stop_reason
            done.cumulative_logprob = c.cumulative_logprob

    def result(self) -> CachedGeneration:
        return CachedGeneration(self.prompt, list(self.prompt_ids),
                                [self.completions[i] for i in sorted(self.completions)], self.prompt_logprobs,
                                self.embedding)


class ResponseCache:
    """An LRU of finished generations (thread-safe: versions are dropped from drain threads)."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError("the response cache needs a capacity of at least 1")
        self.capacity = capacity
        self._entries: OrderedDict[Hashable, CachedGeneration] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> CachedGeneration | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: Hashable, entry: CachedGeneration) -> None:
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def drop_version(self, version_key: str) -> None:
        """Forget an unloaded version's entries (they can never be hit again)."""
        with self._lock:
            for key in [k for k in self._entries if k[0] == version_key]:  # type: ignore[index]
                del self._entries[key]

    async def through(self, key: Hashable, gen: AsyncIterator[RequestOutput], cumulative: bool
                      ) -> AsyncIterator[RequestOutput]:
        """Pass `gen`'s outputs on, storing the generation once it finishes normally."""
        recorder = _Recorder(cumulative)
        async for out in gen:
            recorder.add(out)
            if out.finished:
                self.put(key, recorder.result())
            yield out


async def replay(entry: CachedGeneration, request_id: str) -> AsyncIterator[RequestOutput]:
    yield entry.as_output(request_id)
