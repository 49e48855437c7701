"""bastion.device.hub.DeviceHub: the node watchdog's watches kept in line with the site against
what the device itself says it watches, the heartbeats it forwards, and the event cursor it keeps
across a controller restart. Against the real sim board where a real peer can show it; against a
STAND-IN link for the faults a real board produces only by accident (a lost answer, a slow one)."""

from __future__ import annotations

import threading
from types import SimpleNamespace as NS
from typing import Any

import pytest
from bastion.device.hub import DeviceHub, read_status
from bastion.device.link import DeviceLink, DeviceTimeout
from simkit import SimProcess, wait_for

pytestmark = pytest.mark.timeout(120)

POWER = {"stagger_ms": 0, "channels": [{"name": f"node{i}", "min_off_ms": 0} for i in range(4)]}


def machine(name: str, relay: int | None, heartbeat: tuple[int, int] | None, mac=None, uuid=None):
    return NS(name=name, relay=relay, heartbeat=heartbeat, mac=mac, uuid=uuid)


def site_of(*machines) -> NS:
    by_mac = {m.mac: m for m in machines if m.mac}
    return NS(machines=list(machines), machine_by_mac=by_mac.get,
              machine=lambda name: next((m for m in machines if m.name == name), None))


def no_record(*a: Any, **k: Any) -> int:
    return 0


class WatchingLink:
    """STAND-IN for DeviceLink in front of a device's node watchdog: keeps the watches as
    firmware/watchdog.NodeWatch does and reports them in `status` as `nodes`. `lose` names
    (op, channel) requests whose answer is lost once (DeviceTimeout); while `gate` is set to an
    unset threading.Event, a `watch` waits for it (a reply lost and re-sent a second later),
    and `at_gate` says one does."""

    def __init__(self, nodes: dict[int, int] | None = None):
        self.ready, self.info, self.last_error = True, {}, None
        self.nodes: dict[int, int] = dict(nodes or {})  # channel -> timeout_ms
        self.lose: set[tuple[str, int | None]] = set()
        self.gate: threading.Event | None = None
        self.at_gate = threading.Event()
        self.asked: list[tuple[str, int | None]] = []
        self._lock = threading.Lock()

    def request(self, op: str, timeout: float | None = None, **args: Any) -> dict[str, Any]:
        ch = args.get("channel")
        if op == "watch" and self.gate is not None:
            self.at_gate.set()
            self.gate.wait(10)
        with self._lock:
            self.asked.append((op, ch))
            if (op, ch) in self.lose:
                self.lose.discard((op, ch))
                raise DeviceTimeout(f"{op}: no reply from the device within 5 s (no answer)",
                                    "timeout")  # fmt: skip
            if op == "status":
                node = {"booted": False, "attempt": 0, "gave_up": False}
                return {"nodes": {str(c): {"timeout_ms": t, **node} for c, t in self.nodes.items()}}
            if op == "watch":
                self.nodes[ch] = args["timeout_ms"]
            elif op == "unwatch":
                self.nodes.pop(ch, None)
            elif op == "beat":
                return {"watched": [c for c in args["channels"] if c in self.nodes]}
            return {"ch": ch}

    def start(self) -> WatchingLink:
        return self

    def close(self) -> None: ...
    def cursor(self) -> None: ...
    def on_event(self, fn: Any) -> None: ...
    def on_resync(self, fn: Any) -> None: ...
    def on_console(self, fn: Any) -> None: ...


# --- the watches: the device's own list is the truth ----------------------------------------
@pytest.fixture
def board(tmp_path):
    with SimProcess(tmp_path / "flash", tmp_path / "ttyACM0", {"power": POWER}) as s:
        yield s


def device_watches(hub: DeviceHub) -> set[int]:
    return {int(ch) for ch in read_status(hub.link, timeout=5).get("nodes") or {}}


