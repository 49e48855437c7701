"""A controller restarted in the middle of a power cut (the real upsd, no device): it still
holds power-ons and still knows which machines to power on again when mains returns."""

from __future__ import annotations

from bastion.ups.nut import NutClient
from bastion_testkit import TOKEN
from nutkit import NutServer, connect_in
from simkit import wait_for

UPS = "ups:\n  name: eaton\n  poll_s: 1\n  on_battery_s: 0\n  resume_charge: 50\n"


def test_the_policy_remembers_a_power_cut_across_a_restart(tmp_path, site_dir):
    from bastion.api.main import create_app
    from bastion.settings import Settings
    from fastapi.testclient import TestClient

    (site_dir / "site.yaml").write_text((site_dir / "site.yaml").read_text() + UPS)
    settings = Settings(site_dir=site_dir, db_path=tmp_path / "events.db", api_token=TOKEN,
                        poll_seconds=0, secrets_dir=tmp_path / "secrets")  # fmt: skip

    def controller(nut):
        app = create_app(settings)
        app.state.runtime.ups.connect = connect_in(nut.ns.name)
        return TestClient(app)

    def steps(c, action):
        evs = c.get("/api/v1/events", params={"kind": "ups", "limit": 1000}).json()
        return [e["machine"] for e in reversed(evs) if e["payload"]["action"] == action]

    with NutServer(tmp_path / "nut") as nut:
        nut.write("OB LB", 10)
        with controller(nut) as c:
            wait_for(lambda: c.get("/api/v1/ups").json()["phase"] == "off", what="relays opened")
            assert steps(c, "open") == ["node1", "pi1", "node2"]  # no relay seen: each is opened, the server last
        # mains returns while the controller is down: a controller that forgot the cut would
        # see a UPS on line and do nothing
        nut.write("OL CHRG", 80)
        upsc = NutClient(nut.ups, port=nut.port, connect=connect_in(nut.ns.name))
        wait_for(lambda: upsc.read().status == ("OL", "CHRG"), what="upsd says OL")
        upsc.close()
        with controller(nut) as c:  # the same history database
            wait_for(lambda: steps(c, "power-on"), what="power back on")
            # node2 (role control-plane) first; without a device each switch is an error event
            assert steps(c, "power-on") == ["node2", "node1", "pi1"]
            assert steps(c, "release") == [None]
            view = c.get("/api/v1/ups").json()
            assert view["phase"] == "mains" and view["holding"] is None and view["opened"] == []
