"""SamplingParams: how one request is decoded (vLLM's names and defaults, which users know)."""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass, field
from typing import Any

from surge.errors import InvalidArgumentError, StructuredOutputError

MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0  # OpenAI's range, [-100, 100]
SEED_RANGE = (-(2**63), 2**64)  # what a 64-bit generator seed can be: int64 or uint64


class RequestOutputKind(enum.Enum):
    CUMULATIVE = "cumulative"  # every output carries all text and tokens so far
    DELTA = "delta"  # every output carries only what is new (streaming)
    FINAL_ONLY = "final_only"  # one output when the request finishes


MAX_GRAMMAR_CHARS = 1 << 20  # a schema, regex or grammar of up to 1 MiB of text
MAX_CHOICES = 4096


@dataclass
class StructuredOutputsParams:
    """A constraint on the output (vLLM's `structured_outputs`): exactly one of a JSON schema
    (`json`, a dict or its text), any JSON object (`json_object`), a regular expression the whole
    output matches (`regex`), one of some strings (`choice`), or a grammar (`grammar`: GBNF /
    EBNF, or Lark). Checked for shape here; compiled (and refused when it cannot be) by the
    engine before the request is queued."""

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False
    lark: str | None = None  # a Lark grammar in llguidance's dialect (JSON schemas inline with %json)
    _key: tuple[str, str] = field(init=False, repr=False, compare=False, default=("", ""))

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar", "lark") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise StructuredOutputError(
                "structured outputs take exactly one of json, json_object, regex, choice or grammar"
                + (f" (got {', '.join(given)})" if given else ""))
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except ValueError as exc:
                raise StructuredOutputError(f"the JSON schema is not valid JSON: {exc}") from exc
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            raise StructuredOutputError("a JSON schema must be an object")
        if self.json is not None and len(json.dumps(self.json)) > MAX_GRAMMAR_CHARS:
            raise StructuredOutputError(f"the JSON schema is longer than {MAX_GRAMMAR_CHARS} characters")
        for name in ("regex", "grammar", "lark"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise StructuredOutputError(f"structured outputs: {name} must be a non-empty string")
            if value is not None and len(value) > MAX_GRAMMAR_CHARS:
                raise StructuredOutputError(f"structured outputs: {name} is longer than {MAX_GRAMMAR_CHARS} characters")
        if self.choice is not None:
            if not isinstance(self.choice, list) or not self.choice \
                    or not all(isinstance(c, str) and c for c in self.choice):
                raise StructuredOutputError("structured outputs: choice must be a list of non-empty strings")
            if len(self.choice) > MAX_CHOICES:
                raise StructuredOutputError(f"structured outputs: at most {MAX_CHOICES} choices")
        self._key = self._make_key()
        if self.json is not None:  # the constraint as it was given: a caller's later edits change nothing
            self.json = json.loads(self._key[1])

    @property
    def kind(self) -> str:
        return "json_object" if self.json_object else next(
            name for name in ("json", "regex", "choice", "grammar", "lark") if getattr(self, name) is not None)

    def key(self) -> tuple[str, str]:
        """What identifies the compiled grammar: (kind, canonical text)."""
        return self._key

    def _make_key(self) -> tuple[str, str]:
        kind = self.kind
        if kind == "json":
            return kind, json.dumps(self.json)  # key order kept: properties are written in it
        if kind == "choice":
            return kind, json.dumps(list(self.choice))
        return kind, "" if kind == "json_object" else getattr(self, kind)


POOLING = ("mean", "last")


@dataclass
class SamplingParams:
    """Per-request decoding settings; validated at construction so bad values never reach the engine."""

    n: int = 1
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # top alternatives per generated token (0: the token's own only)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    structured_outputs: StructuredOutputsParams | None = None
    # an embedding instead of tokens: the prompt's final hidden states pooled ("mean" over its
    # positions or the "last" one) and L2-normalised; the request ends with its prefill
    pooling: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.structured_outputs, dict):
            try:
                self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
            except TypeError as exc:
                raise StructuredOutputError(f"structured_outputs: {exc}") from exc
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise StructuredOutputError("structured_outputs must be a StructuredOutputsParams or a dict of its fields")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if self.logit_bias:
            try:
                self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError, OverflowError) as exc:
                raise InvalidArgumentError(f"logit_bias must map token ids to numbers ({exc})") from exc
        for name in ("n", "top_k", "min_tokens", "max_tokens", "seed", "logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise InvalidArgumentError(f"{name} must be an integer, got {value!r}")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InvalidArgumentError(f"{name} must be a finite number, got {value!r}")
        checks = [
            (isinstance(self.n, int) and self.n >= 1, f"n must be at least 1, got {self.n}"),
            (self.max_tokens is None or self.max_tokens >= 1, f"max_tokens must be at least 1, got {self.max_tokens}"),
            (self.temperature >= 0.0, f"temperature must be non-negative, got {self.temperature}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be -1, 0 (disabled) or positive, got {self.top_k}"),
            (0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0.0, f"repetition_penalty must be positive, got {self.repetition_penalty}"),
            (-2.0 <= self.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2.0 <= self.frequency_penalty <= 2.0,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.min_tokens >= 0, f"min_tokens must be non-negative, got {self.min_tokens}"),
            (self.seed is None or SEED_RANGE[0] <= self.seed < SEED_RANGE[1],
             f"seed must fit in 64 bits, [-2^63, 2^64), got {self.seed}"),
            (all(math.isfinite(v) and abs(v) <= MAX_LOGIT_BIAS for v in (self.logit_bias or {}).values()),
             f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]"),
            (all(isinstance(s, str) and s for s in self.stop), "stop must be non-empty strings"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
             f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
             f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidArgumentError(message)
        if self.pooling is not None:
            if self.pooling not in POOLING:
                raise InvalidArgumentError(f"pooling must be one of {', '.join(POOLING)}, got {self.pooling!r}")
            if self.n != 1 or self.logprobs is not None or self.prompt_logprobs is not None \
                    or self.structured_outputs is not None:
                raise InvalidArgumentError("an embedding request (pooling) takes no n, logprobs, prompt_logprobs "
                                           "or structured_outputs")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidArgumentError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def verifiable(self) -> bool:
        """Whether proposed tokens can be verified for it (speculative decoding). Not yet: a
        request that wants logprobs, or a grammar's constraint, or an embedding."""
        return self.logprobs is None and self.structured_outputs is None and self.pooling is None

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
