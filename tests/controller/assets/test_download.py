"""bastion.assets.download on its own: when a `.part` file may be continued, and what the messages
claim, against a file served from 127.0.0.1 in the ways a publisher's mirror may serve it
(chunked or with a length, with a strong, weak or no validator, honouring If-Range or not, and
breaking off on demand). Nothing is fetched from the internet.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from bastion.assets import download

SIZE = 600_000
# Date equal to Last-Modified: a date that may have changed twice within its second, so weak
# (RFC 9110 8.8.2.2); Date a minute later: strong.
SECOND = "Tue, 01 Dec 2026 10:00:00 GMT"
LATER = "Tue, 01 Dec 2026 10:01:00 GMT"


class Origin:
    """One file behind http.server on 127.0.0.1. A real class rather than a mock: the faults it
    stands for (a validator that misses a change, a server that ignores If-Range, a body that
    stops) are ones a well-behaved real server will not produce on demand."""

    def __init__(self) -> None:
        self.body = b""
        self.headers: dict[str, str] = {}  # ETag, Last-Modified, Date: sent with every answer
        self.chunked = False  # no Content-Length: Transfer-Encoding: chunked
        self.cut_after: int | None = None  # the next 200 stops after this many body bytes
        self.honours_if_range = True  # False: a Range is served whatever If-Range says
        self.bare_416 = False  # True: a 416 carries Content-Range only, no ETag or Last-Modified
        self.requests: list[dict[str, str]] = []
        self.url = ""

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        asked = {k.lower(): v for k, v in h.headers.items()}
        self.requests.append(asked)
        start, status = 0, 200
        m = re.fullmatch(r"bytes=(\d+)-", asked.get("range", ""))
        # If-Range compared as many servers do it, by the string (Starlette does).
        validators = (self.headers.get("ETag"), self.headers.get("Last-Modified"))
        if m and (not self.honours_if_range or asked.get("if-range", validators[0]) in validators):
            start, status = int(m.group(1)), 206
        if status == 206 and start >= len(self.body):
            # RFC 9110 15.5.17: nothing at or after that byte; the length in Content-Range.
            h.send_response_only(416)
            for k, v in ({} if self.bare_416 else self.headers).items():
                h.send_header(k, v)
            h.send_header("Content-Range", f"bytes */{len(self.body)}")
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        body = self.body[start:]
        h.send_response_only(status)  # no Date of its own: the test's, or none
        for k, v in self.headers.items():
            h.send_header(k, v)
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{len(self.body) - 1}/{len(self.body)}")
        h.send_header(*(("Transfer-Encoding", "chunked") if self.chunked
                        else ("Content-Length", str(len(body)))))  # fmt: skip
        h.end_headers()
        cut, self.cut_after = (self.cut_after, None) if status == 200 else (None, self.cut_after)
        sent = body if cut is None else body[:cut]
        for i in range(0, len(sent), 65536):
            piece = sent[i : i + 65536]
            h.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if self.chunked else piece)
        if cut is not None:  # the connection drops: no last chunk, fewer bytes than announced
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
        elif self.chunked:
            h.wfile.write(b"0\r\n\r\n")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # http.server's name
        self.server.origin.handle(self)

    def log_message(self, *args):
        pass


@pytest.fixture
def origin() -> Iterator[Origin]:
    o = Origin()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.origin = o
    o.url = f"http://127.0.0.1:{server.server_address[1]}/file"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield o
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


class Notes:
    def __init__(self) -> None:
        self.notes: list[str] = []

    def begin(self, *a): ...
    def advance(self, n): ...
    def end(self): ...

    def note(self, text: str) -> None:
        self.notes.append(text)


def get(origin: Origin, part, reporter: Notes | None = None) -> None:
    with httpx.Client(timeout=10) as client:
        download.download_resumable(client, origin.url, part, "file", reporter or Notes())


def interrupted(origin: Origin, part) -> int:
    """A first download that breaks off halfway; the size of the .part it leaves."""
    origin.cut_after = SIZE // 2
    with pytest.raises(download.TransferInterrupted, match="download interrupted after"):
        get(origin, part)
    have = part.stat().st_size
    assert 0 < have < SIZE
    return have


# -- when a .part may be continued (RFC 9110 13.1.5, 15.3.7.3) -------------------------------------


@pytest.mark.parametrize(
    "validators",
    [{}, {"ETag": 'W/"v1"'}, {"Last-Modified": SECOND, "Date": SECOND}],
    ids=["no-validator", "weak-etag", "last-modified-of-the-same-second"],
)
def test_a_chunked_download_without_a_strong_validator_starts_over_instead_of_splicing(
    origin, tmp_path, validators
):
    # The first answer had no length and nothing that could prove a later tail is of the same
    # file; the resume asked for the rest anyway and appended the tail of the changed file.
    part = tmp_path / "file.part"
    origin.chunked, origin.headers = True, validators
    origin.body = old = os.urandom(SIZE)
    interrupted(origin, part)
    origin.body = new = os.urandom(SIZE)  # changed on the mirror; its validators did not show it
    notes = Notes()
    get(origin, part, notes)
    assert "range" not in origin.requests[-1] and "if-range" not in origin.requests[-1]
    assert part.read_bytes() == new != old
    assert any("cannot be resumed" in n and "starting over" in n for n in notes.notes)


@pytest.mark.parametrize(
    "validators, if_range",
    [({"ETag": '"v1"'}, '"v1"'), ({"Last-Modified": SECOND, "Date": LATER}, SECOND)],
    ids=["strong-etag", "last-modified-a-minute-old"],
)
def test_a_chunked_download_with_a_strong_validator_resumes_where_it_stopped(
    origin, tmp_path, validators, if_range
):
    part = tmp_path / "file.part"
    origin.chunked, origin.headers = True, validators
    origin.body = os.urandom(SIZE)
    have = interrupted(origin, part)
    get(origin, part)
    assert origin.requests[-1]["range"] == f"bytes={have}-"
    assert origin.requests[-1]["if-range"] == if_range
    assert part.read_bytes() == origin.body


def test_a_tail_whose_etag_is_not_the_one_asked_for_is_not_appended(origin, tmp_path):
    # A server (or a cache before it) that answers a Range whatever If-Range says: the 206
    # carries the new file's ETag, so its bytes are not of the file the part was begun with.
    # The part was discarded and the fetch stopped ("run the command again"), though nothing
    # stood in the way of fetching the file whole there and then.
    part = tmp_path / "file.part"
    origin.chunked, origin.honours_if_range = True, False
    origin.headers = {"ETag": '"v1"'}
    origin.body = os.urandom(SIZE)
    interrupted(origin, part)
    origin.headers, origin.body = {"ETag": '"v2"'}, os.urandom(SIZE)
    asked = len(origin.requests)
    notes = Notes()
    get(origin, part, notes)
    resumed, whole = origin.requests[asked:]
    assert resumed["if-range"] == '"v1"' and "range" not in whole
    assert ('file: asked to resume "v1" and the mirror sent the rest of "v2", another version '
            "of the file; the partial file was discarded: starting over") in notes.notes  # fmt: skip
    assert part.read_bytes() == origin.body
    assert json.loads(download.meta_path(part).read_text())["etag"] == '"v2"'


def test_a_tail_of_a_file_of_another_size_is_not_appended_even_under_the_same_etag(
    origin, tmp_path
):
    part = tmp_path / "file.part"
    origin.honours_if_range, origin.headers = False, {"ETag": '"v1"'}
    origin.body = os.urandom(SIZE)
    have = interrupted(origin, part)
    # A server whose ETag missed the change, and that ignores If-Range.
    origin.body = os.urandom(SIZE + 1000)
    asked = len(origin.requests)
    notes = Notes()
    get(origin, part, notes)
    resumed, whole = origin.requests[asked:]
    assert resumed["range"] == f"bytes={have}-" and "range" not in whole
    assert (f"file: the mirror's file is now {SIZE + 1000} bytes, not the {SIZE} this partial "
            "file was begun with; the partial file was discarded: starting over") in notes.notes  # fmt: skip
    assert part.read_bytes() == origin.body


# -- the .part and its .part.json after a crash -----------------------------------------------------


class Crash(BaseException):
    """The process dying at that point (nothing catches a BaseException it does not know)."""


def test_a_crash_after_the_sidecar_is_rewritten_does_not_splice_two_versions(
    origin, tmp_path, monkeypatch
):
    # The sidecar naming the new version was written while the old version's bytes were still
    # in the .part; the next run resumed them with the new ETag and appended the new tail.
    part = tmp_path / "file.part"
    origin.headers, origin.body = {"ETag": '"v1"'}, os.urandom(SIZE)
    interrupted(origin, part)
    origin.headers, origin.body = {"ETag": '"v2"'}, os.urandom(SIZE)
    write_bytes = download.atomic.write_bytes

    def crash_after(*args, **kw):
        write_bytes(*args, **kw)
        raise Crash

    monkeypatch.setattr(download.atomic, "write_bytes", crash_after)
    with pytest.raises(Crash):
        get(origin, part)  # the mirror's 200 with "v2", and a crash right after the sidecar
    monkeypatch.undo()
    meta = json.loads(download.meta_path(part).read_text())
    assert meta["etag"] == '"v2"'
    assert not part.exists() or part.stat().st_size == 0  # nothing of "v1" under a "v2" sidecar
    get(origin, part)
    assert part.read_bytes() == origin.body


def _sidecar(part) -> dict:
    return json.loads(download.meta_path(part).read_text())


class CrashAfter(Notes):
    """A power cut once `at` bytes have come: the process stops where it stands."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.came = at, 0

    def advance(self, n: int) -> None:
        self.came += n
        if self.came >= self.at:
            raise Crash


