"""The operator inside `bastion serve`: observe, decide (bastion.operator.core), act.

One thread. A pass, at least every `operator.interval_s` and as soon as a boot event, a power
event or a site reload wakes it:

1. observe: the new events of the history, folded into each machine's boot `Progress` (the
   events already name their machine: bastion.state.addresses ties address-only steps to
   it); the relays as the device reports them (`status`, through the hub; none while the
   device does not answer, and then no power is switched); heartbeats (POST /heartbeat and
   callbacks, kept in memory); install-once marks;
2. decide: `core.decide` per machine, with the applied declaration: the site as loaded
   (`sync: auto`), or the one `bastion apply` adopted last (`sync: manual`; a machine added
   since is not looked at until it is applied);
3. act: every decision is first an `operator` event (source `operator`) with its reason, then
   its effect: power through the device (`DeviceHub.power`, whose stagger spaces the power-ons),
   an install-once mark cleared. What the device refuses is an event too, and the machine's
   memory stays as it was, to be tried again after `settle_s`.

A person's power command (the API, `bastion power`) holds the machine (`hold`) before it is
sent; `release` gives the machine back. `plan()` is what a pass would do with the declaration
on disk; `apply(plan_id)` reloads the site, adopts its declaration and does exactly that plan,
or refuses when the plan is no longer the one named.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from bastion.boot import reporting_machine
from bastion.device.hub import DeviceHub
from bastion.device.link import DeviceError
from bastion.model import Machine, Site
from bastion.operator import core
from bastion.operator.core import Action, Config, Memory, Progress, Seen, Want
from bastion.operator.declared import (
    Declared,
    DeclaredReader,
    DeclaredState,
    machine_changes,
    site_changes,
)
from bastion.site.holder import SiteHolder
from bastion.state.events import ATTRIBUTABLE_IDS, EventStore
from bastion.state.install import InstallMarks
from bastion.state.operator import OperatorState

log = logging.getLogger("bastion.operator")

# Events that may change a decision: a pass follows them at once.
WAKING_KINDS = ("power", "dhcp", "tftp", "boot", "asset", "callback", "site", "install", "device")
_CATCH_UP_BATCH = 1000
_HISTORY_ON_START = 20000  # events read back at start to know the boots in progress


class PlanChanged(RuntimeError):
    """`apply` was given a plan that is not what the operator would do now."""

    def __init__(self, wanted: str, plan: dict[str, Any]):
        self.plan = plan
        super().__init__(f"the plan changed since: {wanted} was planned, {plan['id']} would be "
                         "done now (bastion plan shows it)")  # fmt: skip


def declared_of(m: Machine) -> dict[str, Any]:
    """One machine's declaration as the operator acts on it (machines.yaml over site.yaml)."""
    return {"power": m.power, "maintenance": m.maintenance, "reprovision": m.reprovision}


def desired_of(site: Site) -> dict[str, dict[str, Any]]:
    """The declaration the operator acts on, per machine."""
    return {m.name: declared_of(m) for m in site.machines}


def spec_of(site: Site, m: Machine, desired: dict[str, Any]) -> str:
    """The fingerprint of a machine's declaration and profile: a change is someone acting."""
    profile = site.profiles.get(m.profile)
    doc = {
        "machine": {k: getattr(m, k) for k in ("name", "mac", "uuid", "arch", "role", "profile",
                                              "hostname", "labels", "metadata", "relay",
                                              "heartbeat", "address")},
        "desired": {k: desired.get(k) for k in ("power", "maintenance")},
        "profile": repr(profile),
    }  # fmt: skip
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


# The power commands of one machine remembered for unhold(): more than can be in flight at once
# (the API's device threads), fewer than a person's commands between two releases can grow to.
_POWER_HOLDS_KEPT = 16


@dataclass
class _PowerHold:
    """A person's power command: the hold it took, and the hold it found (None: none), which a
    refusal puts back."""

    hold: dict[str, Any]
    found: dict[str, Any] | None


@dataclass(frozen=True)
class _Decision:
    machine: Machine
    want: Want
    seen: Seen
    old: Memory | None
    new: Memory
    actions: list[Action]


