"""The operator's decisions as pure functions: (desired, observed, memory, now) -> actions.

Theory of operation
-------------------
Each machine is looked at on its own, in three parts:

- `Want`, what the applied declaration says (machines.yaml over site.yaml `defaults:`): power
  `on` (powered and running), `off`, or None (the operator does not switch it); `maintenance`
  (take no action at all); `reprovision`, a word whose *change* asks for one more installation;
  and `spec`, a fingerprint of the machine's declaration and profile: when it changes, someone
  acted, and a Failed machine or a count of power-cycles starts over.
- `Seen`, what is observed: the relay as the device reports it (`on`, `off`, `queued` behind
  the device's stagger, `cycling`, or None when no device answers), the boot's `Progress` folded
  from the event history (`fold`), the last heartbeat, the install-once mark.
- `Memory`, what the operator itself keeps per machine (persisted by the runner): the power
  command it last sent, the cycles it spent on the current trouble, Failed, a person's hold,
  and the reprovision word it last acted on.

`decide(...)` returns the actions for one machine and its new memory; `status(...)` says where
the machine stands. Neither reads a clock or a file: the runner passes `now` and does the I/O.

A boot is a run of steps (STEPS, in the order a network boot reaches them): the relay's on
edge, the device's proxy offer to the firmware (pxe), the chainloader's TFTP transfer, the
offer to iPXE, a boot script, a kernel or initrd, the Ignition config, the node's callback.
Only a step *further* than the furthest one so far is progress: a node that loops (its
firmware retries PXE after a kernel that is not there) makes requests but no progress. A boot
whose furthest step is older than that step's timeout is stuck: the operator records it, waits
`backoff_s` (doubling per cycle, at most `backoff_max_s`) and power-cycles it; after `cycles`
cycles a boot that is stuck again makes the machine Failed, with the step it reached and the
last error seen, and the operator stops touching it until someone acts (`release`, an edit of
its declaration or of its profile). A person's power command holds the machine: nothing is
done to it until the hold is released. A boot the operator did not see begin (the controller
started while the relay was already on) is never judged: it cannot tell a stuck boot from a
running node, and a running node is never power-cycled on a guess.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

# A network boot's steps, in order. The schema's BOOT_STEPS are the ones a timeout applies to.
STEPS = ("power-on", "pxe", "tftp", "ipxe", "script", "kernel", "ignition", "callback")
_RANK = {s: i for i, s in enumerate(STEPS)}

# Seconds a boot may stay at its furthest step before it is stuck (site.yaml
# operator.step_timeouts overrides each). From power-on: a server's firmware may take minutes
# to get to PXE; from kernel to Ignition a Flatcar initrd of hundreds of MB comes over HTTP;
# from Ignition to the callback the first boot runs (and may install k3s).
DEFAULT_TIMEOUTS = {"power-on": 300, "pxe": 120, "tftp": 120, "ipxe": 120, "script": 120,
                    "kernel": 600, "ignition": 900}  # fmt: skip

_SCRIPTS = ("/boot.ipxe", "/ipxe", "/grub/grub.cfg", "/grub")
_CALLBACK_OK = ("ok", "success", "succeeded", "0")
_POWER_ACTIONS = ("power-on", "power-off", "power-cycle")
EFFECTS = (*_POWER_ACTIONS, "reprovision")  # actions that change something outside the history


# --- the boot's progress, from the event history ------------------------------------------------


@dataclass(frozen=True)
class Progress:
    """One machine's latest boot, as far as its events tell."""

    boot_at: float | None = None  # when it began: a relay on edge, or a PXE request seen first
    began: str = ""  # "power-on", "pxe" (no on edge seen) or "reboot" (after a finished boot)
    step: str | None = None  # the furthest step reached in this boot
    step_at: float | None = None  # when it was reached
    detail: str = ""  # that step: "GET /ipxe 200", "tftp ipxe.efi"
    error: str | None = None  # the last failure seen in this boot ("GET /assets/x 404")
    done_at: float | None = None  # its callback (status ok): the boot is over
    local_disk: bool = False  # its boot script sent it to its disk (install: once, installed)
    power: str | None = None  # the relay in the device's last power event: "on"/"off"
    event: int = 0  # the id of the last event folded in

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _advance(p: Progress, step: str, ts: float, detail: str) -> Progress:
    if p.step is not None and _RANK[step] <= _RANK[p.step]:
        return p  # a step again, or an earlier one: requests, not progress
    return replace(p, step=step, step_at=ts, detail=detail)


