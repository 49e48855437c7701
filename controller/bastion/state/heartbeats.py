"""What the nodes' heartbeats said last: per machine, the boot id and the k3s state of its latest
beat (POST /heartbeat, sent by the k3s Butane's bastion-heartbeat.timer every few seconds).

A beat goes into the event history only when it says something new: the first beat of a boot
(a boot id the machine has not sent before) or a change of its k3s state, against what it said
last, before a restart too (seed). The others are only
remembered here and counted (bastion_heartbeats). Beats are kept per machine the site declares,
so the memory is bounded by machines.yaml, not by what a LAN host sends; a node's fields are
checked (`fields`) before anything is kept.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# /proc/sys/kernel/random/boot_id is a UUID; a k3s state is what `systemctl is-active` prints.
_BOOT_ID = re.compile(r"[0-9A-Fa-f-]{1,64}")
_STATE = re.compile(r"[a-z-]{1,32}")
_NODE = re.compile(r"[A-Za-z0-9._-]{1,253}")


class BadBeat(ValueError):
    pass


@dataclass(frozen=True)
class Beat:
    machine: str
    boot_id: str | None
    k3s: str | None
    node: str | None
    at: float


def fields(raw: Mapping[str, str]) -> dict[str, str | None]:
    """A beat's optional fields, checked: node, boot_id, k3s; BadBeat names the bad one."""
    out: dict[str, str | None] = {}
    for key, pattern, what in (("node", _NODE, "a node name"),
                               ("boot_id", _BOOT_ID, "a boot id (a UUID)"),
                               ("k3s", _STATE, "a unit state such as active")):  # fmt: skip
        value = raw.get(key) or None  # empty: not known (systemctl without a systemd)
        if value is not None and not pattern.fullmatch(value):
            raise BadBeat(f"{key}: {value[:80]!r} is not {what}")
        out[key] = value
    return out


class Heartbeats:
    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self._lock = threading.Lock()
        self._last: dict[str, Beat] = {}  # the beats heard since the controller started
        # per machine, the (boot id, k3s state) its latest beat said: what "new" is measured
        # against, seeded from the history at start (seed) so that a restart is no news
        self._said: dict[str, tuple[str | None, str | None]] = {}

    def seed(self, recorded: Iterable[tuple[str, Mapping[str, Any]]]) -> None:
        """What the machines' beats said before the controller started: (machine, payload) of
        each machine's newest `heartbeat` event. Every beat that said nothing new was the same
        as the recorded one before it, so that is what the machine said last. Without this,
        each machine's first beat after a restart was recorded as the first of a boot. Not a
        beat heard (last() stays None until one comes: bastion.ups counts on that)."""
        with self._lock:
            for machine, payload in recorded:
                self._said.setdefault(machine, (payload.get("boot_id"), payload.get("k3s")))

    def beat(self, machine: str, checked: Mapping[str, str | None]) -> tuple[Beat, str | None]:
        """Remember `machine`'s beat; returns it and what is new about it: "boot" (a boot id
        not seen before: the first beat of a boot), "k3s" (its k3s state changed), or None."""
        beat = Beat(machine, checked.get("boot_id"), checked.get("k3s"), checked.get("node"),
                    self.clock())  # fmt: skip
        with self._lock:
            said = self._said.get(machine)
            self._last[machine] = beat
            self._said[machine] = (beat.boot_id, beat.k3s)
        if said is None or (beat.boot_id and beat.boot_id != said[0]):
            return beat, "boot"
        if beat.k3s != said[1]:
            return beat, "k3s"
        return beat, None

    def last(self, machine: str) -> Beat | None:
        with self._lock:
            return self._last.get(machine)
