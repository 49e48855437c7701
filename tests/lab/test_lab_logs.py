"""Logs off-site in the lab (marker `lab`): the lab's controller ships its history to Debian's
rsyslog, running in the lab's LAN namespace (tests/rsyslogkit.py), while a QEMU node boots
through the device. Every event of the boot that the history holds, the device's and the node's
included, arrives at rsyslog, in the history's order; rsyslog stopped for the whole of a second
boot and started again afterwards gets that boot's events then, in order, none lost.

The queue's bound and its drop counter are shown by
tests/controller/logship/test_logship_rsyslog.py (test_the_queue_bound_drops_the_oldest_and_counts_them:
with queue_max 20 and no collector, the oldest are dropped and counted on /metrics and as an
event); here the counter is read with `bastion logs status` and stays at 0."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bastion.lab.lab import Lab, Node
from bastion.lab.netns import Namespace
from rsyslogkit import PORT, Rsyslog

pytestmark = [pytest.mark.lab, pytest.mark.timeout(1200)]

NAME, PREFIX = "ebsys", "10.95.0"
NODE = "bios-1"
LOGS = {"targets": [{"name": "central", "type": "syslog", "host": "127.0.0.1", "port": PORT}]}
BOOT_S = 600  # a guard against a hang, not a measure


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the lab needs root (network namespaces, taps)")
    if not shutil.which("rsyslogd"):
        pytest.skip("rsyslog is not installed (tools/setup installs it)")
    lab = Lab(NAME, PREFIX, tmp_path_factory.mktemp("lab"))
    rs = None
    try:
        # a BIOS node (iPXE at once: the quickest boot), powered off after its callback
        lab.up([Node(NODE, "52:54:00:77:00:02", "bios", 1)], progress=lambda msg: None,
               site_extra={"logs": LOGS})  # fmt: skip
        # rsyslog on the LAN namespace's loopback, where the controller finds it (site.yaml)
        rs = Rsyslog(Namespace(lab.net.lan), lab.workdir / "rsyslog")
        rs.start()
        lab.rsyslog = rs
        yield lab
    finally:
        if rs is not None:
            rs.stop()
        lab.down()


def _history(lab: Lab) -> list[tuple[int, str, str]]:
    """(id, kind, source) of every event in the lab controller's history, in id order."""
    with sqlite3.connect(f"file:{lab.db_path}?mode=ro", uri=True) as c:
        return c.execute("SELECT id, kind, source FROM events ORDER BY id").fetchall()


def _ids(lab: Lab) -> list[int]:
    return [i for i, _, _ in _history(lab)]


def _first_seen(ids: list[int]) -> list[int]:
    """The ids in the order they first arrived: a record sent again after a reconnect (syslog
    has no acknowledgement, docs/logs.md) is a repeat, not a loss."""
    seen: set[int] = set()
    return [i for i in ids if not (i in seen or seen.add(i))]


def _all_arrived(lab: Lab, timeout: float = 120) -> list[int]:
    """What rsyslog received, once it holds every id of the history (a guard, not a measure)."""
    deadline = time.monotonic() + timeout
    while True:
        got = lab.rsyslog.ids()
        if set(_ids(lab)) <= set(got):
            return got
        assert time.monotonic() < deadline, (
            f"missing at rsyslog: {sorted(set(_ids(lab)) - set(got))[:50]}"
        )
        time.sleep(0.5)


def _queue_status(lab: Lab) -> dict:
    bastion = Path(sys.executable).parent / "bastion"
    r = subprocess.run([str(bastion), "logs", "status", "--db", str(lab.db_path), "--json"],
                       capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(r.stdout.splitlines()[0])


def _wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (got := pred()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)
    return got


def test_every_event_of_a_lab_boot_arrives_at_rsyslog_in_order(lab):
    r = lab.boot(NODE, timeout=BOOT_S, progress=lambda msg: None)
    assert r.ok, r.problems
    got = _all_arrived(lab)
    history = _history(lab)
    assert _first_seen(got) == [i for i, _, _ in history]  # all, in the history's order
    boot = [(i, kind, source) for i, kind, source in history if i > r.after]
    print(f"{len(boot)} events of the boot, {len(history)} in the history, all arrived")
    # the boot's own steps, the device's and the node's among them
    assert r.callback["id"] in {i for i, _, _ in boot}
    assert {"device", "node"} <= {source for _, _, source in boot}, boot
    assert {i for i, _, _ in boot} <= set(got)


def test_a_boot_while_rsyslog_is_stopped_arrives_afterwards_in_order_none_lost(lab):
    lab.rsyslog.stop()
    stopped = _ids(lab)[-1]
    before = len(lab.rsyslog.ids())
    after = lab.power_on(NODE)
    lab.wait_callback(NODE, after, BOOT_S)
    _wait(lambda: lab.vm_state(NODE) == "halted", 60, f"{NODE} powered itself off")
    # the shipper saw the collector go away: a logship event, in the history like any other
    _wait(lambda: [k for i, k, _ in _history(lab) if i > stopped and k == "logship"], 60,
          "a logship event (down)")  # fmt: skip
    during = [i for i in _ids(lab) if i > stopped]
    assert len(lab.rsyslog.ids()) == before  # nothing could arrive meanwhile
    queued = _queue_status(lab)["queued"]
    assert queued > 0  # the boot's events wait on disk
    lab.rsyslog.start()
    got = _all_arrived(lab)
    every = _ids(lab)
    first = _first_seen(got)
    assert first == every  # none lost, in order
    assert set(during) <= set(got[before:])  # they came after the restart
    print(
        f"{len(during)} events while rsyslog was stopped ({queued} queued on disk), "
        f"{len(every)} in the history; rsyslog got {len(got)} records, "
        f"{len(got) - len(first)} of them again after the reconnect"
    )
    payloads = _logship_actions(lab, stopped)
    assert "down" in payloads and "up" in payloads, payloads
    status = _wait(lambda: (s := _queue_status(lab))["queued"] == 0 and s, 60, "the queue empty")
    assert status["dropped"] == 0  # nothing had to be dropped: the bound was never hit


def _logship_actions(lab: Lab, after: int) -> list[str]:
    with sqlite3.connect(f"file:{lab.db_path}?mode=ro", uri=True) as c:
        rows = c.execute("SELECT payload FROM events WHERE kind = 'logship' AND id > ? ORDER BY id",
                         (after,)).fetchall()  # fmt: skip
    return [json.loads(p).get("action") for (p,) in rows]
