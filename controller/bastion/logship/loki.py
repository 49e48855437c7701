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
(too old, malformed), so it is dropped, counted and reported rather than blocking the queue for
good. A 400 may refuse only some entries: Loki stores the others and its answer names each
refused one (`entry with timestamp ... ignored, reason: 'entry too far behind ...'`, up to its
`max_returned_errors`), then says how many, per stream (`user 'fake', total ignored: 3 out of 10
for stream: {...}`; `total ignored: 3 out of 10` before Loki 3). `ignored` reads that count:
only those count as refused, the rest as taken. An answer without a count (a malformed push, a
label Loki refuses) refuses the whole batch. Either way the batch leaves the queue: sent again,
the refused entries would be refused again.

A 429 may refuse only some entries too: past a stream's own rate (`per_stream_rate_limit`, when
the tenant's streams are not sharded, `shard_streams`), Loki's ingester stores the entries its
bucket allows and answers the rest as a 400 names them (`entry with timestamp <time> ignored,
reason: 'Per stream rate limit exceeded ...'`, then `total ignored: N out of M`). Those are to be
sent again later; the stored ones are not (Loki would drop them as duplicates, but only after
charging them to the stream's rate again). `stored_head` tells how many entries at the head of
the push were stored, where the answer allows telling: a push of one stream whose answer names
every refused entry (`max_returned_errors`, 10 by default, are named), and they are its last
ones, no entry before them at the same time. Otherwise it cannot be told, and the whole push is
sent again: Loki's ingester answers for the last stream of a push only (the others may have
been stored, or refused, unsaid), and the distributor's own 429 (the tenant's ingestion rate)
refuses the whole push.

