"""The k3s Butane's heartbeat script acts on the controller's shutdown request: rendered for a
home-lab agent, run with sh and curl against the controller (uvicorn) while NUT's real upsd
(dummy-ups, in a namespace) says the site is on battery. `systemctl` is the one stand-in: the
host running the test must not power off, so a script on PATH writes down what it was asked."""

from __future__ import annotations

import re
import socket
import subprocess
import threading
import time
import urllib.parse

import httpx
import pytest
from bastion import boot
from bastion.model import BootRequest
from bastion.render.config import render_ignition
from bastion.site.load import load_site
from bastion.state.secrets import SecretStore, machine_secrets
from bastion_testkit import TOKEN
from mirrorkit import home_lab_copy
from nutkit import NutServer, connect_in
from simkit import wait_for

SYSTEMCTL = """#!/bin/sh
echo "$*" >> "$SYSTEMCTL_LOG"
[ "$1" = is-active ] && echo active
[ "$1" = poweroff ] && touch "$SYSTEMCTL_LOG.shutting-down"
exit 0
"""
# The stand-in for logind's PreparingForShutdown, read with busctl: true once the stand-in
# systemctl was asked to power off (logind then holds the shutdown for the kubelet's grace).
BUSCTL = """#!/bin/sh
echo "busctl $*" >> "$SYSTEMCTL_LOG"
[ -e "$SYSTEMCTL_LOG.shutting-down" ] && echo "b true" || echo "b false"
"""


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def controller(tmp_path):
    import uvicorn
    from bastion.api.main import create_app
    from bastion.settings import Settings

    port = free_tcp_port()
    site = tmp_path / "home-lab"
    home_lab_copy(site)
    text = (site / "site.yaml").read_text().replace("http://192.168.1.10:8080", f"http://127.0.0.1:{port}")
    # the controller is on loopback here, not on the example's PXE LAN: its networks: must go
    text = re.sub(r"\nnetworks:\n(?:[ #].*\n|\n)*", "\n", text)
    assert "networks:" not in text and "ups:" not in text
    (site / "site.yaml").write_text(text + "ups:\n  name: eaton\n  poll_s: 1\n  on_battery_s: 0\n  quiet_s: 4\n")
    # nuc1 beats from here, and a machine that declares `address:` is heard only from there
    machines = site / "machines.yaml"
    machines.write_text(machines.read_text().replace("address: 192.168.1.31 ", "address: 127.0.0.1 "))
    with NutServer(tmp_path / "nut") as nut:
        app = create_app(Settings(site_dir=site, db_path=tmp_path / "events.db", api_token=TOKEN,
                                  poll_seconds=0, secrets_dir=tmp_path / "secrets"))  # fmt: skip
        app.state.runtime.ups.connect = connect_in(nut.ns.name)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        t = threading.Thread(target=server.run, daemon=True)
        t.start()
        try:
            wait_for(lambda: server.started, what="uvicorn")
            yield site, f"http://127.0.0.1:{port}", nut
        finally:
            server.should_exit = True
            t.join(timeout=10)


def heartbeat_script(site_dir, url: str, name: str) -> str:
    site = load_site(site_dir)
    m = site.machine(name)
    group, profile = boot.select(site, {"mac": m.mac})
    config = render_ignition(site, group, profile, BootRequest({"mac": m.mac}, f"mac={m.mac}", url),
                             machine_secrets(SecretStore(site_dir.parent / "secrets"), site, m))  # fmt: skip
    files = {f["path"]: f for f in config["storage"]["files"]}
    return urllib.parse.unquote(files["/opt/bin/bastion-heartbeat"]["contents"]["source"][len("data:,"):])


def test_the_heartbeat_script_powers_the_node_off_when_its_answer_asks(controller, tmp_path):
    site, url, nut = controller
    script = heartbeat_script(site, url, "nuc1")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("systemctl", SYSTEMCTL), ("busctl", BUSCTL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "systemctl.log"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SYSTEMCTL_LOG": str(log)}

    def beat() -> subprocess.CompletedProcess:
        r = subprocess.run(["sh", "-c", script], capture_output=True, text=True, env=env, timeout=30, check=False)
        assert r.returncode == 0, r.stderr
        return r

    def ups_steps():
        evs = httpx.get(f"{url}/api/v1/events", params={"kind": "ups", "limit": 100}).json()
        return [(e["payload"]["action"], e["machine"]) for e in reversed(evs)]

    wait_for(lambda: ("status", None) in ups_steps(), what="the UPS read")
    # a watch that has just started presumes a node it has not heard from alive for quiet_s
    # (a restart in a cut must not take them all for down): past it, nuc2 never beat
    time.sleep(4.5)
    beat()
    assert log.read_text().split("\n")[:-1] == ["is-active k3s.service"]  # mains: a beat, nothing else
    nut.write("OB DISCHRG", 90)
    wait_for(lambda: ("shutdown", "nuc1") in ups_steps(), what="nuc1 asked")
    r = beat()
    assert log.read_text().split("\n")[-2] == "poweroff"
    assert "asks nuc1 to shut down" in r.stdout
    # a beat in the grace period that follows (logind holds the shutdown for the kubelet): asked
    # again, the node sees its shutdown under way and asks logind for nothing more (a second
    # poweroff was refused there, and left the heartbeat unit failed)
    r = beat()
    assert [line for line in log.read_text().split("\n") if line == "poweroff"] == ["poweroff"]
    assert "PreparingForShutdown" in log.read_text().split("\n")[-2] and not r.stdout
    assert ("told", "nuc1") in ups_steps()
    # the servers had not beaten: they are down already; nobody else was asked
    assert [m for a, m in ups_steps() if a == "shutdown"] == ["nuc1"]