def _new_boot(ts: float, began: str, power: str | None) -> Progress:
    return Progress(boot_at=ts, began=began, power=power)


def fold(p: Progress, e: dict[str, Any]) -> Progress:
    """`p` with one more of the machine's events (an Event.as_dict(), oldest first)."""
    kind, src, ts = e.get("kind"), e.get("source"), float(e.get("ts") or 0)
    pay = e.get("payload") or {}
    p = replace(p, event=max(p.event, int(e.get("id") or 0)))
    if kind == "power" and src == "device":
        state, why = pay.get("state"), pay.get("why")
        if state == "on" and why != "restore":  # a restart of the device is not a power edge
            p = _new_boot(ts, "power-on", "on")
            return _advance(p, "power-on", ts, f"relay {pay.get('ch')} on ({why})")
        return replace(p, power=state) if state in ("on", "off") else p
    if kind == "dhcp" and src == "device":
        what = pay.get("kind")
        if what in ("no_boot_file", "rpi_disabled"):
            return replace(p, error=f"the device cannot boot it: {what} (arch {pay.get('arch')})")
        if what not in ("offer", "ack"):
            return p
        if pay.get("ipxe"):
            return _advance(p, "ipxe", ts, f"offer to iPXE: {pay.get('file')}")
        if p.boot_at is None or p.done_at is not None or p.local_disk:
            # PXE with no on edge seen, or after a finished boot: the node (re)booted by itself
            p = _new_boot(ts, "pxe" if p.boot_at is None else "reboot", p.power)
        return _advance(p, "pxe", ts, f"offer of {pay.get('file')} (arch {pay.get('arch')})")
    if p.boot_at is None:
        return p  # steps of a boot whose beginning was not seen
    if kind == "tftp":
        stage, name = pay.get("stage"), pay.get("file")
        if stage == "start":
            return _advance(p, "tftp", ts, f"tftp {name}")
        if stage == "end" and pay.get("result") not in ("ok", "client error 8", None):
            return replace(p, error=f"tftp {name}: {pay.get('result')}")  # 8: edk2's size probe
        if stage == "refused":
            return replace(p, error=f"tftp {name} refused: {pay.get('reason')}")
        return p
    status = e.get("status")
    endpoint = e.get("endpoint") or ""
    if kind in ("boot", "asset") and isinstance(status, int) and status >= 400:
        why = pay.get("error")
        return replace(p, error=f"GET {endpoint} {status}" + (f": {why}" if why else ""))
    if kind == "boot" and endpoint in _SCRIPTS:
        p = replace(p, local_disk=True) if pay.get("boot") == "local-disk" else p
        return _advance(p, "script", ts, f"GET {endpoint} {status}")
    if kind == "boot" and endpoint == "/ignition":
        return _advance(p, "ignition", ts, f"GET /ignition {status}")
    if kind == "asset":
        return _advance(p, "kernel", ts, f"GET {endpoint} {status}")
    if kind == "callback":
        result = pay.get("status")
        if result is None or str(result).strip().lower() in _CALLBACK_OK:
            return replace(_advance(p, "callback", ts, "callback"), done_at=ts)
        message = pay.get("message")
        return replace(p, error=f"callback: status {result}" + (f": {message}" if message else ""))
    return p


