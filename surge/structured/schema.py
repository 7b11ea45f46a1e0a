"""JSON schemas before compilation: checked, made enforceable, and given the backend that
enforces them exactly.

The two grammar engines differ in what they enforce. xgrammar (the main one, fastest to
mask) covers the keywords of `XGRAMMAR_KEYWORDS` exactly; a schema that uses anything else, or
a form xgrammar narrows (multipleOf, patternProperties, allOf, enum / const of objects or
arrays, an unanchored or look-around pattern, strings with length bounds, bounded non-integer
numbers, formats beyond `XGRAMMAR_FORMATS`: tests/structured/test_grammar_state.py found each)
goes to llguidance, which follows JSON Schema's semantics more closely and names what it does
not implement (that becomes the 400). Neither enforces `uniqueItems`; an array of a few fixed values (enum, const, boolean)
is rewritten into the finite set of its unique sequences, anything else is refused. An integer
without bounds is bounded to JSON's interoperable range (see `_safe_integer`).
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Iterator
from typing import Any

from surge.errors import StructuredOutputError

ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$id", "$comment",
                         "deprecated", "readOnly", "writeOnly", "$anchor"})
XGRAMMAR_KEYWORDS = ANNOTATIONS | {
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems",
    "enum", "const", "anyOf", "oneOf", "$ref", "$defs", "definitions", "pattern", "minLength", "maxLength",
    "format", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minProperties", "maxProperties",
}
XGRAMMAR_FORMATS = frozenset({"date-time", "date", "uuid"})
# where subschemas sit: maps of them, single ones, lists of them
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_ONE = ("items", "additionalProperties", "not", "contains", "propertyNames", "if", "then", "else",
               "additionalItems", "unevaluatedItems", "unevaluatedProperties")
_SCHEMA_LISTS = ("prefixItems", "anyOf", "oneOf", "allOf")
# RFC 8259 §6: integers in [-(2^53 - 1), 2^53 - 1] are the interoperable ones (exact in a double)
SAFE_INTEGERS = (-(2**53 - 1), 2**53 - 1)
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
MAX_UNIQUE_SEQUENCES = 512  # arrays with uniqueItems are enumerated up to this many sequences
_ANCHORED = re.compile(r"^\^.*\$$", re.S)
# what xgrammar's regexes lack: look-around, flags, back-references, \b-style anchors
REGEX_EXTENSIONS = re.compile(r"\(\?[^:]|\\[1-9]|\\[kgbBAzZG]")


def subschemas(node: Any) -> Iterator[dict[str, Any]]:
    """Every schema object in `node`, itself first (boolean schemas have nothing inside)."""
    if not isinstance(node, dict):
        return
    yield node
    for key in _SCHEMA_MAPS:
        value = node.get(key)
        if isinstance(value, dict):
            for child in value.values():
                yield from subschemas(child)
    for key in _SCHEMA_ONE:
        value = node.get(key)
        if isinstance(value, dict):
            yield from subschemas(value)
        elif key == "items" and isinstance(value, list):  # draft 4-7 tuples
            for child in value:
                yield from subschemas(child)
    for key in _SCHEMA_LISTS:
        value = node.get(key)
        if isinstance(value, list):
            for child in value:
                yield from subschemas(child)


def check_schema(schema: Any) -> None:
    """A 400 for a schema that is not JSON Schema (its own draft's meta-schema, 2020-12 by default)."""
    import jsonschema  # the validator the tests check outputs with, too

    if not isinstance(schema, (dict, bool)):
        raise StructuredOutputError("a JSON schema must be an object")
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise StructuredOutputError(f"invalid JSON schema at {where}: {exc.message}") from None


def _finite_values(items: Any) -> list[Any] | None:
    """The values an items schema allows when they are a few fixed ones, else None."""
    import jsonschema

    if not isinstance(items, dict):
        return None
    keys = set(items) - ANNOTATIONS
    if "const" in items and keys <= {"const", "type"}:
        candidates = [items["const"]]
    elif "enum" in items and keys <= {"enum", "type"}:
        candidates = list(items["enum"])
    elif keys == {"type"} and items["type"] in ("boolean", "null"):
        candidates = [False, True] if items["type"] == "boolean" else [None]
    else:
        return None
    check = jsonschema.Draft202012Validator(items)
    values: dict[str, Any] = {}
    for value in candidates:
        if check.is_valid(value):
            values.setdefault(json.dumps(value, sort_keys=True), value)
    return list(values.values())


def _unique_sequences(node: dict[str, Any], where: str) -> dict[str, Any]:
    """The array schema `node` with uniqueItems as the anyOf of its unique sequences."""
    keys = set(node) - ANNOTATIONS
    extra = keys - {"type", "items", "uniqueItems", "minItems", "maxItems"}
    values = _finite_values(node.get("items"))
    if extra or values is None:
        raise StructuredOutputError(
            f"'uniqueItems' at {where} is enforced only for arrays whose items are a few fixed values "
            "(enum, const or boolean) with at most minItems / maxItems beside them")
    low = int(node.get("minItems", 0))
    high = min(int(node.get("maxItems", len(values))), len(values))
    count = sum(math.perm(len(values), k) for k in range(low, high + 1))
    if count > MAX_UNIQUE_SEQUENCES:
        raise StructuredOutputError(
            f"'uniqueItems' at {where}: {count} possible arrays of {len(values)} values, more than the "
            f"{MAX_UNIQUE_SEQUENCES} surge enumerates; lower maxItems or the number of values")
    branches: list[dict[str, Any]] = []

    def extend(prefix: list[Any], left: list[Any]) -> None:
        if len(prefix) >= low:
            branches.append({"type": "array", "prefixItems": [{"const": v} for v in prefix], "items": False,
                             "minItems": len(prefix), "maxItems": len(prefix)} if prefix
                            else {"type": "array", "maxItems": 0})
        if len(prefix) < high:
            for i, value in enumerate(left):
                extend(prefix + [value], left[:i] + left[i + 1:])

    extend([], values)
    out = {k: v for k, v in node.items() if k in ANNOTATIONS}
    if not branches:
        raise StructuredOutputError(f"'uniqueItems' at {where}: no array satisfies minItems {low}")
    out["anyOf"] = branches
    return out


def _safe_integer(node: dict[str, Any]) -> dict[str, Any]:
    """An integer without a bound gets JSON's interoperable range (SAFE_INTEGERS): its digits
    cannot run on (a small model repeats one until max_tokens), and what comes back is exact in
    every JSON parser."""
    types = node.get("type")
    if "enum" in node or "const" in node:
        return node
    if types != "integer" and not (isinstance(types, list) and "integer" in types and "number" not in types):
        return node
    if "minimum" not in node and "exclusiveMinimum" not in node:
        node["minimum"] = SAFE_INTEGERS[0]
    if "maximum" not in node and "exclusiveMaximum" not in node:
        node["maximum"] = SAFE_INTEGERS[1]
    return node


def _rewrite(node: Any, where: str) -> Any:
    if not isinstance(node, dict):
        return node
    out = _safe_integer(dict(node))
    for key in _SCHEMA_MAPS:
        if isinstance(node.get(key), dict):
            out[key] = {name: _rewrite(child, f"{where}/{key}/{name}") for name, child in node[key].items()}
    for key in _SCHEMA_ONE:
        if isinstance(node.get(key), dict):
            out[key] = _rewrite(node[key], f"{where}/{key}")
        elif key == "items" and isinstance(node.get(key), list):
            out[key] = [_rewrite(c, f"{where}/{key}/{i}") for i, c in enumerate(node[key])]
    for key in _SCHEMA_LISTS:
        if isinstance(node.get(key), list):
            out[key] = [_rewrite(c, f"{where}/{key}/{i}") for i, c in enumerate(node[key])]
    if out.get("uniqueItems") is True:
        if int(out.get("maxItems", 2)) <= 1:
            out.pop("uniqueItems")  # one item is always unique
        else:
            out = _unique_sequences(out, where)
    elif out.get("uniqueItems") is False:
        out.pop("uniqueItems")
    return out


def backend_for(schema: Any) -> str:
    """"xgrammar" where it enforces every keyword the schema uses exactly, else "guidance"."""
    for node in subschemas(schema):
        if set(node) - XGRAMMAR_KEYWORDS:
            return "guidance"
        if "format" in node and node["format"] not in XGRAMMAR_FORMATS:
            return "guidance"
        if "minLength" in node or "maxLength" in node:
            return "guidance"  # xgrammar's bounded strings refuse escapes, and drop the bounds of a pattern
        if node.get("type") != "integer" and any(k in node for k in _BOUNDS):
            return "guidance"  # xgrammar's bounded non-integers refuse some in-range decimals
        pattern = node.get("pattern")
        if isinstance(pattern, str) and (not _ANCHORED.match(pattern) or REGEX_EXTENSIONS.search(pattern[1:-1])):
            return "guidance"  # xgrammar anchors every pattern; JSON Schema's match anywhere
        for key in ("enum", "const"):
            values = node.get(key) if key == "enum" else [node.get(key)] if key in node else []
            if any(isinstance(v, (dict, list)) for v in values or []):
                return "guidance"
    return "xgrammar"


def prepare_schema(schema: Any) -> tuple[dict[str, Any] | bool, str]:
    """(the schema as the backends get it, the backend) or a 400 naming the problem."""
    check_schema(schema)
    prepared = _rewrite(copy.deepcopy(schema), "(root)")
    return prepared, backend_for(prepared)
