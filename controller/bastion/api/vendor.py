"""Browser parts from npm that the controller serves itself, never from a CDN (web/package.json,
installed by tools/setup with `npm ci --ignore-scripts`): xterm.js for the console page
(bastion.api.console_page) and Swagger UI for /docs (bastion.api.apidocs). Each page names its
files as {name in the URL: (path under web_dir()/node_modules, media type)}: only those are
served."""

from __future__ import annotations

from pathlib import Path

from fastapi import HTTPException
from fastapi.responses import FileResponse

from bastion import paths

INSTALL_HINT = "tools/setup (or: cd web && npm ci --ignore-scripts)"

Files = dict[str, tuple[str, str]]


def path_of(files: Files, name: str) -> Path:
    return paths.web_dir() / "node_modules" / files[name][0]


def missing(files: Files) -> list[str]:
    """The names of `files` that are not installed."""
    return [n for n in files if not path_of(files, n).is_file()]


def file_response(files: Files, name: str, what: str) -> FileResponse:
    """One of `files` (`what` names the package in the 404 when it is not installed)."""
    if name not in files:
        raise HTTPException(404, f"no such file: {name}")
    path = path_of(files, name)
    if not path.is_file():
        raise HTTPException(404, f"{what} is not installed in {paths.web_dir()}: run {INSTALL_HINT}")
    return FileResponse(path, media_type=files[name][1])
