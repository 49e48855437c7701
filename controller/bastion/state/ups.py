"""What the UPS watch (bastion.ups) must not forget across a restart: where the power-cut
policy stands (its phase, which relays it opened and must power on again, who was asked to
shut down) and the relays as it last saw them. A controller restarted in the middle of a power
cut then still holds power-ons, still brings the nodes back when mains returns, and, with a
device that does not answer when the relays open, still knows which machines were off.

One row in the history's SQLite file, beside the operator's state (`StateTable`). Deleting the
database forgets it: the policy starts from `mains` and judges the UPS afresh.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from bastion.state.events import StateTable

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ups_state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    state TEXT NOT NULL,           -- {"memory": bastion.ups.core.Memory, "asked": {machine: why},
                                   --  "relays": {channel: "on"/"off"/...} as last seen}
    ts REAL NOT NULL
);
"""


class UpsState(StateTable):
    def __init__(self, path: Path | str):
        super().__init__(path, _SCHEMA)

    def get(self) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT state FROM ups_state WHERE id = 1").fetchone()
        return json.loads(row[0]) if row else None

    def put(self, state: dict[str, Any]) -> None:
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO ups_state (id, state, ts) VALUES (1, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET state = excluded.state, ts = excluded.ts",
                (json.dumps(state, sort_keys=True), time.time()),
            )
