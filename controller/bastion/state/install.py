"""Install-once: a machine whose profile says `install: once` network-boots until it reports a
successful first boot, then boots its local disk until `bastion machine reprovision NAME`.

The mark ("installed", with when and which callback) is controller state, not a site file: it
lives in the history's SQLite file (`open_state_db`, synchronous=FULL, one transaction per change),
keyed by the machine's name in machines.yaml. Deleting the database forgets every mark: those
machines network-boot (and so install) again at their next boot.

What counts as a successful first boot: a `POST /callback` naming the machine (by its MAC) with
`stage` `booted` or `installed` and, when it has a `status`, one of SUCCESS_STATUSES. /callback
is public like every boot endpoint: a LAN host that knows a MAC can mark a machine installed
(reprovision undoes it), so the mark only changes what the machine boots, never what it is given.
"""

from __future__ import annotations

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
    mac TEXT,
    profile TEXT,
    callback INTEGER              -- the id of the callback event that reported it
);
"""


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

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class InstallMarks(StateTable):
    def __init__(self, path: Path | str, clock: Callable[[], float] = time.time):
        self.clock = clock
        super().__init__(path, _SCHEMA)

    def get(self, machine: str) -> Installed | None:
        with self._lock:
            row = self._db.execute(
                "SELECT machine, installed_at, mac, profile, callback FROM machine_installed WHERE machine = ?",
                (machine,),
            ).fetchone()
        return Installed(*row) if row else None

    def all(self) -> dict[str, Installed]:
        with self._lock:
            rows = self._db.execute(
                "SELECT machine, installed_at, mac, profile, callback FROM machine_installed"
            ).fetchall()
        return {r[0]: Installed(*r) for r in rows}

    def mark(self, machine: str, *, mac: str | None, profile: str | None, callback: int | None) -> Installed | None:
        """Mark `machine` installed; the new mark, or None when it already was (no change)."""
        mark = Installed(machine, self.clock(), mac, profile, callback)
        with self._lock, self._db:
            cur = self._db.execute(
                "INSERT OR IGNORE INTO machine_installed (machine, installed_at, mac, profile, callback)"
                " VALUES (?, ?, ?, ?, ?)",
                (mark.machine, mark.installed_at, mark.mac, mark.profile, mark.callback),
            )
        return mark if cur.rowcount == 1 else None

    def clear(self, machine: str) -> Installed | None:
        """Forget the mark; the mark it was, or None when there was none."""
        with self._lock, self._db:
            row = self._db.execute(
                "SELECT machine, installed_at, mac, profile, callback FROM machine_installed WHERE machine = ?",
                (machine,),
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
