"""Fetch Flatcar's PXE kernel and initrd into a site's assets/, verified against Flatcar's key.

Theory of operation
-------------------
Flatcar publishes each release at ``<mirror>/<arch>-usr/<version>/`` (the default mirror is
``https://<channel>.release.flatcar-linux.net``) and keeps ``current/`` as a copy of the newest.
``version.txt`` in either directory names the release (``FLATCAR_VERSION_ID=3815.2.2``): we read
it from ``current/`` once, then take every file from the numbered directory, so a release that
lands mid-download cannot mix two versions.

Each file has a detached OpenPGP signature, ``<name>.sig``, made by a signing *subkey* of
Flatcar's image signing key; the subkeys rotate, the primary key does not. We pin the primary
key's fingerprint (Flatcar's own installer, flatcar-install, pins the same one) and nothing else:
the key is fetched from Flatcar's site the first time a site needs it (or read from a file
given with --key), refused unless it holds that primary key, and kept in the site's asset store,
``assets/flatcar/keys/``. A signature by a subkey the kept key does not know, or one it says had
expired when it signed, makes the command fetch the key once more before it refuses: that is how
the kept key follows Flatcar's rotation. bastion.assets.openpgp does the keys and the checking.

The PXE kernel's signature changed name in 2024: since Flatcar's scripts made
``flatcar_production_pxe.vmlinuz`` a symlink to ``flatcar_production_image.vmlinuz`` (April 2024),
the release server resolves the kernel's old name but publishes its signature only as
``flatcar_production_image.vmlinuz.sig``; older releases have ``flatcar_production_pxe.vmlinuz.sig``.
Both are the same kernel bytes, so we try the new name, then the old.

Nothing unverified reaches assets/: downloads go to ``<site>/var/assets-fetch/`` as ``.part`` files
(resumed with an HTTP Range request, guarded by If-Range), are verified there, and only then move
into assets/. A file whose signature fails is deleted with everything staged for its release.

On disk, under ``<site>/assets/flatcar/``::

    sha256/<hex>                                   the files themselves, named by content
    <channel>/<arch>/<version>/<name>              -> ../../../sha256/<hex> (relative symlink)
    <channel>/<arch>/<version>/<name>.sig          the detached signature, as published
    <channel>/<arch>/<version>/manifest.json       what was fetched, from where, signed by whom
    <channel>/<arch>/current                       -> <version> (moved atomically)
    keys/<FPR>.asc, keys/<FPR>.json                 the pinned key and where it came from

Profiles then boot ``/assets/flatcar/stable/amd64/current/flatcar_production_pxe.vmlinuz`` (or a
pinned version). The URL's last segment stays Flatcar's file name, which matters: the kernel
argument ``initrd=flatcar_production_pxe_image.cpio.gz`` names the initrd as iPXE loaded it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Self
from urllib.parse import urljoin

import httpx

from bastion import atomic
from bastion.assets.download import (
    FetchError,
    ReleaseNotFound,
    Reporter,
    SilentReporter,
    TransferInterrupted,  # noqa: F401  (re-exported: callers catch it from here too)
    )
from bastion.assets.download import discard_abandoned as _discard_abandoned
from bastion.assets.download import download_resumable as _download_resumable
from bastion.assets.download import fetching as _fetching
from bastion.assets.download import get_small as _get_small
from bastion.assets.download import meta_path as _meta_path
from bastion.assets.download import sha256_of as _sha256_of
from bastion.assets.download import unlink as _unlink
from bastion.assets.openpgp import (
    GoodSignature,
    KeyProblem,
    KeyStore,
    SignatureRefused,
    SigningKey,
    StoredKey,
    Verifier,
)

__all__ = ["FetchError", "KeyProblem", "SignatureRefused", "SigningKey", "fetch_flatcar"]

# Flatcar's image signing key: its primary key (flatcar-install pins the same fingerprint), and
# where Flatcar publishes it with its current signing subkeys (in 2026 the one made on
# 2025-03-07, 52F145DFD00BBDCD928CBB5A32DA80F91EF52974, which expires 2027-03-08).
FLATCAR_PRIMARY_FINGERPRINT = "F88CFEDEFF29A5B4D9523864E25D9AED0593B34A"
FLATCAR_KEY_URL = "https://www.flatcar.org/security/image-signing-key/Flatcar_Image_Signing_Key.asc"

DEFAULT_MIRROR = "https://{channel}.release.flatcar-linux.net"
CHANNELS = ("stable", "beta", "alpha")
ARCHES = ("amd64", "arm64")

# Flatcar versions are MAJOR.MINOR.PATCH (3815.2.2); dev builds add +suffix. Nothing else may
# become a directory name under assets/.
_VERSION_RE = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+(\+[A-Za-z0-9._-]+)?")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class PxeFile:
    role: str  # "kernel" or "initrd"
    name: str
    signature_names: tuple[str, ...]  # tried in this order; the first that exists is used


FLATCAR_PXE_FILES = (
    PxeFile(
        "kernel",
        "flatcar_production_pxe.vmlinuz",
        # 2024 on, then before (see the module docstring).
        ("flatcar_production_image.vmlinuz.sig", "flatcar_production_pxe.vmlinuz.sig"),
    ),
    PxeFile(
        "initrd",
        "flatcar_production_pxe_image.cpio.gz",
        ("flatcar_production_pxe_image.cpio.gz.sig",),
    ),
)


# -- errors: each says what happened to which file and what to do ---------------------------------


class SignatureMissing(FetchError):
    pass


def flatcar_key(
    *,
    file: Path | None = None,
    url: str | None = None,
    fingerprint: str | None = None,
    refresh: bool = False,
) -> SigningKey:
    """Flatcar's image signing key: pinned by its primary fingerprint, fetched from Flatcar's
    site unless a file is given; the arguments are for images signed by someone else (tests)."""
    return SigningKey(fingerprint or FLATCAR_PRIMARY_FINGERPRINT, url or FLATCAR_KEY_URL, file,
                      refresh)  # fmt: skip


# -- the release ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FetchRequest:
    site: Path
    channel: str = "stable"
    arch: str = "amd64"
    version: str | None = None  # None: the channel's current release
    mirror: str | None = None  # a URL holding <arch>-usr/<version>/...; "{channel}" is filled in
    key: SigningKey = field(default_factory=lambda: flatcar_key())
    set_current: bool | None = None  # move <channel>/<arch>/current; None: only if no version

    def arch_url(self) -> str:
        if self.channel not in CHANNELS:
            raise FetchError(f"unknown channel {self.channel!r} (one of {', '.join(CHANNELS)})")
        if self.arch not in ARCHES:
            raise FetchError(f"unknown arch {self.arch!r} (one of {', '.join(ARCHES)})")
        base = (self.mirror or DEFAULT_MIRROR).replace("{channel}", self.channel)
        if not base.startswith(("http://", "https://")):
            raise FetchError(f"--mirror {base!r}: not an http:// or https:// URL")
        return base.rstrip("/") + f"/{self.arch}-usr/"


def parse_version_txt(text: str) -> str | None:
    """The release version from a version.txt (shell assignments); None if it names none."""
    values = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep:
            values[key.strip()] = value.strip().strip("\"'")
    for key in ("FLATCAR_VERSION_ID", "FLATCAR_VERSION", "COREOS_VERSION_ID", "COREOS_VERSION"):
        if values.get(key):
            return values[key]
    return None


@dataclass
class FetchedFile:
    role: str
    name: str
    path: str  # under assets/
    object: str  # under assets/
    sha256: str
    size: int
    url: str
    signature_url: str
    signature: GoodSignature

    def as_dict(self, version: str) -> dict:
        return {
            "role": self.role,
            "name": self.name,
            "version": version,
            "path": self.path,
            "object": self.object,
            "sha256": self.sha256,
            "size": self.size,
            "url": self.url,
            "signature_url": self.signature_url,
            "signature_key": self.signature.signing_key,
            "signature_primary_key": self.signature.primary_key,
            "signed_at": self.signature.signed_at,
            "signature_key_expired_since": self.signature.key_expired,
        }


@dataclass
class FetchResult:
    channel: str
    arch: str
    version: str
    release_url: str
    release_dir: Path  # assets/flatcar/<channel>/<arch>/<version>
    manifest_path: Path
    manifest: dict
    files: list[FetchedFile]
    current_moved: bool


def fetch_flatcar(
    req: FetchRequest,
    *,
    client: httpx.Client | None = None,
    reporter: Reporter | None = None,
    now: datetime | None = None,
) -> FetchResult:
    """Download, verify and publish one Flatcar PXE release into req.site's assets/."""
    reporter = reporter or SilentReporter()
    arch_url = req.arch_url()
    site = Path(req.site)
    assets = site / "assets"
    if req.version is not None and not _VERSION_RE.fullmatch(req.version):
        raise FetchError(f"--version {req.version!r}: not a Flatcar version such as 3815.2.2")
    with (
        _fetching(site, client) as (work, client),
        _Trust(assets, req.key, client, reporter) as trust,
    ):
        version = _resolve_version(client, arch_url, req.version)
        release_url = urljoin(arch_url, f"{version}/")
        _discard_abandoned(work / "flatcar" / req.channel / req.arch, version,
                           f"Flatcar {req.channel} {req.arch}", reporter)  # fmt: skip
        kept = _already_there(req, assets, version, trust)
        if kept is not None:
            reporter.note(
                f"Flatcar {req.channel} {req.arch} {version} is already in {kept.release_dir} "
                "and its files still verify; nothing downloaded"
            )
            return kept
        staging = work / "flatcar" / req.channel / req.arch / version
        staging.mkdir(parents=True, exist_ok=True)
        reporter.note(f"Flatcar {req.channel} {req.arch} {version} from {release_url}")
        staged = []
        try:
            for f in FLATCAR_PXE_FILES:
                staged.append(_stage_one(client, trust, release_url, staging, f, reporter))
        except (SignatureMissing, SignatureRefused):
            # The release is not trustworthy as served: nothing of it stays, not even the
            # parts of other files that did verify.
            shutil.rmtree(staging, ignore_errors=True)
            raise
        result = _publish(req, assets, version, release_url, staged, now, trust.stored)
        shutil.rmtree(staging, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.removedirs(staging.parent)  # empty parents only; .lock keeps work/
        return result


class _Trust:
    """The kept key and a gpgv verifier for it. A signature by a subkey the kept key does not
    know, or one it says had expired when it signed, makes it fetch the key once more from
    Flatcar (the rotation) before the file is refused; a key given as a file is never replaced."""

    def __init__(self, assets: Path, key: SigningKey, client: httpx.Client, reporter: Reporter):
        self.key, self.client, self.reporter = key, client, reporter
        self.store = KeyStore(assets / "flatcar" / "keys")
        self.stored: StoredKey = self.store.obtain(key, client, reporter)
        self.verifier = Verifier(self.stored)

    def __enter__(self) -> Self:
        self.verifier.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.verifier.__exit__(*exc)

    def verify(self, data: Path, signature: Path, name: str) -> GoodSignature:
        try:
            return self.verifier.verify(data, signature, name)
        except SignatureRefused as refused:
            e = refused
        if e.reason not in ("unknown-key", "expired"):
            raise e
        if self.key.file is not None:
            raise SignatureRefused(
                f"{e}. The key file was given with --key: if Flatcar has rotated its signing "
                f"subkey since, get its current key from {self.key.url} (or leave --key out and "
                "this command fetches it); nothing was kept",
                e.reason,
                e.key,
            )
        if self.stored.fetched_now:
            raise self._final(e)
        self.reporter.note(
            f"{name}: signed by key {e.key}, which the kept key does not vouch for ({e.reason}); "
            f"fetching the key again from {self.key.url} (Flatcar rotates its signing subkeys)"
        )
        try:
            fresh = self.store.fetch(self.key, self.client, self.reporter)
        except KeyProblem as k:
            # k says what failed: no answer, an HTTP error, or an answer that is not the key.
            raise SignatureRefused(
                f"{e}; fetching the key again gave none to check it with ({k}); nothing was "
                f"kept. Run the command again once {self.key.url} serves Flatcar's current key, "
                "or give that key with --key FILE",
                e.reason,
                e.key,
            ) from None
        self.verifier.__exit__(None, None, None)
        self.stored, self.verifier = fresh, Verifier(fresh).__enter__()
        try:
            return self.verifier.verify(data, signature, name)
        except SignatureRefused as again:
            raise self._final(again) from None

    def _final(self, e: SignatureRefused) -> SignatureRefused:
        """The refusal when the key was just fetched: what the user can do about it."""
        if e.reason == "expired":
            todo = (
                "If Flatcar extends that subkey, the next run fetches the key again and takes "
                "the release; until then take a release signed while it was valid (--version), "
                "and see Flatcar's security notices, https://www.flatcar.org/security/"
            )
        else:
            todo = (
                "Flatcar's key as published does not vouch for it: check the mirror (--mirror) "
                "serves Flatcar's files, and see https://www.flatcar.org/security/"
            )
        return SignatureRefused(f"{e}; nothing was kept. {todo}", e.reason, e.key)


def _resolve_version(client: httpx.Client, arch_url: str, wanted: str | None) -> str:
    if wanted is not None and not _VERSION_RE.fullmatch(wanted):
        raise FetchError(f"--version {wanted!r}: not a Flatcar version such as 3815.2.2")
    url = urljoin(arch_url, f"{wanted or 'current'}/version.txt")
    body = _get_small(client, url)
    if body is None:
        raise ReleaseNotFound(
            f"no Flatcar release {wanted or 'current'} at {urljoin(arch_url, wanted or 'current')}/"
            f" ({url}: HTTP 404): check --channel, --arch and --version"
        )
    version = parse_version_txt(body.decode("utf-8", errors="replace"))
    if version is None:
        raise FetchError(f"{url}: names no FLATCAR_VERSION_ID")
    if not _VERSION_RE.fullmatch(version):
        raise FetchError(f"{url}: FLATCAR_VERSION_ID {version!r} is not a Flatcar version")
    if wanted is not None and version != wanted:
        raise FetchError(f"{url} says version {version}, not {wanted}")
    return version


@dataclass
class _Staged:
    file: PxeFile
    data: Path
    signature: Path
    url: str
    signature_url: str
    good: GoodSignature
    sha256: str
    size: int


def _stage_one(
    client: httpx.Client,
    trust: _Trust,
    release_url: str,
    staging: Path,
    f: PxeFile,
    reporter: Reporter,
) -> _Staged:
    # The signature first: without one the file is not worth downloading.
    sig_path = staging / f"{f.name}.sig"
    sig_url = None
    for sig_name in f.signature_names:
        url = urljoin(release_url, sig_name)
        body = _get_small(client, url)
        if body is not None:
            sig_url = url
            sig_path.write_bytes(body)
            break
    if sig_url is None:
        tried = ", ".join(f.signature_names)
        raise SignatureMissing(
            f"{f.name}: refused: the release publishes no signature for it (tried {tried} at "
            f"{release_url}); nothing was kept"
        )
    url = urljoin(release_url, f.name)
    part = staging / f"{f.name}.part"
    _download_resumable(client, url, part, f.name, reporter)
    try:
        good = trust.verify(part, sig_path, f.name)
    except SignatureRefused:
        _unlink(part, _meta_path(part), sig_path)
        raise
    if good.key_expired:
        reporter.note(
            f"{f.name}: signed on {good.signed_at} by subkey {good.signing_key}, which has "
            "expired since; that is expected for an older release"
        )
    with open(part, "rb") as fh:
        sha = hashlib.file_digest(fh, "sha256").hexdigest()
    return _Staged(f, part, sig_path, url, sig_url, good, sha, part.stat().st_size)


# -- publishing ---------------------------------------------------------------------------------------


def _set_current(req: FetchRequest, arch_dir: Path, version: str) -> bool:
    set_current = req.set_current if req.set_current is not None else req.version is None
    if set_current:
        current = arch_dir / "current"
        if current.exists() and not current.is_symlink():
            raise FetchError(f"{current} exists and is not a link this command made; move it away")
        atomic.symlink(version, current)
    return set_current


def _already_there(
    req: FetchRequest, assets: Path, version: str, trust: _Trust
) -> FetchResult | None:
    """The stored release, if its manifest lists every file and each still verifies."""
    arch_dir = assets / "flatcar" / req.channel / req.arch
    release_dir = arch_dir / version
    try:
        manifest = json.loads((release_dir / "manifest.json").read_text())
        listed = {f["name"]: f for f in manifest["files"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    files = []
    for f in FLATCAR_PXE_FILES:
        entry, path = listed.get(f.name), release_dir / f.name
        sig = release_dir / f"{f.name}.sig"
        if not entry or not path.is_file() or not sig.is_file():
            return None
        if _sha256_of(path) != entry.get("sha256"):
            return None
        try:
            good = trust.verifier.verify(path, sig, f.name)
        except SignatureRefused:
            return None  # fetched again, and checked again, below
        files.append(
            FetchedFile(
                role=f.role,
                name=f.name,
                path=entry["path"],
                object=entry["object"],
                sha256=entry["sha256"],
                size=path.stat().st_size,
                url=entry["url"],
                signature_url=entry["signature_url"],
                signature=good,
            )
        )
    return FetchResult(
        channel=req.channel,
        arch=req.arch,
        version=version,
        release_url=manifest.get("source", ""),
        release_dir=release_dir,
        manifest_path=release_dir / "manifest.json",
        manifest=manifest,
        files=files,
        current_moved=_set_current(req, arch_dir, version),
    )


def _publish(
    req: FetchRequest,
    assets: Path,
    version: str,
    release_url: str,
    staged: list[_Staged],
    now: datetime | None,
    key: StoredKey,
) -> FetchResult:
    objects = assets / "flatcar" / "sha256"
    arch_dir = assets / "flatcar" / req.channel / req.arch
    release_dir = arch_dir / version
    objects.mkdir(parents=True, exist_ok=True)
    release_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for s in staged:
        assert _SHA256_RE.fullmatch(s.sha256)
        obj = objects / s.sha256
        if _sha256_of(obj) == s.sha256:
            _unlink(s.data)  # the same bytes are there already (another channel, a re-fetch)
        else:
            os.chmod(s.data, 0o444)
            atomic.move_into(s.data, obj)
        _unlink(_meta_path(s.data))
        link = release_dir / s.file.name
        if link.exists() and not link.is_symlink():
            raise FetchError(f"{link} exists and is not a link this command made; move it away")
        atomic.symlink(os.path.relpath(obj, release_dir), link)
        atomic.write_bytes(release_dir / f"{s.file.name}.sig", s.signature.read_bytes())
        files.append(
            FetchedFile(
                role=s.file.role,
                name=s.file.name,
                path=str(link.relative_to(assets)),
                object=str(obj.relative_to(assets)),
                sha256=s.sha256,
                size=s.size,
                url=s.url,
                signature_url=s.signature_url,
                signature=s.good,
            )
        )
    fetched_at = (now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
    manifest = {
        "schema": 1,
        "os": "flatcar",
        "channel": req.channel,
        "arch": req.arch,
        "version": version,
        "source": release_url,
        "fetched_at": fetched_at.isoformat().replace("+00:00", "Z"),
        "trusted_key": key.fingerprint,
        "key": {
            "path": str(key.path.relative_to(assets)),
            "source": key.source,
            "fetched_at": key.fetched_at,
        },
        "files": [f.as_dict(version) for f in files],
    }
    manifest_path = release_dir / "manifest.json"
    atomic.write_json(manifest_path, manifest)
    set_current = _set_current(req, arch_dir, version)
    return FetchResult(
        channel=req.channel,
        arch=req.arch,
        version=version,
        release_url=release_url,
        release_dir=release_dir,
        manifest_path=manifest_path,
        manifest=manifest,
        files=files,
        current_moved=set_current,
    )
