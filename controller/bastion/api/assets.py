"""Static assets (kernels, initrds) from the site's assets/ directory.

Starlette does the HTTP work: Range (single and multiple), If-Range, ETag and Last-Modified,
If-None-Match / If-Modified-Since (304) and HEAD, with two of RFC 9110's rules it leaves out
(AssetResponse._parse_range_header). The status recorded (history, metric) is the one sent. Paths that leave assets/ are refused: `..`,
absolute paths and NUL bytes with 400 before touching the disk, symlinks that point outside with
404 (Starlette resolves them and refuses, as it does for any file it will not serve).
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from collections.abc import AsyncIterator, Callable
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response
from starlette.datastructures import Headers
from starlette.responses import FileResponse, RangeNotSatisfiable
from starlette.staticfiles import NotModifiedResponse, StaticFiles

from bastion.api.deps import RuntimeDep, SiteDep, client_address
from bastion.api.jsonbody import StrictJsonRoute
from bastion.site.load import clean_relpath

router = APIRouter(tags=["assets"], route_class=StrictJsonRoute)


class AssetResponse(FileResponse):
    """Starlette's FileResponse for a file already open: headers and bytes from one file.

    FileResponse takes the size and ETag from a stat and opens the path again once the headers
    are out; a file replaced in between (a `mv`, a fetch that repairs an object) was sent with
    the old file's Content-Length, ETag and Content-Range and the new file's bytes. Here the file
    is opened first and its fstat gives the headers, so a node gets the old file or the new one,
    and If-Range compares against the file it is sent. Starlette still does Range and ETags."""

    # Bigger reads than Starlette's 64 KiB mean fewer trips through the thread pool per file.
    chunk_size = 256 * 1024

    def __init__(self, file: BinaryIO, path: str, started: Callable[[int, int], None]) -> None:
        self._file = file
        self._started = started  # (status Starlette sends: 200, 206, 416 or 400; file size)
        super().__init__(path, stat_result=os.fstat(file.fileno()))

    @classmethod
    def _parse_range_header(cls, http_range: str, file_size: int) -> list[tuple[int, int]]:
        # RFC 9110 14.2: a range unit the server does not know is ignored (the whole file),
        # where Starlette answers 400; and 15.5.17: 416 only when none of the ranges can be
        # served, where Starlette answers 416 when one cannot. Ranges that contradict
        # themselves (bytes=9-0) stay a 400, which the RFC allows.
        unit, _, spec = http_range.partition("=")
        if unit.strip().lower() != "bytes":
            return []  # FileResponse then sends the whole file
        try:
            return super()._parse_range_header(http_range, file_size)
        except RangeNotSatisfiable:
            served = [(a, b) for a, b in cls._parse_ranges(spec, file_size) if a < file_size]
            if not served:
                raise
            return super()._parse_range_header(
                "bytes=" + ",".join(f"{a}-{b - 1}" for a, b in served), file_size)  # fmt: skip

    @contextlib.asynccontextmanager
    async def _open_file(self) -> AsyncIterator[anyio.AsyncFile[bytes]]:
        yield anyio.wrap_file(self._file)  # closed by __call__, however the response ends

    async def __call__(self, scope, receive, send) -> None:
        # pathsend would have the server open the path again: not this file, maybe.
        extensions = {k: v for k, v in scope.get("extensions", {}).items()
                      if k != "http.response.pathsend"}  # fmt: skip

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                self._started(message["status"], self.stat_result.st_size)
            await send(message)

        try:
            await super().__call__({**scope, "extensions": extensions}, receive, sending)
        finally:
            self._file.close()


def _open_regular(path: str) -> BinaryIO | None:
    """path opened for reading, if it is still a regular file (O_NONBLOCK: never hang on a FIFO)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return os.fdopen(fd, "rb")


@lru_cache(maxsize=8)
def _static_files(directory: Path) -> StaticFiles:
    return StaticFiles(directory=directory, check_dir=False)


def _refused(runtime, request: Request, rel: str, status: int, text: str) -> Response:
    runtime.metrics.asset_requests.labels(status=str(status)).inc()
    client = client_address(request.scope)
    if request.method == "GET" and runtime.addresses.lookup(client, time.time()) is not None:
        # A machine's boot step that failed (a kernel that is not there): its history says so.
        # Refusals from anyone else are not boots, and are not recorded.
        runtime.record("asset", endpoint=f"/assets/{rel}"[:300], status=status,
                       payload={"client": client})
    return PlainTextResponse(text, status)


# Two routes, not one api_route for both methods: that gives GET and HEAD the same OpenAPI
# operationId, which the spec forbids (FastAPI warns "Duplicate Operation ID"). A 405 allows
# both (bastion.api.main, _http_error).
@router.get(
    "/assets/{path:path}",
    summary="A file from the site's assets/ directory",
    response_class=FileResponse,
)
@router.head(
    "/assets/{path:path}",
    summary="An asset's headers (size, ETag), no body",
    response_class=FileResponse,
)
async def asset(path: str, request: Request, runtime: RuntimeDep, site: SiteDep) -> Response:
    rel = clean_relpath(path)
    if rel is None:
        return _refused(runtime, request, path, 400, f"{path!r} is not a path inside assets/\n")
    static = _static_files(site.assets_dir)
    try:
        full, st = await anyio.to_thread.run_sync(static.lookup_path, rel)
    except OSError:  # a name too long, a directory it may not read: nothing to serve either
        full, st = "", None
    if st is None or not stat.S_ISREG(st.st_mode):
        return _refused(runtime, request, rel, 404, f"no asset {rel}\n")
    file = await anyio.to_thread.run_sync(_open_regular, full)
    if file is None:  # gone (or replaced by something else) since it was looked up
        return _refused(runtime, request, rel, 404, f"no asset {rel}\n")
    def started(status: int, size: int) -> None:
        # What was sent, once Starlette has judged the Range: a 416 recorded as 200 was a
        # kernel step done, for the operator, where a node had failed to fetch it
        runtime.metrics.asset_requests.labels(status=str(status)).inc()
        if request.method == "GET":
            # A boot step like the others (kernel, initrd) in the machine's history. Assets are
            # fetched without the machine's MAC, so the client's address is what ties it to one.
            payload = {"client": client_address(request.scope), "size": size}
            if "range" in request.headers:
                payload["range"] = request.headers["range"][:100]
            runtime.record("asset", endpoint=f"/assets/{rel}", status=status, payload=payload)

    response: Response = AssetResponse(file, full, started)
    if static.is_not_modified(response.headers, Headers(scope=request.scope)):
        file.close()
        started(304, response.stat_result.st_size)
        response = NotModifiedResponse(response.headers)
    return response
