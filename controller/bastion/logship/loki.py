"""Loki out: events as a push request to Loki's HTTP API (`POST /loki/api/v1/push`, JSON).

    {"streams": [{"stream": {"job": "edge-bastion", "site": "home-lab", "source": "device",
                             "kind": "dhcp", ...labels},
                  "values": [["<unix time in nanoseconds, as text>", "<the event as JSON>"], ...]}]}

Labels are few and bounded (Loki indexes them: a label per machine or per MAC would make a
stream per value): the site, the event's source and kind, and the target's own `labels`.
Everything else is in the line, the whole event as JSON, which LogQL's `| json` reads. Within a
stream the values keep the queue's order. Loki itself drops an entry that repeats one it has
(same stream, time and line), so a batch sent twice after a lost answer stores once.

A 2xx answer is Loki's acknowledgement: the batch may leave the queue. 429 and 5xx are retried
with backoff, and so are 401 and 403 (the credentials are wrong or missing, which says nothing
about the batch: it waits until they are put right) and a redirect, which is not followed (it
would carry the credentials elsewhere). Any other 4xx means Loki will never take that batch
(too old, too big, malformed), so it is dropped, counted and reported rather than blocking the
queue for good.
"""

from __future__ import annotations

import base64
import json
import ssl
import time
import urllib.error
import urllib.request
from typing import Any

from bastion import __version__


def push_body(events: list[dict[str, Any]], *, site: str, labels: dict[str, str]) -> bytes:
    """The JSON push request for `events` (Event.as_dict()), in their order."""
    streams: dict[tuple, dict[str, Any]] = {}
    for event in events:
        stream = {"job": "edge-bastion", **labels, "site": site,
                  "source": str(event.get("source") or "-"), "kind": str(event.get("kind") or "-")}  # fmt: skip
        key = tuple(sorted(stream.items()))
        entry = streams.setdefault(key, {"stream": stream, "values": []})
        line = json.dumps(event, separators=(",", ":"), ensure_ascii=False, default=str)
        entry["values"].append([str(_nanoseconds(event.get("ts"))), line])
    return json.dumps({"streams": list(streams.values())}, separators=(",", ":")).encode()


def _nanoseconds(ts: Any) -> int:
    """An event's time (seconds, a float) as Loki's nanoseconds: whole microseconds, as the
    journal keeps them and syslog's TIMESTAMP says them (ts * 1e9 in floating point made .25 s
    into .249999872). A time that is not a number becomes now: a record that cannot be
    formatted would block the queue behind it for good."""
    try:
        return round(float(ts) * 1e6) * 1000
    except (TypeError, ValueError, OverflowError):
        return round(time.time() * 1e6) * 1000


class LokiRejected(Exception):
    """Loki answered 4xx (not 429): the batch will never be taken."""


def auth_headers(*, tenant: str | None, auth: str | None, username: str | None,
                 secret: str | None) -> dict[str, str]:  # fmt: skip
    """The headers a push carries for a tenant (X-Scope-OrgID) and an authentication: basic
    (username and `secret`, the password) or bearer (`secret`, the token)."""
    headers = {}
    if tenant:
        headers["X-Scope-OrgID"] = tenant
    if auth == "basic":
        pair = f"{username}:{secret}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
    elif auth == "bearer":
        headers["Authorization"] = f"Bearer {secret}"
    return headers


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # urllib then raises the 3xx as an HTTPError


def push(url: str, body: bytes, *, headers: dict[str, str] | None = None,
         context: ssl.SSLContext | None = None, timeout: float = 10.0) -> None:  # fmt: skip
    """POST one push request (with `headers` besides the content type; over https with
    `context`, default the system's CAs). Returns on 2xx; raises LokiRejected on a final
    refusal, OSError (urllib's errors are OSErrors) when Loki is unreachable, asks to retry,
    refuses the credentials or redirects."""
    req = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": f"edge-bastion/{__version__}", **(headers or {})})  # fmt: skip
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context), _NoRedirect)
    try:
        with opener.open(req, timeout=timeout) as resp:
            resp.read()
    except urllib.error.HTTPError as e:
        detail = e.read(500).decode(errors="replace").strip()
        if 300 <= e.code < 400:
            raise OSError(f"HTTP {e.code}: redirected to {e.headers.get('Location')!r}, which is not "
                          "followed: put the final URL in site.yaml") from None  # fmt: skip
        if 400 <= e.code < 500 and e.code not in (401, 403, 429):
            raise LokiRejected(f"HTTP {e.code}: {detail}") from None
        raise OSError(f"HTTP {e.code}: {detail}") from None
