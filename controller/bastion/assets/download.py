"""What every `bastion assets fetch` shares: resumable downloads, a per-site lock, progress, and
files put in place atomically.

Nothing here knows which OS or firmware is fetched. A download goes to a ``.part`` file next to a
small ``.part.json`` holding the URL and the strong validator (ETag, else Last-Modified) of the
response that started it; the next run continues it with ``Range: bytes=<size>-`` and ``If-Range``
(RFC 9110 14.2, 13.1.5), so a file that changed on the mirror meanwhile comes back whole. Parts
are combined only under one strong validator (RFC 9110 15.3.7.3): a part begun without one is
begun again, never continued on trust. The callers check what was downloaded (a signature, a
pinned checksum) before anything reaches a served directory.

The pair on disk stays consistent under a crash at any point: a .part is only ever appended to
under the sidecar that describes it, and when a download starts over the old .part is removed
before the sidecar for the new one is written. What a fetch of one version staged is discarded
by the next fetch of another version of the same thing (`discard_abandoned`).
"""

from __future__ import annotations

import contextlib
import email.utils
import fcntl
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import httpx

from bastion import atomic

# Small files (version.txt, .sig) are a few hundred bytes; a mirror that sends more is refused.
SMALL_FILE_LIMIT = 1 << 20
# The biggest file a release may have: Flatcar's PXE image is about 500 MB, k3s 70 MB, the Pi's
# firmware a few MB. A mirror that sends (or announces) more is refused and what came is
# deleted: a body that never ends would otherwise fill the disk before its checksum is looked at.
DOWNLOAD_LIMIT = 4 << 30
CHUNK = 256 * 1024


def new_client() -> httpx.Client:
    """The HTTP client a fetch uses when the caller gives none."""
    return httpx.Client(
        follow_redirects=True,  # release servers redirect to their CDNs
        timeout=httpx.Timeout(30.0, read=120.0),
        headers={"User-Agent": "edge-bastion assets fetch"},
    )


# -- errors: each says what happened to which file and what to do ---------------------------------


class FetchError(Exception):
    """A fetch that did not complete; str() is the message for the user."""


def check_url(url: str) -> None:
    """FetchError for a URL httpx cannot parse (a --mirror of 'http://[::1' was a traceback)."""
    try:
        httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as e:
        raise FetchError(f"{url}: not a URL: {e}") from None


def check_still_https(url: str, r: httpx.Response) -> None:
    """FetchError when a request made over HTTPS was redirected to plain http:// on its way to r.

    What is checked against a sums file or a pinned hash is only as good as the connection it
    came over; release servers redirect to their CDNs, and that stays on HTTPS. Every hop is
    looked at: a plain one could have sent the rest of the chain anywhere."""
    if httpx.URL(url).scheme != "https":
        return  # a mirror given as http:// is the user's choice
    for hop in [*r.history[1:], r]:
        if hop.url.scheme != "https":
            raise FetchError(
                f"{url}: redirected to {hop.url}, not over HTTPS; refused (a download that "
                "starts on HTTPS must stay on it): check the mirror (--mirror)"
            )


class ReleaseNotFound(FetchError):
    pass


class TransferInterrupted(FetchError):
    """The connection failed mid-file; the .part file is kept and the next run resumes it."""


# -- progress ----------------------------------------------------------------------------------------


class Reporter(Protocol):
    """What the CLI shows while fetching: a progress bar per file, and notes."""

    def begin(self, name: str, total: int | None, done: int) -> None: ...
    def advance(self, n: int) -> None: ...
    def end(self) -> None: ...
    def note(self, text: str) -> None: ...


