"""The request models in /openapi.json: routes parse their bodies themselves (strictly, in one
pass), so FastAPI cannot see them; each route names its model here and the schema gets it.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

REF = "#/components/schemas/{model}"
_ERROR_SCHEMA = {
    "type": "object",
    "properties": {"error": {"type": "object", "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}


def request_body(model: type[BaseModel], required: bool = True) -> dict[str, Any]:
    """`openapi_extra` of a route whose JSON body is `model`; its schemas join the components."""
    schema = model.model_json_schema(ref_template=REF)
    defs = schema.pop("$defs", {})
    return {
        "requestBody": {"required": required, "content": {"application/json": {"schema": schema}}},
        "responses": {str(code): {"description": text, "content": {"application/json": {"schema": _ERROR_SCHEMA}}}
                      for code, text in ((400, "bad request"), (401, "missing or invalid key"),
                                         (403, "refused (origin, host, or model control disabled)"),
                                         (413, "body too large"), (415, "body not JSON"),
                                         (429, "at capacity"), (503, "not ready, draining or shutting down"))},
        "x-surge-defs": defs,
    }


def install_request_schemas(app: FastAPI) -> None:
    """Make app.openapi() move each route's request-model definitions into components/schemas."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for methods in schema.get("paths", {}).values():
            for operation in methods.values():
                components.update(operation.pop("x-surge-defs", {}))
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