def test_a_power_cut_mid_download_resumes_from_the_synced_length_not_from_damaged_bytes(
    origin, tmp_path, monkeypatch
):
    # The .part was fsynced only at the end: after a power cut its tail could be zeros, the
    # resume appended to them, and the whole file was refused as "corrupted or tampered with".
    monkeypatch.setattr(download, "DURABLE_EVERY", 100_000, raising=False)
    part = tmp_path / "file.part"
    origin.headers, origin.body = {"ETag": '"v1"'}, os.urandom(SIZE)
    with pytest.raises(Crash):
        get(origin, part, CrashAfter(400_000))
    synced = _sidecar(part).get("durable", 0)
    written = part.stat().st_size
    assert written >= 400_000
    # What the page cache had not written when the power went: zeros on disk.
    with open(part, "r+b") as f:
        f.seek(synced)
        f.write(bytes(written - synced))
    notes = Notes()
    get(origin, part, notes)
    assert part.read_bytes() == origin.body
    assert 0 < synced <= written  # a length was recorded before the cut, and resumed from
    assert origin.requests[-1]["range"] == f"bytes={synced}-"


def test_a_part_longer_than_its_synced_length_is_cut_back_before_it_is_resumed(origin, tmp_path):
    part = tmp_path / "file.part"
    origin.headers, origin.body = {"ETag": '"v1"'}, os.urandom(SIZE)
    have = interrupted(origin, part)  # a broken connection syncs what came, and records it
    with open(part, "ab") as f:  # bytes that never reached the disk whole
        f.write(os.urandom(50_000))
    notes = Notes()
    get(origin, part, notes)
    assert part.read_bytes() == origin.body
    assert origin.requests[-1]["range"] == f"bytes={have}-"
    assert _sidecar(part)["durable"] == SIZE
    assert (f"file: cut the partial file back to the {have:,} bytes recorded as synced to disk: "
            "the 50,000 written after them may be damaged") in notes.notes[0]  # fmt: skip


