"""OutputProcessor: from sampled tokens to what callers receive.

A user request with n > 1 becomes n scheduler requests (its children) over the same prompt;
prefix caching makes them share the prompt's KV blocks. Per step it records each child's
token and logprobs, checks stop strings, stop tokens, EOS and lengths (ending the child in
the scheduler), detokenizes, and assembles outputs per user request: cumulative, as deltas
for streaming, or once at the end. A request whose processing raises fails alone.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from surge.core.request import FinishReason, Request
from surge.core.runner_output import ModelRunnerOutput, TokenLogprobs
from surge.core.scheduler import Scheduler
from surge.core.scheduler_output import SchedulerOutput
from surge.engine.detokenizer import RequestDetokenizer
from surge.engine.engine_core import check_recoverable
from surge.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from surge.sampling_params import RequestOutputKind, SamplingParams
from surge.structured.manager import StructuredOutputManager
from surge.tokenizer import Tokenizer


@dataclass
class _Child:
    """Engine-side state of one completion (one scheduler request)."""

    request: Request
    index: int
    detok: RequestDetokenizer | None
    logprobs: list[PositionLogprobs] | None
    cumulative_logprob: float | None
    sent_text: int = 0
    sent_tokens: int = 0
    sent_finished: bool = False


@dataclass
class _Parent:
    """One user request: its prompt, settings and n children."""

    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    children: list[_Child] = field(default_factory=list)
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    prompt_logprobs_sent: bool = False
    embedding: list[float] | None = None  # an embedding request's vector, once its prompt has run

    @property
    def finished(self) -> bool:
        return all(c.request.is_finished for c in self.children)


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, scheduler: Scheduler, eos_ids: frozenset[int],
                 structured: StructuredOutputManager):
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.eos_ids = eos_ids
        self.structured = structured
        self._parents: dict[str, _Parent] = {}
        self._child_parent: dict[str, tuple[_Parent, _Child]] = {}
        self._token_texts: dict[int, str] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._parents

    def __len__(self) -> int:
        return len(self._parents)

    # ---- requests -----------------------------------------------------------------------

    def add_request(self, request_id: str, text: str | None, ids: list[int], params: SamplingParams,
                    max_tokens: int, priority: int) -> None:
        """Make the request's children and queue them in the scheduler (all or none)."""
        parent = _Parent(request_id, text, ids, params)
        if params.prompt_logprobs is not None:
            parent.prompt_logprobs = [None]
        now = time.monotonic()
        children = []
        for i in range(params.n):
            child_params = params
            if params.n > 1 and params.seed is not None:
                seed = params.seed + i  # wraps inside 64 bits: 2^64 - 1 + 1 -> 0
                child_params = dataclasses.replace(params, seed=seed - 2**64 if seed >= 2**64 else seed)
            child_id = request_id if params.n == 1 else f"{request_id}#{i}"
            request = Request(
                child_id, ids, max_tokens, child_params, now, priority,
                # prompt logprobs and mean pooling need every prompt position computed
                skip_prefix_cache=(i == 0 and params.prompt_logprobs is not None) or params.pooling == "mean",
                speculate=self.scheduler.speculator is not None and params.verifiable,
            )
            if i > 0:
                request.sampling_params = dataclasses.replace(child_params, prompt_logprobs=None)
            needs_text = params.pooling is None and (bool(params.stop)
                                                     or params.output_kind is not RequestOutputKind.FINAL_ONLY)
            detok = RequestDetokenizer(self.tokenizer, ids, params) if needs_text else None
            want_lp = params.logprobs is not None
            children.append(_Child(request, i, detok, [] if want_lp else None, 0.0 if want_lp else None))
        added: list[Request] = []
        try:
            for child in children:
                if params.structured_outputs is not None:  # a matcher of its own per completion
                    self.structured.add(child.request.request_id, params.structured_outputs)
                self.scheduler.add_request(child.request)
                added.append(child.request)
        except BaseException:
            for request in added:
                self.scheduler.finish(request, FinishReason.ABORT)
            for child in children:
                self.structured.free(child.request.request_id)
            raise
        parent.children = children
        self._parents[request_id] = parent
        for child in children:
            self._child_parent[child.request.request_id] = (parent, child)

    def abort_request(self, request_id: str) -> None:
        parent = self._parents.pop(request_id, None)
        if parent is None:
            return
        for child in parent.children:
            self.scheduler.finish(child.request, FinishReason.ABORT)
            self._child_parent.pop(child.request.request_id, None)
            self.structured.free(child.request.request_id)

    # ---- one step -----------------------------------------------------------------------

    def process(self, scheduled: SchedulerOutput, result: ModelRunnerOutput,
                culprits: list[tuple[str, BaseException]]) -> list[RequestOutput]:
        """Apply a step's result: the scheduler advances, each request's output is made."""
        outputs: list[RequestOutput] = []
        for request_id, exc in culprits:
            entry = self._child_parent.get(request_id)
            if entry is not None and entry[0].request_id in self._parents:
                outputs.append(self.fail(entry[0], exc))
        touched: dict[str, _Parent] = {}
        starts = {r.request_id: r.start_position for r in scheduled.requests}
        for request_id, scores in result.prompt_logprobs.items():
            parent, _ = self._child_parent[request_id]
            assert parent.prompt_logprobs is not None
            # scores of positions start + 1 ..; a prompt recomputed after a preemption scores
            # again positions it already has
            known = len(parent.prompt_logprobs) - (starts.get(request_id, 0) + 1)
            try:
                parent.prompt_logprobs.extend(self._position_logprobs(s) for s in scores[max(0, known):])
            except BaseException as exc:  # this request fails alone
                check_recoverable(exc)
                outputs.append(self.fail(parent, exc))
        now = time.monotonic()
        changed = self.scheduler.update(scheduled, result.sampled, result.more_tokens, result.num_proposed)
        for request_id, vector in result.pooled.items():  # an embedding request ends with its prompt
            entry = self._child_parent.get(request_id)
            if entry is None or entry[1].request.is_finished:
                continue
            parent, child = entry
            parent.embedding = vector
            self.scheduler.finish(child.request, FinishReason.STOP)
            touched[parent.request_id] = parent
        for request in changed:
            if request.first_token_time is None:
                request.first_token_time = now
            parent, child = self._child_parent[request.request_id]
            try:
                lp = result.logprobs.get(request.request_id)
                if lp is not None and child.logprobs is not None:
                    child.logprobs.append(self._position_logprobs(lp))
                    child.cumulative_logprob = (child.cumulative_logprob or 0.0) + lp.logprob
                # one token, or a verified proposal's several: each checked in order, those past a stop dropped
                new = 1 + len(result.more_tokens.get(request.request_id, ()))
                count = len(request.output_token_ids) - new
                for token in request.output_token_ids[count:]:
                    count += 1
                    if self._check_stop(child, token, count):
                        self.scheduler.take_back(request, len(request.output_token_ids) - count)
                        break
                touched[parent.request_id] = parent
            except BaseException as exc:
                check_recoverable(exc)
                touched.pop(parent.request_id, None)
                outputs.append(self.fail(parent, exc))
        for parent in touched.values():
            if parent.request_id not in self._parents:  # failed meanwhile (a sibling's error)
                continue
            try:
                out = self._make_output(parent)
            except BaseException as exc:
                check_recoverable(exc)
                outputs.append(self.fail(parent, exc))
                continue
            if out is not None:
                outputs.append(out)
            if parent.finished:
                self._forget(parent)
        return outputs

    def fail(self, parent: _Parent, exc: BaseException) -> RequestOutput:
        """End a user request (all its children) with finish_reason "error" and say why."""
        message = f"the engine failed on this request: {type(exc).__name__}: {exc}"
        for child in parent.children:
            self.scheduler.finish(child.request, FinishReason.ERROR)
        self._forget(parent)
        completions = [CompletionOutput(c.index, "", [], FinishReason.ERROR.value) for c in parent.children]
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_ids, completions, True,
                             error=message)

    def _forget(self, parent: _Parent) -> None:
        self._parents.pop(parent.request_id, None)
        for child in parent.children:
            self._child_parent.pop(child.request.request_id, None)
            self.structured.free(child.request.request_id)

    # ---- text, logprobs, stops ----------------------------------------------------------

    def token_text(self, token_id: int) -> str:
        """One token's text (special tokens included), decoded once per id: an 8k-token echo with
        20 alternatives asks for 170k of them."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def _position_logprobs(self, lp: TokenLogprobs) -> PositionLogprobs:
        text = self.token_text
        out = {lp.token_id: Logprob(lp.logprob, lp.rank, text(lp.token_id))}
        for rank, (tid, value) in enumerate(zip(lp.top_ids, lp.top_logprobs), start=1):
            if tid not in out:
                out[tid] = Logprob(value, rank, text(tid))
        return out

    def _check_stop(self, child: _Child, token: int, count: int) -> bool:
        """Whether the request ends at `token`, its `count`-th output token (and end it there)."""
        request, params = child.request, child.request.sampling_params
        ended = self.structured.accept(request.request_id, token)  # the grammar has accepted an end
        stop_string = child.detok.add(token) if child.detok is not None else None
        reason: FinishReason | None = None
        if ended:
            reason = FinishReason.STOP
            if stop_string is not None:
                request.stop_reason = stop_string
            elif token in params.stop_token_ids:
                request.stop_reason = token
        elif stop_string is not None:
            reason, request.stop_reason = FinishReason.STOP, stop_string
        elif count >= params.min_tokens and token in params.stop_token_ids:
            reason, request.stop_reason = FinishReason.STOP, token
        elif count >= params.min_tokens and not params.ignore_eos and token in self.eos_ids:
            reason = FinishReason.STOP
        elif count >= request.max_tokens:
            reason = FinishReason.LENGTH
        if reason is None:
            return False
        if stop_string is None and child.detok is not None:
            child.detok.finish()
        self.scheduler.finish(request, reason)
        return True

    def _final_text(self, parent: _Parent, child: _Child) -> str:
        if child.detok is not None:
            return child.detok.text
        # decode with a little prompt context, as streaming would, so a leading space survives
        skip = parent.params.skip_special_tokens
        context = parent.prompt_ids[-6:]
        head = self.tokenizer.decode(context, skip)
        return self.tokenizer.decode(context + child.request.output_token_ids, skip)[len(head):]

    def _make_output(self, parent: _Parent) -> RequestOutput | None:
        kind = parent.params.output_kind
        finished = parent.finished
        if kind is RequestOutputKind.FINAL_ONLY and not finished:
            return None
        completions = []
        for child in parent.children:
            req = child.request
            done = req.is_finished
            reason = req.finish_reason.value if req.finish_reason else None
            if child.detok is None and kind is not RequestOutputKind.FINAL_ONLY:  # an embedding: no text
                text, tokens, lps = "", [], None
            elif kind is RequestOutputKind.FINAL_ONLY:
                text, tokens, lps = self._final_text(parent, child), list(req.output_token_ids), child.logprobs
            else:
                assert child.detok is not None
                full = child.detok.emittable(done)
                if kind is RequestOutputKind.CUMULATIVE:
                    text, tokens, lps = full, list(req.output_token_ids), child.logprobs
                else:
                    if len(full) == child.sent_text and len(req.output_token_ids) == child.sent_tokens \
                            and (not done or child.sent_finished):
                        continue
                    text = full[child.sent_text:]
                    tokens = req.output_token_ids[child.sent_tokens:]
                    lps = child.logprobs[child.sent_tokens:] if child.logprobs is not None else None
                    child.sent_text, child.sent_tokens, child.sent_finished = len(full), len(req.output_token_ids), done
            completions.append(CompletionOutput(
                child.index, text, list(tokens), reason, req.stop_reason,
                list(lps) if lps is not None else None, child.cumulative_logprob,
            ))
        if not completions:
            return None
        prompt_lps = parent.prompt_logprobs
        if kind is RequestOutputKind.DELTA and prompt_lps is not None:
            complete = len(prompt_lps) >= len(parent.prompt_ids)
            prompt_lps = prompt_lps if complete and not parent.prompt_logprobs_sent else None
            parent.prompt_logprobs_sent |= complete
        firsts = [c.request.first_token_time for c in parent.children if c.request.first_token_time is not None]
        return RequestOutput(
            parent.request_id, parent.prompt, parent.prompt_ids, completions, finished,
            prompt_lps, parent.children[0].request.num_cached_tokens, min(firsts, default=None),
            embedding=parent.embedding,
        )
