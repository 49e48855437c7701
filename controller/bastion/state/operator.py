"""What the operator (bastion.operator) must not forget across a restart: each machine's
memory (a person's hold, Failed, the cycles spent, the reprovision word acted on) and the
declaration last applied (what `sync: manual` converges on until `bastion apply`).

Controller state beside the install marks, in the history's SQLite file (`open_state_db`,
synchronous=FULL, one transaction per change). Deleting the database forgets holds and
failures: the operator then judges every machine afresh (a boot it did not see begin, never).
A machine's memory goes when the machine leaves the declaration (Operator._forget_undeclared).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from bastion.state.events import StateTable

_SCHEMA = """
CREATE TABLE IF NOT EXISTS operator_memory (
    machine TEXT PRIMARY KEY,
    memory TEXT NOT NULL,          -- bastion.operator.core.Memory as JSON
    ts REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS operator_applied (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    desired TEXT NOT NULL,         -- {machine: {power, maintenance, reprovision}}
    generation INTEGER,            -- the site generation it was applied from
    ts REAL NOT NULL
);
"""


class OperatorState(StateTable):
    def __init__(self, path: Path | str):
        super().__init__(path, _SCHEMA)

    def memories(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT machine, memory FROM operator_memory").fetchall()
        return {m: json.loads(doc) for m, doc in rows}

    def put(self, machine: str, memory: dict[str, Any]) -> None:
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO operator_memory (machine, memory, ts) VALUES (?, ?, ?) "
                "ON CONFLICT (machine) DO UPDATE SET memory = excluded.memory, ts = excluded.ts",
                (machine, json.dumps(memory, sort_keys=True), time.time()),
            )

    def forget(self, machine: str) -> None:
        with self._lock, self._db:
            self._db.execute("DELETE FROM operator_memory WHERE machine = ?", (machine,))

    def applied(self) -> tuple[dict[str, dict[str, Any]], int | None, float] | None:
        """(desired by machine, generation, when) of the declaration last applied, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT desired, generation, ts FROM operator_applied WHERE id = 1"
            ).fetchone()
        return (json.loads(row[0]), row[1], row[2]) if row else None

    def set_applied(self, desired: dict[str, dict[str, Any]], generation: int | None) -> None:
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO operator_applied (id, desired, generation, ts) VALUES (1, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET desired = excluded.desired, "
                "generation = excluded.generation, ts = excluded.ts",
                (json.dumps(desired, sort_keys=True), generation, time.time()),
            )
