"""Install-once: a machine whose profile says `install: once` network-boots until it reports a
successful first boot, then boots its local disk until `bastion machine reprovision NAME`.

The mark ("installed", with when and which callback) is controller state, not a site file: it
lives in the history's SQLite file (`open_state_db`, synchronous=FULL, one transaction per change),
keyed by the machine's name in machines.yaml. Deleting the database forgets every mark: those
machines network-boot (and so install) again at their next boot.

A mark is what was installed on which hardware: it records the machine's declared MAC and UUID
and its profile, and counts only while the machine is declared with those (`Installed.holds_for`).
A dead board replaced under the same name has a blank disk, and a machine moved to another
profile has the old one's system on it: both network-boot and install, and their report replaces
the mark.

What counts as a successful first boot: a `POST /callback` naming the machine (by its MAC, or the
UUID of a machine declared by its UUID alone) with `stage` `booted` or `installed` and, when it
has a `status`, one of SUCCESS_STATUSES. /callback is public like every boot endpoint: a LAN host
that knows a MAC can mark a machine installed (reprovision undoes it), so the mark only changes
what the machine boots, never what it is given.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bastion.state.events import StateTable

SUCCESS_STAGES = ("booted", "installed")
SUCCESS_STATUSES = ("ok", "success", "succeeded", "0")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS machine_installed (
    machine TEXT PRIMARY KEY,
    installed_at REAL NOT NULL,
    mac TEXT,                     -- its machines.yaml mac when it reported
    profile TEXT,                 -- the profile it installed
    callback INTEGER,             -- the id of the callback event that reported it
    uuid TEXT                     -- its machines.yaml uuid (added later: older marks have none)
);
"""
_COLUMNS = "machine, installed_at, mac, profile, callback, uuid"


def reports_success(fields: Mapping[str, Any]) -> bool:
    """Whether a callback's fields report a successful first boot."""
    if str(fields.get("stage", "")).strip().lower() not in SUCCESS_STAGES:
        return False
    status = fields.get("status")
    return status is None or str(status).strip().lower() in SUCCESS_STATUSES


@dataclass(frozen=True)
class Installed:
    machine: str
    installed_at: float
    mac: str | None
    profile: str | None
    callback: int | None
    uuid: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def holds_for(self, *, mac: str | None, uuid: str | None, profile: str) -> bool:
        """Whether the mark counts for the machine as declared now (its machines.yaml `mac` and
        `uuid`, its profile's id): made for that profile, and for the hardware the machine is
        recognised by, its MAC (or, declared by its UUID alone, its UUID); a UUID both recorded
        and declared must agree too. A mark from before UUIDs were recorded has none, and its
        MAC still counts: a mark wrongly voided reinstalls a machine, wiping its disk."""
        if self.profile != profile:
            return False
        if (self.mac != mac) if mac is not None else (self.uuid != uuid):
            return False
        return self.uuid is None or uuid is None or self.uuid == uuid


class InstallMarks(StateTable):
    def __init__(self, path: Path | str, clock: Callable[[], float] = time.time):
        self.clock = clock
        super().__init__(path, _SCHEMA)
        with self._lock, self._db:
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(machine_installed)")}
            if "uuid" not in columns:  # a history made before marks recorded the UUID
                try:
                    self._db.execute("ALTER TABLE machine_installed ADD COLUMN uuid TEXT")
                except sqlite3.OperationalError as e:  # another process added it just now
                    if "duplicate column" not in str(e):
                        raise

    def get(self, machine: str) -> Installed | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM machine_installed WHERE machine = ?", (machine,)
            ).fetchone()
        return Installed(*row) if row else None

    def all(self) -> dict[str, Installed]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM machine_installed").fetchall()
        return {r[0]: Installed(*r) for r in rows}

    def mark(self, machine: str, *, mac: str | None, profile: str, callback: int | None,
             uuid: str | None = None) -> Installed | None:  # fmt: skip
        """Mark `machine` installed, declared with this `mac`, `uuid` and `profile`; the new
        mark, or None when it already was (no change). A mark that does not hold for them (other
        hardware, another profile: Installed.holds_for) is replaced."""
        mark = Installed(machine, self.clock(), mac, profile, callback, uuid)
        with self._lock, self._db:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM machine_installed WHERE machine = ?", (machine,)
            ).fetchone()
            if row is not None and Installed(*row).holds_for(mac=mac, uuid=uuid, profile=profile):
                return None
            self._db.execute(
                f"INSERT OR REPLACE INTO machine_installed ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                (mark.machine, mark.installed_at, mark.mac, mark.profile, mark.callback, mark.uuid),
            )
        return mark

    def clear(self, machine: str) -> Installed | None:
        """Forget the mark; the mark it was, or None when there was none."""
        with self._lock, self._db:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM machine_installed WHERE machine = ?", (machine,)
            ).fetchone()
            if row is None:
                return None
            self._db.execute("DELETE FROM machine_installed WHERE machine = ?", (machine,))
        return Installed(*row)


# --- the boot scripts of an installed machine -----------------------------------------------------
# iPXE: on UEFI, `exit 1` hands control back to the firmware with an error status, which makes
# the boot manager try the next boot option (the disk); `exit 0` would make edk2 stop and show its
# boot menu. On BIOS, `sanboot --no-describe --drive 0x80` boots the first hard disk (ipxe.org
# /cmd/sanboot's example), and `exit 1` is the fallback (the BIOS tries its next boot device).


def local_ipxe(machine: str) -> str:
    return (
        "#!ipxe\n"
        f"# Edge Bastion: {machine} is installed (install: once): boot from its local disk.\n"
        f"# `bastion machine reprovision {machine}` makes it network-boot again.\n"
        f"echo {machine} is installed: booting from the local disk\n"
        "iseq ${platform} efi && exit 1 ||\n"
        "sanboot --no-describe --drive 0x80 || exit 1\n"
    )


def local_grub(machine: str) -> str:
    """GRUB: UEFI `exit 1` (back to the firmware, next boot option), BIOS: chainload the first
    disk's boot sector."""
    return (
        f"# Edge Bastion: {machine} is installed (install: once): boot from its local disk.\n"
        f"# `bastion machine reprovision {machine}` makes it network-boot again.\n"
        "default=0\n"
        "timeout=0\n"
        f'menuentry "{machine}: local disk" {{\n'
        '  if [ "${grub_platform}" = "efi" ]; then\n'
        "    exit 1\n"
        "  fi\n"
        "  set root=(hd0)\n"
        "  chainloader +1\n"
        "  boot\n"
        "}\n"
    )