def test_a_restarted_controller_takes_off_the_watches_the_device_kept_from_its_last_run(board):
    port = str(board.link)
    watched = site_of(machine("node2", 2, (60, 300)))
    hub = DeviceHub(port, lambda: watched, no_record).start()
    try:
        wait_for(lambda: hub.link.ready and device_watches(hub) == {2}, what="node2 watched")
    finally:
        hub.close()
    # heartbeat: removed from machines.yaml while the controller was down
    unwatched = site_of(machine("node2", 2, None))
    hub = DeviceHub(port, lambda: unwatched, no_record).start()
    try:
        wait_for(lambda: hub.resyncs and device_watches(hub) == set(), what="node2 unwatched")
        hub.site_changed()  # and a reload later still has nothing to take off
        assert device_watches(hub) == set()
    finally:
        hub.close()
    # restarted in a power cut: the UPS watch keeps the nodes out before the link is up
    hub = DeviceHub(port, lambda: watched, no_record).start()
    try:
        wait_for(lambda: hub.link.ready and device_watches(hub) == {2}, what="node2 watched")
    finally:
        hub.close()
    hub = DeviceHub(port, lambda: watched, no_record)
    hub.suspend_watch({2})
    hub.start()
    try:
        wait_for(lambda: hub.resyncs and device_watches(hub) == set(),
                 what="node2 kept out of the watchdog")  # fmt: skip
    finally:
        hub.close()


def test_an_unwatch_whose_answer_is_lost_is_tried_again():
    site = site_of(machine("node1", 1, (60, 300)), machine("node2", 2, (60, 300)))
    link = WatchingLink()
    hub = DeviceHub("standin", lambda: site, no_record, link=link)
    hub.BEAT_EVERY_S = 0.02
    hub._watch_all(link)  # the resync: both watched
    assert link.nodes == {1: 60000, 2: 60000}
    hub.start()
    try:
        site.machines = [machine("node1", 1, (60, 300)), machine("node2", 2, None)]
        link.lose = {("unwatch", 2)}
        hub.site_changed()  # heartbeat: removed; the unwatch's answer is lost
        wait_for(lambda: link.asked.count(("unwatch", 2)) >= 2 and 2 not in link.nodes,
                 what="the unwatch tried again")  # fmt: skip
        assert link.nodes == {1: 60000}
    finally:
        hub.close()


def test_a_resync_that_races_a_power_cut_leaves_the_nodes_unwatched():
    site = site_of(machine("node1", 1, (60, 300)), machine("node2", 2, (60, 300)))
    link = WatchingLink()
    hub = DeviceHub("standin", lambda: site, no_record, link=link)
    link.gate = threading.Event()  # the resync's first watch waits: its reply was lost
    resync = threading.Thread(target=hub._watch_all, args=(link,))  # as _on_resync starts it
    resync.start()
    wait_for(link.at_gate.is_set, what="the resync's first watch under way")
    ups = threading.Thread(target=hub.suspend_watch, args=({1, 2},))  # UPS: the nodes shut down
    ups.start()
    ups.join(0.5)  # (it may take its turn behind the resync)
    link.gate.set()
    resync.join(10)
    ups.join(10)
    assert link.nodes == {} and hub._unwatched == {1, 2}


def test_a_watched_node_is_not_watched_again_while_nothing_changed():
    # Watching again restarts the node's judgement (booted: false until it beats): a reload
    # or a retry that re-watched every node would keep a hung node from being power-cycled.
    site = site_of(machine("node1", 1, (60, 300)))
    link = WatchingLink()
    hub = DeviceHub("standin", lambda: site, no_record, link=link)
    hub._watch_all(link)
    hub._watch_all(link)
    assert link.asked.count(("watch", 1)) == 1
    site.machines = [machine("node1", 1, (90, 300))]  # its timeout changed: watched anew
    hub._watch_all(link)
    assert link.asked.count(("watch", 1)) == 2 and link.nodes == {1: 90000}


