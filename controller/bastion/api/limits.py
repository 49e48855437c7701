"""Request bodies: refused by their size and their sender before they are read.

FastAPI reads a request's whole body before it runs the first dependency, which is where the
management API checks its token, and uvicorn hands over a body as fast as it arrives. So an
unauthenticated 200 MB PUT was read into memory (202 -> 807 MB) before its 401, `/callback` read
200 MB before its 413, and a 10 MB event was stored and then served to anyone. BodyLimits, an
ASGI middleware in front of the application, decides from the request head:

1. A write to the management API (a path under /api/, any method but GET, HEAD and OPTIONS)
   without the right token is refused at once, 401 or 403, in the words of every handler, or
   429 from an address that has sent too many wrong tokens (bastion.api.deps.token_refusal):
   the body is never read.
2. A body over its route's limit is refused with 413 at once when its Content-Length says so;
   a body without one (chunked) is read up to the limit and refused at the first byte past it.
   Either way at most `limit` bytes of it are ever held. A route that parses its body as it
   arrives (STREAMED: a node's journal, chunked by systemd-journal-upload, up to 1 GiB) gets a
   chunked body as it comes instead, counted, and the 413 comes at the first byte past the limit.
3. A refusal closes the connection (`Connection: close`), so the rest of the body is not read
   to reuse it.

The limits: what a node sends (BODY_LIMITS, a few hundred bytes in practice) and `--max-body`
(Settings.max_body, 1 MiB) for everything else. A body within its limit goes to the application
untouched, as it arrives.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import HTTPException

from bastion.api.deps import Runtime, bearer_token, token_refusal

#: The public routes that take a body, and their limits (bytes). Everything else: --max-body.
BODY_LIMITS = {
    "/callback": 64 * 1024,
    "/heartbeat": 4 * 1024,
    # a node's whole journal since its boot may come in one upload; it is parsed as it arrives
    # and never held (bastion.logship.journal holds at most 1 MiB of an entry, skipping a bigger field)
    "/journal/upload": 1024 * 1024 * 1024,
}

#: Routes that parse their body as it arrives and never hold it (bastion.api.journal): a chunked
#: body is not gathered first (that held up to 1 GiB per upload, and shipped nothing of an
#: upload until it ended).
STREAMED = frozenset({"/journal/upload"})

_READS = frozenset({"GET", "HEAD", "OPTIONS"})


def _header(scope: dict[str, Any], name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


class BodyLimits:
    """The ASGI middleware (see the module docstring)."""

    def __init__(self, app: Any, runtime: Runtime):
        self.app = app
        self.runtime = runtime

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if scope["method"] not in _READS and path.startswith("/api/"):
            authorization = _header(scope, b"authorization")
            given = bearer_token(authorization.decode("latin-1") if authorization else None)
            refusal = token_refusal(self.runtime, scope, given)
            if refusal is not None:
                await _refuse(send, *refusal)
                return
        limit = BODY_LIMITS.get(path, self.runtime.settings.max_body)
        length = _header(scope, b"content-length")
        if length is not None:
            # the HTTP parser has checked it is digits and that the body has that length
            if int(length) > limit:
                await self._too_large(send, path, limit)
                return
            await self.app(scope, receive, send)
            return
        if _header(scope, b"transfer-encoding") is None:  # no body
            await self.app(scope, receive, send)
            return
        if path in STREAMED:
            await self.app(scope, self._counted(receive, path, limit), send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: let the app see it
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._too_large(send, path, limit)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive, message), send)

    async def _too_large(self, send: Any, path: str, limit: int) -> None:
        self.runtime.metrics.bodies_refused.inc()
        await _refuse(send, 413, _too_large_detail(path, limit), {})

    def _counted(self, receive: Any, path: str, limit: int) -> Any:
        """receive() for a STREAMED route: the body as it arrives, and at the first byte past
        `limit` an HTTPException(413) raised into the handler reading it."""
        size = 0

        async def counted() -> dict[str, Any]:
            nonlocal size
            message = await receive()
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > limit:
                    self.runtime.metrics.bodies_refused.inc()
                    # the body's rest is not read to reuse the connection
                    raise HTTPException(413, _too_large_detail(path, limit), headers={"Connection": "close"})
            return message

        return counted


def _too_large_detail(path: str, limit: int) -> str:
    what = f"{path}'s limit" if path in BODY_LIMITS else "--max-body"
    return f"request body too large: more than {limit} bytes ({what})"


def _replay(body: bytes, receive: Any, last: dict[str, Any]) -> Any:
    """A receive() that gives the body read so far as one message, then the real receive."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]
    if last["type"] != "http.request":
        pending = [last]

    async def replay() -> dict[str, Any]:
        return pending.pop() if pending else await receive()

    return replay


async def _refuse(send: Any, status: int, detail: str, headers: dict[str, str]) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),  # the body's rest is not read to reuse the connection
            *((k.lower().encode(), v.encode()) for k, v in headers.items()),
        ],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": body})
