"""One-time Ignition URLs: how a machine's secrets reach it and nobody else, as far as a LAN allows.

A profile whose Ignition template reads `secrets` (bastion.render.config.uses_secrets) is never
served at `/ignition?mac=...`. Instead, when the machine's boot script (/ipxe, /grub) is served,
the controller issues a token and puts `ignition.config.url=<controller>/ignition?token=<T>&mac=...`
in the kernel arguments. The token is:

- random (256 bits), and stored only as its SHA-256: the database never holds a usable token;
- bound to the machine (its machines.yaml entry and group), to the MAC the script was asked for,
  and to the address that asked for the script (the request's client address);
- good until `expires_at` (issue time + the TTL, `serve --ignition-token-ttl`);
- good for one successful fetch: redeeming is one `UPDATE ... WHERE used_at IS NULL` in a
  synchronous=FULL transaction, so two racing fetches cannot both win and a restart does not
  make a used token good again;
- the only live one of its machine: issuing a new one supersedes the machine's unused ones.

Theory of operation (states of one token):

    issued --fetch, all checks pass, config rendered--> used      (200, the config)
    issued --another token issued for the machine-----> superseded
    issued --time passes expires_at-------------------> expired
    used / superseded / expired --any fetch-----------> refused, 410
    issued --fetch from another address or MAC--------> stays issued; that fetch refused, 403
    (no such token: never issued, or the history was deleted) ---> refused, 403

A fetch whose config cannot be rendered (500) does not use the token. What the binding is worth:
Ignition's request carries no MAC, so the controller checks what it can see: the `mac=` in the
URL (which is in the URL it issued, so it only catches edited URLs) and the client address,
which must be the one that fetched the boot script. Such a machine must have machines.yaml
`address:` (a DHCP reservation; the site loader refuses it without one), and the script itself
is served only to that address. A LAN host can still read the boot script off the wire and race
the node for the one fetch, or spoof the node's address; then the
node's own fetch is refused and recorded, so a stolen secret does not go unnoticed.
docs/controller.md#one-time-ignition-urls says the same for users.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bastion.state.secrets import random_token
from bastion.state.events import StateTable

DEFAULT_TTL_S = 15 * 60
#: Rows stay this long after they expire, so that a late fetch is told "expired", not "unknown".
KEEP_S = 24 * 3600

#: Why a fetch was refused -> the HTTP status it gets.
REASONS = {
    "unknown": 403,
    "wrong-machine": 403,
    "reused": 410,
    "expired": 410,
    "superseded": 410,
}

_TOKEN = re.compile(r"[0-9a-f]{64}")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ignition_tokens (
    digest TEXT PRIMARY KEY,      -- SHA-256 of the token, hex; the token itself is never stored
    machine TEXT NOT NULL,
    mac TEXT,
    grp TEXT NOT NULL,
    profile TEXT NOT NULL,
    client TEXT,                  -- the address that fetched the boot script
    issued_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    used_at REAL,
    used_by TEXT,
    superseded_at REAL
);
CREATE INDEX IF NOT EXISTS ignition_tokens_machine ON ignition_tokens (machine, used_at);
"""


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Grant:
    """A token's row: what it is bound to."""

    digest: str
    machine: str
    mac: str | None
    group: str
    profile: str
    client: str | None
    issued_at: float
    expires_at: float
    used_at: float | None = None
    used_by: str | None = None
    superseded_at: float | None = None

    @property
    def ref(self) -> str:
        """A short name for events and logs: a prefix of the digest (useless as a token)."""
        return self.digest[:12]


class TokenRefused(Exception):
    def __init__(self, reason: str, message: str, grant: Grant | None = None):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.grant = grant

    @property
    def status(self) -> int:
        return REASONS[self.reason]


def _spent(grant: Grant, now: float) -> TokenRefused | None:
    """Why the token can no longer be used (used, superseded, expired: the first that applies,
    each with its own reason, since `reused` tells an operator that someone else may hold the
    secrets), or None while it is good."""
    if grant.used_at is not None:
        return TokenRefused(
            "reused",
            f"this one-time Ignition URL of {grant.machine} was already used "
            f"(by {grant.used_by or 'an unknown address'}); boot the machine again for a new one",
            grant,
        )
    if grant.superseded_at is not None:
        return TokenRefused(
            "superseded",
            f"this one-time Ignition URL of {grant.machine} was replaced by a newer boot script's",
            grant,
        )
    if now >= grant.expires_at:
        return TokenRefused(
            "expired",
            f"this one-time Ignition URL of {grant.machine} expired {now - grant.expires_at:.0f} s ago "
            f"(it is good for {grant.expires_at - grant.issued_at:.0f} s); boot the machine again",
            grant,
        )
    return None


