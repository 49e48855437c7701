"""A signing key pinned by its primary fingerprint, fetched and kept in a site's asset store, and
detached signatures checked against it with GnuPG's gpgv.

Theory of operation
-------------------
Trust is one fingerprint: the *primary* key's (Flatcar's is pinned in bastion.assets.flatcar).
The key itself is not shipped with the project: it is fetched from its publisher's URL the first
time a site needs it (or taken from a file, `--key FILE`, offline), refused unless it holds that
primary key, and kept in the site's asset store. Publishers sign with *subkeys* that rotate (a new
one is added to the published key, or the current one's expiry is extended), so the stored key is
fetched again, once, when a signature needs a subkey it does not know, or one it says had expired
when it signed. A key given as a file is the user's choice and never replaced behind their back.

What is stored is the pinned key alone: the file is imported into a temporary GNUPGHOME (gpg's
import checks every subkey's binding signature and drops a subkey without one) and only the
pinned primary is exported from there, so a second key slipped into the published file signs
nothing. Under ``<site>/assets/<os>/keys/``::

    <FPR>.asc    the pinned key, its subkeys and signatures (gpg --export --armor)
    <FPR>.json   where it came from and when, the sha256 of the file as published, and each
                 subkey: fingerprint, can it sign, created, expires, revoked

A signature is accepted when gpgv, with a keyring holding only that key, reports it good
(GOODSIG, or EXPKEYSIG for a subkey that has expired since) and its VALIDSIG line names the
pinned primary as the signing key's owner, and the signing key may sign and had not expired when
the signature was made. Everything else is a SignatureRefused whose `reason` says which case it
is (bad, unknown-key, revoked, expired, not-signing, other-primary, unreadable) and whose message
says what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Self

import httpx

from bastion import atomic
from bastion.assets.download import FetchError, Reporter, get_small


class KeyProblem(FetchError):
    """The key cannot be had or does not hold the pinned primary key; nothing was downloaded."""


class SignatureRefused(FetchError):
    """A signature that does not make the file trustworthy; `reason` names the case."""

    def __init__(self, message: str, reason: str, key: str | None = None):
        super().__init__(message)
        self.reason = reason
        self.key = key  # the (sub)key the signature names, when it names one


# -- the key wanted, and the key stored -----------------------------------------------------------


@dataclass(frozen=True)
class SigningKey:
    """Which key to trust (`fingerprint`, its primary key) and where to get it."""

    fingerprint: str
    url: str | None = None  # where its publisher keeps it
    file: Path | None = None  # a file to take it from instead (offline); never refreshed
    refresh: bool = False  # fetch it from `url` again even when the store has it


@dataclass(frozen=True)
class Subkey:
    fingerprint: str
    can_sign: bool
    created: int  # unix time
    expires: int | None  # unix time; None: never
    revoked: bool

    def as_dict(self) -> dict:
        return {
            "fingerprint": self.fingerprint,
            "can_sign": self.can_sign,
            "created": _iso(self.created),
            "expires": _iso(self.expires) if self.expires else None,
            "revoked": self.revoked,
        }


@dataclass(frozen=True)
class StoredKey:
    fingerprint: str
    path: Path  # <store>/<FPR>.asc
    data: bytes  # the pinned key alone, armored
    source: str  # the URL or file it came from
    fetched_at: str  # ISO 8601, UTC
    keys: tuple[Subkey, ...]  # the primary first, then its subkeys
    fetched_now: bool = False  # this run fetched (or read) it; fetching again would not help

    def key(self, fpr: str) -> Subkey | None:
        fpr = fpr.upper()
        return next((k for k in self.keys if k.fingerprint == fpr), None)

    def describe(self) -> str:
        return f"the key from {self.source} ({'fetched just now' if self.fetched_now else 'kept since ' + self.fetched_at})"


def normalise_fingerprint(fpr: str) -> str:
    clean = fpr.replace(" ", "").upper()
    if not re.fullmatch(r"[0-9A-F]{40}", clean):
        raise KeyProblem(f"{fpr!r} is not a 40-hex-digit OpenPGP fingerprint")
    return clean


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(int(ts), UTC).isoformat().replace("+00:00", "Z")


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, check=False, capture_output=True, timeout=600, **kw)
    except FileNotFoundError:
        raise KeyProblem(
            f"{argv[0]} is not installed; signatures cannot be checked without it "
            "(Debian: apt-get install gpg gpgv)"
        ) from None


class _GpgHome:
    """A temporary GNUPGHOME holding what was imported into it; removed on exit."""

    def __enter__(self) -> Self:
        # Short path: gpg puts sockets in its home, and those have a ~100 byte limit.
        self._dir = tempfile.TemporaryDirectory(prefix="bastion-gpg-")
        os.chmod(self._dir.name, 0o700)
        self.home = Path(self._dir.name)
        return self

    def gpg(self, *args: str, data: bytes | None = None) -> subprocess.CompletedProcess:
        return _run(["gpg", "--batch", "--no-options", "--no-autostart", "--homedir",
                     str(self.home), *args], input=data)  # fmt: skip

    def __exit__(self, *exc) -> None:
        self._dir.cleanup()


def _looks_like_a_key(data: bytes) -> bool:
    # Armored, or binary (an OpenPGP packet header has its top bit set: RFC 9580 4.2).
    return b"-----BEGIN PGP PUBLIC KEY BLOCK-----" in data or bool(data and data[0] & 0x80)


def _list_keys(home: _GpgHome, fpr: str) -> tuple[Subkey, ...]:
    """The pinned primary and its subkeys as gpg lists them (GnuPG doc/DETAILS, colon format)."""
    out = home.gpg("--with-colons", "--fixed-list-mode", "--list-keys", fpr).stdout.decode()
    keys: list[Subkey] = []
    pending: list[str] | None = None
    for line in out.splitlines():
        f = line.split(":")
        if f[0] in ("pub", "sub"):
            pending = f
        elif f[0] == "fpr" and pending is not None:
            p, pending = pending, None
            keys.append(Subkey(
                fingerprint=f[9].upper(),
                can_sign="s" in p[11],
                created=int(p[5] or 0),
                expires=int(p[6]) if p[6] else None,
                revoked=p[1] == "r",
            ))  # fmt: skip
    return tuple(keys)


def inspect_key(data: bytes, fingerprint: str, source: str) -> tuple[bytes, tuple[Subkey, ...]]:
    """The pinned key alone (armored) out of `data`, and its keys; KeyProblem if it is not there."""
    fpr = normalise_fingerprint(fingerprint)
    if not _looks_like_a_key(data):
        raise KeyProblem(f"{source} holds no OpenPGP public key")
    with _GpgHome() as home:
        imported = home.gpg("--import", data=data)
        exported = home.gpg("--export", "--armor", fpr)
        if exported.returncode != 0 or not exported.stdout:
            why = imported.stderr.decode(errors="replace").strip().splitlines()
            raise KeyProblem(
                f"{source} does not hold the key {fpr} that signatures must come from; it was "
                "not kept" + (f" (gpg: {why[-1]})" if imported.returncode and why else "")
            )
        return exported.stdout, _list_keys(home, fpr)


class KeyStore:
    """Pinned keys kept under one directory (`<site>/assets/<os>/keys`)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def _paths(self, fpr: str) -> tuple[Path, Path]:
        return self.root / f"{fpr}.asc", self.root / f"{fpr}.json"

    def stored(self, key: SigningKey) -> StoredKey | None:
        fpr = normalise_fingerprint(key.fingerprint)
        asc, meta_file = self._paths(fpr)
        try:
            data = asc.read_bytes()
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError):
            return None
        try:
            data, keys = inspect_key(data, fpr, str(asc))
        except KeyProblem:
            return None  # not what this command wrote: fetched again
        return StoredKey(
            fpr, asc, data, str(meta.get("source", "")), str(meta.get("fetched_at", "")), keys
        )

    def obtain(self, key: SigningKey, client: httpx.Client, reporter: Reporter) -> StoredKey:
        """The key to check signatures with: from --key FILE, else the store, else its URL."""
        if key.file is not None:
            path = Path(key.file)
            try:
                data = path.read_bytes()
            except OSError as e:
                raise KeyProblem(f"the key file {path} cannot be read ({e.strerror})") from None
            return self._keep(key, data, f"file {path}", reporter)
        if not key.refresh:
            kept = self.stored(key)
            if kept is not None:
                return kept
        return self.fetch(key, client, reporter)

    def fetch(self, key: SigningKey, client: httpx.Client, reporter: Reporter) -> StoredKey:
        """The key fetched from its URL, checked against the pin, and kept."""
        if not key.url:
            raise KeyProblem(f"no URL to fetch the key {key.fingerprint} from; give --key FILE")
        try:
            data = get_small(client, key.url)
        except FetchError as e:
            raise KeyProblem(f"the signing key could not be fetched: {e}") from None
        if data is None:
            raise KeyProblem(f"the signing key could not be fetched: {key.url}: HTTP 404")
        return self._keep(key, data, key.url, reporter)

    def _keep(self, key: SigningKey, data: bytes, source: str, reporter: Reporter) -> StoredKey:
        fpr = normalise_fingerprint(key.fingerprint)
        pinned, keys = inspect_key(data, fpr, source)
        now = datetime.now(UTC).replace(microsecond=0)
        meta = {
            "fingerprint": fpr,
            "source": source,
            "fetched_at": _iso(now.timestamp()),
            "published_sha256": hashlib.sha256(data).hexdigest(),
            "keys": [k.as_dict() for k in keys],
        }
        asc, meta_file = self._paths(fpr)
        self.root.mkdir(parents=True, exist_ok=True)
        had = asc.exists()
        changed = atomic.write_bytes(asc, pinned, if_changed=True)
        atomic.write_json(meta_file, meta)
        current = [k for k in keys[1:] if k.can_sign and not k.revoked
                   and (k.expires is None or k.expires > now.timestamp())]  # fmt: skip
        what = "updated" if had and changed else "unchanged" if had else "kept"
        listed = ", ".join(
            k.fingerprint + (f" (until {_iso(k.expires)[:10]})" if k.expires else "")
            for k in current
        )
        reporter.note(f"signing key {fpr} from {source} ({what} in {asc.parent}); current "
                      f"signing subkeys: {listed or 'none'}")  # fmt: skip
        return StoredKey(fpr, asc, pinned, source, meta["fetched_at"], keys, fetched_now=True)


