"""The grammar engines behind structured outputs: xgrammar (main) and llguidance (fallback).

Each turns a constraint into a compiled grammar, shared by every request that asks for the
same constraint, and a grammar into per-request matchers. A matcher fills one row of a token
bitmask (int32 words; bit b of word w allows token 32 w + b, the layout both engines use),
says whether one token is allowed without computing the row (a few microseconds against a
mask's tens to hundreds), accepts the sampled token, and says when the grammar has ended (it
accepted an end of sequence).
Compilation errors come back as StructuredOutputError naming the problem (a 400).
"""

from __future__ import annotations

import json
import threading
from typing import Any, Protocol

import torch

from surge.errors import StructuredOutputError
from surge.tokenizer import Tokenizer

# JSON as json.dumps writes it by default: what the models were shown, and one way to write each value
ITEM_SEPARATOR, KEY_SEPARATOR = ", ", ": "


class Matcher(Protocol):
    def fill(self, bitmask: torch.Tensor, row: int) -> None: ...

    def allows(self, token: int) -> bool: ...  # bit `token` of the row fill() would write; no state change

    def accept(self, token: int) -> bool: ...

    def is_terminated(self) -> bool: ...


class Grammar(Protocol):
    backend: str

    def matcher(self) -> Matcher: ...


def _first_line(exc: BaseException) -> str:
    """xgrammar's errors start with a source location line; keep what names the problem."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text.split(": ", 1)[1] if text.startswith("[") and ": " in text else text


# ---- xgrammar ------------------------------------------------------------------------------


class _XgrMatcher:
    __slots__ = ("_m",)

    def __init__(self, matcher: Any):
        self._m = matcher

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self._m.fill_next_token_bitmask(bitmask, row)

    def allows(self, token: int) -> bool:
        if not self._m.accept_token(token):  # a refused token leaves the state as it was
            return False
        self._m.rollback(1)
        return True

    def accept(self, token: int) -> bool:
        return bool(self._m.accept_token(token))

    def is_terminated(self) -> bool:
        return bool(self._m.is_terminated())


class _XgrGrammar:
    backend = "xgrammar"

    def __init__(self, compiled: Any):
        self._compiled = compiled

    def matcher(self) -> Matcher:
        import xgrammar

        return _XgrMatcher(xgrammar.GrammarMatcher(self._compiled))


class XGrammarBackend:
    """xgrammar's compiler over the model's tokenizer (built on first use: ~0.2-1 s)."""

    name = "xgrammar"

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_ids: frozenset[int]):
        self._tokenizer, self._vocab_size, self._eos_ids = tokenizer, vocab_size, sorted(eos_ids)
        self._compiler: Any = None
        self._lock = threading.Lock()

    def _get_compiler(self) -> Any:
        with self._lock:
            if self._compiler is None:
                import xgrammar
                from transformers import PreTrainedTokenizerFast

                wrapped = PreTrainedTokenizerFast(tokenizer_object=self._tokenizer.backend)
                info = xgrammar.TokenizerInfo.from_huggingface(
                    wrapped, vocab_size=self._vocab_size, stop_token_ids=self._eos_ids)
                # surge caches compiled grammars itself (StructuredOutputManager)
                self._compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            return self._compiler

    def _compile(self, what: str, fn: Any) -> Grammar:
        try:
            return _XgrGrammar(fn())
        except (RuntimeError, ValueError) as exc:
            raise StructuredOutputError(f"{what}: {_first_line(exc)}") from None

    def json_schema(self, schema: Any) -> Grammar:
        compiler = self._get_compiler()
        return self._compile("JSON schema", lambda: compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, strict_mode=False,
            separators=(ITEM_SEPARATOR, KEY_SEPARATOR)))

    def regex(self, pattern: str) -> Grammar:
        compiler = self._get_compiler()
        return self._compile("regex", lambda: compiler.compile_regex(pattern))

    def grammar(self, text: str) -> Grammar:
        compiler = self._get_compiler()
        return self._compile("grammar", lambda: compiler.compile_grammar(text))


# ---- llguidance ----------------------------------------------------------------------------


class _LlgMatcher:
    __slots__ = ("_m", "_eos")
    parallel = True  # GuidanceBackend.fill_many computes many of these at once

    def __init__(self, matcher: Any, eos: frozenset[int]):
        self._m, self._eos = matcher, eos

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        import llguidance.torch

        llguidance.torch.fill_next_token_bitmask(self._m, bitmask, row)

    def allows(self, token: int) -> bool:
        if token in self._eos:  # the mask has every end of sequence where the grammar may end,
            return bool(self._m.is_accepting())  # even once it has stopped (validate_tokens: none)
        # where the next bytes are forced, the mask holds only their canonical token (a shorter
        # or longer spelling of them, which validate_tokens would take, is not in it)
        forced = self._m.compute_ff_tokens()
        if forced:
            return token == forced[0]
        return self._m.validate_tokens([token]) == 1

    def accept(self, token: int) -> bool:
        return bool(self._m.consume_token(token)) and not self._m.is_error()

    def is_terminated(self) -> bool:
        return bool(self._m.is_stopped())


class _LlgGrammar:
    """A matcher at the start of the grammar, copied for each request: copies share the parsed
    grammar and the lexer states built so far (a matcher made from the grammar's text would parse
    it again and rebuild every lexer state, ~ms each, in the step loop)."""

    backend = "guidance"

    def __init__(self, tokenizer: Any, grammar: str, eos: frozenset[int]):
        import llguidance

        self._template = llguidance.LLMatcher(tokenizer, grammar)
        self._eos = eos
        self._lock = threading.Lock()

    def matcher(self) -> Matcher:
        with self._lock:
            return _LlgMatcher(self._template.deep_copy(), self._eos)


class GuidanceBackend:
    """llguidance over the model's tokenizer (its tokenizer.json as the Rust side reads it)."""

    name = "guidance"

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_ids: frozenset[int]):
        self._tokenizer, self._vocab_size, self._eos_ids = tokenizer, vocab_size, sorted(eos_ids)
        self._ll: Any = None
        self._executor: Any = None
        self._lock = threading.Lock()

    def _get_tokenizer(self) -> Any:
        with self._lock:
            if self._ll is None:
                import llguidance

                self._ll = llguidance.LLTokenizer(self._tokenizer.backend.to_str(), n_vocab=self._vocab_size,
                                                  eos_token=self._eos_ids or None)
            return self._ll

    def _check(self, what: str, grammar: str) -> Grammar:
        import llguidance

        ll = self._get_tokenizer()
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, ll)
        if is_error or messages:  # a warning is something it would not enforce: refused too
            text = "; ".join(m.strip().replace("\n", " ") for m in messages) or "cannot be compiled"
            raise StructuredOutputError(f"{what}: {text}")
        return _LlgGrammar(ll, grammar, frozenset(self._eos_ids))

    def fill_many(self, matchers: list[tuple[Matcher, int]], bitmask: torch.Tensor) -> None:
        """Rows of `bitmask` for several llguidance matchers at once, on llguidance's own threads
        (its masks are computed per step by walking the vocabulary, ~5-100 us each)."""
        import llguidance

        with self._lock:
            if self._executor is None:
                self._executor = llguidance.LLExecutor(num_threads=max(1, torch.get_num_threads()))
        pairs = [(m._m, row) for m, row in matchers]  # type: ignore[attr-defined]
        self._executor.unsafe_compute_mask_ptr(pairs, bitmask.data_ptr(), bitmask.shape[1] * 4, bitmask.shape[0])

    def json_schema(self, schema: Any) -> Grammar:
        import llguidance

        options = {"whitespace_flexible": False, "item_separator": ITEM_SEPARATOR,
                   "key_separator": KEY_SEPARATOR}
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=options)
        except (ValueError, RuntimeError) as exc:
            raise StructuredOutputError(f"JSON schema: {_first_line(exc)}") from None
        return self._check("JSON schema", grammar)

    def regex(self, pattern: str) -> Grammar:
        import llguidance

        return self._check("regex", llguidance.LLMatcher.grammar_from_regex(pattern))

    def grammar(self, text: str) -> Grammar:
        import llguidance

        try:
            grammar = llguidance.grammar_from("grammar", text)  # Lark (with %json) or GBNF
        except (ValueError, RuntimeError) as exc:
            raise StructuredOutputError(f"grammar: {_first_line(exc)}") from None
        return self._check("grammar", grammar)
