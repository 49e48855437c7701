"""--trusted-proxies and the machines' declared addresses: a trusted network that holds a node
lets any host on it name the node in X-Forwarded-For and take its one-time Ignition URL.
`bastion serve` refuses to start so, warns of a trusted network, and after a reload that puts
a machine's address inside one takes such a forwarded address as unknown. Against a real
`bastion serve` (uvicorn's proxy-headers middleware is not in a TestClient's stack)."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
from bastion_testkit import TOKEN, auth, free_tcp_port
from test_forwarded_address import MAC, NODE, get, secret_site


def test_serve_refuses_a_trusted_network_that_holds_a_machines_address(tmp_path):
    site = secret_site(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bastion.serve_cli", "serve", "--site", str(site), "--listen",
         f"127.0.0.1:{free_tcp_port()}", "--db", str(tmp_path / "e.db"), "--no-access-log",
         "--secrets", str(tmp_path / "secrets"), "--trusted-proxies", "127.0.0.1,10.77.0.0/24"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "BASTION_API_TOKEN": TOKEN},
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=60)  # it used to start and serve
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0, out
    assert "--trusted-proxies 10.77.0.0/24 holds machine n1's address 10.77.0.21" in out, out


def test_a_trusted_network_is_warned_of(serve, tmp_path):
    server = serve(secret_site(tmp_path), args=("--trusted-proxies", "127.0.0.1,127.0.0.0/8",
                                                "--secrets", str(tmp_path / "secrets")))  # fmt: skip
    log = server.log.read_text()
    assert "warning: --trusted-proxies 127.0.0.0/8 is a network of 16777216 addresses" in log, log
    assert "--trusted-proxies 127.0.0.1/32" not in log  # one address is what it should be


def test_a_reload_or_edit_that_puts_a_machine_inside_a_trusted_entry_is_refused(serve, tmp_path):
    site = secret_site(tmp_path)
    server = serve(site, args=("--trusted-proxies", "127.0.0.1", "--secrets", str(tmp_path / "secrets")))
    # the node behind the proxy at 127.0.0.1: its one-time URL
    status, body = get(server.port, f"/ipxe?mac={MAC}", NODE)
    assert status == 200 and b"ignition?token=" in body, body
    # the file now gives n1 the proxy's own address: it could name any machine as the client
    machines = site / "machines.yaml"
    machines.write_text(machines.read_text().replace(NODE, "127.0.0.1"))
    r = httpx.post(server.url + "/api/v1/reload", headers=auth(), timeout=30)
    # it was 200: the check ran at start only
    assert r.status_code == 422, r.text
    assert "--trusted-proxies 127.0.0.1/32 holds machine n1's address 127.0.0.1" in r.text, r.text
    # the old site keeps serving: n1 is still at its address
    status, body = get(server.port, f"/ipxe?mac={MAC}", NODE)
    assert status == 200 and b"ignition?token=" in body, body
    # an edit through the API is refused alike, and nothing is written
    machines.write_text(machines.read_text().replace("127.0.0.1", NODE))
    before = machines.read_text()
    r = httpx.patch(server.url + "/api/v1/machines/n1", headers=auth(),
                    json={"address": "127.0.0.1"}, timeout=30)  # fmt: skip
    assert r.status_code == 422, r.text
    assert "holds machine n1's address 127.0.0.1" in r.text, r.text
    assert machines.read_text() == before


def test_a_forwarded_address_inside_a_trusted_network_is_not_believed(serve, tmp_path):
    site = secret_site(tmp_path)
    server = serve(
        site, args=("--trusted-proxies", "127.0.0.0/8", "--secrets", str(tmp_path / "secrets"))
    )
    # the node outside the trusted network, through the proxy at 127.0.0.1: its one-time URL
    status, body = get(server.port, f"/ipxe?mac={MAC}", NODE)
    assert status == 200 and b"ignition?token=" in body, body
    # a host inside the network names itself: no machine's, and not believed either
    status, body = get(server.port, f"/ipxe?mac={MAC}", "127.0.0.21")
    assert status == 403 and b"this request came from an unknown address" in body, body
    assert b"token=" not in body
    assert (
        "X-Forwarded-For named 127.0.0.21, inside --trusted-proxies 127.0.0.0/8"
        in server.log.read_text()
    )
