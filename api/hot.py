"""How the hot POSTs read their request: FastAPI routes that declare only ``request: Request`` (#23).

The hot POSTs (`/v1/enrollments`, `/ocpp/v201/sign-certificate`, EST simpleenroll) are plain FastAPI routes,
dispatched by FastAPI's router like every other. Declared the usual way — a body model, a header parameter
and the `PrincipalDep` dependency — FastAPI solved them on every call: the path, query, header and cookie
extraction twice (the route and its dependency), a dependency cache, a Content-Type parse through
email.message, the body validated through its own field wrapper: ≈ 60 µs of event-loop CPU per
enrollment on the development machine, a quarter of what the loop spent on one
(bench/results/2026-12-07-enrollment-23-lean.md), and at 32 connections the loop, sharing the GIL with
the pool threads, is what limits. `read` does the same work directly, in FastAPI's order and with its
answers:

1. the body is read (an error while reading it: 400 "There was an error parsing the body"); a JSON body
   (Content-Type application/json or application/*+json) that does not decode is a 422 `json_invalid`
   before anything else, as FastAPI decodes the body before it solves dependencies;
2. the caller is authenticated (api/auth.py `authenticate`: 401, 429) before any validation error, as the
   `PrincipalDep` dependency was;
3. the header parameters, then the body, are validated: all their errors in one 422
   (`RequestValidationError`, answered by api/problems.py: problem+json, or the OCPP rejection under
   /ocpp/), locations ("header", name) and ("body", …) as FastAPI gives them.

The OpenAPI document does not change: `openapi_extra(...)` declares the route's header parameters, its
request body (a reference to the model's component schema) and the 422 answer, and `add_schemas` (called
by api/app.py's application class when it builds the document) adds the models' component schemas.
tests/test_api_hot_routes.py compares each hot operation with the one FastAPI generates for the usual
declaration, and the answers to malformed requests with the ones FastAPI gave.
"""

from __future__ import annotations

import email.message
import json
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.models import Schema
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from api.auth import authenticate
from pki.orgs import Principal

M = TypeVar("M", bound=BaseModel)

REF = "#/components/schemas/{model}"


@dataclass(frozen=True)
class Header:
    """An optional string header parameter with a length bound (what `Header(max_length=...)` declared)."""

    name: str  # lower case, as it travels (FastAPI's alias of the parameter name)
    title: str  # the parameter's title in the OpenAPI document
    max_length: int

    def adapter(self) -> TypeAdapter[str]:
        return TypeAdapter(Annotated[str, Field(max_length=self.max_length)])

    def parameter(self) -> dict[str, Any]:
        """The OpenAPI parameter object FastAPI generates for ``Annotated[str | None, Header(max_length=N)] = None``."""
        return {"name": self.name, "in": "header", "required": False,
                "schema": {"anyOf": [{"type": "string", "maxLength": self.max_length}, {"type": "null"}],
                           "title": self.title}}


IDEMPOTENCY_KEY = Header("idempotency-key", "Idempotency-Key", 255)


class _Missing:
    """No body at all (FastAPI's ``Undefined``): a required body is then "Field required" at ("body",)."""


MISSING = _Missing()


def _is_json(content_type: str) -> bool:
    if content_type == "application/json":  # what clients send; the parse below is ≈ 5 µs
        return True
    message = email.message.Message()  # FastAPI's own test (fastapi/routing.py), so the answers stay its answers
    message["content-type"] = content_type
    if message.get_content_maintype() != "application":
        return False
    subtype = message.get_content_subtype()
    return subtype == "json" or subtype.endswith("+json")


async def body(request: Request) -> Any:
    """The request body as FastAPI hands it to validation: MISSING when empty, the decoded JSON value when
    the Content-Type is JSON, else the bytes (which no model accepts). A JSON body that does not decode
    raises the 422 FastAPI raises; any other error while reading or decoding (the client went away, bytes
    that are not UTF-8/16/32, nesting beyond the recursion limit) is its 400."""
    try:
        raw = await request.body()
        if not raw:
            return MISSING
        content_type = request.headers.get("content-type")
        if content_type and _is_json(content_type):
            return json.loads(raw)
        return raw
    except json.JSONDecodeError as e:
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body", e.pos), "msg": "JSON decode error",
                                       "input": {}, "ctx": {"error": e.msg}}], body=e.doc) from e
    except Exception as e:  # noqa: BLE001 - FastAPI's answer to a body it cannot read, whatever the cause
        raise HTTPException(status_code=400, detail="There was an error parsing the body") from e


