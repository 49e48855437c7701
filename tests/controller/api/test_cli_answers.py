"""bastion.client.ANSWERS restates, by hand, what the command line reads from each API answer.
Each entry is checked here against the real application's answer (`bastion serve` holding the
sim board's serial line, a site with a UPS and a plan to apply), through ApiClient.call as the
commands call it: an answer that loses or renames a key the table names fails here, not in a
person's terminal. Every array the table describes must hold items here, so that the items'
shapes are checked too, and every entry must have its example."""

from __future__ import annotations

from typing import Any

import pytest
from bastion.client import ANSWERS, SITE, ApiClient, lacks
from bastion_testkit import TOKEN, Server, free_tcp_port
from simkit import SimProcess, wait_for

POWER = {"stagger_ms": 200,
         "channels": [{"name": n, "min_off_ms": 200} for n in ("node1", "node2", "pi1")]}  # fmt: skip

# Each call the command line makes, in an order that gives every answer something to hold: the
# plan before it is applied, a hold before its release. (method, path, JSON body or None)
CALLS: list[tuple[str, str, Any]] = [
    ("GET", "/api/v1/operator", None),
    ("GET", "/api/v1/plan", None),
    ("POST", "/api/v1/apply", None),  # the body (the plan's id) is filled in below
    ("GET", "/api/v1/machines", None),
    ("GET", "/api/v1/machines/node1", None),
    ("POST", "/api/v1/machines/node1/reprovision", None),
    ("POST", "/api/v1/machines/pi1/hold", None),
    ("POST", "/api/v1/machines/pi1/release", None),
    ("POST", "/api/v1/machines/node1/power", {"state": "on"}),
    ("POST", "/api/v1/device/power/2", {"state": "on"}),
    ("GET", "/api/v1/device", None),
    ("GET", "/api/v1/ups", None),
    ("GET", "/api/v1/events", None),
]


def empty_arrays(value: Any, shape: Any, where: str = "it") -> list[str]:
    """Where `value` has an empty array for an array of items `shape` describes: items whose
    shape this answer does not show."""
    if isinstance(shape, list):
        if not value:
            return [where]
        return [p for i, item in enumerate(value) for p in empty_arrays(item, shape[0], f"{where}[{i}]")]
    if isinstance(shape, dict):
        return [p for key, inner in shape.items() for p in empty_arrays(value[key], inner, f"{where}.{key}")]
    return []


@pytest.fixture
def served(tmp_path, site_dir):
    """`bastion serve` with the sim board, the operator on `sync: manual` with every machine
    declared on, and a UPS whose upsd does not answer (its view is there all the same)."""
    with (site_dir / "site.yaml").open("a") as f:
        f.write("defaults:\n  power: on\noperator:\n  sync: manual\n  interval_s: 1\n")
        f.write(f"ups:\n  name: eaton\n  port: {free_tcp_port()}\n")  # nothing listens there
    with SimProcess(tmp_path / "flash", tmp_path / "ttyACM0", {"power": POWER}) as board:
        srv = Server(site_dir, tmp_path / "events.db", TOKEN, device=str(board.link))
        try:
            wait_for(lambda: srv.get("/api/v1/device").json().get("connected"), what="device link")
            yield srv, site_dir
        finally:
            srv.stop()


def test_every_answer_the_cli_reads_has_the_shape_its_table_says(served):
    srv, site = served

    def outputs() -> list[str]:
        return [c["output"] for c in srv.get("/api/v1/device").json()["status"]["power"][:3]]

    wait_for(lambda: outputs() == ["on", "on", "on"], what="declared on: three relays on")
    # an edit by hand that the operator waits to apply: a plan with a change and an action
    m = site / "machines.yaml"
    m.write_text(m.read_text().replace("  - name: node2\n", "  - name: node2\n    power: off\n"))
    api = ApiClient(srv.url, TOKEN)
    covered = set()
    plan_id = None
    for method, path, body in CALLS:
        entries = [i for i, (m_, p, _) in enumerate(ANSWERS) if m_ == method and p.fullmatch(path)]
        assert len(entries) == 1, (method, path, entries)
        covered.add(entries[0])
        if path == "/api/v1/apply":
            body = {"plan": plan_id}
        answer = api.call(method, path, **({"json": body} if body is not None else {}))  # the check
        shape = ANSWERS[entries[0]][2]
        assert lacks(answer, shape) is None
        assert empty_arrays(answer, shape) == [], (method, path, answer)
        if path == "/api/v1/plan":
            plan_id = answer["id"]
    assert covered == set(range(len(ANSWERS))), [ANSWERS[i][:2] for i in set(range(len(ANSWERS))) - covered]
    # what the client asks when an answer is an empty array
    assert lacks(srv.get(SITE[1]).json(), SITE[2]) is None
