"""Tokenizers from tokenizer.json or GGUF metadata, chat templates, incremental detokenization.

Encoding runs on Hugging Face `tokenizers`; for a GGUF file the tokenizer is built from its
`tokenizer.ggml.*` metadata the way llama.cpp reads it (byte-level BPE with the pre-tokenizer
split its `pre` type names, or a SentencePiece vocabulary with byte fallback).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)
from tokenizers import Tokenizer as BackendTokenizer

from surge.errors import InvalidArgumentError, ModelFormatError

# llama.cpp token types (llama_token_type)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp's `tokenizer.ggml.pre` values -> the regexes it splits with, in order.
_PRE_SPLITS: dict[str, tuple[str, ...]] = {
    "default": (_GPT2_SPLIT,),
    "gpt-2": (_GPT2_SPLIT,),
    "gpt2": (_GPT2_SPLIT,),
    "smollm": (r"\p{N}", _GPT2_SPLIT),
    "starcoder": (r"\p{N}", _GPT2_SPLIT),
    "refact": (r"\p{N}", _GPT2_SPLIT),
    "command-r": (r"\p{N}", _GPT2_SPLIT),
    "llama3": (_LLAMA3_SPLIT,),
    "llama-v3": (_LLAMA3_SPLIT,),
    "llama-bpe": (_LLAMA3_SPLIT,),
    "smaug-bpe": (_LLAMA3_SPLIT,),
    "qwen2": (_QWEN2_SPLIT,),
    "deepseek-r1-qwen": (_QWEN2_SPLIT,),
}
# Pre types whose vocabularies llama.cpp looks up whole words in before merging.
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "smaug-bpe"}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _add_vocabulary_tokens(backend: BackendTokenizer, tokens: Sequence[str], types: Sequence[int],
                           byte_level: bool) -> None:
    """Control tokens (matched whole, special: skipped when decoding) and user-defined ones
    (matched whole, not special: Gemma's runs of spaces and newlines decode as text)."""
    alphabet = set(_bytes_to_unicode().values()) if byte_level else None
    control, user = [], []
    for token, kind in zip(tokens, types):
        if kind == _CONTROL and (alphabet is None or set(token) <= alphabet):
            control.append(AddedToken(token, special=True, normalized=False))
        elif kind == _USER_DEFINED:
            user.append(AddedToken(token, special=False, normalized=False))
    backend.add_special_tokens(control)
    backend.add_tokens(user)


def _byte_level_bpe(meta: dict[str, Any]) -> BackendTokenizer:
    tokens: list[str] = meta["tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("merges") or []]
    pre = meta.get("pre") or "default"
    vocab = {tok: i for i, tok in enumerate(tokens)}
    backend = BackendTokenizer(
        models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in _IGNORE_MERGES)
    )
    splits = _PRE_SPLITS.get(pre, _PRE_SPLITS["default"])
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    _add_vocabulary_tokens(backend, tokens, meta.get("token_type") or [], True)
    return backend


def _merges_from_scores(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """SentencePiece BPE has no merge list: a merge (a, b) ranks by the score of the token a+b."""
    vocab = {tok: i for i, tok in enumerate(tokens)}
    ranked = []
    for tok, score, kind in zip(tokens, scores, types):
        if kind not in (_NORMAL, _USER_DEFINED) or len(tok) < 2:
            continue
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def _sentencepiece_bpe(meta: dict[str, Any]) -> BackendTokenizer:
    tokens: list[str] = meta["tokens"]
    count = len(tokens)
    scores = meta.get("scores") or [0.0] * count
    types = meta.get("token_type") or [_NORMAL] * count
    unk_id = meta.get("unknown_token_id", 0)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    backend = BackendTokenizer(
        models.BPE(
            vocab=vocab,
            merges=_merges_from_scores(tokens, scores, types),
            unk_token=tokens[unk_id] if unk_id is not None and unk_id < count else None,
            byte_fallback=True,
            fuse_unk=True,
        )
    )
    prefix = meta.get("add_space_prefix", True)
    steps = [normalizers.Prepend("\u2581")] if prefix else []
    backend.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "\u2581")])
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(dec)
    _add_vocabulary_tokens(backend, tokens, types, False)
    return backend


