"""Tool calls in a model's own format: finding them in what it wrote, streaming them as
OpenAI's deltas, and the grammar that makes a model write them ("required", a named function).

A parser knows one format:
- `hermes`: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block per call
  (Qwen2.5, Qwen3, Hermes; and surge's own rendering for templates that take no tools);
- `llama3_json`: the reply is `{"name": ..., "parameters": {...}}` (after an optional
  `<|python_tag|>`), several separated by `;`;
- `mistral`: `[TOOL_CALLS]` then a JSON list of `{"name", "arguments"}` (the marker is a special
  token: a reply that is such a list counts too);
- `json`: the reply is one `{"name", "arguments"}` object or a list of them.

Text that looks like a call but does not parse stays content. Arguments come back as the JSON
text OpenAI's clients expect.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

TokenOf = Callable[[str], "int | None"]  # the id of a marker that is one token of the vocabulary


def _lit(text: str, token_of: TokenOf) -> str:
    """A marker in a Lark grammar: its token (llguidance's <[id]>) where the vocabulary has it as
    one token (llguidance matches such a token only by id), else its text."""
    token = token_of(text)
    return f"<[{token}]>" if token is not None else json.dumps(text)


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text of an object
    id: str = field(default_factory=lambda: "call_" + secrets.token_hex(12))

    def as_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def _call_of(obj: Any, args_keys: tuple[str, ...] = ("arguments", "parameters")) -> ToolCall | None:
    """A call from a decoded {"name": ..., "arguments": {...}}, or None when it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    key = next((k for k in args_keys if k in obj), None)
    args = obj.get(key, {}) if key else {}
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict) or set(obj) - {"name", key}:
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _calls_of(value: Any, args_keys: tuple[str, ...] = ("arguments", "parameters")) -> list[ToolCall] | None:
    items = value if isinstance(value, list) else [value]
    calls = [_call_of(item, args_keys) for item in items]
    return calls if calls and all(c is not None for c in calls) else None  # type: ignore[return-value]


def _unfenced(text: str) -> str:
    """The inside of a reply that is one Markdown code block (```json ... ```), else the reply."""
    body = text.strip()
    if body.startswith("```") and body.endswith("```") and body.count("```") == 2:
        body = body[3:-3]
        first, _, rest = body.partition("\n")
        return (rest if first.strip().isalpha() or not first.strip() else body).strip()
    return body


def _json_sequence(text: str, separator: str, truncated: bool = False) -> list[Any] | None:
    """JSON values one after another with `separator` between them (a separator inside a string
    is the string's), or None when the text is not that; `truncated`: an unfinished last value
    is left out."""
    decoder, values, at = json.JSONDecoder(), [], 0
    while True:
        try:
            value, at = decoder.raw_decode(text, at)
        except ValueError:
            return values if truncated and values else None
        values.append(value)
        rest = text[at:].lstrip()
        if not rest:
            return values
        if not rest.startswith(separator):
            return None
        at = len(text) - len(rest) + len(separator)
        at = len(text) - len(text[at:].lstrip())


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


