"""A client of a running controller's management API, for the command line (`bastion power`,
`status`, `machine ...` with `--url`) and scripts.

    api = ApiClient.connect("http://127.0.0.1:8080", token_file=None)
    api.call("GET", "/api/v1/machines")

The token comes from `token_file`, else $BASTION_API_TOKEN, else $BASTION_API_TOKEN_FILE
(bastion.settings.resolve_token); without one, reads still work and writes get 403. Every
failure (no answer, an HTTP error, the controller's refusal with its `detail`) is an ApiError
with a message fit to print: it is a click.ClickException, so a command just lets it through.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click
import httpx

from bastion.settings import SettingsError, resolve_token


# C0 and C1 controls, DEL, and the bidirectional overrides and isolates: what a terminal acts on
# or reorders instead of showing
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """`text` for a terminal line: every control character as an escape (\\x1b, \\n, \\u202e),
    so that what a node or a LAN host put into an event (a callback's field, a path) can neither
    drive the operator's terminal nor forge a line of output."""
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class ApiError(click.ClickException):
    """The API could not be asked, or refused; `status` is the HTTP status when it answered."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def segment(name: str) -> str:
    """`name` as one segment of an API path: percent-encoded, so that a '/', '..', '?' or '#'
    in it names nothing else (`machine hold 'a/../b'` must not hold b); ApiError for a name
    that is no text (empty, a control character, bytes that are not UTF-8)."""
    if not name:
        raise ApiError("an empty name names nothing")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # argv's bytes that are not UTF-8 come as lone surrogates
        raise ApiError(f"{name!r} is not a name: it is not UTF-8 text") from None
    if not name.isprintable():
        raise ApiError(f"{name!r} is not a name: it has a control character")
    return quote(name, safe="")


class ApiClient:
    def __init__(self, url: str, token: str | None = None, timeout: float = 30):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self.token = token
        try:
            self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        except (httpx.InvalidURL, ValueError) as e:
            raise ApiError(f"{url}: not a URL: {e}") from None

    @classmethod
    def connect(cls, url: str, token_file: Path | None = None) -> ApiClient:
        try:
            token = resolve_token(None, token_file)
        except SettingsError as e:
            raise ApiError(str(e)) from None
        return cls(url, token)

    def call(self, method: str, path: str, **kw: Any) -> Any:
        """The decoded JSON answer of `method path`, or ApiError."""
        r = self._request(method, path, **kw)
        try:
            return r.json()
        except ValueError:
            raise ApiError(f"{self.url}: the answer to {method} {path} is not JSON (HTTP "
                           f"{r.status_code}): is this an Edge Bastion controller?") from None

    def call_bytes(self, method: str, path: str, **kw: Any) -> bytes:
        """The raw body of the answer of `method path` (a console log), or ApiError."""
        return self._request(method, path, **kw).content

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = self.http.request(method, path, **kw)
        except (httpx.HTTPError, httpx.InvalidURL) as e:
            raise ApiError(f"{self.url}: {e}") from None
        if r.status_code >= 400:
            try:
                detail = validation_words(r.json().get("detail", r.text))
            except (ValueError, AttributeError):  # not JSON, or not an object: not our API's words
                text = " ".join(r.text.split())
                detail = (f"{self.url}: not an Edge Bastion controller's answer to {method} {path}: "
                          f"{text[:200]}{'...' if len(text) > 200 else ''}")  # fmt: skip
            raise ApiError(f"{detail} (HTTP {r.status_code})", r.status_code)
        return r


def validation_words(detail: Any) -> Any:
    """FastAPI's 422 `detail` (a list of pydantic errors) as words: `channel: Input should be
    less than or equal to 255`, one per error; the controller's own {"message", "problems"} as
    the message and its problems; any other detail as it is."""
    if isinstance(detail, dict) and isinstance(detail.get("message"), str):
        problems = detail.get("problems")
        if isinstance(problems, list) and problems:
            return f"{detail['message']}: " + "; ".join(str(p) for p in problems)
        return detail["message"]
    if not isinstance(detail, list) or not all(isinstance(e, dict) for e in detail):
        return detail
    out = []
    for e in detail:
        loc = [str(x) for x in e.get("loc") or () if x not in ("path", "query", "body")]
        out.append(f"{'.'.join(loc) + ': ' if loc else ''}{e.get('msg', e)}")
    return "; ".join(out)
