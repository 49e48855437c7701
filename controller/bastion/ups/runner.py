"""The UPS watch inside `bastion serve`: poll upsd, decide (bastion.ups.core), act.

One thread, like the operator's. Every `ups.poll_s`:

1. observe: the UPS through upsd (bastion.ups.nut; an error is a reading of None), the
   machines' latest heartbeats (POST /heartbeat, bastion.state.heartbeats) and relays (the
   device's `status`, through the hub);
2. decide: `core.decide`;
3. act: every action is first a `ups` event (source `ups`) with its reason, then its effect:
   `hold` keeps the nodes' channels out of the device's node watchdog and makes the hub refuse
   power-ons; `shutdown` puts the machine on the list its next heartbeat's answer carries
   (`"shutdown": reason`, which the node's bastion-heartbeat service acts on); `open` and
   `power-on` switch the relay through the device (its stagger spaces power-ons); `release`
   ends the hold. What the device refuses is an `ups` event (`error`) and is tried again by the
   next pass where the policy does so (an `open` while a relay is seen on).

The readings also feed the `bastion_ups_*` gauges (bastion.metrics).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bastion.device.hub import DeviceHub
from bastion.device.link import DeviceError
from bastion.model import Machine
from bastion.site.holder import SiteHolder
from bastion.state.heartbeats import Heartbeats
from bastion.state.secrets import SecretStore
from bastion.state.ups import UpsState
from bastion.ups import core
from bastion.ups.nut import Connect, NutClient, NutError

if TYPE_CHECKING:
    from bastion.operator.runner import Operator

log = logging.getLogger("bastion.ups")


def password_name(ups: str) -> str:
    """The secret store's name for the upsd password of UPS `ups`."""
    return f"ups/{ups}/password"


# Without a k3s cluster (site.yaml cluster:), these roles mark the machines shut down last.
SERVER_ROLES = ("server", "control-plane")
# how long a refused power-on after a cut is tried again (a channel's min_off_ms is at most
# this, the device's link back within it)
POWER_ON_RETRY_S = 900.0


def is_server(m: Machine) -> bool:
    """A k3s server of the site's cluster or, with no cluster, a machine whose role is a
    control plane's: shut down last and powered on first."""
    if m.node is not None:
        return bool(m.node.get("server"))
    return m.role in SERVER_ROLES


def _relays_of(kept: Any) -> dict[int, str]:
    """The relays as last seen, from the state kept (JSON: its channels are strings); none from
    a state written before they were kept, or one it does not recognise."""
    if not isinstance(kept, dict):
        return {}
    out = {}
    for ch, state in kept.items():
        try:
            out[int(ch)] = str(state)
        except ValueError:
            continue
    return out


