"""Where the controller is in the device's event stream, kept across a restart of the
controller: `DeviceLink.cursor()` (the device's boot id, the seq of its next event), so that a
restarted controller resumes from it (`DeviceLink(cursor=...)`) and records the events the
device said while it was stopped, as far as the device's ring still holds them
(docs/serial-protocol.md, "Events after a reconnect").

One row in the history's SQLite file, beside the events it counts (`StateTable`). Deleting the
database forgets it: the device's present boot is then caught up from the seq its hello names.
"""

from __future__ import annotations

import time
from pathlib import Path

from bastion.state.events import StateTable

_SCHEMA = """
CREATE TABLE IF NOT EXISTS device_cursor (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    boot TEXT NOT NULL,            -- the device's boot id
    seq INTEGER NOT NULL,          -- the seq of that boot's next event to record
    ts REAL NOT NULL
);
"""


class EventCursor(StateTable):
    """One row, written in one transaction. A row for a boot the device is no longer on means
    that boot's missed events are gone with it, and the device's present boot is caught up
    from its start. Kept every few seconds (bastion.device.hub), not per event: a controller
    that is killed fetches again the events of its last seconds, which the history then
    recognises by boot id and seq and does not store twice (bastion.state.events)."""

    def __init__(self, path: Path | str):
        super().__init__(path, _SCHEMA)

    def get(self) -> tuple[str, int] | None:
        with self._lock:
            row = self._db.execute("SELECT boot, seq FROM device_cursor WHERE id = 1").fetchone()
        return (row[0], row[1]) if row else None

    def put(self, cursor: tuple[str, int]) -> None:
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO device_cursor (id, boot, seq, ts) VALUES (1, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET boot = excluded.boot, seq = excluded.seq, "
                "ts = excluded.ts",
                (cursor[0], cursor[1], time.time()),
            )