class SilentReporter:
    def begin(self, name: str, total: int | None, done: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def end(self) -> None:
        pass

    def note(self, text: str) -> None:
        pass


# -- the lock and small files ---------------------------------------------------------------------


@contextlib.contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FetchError(
                f"another `bastion assets fetch` is running for this site ({lock_path} is locked)"
            ) from None
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def fetching(site: Path, client: httpx.Client | None) -> Iterator[tuple[Path, httpx.Client]]:
    """A fetch's workspace and HTTP client: the site's var/assets-fetch/ (made if missing), locked
    against another `bastion assets fetch` for the site, and `client`, or, when none is given, a
    new one that is closed on the way out (a given client stays the caller's to close)."""
    work = site / "var" / "assets-fetch"
    work.mkdir(parents=True, exist_ok=True)
    http = client or new_client()
    try:
        with exclusive(work / ".lock"):
            yield work, http
    finally:
        if client is None:
            http.close()


def get_small(client: httpx.Client, url: str) -> bytes | None:
    """The body of a small file, None on 404; FetchError on anything else."""
    check_url(url)
    try:
        with client.stream("GET", url) as r:
            check_still_https(url, r)
            if r.status_code == 404:
                return None
            if r.status_code != 200:
                raise FetchError(f"{url}: HTTP {r.status_code}")
            body = b""
            for chunk in r.iter_bytes():
                body += chunk
                if len(body) > SMALL_FILE_LIMIT:
                    raise FetchError(f"{url}: larger than {SMALL_FILE_LIMIT} bytes; refused")
            return body
    except httpx.HTTPError as e:
        raise FetchError(f"{url}: {type(e).__name__}: {e}") from None


# -- resumable download -----------------------------------------------------------------------------


def meta_path(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def unlink(*paths: Path) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def discard_abandoned(versions: Path, keep: str, what: str, reporter: Reporter) -> None:
    """Remove what is staged under `versions` (a directory per version) for any version but
    `keep`, naming each in a note. A fetch of another version abandons them: no later run would
    resume them or remove them, and a Flatcar initrd's .part alone is up to 500 MB. Call it
    under the lock (`fetching`)."""
    try:
        staged = sorted(versions.iterdir())
    except OSError:  # nothing staged yet
        return
    for d in staged:
        if d.name == keep:
            continue
        if d.is_dir() and not d.is_symlink():
            shutil.rmtree(d, ignore_errors=True)
        else:
            unlink(d)
        reporter.note(f"discarded {d}, what an unfinished fetch of {what} {d.name} left: "
                      f"this fetch is of {keep}")  # fmt: skip


_CONTENT_RANGE_RE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)")
# RFC 9110 8.8.3: a strong entity tag is a quoted opaque tag with no W/ in front.
_STRONG_ETAG_RE = re.compile(r'"[^"\x00-\x20\x7f]*"')


def _http_date(text: str | None) -> int | None:
    parsed = email.utils.parsedate_tz(text) if text else None
    return email.utils.mktime_tz(parsed) if parsed else None


def if_range_validator(meta: dict) -> str | None:
    """What a resuming request may carry as If-Range for the response a sidecar recorded; None
    when nothing could prove that a range sent later is of the same representation.

    RFC 9110 13.1.5: never a weak entity tag, and a date only when the response had no entity
    tag at all and the date is strong, which 8.8.2.2 lets a client deduce when the response's
    Date is at least a second after its Last-Modified (the response was made after the second
    that Last-Modified names had ended, so no other version of the file can carry that date)."""
    etag = meta.get("etag")
    if etag:
        return etag if isinstance(etag, str) and _STRONG_ETAG_RE.fullmatch(etag) else None
    modified, date = meta.get("last_modified"), meta.get("date")
    if not isinstance(modified, str) or not isinstance(date, str):
        return None
    at, sent = _http_date(modified), _http_date(date)
    return modified if at is not None and sent is not None and sent - at >= 1 else None


def download_resumable(
    client: httpx.Client, url: str, part: Path, name: str, reporter: Reporter
) -> None:
    """Complete `part` with url's bytes, continuing what an earlier run left.

    The ETag, Last-Modified and Date of the response that started the file are kept next to it;
    the resuming request carries a strong validator made of them as If-Range (RFC 9110 13.1.5),
    so a file that changed on the mirror comes back whole (200) instead of as a tail that does
    not fit. A part whose response gave no strong validator is begun again: a Range without
    If-Range would take the tail of whatever the mirror holds now. A tail (206) that names
    another validator or another size than the part was begun with (a server that ignores
    If-Range) is refused and the part discarded.
    """
    check_url(url)
    meta_file = meta_path(part)
    have = part.stat().st_size if part.exists() else 0
    meta: dict = {}
    if have:
        with contextlib.suppress(OSError, ValueError):
            meta = json.loads(meta_file.read_text())
        if not isinstance(meta, dict) or meta.get("url") != url:
            have, meta = 0, {}
    validator = if_range_validator(meta) if have else None
    if have and validator is None:
        # RFC 9110 15.3.7.3: parts may be combined only when they share one strong validator.
        reporter.note(
            f"{name}: the partial file cannot be resumed (the mirror gave it no strong ETag or "
            "Last-Modified to ask If-Range with, so nothing would show that the rest is of the "
            "same file); starting over"
        )
        have, meta = 0, {}
    headers = {"Accept-Encoding": "identity"}  # byte offsets must be offsets into the file
    if have:
        headers["Range"] = f"bytes={have}-"
        headers["If-Range"] = validator
    written = have
    total: int | None = None
    answered: int | None = None  # the status of the response, once one came
    try:
        with client.stream("GET", url, headers=headers) as r:
            answered = r.status_code
            check_still_https(url, r)
            if r.status_code == 404:
                raise ReleaseNotFound(f"{name}: not found at {url} (HTTP 404)")
            if r.status_code == 416 and have:
                m = _CONTENT_RANGE_RE.fullmatch(r.headers.get("content-range", "").strip())
                if m and m.group(3) != "*" and int(m.group(3)) == have:
                    return  # the earlier run had every byte; it stopped before verifying
                unlink(part, meta_file)
                raise TransferInterrupted(
                    f"{name}: the mirror refused to resume at byte {have}; the partial file was "
                    "discarded: run the command again to start it afresh"
                )
            if r.status_code == 206 and have:
                m = _CONTENT_RANGE_RE.fullmatch(r.headers.get("content-range", "").strip())
                if not m or m.group(1) is None or int(m.group(1)) != have:
                    raise FetchError(
                        f"{url}: asked for bytes {have}- and got Content-Range "
                        f"{r.headers.get('content-range')!r}"
                    )
                # RFC 9110 15.3.7: a 206 carries the ETag and Last-Modified its 200 would. One
                # that is not what If-Range asked for is a tail of another version, sent by a
                # server (or a cache before it) that served the Range without evaluating If-Range.
                field = "etag" if validator == meta.get("etag") else "last-modified"
                now = r.headers.get(field)
                if now is not None and now != validator:
                    unlink(part, meta_file)
                    raise TransferInterrupted(
                        f"{name}: asked to resume {validator} and the mirror sent the rest of "
                        f"{now}, another version of the file; the partial file was discarded: "
                        "run the command again to start it afresh"
                    )
                total = int(m.group(3)) if m.group(3) != "*" else None
                begun = meta.get("total")
                if total is not None and isinstance(begun, int) and total != begun:
                    # Not the file this part was begun with, though the server answered If-Range
                    # with a tail: it ignores If-Range. That tail would not fit.
                    unlink(part, meta_file)
                    raise TransferInterrupted(
                        f"{name}: the mirror's file is now {total} bytes, not the {begun} this "
                        "partial file was begun with; the partial file was discarded: run the "
                        "command again to start it afresh"
                    )
                mode = "ab"
            elif r.status_code == 200:
                if have:
                    reporter.note(
                        f"{name}: the mirror sent the whole file again (it changed, or the "
                        "mirror does not resume); starting over"
                    )
                have = written = 0
                length = r.headers.get("content-length")
                total = int(length) if length and length.isascii() and length.isdigit() else None
                mode = "wb"
                meta = {
                    "url": url,
                    "etag": r.headers.get("etag"),
                    "last_modified": r.headers.get("last-modified"),
                    "date": r.headers.get("date"),
                    "total": total,
                }
                # The old bytes go before the sidecar that describes the new ones is written: a
                # crash in between must not leave a sidecar vouching for another version's bytes.
                unlink(part)
                atomic.write_bytes(meta_file, json.dumps(meta).encode())
            else:
                raise FetchError(f"{url}: HTTP {r.status_code}")
            if total is not None and total > DOWNLOAD_LIMIT:
                unlink(part, meta_file)
                raise FetchError(_too_big(name, url, f"announces {total} bytes"))
            reporter.begin(name, total, have)
            try:
                with open(part, mode) as out:
                    for chunk in r.iter_raw(CHUNK):
                        if written + len(chunk) > DOWNLOAD_LIMIT:
                            out.close()
                            unlink(part, meta_file)
                            raise FetchError(_too_big(name, url, f"sent more than {DOWNLOAD_LIMIT} bytes"))
                        out.write(chunk)
                        written += len(chunk)
                        reporter.advance(len(chunk))
                    out.flush()
                    os.fsync(out.fileno())
            finally:
                reporter.end()
    except OSError as e:  # the disk is full, the directory read-only: the part is as it was
        kept = part.stat().st_size if part.exists() else 0
        raise TransferInterrupted(
            f"{name}: cannot write {part} after {kept} bytes ({e.strerror or e}); the partial "
            "file is kept: make room and run the same command again to resume"
        ) from None
    except httpx.HTTPError as e:
        why = f"{type(e).__name__}: {e}"
        if not written and answered is None:  # refused, a name that does not resolve, TLS
            raise TransferInterrupted(
                f"{name}: could not download {url} ({why}): no answer came from the mirror; "
                "run the same command again once it answers"
            ) from None
        if not written:  # the mirror answered, and then its body did not come
            raise TransferInterrupted(
                f"{name}: {url} answered HTTP {answered}, then the connection broke before any "
                f"byte of the file came ({why}); run the same command again"
            ) from None
        of = f" of {total}" if total else ""
        raise TransferInterrupted(
            f"{name}: download interrupted after {written}{of} bytes ({why}); "
            "the partial file is kept: run the same command again to resume"
        ) from None
    if total is not None and written != total:
        raise TransferInterrupted(
            f"{name}: the mirror sent {written} of {total} bytes; the partial file is kept: "
            "run the same command again to resume"
        )


def _too_big(name: str, url: str, what: str) -> str:
    return (f"{name}: {url} {what}, more than any release file ({DOWNLOAD_LIMIT}): refused, "
            "and nothing of it kept; check the mirror")  # fmt: skip


# -- files ---------------------------------------------------------------------------------------------


def sha256_of(path: Path) -> str | None:
    try:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except OSError:
        return None
