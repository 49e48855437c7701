"""Fetch a k3s release's binaries into a site's assets/, checked against the release's own sums.

Theory of operation
-------------------
k3s publishes each release on GitHub, ``https://github.com/k3s-io/k3s/releases/download/<v>/``
(``<v>`` such as ``v1.31.4+k3s1``; the ``+`` is ``%2B`` in the URL, as GitHub's own links have
it): the binary per architecture (``k3s`` for amd64, ``k3s-arm64``) and per architecture a sums
file, ``sha256sum-<arch>.txt``, in sha256sum's format (``<hex>  <name>`` lines) naming that
binary and the release's other files. For each architecture we read the sums file, take the
binary's line, download the binary (resumable, through bastion.assets.download), and keep it
only if its SHA-256 is that line's. The sums file comes from the same release over HTTPS: it
catches a damaged, truncated or swapped download and records what the nodes must get, so that no
one copies hashes by hand; it is not a signature (k3s publishes none we could pin).

Nothing unchecked reaches assets/: downloads go to ``<site>/var/assets-fetch/k3s/<v>/`` as
``.part`` files and move into assets/ only once their checksum matches; a mismatch deletes the
download. The manifest is written last, atomically, and is what ``bastion site check`` and the
controller read (bastion.cluster.plan.recorded_sha256): the nodes' Ignition checks the binary
against the recorded SHA-256 before anything runs.

On disk, under ``<site>/assets/k3s/``::

    sha256/<hex>                        the binaries, named by content (read-only)
    <v>/<arch>/k3s                      -> ../../sha256/<hex>: where nodes fetch it,
                                           /assets/k3s/<v>/<arch>/k3s
    <v>/sha256sum-<arch>.txt            the release's sums file, as published
    <v>/manifest.json                   per file: arch, role, name, path, object, sha256,
                                           size, url, sums_url; the release and when
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import httpx

from bastion import atomic
from bastion.assets.download import (
    FetchError,
    ReleaseNotFound,
    Reporter,
    SilentReporter,
    discard_abandoned,
    download_resumable,
    fetching,
    get_small,
    meta_path,
    sha256_of,
    unlink,
)
from bastion.cluster import plan as cluster

DEFAULT_MIRROR = "https://github.com/k3s-io/k3s/releases/download"
ARCHES = tuple(cluster.UPSTREAM_BINARY)  # amd64, arm64
_VERSION_RE = re.compile(r"v\d+\.\d+\.\d+(-rc\d+)?\+k3s\d+")
_SUM_LINE = re.compile(r"([0-9a-fA-F]{64}) [ *](\S+)")


class ChecksumRefused(FetchError):
    pass


def sums_name(arch: str) -> str:
    return f"sha256sum-{arch}.txt"


def parse_sums(text: str) -> dict[str, list[str]]:
    """sha256sum's output as {file name: its lower-case hex sums, in order, once each}; lines
    that are not sums are skipped. A name with two different sums is the caller's to refuse:
    `sha256sum -c` fails such a file whichever of them the file matches."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        m = _SUM_LINE.fullmatch(line.strip())
        if m:
            sums = out.setdefault(m.group(2), [])
            if m.group(1).lower() not in sums:
                sums.append(m.group(1).lower())
    return out


@dataclass(frozen=True)
class K3sRequest:
    site: Path
    version: str
    arches: tuple[str, ...]
    mirror: str | None = None  # where <v>/k3s... live (GitHub's releases/download layout)

    def release_url(self) -> str:
        if not _VERSION_RE.fullmatch(self.version):
            raise FetchError(f"--version {self.version!r}: not a k3s release such as v1.31.4+k3s1")
        for arch in self.arches:
            if arch not in ARCHES:
                raise FetchError(f"unknown arch {arch!r} (one of {', '.join(ARCHES)})")
        if not self.arches:
            raise FetchError("no architecture to fetch k3s for")
        base = (self.mirror or DEFAULT_MIRROR).rstrip("/")
        if not base.startswith(("http://", "https://")):
            raise FetchError(f"--mirror {base!r}: not an http:// or https:// URL")
        return f"{base}/{quote(self.version, safe='')}/"


@dataclass
class K3sFile:
    arch: str
    name: str  # the release's name for it: k3s, k3s-arm64
    path: str  # under assets/
    object: str  # under assets/
    sha256: str
    size: int
    url: str
    sums_url: str
    downloaded: bool

    def as_dict(self) -> dict:
        return {
            "arch": self.arch,
            "role": "binary",
            "name": self.name,
            "path": self.path,
            "object": self.object,
            "sha256": self.sha256,
            "size": self.size,
            "url": self.url,
            "sums_url": self.sums_url,
        }


@dataclass
class K3sResult:
    version: str
    release_url: str
    release_dir: Path  # assets/k3s/<v>
    manifest_path: Path
    manifest: dict
    files: list[K3sFile]