class UpsWatch:
    def __init__(self, holder: SiteHolder, record: Callable[..., int], heartbeats: Heartbeats,
                 hub: DeviceHub | None = None, secrets: SecretStore | None = None,
                 state: UpsState | None = None, operator: Operator | None = None,
                 clock: Callable[[], float] = time.time):  # fmt: skip
        self.holder = holder
        # Whose declaration says a machine is to stay off after the cut: the operator's, as
        # applied (_declared_off). Without one, the site files'.
        self.operator = operator
        self.record = record
        self.heartbeats = heartbeats
        self.hub = hub
        self.secrets = secrets
        self.clock = clock
        self.connect: Connect | None = None  # how to reach upsd; None: a plain TCP connection
        self.state = state  # where the policy's memory outlives a restart
        kept = state.get() if state is not None else None
        self.mem = core.Memory.of(kept.get("memory") if kept else None)
        self.last: core.Ups | None = None
        self.last_error: str | None = None
        self.polls = 0
        # machine -> why it is asked to shut down
        self._asked: dict[str, str] = dict(kept.get("asked") or {}) if kept and self.mem.holding else {}
        self._told: set[str] = set()  # machines whose heartbeat answer carried the request
        self._client: NutClient | None = None
        self._lock = threading.RLock()  # one pass at a time
        self._ask_lock = threading.Lock()  # _asked and _told, read by the heartbeat endpoint
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Heartbeats live in memory: a watch restarted in a power cut knows no node's, and took
        # every node for down at once (relays opened, nobody asked). Until a quiet_s has passed
        # since it started, a node it has heard nothing from counts as beating at its start.
        self.started = clock()
        # The relays as last seen: a device that does not answer at the moment the relays open
        # must not make a machine that was off count as on (and be powered on after the cut).
        # Kept with the policy's memory: only in this watch's memory, a controller restarted in
        # the middle of a cut to a silent device counted every machine as on, and powered on at
        # the release those left off before it. What is known of a relay, best first: the
        # device's answer now; the relays as last seen, by this watch or the one before the
        # restart; the declaration (a machine declared `power: off` is never powered on again,
        # _effect). With none of them (a device silent since before the cut, in a database that
        # never saw it) it counts as on: opened, as a node nobody saw may be running on the
        # battery, and powered on at the release, as with no device at all.
        self._relays_seen: dict[int, str] = _relays_of(kept.get("relays") if kept else None)
        # machine -> when its power-on after the cut was first refused (the channel's minimum
        # off time, a device gone for a moment): tried again each pass (_retry_power_ons)
        self._power_on_retry: dict[str, float] = {}
        if hub is not None:
            hub.power_hold = self.holding
            if self.mem.holding:  # restarted in a power cut: the watchdog stays off the nodes
                hub.suspend_watch({m.relay for m in holder.site.machines if m.relay is not None})

    # --- the thread ---------------------------------------------------------------------------
    def start(self) -> UpsWatch:
        self._thread = threading.Thread(target=self._run, name="ups", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._client is not None:
            self._client.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            section = self.holder.site.settings.ups
            try:
                if section is not None:
                    self.pass_once()
            except Exception:  # a pass that fails must not end the watch
                log.exception("ups pass failed")
            self._stop.wait(section.poll_s if section is not None else 5)

    # --- what others ask ----------------------------------------------------------------------
    def holding(self) -> str | None:
        """Why power-ons are refused now, or None."""
        if not self.mem.holding:
            return None
        return f"the UPS policy holds power ({self.mem.phase}: a power cut)"

    def shutdown_for(self, machine: str) -> str | None:
        """The shutdown request a machine's heartbeat answer carries, if any; the first time it
        is handed out is an event (`told`)."""
        with self._ask_lock:  # not the pass's lock: a pass may be waiting on the device
            why = self._asked.get(machine)
            first = why is not None and machine not in self._told
            if first:
                self._told.add(machine)
        if first:
            self._event(core.Action("told", "the shutdown request went out in its heartbeat's "
                                    "answer", machine=machine))  # fmt: skip
        return why

    def gauges(self) -> dict[str, float]:
        """The bastion_ups_* gauges (bastion.metrics.UPS_GAUGES)."""
        out = {"bastion_ups_up": 1.0 if self.mem.answering and self.last is not None else 0.0,
               "bastion_ups_power_held": 1.0 if self.mem.holding else 0.0}  # fmt: skip
        if self.last is not None:
            out["bastion_ups_on_battery"] = 1.0 if self.last.on_battery else 0.0
            out["bastion_ups_low_battery"] = 1.0 if "LB" in self.last.status else 0.0
            if self.last.charge is not None:
                out["bastion_ups_battery_charge_percent"] = self.last.charge
        return out

    def describe(self) -> dict[str, Any]:
        section = self.holder.site.settings.ups
        return {"ups": section.name if section else None,
                "status": " ".join(self.last.status) if self.last else None,
                "charge": self.last.charge if self.last else None,
                "answering": self.mem.answering, "error": self.last_error,
                "phase": self.mem.phase, "holding": self.holding(),
                "asked": sorted(dict(self._asked)), "opened": list(self.mem.opened)}  # fmt: skip

    # --- a pass -------------------------------------------------------------------------------
    def _nut(self, section: Any) -> NutClient:
        password = None
        if section.username and self.secrets is not None:
            password = self.secrets.get(password_name(section.name))
        c = self._client
        wanted = (section.name, section.host, section.port, float(section.timeout_s),
                  section.username, password)  # fmt: skip
        if c is None or (c.ups, c.host, c.port, c.timeout, c.username, c.password) != wanted:
            if c is not None:
                c.close()
            kw = {"connect": self.connect} if self.connect is not None else {}
            c = self._client = NutClient(section.name, section.host, section.port,
                                         float(section.timeout_s), section.username, password, **kw)  # fmt: skip
        return c

    def _read(self, section: Any) -> tuple[core.Ups | None, str | None]:
        try:
            client = self._nut(section)
        except (OSError, ValueError) as e:  # the password's file: unreadable, not text, ...
            # as a UPS that does not answer: the policy still runs (a shutdown begun goes on to
            # the relays); raised, every pass ended here and a shutdown stalled before them
            why = e.strerror if isinstance(e, OSError) and e.strerror else e
            return None, f"the UPS password ({password_name(section.name)}) cannot be read: {why}"
        try:
            r = client.read()
        except NutError as e:
            return None, str(e)
        if not r.status or r.status == ("WAIT",):  # WAIT: upsd has nothing from the driver yet
            return None, f"upsd has no status for {section.name} ({r.status_text or 'none'})"
        return core.Ups(r.status, r.charge), None

    def _nodes(self, quiet_s: float) -> list[core.Node]:
        relays = self._relays()
        if relays is not None:
            self._relays_seen = relays
        now = self.clock()
        unheard = self.started if now - self.started < quiet_s else None
        out = []
        for m in self.holder.site.machines:
            beat = self.heartbeats.last(m.name)
            out.append(core.Node(
                name=m.name, relay=m.relay, server=is_server(m),
                beat_at=beat.at if beat else unheard,
                relay_state=self._relays_seen.get(m.relay) if m.relay is not None else None,
            ))  # fmt: skip
        return out

    def _relays(self) -> dict[int, str] | None:
        """Each channel "on" when its output or what it is to be is on: a channel mid-cycle or
        waiting for its staggered power-on was skipped as off, and the device switched it back
        on in the middle of the cut."""
        channels = self.hub.channels() if self.hub is not None else None
        if channels is None:
            return None
        return {c["ch"]: "on" if "on" in (c.get("output"), c.get("desired")) else str(c.get("output"))
                for c in channels}  # fmt: skip

    def pass_once(self) -> list[core.Action]:
        section = self.holder.site.settings.ups
        if section is None:
            return []
        ups, error = self._read(section)
        with self._lock:
            self.polls += 1
            self.last_error = error
            if ups is not None:
                self.last = ups
            old, seen = self.mem, self._relays_seen
            policy = core.Policy.of(section)
            acts, self.mem = core.decide(ups, error, self._nodes(policy.quiet_s), self.mem,
                                         self.clock(), policy)  # fmt: skip
            for a in acts:
                self._event(a)
                if a.effect:
                    self._effect(a)
            self._retry_power_ons()
            if self.state is not None and (self.mem != old or self._relays_seen != seen
                                           or any(a.effect for a in acts)):  # fmt: skip
                with self._ask_lock:
                    asked = dict(self._asked)
                self.state.put({"memory": self.mem.as_dict(), "asked": asked,
                                "relays": self._relays_seen})  # fmt: skip
            return acts

    def _retry_power_ons(self) -> None:
        """A power-on after the cut that the device refused (the channel went off less than its
        min_off_ms ago, a link down for a moment) is tried again each pass, for at most
        POWER_ON_RETRY_S, while power is not held again; a machine without `power: on`
        declared was otherwise left off for good."""
        if not self._power_on_retry or self.mem.holding or self.hub is None:
            return
        for name, first in list(self._power_on_retry.items()):
            m = self.holder.site.machine(name)
            if m is None or self._declared_off(m):
                # declared off since (or gone from the site): the declaration wins, as at the
                # first power-on (the retries powered it on all the same, for 15 minutes)
                del self._power_on_retry[name]
                self._event(core.Action("skipped", "not powered on again: declared power: off"
                                        if m is not None else "not powered on again: no longer in the site",
                                        machine=name))  # fmt: skip
                continue
            if self.clock() - first > POWER_ON_RETRY_S:
                del self._power_on_retry[name]
                self._event(core.Action("error", f"power-on: given up after {POWER_ON_RETRY_S:g} s "
                                        "of refusals", machine=name))  # fmt: skip
                continue
            try:
                self.hub.power(name, "on", source="ups")
            except (DeviceError, ValueError):
                continue
            del self._power_on_retry[name]
            self._event(core.Action("power-on", "powered on again after the power cut (once the "
                                    "device took it)", machine=name))  # fmt: skip

    def _declared_off(self, m: Machine) -> bool:
        """Whether `m` is to stay off after the cut: declared `power: off` in the declaration
        the operator acts on. With `sync: manual` that is the one applied, not the files: by
        the files, a machine edited to off but not yet applied stayed off until the operator
        powered it on again, and one edited to on but applied off was powered on for the
        operator to switch off. A machine the applied declaration does not have yet (added to
        the files, not applied) is the operator's to switch only once applied: it is powered on
        again like one with no `power:`."""
        if self.operator is None:
            return m.power == "off"
        declared = self.operator.declaration(m.name)
        return declared is not None and declared.get("power") == "off"

    def _event(self, a: core.Action, **more: Any) -> None:
        m = self.holder.site.machine(a.machine) if a.machine else None
        payload = {k: v for k, v in a.as_dict().items() if k != "machine"}
        payload.update(more, phase=self.mem.phase)
        self.record("ups", source="ups", machine=a.machine, mac=m.mac if m else None,
                    payload=payload)

    def _effect(self, a: core.Action) -> None:
        hub = self.hub
        if a.action == "hold":
            if hub is not None:
                hub.suspend_watch({m.relay for m in self.holder.site.machines if m.relay is not None})
        elif a.action == "shutdown" and a.machine:
            with self._ask_lock:
                self._asked[a.machine] = a.reason
        elif a.action == "release":
            with self._ask_lock:
                self._asked.clear()
                self._told.clear()
            if hub is not None:
                hub.resume_watch()
        elif a.action in ("open", "power-on") and a.machine:
            m = self.holder.site.machine(a.machine)
            if a.action == "power-on" and m is not None and self._declared_off(m):
                # declared off meanwhile (or all along): the declaration wins; powered on, it
                # would boot for the moment before the operator switched it off again
                self._event(core.Action("skipped", "not powered on again: declared power: off",
                                        machine=a.machine))  # fmt: skip
                return
            if hub is None:
                self._event(core.Action("error", f"{a.action}: no device (serve --device)",
                                        machine=a.machine))  # fmt: skip
                return
            try:
                hub.power(a.machine, "off" if a.action == "open" else "on", source="ups")
            except (DeviceError, ValueError) as e:
                self._event(core.Action("error", f"{a.action}: {e}", machine=a.machine))
                if a.action == "power-on":  # e.g. within the channel's minimum off time
                    self._power_on_retry.setdefault(a.machine, self.clock())
            else:
                if a.action == "open":
                    self._power_on_retry.pop(a.machine, None)