# Each header's validator, built once (a TypeAdapter costs milliseconds to build, microseconds to use).
_ADAPTERS: dict[Header, TypeAdapter[str]] = {}


def _header_errors(h: Header, value: str) -> list[dict[str, Any]]:
    if len(value) <= h.max_length:  # the common case, without a validator call
        return []
    adapter = _ADAPTERS.get(h)
    if adapter is None:
        adapter = _ADAPTERS.setdefault(h, h.adapter())
    try:
        adapter.validate_python(value)
    except ValidationError as exc:
        return [{**e, "loc": ("header", h.name, *e["loc"])} for e in exc.errors(include_url=False)]
    return []


def _model(model: type[M], value: Any) -> tuple[M | None, list[dict[str, Any]]]:
    if value is MISSING:
        return None, [{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}]
    try:
        # from_attributes: how FastAPI validates a body field (its messages name "object to extract fields from")
        return model.model_validate(value, from_attributes=True), []
    except ValidationError as exc:
        return None, [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]


async def read(request: Request, model: type[M], *headers: Header) -> tuple[Principal, M, list[str | None]]:
    """The caller, the validated body and the headers' values (None when absent), in FastAPI's order (see
    the module docstring)."""
    value = await body(request)
    principal = await authenticate(request)
    found = [request.headers.get(h.name) for h in headers]
    errors = [e for h, v in zip(headers, found, strict=True) if v is not None for e in _header_errors(h, v)]
    parsed, body_errors = _model(model, value)
    errors += body_errors
    if errors or parsed is None:
        raise RequestValidationError(errors, body=None if value is MISSING else value)
    return principal, parsed, found


# -- OpenAPI ----------------------------------------------------------------------------------------------

# Models a hot route's request body refers to, by component name (filled by openapi_extra at import).
_BODIES: dict[str, type[BaseModel]] = {}


def openapi_extra(model: type[BaseModel] | None, *headers: Header) -> dict[str, Any]:
    """The route's `openapi_extra`: what FastAPI generates for a body of ``model`` and these headers. The
    body refers to the model's component schema, which `add_schemas` puts in the document."""
    extra: dict[str, Any] = {"responses": {"422": {"description": "Validation Error", "content": {
        "application/json": {"schema": {"$ref": REF.format(model="HTTPValidationError")}}}}}}
    if headers:
        extra["parameters"] = [h.parameter() for h in headers]
    if model is not None:
        _BODIES.setdefault(model.__name__, model)
        extra["requestBody"] = {"content": {"application/json": {"schema": {"$ref": REF.format(model=model.__name__)}}},
                                "required": True}
    return extra


def add_schemas(document: dict[str, Any]) -> None:
    """Adds to a generated OpenAPI ``document`` the component schemas of the hot routes' bodies it refers to
    (and the models those use): the routes declare no body, so FastAPI does not collect them itself.
    Built as FastAPI builds its own (pydantic's validation-mode schema, then through its OpenAPI model,
    which drops None values)."""
    found = document.setdefault("components", {}).setdefault("schemas", {})
    added = False
    for path in document.get("paths", {}).values():
        for operation in path.values():
            ref = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get(
                "schema", {}).get("$ref", "") if isinstance(operation, dict) else ""
            model = _BODIES.get(ref.rsplit("/", 1)[-1])
            if model is None or model.__name__ in found:
                continue
            doc = model.model_json_schema(ref_template=REF, mode="validation")
            for name, sub in [*doc.pop("$defs", {}).items(), (model.__name__, doc)]:
                found.setdefault(name, Schema.model_validate(sub).model_dump(by_alias=True, exclude_none=True))
            added = True
    if added:
        document["components"]["schemas"] = dict(sorted(found.items()))  # FastAPI's order: by name


__all__ = ["IDEMPOTENCY_KEY", "MISSING", "Header", "add_schemas", "body", "openapi_extra", "read"]

