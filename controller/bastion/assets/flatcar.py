"""Fetch Flatcar's PXE kernel and initrd into a site's assets/, verified against Flatcar's key.

Theory of operation
-------------------
Flatcar publishes each release at ``<mirror>/<arch>-usr/<version>/`` (the default mirror is
``https://<channel>.release.flatcar-linux.net``) and keeps ``current/`` as a copy of the newest.
``version.txt`` in either directory names the release (``FLATCAR_VERSION_ID=3815.2.2``): we read
it from ``current/`` once, then take every file from the numbered directory, so a release that
lands mid-download cannot mix two versions.

Each file has a detached OpenPGP signature, ``<name>.sig``, made by a signing *subkey* of
Flatcar's image signing key; the subkeys rotate yearly, the primary key does not. We pin the
primary key's fingerprint and accept a signature only when gpgv reports it valid *and* names that
primary key as the owner of the signing (sub)key. The keyring gpgv checks against is built in a
temporary GNUPGHOME from the key file and holds only the pinned key (gpg's import checks the
subkeys' binding signatures), so a second key slipped into the key file signs nothing.

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
import subprocess
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Self
from urllib.parse import urljoin

import httpx

from bastion.assets.download import (
    FetchError,
    ReleaseNotFound,
    Reporter,
    SilentReporter,
    TransferInterrupted,  # noqa: F401  (re-exported: callers catch it from here too)
    new_client,
)
from bastion.assets.download import download_resumable as _download_resumable
from bastion.assets.download import exclusive as _exclusive
from bastion.assets.download import get_small as _get_small
from bastion.assets.download import meta_path as _meta_path
from bastion.assets.download import sha256_of as _sha256_of
from bastion.assets.download import unlink as _unlink
from bastion import atomic

FLATCAR_PRIMARY_FINGERPRINT = "F88CFEDEFF29A5B4D9523864E25D9AED0593B34A"
# Flatcar's public key as published at https://www.flatcar.org/security/image-signing-key/
# (flatcar/flatcar-website static/security/image-signing-key/Flatcar_Image_Signing_Key.asc, the
# 2025-03-07 update: signing subkey 52F145DFD00BBDCD928CBB5A32DA80F91EF52974, expires 2027-03-08).
# When Flatcar adds next year's subkey, replace this file with the new one; the pin stays.
FLATCAR_KEY_FILE = Path(__file__).parent.parent / "keys" / "flatcar-image-signing.asc"
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


class SignatureRefused(FetchError):
    pass


class KeyProblem(FetchError):
    pass


# -- signatures -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SigningKey:
    """The key file to trust and the primary key fingerprint it must hold."""

    path: Path
    fingerprint: str

    @classmethod
    def flatcar(cls) -> SigningKey:
        return cls(FLATCAR_KEY_FILE, FLATCAR_PRIMARY_FINGERPRINT)


@dataclass(frozen=True)
class GoodSignature:
    signing_key: str  # fingerprint of the (sub)key that made the signature
    primary_key: str  # fingerprint of its primary key: the pinned one
    signed_at: str  # ISO 8601, UTC
    key_expired: bool  # the subkey has expired since (an older release, signed in its time)


def _normalise_fingerprint(fpr: str) -> str:
    clean = fpr.replace(" ", "").upper()
    if not re.fullmatch(r"[0-9A-F]{40}", clean):
        raise KeyProblem(f"{fpr!r} is not a 40-hex-digit OpenPGP fingerprint")
    return clean


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, check=False, capture_output=True, timeout=600, **kw)
    except FileNotFoundError:
        raise KeyProblem(
            f"{argv[0]} is not installed; signatures cannot be checked without it "
            "(Debian: apt-get install gpg gpgv)"
        ) from None


class Verifier:
    """gpgv against a keyring holding only the pinned key; use as a context manager."""

    def __init__(self, key: SigningKey):
        self.key = key
        self.fingerprint = _normalise_fingerprint(key.fingerprint)
        self._home: tempfile.TemporaryDirectory | None = None
        self.keyring: Path | None = None

    def __enter__(self) -> Self:
        path = Path(self.key.path)
        try:
            text = path.read_bytes()
        except OSError as e:
            raise KeyProblem(
                f"the signing key file {path} cannot be read ({e.strerror}). Flatcar's image "
                f"signing key belongs there: get it from {FLATCAR_KEY_URL} and check that its "
                f"fingerprint is {FLATCAR_PRIMARY_FINGERPRINT} (docs/assets.md)"
            ) from None
        # Armored, or binary (an OpenPGP packet header has its top bit set: RFC 9580 4.2).
        if b"-----BEGIN PGP PUBLIC KEY BLOCK-----" not in text and not (text and text[0] & 0x80):
            raise KeyProblem(
                f"{path} holds no OpenPGP public key. Put Flatcar's image signing key there: get "
                f"it from {FLATCAR_KEY_URL} and check that its fingerprint is "
                f"{FLATCAR_PRIMARY_FINGERPRINT} (docs/assets.md)"
            )
        # Short path: gpg puts sockets in its home, and those have a ~100 byte limit.
        self._home = tempfile.TemporaryDirectory(prefix="bastion-gpg-")
        home = self._home.name
        os.chmod(home, 0o700)
        gpg = ["gpg", "--batch", "--no-options", "--no-autostart", "--homedir", home]
        imported = _run([*gpg, "--import", str(path)])
        exported = _run([*gpg, "--export", self.fingerprint])
        if exported.returncode != 0 or not exported.stdout:
            self.close()
            raise KeyProblem(
                f"{path} does not hold the key {self.fingerprint} that signatures must come from"
                + (
                    f" (gpg: {imported.stderr.decode(errors='replace').strip()})"
                    if imported.returncode
                    else ""
                )
            )
        self.keyring = Path(home) / "trusted.gpg"
        self.keyring.write_bytes(exported.stdout)
        return self

    def close(self) -> None:
        if self._home is not None:
            self._home.cleanup()
            self._home = None

    def __exit__(self, *exc) -> None:
        self.close()

    def verify(self, data: Path, signature: Path, name: str) -> GoodSignature:
        """GoodSignature, or SignatureRefused saying why; name is what the message calls it."""
        assert self.keyring is not None, "use Verifier as a context manager"
        r = _run(
            ["gpgv", "--status-fd", "1", "--keyring", str(self.keyring), str(signature), str(data)]
        )
        status = [line.split() for line in r.stdout.decode(errors="replace").splitlines()]
        status = [s[1:] for s in status if len(s) > 1 and s[0] == "[GNUPG:]"]
        words = {s[0]: s[1:] for s in status}
        refuse = f"{name}: refused:"
        if "BADSIG" in words:
            raise SignatureRefused(
                f"{refuse} the signature by key {words['BADSIG'][0]} does not match the file "
                "(corrupted or tampered with); it was deleted"
            )
        if "NO_PUBKEY" in words:
            raise SignatureRefused(
                f"{refuse} it was signed by key {words['NO_PUBKEY'][0]}, which is neither the "
                f"trusted key {self.fingerprint} nor one of its subkeys in {self.key.path}; it "
                "was deleted. (If Flatcar has rotated to a new signing subkey, refresh the key "
                "file: docs/assets.md.)"
            )
        if "ERRSIG" in words:
            raise SignatureRefused(
                f"{refuse} gpgv could not check the signature by key {words['ERRSIG'][0]} "
                f"(ERRSIG {' '.join(words['ERRSIG'][1:])}); it was deleted"
            )
        if "REVKEYSIG" in words:
            raise SignatureRefused(
                f"{refuse} it was signed by key {words['REVKEYSIG'][0]}, which has been "
                "revoked; it was deleted"
            )
        if "NODATA" in words:
            raise SignatureRefused(f"{refuse} its .sig file is not an OpenPGP signature")
        valid = [s for s in status if s[0] == "VALIDSIG"]
        good = "GOODSIG" in words or "EXPKEYSIG" in words
        if r.returncode != 0 or not valid or not good:
            detail = r.stderr.decode(errors="replace").strip().splitlines()
            raise SignatureRefused(
                f"{refuse} gpgv did not accept the signature (exit {r.returncode}"
                + (f": {detail[-1]}" if detail else "")
                + ")"
            )
        # VALIDSIG <fpr> <date> <timestamp> <expire> <version> <reserved> <pk-algo> <hash-algo>
        #          <class> <primary-fpr>   (GnuPG doc/DETAILS)
        for v in valid:
            primary = v[10].upper() if len(v) > 10 else v[1].upper()
            if primary != self.fingerprint:
                raise SignatureRefused(
                    f"{refuse} it was signed by key {v[1]} of primary key {primary}, not by "
                    f"{self.fingerprint} or one of its subkeys"
                )
        v = valid[0]
        signed_at = datetime.fromtimestamp(int(v[3]), UTC).isoformat().replace("+00:00", "Z")
        return GoodSignature(
            signing_key=v[1].upper(),
            primary_key=self.fingerprint,
            signed_at=signed_at,
            key_expired="EXPKEYSIG" in words,
        )


# -- the release ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FetchRequest:
    site: Path
    channel: str = "stable"
    arch: str = "amd64"
    version: str | None = None  # None: the channel's current release
    mirror: str | None = None  # a URL holding <arch>-usr/<version>/...; "{channel}" is filled in
    key: SigningKey = field(default_factory=SigningKey.flatcar)
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
    work = site / "var" / "assets-fetch"
    work.mkdir(parents=True, exist_ok=True)
    own_client = client is None
    if client is None:
        client = new_client()
    try:
        with _exclusive(work / ".lock"), Verifier(req.key) as verifier:
            version = _resolve_version(client, arch_url, req.version)
            release_url = urljoin(arch_url, f"{version}/")
            kept = _already_there(req, assets, version, verifier)
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
                    staged.append(_stage_one(client, verifier, release_url, staging, f, reporter))
            except (SignatureMissing, SignatureRefused):
                # The release is not trustworthy as served: nothing of it stays, not even the
                # parts of other files that did verify.
                shutil.rmtree(staging, ignore_errors=True)
                raise
            result = _publish(req, assets, version, release_url, staged, now)
            shutil.rmtree(staging, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.removedirs(staging.parent)  # empty parents only; .lock keeps work/
            return result
    finally:
        if own_client:
            client.close()


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
    verifier: Verifier,
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
        good = verifier.verify(part, sig_path, f.name)
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
    req: FetchRequest, assets: Path, version: str, verifier: Verifier
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
            good = verifier.verify(path, sig, f.name)
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
        "trusted_key": _normalise_fingerprint(req.key.fingerprint),
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