# --- what is wanted, seen and remembered --------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """site.yaml `operator:` as the decisions use it."""

    cycles: int = 3
    backoff_s: float = 30
    backoff_max_s: float = 900
    ready_s: float = 120
    timeouts: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_TIMEOUTS))
    # how long a power command may take to show in the device's state (stagger, off time)
    settle_s: float = 30

    @classmethod
    def of(cls, section: Any, **kw: Any) -> Config:
        """From a schema.OperatorSection (None: the defaults)."""
        if section is None:
            return cls(**kw)
        return cls(cycles=section.cycles, backoff_s=section.backoff_s,
                   backoff_max_s=section.backoff_max_s, ready_s=section.ready_s,
                   timeouts={**DEFAULT_TIMEOUTS, **section.step_timeouts}, **kw)  # fmt: skip

    def timeout(self, step: str) -> float:
        return self.timeouts.get(step, DEFAULT_TIMEOUTS.get(step, 300))

    def backoff(self, n: int) -> float:
        """The wait before power-cycle n (1-based)."""
        return min(self.backoff_max_s, self.backoff_s * 2 ** max(0, n - 1))


@dataclass(frozen=True)
class Want:
    power: str | None = None  # "on", "off", None: not switched by the operator
    maintenance: bool = False
    reprovision: str | None = None
    relay: int | None = None
    spec: str = ""  # the declaration's fingerprint (bastion.operator.runner.spec_of)
    ready_s: float | None = None  # its heartbeat timeout, when it has one


@dataclass(frozen=True)
class Seen:
    relay: str | None = None  # "on", "off", "queued", "cycling"; None: unknown
    progress: Progress = field(default_factory=Progress)
    heartbeat_at: float | None = None  # its latest beat heard since listening_since
    installed: bool = False
    listening_since: float | None = None  # when this controller began to hear heartbeats


@dataclass(frozen=True)
class Memory:
    """What the operator keeps per machine; persisted as JSON (bastion.state.operator)."""

    spec: str | None = None
    reprovisioned: str | None = None  # the reprovision word last acted on (or adopted)
    attempt: int = 0  # power-cycles spent on the current trouble
    stuck_at: float | None = None  # when the boot stuck_boot was found stuck
    stuck_boot: float | None = None  # the boot_at of the boot judged stuck last
    failed: dict[str, Any] | None = None  # {"step", "detail", "reason", "at"}
    hold: dict[str, Any] | None = None  # {"by", "state", "at"}: a person's power command
    sent: dict[str, Any] | None = None  # the last power command: {"state", "at"}
    retry_at: float | None = None  # a command the device refused: not again before this

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of(cls, d: dict[str, Any] | None) -> Memory | None:
        if d is None:
            return None
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Action:
    """One decision; every one is recorded as an `operator` event with its reason."""

    machine: str
    action: str  # power-on, power-off, power-cycle, reprovision, stuck, failed, recovered, reset
    reason: str
    step: str | None = None
    attempt: int | None = None
    of: int | None = None

    @property
    def effect(self) -> bool:
        """Whether it changes something outside the history (a relay, an install mark)."""
        return self.action in EFFECTS

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


# --- deciding -----------------------------------------------------------------------------------


def _past_its_step(p: Progress, now: float, cfg: Config) -> bool:
    """Whether the boot's furthest step is older than that step's timeout."""
    return now >= (p.step_at or p.boot_at) + cfg.timeout(p.step or "power-on")


def _recovered(step: str | None, attempt: int) -> str:
    if attempt:
        return f"reached {step} after {attempt} power-cycle(s)"
    return f"reached {step} before its power-cycle, which is called off"


def _fresh(mem: Memory) -> Memory:
    return replace(mem, attempt=0, failed=None, stuck_at=None, stuck_boot=None, retry_at=None)


def respecced(mem: Memory, spec: Any) -> Memory:
    """`mem` for a declaration that changed to `spec`: what decide() keeps when it sees the
    change (the counts start over), for memory kept without the pass's own (a refusal)."""
    return mem if mem.spec == spec else replace(_fresh(mem), spec=spec)