def test_a_part_whose_sidecar_records_no_synced_length_starts_over(origin, tmp_path):
    # A sidecar an older bastion left: the part's size is all it says, and that size may
    # include bytes a power cut damaged.
    part = tmp_path / "file.part"
    origin.headers, origin.body = {"ETag": '"v1"'}, os.urandom(SIZE)
    interrupted(origin, part)
    meta = _sidecar(part)
    meta.pop("durable", None)
    download.meta_path(part).write_text(json.dumps(meta))
    notes = Notes()
    get(origin, part, notes)
    assert "range" not in origin.requests[-1]
    assert part.read_bytes() == origin.body
    assert any("cannot be resumed (nothing records how much of it reached the disk whole)" in n
               for n in notes.notes)  # fmt: skip


# -- a 416 to a resume (RFC 9110 15.5.17) -----------------------------------------------------------


def complete_part(origin: Origin, part) -> bytes:
    """A part with every byte whose run stopped before its caller verified it."""
    get(origin, part)
    assert part.read_bytes() == origin.body and download.meta_path(part).exists()
    return origin.body


@pytest.mark.parametrize("bare", [False, True], ids=["with-etag", "content-range-only"])
def test_a_416_of_the_same_file_and_length_means_the_part_is_complete(origin, tmp_path, bare):
    part = tmp_path / "file.part"
    origin.headers, origin.body = {"ETag": '"v1"'}, os.urandom(SIZE)
    body = complete_part(origin, part)
    origin.bare_416 = bare
    get(origin, part)
    assert origin.requests[-1]["range"] == f"bytes={SIZE}-"  # answered 416, nothing more asked
    assert len(origin.requests) == 2
    assert part.read_bytes() == body


