"""JSON schemas of the structured-output tests: each with a prompt that asks for it.

They cover what applications send: enums, consts, nested objects, arrays with min/max items,
uniqueItems, patterns, numeric ranges, anyOf / oneOf, $ref / $defs (recursive too), nullable
fields, additionalProperties false, formats, and a few keywords only the fallback engine
(llguidance) enforces (multipleOf, patternProperties, allOf, enums of objects).
"""

from __future__ import annotations

from typing import Any


def _obj(props: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False, **extra}


NAME = {"type": "string", "minLength": 1, "maxLength": 24}
SHORT = {"type": "string", "maxLength": 40}

SCHEMAS: dict[str, dict[str, Any]] = {
    "person": _obj({"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    "color_enum": _obj({"color": {"enum": ["red", "green", "blue"]}}),
    "const_version": _obj({"version": {"const": "1.0"}, "ok": {"type": "boolean"}}),
    "nested_address": _obj({"name": NAME, "address": _obj({"street": SHORT, "city": NAME,
                                                          "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})}),
    "tags_minmax": _obj({"tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                  "minItems": 1, "maxItems": 3}}),
    "unique_enum_tags": _obj({"tags": {"type": "array", "items": {"enum": ["news", "sport", "tech", "art"]},
                                       "uniqueItems": True, "minItems": 1, "maxItems": 3}}),
    "unique_booleans": {"type": "array", "items": {"type": "boolean"}, "uniqueItems": True},
    "phone_pattern": _obj({"phone": {"type": "string", "pattern": "^\\+?[0-9]{3}-[0-9]{3}-[0-9]{4}$"}}),
    "sku_pattern": _obj({"sku": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{4}$"}, "qty": {"type": "integer",
                                                                                       "minimum": 1, "maximum": 99}}),
    "temperature_range": _obj({"celsius": {"type": "number", "minimum": -50, "maximum": 60}}),
    "exclusive_range": _obj({"score": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10}}),
    "anyof_id": _obj({"id": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 10000},
                                       {"type": "string", "pattern": "^id-[0-9]{1,4}$"}]}}),
    "oneof_shape": {"oneOf": [_obj({"kind": {"const": "circle"}, "radius": {"type": "integer", "minimum": 1,
                                                                              "maximum": 100}}),
                              _obj({"kind": {"const": "square"}, "side": {"type": "integer", "minimum": 1,
                                                                          "maximum": 100}})]},
    "defs_ref": {"$defs": {"point": _obj({"x": {"type": "integer", "minimum": -100, "maximum": 100},
                                          "y": {"type": "integer", "minimum": -100, "maximum": 100}})},
                 **_obj({"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}})},
    "recursive_tree": {"$defs": {"node": _obj({"name": NAME, "children": {"type": "array", "maxItems": 2,
                                                                          "items": {"$ref": "#/$defs/node"}}},
                                              required=["name"])},
                       "$ref": "#/$defs/node"},
    "nullable_middle": _obj({"first": NAME, "middle": {"type": ["string", "null"], "maxLength": 24}, "last": NAME}),
    "nullable_anyof": _obj({"note": {"anyOf": [SHORT, {"type": "null"}]}}),
    "optional_fields": _obj({"title": NAME, "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
                             "rating": {"type": "integer", "minimum": 1, "maximum": 5}}, required=["title"]),
    "boolean_flags": _obj({"active": {"type": "boolean"}, "admin": {"type": "boolean"}}),
    "array_of_objects": {"type": "array", "minItems": 1, "maxItems": 3,
                         "items": _obj({"name": NAME, "price": {"type": "integer", "minimum": 0, "maximum": 999}})},
    "string_lengths": _obj({"code": {"type": "string", "minLength": 3, "maxLength": 6}}),
    "integer_list": _obj({"numbers": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100},
                                      "minItems": 2, "maxItems": 5}}),
    "date_format": _obj({"event": NAME, "date": {"type": "string", "format": "date"}}),
    "email_format": _obj({"email": {"type": "string", "format": "email", "maxLength": 40}}),
    "uuid_format": _obj({"id": {"type": "string", "format": "uuid"}}),
    "datetime_format": _obj({"at": {"type": "string", "format": "date-time", "maxLength": 25}}),
    "enum_mixed": _obj({"value": {"enum": ["low", 1, 2, None, True]}}),
    "integer_enum": _obj({"level": {"type": "integer", "enum": [1, 2, 3]}}),
    "prefix_items": {"type": "array", "prefixItems": [{"type": "integer", "minimum": 0, "maximum": 9}, NAME],
                     "items": False, "minItems": 2},
    "min_properties": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 9},
                       "minProperties": 1, "maxProperties": 2},
    "deep_nesting": _obj({"a": _obj({"b": _obj({"c": _obj({"d": {"type": "integer", "minimum": 0,
                                                                 "maximum": 9}})})})}),
    "matrix": _obj({"rows": {"type": "array", "minItems": 2, "maxItems": 2,
                             "items": {"type": "array", "minItems": 2, "maxItems": 2,
                                       "items": {"type": "integer", "minimum": 0, "maximum": 9}}}}),
    "status_response": _obj({"status": {"enum": ["ok", "error"]}, "code": {"type": "integer", "minimum": 100,
                                                                           "maximum": 599},
                             "message": SHORT}),
    "anyof_objects": {"anyOf": [_obj({"cat": NAME}), _obj({"dog": NAME})]},
    "hex_color": _obj({"hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}}),
    "semver": _obj({"version": {"type": "string", "pattern": "^[0-9]+\\.[0-9]+\\.[0-9]+$", "maxLength": 12}}),
    "ipv4_like": _obj({"ip": {"type": "string", "pattern": "^([0-9]{1,3}\\.){3}[0-9]{1,3}$"}}),
    "two_enums": _obj({"size": {"enum": ["S", "M", "L"]}, "fit": {"enum": ["slim", "regular"]}}),
    "empty_object": {"type": "object", "properties": {}, "additionalProperties": False},
    "plain_string": {"type": "string", "maxLength": 30},
    "plain_integer": {"type": "integer", "minimum": 1, "maximum": 1000},
    "plain_boolean": {"type": "boolean"},
    "null_only": {"type": "null"},
    "todo_list": _obj({"todos": {"type": "array", "maxItems": 3, "items": _obj(
        {"task": SHORT, "done": {"type": "boolean"}, "priority": {"enum": ["low", "high"]}})}}),
    "defs_enum": {"$defs": {"unit": {"enum": ["kg", "lb"]}},
                  **_obj({"weight": {"type": "integer", "minimum": 0, "maximum": 500}, "unit": {"$ref": "#/$defs/unit"}})},
    "defs_nested_refs": {"definitions": {"name": NAME, "person": _obj({"name": {"$ref": "#/definitions/name"}})},
                         **_obj({"owner": {"$ref": "#/definitions/person"}, "pets": {"type": "array", "maxItems": 2,
                                                                                   "items": {"$ref": "#/definitions/name"}}})},
    "ratings_unique": _obj({"stars": {"type": "array", "items": {"type": "integer", "enum": [1, 2, 3, 4, 5]},
                                      "uniqueItems": True, "maxItems": 2}}),
    "const_object_field": _obj({"type": {"const": "event"}, "id": {"type": "integer", "minimum": 0, "maximum": 99}}),
    "count_unbounded": _obj({"count": {"type": "integer"}, "delta": {"type": ["integer", "null"]}}),
    "nullable_number": _obj({"discount": {"type": ["integer", "null"], "minimum": 0, "maximum": 50}}),
    # enforced by llguidance (xgrammar does not implement these exactly)
    "multiple_of": _obj({"dozen": {"type": "integer", "multipleOf": 12, "minimum": 0, "maximum": 144}}),
    "pattern_properties": {"type": "object", "patternProperties": {"^x_[a-z]{1,5}$": {"type": "integer", "minimum": 0,
                                                                                      "maximum": 9}},
                           "additionalProperties": False, "maxProperties": 2},
    "all_of": {"allOf": [{"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
                          "required": ["a"]},
                         {"properties": {"b": {"type": "boolean"}}, "required": ["b"]}],
               "properties": {"a": {}, "b": {}}, "additionalProperties": False},
    "enum_of_objects": _obj({"point": {"enum": [{"x": 0, "y": 0}, {"x": 1, "y": 1}]}}),
    "unanchored_pattern": _obj({"word": {"type": "string", "pattern": "[0-9]", "maxLength": 8}}),
}
