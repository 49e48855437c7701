"""How the operator follows the event history: what it reads each pass stays bounded however
many events name no machine (a matchbox group's boots, an unknown MAC's), and a step recorded by
address alone still reaches its machine's progress when the address is learned afterwards."""

from __future__ import annotations

import pytest
from bastion.operator.runner import Operator
from bastion.site.holder import SiteHolder
from bastion.state.events import ATTRIBUTABLE_IDS, EventStore
from bastion.state.operator import OperatorState

UNNAMED = ("boot", {"endpoint": "/boot.ipxe", "status": 200, "payload": {"client": "10.0.0.9"}})


@pytest.fixture
def operator_on(tmp_path, site_dir):
    made = []

    def make(name: str) -> tuple[Operator, EventStore]:
        store = EventStore(tmp_path / f"{name}.db")
        op = Operator(SiteHolder(site_dir), store, OperatorState(tmp_path / f"{name}-op.db"),
                      store.record)  # fmt: skip
        made.append(store)
        return op, store

    yield make
    for store in made:
        store.close()


def steps_of_a_pass(op: Operator, store: EventStore) -> int:
    """The SQLite virtual machine's instructions (in hundreds) one pass runs on the history."""
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0

    store._db.set_progress_handler(count, 100)
    try:
        op.pass_once()
    finally:
        store._db.set_progress_handler(None, 100)
    return steps[0]


def boot_of(op: Operator, name: str) -> dict:
    return next(m["boot"] for m in op.view()["machines"] if m["name"] == name)


def test_a_pass_reads_no_more_for_a_longer_history_of_unnamed_events(operator_on):
    cost = {}
    for n in (2 * ATTRIBUTABLE_IDS, 8 * ATTRIBUTABLE_IDS):
        op, store = operator_on(f"h{n}")
        op.pass_once()
        store.record_many([UNNAMED] * n)  # boots since the operator started, none a machine's
        op.pass_once()
        store.record(*UNNAMED[:1], **UNNAMED[1])
        cost[n] = steps_of_a_pass(op, store)
    small, large = cost.values()
    # the pass after four times as many unnamed events reads as much as before, not four times
    # as much (it read the whole history since start again every pass)
    assert small > 0 and large < 1.2 * small, cost


def test_a_step_named_after_a_pass_still_counts_for_its_machine(operator_on):
    op, store = operator_on("named")
    mac = "52:54:00:12:34:01"  # node1 of examples/site
    store.record("dhcp", source="device", mac=mac, machine="node1",
                 payload={"kind": "offer", "file": "ipxe.efi", "arch": 7})  # fmt: skip
    store.record_many([UNNAMED] * 50)
    store.record("tftp", source="device", payload={"stage": "start", "file": "ipxe.efi",
                                                   "client": "10.0.0.5"})  # fmt: skip
    op.pass_once()
    assert boot_of(op, "node1")["step"] == "pxe"  # the TFTP step is nobody's yet
    # the address is learned (a /ipxe with node1's MAC from 10.0.0.5): its steps get named
    assert store.attribute("10.0.0.5", mac, "node1", since=0, after_id=0) == 1
    op.pass_once()
    assert boot_of(op, "node1")["step"] == "tftp"