class Operator:
    def __init__(self, holder: SiteHolder, store: EventStore, state: OperatorState,
                 record: Callable[..., int], hub: DeviceHub | None = None,
                 installs: InstallMarks | None = None,
                 clock: Callable[[], float] = time.time,
                 declared: DeclaredState | None = None):  # fmt: skip
        self.holder = holder
        self.store = store
        self.state = state
        self.record = record
        self.hub = hub
        self.installs = installs
        self.clock = clock
        self._lock = threading.RLock()  # one pass, plan or apply at a time
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._progress: dict[str, Progress] = {}
        self._specs_site: Site | None = None  # the site whose machines' specs _specs holds
        self._specs: dict[tuple[str, Any, Any], str] = {}
        newest = store.query(limit=1)
        self._cursor = max(0, newest[0].id - _HISTORY_ON_START) if newest else 0
        self._beats: dict[str, float] = {}
        self._listening_since = clock()  # beats are heard from now on (core.Seen)
        self._mem: dict[str, Memory] = {
            name: m for name, d in state.memories().items() if (m := Memory.of(d)) is not None
        }
        applied = state.applied()
        self._applied: dict[str, dict[str, Any]] | None = applied[0] if applied else None
        self.applied_generation: int | None = applied[1] if applied else None
        self.applied_at: float | None = applied[2] if applied else None
        # The whole declaration applied last (bastion.operator.declared), for the plan's changes
        # of what the operator does not act on; kept beside the history by default.
        self.declared_state = declared if declared is not None else DeclaredState(store.path)
        self._declared_site: Site | None = None  # the site it was taken for (sync: auto)
        self._reader = DeclaredReader(holder.root)
        # The files read for a loaded site: the first for the site loaded at start, read now
        # rather than at the first pass, which would take in an edit made since as applied.
        self._read_for: tuple[Site, Declared] = (holder.site, self._reader.read())
        self._declared = self.declared_state.get()
        if self._declared is None:
            # nothing applied yet, or applied by a controller that kept only the operator's
            # words: changes count from the files as the site was loaded at start
            self._declared = self._read_for[1]
            self.declared_state.put(self._declared, self.applied_generation)
        self._relays: dict[int, str] | None = None
        # machine -> the person's power commands whose holds stand on each other, oldest first
        # (hold_for_power, unhold); one whose command was done stays until a release
        self._power_holds: dict[str, list[_PowerHold]] = {}
        self.passes = 0
        self.last_error: str | None = None

    # --- the thread -----------------------------------------------------------------------
    def start(self) -> Operator:
        self._thread = threading.Thread(target=self._run, name="operator", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def wake(self) -> None:
        self._wake.set()

    def saw(self, kind: str) -> None:
        """An event was recorded: wake the loop for the kinds that can change a decision."""
        if kind in WAKING_KINDS:
            self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.pass_once()
                self.last_error = None
            except Exception as e:  # a pass that fails must not end the operator
                self.last_error = f"{type(e).__name__}: {e}"
                log.exception("operator pass failed")
            interval = self._config(self.holder.site).interval_s
            self._wake.wait(interval)
            self._wake.clear()
            self._stop.wait(0.2)  # a burst of events is one pass, not one each

    # --- what people do -------------------------------------------------------------------
    def hold(self, name: str, by: str, state: str | None = None) -> Memory:
        """A person took over the machine (a power command `state`, or a plain hold)."""
        with self._lock:
            mem = core.held(self._mem.get(name), by, state, self.clock())
            self._keep(name, mem)
            what = f"power {state}" if state else "a hold"
            self._event(name, Action(name, "hold", f"{what} by {by}: the operator leaves it "
                                     "alone until it is released"))  # fmt: skip
        self.wake()
        return mem

    def hold_for_power(self, name: str, by: str, state: str) -> Memory:
        """hold() for a power command about to be sent: the memory held, for unhold() when the
        device refuses the command."""
        with self._lock:
            before = self._mem.get(name)
            found = before.hold if before is not None else None
            held = self.hold(name, by, state)
            chain = self._power_holds.setdefault(name, [])
            if chain and chain[-1].hold != found:
                chain.clear()  # a release or a plain hold since: the commands before it are moot
            chain.append(_PowerHold(held.hold, found))
            del chain[:-_POWER_HOLDS_KEPT]
            return held

    def unhold(self, name: str, held: Memory, why: str) -> None:
        """Undo hold_for_power() when its command did nothing (refused by the device, or by the
        UPS policy): the hold as its command found it, unless something else changed the hold
        since.

        Only the hold is put back, not the whole memory: a pass in between (the hold wakes the
        operator) may have written the machine's declaration into it, and a memory compared
        whole was never the one held, so the hold stayed. And commands sent at once each
        found the one before: the first refusal, under the second command's hold, did nothing,
        the second put back the first's, and two refused commands left the machine held. A
        refusal under a later command's hold now hands what it found to that command: the hold
        each command found is kept here, with the command."""
        with self._lock:
            chain = self._power_holds.get(name, [])
            i = next((i for i, c in enumerate(chain) if c.hold is held.hold), None)
            if i is None:
                i = next((i for i, c in enumerate(chain) if c.hold == held.hold), None)
            if i is None:
                return  # a release or a plain hold since ended the chain: nothing to undo
            mine = chain.pop(i)
            if i < len(chain):
                chain[i].found = mine.found  # the later command stands on what this one found
                return
            mem = self._mem.get(name)
            if mem is None or mem.hold != mine.hold:
                return
            self._keep(name, replace(mem, hold=mine.found))
            self._event(name, Action(name, "release", f"hold undone: {why}"))
        self.wake()

    def release(self, name: str, by: str) -> Memory:
        with self._lock:
            self._power_holds.pop(name, None)
            old = self._mem.get(name)
            mem = core.released(old)
            self._keep(name, mem)
            was = ("held" if old and old.hold else "failed" if old and old.failed else "free")
            self._event(name, Action(name, "release", f"released by {by} (it was {was}): the "
                                     "operator takes it up again"))  # fmt: skip
        self.wake()
        return mem

    def declaration(self, name: str) -> dict[str, Any] | None:
        """Machine `name`'s declaration as the operator acts on it (`power`, `maintenance`,
        `reprovision`), or None when it has none. With `sync: manual`, the one applied: the
        files' only from `bastion apply` on. With `sync: auto`, or before anything was
        applied, the site as loaded, which the next pass adopts. Read without the operator's
        lock, which a pass holds while it waits on the device: the site and the applied
        declaration are each replaced whole, never changed in place."""
        site, applied = self.holder.site, self._applied
        if applied is None or self._sync(site) == "auto":
            m = site.machine(name)
            return declared_of(m) if m is not None else None
        d = applied.get(name)
        return dict(d) if d is not None else None

    def heartbeat(self, mac: str | None, uuid: str | None = None) -> str | None:
        """A node said it is alive; the machine's name, or None when the site declares no such
        machine (found as its reports are: bastion.boot.reporting_machine)."""
        m = reporting_machine(self.holder.site, mac, uuid)
        if m is None:
            return None
        self._beats[m.name] = self.clock()
        return m.name

    # --- a pass ---------------------------------------------------------------------------
    def pass_once(self) -> list[Action]:
        """Observe, decide and act once; the actions taken."""
        with self._lock:
            now = self.clock()
            site = self.holder.site
            self._catch_up()
            self._relays = self._observe_relays()
            if self._sync(site) == "auto":
                self._adopt(site)
            decisions = self._decide_all(site, self._applied_for(site), now)
            done = self._carry_out(decisions, now)
            self._forget_undeclared(site)
            self.passes += 1
            return done

    def plan(self) -> dict[str, Any]:
        """What applying the site files as they are on disk would do now, without doing it.
        Raises bastion.site.load.SiteError when they do not load.

        The files are loaded before the lock is taken: loading validates the whole site and
        renders every machine's Ignition (about 190 ms for 1,000 machines), and under the lock
        that passes, view() and the power commands take, a few clients asking for plans in a
        loop held all of those up. The load reads only files, so it needs no lock. The files'
        declaration is read before the load: an edit in between is listed, not missed."""
        declared = self._reader.read()
        disk = self.holder.load()  # with serve's secret store (bastion.state.ledger)
        with self._lock:
            now = self.clock()
            self._catch_up()
            self._relays = self._observe_relays()
            return self._plan(disk, now, declared)

    def apply(self, plan_id: str | None = None) -> dict[str, Any]:
        """Reload the site, adopt its declaration and do what `plan()` said (raises
        PlanChanged when `plan_id` is given and is no longer the plan, SiteError when the
        files do not load: nothing is done then)."""
        with self._lock:
            now = self.clock()
            declared = self._reader.read()  # before the reload, as plan() reads it
            outcome = self.holder.reload()
            if not outcome.ok:
                from bastion.site.load import SiteError

                raise SiteError((outcome.error or "the site does not load").splitlines())
            site = self.holder.site
            self._catch_up()
            self._relays = self._observe_relays()
            plan = self._plan(site, now, declared)
            if plan_id is not None and plan_id != plan["id"]:
                raise PlanChanged(plan_id, plan)
            self._adopt(site, force=True, declared=declared)
            decisions = self._decide_all(site, self._applied_for(site), now)
            refused: list[Action] = []
            done = self._carry_out(decisions, now, plan=plan["id"], refused=refused)
            self._forget_undeclared(site)
            plan["done"] = [a.as_dict() for a in done]
            plan["refused"] = [a.as_dict() for a in refused]  # each with the device's words
            return plan

    # --- observing ------------------------------------------------------------------------
    def _catch_up(self) -> None:
        # The events of no machine (a matchbox group's, an unknown MAC's) change no machine's
        # progress: SQLite skips them, but it still reads them, every pass, from the cursor on.
        # The cursor only moved with a machine's event, so a site whose boots name no machine
        # read its whole history again five times a second (22 ms a pass at 115,000 events,
        # holding the store's lock that the boot requests' commits wait for). It now also moves
        # past what no machine can still claim: an unnamed event more than ATTRIBUTABLE_IDS
        # back is never attributed to an address's machine (bastion.state.addresses).
        newest = self.store.newest_id()
        while True:
            batch = self.store.query(after=self._cursor, limit=_CATCH_UP_BATCH, of_machines=True)
            for e in batch:
                self._cursor = e.id
                if e.machine:
                    self._progress[e.machine] = core.fold(
                        self._progress.get(e.machine, Progress()), e.as_dict())
            if len(batch) < _CATCH_UP_BATCH:
                self._cursor = max(self._cursor, newest - ATTRIBUTABLE_IDS)
                return

    def _observe_relays(self) -> dict[int, str] | None:
        channels = self.hub.channels() if self.hub is not None else None
        if channels is None:
            return None
        return {c["ch"]: ("queued" if c.get("queued") else "cycling" if c.get("cycling")
                          else str(c.get("output"))) for c in channels}  # fmt: skip

    def _installed(self, site: Site) -> set[str]:
        """The machines installed, by marks that hold for them as declared now: one made for
        another board (replaced under the same name) or profile is not an install of this."""
        marks = self.installs.all() if self.installs is not None else {}
        return {m.name for m in site.machines if (mark := marks.get(m.name)) is not None
                and mark.holds_for(mac=m.mac, uuid=m.uuid, profile=m.profile)}  # fmt: skip

    def _seen(self, m: Machine, installed: set[str]) -> Seen:
        relay = None
        if m.relay is not None and self._relays is not None:
            relay = self._relays.get(m.relay)
        return Seen(relay=relay, progress=self._progress.get(m.name, Progress()),
                    heartbeat_at=self._beats.get(m.name), installed=m.name in installed,
                    listening_since=self._listening_since)  # fmt: skip

    # --- deciding -------------------------------------------------------------------------
    @staticmethod
    def _config(site: Site) -> Any:
        from bastion.site.schema import OperatorSection

        return site.settings.operator or OperatorSection()

    def _sync(self, site: Site) -> str:
        return self._config(site).sync

    def _adopt(self, site: Site, force: bool = False, declared: Declared | None = None) -> None:
        """Make `site` the declaration applied (when it differs, or `force`), and `declared`
        the whole declaration applied (None: read from the files, when `site` is another site
        than the one it was last taken for: a reload, with `sync: auto`)."""
        desired = desired_of(site)
        if force or desired != self._applied:
            self._applied = desired
            self.applied_generation = self.holder.generation
            self.applied_at = self.clock()
            self.state.set_applied(desired, self.holder.generation)
        if declared is None and (force or site is not self._declared_site):
            if self._read_for[0] is not site:
                self._read_for = (site, self._reader.read())
            declared = self._read_for[1]
        if declared is not None:
            # after the applied words: a crash between the two lists an edit twice, never hides one
            self._declared, self._declared_site = declared, site
            self.declared_state.put(declared, self.holder.generation)

    def _applied_for(self, site: Site) -> dict[str, dict[str, Any]]:
        if self._applied is None:  # never applied: the site as first loaded is the declaration
            self._adopt(site, force=True, declared=self._declared)
        return self._applied or {}

    def _want(self, site: Site, m: Machine, desired: dict[str, Any] | None) -> Want:
        d = desired or {}
        ready = m.heartbeat[0] if m.heartbeat else None
        return Want(power=d.get("power") if m.relay is not None else None,
                    maintenance=bool(d.get("maintenance")), reprovision=d.get("reprovision"),
                    relay=m.relay, spec=self._spec(site, m, d), ready_s=ready)  # fmt: skip

    def _spec(self, site: Site, m: Machine, desired: dict[str, Any]) -> str:
        """spec_of, once per machine and declaration of a loaded site: it hashes the machine's
        JSON and its profile's repr, which for 1,000 machines was two thirds of a pass (about
        90 ms, five passes a second while machines boot)."""
        if site is not self._specs_site:
            self._specs_site, self._specs = site, {}
        key = (m.name, desired.get("power"), desired.get("maintenance"))
        spec = self._specs.get(key)
        if spec is None:
            spec = self._specs[key] = spec_of(site, m, desired)
        return spec

    def _decide_all(self, site: Site, applied: dict[str, dict[str, Any]], now: float) -> list[_Decision]:
        cfg = Config.of(self._config(site))
        installed = self._installed(site)
        out = []
        for m in sorted(site.machines, key=lambda m: m.name):
            if m.name not in applied:
                # Added since the declaration applied (sync: manual): not the operator's yet, and
                # no memory is made. Seen first with no declared word to adopt, its memory had
                # none, and the `apply` that declared it read its `reprovision:` as a change: a
                # machine just added, running, was power-cycled and installed again. Its first
                # sight is the pass that declares it, which adopts the word.
                continue
            want = self._want(site, m, applied.get(m.name))
            seen = self._seen(m, installed)
            old = self._mem.get(m.name)
            acts, new = core.decide(m.name, want, seen, old, now, cfg)
            out.append(_Decision(m, want, seen, old, new, acts))
        return out

    def _plan(self, site: Site, now: float, declared: Declared) -> dict[str, Any]:
        """The plan for `site`, whose files' whole declaration is `declared`: its actions, and
        its changes against the declaration applied last, per machine (the operator's words
        first, then the other fields of its entry) and then the site's files. Only the
        operator's words lead to actions; every change is in the plan's id."""
        desired = desired_of(site)
        actions = [a for d in self._decide_all(site, desired, now) for a in d.actions]
        applied = self._applied or {}
        before_all = self._declared or declared
        changes = []
        for name in sorted(set(applied) | set(desired)):
            before, after = applied.get(name), desired.get(name)
            if before is None or after is None:
                if before != after:
                    changes.append({"machine": name, "field": "machine",
                                    "from": "absent" if before is None else "declared",
                                    "to": "declared" if after is not None else "absent"})  # fmt: skip
                continue
            for key in ("power", "maintenance", "reprovision"):
                if before.get(key) != after.get(key):
                    changes.append({"machine": name, "field": key, "from": before.get(key),
                                    "to": after.get(key)})  # fmt: skip
            was, now_is = before_all.machines.get(name), declared.machines.get(name)
            if was is not None and now_is is not None:
                changes += machine_changes(name, was, now_is)
        changes += site_changes(before_all, declared)
        return {"id": core.plan_id(actions, changes), "site": site.name, "sync": self._sync(site),
                "applied_generation": self.applied_generation, "changes": changes,
                "actions": [a.as_dict() for a in actions]}  # fmt: skip

    # --- acting ---------------------------------------------------------------------------
    def _carry_out(self, decisions: list[_Decision], now: float, plan: str | None = None,
                   refused: list[Action] | None = None) -> list[Action]:  # fmt: skip
        """Each decision's actions in turn; the ones done. A refused one (its reason appended
        to `refused` as a `refused` action) ends its machine's turn: its memory goes back to what
        it was, under its new declaration, and it is tried again after settle_s."""
        done: list[Action] = []
        for d in decisions:
            mem = d.new
            for a in d.actions:
                self._event(d.machine.name, a, plan=plan, mac=d.machine.mac)
                error = self._effect(d.machine, a) if a.effect else None
                if error is not None:
                    no = Action(d.machine.name, "refused", f"{a.action}: {error}", step=a.step)
                    self._event(d.machine.name, no, mac=d.machine.mac)
                    if refused is not None:
                        refused.append(no)
                    base = d.old or Memory(spec=d.want.spec, reprovisioned=d.want.reprovision)
                    # under the new declaration: with the old one kept, every pass saw it change
                    # again, dropped the wait and tried at once
                    base = core.respecced(base, d.want.spec)
                    mem = Memory(**{**asdict(base), "retry_at": now + Config().settle_s})
                    break
                done.append(a)
            self._keep(d.machine.name, mem)
        return done

    def _effect(self, m: Machine, a: Action) -> str | None:
        """Carry out one action; the reason it could not be, or None."""
        if a.action == "reprovision":
            if self.installs is not None:
                was = self.installs.clear(m.name)
                if was is not None:
                    self.record("install", source="operator", mac=m.mac, machine=m.name,
                                profile=m.profile,
                                payload={"state": "provisioning", "was_installed_at": was.installed_at,
                                         "callback": was.callback})  # fmt: skip
            return None
        if self.hub is None:
            return "no device (serve --device)"
        state = {"power-on": "on", "power-off": "off", "power-cycle": "cycle"}[a.action]
        try:
            self.hub.power(m.name, state, source="operator")
        except (DeviceError, ValueError) as e:
            return str(e)
        return None

    def _event(self, name: str, a: Action, plan: str | None = None, mac: str | None = None) -> None:
        payload = {k: v for k, v in a.as_dict().items() if k != "machine"}
        if plan:
            payload["plan"] = plan
        if mac is None:
            m = self.holder.site.machine(name)
            mac = m.mac if m else None
        self.record("operator", source="operator", mac=mac, machine=name, payload=payload)

    def _forget_undeclared(self, site: Site) -> None:
        """Forget each machine that neither the applied declaration nor the site as loaded
        has: removed from the files, and (with `sync: manual`) the removal applied. Kept, its
        memory stayed in the database for good, and a machine declared again under that name
        came back held by a command given to the one removed. One removed from the files but
        not yet applied keeps its memory: the removal is not the operator's yet, and put back
        before `bastion apply` it is the same machine."""
        declared = set(self._applied or ()) | {m.name for m in site.machines}
        for name in [n for n in self._mem if n not in declared]:
            del self._mem[name]
            self._power_holds.pop(name, None)
            self.state.forget(name)

    def _keep(self, name: str, mem: Memory) -> None:
        if self._mem.get(name) != mem:
            self._mem[name] = mem
            self.state.put(name, mem.as_dict())

    # --- where the machines stand ---------------------------------------------------------
    def view(self) -> dict[str, Any]:
        """The site's machines with their declaration, observation and status."""
        with self._lock:
            now = self.clock()
            site = self.holder.site
            cfg = Config.of(self._config(site))
            applied = self._applied_for(site)
            installed = self._installed(site)
            machines = []
            for m in site.machines:
                want = self._want(site, m, applied.get(m.name))
                seen = self._seen(m, installed)
                mem = self._mem.get(m.name)
                st = core.status(want, seen, mem, now, cfg)
                machines.append({
                    "name": m.name, "mac": m.mac, "relay": m.relay, "relay_state": seen.relay,
                    "desired": {"power": want.power, "maintenance": want.maintenance,
                                "reprovision": want.reprovision},
                    "status": asdict(st),
                    "hold": mem.hold if mem else None,
                    "heartbeat_at": seen.heartbeat_at,
                    "boot": seen.progress.as_dict(),
                })  # fmt: skip
            return {"site": site.name, "sync": self._sync(site), "generation": self.holder.generation,
                    "applied_generation": self.applied_generation, "applied_at": self.applied_at,
                    "device": self._relays is not None, "passes": self.passes,
                    "last_error": self.last_error, "machines": machines}  # fmt: skip