# -- checking a signature -----------------------------------------------------------------------------


@dataclass(frozen=True)
class GoodSignature:
    signing_key: str  # fingerprint of the (sub)key that made the signature
    primary_key: str  # fingerprint of its primary key: the pinned one
    signed_at: str  # ISO 8601, UTC
    key_expired: bool  # the subkey has expired since (an older release, signed in its time)


@dataclass
class Verifier:
    """gpgv against a keyring holding only the stored key; use as a context manager."""

    key: StoredKey
    _home: _GpgHome | None = field(default=None, repr=False)
    keyring: Path | None = None

    def __enter__(self) -> Self:
        self._home = _GpgHome().__enter__()
        self.keyring = self._home.home / "trusted.gpg"
        dearmored = self._home.gpg("--dearmor", data=self.key.data)
        self.keyring.write_bytes(dearmored.stdout)
        return self

    def __exit__(self, *exc) -> None:
        if self._home is not None:
            self._home.__exit__(*exc)
            self._home = None

    def verify(self, data: Path, signature: Path, name: str) -> GoodSignature:
        """GoodSignature, or SignatureRefused saying why; `name` is what the message calls it."""
        assert self.keyring is not None, "use Verifier as a context manager"
        pinned = self.key.fingerprint
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
                "(corrupted or tampered with); it was deleted",
                "bad",
                words["BADSIG"][0],
            )
        if "NO_PUBKEY" in words:
            k = words["NO_PUBKEY"][0]
            raise SignatureRefused(
                f"{refuse} it was signed by key {k}, which is neither the trusted key {pinned} "
                f"nor one of its subkeys in {self.key.describe()}",
                "unknown-key",
                k,
            )
        if "REVKEYSIG" in words:
            k = words["REVKEYSIG"][0]
            raise SignatureRefused(
                f"{refuse} it was signed by key {k}, which has been revoked ({self.key.describe()})"
                ": its publisher no longer vouches for what it signed. Take another release, "
                "signed by a current subkey, and read the publisher's security notices",
                "revoked",
                k,
            )
        if "ERRSIG" in words:
            raise SignatureRefused(
                f"{refuse} gpgv could not check the signature by key {words['ERRSIG'][0]} "
                f"(ERRSIG {' '.join(words['ERRSIG'][1:])})",
                "unreadable",
                words["ERRSIG"][0],
            )
        if "NODATA" in words:
            raise SignatureRefused(
                f"{refuse} its .sig file is not an OpenPGP signature", "unreadable"
            )
        valid = [s for s in status if s[0] == "VALIDSIG"]
        good = "GOODSIG" in words or "EXPKEYSIG" in words
        if r.returncode != 0 or not valid or not good:
            detail = r.stderr.decode(errors="replace").strip().splitlines()
            raise SignatureRefused(
                f"{refuse} gpgv did not accept the signature (exit {r.returncode}"
                + (f": {detail[-1]}" if detail else "") + ")", "unreadable")  # fmt: skip
        # VALIDSIG <fpr> <date> <timestamp> <expire> <version> <reserved> <pk-algo> <hash-algo>
        #          <class> <primary-fpr>   (GnuPG doc/DETAILS)
        for v in valid:
            primary = v[10].upper() if len(v) > 10 else v[1].upper()
            if primary != pinned:
                raise SignatureRefused(
                    f"{refuse} it was signed by key {v[1]} of primary key {primary}, not by "
                    f"{pinned} or one of its subkeys",
                    "other-primary",
                    v[1],
                )
        v = valid[0]
        signer, signed_ts = v[1].upper(), int(v[3])
        signed_at = _iso(signed_ts)
        key = self.key.key(signer)
        if key is None or not key.can_sign:
            raise SignatureRefused(
                f"{refuse} it was signed by key {signer}, which {self.key.describe()} does not "
                "allow to sign",
                "not-signing",
                signer,
            )
        if key.expires is not None and signed_ts > key.expires:
            raise SignatureRefused(
                f"{refuse} it was signed on {signed_at} by subkey {signer}, which expired on "
                f"{_iso(key.expires)}, before that, says {self.key.describe()}: a signature made "
                "after its key expired is not trusted",
                "expired",
                signer,
            )
        return GoodSignature(signing_key=signer, primary_key=pinned, signed_at=signed_at,
                             key_expired="EXPKEYSIG" in words)  # fmt: skip
