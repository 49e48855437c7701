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
before the sidecar for the new one is written. The sidecar also records how many of the part's
bytes are durable (fsynced before the sidecar said so, every `DURABLE_EVERY` bytes and when the
transfer ends or breaks off); a resume continues from that length and cuts off the rest, which a
power cut may have left as zeros or garbage. What a fetch of one version staged is discarded by
the next fetch of another version of the same thing (`discard_abandoned`).
"""

from __future__ import annotations

import contextlib
import email.utils
import errno
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
# What a power cut may cost a download at most: every DURABLE_EVERY bytes the .part is fsynced
# and its sidecar records that length as "durable"; the next run resumes from there and cuts off
# whatever lies beyond it (bytes the page cache had not written yet can come back as zeros).
DURABLE_EVERY = 16 << 20
# On a full disk the sidecar's new copy needs a block: the part gives back this much of its tail.
ROOM_FOR_SIDECAR = 64 << 10


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
    If-Range) is refused, the part discarded and the file fetched whole in the same run.

    A resume continues from the length the sidecar records as durable, never from the part's
    size: what was appended after the last fsync may be zeros or garbage after a power cut, and
    is cut off first. A 416 means the part is complete only when the mirror's length is the
    part's and no validator of another version comes with it; otherwise the part is begun again.
    """
    check_url(url)
    if _download(client, url, part, name, reporter):
        return
    # The mirror showed the part to be of another version of the file (a 206 or 416 naming
    # another validator or length), and the part is gone: the file is fetched whole in this
    # run, once. That request carries no Range, so it cannot be answered that way again; if
    # it somehow were, the file is changing under the fetch, and another round would not help.
    if not _download(client, url, part, name, reporter):
        raise TransferInterrupted(
            f"{name}: {url} changed again while it was being fetched afresh after a change; "
            "nothing of it was kept: run the command again once the mirror's file is settled"
        )


def _read_meta(meta_file: Path) -> dict:
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _durable_of(meta: dict) -> int | None:
    n = meta.get("durable")
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else None


def _sync(fd: int, meta_file: Path, meta: dict, length: int) -> int:
    """Make the part's first `length` bytes durable, then record that in the sidecar; `length`.

    In this order: a crash between the two leaves the sidecar's older, smaller length, which
    is still true. The sidecar is replaced atomically, so it is always one whole record."""
    os.fsync(fd)
    meta["durable"] = length
    atomic.write_bytes(meta_file, json.dumps(meta).encode())
    return length


def _keep_what_came(fd: int, meta_file: Path, meta: dict, written: int, durable: int) -> int:
    """After an interruption the process survived: record every byte that came as durable, so
    the next run resumes from all of them; the length recorded (the last one when this fails).

    On a full disk the sidecar's new copy has no block to go to; the part gives back the tail
    it wrote last (`ROOM_FOR_SIDECAR`), so that the rest can be recorded and is not lost."""
    if written == durable:
        return durable
    try:
        return _sync(fd, meta_file, meta, written)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            return durable
    keep = max(durable, written - ROOM_FOR_SIDECAR)
    try:
        os.ftruncate(fd, keep)
        return _sync(fd, meta_file, meta, keep) if keep != durable else durable
    except OSError:
        return durable


def _other_version(r: httpx.Response, meta: dict, validator: str) -> str | None:
    """The validator r names when it is not the one If-Range asked for (RFC 9110 15.3.7, 15.5.17:
    a 206 or 416 carries the ETag and Last-Modified its 200 would); None when it names none."""
    field = "etag" if validator == meta.get("etag") else "last-modified"
    now = r.headers.get(field)
    return now if now is not None and now != validator else None


