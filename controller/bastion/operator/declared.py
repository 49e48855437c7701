"""The whole declaration in the site files, for the plan's `changes`: what a local edit undid.

The operator acts on three words per machine (`power`, `maintenance`, `reprovision`), and the
plan always listed their changes. Every other edit of the files (a machine's MAC, role,
addresses, wireguard or labels; site.yaml; a template) changes what the controller serves and
nothing the operator switches, so it showed nowhere, and when the fleet operator wrote git's
declaration over a local edit made during an outage, nothing said what was undone. So the plan
also compares a `Declared`, read from the files, with the one taken when the declaration was
last applied:

- each machine's machines.yaml entry in its canonical form (the schema's reading: `disk:
  /dev/...` as `disk: {device: ...}`, MACs normalised, defaults left out), flattened into
  dotted fields (`labels.rack`, `wireguard.address`); lists count as one value;
- the machines' order in machines.yaml (the first server starts a k3s cluster, tunnel addresses
  are counted in it);
- every other configuration file (the set the holder's poll watches: not `assets/` nor `var/`,
  no dotfiles) by its SHA-256, never its contents.

The site files hold no secrets by design (they are in the secret store), but `metadata` is free
for anyone to fill: a field whose name says it may hold one (SECRET_WORDS), or whose value has
such a key inside it, is named as changed without its values.

Read from the files directly rather than from the loaded Site: a Site keeps neither the entries
as written nor the files' bytes. A file edited between this read and the load of the same plan
is at worst listed once too often: apply reads before it reloads.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bastion import yamlfile
from bastion.site.holder import fingerprint
from bastion.site.schema import MachineEntry
from bastion.state.events import StateTable

MACHINES = "machines.yaml"
# The words that the operator acts on: the plan lists them from the declaration it applies
# (site.yaml `defaults:` included), so they are left out of the entries' fields here.
OPERATOR_FIELDS = ("power", "maintenance", "reprovision")
# A key whose name contains one of these may hold a secret: its value is never shown.
SECRET_WORDS = re.compile(r"pass|secret|token|private|credential|psk|key", re.IGNORECASE)
# ... and so may a text that sets one: `--token=...` in k3s.args, `password: ...` in a list.
SECRET_SETTING = re.compile(r"(pass|secret|token|private|credential|psk|key)[\w-]*\s*[=:]",
                            re.IGNORECASE)  # fmt: skip
HIDDEN = "(secret)"


@dataclass(frozen=True)
class Declared:
    """The site files' declaration, as far as the plan compares it."""

    machines: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> field -> value
    order: tuple[str, ...] = ()  # the machines in machines.yaml order
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256 (hex)

    def as_json(self) -> str:
        return json.dumps({"machines": self.machines, "order": list(self.order),
                           "files": self.files}, sort_keys=True)  # fmt: skip

    @classmethod
    def of_json(cls, text: str) -> Declared:
        doc = json.loads(text)
        return cls(machines=doc.get("machines") or {}, order=tuple(doc.get("order") or ()),
                   files=doc.get("files") or {})  # fmt: skip


