"""`bastion ups` against a running controller: `bastion serve` and the command both inside the
namespace of the real upsd (tests/nutkit.py), so that the controller reaches upsd on loopback as
a site's controller would, and the command reads GET /api/v1/ups as a person would."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from bastion_testkit import TOKEN
from nutkit import NutServer
from simkit import wait_for

HTTP = "127.0.0.1:8080"
UPS = "ups:\n  name: eaton\n  poll_s: 1\n  on_battery_s: 3600\n"
BASTION = str(Path(sys.executable).parent / "bastion")


def _serve(nut: NutServer, site: Path, db: Path) -> None:
    nut.ns.start([BASTION, "serve", "--site", str(site), "--db", str(db), "--listen", HTTP,
                  "--poll", "0", "--no-access-log", "--log-level", "warning"],
                 name="bastion", log=db.with_suffix(".log"),
                 env={**os.environ, "BASTION_API_TOKEN": TOKEN})  # fmt: skip
    # up once it answers at all: GET /api/v1/ups is 200, or 404 for a site without ups:
    wait_for(lambda: "HTTP 404" in (r := _ups(nut)).stderr or r.returncode == 0, timeout=30,
             what="bastion serve answers")  # fmt: skip


def _ups(nut: NutServer, *args: str):
    return nut.ns.run(BASTION, "ups", "--url", f"http://{HTTP}", *args, capture_output=True,
                      text=True, timeout=60)  # fmt: skip


def test_bastion_ups_shows_the_status_charge_and_phase(tmp_path, site_dir):
    (site_dir / "site.yaml").write_text((site_dir / "site.yaml").read_text() + UPS)
    with NutServer(tmp_path / "nut") as nut:
        _serve(nut, site_dir, tmp_path / "events.db")
        wait_for(lambda: json.loads(_ups(nut, "--json").stdout)["status"] == "OL", what="OL read")
        r = _ups(nut)
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines() == ["ups: eaton", "upsd answers: yes", "status: OL, charge 100%",
                                         "phase: mains"]  # fmt: skip
        nut.write("OB DISCHRG", 80)
        wait_for(lambda: json.loads(_ups(nut, "--json").stdout)["phase"] == "on-battery",
                 what="on battery")  # fmt: skip
        assert "status: OB DISCHRG, charge 80%" in _ups(nut).stdout
        nut.stop_upsd()
        wait_for(lambda: "upsd answers: no (cannot reach upsd" in _ups(nut).stdout, what="lost")
        out = _ups(nut).stdout
        assert "phase: on-battery" in out  # a silent UPS changes no phase
        assert "status: OB DISCHRG, charge 80%" in out  # the last reading


def test_bastion_ups_says_when_the_site_has_no_ups(tmp_path, site_dir):
    with NutServer(tmp_path / "nut") as nut:
        _serve(nut, site_dir, tmp_path / "events.db")
        r = _ups(nut)
        assert r.returncode == 1
        assert "the site declares no UPS (site.yaml ups:) (HTTP 404)" in r.stderr
