"""A client of a running controller's management API, for the command line (`bastion power`,
`status`, `machine ...` with `--url`) and scripts.

    api = ApiClient.connect("http://127.0.0.1:8080", token_file=None)
    api.call("GET", "/api/v1/machines")

The token comes from `token_file`, else $BASTION_API_TOKEN, else $BASTION_API_TOKEN_FILE
(bastion.settings.resolve_token); without one, reads still work and writes get 403. Every
failure (no answer, an HTTP error, the controller's refusal with its `detail`) is an ApiError
with a message fit to print: it is a click.ClickException, so a command just lets it through.
An answer without what the commands read from it (ANSWERS) is one too, so they index it freely.
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
        self._controller_seen = False  # GET /api/v1/site answered as a controller does (_confirm)
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
        """The decoded JSON answer of `method path`, or ApiError; an answer to one of the calls
        the command line makes (ANSWERS) holds what that command reads."""
        r = self._request(method, path, **kw)
        try:
            answer = r.json()
        except ValueError:
            raise ApiError(f"{self.url}: the answer to {method} {path} is not JSON (HTTP "
                           f"{r.status_code}): is this an Edge Bastion controller?") from None
        shape = next((s for m, p, s in ANSWERS if m == method and p.fullmatch(path)), ...)
        if (problem := lacks(answer, shape)) is not None:
            raise ApiError(f"{self.url}: not an Edge Bastion controller's answer to {method} "
                           f"{path}: {problem}")  # fmt: skip
        if answer == [] and isinstance(shape, list):
            self._confirm(method, path)
        return answer

    def _confirm(self, method: str, path: str) -> None:
        """ApiError unless GET /api/v1/site answers as a controller does (SITE), asked once
        per client: an empty array is what a controller with no machines (or no new events)
        answers, and also what a server that answers `[]` to everything does, which would
        otherwise pass for an empty site."""
        if self._controller_seen:
            return
        said = f"{self.url}: not an Edge Bastion controller's answer to {method} {path}: an empty array"
        try:
            site = self._request("GET", SITE[1]).json()
        except ApiError as e:
            why = f"HTTP {e.status}" if e.status is not None else "no answer"
            raise ApiError(f"{said}, and {SITE[0]} {SITE[1]} got no controller's answer "
                           f"({why})") from None  # fmt: skip
        except ValueError:
            raise ApiError(f"{said}, and the answer to {SITE[0]} {SITE[1]} is not JSON") from None
        if (problem := lacks(site, SITE[2])) is not None:
            raise ApiError(f"{said}, and the answer to {SITE[0]} {SITE[1]} is not a controller's: "
                           f"{problem}")  # fmt: skip
        self._controller_seen = True

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


# What a controller's answer holds, for each call the command line makes: what the commands
# read, and what says what was done. Checked in ApiClient.call, so that a server that answers
# `{}` or `[]` to everything (another service on that port) is one line naming what it lacks,
# not a KeyError in the command that reads it, nor "device on None" and a success. A dict is a
# JSON object with (at least) those keys, a one-item list an array of such items, `...` anything.
# An empty array holds none of it: the client then asks SITE once, which only a controller answers
# so. tests/controller/api/test_cli_answers.py checks each entry against the real application.
_PLAN = {"id": ..., "site": ..., "sync": ...,
         "changes": [{"machine": ..., "field": ..., "from": ..., "to": ...}],
         "actions": [{"machine": ..., "action": ..., "reason": ...}]}  # fmt: skip
_POWER = {"channel": ..., "held": ...}
_REPROVISION = {"changed": ..., "was_installed_at": ..., "event": ...}
ANSWERS: tuple[tuple[str, re.Pattern[str], Any], ...] = tuple(
    (method, re.compile(path.replace("{name}", "[^/]+")), shape) for method, path, shape in (
        ("GET", "/api/v1/operator", {"machines": [{"name": ..., "status": {"text": ...}}]}),
        ("GET", "/api/v1/plan", _PLAN),
        ("POST", "/api/v1/apply", {**_PLAN, "done": [{"machine": ..., "action": ...}]}),
        ("GET", "/api/v1/machines", [{"name": ..., "profile": ...}]),
        ("GET", "/api/v1/machines/{name}", {"name": ..., "profile": ...}),
        ("POST", "/api/v1/machines/{name}/reprovision", _REPROVISION),
        ("POST", "/api/v1/machines/{name}/hold", {"machine": ..., "hold": ...}),
        ("POST", "/api/v1/machines/{name}/release", {"machine": ..., "hold": ...}),
        ("POST", "/api/v1/machines/{name}/power", _POWER),
        ("POST", "/api/v1/device/power/{name}", _POWER),
        ("GET", "/api/v1/device", {"port": ..., "connected": ...}),
        ("GET", "/api/v1/ups", {"ups": ..., "phase": ...}),
        ("GET", "/api/v1/events", [{"id": ..., "ts": ..., "kind": ...}]),
    ))  # fmt: skip


# bastion.api.system's site status: what tells a controller when an answer is an empty array
SITE = ("GET", "/api/v1/site", {"name": ..., "generation": ..., "machines": ..., "profiles": ...,
                                "groups": ...})  # fmt: skip


def _kind(value: Any) -> str:
    """`value`'s JSON type, in words."""
    for types, words in ((dict, "an object"), (list, "an array"), (str, "a string"),
                         (bool, "true or false"), ((int, float), "a number")):  # fmt: skip
        if isinstance(value, types):
            return words
    return "null"


def lacks(value: Any, shape: Any, where: str = "") -> str | None:
    """The first thing `value` (decoded JSON) lacks of `shape` (as in ANSWERS), in words
    (`it has no 'id'`, `machines[0] has no 'status'`), or None when it has all of it."""
    if shape is ...:
        return None
    if isinstance(shape, list):
        if not isinstance(value, list):
            return f"{where or 'it'} is {_kind(value)}, not an array"
        problems = (lacks(item, shape[0], f"{where}[{i}]") for i, item in enumerate(value))
        return next((p for p in problems if p is not None), None)
    if not isinstance(value, dict):
        return f"{where or 'it'} is {_kind(value)}, not an object"
    for key, inner in shape.items():
        if key not in value:
            return f"{where or 'it'} has no {key!r}"
        if (problem := lacks(value[key], inner, f"{where}.{key}" if where else key)) is not None:
            return problem
    return None


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
