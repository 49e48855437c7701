"""The power-cut policy as pure functions: what the UPS said, the nodes, the policy's own memory
and the time in; actions, each with its reason, and the new memory out. No threads, no sockets:
bastion.ups.runner observes and acts, tests call `decide` with made-up inputs.

Theory of operation. The memory's `phase` is one of:

    mains       normal. The UPS on battery (`OB`) starts `on-battery`.
    on-battery  on battery since `since`. Mains back: `mains` again, nothing done. Low battery
                (`LB`, or the charge at or below `low_charge`): straight to `relays`. On battery
                for `on_battery_s`: `shutdown`.
    shutdown    power-ons are held (the device refuses them: `holding`). The nodes are asked to
                shut down in two groups, agents (and every machine that is not a k3s server)
                first, the k3s servers last. A node counts as down when its heartbeats have
                stopped for `quiet_s`; a group gets `shutdown_wait_s` at most. Low battery: no
                more waiting, `relays`.
    relays      the relays open, agents first, servers last; then `off`.
    off         held. Mains back (no `OB`) with the charge at `resume_charge` or above: the
                machines whose relays were opened are powered on again, servers first (the
                device staggers them), and the hold ends: `mains`.

Only a node that beats can be asked (its POST /heartbeat's answer carries the request); one that
has not beaten within `quiet_s` is down already. A shutdown, once begun, runs to the relays even
if mains returns meanwhile: nodes may already be halting, and a halted node comes back only
through its relay. A UPS that stops answering is an event (`lost`, then `back`) and changes no
phase: without a reading there is neither a power cut nor its end to act on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

PHASES = ("mains", "on-battery", "shutdown", "relays", "off")
HOLDING = ("shutdown", "relays", "off")
CHARGE_STEP = 5.0  # a charge this far from the one last recorded is recorded again


@dataclass(frozen=True)
class Policy:
    on_battery_s: float = 60
    low_charge: float = 20
    shutdown_wait_s: float = 120
    quiet_s: float = 15
    resume_charge: float = 50

    @classmethod
    def of(cls, section: Any) -> Policy:
        """From site.yaml's `ups:` (a schema.UpsSection)."""
        return cls(**{k: getattr(section, k) for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Ups:
    """One reading: the status flags and the charge (percent) when the UPS reports one."""

    status: tuple[str, ...]
    charge: float | None = None

    @property
    def on_battery(self) -> bool:
        return "OB" in self.status


@dataclass(frozen=True)
class Node:
    """A machine as the policy sees it, in machines.yaml order."""

    name: str
    relay: int | None  # its relay channel, None: no relay to open
    server: bool  # a k3s server: asked last, powered on first
    beat_at: float | None  # its latest heartbeat
    relay_state: str | None = None  # as the device reports it; None: not known


@dataclass(frozen=True)
class Memory:
    phase: str = "mains"
    since: float | None = None  # when the power cut began
    stage: int = 0  # shutdown: 0 the agents, 1 the servers
    stage_at: float | None = None  # when the stage's nodes were asked
    asked: tuple[str, ...] = ()  # asked in this stage, not yet down
    opened: tuple[str, ...] = ()  # relays the policy opened: powered on again when mains returns
    answering: bool = True  # the UPS answered the last poll
    status: str | None = None  # the status last recorded
    charge: float | None = None  # the charge last recorded
    waiting: bool = False  # `off`, mains back, the charge still too low (said once)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of(cls, d: dict[str, Any] | None) -> Memory:
        """From `as_dict` (a restart); a fresh memory from anything it does not recognise."""
        if not isinstance(d, dict) or d.get("phase") not in PHASES:
            return cls()
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for k in ("asked", "opened"):
            known[k] = tuple(known.get(k) or ())
        try:
            return cls(**known)
        except TypeError:
            return cls()

    @property
    def holding(self) -> bool:
        return self.phase in HOLDING


@dataclass(frozen=True)
class Action:
    """One step. `action`: status, lost, back, on-battery, mains, low-battery, hold, shutdown
    (ask `machine` to shut down), down, timeout, open (a relay), waiting, power-on, release.
    `effect`: something the runner does besides recording it."""

    action: str
    reason: str
    machine: str | None = None
    effect: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = {"action": self.action, "reason": self.reason, **self.extra}
        if self.machine:
            d["machine"] = self.machine
        return d


def shutdown_takes_s(beat_every_s: float, stop_delay_s: float, quiet_s: float, poll_s: float) -> float:
    """The longest a node asked to shut down may take until `decide` counts it down, so that
    shutdown_wait_s must be at least this not to open its relay early: the request goes out in
    the answer to its next heartbeat (beat_every_s); the node may then hold its shutdown for
    stop_delay_s while it still beats (graceful node shutdown: logind's InhibitDelayMaxSec);
    its beats stop, and it is down after quiet_s of silence, seen at the next poll."""
    return beat_every_s + stop_delay_s + quiet_s + poll_s


def _low(ups: Ups, p: Policy) -> bool:
    return "LB" in ups.status or (ups.charge is not None and ups.charge <= p.low_charge)


def _charge(ups: Ups) -> str:
    return f"{ups.charge:g}%" if ups.charge is not None else "charge not reported"


def shutdown_order(nodes: list[Node]) -> list[list[Node]]:
    """The groups asked to shut down (and whose relays open) in turn: agents and every other
    machine first, the k3s servers last; machines.yaml order within a group."""
    return [[n for n in nodes if not n.server], [n for n in nodes if n.server]]


def power_on_order(nodes: list[Node]) -> list[Node]:
    """Servers first, so that the agents find them when they start."""
    return [n for n in nodes if n.server] + [n for n in nodes if not n.server]


def _elapsed(since: float | None, now: float) -> float:
    return 0.0 if since is None else now - since


def _alive(n: Node, now: float, p: Policy) -> bool:
    return n.beat_at is not None and now - n.beat_at < p.quiet_s


def decide(ups: Ups | None, error: str | None, nodes: list[Node], mem: Memory | None, now: float,
           p: Policy) -> tuple[list[Action], Memory]:  # fmt: skip
    """One pass: `ups` is the reading (None when upsd did not answer; `error` says why)."""
    mem = mem or Memory()
    acts: list[Action] = []
    if ups is None:
        if mem.answering:
            acts.append(Action("lost", f"the UPS does not answer ({error}); no shutdown is "
                               "begun or ended without it"))  # fmt: skip
            mem = replace(mem, answering=False)
        if mem.phase in ("shutdown", "relays"):  # begun on a reading: it runs to its end
            more, mem = _advance(None, nodes, mem, now, p)
            acts += more
        return acts, mem
    if not mem.answering:
        acts.append(Action("back", f"the UPS answers again: {' '.join(ups.status) or '?'}, "
                           f"{_charge(ups)}"))  # fmt: skip
        mem = replace(mem, answering=True)
    text = " ".join(ups.status)
    moved = (ups.charge is not None and (mem.charge is None or abs(ups.charge - mem.charge) >= CHARGE_STEP))
    if text != mem.status or moved:
        acts.append(Action("status", f"the UPS says {text or 'nothing'}, {_charge(ups)}",
                           extra={"status": text, "charge": ups.charge}))  # fmt: skip
        mem = replace(mem, status=text, charge=ups.charge)
    more, mem = _advance(ups, nodes, mem, now, p)
    return acts + more, mem


def _advance(ups: Ups | None, nodes: list[Node], mem: Memory, now: float,
             p: Policy) -> tuple[list[Action], Memory]:  # fmt: skip
    acts: list[Action] = []
    if mem.phase == "mains":
        if ups is None or not ups.on_battery:
            return acts, mem
        acts.append(Action("on-battery", f"on battery ({_charge(ups)}): the nodes are asked to "
                           f"shut down after {p.on_battery_s:g} s unless mains returns"))  # fmt: skip
        mem = replace(mem, phase="on-battery", since=now)
    if mem.phase == "on-battery":
        assert ups is not None
        if not ups.on_battery:
            acts.append(Action("mains", f"mains back after {_elapsed(mem.since, now):.0f} s on "
                               "battery: nothing was shut down"))  # fmt: skip
            return acts, replace(mem, phase="mains", since=None)
        if _low(ups, p):
            acts.append(Action("hold", "low battery: power-ons are refused until mains returns",
                               effect=True))  # fmt: skip
            acts.append(Action("low-battery", f"low battery ({_charge(ups)}): no time to ask the "
                               "nodes, their relays open now"))  # fmt: skip
            mem = replace(mem, phase="relays")
        elif _elapsed(mem.since, now) >= p.on_battery_s:
            acts.append(Action("hold", f"on battery for {_elapsed(mem.since, now):.0f} s: "
                               "power-ons are refused until mains returns", effect=True))  # fmt: skip
            mem = replace(mem, phase="shutdown", stage=0, stage_at=None, asked=())
        else:
            return acts, mem
    if mem.phase == "shutdown":
        if ups is not None and _low(ups, p):
            acts.append(Action("low-battery", f"low battery ({_charge(ups)}): no more waiting "
                               f"for {', '.join(mem.asked) or 'the nodes'}; the relays open now"))  # fmt: skip
            mem = replace(mem, phase="relays", asked=())
        else:
            more, mem = _shutdown(nodes, mem, now, p)
            acts += more
    if mem.phase == "relays":
        opened = []
        for group in shutdown_order(nodes):
            for n in group:
                if n.relay is None or n.relay_state == "off":
                    continue
                acts.append(Action("open", f"relay {n.relay} opens"
                                   + (" (a k3s server: last)" if n.server else ""),
                                   machine=n.name, effect=True))  # fmt: skip
                opened.append(n.name)
        return acts, replace(mem, phase="off", opened=tuple(opened), asked=(), stage_at=None)
    if mem.phase == "off":
        for n in nodes:  # a relay the policy opened that is on again (a failed switch, a person)
            if n.name in mem.opened and n.relay is not None and n.relay_state == "on":
                acts.append(Action("open", f"relay {n.relay} is on while power is held: it "
                                   "opens again", machine=n.name, effect=True))  # fmt: skip
        if ups is None or ups.on_battery:
            return acts, mem
        if ups.charge is not None and ups.charge < p.resume_charge:
            if not mem.waiting:
                acts.append(Action("waiting", f"mains back, but the battery holds {_charge(ups)}: "
                                   f"power-ons wait for {p.resume_charge:g}%"))  # fmt: skip
            return acts, replace(mem, waiting=True)
        acts.append(Action("release", f"mains back and the battery at {_charge(ups)}: power-ons "
                           "are allowed again", effect=True))  # fmt: skip
        for n in power_on_order([n for n in nodes if n.name in mem.opened and n.relay is not None]):
            acts.append(Action("power-on", "powered on again after the power cut"
                               + (" (a k3s server: first)" if n.server else ""),
                               machine=n.name, effect=True))  # fmt: skip
        return acts, Memory(answering=mem.answering, status=mem.status, charge=mem.charge)
    return acts, mem


def _shutdown(nodes: list[Node], mem: Memory, now: float, p: Policy) -> tuple[list[Action], Memory]:
    acts: list[Action] = []
    groups = shutdown_order(nodes)
    by_name = {n.name: n for n in nodes}
    while mem.stage < len(groups):
        what = "agents" if mem.stage == 0 else "k3s servers"
        if mem.stage_at is None:  # the stage begins: ask the group's running nodes
            running = [n for n in groups[mem.stage] if _alive(n, now, p)]
            for n in running:
                acts.append(Action("shutdown", f"asked to shut down cleanly ({what}"
                                   + (", after the agents" if mem.stage else "") + ")",
                                   machine=n.name, effect=True))  # fmt: skip
            mem = replace(mem, stage_at=now, asked=tuple(n.name for n in running))
        left = []
        for name in mem.asked:
            n = by_name.get(name)
            if n is None or not _alive(n, now, p):
                quiet = f"{now - n.beat_at:.0f} s ago" if n and n.beat_at is not None else "never beat"
                acts.append(Action("down", f"its heartbeats stopped ({quiet})", machine=name))
            else:
                left.append(name)
        mem = replace(mem, asked=tuple(left))
        if left and _elapsed(mem.stage_at, now) < p.shutdown_wait_s:
            return acts, mem
        if left:
            acts.append(Action("timeout", f"{', '.join(left)} still beat after "
                               f"{p.shutdown_wait_s:g} s; their relays open anyway",
                               extra={"machines": left}))  # fmt: skip
        mem = replace(mem, stage=mem.stage + 1, stage_at=None, asked=())
    return acts, replace(mem, phase="relays")
