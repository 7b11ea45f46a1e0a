"""StructuredOutputManager: the engine's side of constrained decoding.

Grammars are compiled once per constraint (kind and text) and cached, errors included, in
whatever thread asks first: the server validates a request in a worker thread before queueing
it, so a slow schema never stalls the step loop, and the engine thread only finds it cached.
Each constrained request (each of its n > 1 completions) gets its own matcher. Before a step
runs, every scheduled request that samples gets, on `ScheduledRequest.allowed`, either

- the row of allowed tokens its matcher gives (int32 bitmask words in a numpy array: plain data
  an executor ships to a worker process as it is), or
- where the runner is in this process, a DeferredMask: the sampler first samples as if free and
  asks whether the grammar allows that token (microseconds); only rows it refuses, or whose
  settings need the whole row (logprobs, top-k/p, min-p), get their mask computed (tens to
  hundreds of microseconds each, the cost that dominated constrained decoding).

The sampled token is accepted back here. A preempted request keeps its matcher: its tokens are
recomputed, not re-chosen, so the grammar state stays valid.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from typing import Any

import numpy
import torch

from surge.core.scheduler_output import SchedulerOutput
from surge.errors import StructuredOutputError
from surge.sampling_params import StructuredOutputsParams
from surge.structured.backends import Grammar, GuidanceBackend, Matcher, XGrammarBackend
from surge.structured.schema import REGEX_EXTENSIONS, prepare_schema
from surge.tokenizer import Tokenizer

CACHE_SIZE = 512  # compiled grammars (and refusals) kept, least recently used first out
# llguidance masks computed on its own thread pool from this many a step; fewer one at a time:
# the pool's threads keep spinning after their work and take time from the forward pass that
# follows (measured on 2 cores: a few deferred masks a step in the pool slowed the forward 2-7%)
PARALLEL_MASKS = 8


class _Pending:
    """A compilation in progress: other threads asking for the same constraint wait on it."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Grammar | StructuredOutputError | None = None


class DeferredMask:
    """One constrained row's mask, computed only if the sampler asks for it."""

    __slots__ = ("_manager", "request_id")

    def __init__(self, manager: StructuredOutputManager, request_id: str):
        self._manager, self.request_id = manager, request_id

    def allows(self, token: int) -> bool:
        """Whether the row's mask would allow `token` (the grammar state does not change)."""
        return self._manager.allows(self.request_id, token)

    def resolve(self, group: list[DeferredMask]) -> numpy.ndarray:
        """The masks of `group` (deferred rows of this step), one row each, computed together."""
        return self._manager.masks([d.request_id for d in group])