def fetch_k3s(
    req: K3sRequest,
    *,
    client: httpx.Client | None = None,
    reporter: Reporter | None = None,
    now: datetime | None = None,
) -> K3sResult:
    """Download (or keep), check and publish the release's binaries for req.arches."""
    reporter = reporter or SilentReporter()
    release_url = req.release_url()
    site = Path(req.site)
    assets = site / "assets"
    with fetching(site, client) as (work, client):
        staging = work / "k3s" / req.version
        discard_abandoned(staging.parent, req.version, "k3s", reporter)
        staging.mkdir(parents=True, exist_ok=True)
        files = []
        for arch in dict.fromkeys(req.arches):
            files.append(_one(client, req, release_url, assets, staging, arch, reporter))
        result = _publish(req, assets, release_url, files, now)
        shutil.rmtree(staging, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.removedirs(staging.parent)  # empty parents only; .lock keeps work/
        return result


def _one(client: httpx.Client, req: K3sRequest, release_url: str, assets: Path, staging: Path,
         arch: str, reporter: Reporter) -> K3sFile:  # fmt: skip
    name = cluster.UPSTREAM_BINARY[arch]
    sums_url = release_url + sums_name(arch)
    body = get_small(client, sums_url)
    if body is None:
        raise ReleaseNotFound(
            f"no k3s release {req.version} at {release_url} ({sums_name(arch)}: HTTP 404): "
            "check --version (site.yaml cluster.k3s.version) and --mirror"
        )
    sums = parse_sums(body.decode("utf-8", errors="replace"))
    if name not in sums:
        raise ChecksumRefused(
            f"{sums_name(arch)} of k3s {req.version} names no {name}; nothing was downloaded"
        )
    if len(sums[name]) > 1:
        raise ChecksumRefused(
            f"{sums_name(arch)} of k3s {req.version} gives two different SHA-256s for {name} "
            f"({', '.join(sums[name])}); which one the release means cannot be told, so nothing "
            "was downloaded: check the mirror (--mirror)"
        )
    want = sums[name][0]
    (staging / sums_name(arch)).write_bytes(body)
    url = release_url + name
    rel = cluster.binary_path(req.version, arch)
    obj = assets / "k3s" / "sha256" / want
    if sha256_of(obj) == want:
        reporter.note(
            f"k3s {req.version} {arch}: already in assets/k3s/sha256/; nothing downloaded"
        )
        return K3sFile(arch, name, rel, f"k3s/sha256/{want}", want, obj.stat().st_size, url,
                       sums_url, downloaded=False)  # fmt: skip
    reporter.note(f"k3s {req.version} {arch} from {url}")
    part = staging / f"{name}.part"
    download_resumable(client, url, part, name, reporter)
    got = sha256_of(part)
    if got != want:
        unlink(part, meta_path(part))
        raise ChecksumRefused(
            f"{name}: refused: its SHA-256 is {got}, but the release's {sums_name(arch)} says "
            f"{want} (damaged in transit, or not the release's file); it was deleted, nothing "
            "was kept: run the command again"
        )
    return K3sFile(arch, name, rel, f"k3s/sha256/{want}", want, part.stat().st_size, url,
                   sums_url, downloaded=True)  # fmt: skip


def _publish(req: K3sRequest, assets: Path, release_url: str, files: list[K3sFile],
             now: datetime | None) -> K3sResult:  # fmt: skip
    root = assets / "k3s"
    release_dir = root / req.version
    (root / "sha256").mkdir(parents=True, exist_ok=True)
    staging = assets.parent / "var" / "assets-fetch" / "k3s" / req.version
    for f in files:
        obj = assets / f.object
        if f.downloaded:
            part = staging / f"{f.name}.part"
            os.chmod(part, 0o444)
            atomic.move_into(part, obj)
            unlink(meta_path(part))
        link = assets / f.path
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.exists() and not link.is_symlink():
            raise FetchError(f"{link} exists and is not a link this command made; move it away")
        atomic.symlink(os.path.relpath(obj, link.parent), link)
        sums = staging / sums_name(f.arch)
        atomic.write_bytes(release_dir / sums_name(f.arch), sums.read_bytes(), if_changed=True)
    # Architectures fetched earlier stay in the manifest while their files are still there.
    manifest_path = assets / cluster.manifest_path(req.version)
    kept: list[dict] = []
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        old = json.loads(manifest_path.read_text())
        fresh = {f.arch for f in files}
        kept = [e for e in old["files"] if e.get("arch") not in fresh
                and sha256_of(assets / e["path"]) == e.get("sha256")]  # fmt: skip
    fetched_at = (now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
    manifest = {
        "schema": 1,
        "software": "k3s",
        "version": req.version,
        "source": release_url,
        "fetched_at": fetched_at.isoformat().replace("+00:00", "Z"),
        "checked_against": "the release's sha256sum-<arch>.txt",
        "files": sorted(kept + [f.as_dict() for f in files], key=lambda e: e["arch"]),
    }
    atomic.write_json(manifest_path, manifest)
    return K3sResult(req.version, release_url, release_dir, manifest_path, manifest, files)
