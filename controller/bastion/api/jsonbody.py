"""JSON as the controller takes it from a client: text that it can store, and answer back.

Python's json module takes more than RFC 8259 allows, and each extra is a way to store what
cannot be read back: `NaN` and `Infinity` (and `1e999`, which becomes infinity) are not JSON,
so a group's metadata written with them is no longer a JSON file; a lone surrogate escape
(`"\\ud800"`) is no character, so an event or a site file holding one can be stored and then not
answered (every later listing of it fails). Nesting deep enough to exhaust Python's recursion
is refused too. `loads` refuses all of them with a message that says which and where;
`StrictJsonRoute` makes every JSON body of the API go through it (a 400 naming the problem),
and the boot endpoints that parse their own bodies call it themselves.
"""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi import HTTPException, Request, params
from fastapi.routing import APIRoute

MAX_DEPTH = 64  # arrays and objects within each other; deeper is refused


class BadJson(ValueError):
    """Parsed as JSON by Python, but not JSON text the controller keeps (the message says why)."""


def _no_constant(name: str) -> Any:
    raise BadJson(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadJson(f"the number {text[:40]} is beyond a double's range")
    return value


def loads(data: str | bytes) -> Any:
    """json.loads for a client's body: raises json.JSONDecodeError for text that is not JSON at
    all, BadJson for what Python takes and JSON does not (above)."""
    try:
        value = json.loads(data, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise BadJson(f"nested more than {MAX_DEPTH} levels deep") from None
    _check(value)
    return value


def _check(value: Any) -> None:
    # iterative: the depth bound must hold without spending the recursion it protects
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        v, where, depth = stack.pop()
        if isinstance(v, str):
            _text(v, where)
        elif isinstance(v, (dict, list)):
            if depth >= MAX_DEPTH:
                raise BadJson(f"nested more than {MAX_DEPTH} levels deep")
            if isinstance(v, dict):
                for k, item in v.items():
                    _text(k, f"{where}.{k}" if k.isprintable() else where)
                    stack.append((item, f"{where}.{k}", depth + 1))
            else:
                stack.extend((item, f"{where}[{i}]", depth + 1) for i, item in enumerate(v))


def _text(s: str, where: str) -> None:
    if s.isascii():
        return
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = ord(s[e.start])
        at = f" at {where.lstrip('.')[:80]}" if where else ""
        raise BadJson(f"a lone surrogate \\u{bad:04x}{at} is not text (a JSON string must be "
                      "Unicode characters)") from None  # fmt: skip


class _StrictRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = loads(body)
            except BadJson as e:
                raise HTTPException(400, f"request body: {e}") from None
        return self._json


def _is_json(content_type: str) -> bool:
    kind = content_type.split(";")[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


class StrictJsonRoute(APIRoute):
    """An APIRoute whose JSON body is parsed by `loads`: what it refuses is a 400 that says
    why; text that is not JSON at all stays FastAPI's 422 (json_invalid). A body the route
    reads as JSON sent under another Content-Type, or none, is a 415 that says so (FastAPI
    would take the bytes as the body and answer 'Input should be a valid dictionary')."""

    def get_route_handler(self):
        handler = super().get_route_handler()
        wants_json = self.body_field is not None and not isinstance(self.body_field.field_info, params.Form)

        async def strict(request: Request):
            # one request object for the check and the handler: the body, once read, is kept
            # on it (a second object would wait on `receive` for a body already taken)
            request = _StrictRequest(request.scope, request.receive)
            content_type = request.headers.get("content-type", "")
            if wants_json and not _is_json(content_type) and await request.body():
                raise HTTPException(415, "the body is JSON: send it with Content-Type: application/json "
                                         f"(this request's: {content_type[:80] or 'none'})")  # fmt: skip
            return await handler(request)

        return strict
