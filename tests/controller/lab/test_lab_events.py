"""bastion.lab.lab.Lab.events reads every event after an id, however many answers of the events
API that takes: an answer holds at most `limit` events and about 4 MiB (bastion.api.events), and
a lab run's history since `after` can be longer than one answer. Against a real controller
(uvicorn with the app, its answer bound made small) inside a network namespace with only `lo`,
reached the way the lab reaches it: curl run inside the namespace by Lab.http.

Needs root (a network namespace), as the lab does. No assertion looks at a time."""

from __future__ import annotations

import os
import sys
import textwrap
import time

import pytest
from bastion.lab.lab import CONTROLLER_PORT, Lab
from bastion.lab.netns import Namespace
from bastion.state.events import EventStore

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a network namespace needs root")

ANSWER_BYTES = 20_000  # about nine of the large events below in one answer

# The controller's app as `bastion serve` makes it, with a small answer bound.
SERVER = textwrap.dedent("""
    import sys
    from pathlib import Path

    import uvicorn
    from bastion.api import events as events_api
    from bastion.api.main import create_app
    from bastion.settings import Settings

    site, db, secrets, host, port, bound = sys.argv[1:]
    events_api.ANSWER_BYTES = int(bound)
    app = create_app(Settings(site_dir=Path(site), db_path=Path(db), poll_seconds=0,
                              secrets_dir=Path(secrets)))
    uvicorn.run(app, host=host, port=int(port), log_level="warning")
""")


@pytest.fixture
def lab_with_history(tmp_path, site_dir):
    """A Lab whose LAN namespace holds a controller with 41 large callbacks among 2,099 small
    tftp events, and the ids of all of them, oldest first."""
    db = tmp_path / "events.db"
    store = EventStore(db)
    ids = []
    for i in range(2140):
        if i % 53 == 0:
            ids.append(store.record("callback", source="node",
                                    payload={"stage": f"s{i}", "message": "x" * 2000}))  # fmt: skip
        else:
            ids.append(store.record("tftp", source="device", payload={"stage": "end", "n": i}))
    store.close()

    lab = Lab(name=f"tev{os.getpid() % 100000}", prefix="10.250.7", workdir=tmp_path / "lab")
    ns = Namespace(lab.net.lan).create()
    try:
        ns.ip("addr", "add", f"{lab.net.controller_ip}/32", "dev", "lo")
        ns.start([sys.executable, "-c", SERVER, str(site_dir), str(db), str(tmp_path / "secrets"),
                  lab.net.controller_ip, str(CONTROLLER_PORT), str(ANSWER_BYTES)],
                 name="controller", log=tmp_path / "controller.log")  # fmt: skip
        deadline = time.monotonic() + 60  # guards against a hang only
        while lab.http("/healthz", check=False) is None:
            assert time.monotonic() < deadline, (tmp_path / "controller.log").read_text()
            time.sleep(0.2)
        yield lab, ids
    finally:
        ns.destroy()


def test_events_reads_every_answer_after_an_id(lab_with_history):
    lab, ids = lab_with_history

    def recorded(events: list[dict]) -> list[int]:
        # the controller records its own events as it starts, after these
        return [e["id"] for e in events if e["kind"] in ("callback", "tftp")]

    # more than one answer both ways: the byte bound (large callbacks) and the count (1,000)
    assert recorded(lab.events(0)) == ids
    assert recorded(lab.events(ids[1000])) == ids[1001:]
    callbacks = lab.events(0, kind="callback")
    assert [e["payload"]["stage"] for e in callbacks] == [f"s{i}" for i in range(0, 2140, 53)]
    # a page smaller than the history, and the source filter over all of it
    assert recorded(lab.events(ids[-7], page=2)) == ids[-6:]
    assert len(lab.events(0, kind="tftp", source="device")) == 2140 - 41
    assert recorded(lab.events(ids[-1])) == []
    # `limit`: the first of them only, across answers too
    assert recorded(lab.events(ids[9], limit=1)) == [ids[10]]
    assert recorded(lab.events(0, limit=1500, page=400)) == ids[:1500]