class ToolParser:
    """`names`: the functions offered; a "call" of any other stays text (empty: any name)."""

    name = ""

    def __init__(self, names: frozenset[str] = frozenset()):
        self.names = names

    def _known(self, calls: list[ToolCall] | None) -> list[ToolCall] | None:
        if calls and self.names and any(c.name not in self.names for c in calls):
            return None
        return calls

    def extract(self, text: str, truncated: bool = False) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a whole reply; content None when the reply is calls only.
        `truncated`: the reply was cut (max_tokens): an unfinished last call is dropped, not text."""
        raise NotImplementedError

    def grammar(self, call_schemas: list[dict[str, Any]], parallel: bool, token_of: TokenOf) -> str:
        """A Lark grammar (llguidance's, with %json) of replies that are calls only, each call's
        JSON one of `call_schemas` ({"name": const, "arguments": parameters})."""
        raise NotImplementedError

    def streamer(self) -> "ToolStreamer":
        return ToolStreamer(self)

    # where a reply may start being calls: text before it is content (None: only the whole reply)
    markers: tuple[str, ...] = ()


# JSON inside tool grammars as json.dumps writes it (no runs of whitespace to loop in)
_COMPACT = {"x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}}


def _json_rule(call_schemas: list[dict[str, Any]]) -> str:
    schema = call_schemas[0] if len(call_schemas) == 1 else {"anyOf": call_schemas}
    return "%json " + json.dumps({**schema, **_COMPACT})


class HermesParser(ToolParser):
    name = "hermes"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"
    markers = (OPEN,)

    def extract(self, text: str, truncated: bool = False) -> tuple[str | None, list[ToolCall]]:
        calls: list[ToolCall] = []
        content: list[str] = []
        rest = text
        while True:
            start = rest.find(self.OPEN)
            if start < 0:
                content.append(rest)
                break
            end = rest.find(self.CLOSE, start)
            body = rest[start + len(self.OPEN): end if end >= 0 else len(rest)]
            found = self._known(_calls_of(_loads(body.strip()), ("arguments",)))
            if found is None and end < 0 and truncated:  # a call cut off by max_tokens
                content.append(rest[:start])
                break
            if found is None or len(found) != 1:  # not a call: it stays text
                content.append(rest[: end + len(self.CLOSE)] if end >= 0 else rest)
                rest = rest[end + len(self.CLOSE):] if end >= 0 else ""
                if end < 0:
                    break
                continue
            content.append(rest[:start])
            calls.extend(found)
            if end < 0:
                break
            rest = rest[end + len(self.CLOSE):]
        text_out = "".join(content)
        if not calls:
            # small models often drop the tags, or fence the call as code: a reply that is
            # nothing but calls of the offered functions is calls
            bare = self._known(_calls_of(_loads(_unfenced(text)), ("arguments",)))
            if bare:
                return None, bare
        return (text_out if text_out.strip() or not calls else None), calls

    def grammar(self, call_schemas: list[dict[str, Any]], parallel: bool, token_of: TokenOf) -> str:
        repeat = ' ("\\n" call)*' if parallel else ""
        return (f"start: call{repeat}\n"
                f'call: {_lit(self.OPEN, token_of)} "\\n" body "\\n" {_lit(self.CLOSE, token_of)}\n'
                f"body: {_json_rule(call_schemas)}\n")


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    TAG = "<|python_tag|>"

    def extract(self, text: str, truncated: bool = False) -> tuple[str | None, list[ToolCall]]:
        body = text.strip()
        body = body[len(self.TAG):].strip() if body.startswith(self.TAG) else body
        if not body.startswith("{"):
            return text, []
        calls = self._known(_calls_of(_json_sequence(body, ";", truncated), ("parameters", "arguments")))
        return (None, calls) if calls else (text, [])

    def grammar(self, call_schemas: list[dict[str, Any]], parallel: bool, token_of: TokenOf) -> str:
        schemas = [{**s, "properties": {"name": s["properties"]["name"], "parameters": s["properties"]["arguments"]},
                    "required": ["name", "parameters"]} for s in call_schemas]
        repeat = ' ("; " call)*' if parallel else ""
        return f"start: call{repeat}\ncall: {_json_rule(schemas)}\n"


class MistralParser(ToolParser):
    name = "mistral"
    MARKER = "[TOOL_CALLS]"
    markers = (MARKER,)

    def extract(self, text: str, truncated: bool = False) -> tuple[str | None, list[ToolCall]]:
        start = text.find(self.MARKER)
        before, body = (text[:start], text[start + len(self.MARKER):]) if start >= 0 else ("", text)
        if start < 0 and not text.lstrip().startswith("[{"):
            return text, []
        calls = self._known(_calls_of(_loads(body.strip()), ("arguments",)))
        if not calls:
            return text, []
        return (before if before.strip() else None), calls

    def grammar(self, call_schemas: list[dict[str, Any]], parallel: bool, token_of: TokenOf) -> str:
        items = {"type": "array", "items": call_schemas[0] if len(call_schemas) == 1 else {"anyOf": call_schemas},
                 "minItems": 1, **({} if parallel else {"maxItems": 1}), **_COMPACT}
        return f"start: {_lit(self.MARKER, token_of)} calls\ncalls: %json {json.dumps(items)}\n"


class JsonParser(ToolParser):
    name = "json"

    def extract(self, text: str, truncated: bool = False) -> tuple[str | None, list[ToolCall]]:
        body = text.strip()
        if not body.startswith(("{", "[")):
            return text, []
        calls = self._known(_calls_of(_loads(body)))
        return (None, calls) if calls else (text, [])

    def grammar(self, call_schemas: list[dict[str, Any]], parallel: bool, token_of: TokenOf) -> str:
        one = call_schemas[0] if len(call_schemas) == 1 else {"anyOf": call_schemas}
        schema = {"type": "array", "items": one, "minItems": 1} if parallel else one
        return f"start: calls\ncalls: %json {json.dumps({**schema, **_COMPACT})}\n"


PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser, JsonParser)}


def parser_for_template(template: str | None) -> type[ToolParser]:
    """The format a chat template teaches its model (hermes for templates without tools: surge then
    describes the tools itself, in that format)."""
    text = template or ""
    if "[TOOL_CALLS]" in text:
        return MistralParser
    if "<|python_tag|>" in text or ("tools" in text and '"parameters"' in text and "<tool_call>" not in text):
        return Llama3JsonParser
    if "<tool_call>" in text or "tools" not in text:
        return HermesParser
    return JsonParser


class ToolStreamer:
    """Splits a streamed reply into content and tool calls as its text arrives.

    Content is passed on until a marker of the format could be starting; from there the text is
    held until the end of the reply (formats without markers: a reply starting with `{` or `[`
    is held whole), then parsed: calls come out as OpenAI's deltas, anything else as content.
    """

    OPENINGS = ("{", "[", "<|", "```")

    def __init__(self, parser: ToolParser):
        self.parser = parser
        self.text = ""  # everything so far
        self.sent = 0  # characters of self.text given out as content
        self.held = False  # a possible call has started: nothing more goes out before the end
        self.calls: list[ToolCall] = []

    def _safe_end(self) -> int:
        """How much of the text can go out as content now."""
        if self.held:
            return self.sent
        if self.sent == 0:  # a reply that opens with JSON (or a tag, a fence) may be calls whole
            stripped = self.text.lstrip()
            if not stripped or any(p.startswith(stripped) for p in self.OPENINGS):
                return 0  # not known yet
            if stripped.startswith(self.OPENINGS):
                self.held = True
                return 0
        if not self.parser.markers:
            return len(self.text)
        for marker in self.parser.markers:
            at = self.text.find(marker, self.sent)
            if at >= 0:
                self.held = True
                return at
        # hold back a tail that could be the start of a marker
        keep = 0
        for marker in self.parser.markers:
            for k in range(min(len(marker) - 1, len(self.text)), 0, -1):
                if self.text.endswith(marker[:k]):
                    keep = max(keep, k)
                    break
        return max(self.sent, len(self.text) - keep)

    def feed(self, delta: str) -> str:
        """Add streamed text; return the content that can be sent now."""
        self.text += delta
        end = self._safe_end()
        out = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return out

    def finish(self, truncated: bool = False) -> tuple[str, list[ToolCall]]:
        """At the end of the reply: (the content still to send, the calls)."""
        content, calls = self.parser.extract(self.text, truncated)
        self.calls = calls
        if not calls:
            out = self.text[self.sent:]
        else:
            sent_part = self.text[: self.sent]
            out = (content or "")[len(sent_part):] if (content or "").startswith(sent_part) else ""
        self.sent = len(self.text)
        return out, calls