class IgnitionTokens(StateTable):
    """The token table, in the history's SQLite file. `clock` is injectable for tests."""

    def __init__(self, path: Path | str, ttl_s: float = DEFAULT_TTL_S, clock: Callable[[], float] = time.time):
        self.ttl_s = ttl_s
        self.clock = clock
        super().__init__(path, _SCHEMA)

    def issue(self, *, machine: str, mac: str | None, group: str, profile: str, client: str | None) -> tuple[str, Grant]:
        """A new token for `machine`; its earlier unused tokens are superseded."""
        token = random_token(32)
        now = self.clock()
        grant = Grant(digest(token), machine, mac, group, profile, client, now, now + self.ttl_s)
        with self._lock, self._db:
            self._db.execute(
                "UPDATE ignition_tokens SET superseded_at = ? WHERE machine = ? AND used_at IS NULL"
                " AND superseded_at IS NULL",
                (now, machine),
            )
            self._db.execute("DELETE FROM ignition_tokens WHERE expires_at < ?", (now - KEEP_S,))
            self._db.execute(
                "INSERT INTO ignition_tokens (digest, machine, mac, grp, profile, client, issued_at,"
                " expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (grant.digest, machine, mac, group, profile, client, grant.issued_at, grant.expires_at),
            )
        return token, grant

    def lookup(self, token: str) -> Grant | None:
        if not _TOKEN.fullmatch(token or ""):
            return None
        with self._lock:
            row = self._db.execute(
                "SELECT digest, machine, mac, grp, profile, client, issued_at, expires_at, used_at,"
                " used_by, superseded_at FROM ignition_tokens WHERE digest = ?",
                (digest(token),),
            ).fetchone()
        return Grant(*row) if row else None

    def check(self, token: str, *, client: str | None, mac: str | None) -> Grant:
        """The token's grant if a fetch by `client` (with `mac=` when the URL has one) may use
        it now; else raise TokenRefused. Uses nothing up: see `redeem`."""
        grant = self.lookup(token)
        if grant is None:
            raise TokenRefused(
                "unknown",
                "unknown Ignition token: it was never issued here, or the controller's history was "
                "deleted; boot the machine again for a new one",
            )
        spent = _spent(grant, self.clock())
        if spent is not None:
            raise spent
        if grant.client and client != grant.client:
            raise TokenRefused(
                "wrong-machine",
                f"this one-time Ignition URL belongs to {grant.machine}, whose boot script went to "
                f"{grant.client}; this request came from {client or 'an unknown address'}",
                grant,
            )
        if mac and grant.mac and mac != grant.mac:
            raise TokenRefused(
                "wrong-machine",
                f"this one-time Ignition URL belongs to {grant.machine} ({grant.mac}), not {mac}",
                grant,
            )
        return grant

    def redeem(self, grant: Grant, *, client: str | None) -> Grant:
        """Use the token up, atomically; TokenRefused when it can no longer be used: another
        fetch won the race ("reused"), or since `check` it was superseded or expired (while
        its config rendered), each said as what it is."""
        now = self.clock()
        with self._lock, self._db:
            cur = self._db.execute(
                "UPDATE ignition_tokens SET used_at = ?, used_by = ? WHERE digest = ? AND used_at IS NULL"
                " AND superseded_at IS NULL AND expires_at > ?",
                (now, client, grant.digest, now),
            )
            if cur.rowcount != 1:
                row = self._db.execute(
                    "SELECT digest, machine, mac, grp, profile, client, issued_at, expires_at, used_at,"
                    " used_by, superseded_at FROM ignition_tokens WHERE digest = ?",
                    (grant.digest,),
                ).fetchone()
        if cur.rowcount != 1:
            # the UPDATE's conditions are _spent's, so the row as it is now says which failed; no
            # row: issue() deleted it, KEEP_S after it expired
            spent = _spent(Grant(*row), now) if row is not None else _spent(grant, max(now, grant.expires_at))
            assert spent is not None
            raise spent
        return Grant(**{**grant.__dict__, "used_at": now, "used_by": client})

    def live(self, machine: str) -> Grant | None:
        """The machine's current unused, unexpired token, if any (for status views)."""
        with self._lock:
            row = self._db.execute(
                "SELECT digest, machine, mac, grp, profile, client, issued_at, expires_at, used_at,"
                " used_by, superseded_at FROM ignition_tokens WHERE machine = ? AND used_at IS NULL"
                " AND superseded_at IS NULL AND expires_at > ? ORDER BY issued_at DESC LIMIT 1",
                (machine, self.clock()),
            ).fetchone()
        return Grant(*row) if row else None