def _download(client: httpx.Client, url: str, part: Path, name: str, reporter: Reporter) -> bool:
    """download_resumable's one request; False when the answer to a resume (a 416, or a 206 of
    another version) made it discard the part, so the file is to be fetched whole."""
    meta_file = meta_path(part)
    size = part.stat().st_size if part.exists() else 0
    meta = _read_meta(meta_file) if size else {}
    if meta.get("url") != url:
        meta = {}
    have = 0
    if meta:
        durable = _durable_of(meta)
        if durable is None:
            # A sidecar from before lengths were recorded: nothing shows which bytes are whole.
            reporter.note(
                f"{name}: the partial file cannot be resumed (nothing records how much of it "
                "reached the disk whole); starting over"
            )
            meta = {}
        else:
            have = min(size, durable)
            if size > have:
                reporter.note(
                    f"{name}: cut the partial file back to the {have:,} bytes recorded as "
                    f"synced to disk: the {size - have:,} written after them may be damaged "
                    "by the crash or power cut that stopped the last run"
                )
                try:
                    os.truncate(part, have)
                except OSError as e:
                    raise TransferInterrupted(
                        f"{name}: cannot cut {part} back to {have} bytes ({e.strerror or e}): "
                        "make its directory writable and run the same command again"
                    ) from None
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
    written = durable = have
    total: int | None = None
    answered: int | None = None  # the status of the response, once one came
    try:
        with client.stream("GET", url, headers=headers) as r:
            answered = r.status_code
            check_still_https(url, r)
            if r.status_code == 404:
                raise ReleaseNotFound(f"{name}: not found at {url} (HTTP 404)")
            if r.status_code == 416 and have:
                why = _not_complete(r, meta, validator, have)
                if why is None:
                    return True  # the earlier run had every byte; it stopped before verifying
                unlink(part, meta_file)
                reporter.note(
                    f"{name}: the mirror refused to resume at byte {have:,} (HTTP 416), and "
                    f"{why}: the partial file was discarded; starting over"
                )
                return False
            if r.status_code == 206 and have:
                m = _CONTENT_RANGE_RE.fullmatch(r.headers.get("content-range", "").strip())
                if not m or m.group(1) is None or int(m.group(1)) != have:
                    raise FetchError(
                        f"{url}: asked for bytes {have}- and got Content-Range "
                        f"{r.headers.get('content-range')!r}"
                    )
                # A 206 naming another validator than If-Range asked for is a tail of another
                # version, sent by a server (or a cache before it) that served the Range without
                # evaluating If-Range.
                now = _other_version(r, meta, validator)
                if now is not None:
                    unlink(part, meta_file)
                    reporter.note(
                        f"{name}: asked to resume {validator} and the mirror sent the rest of "
                        f"{now}, another version of the file; the partial file was discarded: "
                        "starting over"
                    )
                    return False
                total = int(m.group(3)) if m.group(3) != "*" else None
                begun = meta.get("total")
                if total is not None and isinstance(begun, int) and total != begun:
                    # Not the file this part was begun with, though the server answered If-Range
                    # with a tail: it ignores If-Range. That tail would not fit.
                    unlink(part, meta_file)
                    reporter.note(
                        f"{name}: the mirror's file is now {total} bytes, not the {begun} this "
                        "partial file was begun with; the partial file was discarded: starting "
                        "over"
                    )
                    return False
                fresh = False
            elif r.status_code == 200:
                if have:
                    reporter.note(
                        f"{name}: the mirror sent the whole file again (it changed, or the "
                        "mirror does not resume); starting over"
                    )
                have = written = durable = 0
                length = r.headers.get("content-length")
                total = int(length) if length and length.isascii() and length.isdigit() else None
                fresh = True
                meta = {
                    "url": url,
                    "etag": r.headers.get("etag"),
                    "last_modified": r.headers.get("last-modified"),
                    "date": r.headers.get("date"),
                    "total": total,
                    "durable": 0,
                }
                # The old bytes go before the sidecar that describes the new ones is written: a
                # crash in between must not leave a sidecar vouching for another version's bytes.
                # ("durable": 0 vouches for none of them either way.)
                unlink(part)
                atomic.write_bytes(meta_file, json.dumps(meta).encode())
            else:
                raise FetchError(f"{url}: HTTP {r.status_code}")
            if total is not None and total > DOWNLOAD_LIMIT:
                unlink(part, meta_file)
                raise FetchError(_too_big(name, url, f"announces {total} bytes"))
            reporter.begin(name, total, have)
            # A resume opens the part it measured, never a new one: a hole before `have`
            # would read as zeros.
            fd = os.open(part, os.O_WRONLY | (os.O_CREAT | os.O_TRUNC if fresh else 0), 0o666)
            try:
                os.lseek(fd, have, os.SEEK_SET)
                for chunk in r.iter_raw(CHUNK):
                    if written + len(chunk) > DOWNLOAD_LIMIT:
                        os.close(fd)
                        fd = -1
                        unlink(part, meta_file)
                        raise FetchError(
                            _too_big(name, url, f"sent more than {DOWNLOAD_LIMIT} bytes")
                        )
                    view = memoryview(chunk)
                    while view:  # os.write may take less than all (a disk filling up)
                        n = os.write(fd, view)
                        written += n
                        view = view[n:]
                    reporter.advance(len(chunk))
                    if written - durable >= DURABLE_EVERY:
                        durable = _sync(fd, meta_file, meta, written)
                if written != durable:
                    durable = _sync(fd, meta_file, meta, written)
            except (OSError, httpx.HTTPError, KeyboardInterrupt):
                if fd >= 0:
                    durable = _keep_what_came(fd, meta_file, meta, written, durable)
                raise
            finally:
                if fd >= 0:
                    os.close(fd)
                reporter.end()
    except OSError as e:  # the disk is full, the directory read-only: the part is as it was
        kept = durable if part.exists() else 0
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
    return True


def _not_complete(r: httpx.Response, meta: dict, validator: str, have: int) -> str | None:
    """Why a 416 to `Range: bytes=<have>-` does not show the part to be the whole file; None
    when it does: RFC 9110 15.5.17's `Content-Range: bytes */<length>` names the part's length,
    the one the part was begun with if that was known, and no other validator comes with it.

    A server that evaluates If-Range answers 416 only when the validator matched (else it sends
    the whole file), so a 416 without ETag or Last-Modified is taken at its length; one that
    names another validator is from a server that ignores If-Range, about another version."""
    cr = r.headers.get("content-range")
    m = _CONTENT_RANGE_RE.fullmatch((cr or "").strip())
    if not m or m.group(1) is not None or m.group(3) == "*":
        return f"gave no length of its file (Content-Range {cr!r})"
    length = int(m.group(3))
    if length != have:
        return f"its file is {length:,} bytes, not the {have:,} of the partial file"
    begun = meta.get("total")
    if isinstance(begun, int) and begun != length:
        return f"its file is {length:,} bytes, not the {begun:,} the partial file was begun with"
    now = _other_version(r, meta, validator)
    if now is not None:
        return f"its file is {now}, not the {validator} the partial file was begun with"
    return None


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
