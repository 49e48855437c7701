"""After a power cut, which machines are powered on again is the operator's applied declaration's
call, not the site files': with `sync: manual` the two differ between an edit and `bastion
apply`, and going by the files the UPS watch and the operator fought (a machine left off that
the operator then powered on, one powered on that the operator then switched off).

A real Operator and UpsWatch on a real site directory and SQLite file; the device is a stand-in
that records the power commands (the policy's `off` phase is set, as after a cut)."""

from __future__ import annotations

import pytest
from bastion.device.link import DeviceError
from bastion.operator.runner import Operator
from bastion.site.holder import SiteHolder
from bastion.state.events import EventStore
from bastion.state.heartbeats import Heartbeats
from bastion.state.operator import OperatorState
from bastion.ups import core
from bastion.ups.runner import UpsWatch

SITE = "defaults:\n  power: on\noperator:\n  sync: manual\nups:\n  name: eaton\n"


class Hub:
    """The device as the watch uses it: every relay off (opened by the cut), power commands
    recorded, or refused while `refuse` is set."""

    power_hold = None

    def __init__(self):
        self.calls: list[tuple[str, str]] = []
        self.refuse = False

    def channels(self):
        return [{"ch": ch, "output": "off", "desired": "off"} for ch in (0, 1, 2)]

    def suspend_watch(self, channels):
        pass

    def resume_watch(self):
        pass

    def power(self, name, state, source="api"):
        if self.refuse:
            raise DeviceError(f"{name} went off 1000 ms ago; its minimum off time is 5000 ms", "refused")
        self.calls.append((name, state))


def set_power(site_dir, **power: str | None) -> None:
    """machines.yaml with each named machine's `power:` line set (None: taken out)."""
    m = site_dir / "machines.yaml"
    text = m.read_text()
    for name, state in power.items():
        head = f"  - name: {name}\n"
        text = text.replace(f"{head}    power: on\n", head).replace(f"{head}    power: off\n", head)
        if state is not None:
            text = text.replace(head, f"{head}    power: {state}\n")
    m.write_text(text)


@pytest.fixture
def after_a_cut(tmp_path, site_dir):
    """node2 applied off, node1 and pi1 applied on; then the files edited, not applied: node2
    on (the defaults), pi1 off. The UPS watch, its relays opened, sees mains come back."""
    p = site_dir / "site.yaml"
    p.write_text(p.read_text() + SITE)
    set_power(site_dir, node2="off")
    store = EventStore(tmp_path / "events.db")
    holder = SiteHolder(site_dir)
    op = Operator(holder, store, OperatorState(tmp_path / "events.db"), store.record)
    op.pass_once()  # the first declaration: applied as loaded
    set_power(site_dir, node2=None, pi1="off")
    assert holder.reload().ok
    op.pass_once()  # sync: manual: the edit is served, not applied
    assert (holder.site.machine("node2").power, holder.site.machine("pi1").power) == ("on", "off")
    recorded: list[dict] = []
    hub = Hub()
    watch = UpsWatch(holder, lambda kind, **kw: recorded.append({**kw["payload"], "machine": kw["machine"]}),
                     Heartbeats(), hub=hub, operator=op)  # fmt: skip
    watch.mem = core.Memory(phase="off", opened=("node1", "node2", "pi1"), status="OL", charge=90)
    watch._read = lambda section: (core.Ups(("OL",), 90.0), None)
    yield watch, hub, recorded
    op.state.close()
    store.close()


def skipped(recorded):
    return [(p["machine"], p["reason"]) for p in recorded if p["action"] == "skipped"]


def test_the_power_on_after_a_cut_follows_the_applied_declaration_not_the_files(after_a_cut):
    watch, hub, recorded = after_a_cut
    watch.pass_once()
    assert watch.mem.phase == "mains"
    # pi1 (applied on, files off) comes back; node2 (applied off, files on) stays off
    assert hub.calls == [("node1", "on"), ("pi1", "on")]
    assert skipped(recorded) == [("node2", "not powered on again: declared power: off")]


def test_a_refused_power_on_is_retried_by_the_applied_declaration_too(after_a_cut):
    watch, hub, recorded = after_a_cut
    hub.refuse = True
    watch.pass_once()  # node1's and pi1's power-ons refused, to be tried again; node2 skipped
    assert hub.calls == [] and sorted(watch._power_on_retry) == ["node1", "pi1"]
    hub.refuse = False
    watch.pass_once()
    assert hub.calls == [("node1", "on"), ("pi1", "on")]
    assert skipped(recorded) == [("node2", "not powered on again: declared power: off")]


def test_serve_gives_the_ups_watch_its_operator(client_for, site_dir):
    """The rule above holds in `bastion serve` only if its watch is handed the operator (without
    one it reads the files, as before)."""
    runtime = client_for(site_dir).app.state.runtime
    assert runtime.operator is not None and runtime.ups.operator is runtime.operator
