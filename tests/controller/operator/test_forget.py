"""A machine removed from the site is forgotten by the operator (its memory leaves the state
database) once the declaration it acts on no longer has it: at the next pass with `sync: auto`,
at `bastion apply` with `sync: manual`. A real Operator on a real site directory and SQLite
file; no device (nothing here switches power)."""

from __future__ import annotations

import pytest
from bastion.operator.runner import Operator
from bastion.site.holder import SiteHolder
from bastion.state.events import EventStore
from bastion.state.operator import OperatorState


@pytest.fixture
def operator_for(tmp_path, site_dir):
    made = []

    def make(site_yaml: str = "") -> Operator:
        if site_yaml:
            p = site_dir / "site.yaml"
            p.write_text(p.read_text() + site_yaml)
        store = EventStore(tmp_path / "events.db")
        op = Operator(SiteHolder(site_dir), store, OperatorState(tmp_path / "events.db"), store.record)
        made.append(op)
        return op

    yield make
    for op in made:
        op.state.close()
        op.store.close()


def remove_pi1(site_dir) -> str:
    """Take pi1 (the last entry) out of machines.yaml; its entry, to put back."""
    m = site_dir / "machines.yaml"
    text = m.read_text()
    cut = text.index("\n  - name: pi1\n")
    m.write_text(text[:cut + 1])
    return text[cut + 1:]


def hold_of(op: Operator, name: str):
    return next(m["hold"] for m in op.view()["machines"] if m["name"] == name)


def test_a_machine_removed_from_the_site_is_forgotten_at_the_next_pass(operator_for, site_dir, tmp_path):
    op = operator_for()
    op.pass_once()
    op.hold("pi1", "api")
    assert "pi1" in op.state.memories()
    entry = remove_pi1(site_dir)
    assert op.holder.reload().ok
    op.pass_once()
    assert sorted(op.state.memories()) == ["node1", "node2"]
    # a restart reads nothing of it back, and a machine declared again under the name starts free
    again = Operator(op.holder, op.store, OperatorState(tmp_path / "events.db"), op.record)
    assert "pi1" not in again._mem
    (site_dir / "machines.yaml").write_text((site_dir / "machines.yaml").read_text() + entry)
    assert op.holder.reload().ok
    op.pass_once()
    assert hold_of(op, "pi1") is None
    again.state.close()


def test_with_manual_sync_a_removed_machine_is_forgotten_at_the_apply_that_removes_it(operator_for, site_dir):
    op = operator_for("operator:\n  sync: manual\n")
    op.pass_once()
    op.hold("pi1", "api")
    remove_pi1(site_dir)
    assert op.holder.reload().ok
    op.pass_once()
    # served without pi1, but the declaration applied still has it: its hold is kept
    assert op.state.memories()["pi1"]["hold"]["by"] == "api"
    op.apply()
    assert "pi1" not in op.state.memories()
    assert sorted(op.state.memories()) == ["node1", "node2"]


def test_with_manual_sync_a_machine_put_back_before_apply_keeps_its_hold(operator_for, site_dir):
    op = operator_for("operator:\n  sync: manual\n")
    op.pass_once()
    op.hold("pi1", "api")
    entry = remove_pi1(site_dir)
    assert op.holder.reload().ok
    op.pass_once()
    (site_dir / "machines.yaml").write_text((site_dir / "machines.yaml").read_text() + entry)
    assert op.holder.reload().ok
    op.apply()
    assert hold_of(op, "pi1")["by"] == "api"