def _flat(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flat(v, f"{prefix}.{k}", out)
    else:
        out[prefix] = value


def entry_fields(entry: dict[str, Any]) -> dict[str, Any]:
    """One machines.yaml entry (canonical, `name` left out) as dotted fields."""
    out: dict[str, Any] = {}
    for k, v in entry.items():
        if k != "name" and k not in OPERATOR_FIELDS:
            _flat(v, k, out)
    return out


def _entries(data: bytes) -> tuple[dict[str, dict[str, Any]], tuple[str, ...]]:
    """machines.yaml's entries by name, and their order. An entry the schema refuses is read as
    written: the site does not load then, and the plan that reads this is refused anyway."""
    try:
        doc = yamlfile.load(data, MACHINES)
    except yamlfile.YamlError:
        return {}, ()
    items = doc.get("machines") if isinstance(doc, dict) else None
    machines: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    for item in items if isinstance(items, list) else ():
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            continue
        try:
            entry = MachineEntry.model_validate(item).model_dump(
                mode="json", exclude_none=True, exclude_defaults=True)  # fmt: skip
        except ValueError:
            entry = json.loads(json.dumps(item, default=str))
        if item["name"] not in machines:  # a name given twice: the loader refuses the file
            machines[item["name"]] = entry_fields(entry)
            order.append(item["name"])
    return machines, tuple(order)


class DeclaredReader:
    """Reads a site directory's `Declared`, hashing again only the files whose size or mtime
    changed, and parsing machines.yaml again only when its bytes did (a plan reads them all)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._lock = threading.Lock()  # plans read outside the operator's lock
        self._digests: dict[str, tuple[int, int, str]] = {}  # rel -> (mtime_ns, size, sha256)
        self._parsed: tuple[str, dict[str, dict[str, Any]], tuple[str, ...]] | None = None

    def read(self) -> Declared:
        with self._lock:
            files: dict[str, str] = {}
            digests: dict[str, tuple[int, int, str]] = {}
            machines: dict[str, dict[str, Any]] = {}
            order: tuple[str, ...] = ()
            for rel, mtime, size in fingerprint(self.root):
                known = self._digests.get(rel)
                data = None
                if known is not None and known[:2] == (mtime, size) and rel != MACHINES:
                    digest = known[2]
                else:
                    try:
                        data = (self.root / rel).read_bytes()
                    except OSError:
                        continue  # gone since, or a link to a directory: not a file's bytes
                    digest = hashlib.sha256(data).hexdigest()
                digests[rel] = (mtime, size, digest)
                if rel != MACHINES:
                    files[rel] = digest
                elif self._parsed is not None and self._parsed[0] == digest:
                    machines, order = self._parsed[1], self._parsed[2]
                elif data is not None:
                    machines, order = _entries(data)
                    self._parsed = (digest, machines, order)
            self._digests = digests
            return Declared(machines=machines, order=order, files=files)


def _secret(path: str, value: Any) -> bool:
    if any(SECRET_WORDS.search(part) for part in path.split(".")[1:]):
        return True
    return _holds_secret_key(value)


def _holds_secret_key(value: Any) -> bool:
    if isinstance(value, dict):
        return any(SECRET_WORDS.search(str(k)) or _holds_secret_key(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_holds_secret_key(v) for v in value)
    return isinstance(value, str) and SECRET_SETTING.search(value) is not None


def machine_changes(name: str, before: dict[str, Any], after: dict[str, Any]) -> list[dict[str, Any]]:
    """The fields of one machine's entry that differ, each `{"machine", "field", "from",
    "to"}`; a field absent on one side is None there, a secret's values are HIDDEN."""
    out = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if old == new:
            continue
        if _secret(key, old) or _secret(key, new):
            out.append({"machine": name, "field": key, "from": HIDDEN, "to": HIDDEN,
                        "secret": True})  # fmt: skip
        else:
            out.append({"machine": name, "field": key, "from": old, "to": new})
    return out


def site_changes(before: Declared, after: Declared) -> list[dict[str, Any]]:
    """The machines' order (of those in both) and every other file that differs: entries with
    `machine` None, `file` the path (or None for the order) and SHA-256 digests, None for a
    file that is not there."""
    out: list[dict[str, Any]] = []
    both = set(before.order) & set(after.order)
    old_order = [n for n in before.order if n in both]
    new_order = [n for n in after.order if n in both]
    if old_order != new_order:
        out.append({"machine": None, "file": MACHINES, "field": "order", "from": old_order,
                    "to": new_order})  # fmt: skip
    for rel in sorted(set(before.files) | set(after.files)):
        old, new = before.files.get(rel), after.files.get(rel)
        if old != new:
            out.append({"machine": None, "file": rel, "field": "sha256", "from": old, "to": new})
    return out


_SCHEMA = """
CREATE TABLE IF NOT EXISTS operator_declared (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    declared TEXT NOT NULL,        -- bastion.operator.declared.Declared as JSON
    generation INTEGER,            -- the site generation it was applied with
    ts REAL NOT NULL
);
"""


class DeclaredState(StateTable):
    """The `Declared` last applied, beside the operator's other state in the history's
    database, so that a restart during an outage still knows what was applied."""

    def __init__(self, path: Path | str):
        super().__init__(path, _SCHEMA)

    def get(self) -> Declared | None:
        with self._lock:
            row = self._db.execute("SELECT declared FROM operator_declared WHERE id = 1").fetchone()
        return Declared.of_json(row[0]) if row else None

    def put(self, declared: Declared, generation: int | None) -> None:
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO operator_declared (id, declared, generation, ts) VALUES (1, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET declared = excluded.declared, "
                "generation = excluded.generation, ts = excluded.ts",
                (declared.as_json(), generation, time.time()),
            )