def decide(name: str, want: Want, seen: Seen, mem: Memory | None, now: float,
           cfg: Config) -> tuple[list[Action], Memory]:  # fmt: skip
    """The actions for one machine now, and the memory to keep."""
    acts: list[Action] = []
    if mem is None or mem.spec is None:  # first sight: its reprovision word is adopted, not acted on
        # (a memory made before any pass saw the machine, by a person's hold or release, has
        # no spec: its blank word was read as a change, and a running node reprovisioned)
        mem = replace(mem or Memory(), spec=want.spec, reprovisioned=want.reprovision)
    if mem.spec != want.spec:
        if mem.failed or mem.attempt:
            acts.append(Action(name, "reset", "its declaration changed: the count of "
                               "power-cycles starts over"))  # fmt: skip
        mem = replace(_fresh(mem), spec=want.spec)
    if want.maintenance or mem.hold is not None:
        return acts, mem
    if mem.retry_at is not None and now < mem.retry_at:
        return acts, mem
    if want.reprovision is None:
        if mem.reprovisioned is not None:  # (a new Memory every pass was most of a pass's work)
            mem = replace(mem, reprovisioned=None)  # dropping the word asks for nothing
    elif want.reprovision != mem.reprovisioned:
        if want.relay is not None and want.power is not None and seen.relay is None:
            return acts, mem  # it needs a power-cycle: wait for the device
        acts.append(Action(name, "reprovision", f"reprovision changed from "
                           f"{mem.reprovisioned or '(none)'} to {want.reprovision}: "
                           "network-boot and install again"))  # fmt: skip
        mem = replace(_fresh(mem), reprovisioned=want.reprovision)
        # A relay in the middle of a cycle is heading into a fresh network boot already (and the
        # device refuses a second cycle): a cycle sent then came back 30 s later and cut the
        # install boot that had just begun.
        if want.relay is not None and want.power == "on" and seen.relay == "on":
            acts.append(Action(name, "power-cycle", "reprovision: a fresh network boot"))
            return acts, replace(mem, sent={"state": "cycle", "at": now})
    if mem.failed is not None:
        return acts, mem
    if want.relay is None or want.power is None or seen.relay is None:
        return acts, mem
    sent = mem.sent if mem.sent and now - mem.sent["at"] < cfg.settle_s else None
    if want.power == "off":
        if seen.relay != "off" and not (sent and sent["state"] == "off"):
            acts.append(Action(name, "power-off", f"declared off; its relay is {seen.relay}"))
            mem = replace(_fresh(mem), sent={"state": "off", "at": now})
        return acts, mem
    if seen.relay == "off":
        if not (sent and sent["state"] in ("on", "cycle")):
            acts.append(Action(name, "power-on", "declared on; its relay is off"))
            mem = replace(mem, sent={"state": "on", "at": now})
        return acts, mem
    if seen.relay != "on":
        return acts, mem  # queued behind the stagger, or cycling: the device is on it
    p = seen.progress
    if sent and sent["state"] in ("on", "cycle") and (p.boot_at is None or p.boot_at < sent["at"]):
        return acts, mem  # its on edge is not in the history yet
    if p.boot_at is None:
        return acts, mem  # no boot seen begin: nothing to judge
    if p.done_at is not None or p.local_disk or _ready(want, seen, now, cfg):
        if mem.attempt or mem.stuck_at is not None:
            acts.append(Action(name, "recovered", _recovered(p.step, mem.attempt), step=p.step))
            mem = _fresh(mem)
        return acts, mem
    if not _past_its_step(p, now, cfg) or _unheard_yet(want, seen, now, cfg):
        if mem.stuck_at is not None and mem.stuck_boot == p.boot_at:
            # judged stuck, then a step before its power-cycle: the cycle is called off (it
            # came at once when the new step timed out, with no verdict and no backoff)
            acts.append(Action(name, "recovered", _recovered(p.step, mem.attempt), step=p.step))
            mem = replace(mem, stuck_at=None, stuck_boot=None)
        return acts, mem
    limit = cfg.timeout(p.step or "power-on")
    last = f"; last error: {p.error}" if p.error else ""
    if mem.stuck_boot != p.boot_at:
        if mem.attempt >= cfg.cycles:
            reason = (f"stuck after {p.step} ({p.detail}) for {limit:g}s, "
                      f"{mem.attempt} power-cycle(s) did not help{last}")  # fmt: skip
            acts.append(Action(name, "failed", reason, step=p.step, attempt=mem.attempt,
                               of=cfg.cycles))  # fmt: skip
            failed = {"step": p.step, "detail": p.detail, "error": p.error, "reason": reason,
                      "at": now}  # fmt: skip
            return acts, replace(mem, failed=failed, stuck_at=None, stuck_boot=p.boot_at)
        n = mem.attempt + 1
        acts.append(Action(name, "stuck", f"no step after {p.step} ({p.detail}) for {limit:g}s"
                           f"{last}: power-cycle {n} of {cfg.cycles} in {cfg.backoff(n):g}s",
                           step=p.step, attempt=n, of=cfg.cycles))  # fmt: skip
        mem = replace(mem, stuck_at=now, stuck_boot=p.boot_at)
    if mem.stuck_at is not None and now >= mem.stuck_at + cfg.backoff(mem.attempt + 1):
        n = mem.attempt + 1
        acts.append(Action(name, "power-cycle", f"stuck after {p.step}: power-cycle {n} of "
                           f"{cfg.cycles}", step=p.step, attempt=n, of=cfg.cycles))  # fmt: skip
        mem = replace(mem, attempt=n, stuck_at=None, sent={"state": "cycle", "at": now})
    return acts, mem