Size. Loki takes a push only within its bounds, and some are for good: a line longer than
`max_line_size` (256 kB by default since Loki 3) is a 400; a push whose lines total more than
the tenant's `ingestion_burst_size_mb` (6 MB by default) is a 429 at every try, whatever the
rate; a proxy in front answers 413 past its own limit (nginx's default is 1 MiB). So a push is
bounded by its encoded bytes (`PUSH_MAX`, and by the records a batch reads), not by a count, and
each line by `LINE_MAX` bytes of UTF-8: a longer event is cut the way a syslog message is cut to
`max_message` (its payload replaced by `{"truncated": <length>, "head": <its start>}`; if that is
not enough, the whole event by `{"id": .., "truncated": .., "head": ..}`). An event is never too
big to be sent, and `batch` takes at least one. A 413, or a 429 to a push of many records, makes
the sender halve its bound (bastion.logship.shipper), so a smaller limit than ours is learned
rather than hit forever; one event that a 429 keeps refusing alone is sent cut to the least
bound the sender assumes every tenant's burst takes.

Credentials never travel in cleartext: `url_refusal` (the site schema's rule, bastion.site.schema
loki_url_refusal, applied again here) refuses `auth` over an http:// URL unless
its host is loopback (the collector on the controller's own host), and a URL with credentials
in it (`user:password@host`), which would sit in the site files (kept in git) and in any text
that names the URL.
"""

from __future__ import annotations

import base64
import calendar
import json
import re
import ssl
import time
import urllib.error
import urllib.request
from typing import Any

from bastion import __version__
from bastion.logship import longest
from bastion.site.schema import loki_url_refusal as url_refusal  # noqa: F401 (the shipper's name)

#: The most bytes of one push request's body. Below nginx's default client_max_body_size
#: (1 MiB) and far below Loki's default ingestion burst (6 MB, which should be at least "the
#: maximum logs size expected in a single push request", Loki's limits_config says).
PUSH_MAX = 1_000_000
#: The most bytes (UTF-8) of one line: Loki 3's default max_line_size, 256KB, which Loki reads
#: as 256,000 bytes. A longer line is a 400 for that entry.
LINE_MAX = 256_000

#: The most bytes of an error answer read: Loki names up to `max_returned_errors` (10 by default)
#: refused entries, a few hundred bytes each, before the count that ends the answer.
ANSWER_MAX = 65_536

_ENCODE = json.JSONEncoder(separators=(",", ":")).encode  # the body's own encoding: ASCII
# what a body and each of its streams cost besides their values: `{"streams":[]}` and
# `{"stream":<labels>,"values":[]}` with the commas between them
_BODY_BYTES = len('{"streams":[]}')
_STREAM_BYTES = len('{"stream":,"values":[]},')


def push_body(events: list[dict[str, Any]], *, site: str, labels: dict[str, str]) -> bytes:
    """The JSON push request for all of `events` (Event.as_dict()), in their order, unbounded."""
    return batch(events, site=site, labels=labels, max_bytes=None, line_max=None)[0]


def batch(events: list[dict[str, Any]], *, site: str, labels: dict[str, str], max_bytes: int | None = PUSH_MAX,
          line_max: int | None = LINE_MAX) -> tuple[bytes, int, list[Any]]:  # fmt: skip
    """The push request for the longest run of `events` from the first whose body is at most
    `max_bytes` (at least the first event, whose line is cut so that it fits alone), each line
    at most `line_max` bytes: (body, how many events it holds, the ids of those that were cut)."""
    streams: dict[tuple, dict[str, Any]] = {}
    size, taken, cut = _BODY_BYTES, 0, []
    for event in events:
        stream = {"job": "edge-bastion", **labels, "site": site,
                  "source": str(event.get("source") or "-"), "kind": str(event.get("kind") or "-")}  # fmt: skip
        key = tuple(sorted(stream.items()))
        ns = str(_nanoseconds(event.get("ts")))
        stream_cost = len(_ENCODE(stream)) + _STREAM_BYTES
        # the room a line has in a push of this event alone; `["<ns>",""],` is the value's own cost
        room = None if max_bytes is None else max_bytes - _BODY_BYTES - stream_cost - len(_ENCODE([ns, ""])) - 1
        line, was_cut = fit_line(event, line_max=line_max, encoded_max=room)
        cost = len(_ENCODE([ns, line])) + 1 + (0 if key in streams else stream_cost)
        if taken and max_bytes is not None and size + cost > max_bytes:
            break
        streams.setdefault(key, {"stream": stream, "values": []})["values"].append([ns, line])
        size += cost
        taken += 1
        if was_cut:
            cut.append(event.get("id"))
    return _ENCODE({"streams": list(streams.values())}).encode(), taken, cut


def fit_line(event: dict[str, Any], *, line_max: int | None, encoded_max: int | None) -> tuple[str, bool]:
    """The event's line, the event as JSON: at most `line_max` bytes of UTF-8 and at most
    `encoded_max` bytes as a JSON string in the body; and whether it had to be cut. A lone
    surrogate counts as the three bytes of U+FFFD, which Loki reads it as."""

    def fits(line: str) -> bool:
        return ((line_max is None or len(line.encode("utf-8", "surrogatepass")) <= line_max)
                and (encoded_max is None or len(_ENCODE(line)) - 2 <= encoded_max))  # fmt: skip

    whole = _json(event)
    if fits(whole):
        return whole, False
    text = _json(event.get("payload"))
    short = dict(event, payload={"truncated": len(text), "head": ""})
    if fits(_json(short)):
        return longest(lambda n: _json(dict(short, payload={"truncated": len(text), "head": text[:n]})),
                        len(text), fits), True  # fmt: skip
    # a field besides the payload is that long: the event's id (to find it in the history) and
    # the start of its JSON
    ident = event.get("id")
    base = {"id": ident} if isinstance(ident, int) and not isinstance(ident, bool) else {}
    return longest(lambda n: _json({**base, "truncated": len(whole), "head": whole[:n]}), len(whole), fits), True


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


def _nanoseconds(ts: Any) -> int:
    """An event's time (seconds, a float) as Loki's nanoseconds: whole microseconds, as the
    journal keeps them and syslog's TIMESTAMP says them (ts * 1e9 in floating point made .25 s
    into .249999872). A time that is not a number becomes now: a record that cannot be
    formatted would block the queue behind it for good."""
    try:
        return round(float(ts) * 1e6) * 1000
    except (TypeError, ValueError, OverflowError):
        return round(time.time() * 1e6) * 1000


_IGNORED = re.compile(r"total ignored: (\d+) out of \d+")
_IGNORED_OF = re.compile(r"total ignored: (\d+) out of (\d+)")
# Go's time.Time.String(): "2006-01-02 15:04:05.999999999 -0700 MST", the fraction's trailing
# zeros left out (and the fraction with them when it is 0)
_NAMED = re.compile(r"entry with timestamp (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)(?:\.(\d{1,9}))? ([+-])(\d\d)(\d\d) \S+ ignored")


def ignored(answer: str) -> int | None:
    """How many entries of a push Loki's error `answer` says it ignored: the sum of its
    `total ignored: N out of M` (one a stream); None when it gives no count."""
    counts = [int(n) for n in _IGNORED.findall(answer)]
    return sum(counts) if counts else None


def _named_ns(match: re.Match) -> int:
    when, fraction, sign, hours, minutes = match.groups()
    seconds = calendar.timegm(time.strptime(when, "%Y-%m-%d %H:%M:%S"))
    offset = (int(hours) * 3600 + int(minutes) * 60) * (1 if sign == "+" else -1)
    return (seconds - offset) * 1_000_000_000 + int((fraction or "").ljust(9, "0"))


def stored_head(answer: str, times: list[int]) -> int:
    """How many entries at the head of a push of one stream, whose entries had the times
    `times` (nanoseconds, in the push's order), Loki's partial refusal `answer` says it stored:
    0 unless the answer counts the push's entries (`total ignored: N out of len(times)`, once),
    names all N refused ones by their time, and those are the last N of the push with no entry
    before them at one of their times."""
    counts = _IGNORED_OF.findall(answer)
    if len(counts) != 1:
        return 0
    ignored, out_of = (int(n) for n in counts[0])
    if out_of != len(times) or not 0 < ignored < out_of:
        return 0
    named = sorted(_named_ns(m) for m in _NAMED.finditer(answer))
    head, tail = times[: out_of - ignored], times[out_of - ignored :]
    if named != sorted(tail) or set(head) & set(tail):
        return 0
    return len(head)


class LokiRejected(Exception):
    """Loki answered 4xx (not 401, 403, 429): the batch will never be taken. `ignored`: how
    many of its entries a 400 says were refused (the others were stored); None when it does not
    say, and then the whole batch was."""

    def __init__(self, message: str, *, ignored: int | None = None):
        super().__init__(message)
        self.ignored = ignored


class LokiTooLarge(LokiRejected):
    """Loki, or a proxy in front of it, answered 413: this push is too big; a smaller one may pass."""


class LokiBusy(OSError):
    """Loki answered 429: too much for now, or a push beyond the tenant's burst (never taken).
    `answer`: what it said (a partial refusal names what it refused: stored_head)."""

    def __init__(self, message: str, *, answer: str = ""):
        super().__init__(message)
        self.answer = answer


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
    `context`, default the system's CAs). Returns on 2xx; raises LokiTooLarge on 413,
    LokiRejected on another final refusal, LokiBusy on 429, OSError (urllib's errors are
    OSErrors) when Loki is unreachable, asks to retry, refuses the credentials or redirects."""
    req = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": f"edge-bastion/{__version__}", **(headers or {})})  # fmt: skip
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context), _NoRedirect)
    try:
        with opener.open(req, timeout=timeout) as resp:
            resp.read()
    except urllib.error.HTTPError as e:
        answer = e.read(ANSWER_MAX).decode(errors="replace").strip()
        detail = answer[:500]
        if 300 <= e.code < 400:
            raise OSError(f"HTTP {e.code}: redirected to {e.headers.get('Location')!r}, which is not "
                          "followed: put the final URL in site.yaml") from None  # fmt: skip
        if e.code == 413:
            raise LokiTooLarge(f"HTTP 413: {detail}") from None
        if e.code == 429:
            raise LokiBusy(f"HTTP 429: {detail}", answer=answer) from None
        if 400 <= e.code < 500 and e.code not in (401, 403):
            raise LokiRejected(f"HTTP {e.code}: {detail}", ignored=ignored(answer) if e.code == 400 else None) from None
        raise OSError(f"HTTP {e.code}: {detail}") from None