def _post_processor(backend: BackendTokenizer, bos: str | None, eos: str | None) -> None:
    """BOS/EOS added by `encode(..., add_special_tokens=True)`, as the metadata asks."""
    single = ([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else [])
    pair = single + ([f"{bos}:1"] if bos else []) + ["$B:1"] + ([f"{eos}:1"] if eos else [])
    special = [(t, backend.token_to_id(t)) for t in dict.fromkeys(x for x in (bos, eos) if x)]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


@dataclass
class Tokenizer:
    """Text <-> token ids, special tokens, and the chat template of one model."""

    backend: BackendTokenizer
    bos_token: str | None = None
    eos_token: str | None = None
    eos_token_ids: tuple[int, ...] = ()
    chat_template: str | None = None
    extra_template_vars: dict[str, Any] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self.backend.token_to_id(self.bos_token) if self.bos_token else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def added_token_id(self, text: str) -> int | None:
        """The id of `text` where the vocabulary holds it whole as an added token (`<tool_call>`)."""
        token_id = self.backend.token_to_id(text)
        return token_id if token_id is not None and self.encode(text, add_special_tokens=False) == [token_id] else None

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """The prompt text for `messages`, rendered by the model's jinja2 chat template."""
        if not self.chat_template:
            raise InvalidArgumentError(
                "this model has no chat template; use generate() with a plain prompt instead"
            )
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message:
                raise InvalidArgumentError(f"messages[{i}] must be a dict with 'role' and 'content'")
        template = _compile_template(self.chat_template)
        return template.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **self.extra_template_vars,
            **kwargs,
        )

    def encode_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                    **template_kwargs: Any) -> list[int]:
        """Token ids of a chat prompt; the template writes any BOS itself, so none is added.
        `template_kwargs` (tools, enable_thinking, ...) are the template's extra variables."""
        text = self.apply_chat_template(messages, add_generation_prompt, **template_kwargs)
        return self.encode(text, add_special_tokens=False)

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], path: str = "<gguf>") -> "Tokenizer":
        kind = meta.get("model")
        if "tokens" not in meta:
            raise ModelFormatError(f"{path}: GGUF has no tokenizer.ggml.tokens")
        if kind == "gpt2":
            backend = _byte_level_bpe(meta)
        elif kind == "llama":
            backend = _sentencepiece_bpe(meta)
        else:
            raise ModelFormatError(
                f"{path}: tokenizer model {kind!r} is not supported (surge reads 'gpt2' BPE and "
                "'llama' SentencePiece vocabularies)"
            )
        tokens = meta["tokens"]

        def token(key: str) -> str | None:
            idx = meta.get(key)
            return tokens[idx] if idx is not None and 0 <= idx < len(tokens) else None

        bos, eos = token("bos_token_id"), token("eos_token_id")
        add_bos = meta.get("add_bos_token", kind == "llama")
        add_eos = meta.get("add_eos_token", False)
        _post_processor(backend, bos if add_bos else None, eos if add_eos else None)
        eos_ids = tuple(
            dict.fromkeys(int(meta[k]) for k in ("eos_token_id", "eot_token_id") if meta.get(k) is not None)
        )
        return cls(backend, bos, eos, eos_ids, meta.get("chat_template"))

    @classmethod
    def from_hf_dir(cls, directory: str, eos_token_ids: Sequence[int] = ()) -> "Tokenizer":
        path = os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(path):
            raise ModelFormatError(f"{directory}: no tokenizer.json (surge needs a fast tokenizer file)")
        try:
            backend = BackendTokenizer.from_file(path)
        except Exception as exc:
            raise ModelFormatError(f"{path}: cannot read tokenizer ({exc})") from exc
        config = _read_optional_json(os.path.join(directory, "tokenizer_config.json"))
        template = config.get("chat_template")
        template_file = os.path.join(directory, "chat_template.jinja")
        if os.path.isfile(template_file):
            with open(template_file, encoding="utf-8") as f:
                template = f.read()
        if isinstance(template, list):  # named templates: use "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        bos, eos = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
        ids = list(eos_token_ids)
        if eos and backend.token_to_id(eos) is not None:
            ids.append(backend.token_to_id(eos))
        return cls(backend, bos, eos, tuple(dict.fromkeys(ids)), template)


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_optional_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ModelFormatError(f"{path}: invalid JSON ({exc})") from exc


@functools.lru_cache(maxsize=16)
def _compile_template(source: str) -> Any:
    """A sandboxed jinja2 template with the helpers transformers' chat templates rely on."""
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise InvalidArgumentError(f"chat template error: {message}")

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, **kw: Any) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, **kw)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        template = env.from_string(source)
    except TemplateError as exc:
        raise ModelFormatError(f"invalid chat template ({exc})") from exc
    return template


class IncrementalDetokenizer:
    """Streams text for a growing list of token ids, never emitting half a character.

    Decoding token by token breaks multi-byte UTF-8 (an emoji split over byte-fallback
    tokens) and SentencePiece's leading-space rule. So it decodes a short window:

        ids:   ... [prefix_offset ....... read_offset) [new tokens ...]
                    \\__ already emitted __/
        new text = decode(prefix..end) minus decode(prefix..read), held back while it ends
                   in U+FFFD (an incomplete character).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-6:])  # context so the first word decodes right
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (possibly empty)."""
        self.ids.append(int(token_id))
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], self.skip_special_tokens)
        full = decode(self.ids[self.prefix_offset :], self.skip_special_tokens)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """At the end of a sequence: whatever was held back, even an incomplete character."""
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], self.skip_special_tokens)
        full = decode(self.ids[self.prefix_offset :], self.skip_special_tokens)
        delta = full[len(prefix) :]
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += delta
        return delta