def test_a_416_naming_another_etag_is_not_taken_as_complete(origin, tmp_path):
    # A server that ignores If-Range answered the resume of a complete part with 416 and the
    # new file's ETag; the part was taken as complete, and its old bytes failed verification.
    part = tmp_path / "file.part"
    origin.headers, origin.body = {"ETag": '"v1"'}, os.urandom(SIZE)
    complete_part(origin, part)
    origin.honours_if_range = False
    origin.headers, origin.body = {"ETag": '"v2"'}, os.urandom(SIZE)  # same size, new bytes
    notes = Notes()
    get(origin, part, notes)
    assert part.read_bytes() == origin.body
    assert "range" not in origin.requests[-1]
    assert (f"file: the mirror refused to resume at byte {SIZE:,} (HTTP 416), and its file is "
            '"v2", not the "v1" the partial file was begun with: the partial file was '
            "discarded; starting over") in notes.notes  # fmt: skip


def test_a_416_for_a_file_of_another_length_fetches_it_again_at_once(origin, tmp_path):
    # It discarded the part and stopped ("run the command again"), though nothing stood in the
    # way of fetching the file whole there and then.
    part = tmp_path / "file.part"
    origin.headers, origin.body = {"ETag": '"v1"'}, os.urandom(SIZE)
    complete_part(origin, part)
    origin.honours_if_range, origin.bare_416 = False, True
    origin.body = os.urandom(SIZE - 1000)  # shorter now: bytes=SIZE- is past its end
    notes = Notes()
    get(origin, part, notes)
    assert part.read_bytes() == origin.body
    assert any(f"its file is {SIZE - 1000:,} bytes, not the {SIZE:,} of the partial file" in n
               for n in notes.notes)  # fmt: skip


# -- what the messages claim -------------------------------------------------------------------------


def test_a_mirror_that_answers_and_then_sends_nothing_is_not_called_unreachable(origin, tmp_path):
    # It said "run the same command again once the mirror can be reached": the mirror had
    # answered, with a status and headers, and the body broke off.
    part = tmp_path / "file.part"
    origin.headers, origin.body = {"ETag": '"v1"'}, os.urandom(SIZE)
    origin.cut_after = 0
    with pytest.raises(download.TransferInterrupted) as e:
        get(origin, part)
    said = str(e.value)
    assert "reach" not in said
    assert (f"file: {origin.url} answered HTTP 200, then the connection broke before any byte of "
            "the file came (RemoteProtocolError:") in said  # fmt: skip
