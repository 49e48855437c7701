"""What every `bastion assets fetch` shares: resumable downloads, a per-site lock, progress, and
files put in place atomically.

Nothing here knows which OS or firmware is fetched. A download goes to a ``.part`` file next to a
small ``.part.json`` holding the URL and the validator (ETag or Last-Modified) of the response that
started it; the next run continues it with ``Range: bytes=<size>-`` and ``If-Range`` (RFC 9110
14.2, 13.1.5), so a file that changed on the mirror meanwhile comes back whole. The callers check
what was downloaded (a signature, a pinned checksum) before anything reaches a served directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
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


_CONTENT_RANGE_RE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)")


def download_resumable(
    client: httpx.Client, url: str, part: Path, name: str, reporter: Reporter
) -> None:
    """Complete `part` with url's bytes, continuing what an earlier run left.

    The validator (ETag, else Last-Modified) of the response that started the file is kept next
    to it; the resuming request carries it as If-Range (RFC 9110 13.1.5), so a file that changed
    on the mirror comes back whole (200) instead of as a tail that does not fit. Its size is kept
    too: a tail (206) of a file of another size is refused and the part discarded, for a mirror
    that sent no validator (a changed file of the same size is left to the verification after).
    """
    check_url(url)
    meta_file = meta_path(part)
    have = part.stat().st_size if part.exists() else 0
    meta: dict = {}
    if have:
        with contextlib.suppress(OSError, ValueError):
            meta = json.loads(meta_file.read_text())
        if meta.get("url") != url:
            have, meta = 0, {}
    headers = {"Accept-Encoding": "identity"}  # byte offsets must be offsets into the file
    if have:
        headers["Range"] = f"bytes={have}-"
        validator = meta.get("etag") or meta.get("last_modified")
        if validator:
            headers["If-Range"] = validator
    written = have
    total: int | None = None
    try:
        with client.stream("GET", url, headers=headers) as r:
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
                total = int(m.group(3)) if m.group(3) != "*" else None
                begun = meta.get("total")
                if total is not None and isinstance(begun, int) and total != begun:
                    # Not the file this part was begun with, and nothing said so: a mirror that
                    # sent no validator to ask If-Range with (or ignores it). Its tail would not fit.
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
                    "total": total,
                }
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
        if not written:  # nothing came (offline, refused, a name that does not resolve)
            raise TransferInterrupted(
                f"{name}: could not download {url} ({type(e).__name__}: {e}); run the same "
                "command again once the mirror can be reached"
            ) from None
        of = f" of {total}" if total else ""
        raise TransferInterrupted(
            f"{name}: download interrupted after {written}{of} bytes ({type(e).__name__}: {e}); "
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