def _ready(want: Want, seen: Seen, now: float, cfg: Config) -> bool:
    beat, boot = seen.heartbeat_at, seen.progress.boot_at
    if beat is None or (boot is not None and beat < boot):
        return False
    return now - beat <= (want.ready_s or cfg.ready_s)


def _unheard_yet(want: Want, seen: Seen, now: float, cfg: Config) -> bool:
    """A boot from before this controller began listening, and no beat heard since then, nor
    time for one: a node that is up and beating (Ready) cannot be told from a stuck one yet,
    since beats are not kept across a restart."""
    since = seen.listening_since
    return (since is not None and seen.heartbeat_at is None and (seen.progress.step_at or 0) < since
            and now < since + (want.ready_s or cfg.ready_s))  # fmt: skip


def held(mem: Memory | None, by: str, state: str | None, now: float) -> Memory:
    """`mem` with a person's hold (a power command `state`, or None for a plain hold)."""
    return replace(mem or Memory(), hold={"by": by, "state": state, "at": now})


def released(mem: Memory | None) -> Memory:
    """`mem` with no hold and no Failed: the operator takes the machine up again, afresh."""
    return replace(_fresh(mem or Memory()), hold=None, sent=None)


# --- where a machine stands ---------------------------------------------------------------------

PHASES = ("Off", "Powering", "Booting", "Provisioned", "Ready", "Stuck", "Failed", "Held",
          "Maintenance", "On", "Unknown")  # fmt: skip


@dataclass(frozen=True)
class Status:
    phase: str  # one of PHASES
    text: str  # "Booting (tftp)", "Stuck (1 of 3)", "Failed (stuck after script ...)"
    step: str | None = None  # the furthest step of the latest boot
    detail: str | None = None
    attempt: int = 0  # power-cycles spent on the current trouble
    of: int = 0  # the site's cycles
    reason: str | None = None
    since: float | None = None  # when the phase's step, hold or failure began
    error: str | None = None  # the last error of the latest boot