# --- heartbeats ------------------------------------------------------------------------------
def test_a_machine_declared_by_uuid_only_has_its_heartbeats_forwarded():
    uuid = "4c4c4544-0042-3510-8052-b4c04f4e3232"
    site = site_of(machine("node3", 3, (60, 300), uuid=uuid),
                   machine("node1", 1, (60, 300), mac="52:54:00:12:34:01"))
    hub = DeviceHub("standin", lambda: site, no_record, link=WatchingLink())
    assert hub.heartbeat(None, uuid=uuid.upper()) == "node3"  # UUIDs compare without case
    assert hub.heartbeat("52:54:00:99:99:99", uuid=uuid) == "node3"  # a MAC it does not know
    assert hub.heartbeat("52:54:00:12:34:01", uuid=uuid) == "node1"  # the MAC names it first
    assert hub.heartbeat(None) is None and hub.heartbeat(None, uuid="nope") is None
    assert hub._beats == {1, 3}
    # a machine declared with a MAC is that MAC's: a UUID does not name it (as at boot)
    site.machines[1] = machine("node1", 1, (60, 300), mac="52:54:00:12:34:01", uuid="u-1")
    assert hub.heartbeat(None, uuid="u-1") is None


def test_a_device_that_hangs_while_heartbeats_are_forwarded_is_not_ready_after_the_keepalives(
        tmp_path):  # fmt: skip
    # Each beat the hub sent put the link's keepalive off, so a hung device (its line open,
    # answering nothing) stayed ready for about 24 s instead of three keepalives (~8 s).
    from test_device_link import Cable, FakeBoard

    from firmware.watchdog import NodeWatch

    class CountingBoard(FakeBoard):  # the silent stand-in, counting the beats that reach it
        beats = 0

        def __init__(self) -> None:
            super().__init__()
            self.console.nodes = NodeWatch(self.power, self.console.clock(), self.log)

        def feed(self, data: bytes) -> None:
            self.beats += data.count(b'"op":"beat"')
            super().feed(data)

    board = CountingBoard()
    cable = Cable(tmp_path / "ttyHUNG", board)
    cable.plug()
    mac = "52:54:00:12:34:02"
    site = site_of(machine("node2", 2, (60, 300), mac=mac))
    link = DeviceLink(str(cable.path), retry_s=0.1, reconnect_s=0.05, keepalive_s=0.3)
    hub = DeviceHub(str(cable.path), lambda: site, no_record, link=link)
    hub.BEAT_EVERY_S = 0.05
    stop = threading.Event()

    def node_beats() -> None:  # node2's heartbeats, as /heartbeat hands them to the hub
        while not stop.wait(0.05):
            hub.heartbeat(mac)

    beater = threading.Thread(target=node_beats, daemon=True)
    hub.start()
    beater.start()
    try:
        wait_for(lambda: link.ready and hub.beats_forwarded >= 2, what="beats forwarded")
        board.silent = True  # the firmware hangs: the line stays open, nothing answers
        at_hang = board.beats
        wait_for(lambda: not link.ready, timeout=12, what="the hung device taken as not ready")
        assert board.beats > at_hang  # the hub kept sending beats to it all the while
        assert "answered none of the last 3 keepalives" in (link.last_error or "")
        board.silent = False
        wait_for(lambda: link.ready, what="ready again once it answers")
    finally:
        stop.set()
        beater.join(5)
        hub.close()
        cable.unplug()


# --- the event cursor across a controller restart --------------------------------------------
def test_a_restarted_controller_records_the_device_events_it_missed_while_stopped(board, tmp_path):
    from bastion.state.eventcursor import EventCursor

    port, db = str(board.link), tmp_path / "events.db"
    site = site_of()
    hub = DeviceHub(port, lambda: site, no_record, cursors=EventCursor(db)).start()
    try:
        wait_for(lambda: hub.link.ready, what="the link")
        # kept as it goes, not only at a clean stop (a controller may be killed)
        wait_for(lambda: EventCursor(db).get() == hub.link.cursor(), what="the cursor kept")
    finally:
        hub.close()
    other = DeviceLink.connect(port, 15)  # meanwhile: `bastion power on 2 --port`
    try:
        other.request("power", channel=2, state="on")
    finally:
        other.close()
    recorded: list[dict] = []
    hub = DeviceHub(port, lambda: site, lambda kind, **kw: recorded.append(kw["payload"]) or 0,
                    cursors=EventCursor(db)).start()  # fmt: skip
    try:
        wait_for(lambda: any(p.get("ch") == 2 and p.get("state") == "on" for p in recorded),
                 what="the power event of while it was stopped")  # fmt: skip
    finally:
        hub.close()