class StructuredOutputManager:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_ids: frozenset[int]):
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        self.xgrammar = XGrammarBackend(tokenizer, vocab_size, eos_ids)
        self.guidance = GuidanceBackend(tokenizer, vocab_size, eos_ids)
        self._cache: OrderedDict[tuple[str, str], Grammar | StructuredOutputError] = OrderedDict()
        self._pending: dict[tuple[str, str], _Pending] = {}
        self._lock = threading.Lock()
        self._matchers: dict[str, Matcher] = {}
        self._failed: dict[str, Exception] = {}  # a matcher that raised while filling: its request fails
        self._rows = torch.empty((0, self.words), dtype=torch.int32)  # one step's bitmasks
        self.compiles = 0
        self.compile_seconds = 0.0
        self.rows = 0  # constrained rows sampled
        self.masks_computed = 0  # of them, those whose whole mask was computed

    # ---- grammars ---------------------------------------------------------------------

    def grammar(self, spec: StructuredOutputsParams) -> Grammar:
        """The compiled grammar of `spec` (cached); StructuredOutputError naming what is wrong."""
        key = spec.key()
        with self._lock:
            value = self._cache.get(key)
            if value is not None:
                self._cache.move_to_end(key)
            else:
                pending = self._pending.get(key)
                owner = pending is None
                if owner:
                    pending = self._pending[key] = _Pending()
        if value is None:
            assert pending is not None
            if owner:
                t0 = time.perf_counter()
                try:
                    pending.value = self._compile(spec)
                except StructuredOutputError as exc:
                    pending.value = exc
                except Exception as exc:  # a backend's own error: still this request's problem alone
                    pending.value = StructuredOutputError(f"{spec.kind}: cannot be compiled ({type(exc).__name__}: {exc})")
                with self._lock:
                    self.compiles += 1
                    self.compile_seconds += time.perf_counter() - t0
                    self._cache[key] = pending.value
                    while len(self._cache) > CACHE_SIZE:
                        self._cache.popitem(last=False)
                    del self._pending[key]
                pending.done.set()
            else:
                pending.done.wait()
            value = pending.value
        if isinstance(value, StructuredOutputError):
            raise StructuredOutputError(str(value))
        assert value is not None
        return value

    def _compile(self, spec: StructuredOutputsParams) -> Grammar:
        kind = spec.kind
        if kind == "json_object":
            return self.xgrammar.json_schema({"type": "object"})
        if kind == "json":
            schema, backend = prepare_schema(spec.json)
            return (self.xgrammar if backend == "xgrammar" else self.guidance).json_schema(schema)
        if kind == "regex":
            assert spec.regex is not None
            if REGEX_EXTENSIONS.search(spec.regex):
                return self.guidance.regex(spec.regex)
            return self.xgrammar.regex(spec.regex)
        if kind == "choice":
            assert spec.choice is not None
            # a grammar of string literals: JSON's escapes are also the EBNF's
            return self.xgrammar.grammar("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False)
                                                                  for c in spec.choice))
        if kind == "lark":
            assert spec.lark is not None
            return self.guidance.grammar(spec.lark)
        assert spec.grammar is not None
        try:
            return self.xgrammar.grammar(spec.grammar)
        except StructuredOutputError as first:
            try:
                return self.guidance.grammar(spec.grammar)
            except StructuredOutputError as second:
                raise StructuredOutputError(
                    f"the grammar is neither GBNF / EBNF ({first}) nor Lark ({second})") from None

    # ---- requests ---------------------------------------------------------------------

    def add(self, request_id: str, spec: StructuredOutputsParams) -> None:
        self._matchers[request_id] = self.grammar(spec).matcher()

    def free(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)
        self._failed.pop(request_id, None)

    @property
    def active(self) -> bool:
        return bool(self._matchers)

    def fill(self, scheduled: SchedulerOutput, deferred: bool = False) -> None:
        """Give each scheduled request that samples this step and is constrained its allowed
        tokens: the bitmask row, or with `deferred` (a runner in this process) a DeferredMask."""
        todo = [(r, m) for r in scheduled.requests
                if r.sample and (m := self._matchers.get(r.request_id)) is not None]
        if not todo:
            return
        self.rows += len(todo)
        if deferred:
            for r, _ in todo:
                r.allowed = DeferredMask(self, r.request_id)
            return
        if self._rows.shape[0] < len(todo):
            self._rows = torch.empty((max(len(todo), 2 * self._rows.shape[0]), self.words), dtype=torch.int32)
        rows = self._compute([(r.request_id, m) for r, m in todo], self._rows)
        for i, (r, _) in enumerate(todo):
            # a numpy row, not a tensor: pickled by value to a worker process (a tensor would go
            # as a shared-memory handle the worker cannot open); the buffer is refilled next step,
            # after this one has run
            r.allowed = rows[i]

    def masks(self, request_ids: list[str]) -> numpy.ndarray:
        """The bitmask rows of these requests' matchers now, in a new array."""
        out = torch.empty((len(request_ids), self.words), dtype=torch.int32)
        return self._compute([(rid, self._matchers[rid]) for rid in request_ids], out)

    def allows(self, request_id: str, token: int) -> bool:
        try:
            return self._matchers[request_id].allows(token)
        except Exception as exc:  # noqa: BLE001 - the token stands; its request fails at accept()
            self._failed[request_id] = exc
            return True

    def _compute(self, todo: list[tuple[str, Matcher]], buffer: torch.Tensor) -> numpy.ndarray:
        """Fill buffer[:len(todo)] with the matchers' masks (llguidance's together on its own
        threads, when there are PARALLEL_MASKS of them); a matcher that raises gets an empty row
        and its request fails at accept()."""
        self.masks_computed += len(todo)
        rows = buffer.numpy()
        parallel = [(matcher, i) for i, (_, matcher) in enumerate(todo) if getattr(matcher, "parallel", False)]
        together = len(parallel) >= PARALLEL_MASKS
        if together:
            try:
                self.guidance.fill_many(parallel, buffer[: len(todo)])
            except Exception:  # noqa: BLE001 - one at a time below, so a failure stays its request's
                together = False
        for i, (request_id, matcher) in enumerate(todo):
            if not (together and getattr(matcher, "parallel", False)):
                try:
                    matcher.fill(buffer, i)
                except Exception as exc:  # noqa: BLE001 - this request fails alone, at accept()
                    self._failed[request_id] = exc
                    rows[i] = 0
        return rows[: len(todo)]

    def accept(self, request_id: str, token: int) -> bool:
        """Advance the request's matcher by its sampled token; True when the grammar has ended.
        A token the grammar refuses fails the request (the sampler never picks one)."""
        matcher = self._matchers.get(request_id)
        if matcher is None:
            return False
        failed = self._failed.pop(request_id, None)
        if failed is not None:
            raise RuntimeError(f"the request's grammar failed: {type(failed).__name__}: {failed}")
        if not matcher.accept(token):
            raise RuntimeError(f"token {token} is not allowed by the request's grammar")
        return matcher.is_terminated()

    def stats(self) -> dict[str, Any]:
        return {"grammars_compiled": self.compiles, "grammar_compile_seconds": self.compile_seconds,
                "constrained_requests": len(self._matchers), "constrained_rows": self.rows,
                "masks_computed": self.masks_computed}
