"""The lab's home router (bastion.lab.lab.router_command, dnsmasq in NAME-rt): it advertises the
LAN's IPv6 ULA /64 as a home router does, so a host on the lab's LAN configures an address in it
by SLAAC (iPXE waits ~16 s for such an advertisement otherwise), and the /64 comes from the
lab's IPv4 prefix, so two labs never share it.

No assertion looks at a time: the timeouts only guard against a hang.
"""

from __future__ import annotations

import ipaddress
import os
import re
import time

import pytest
from bastion.lab.lab import router_command
from bastion.lab.netns import LabNet, Namespace, Supervisor, teardown

# this helper's lab name and prefix (other sessions' labs use others)
NAME, PREFIX = "ebbl", "10.93.0"


def test_each_lab_prefix_has_its_own_unique_local_64():
    nets = [LabNet("x", p) for p in ("10.93.0", "10.77.0", "10.77.1", "10.255.255")]
    prefixes = [ipaddress.IPv6Network(f"{n.ula_prefix}/64") for n in nets]
    assert len(set(prefixes)) == len(prefixes)
    ula = ipaddress.IPv6Network("fd00::/8")  # RFC 4193, L = 1
    assert all(p.subnet_of(ula) for p in prefixes)
    assert all(ipaddress.IPv6Address(n.router_ip6) in p for n, p in zip(nets, prefixes))


def test_the_router_command_advertises_the_ula_prefix_without_dhcpv6():
    net = LabNet(NAME, PREFIX)
    cmd = router_command(net, "/tmp/leases")
    assert "--enable-ra" in cmd
    assert f"--dhcp-range={net.ula_prefix},ra-only,64" in cmd  # ra-only: M and O flags clear


@pytest.mark.netns
def test_a_host_on_the_lab_lan_takes_an_address_from_the_routers_advertisement(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    net = LabNet(NAME, PREFIX)
    procs = Supervisor(tmp_path / "state.json")
    teardown(net)  # what an earlier, interrupted run of this test left
    try:
        net.create()
        router = procs.start("router", router_command(net, tmp_path / "leases"), netns=net.router,
                             log=tmp_path / "router.log")  # fmt: skip
        lan = Namespace(net.lan)
        prefix = ipaddress.IPv6Network(f"{net.ula_prefix}/64")
        found: list[ipaddress.IPv6Address] = []
        deadline = time.monotonic() + 60
        while not found and time.monotonic() < deadline and router.poll() is None:
            out = lan.ip("-6", "-o", "addr", "show", "dev", "br0", "scope", "global")
            found = [a for a in map(ipaddress.IPv6Address, re.findall(r"inet6 ([0-9a-f:]+)/64", out))
                     if a in prefix]  # fmt: skip
            time.sleep(0.2)
        log = (tmp_path / "router.log").read_text(errors="replace")
        assert found, f"br0 took no address in {prefix}; router log:\n{log}"
        assert "router advertisement on" in log, log
    finally:
        procs.stop_all()
        teardown(net)