def status(want: Want, seen: Seen, mem: Memory | None, now: float, cfg: Config) -> Status:
    mem = mem or Memory()
    p = seen.progress
    base = {"step": p.step, "detail": p.detail or None, "attempt": mem.attempt,
            "of": cfg.cycles, "error": p.error}  # fmt: skip
    if want.maintenance:
        return Status("Maintenance", "Maintenance", **base, reason="maintenance: true")
    if mem.hold is not None:
        h = mem.hold
        what = f"power {h['state']}" if h.get("state") else "hold"
        return Status("Held", f"Held ({what} by {h.get('by')})", **base,
                      reason=f"{what} by {h.get('by')}", since=h.get("at"))  # fmt: skip
    if mem.failed is not None:
        f = mem.failed
        return Status("Failed", f"Failed (stuck after {f.get('step')})", **base,
                      reason=f.get("reason"), since=f.get("at"))  # fmt: skip
    relay = seen.relay if want.relay is not None else None
    if relay == "off":
        if want.power == "on" and mem.sent and mem.sent["state"] in ("on", "cycle") \
                and now - mem.sent["at"] < cfg.settle_s:  # fmt: skip
            return Status("Powering", "Powering", **base, since=mem.sent["at"])
        return Status("Off", "Off", **base)
    if relay == "queued":
        return Status("Powering", "Powering (queued)", **base, reason="waiting for its turn "
                      "(the device's stagger)")  # fmt: skip
    if relay == "cycling":
        return Status("Powering", "Powering (cycling)", **base)
    if _ready(want, seen, now, cfg):
        return Status("Ready", "Ready", **base, since=seen.heartbeat_at)
    if p.boot_at is None:
        if seen.installed:  # its install-once mark: it booted to the end once, before we looked
            return Status("Provisioned", "Provisioned (installed)", **base)
        if relay == "on":
            return Status("On", "On", **base, reason="powered, no boot seen since the "
                          "controller started watching")  # fmt: skip
        return Status("Unknown", "Unknown", **base)
    if p.done_at is not None:
        return Status("Provisioned", "Provisioned", **base, since=p.done_at)
    if p.local_disk:
        return Status("Provisioned", "Provisioned (local disk)", **base, since=p.step_at)
    if mem.stuck_boot == p.boot_at and mem.stuck_at is not None:
        n = mem.attempt + 1
        return Status("Stuck", f"Stuck ({n} of {cfg.cycles})", **{**base, "attempt": n},
                      reason=f"no step after {p.step} for {cfg.timeout(p.step or 'power-on'):g}s",
                      since=mem.stuck_at)  # fmt: skip
    if _past_its_step(p, now, cfg) and _unheard_yet(want, seen, now, cfg):
        # what the plan waits out (above): a boot past its step's timeout, from before this
        # controller began listening, may be a node up and beating; not "Booting" either
        return Status("Unknown", "Unknown (waiting for a beat)", **base, since=seen.listening_since,
                      reason=f"a boot from before the controller started, last at {p.step}; "
                      "heartbeats are not kept: it is judged when ready_s has passed with no beat")  # fmt: skip
    if p.step in (None, "power-on"):
        return Status("Powering", "Powering", **base, since=p.boot_at)
    text = f"Booting ({p.step})" + (f", retry {mem.attempt} of {cfg.cycles}" if mem.attempt else "")
    return Status("Booting", text, **base, since=p.step_at)


def plan_id(actions: list[Action], changes: list[dict[str, Any]] | None = None) -> str:
    """A short name for a plan: `bastion apply` carries out exactly the plan it names. Its
    changes are in it too (apply adopts them): one that carries no action (a MAC, a template)
    still makes another plan, so a plan made before another edit of the files is refused. A
    plan with no changes keeps the name its actions alone gave it."""
    key: list[Any] = [(a.machine, a.action, a.step, a.attempt) for a in actions]
    if changes:
        key = [key, changes]
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
