"""`bastion sim --listen ADDR` in a network namespace with two LANs: the sim board's listeners
hear only the LAN that holds ADDR. Its TFTP and PXE (4011) sockets bind ADDR; its proxyDHCP,
which must hear broadcast DISCOVERs (Linux delivers a datagram to 255.255.255.255 only to a
socket on the wildcard address), binds the wildcard address on ADDR's interface alone
(SO_BINDTODEVICE). It used to bind 0.0.0.0:67 on every interface: the other LAN's DISCOVERs
were answered, and a DHCP server of the host's on port 67 collided with it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Self

import pytest
from simkit import SimProcess

pytestmark = pytest.mark.netns

HOSTILE = Path(__file__).resolve().parents[2] / "firmware" / "hostile.py"
DEVICE_IP, OTHER_IP = "10.76.0.1", "10.77.0.1"  # the device's LAN, and the host's other one


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


class TwoLans:
    """The device's namespace with two veth links: `lan` (DEVICE_IP, to the `cli` namespace)
    and `other` (OTHER_IP, to the `oth` namespace). Removed whatever happens."""

    def __init__(self) -> None:
        n = os.getpid() % 100000
        self.dev, self.cli, self.oth = f"ebsl{n}d", f"ebsl{n}c", f"ebsl{n}o"
        self.if_lan, self.if_other = f"sl{n}lan", f"sl{n}oth"
        self.made: list[str] = []

    def __enter__(self) -> Self:
        try:
            for ns in (self.dev, self.cli, self.oth):
                sh("ip", "netns", "add", ns)
                self.made.append(ns)
                sh("ip", "-n", ns, "link", "set", "lo", "up")
            for ifname, peer, ip in ((self.if_lan, self.cli, DEVICE_IP),
                                     (self.if_other, self.oth, OTHER_IP)):
                sh("ip", "-n", self.dev, "link", "add", ifname, "type", "veth", "peer", "name",
                   "eth0", "netns", peer)
                sh("ip", "-n", self.dev, "addr", "add", f"{ip}/24", "dev", ifname)
                sh("ip", "-n", self.dev, "link", "set", ifname, "up")
                client = ip[:-1] + "2"
                sh("ip", "-n", peer, "addr", "add", f"{client}/24", "dev", "eth0")
                sh("ip", "-n", peer, "link", "set", "eth0", "up")
                # 255.255.255.255 needs a route (lab-notes: "The sim board in a namespace")
                sh("ip", "-n", peer, "route", "add", "default", "dev", "eth0")
            sh("ip", "-n", self.dev, "route", "add", "default", "dev", self.if_lan)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for ns in self.made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)

    def discover(self, ns: str, server: str, mac: str, count: int = 5) -> dict:
        """Broadcast DISCOVERs from namespace ns for mac, as a PXE ROM does; the offers that
        came back counted."""
        args = json.dumps({"server": server, "count": count, "rate": 50, "mac": mac})
        r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, str(HOSTILE), "discover",
                            args], capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)


def udp_sockets(ns: str) -> list[str]:
    """The local address (with %interface when bound to one) of every UDP socket in ns."""
    out = sh("ip", "netns", "exec", ns, "ss", "-H", "-u", "-a", "-n")
    return sorted(line.split()[3] for line in out.splitlines() if line.strip())


def test_the_sim_board_listens_only_on_the_lan_of_its_listen_address(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    with TwoLans() as lans:
        board = SimProcess(tmp_path / "flash", tmp_path / "ttyBASTION", netns=lans.dev,
                           listen=DEVICE_IP)
        try:
            boot = board.wait(lambda e: e.get("ev") == "boot")
            assert boot["services"] == ["dhcp", "tftp"], boot
            assert udp_sockets(lans.dev) == sorted([
                f"0.0.0.0%{lans.if_lan}:67", f"{DEVICE_IP}:4011", f"{DEVICE_IP}:69"])
            # Broadcast DISCOVERs on the other LAN reach no socket of the device's (before,
            # each was offered: its broadcast reply left by the default route, into the
            # device's LAN); on its own LAN they are answered.
            lans.discover(lans.oth, OTHER_IP, "5254000000aa")
            assert lans.discover(lans.cli, DEVICE_IP, "5254000000bb")["answered"] == 5
            board.wait(lambda e: e.get("ev") == "dhcp" and e.get("mac") == "52:54:00:00:00:bb")
            assert {e["mac"] for e in board.seen if e.get("ev") == "dhcp"} == {
                "52:54:00:00:00:bb"}
        finally:
            board.stop()
