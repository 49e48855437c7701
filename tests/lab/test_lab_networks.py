"""The two-network lab (marker `lab`, docs/network.md): the PXE LAN (br0) and the management
network (br1) on the controller host. A QEMU node on the PXE LAN boots through the device and
the controller's boot listener; from the PXE LAN the management API and dashboard are out of
reach (the management listener is bound to br1's address and interface, and a management path
on the boot listener is refused), even for a machine that routes the management subnet through
the controller host; from the management network they answer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from bastion.lab.lab import CONTROLLER_PORT, Lab, default_nodes
from bastion.lab.netns import Namespace, namespaces, stop_process

pytestmark = [pytest.mark.lab, pytest.mark.timeout(900)]

NAME, PREFIX, MANAGEMENT = "ebns", "10.88.0", "10.89.0"
CONTROL_PORT = 8099
MANAGEMENT_PATHS = ("/api/v1/machines", "/api/v1/events", "/dashboard", "/metrics", "/docs")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the lab needs root (network namespaces, taps)")
    lab = Lab(NAME, PREFIX, tmp_path_factory.mktemp("labns"), management_prefix=MANAGEMENT)
    try:
        lab.up([n for n in default_nodes() if n.firmware == "bios"], progress=lambda msg: None)
        yield lab
    finally:
        lab.down()


def curl(ns: str, url: str) -> tuple[int, str, str]:
    """(curl's exit status, the HTTP status or "", the body) of a GET from namespace `ns`."""
    r = Namespace(ns).run("curl", "-sS", "--max-time", "10", "-w", "\n%{http_code}", url,
                          capture_output=True, text=True)  # fmt: skip
    body, _, code = r.stdout.rpartition("\n")
    return r.returncode, code if r.returncode == 0 else "", body + r.stderr


def test_the_lab_has_both_networks(lab):
    assert {lab.net.lan, lab.net.router, lab.net.mgmt, lab.net.pxe_host} <= namespaces()
    assert lab.management_url == f"http://{MANAGEMENT}.3:{CONTROLLER_PORT}"
    site = (lab.site / "site.yaml").read_text()
    assert f"subnet: {PREFIX}.0/24" in site and f"subnet: {MANAGEMENT}.0/24" in site


def test_a_node_on_the_pxe_lan_boots_through_the_boot_listener(lab):
    r = lab.boot("bios-1", timeout=400, progress=lambda msg: None)
    assert r.ok, r.problems
    by = {s.stage: s for s in r.steps}
    for stage in ("GET /boot.ipxe", "GET /ipxe", "GET /ignition"):
        assert by[stage].event["status"] == 200, stage
    assert by["GET /ipxe"].event["payload"]["client"].startswith(f"{PREFIX}.")
    assert r.callback["payload"]["client"].startswith(f"{PREFIX}.")


def test_from_the_pxe_lan_the_boot_listener_serves_boot_paths_only(lab):
    boot = lab.controller_url
    code, status, _ = curl(lab.net.pxe_host, boot + "/boot.ipxe")
    assert (code, status) == (0, "200")
    for path in MANAGEMENT_PATHS:
        code, status, body = curl(lab.net.pxe_host, boot + path)
        assert (code, status) == (0, "403"), (path, body)
        assert "management listener (--management-listen)" in json.loads(body)["detail"]


def test_from_the_pxe_lan_the_management_listener_is_out_of_reach(lab, tmp_path):
    url = lab.management_url + "/api/v1/machines"
    code, _, out = curl(lab.net.pxe_host, url)
    assert code != 0, out  # no route to the management network from the PXE LAN
    # A hostile machine on the PXE LAN routes the management subnet through the controller
    # host itself: Linux would accept the connection to a local address arriving on br0 (the
    # weak host model); the listener bound to br1 refuses it.
    pxe_host = Namespace(lab.net.pxe_host)
    pxe_host.ip("route", "add", f"{MANAGEMENT}.0/24", "via", lab.net.controller_ip)
    # the control: a socket on the management address without an interface, which the route
    # does reach (Linux's weak host model)
    control = subprocess.Popen(Namespace(lab.net.lan).argv(
        sys.executable, "-m", "http.server", "--bind", f"{MANAGEMENT}.3", str(CONTROL_PORT)),
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        for _ in range(100):
            code, status, out = curl(lab.net.pxe_host, f"http://{MANAGEMENT}.3:{CONTROL_PORT}/")
            if status == "200":
                break
            time.sleep(0.1)
        assert status == "200", out
        code, _, out = curl(lab.net.pxe_host, url)
        assert code == 7, out  # curl 7: could not connect (refused: no socket for it on br0)
        code, _, out = curl(lab.net.pxe_host, lab.management_url + "/dashboard")
        assert code == 7, out
    finally:
        stop_process(control)
        pxe_host.ip("route", "del", f"{MANAGEMENT}.0/24")


def test_from_the_management_network_the_api_and_dashboard_answer(lab):
    url = lab.management_url
    code, status, body = curl(lab.net.mgmt, url + "/api/v1/machines")
    assert (code, status) == (0, "200"), body
    assert [m["name"] for m in json.loads(body)] == ["bios-1"]
    code, status, body = curl(lab.net.mgmt, url + "/dashboard")
    assert (code, status) == (0, "200") and "bios-1" in body
    code, status, body = curl(lab.net.mgmt, url + "/metrics")
    assert (code, status) == (0, "200")
    refused = [x for x in body.splitlines() if x.startswith("bastion_listener_refusals_total ")]
    assert refused and float(refused[0].split()[1]) >= len(MANAGEMENT_PATHS)
    # and the management network does not reach the PXE LAN's boot listener
    code, _, out = curl(lab.net.mgmt, lab.controller_url + "/boot.ipxe")
    assert code != 0, out
