"""tools/bench/boot_bench.py's baseline servers, checked by the real programs without a lab:
the proxyDHCP + TFTP dnsmasq's options pass dnsmasq's own syntax check, and the nginx config
passes `nginx -t`. The whole bench boots QEMU nodes in network namespaces (minutes, root): it is
run by hand (docs/benchmarks.md), and no test asserts a time."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from benchkit import load

boot_bench = load("boot_bench")
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


@pytest.mark.skipif(not shutil.which("dnsmasq"), reason="needs dnsmasq (dnsmasq-base)")
def test_the_proxy_dhcp_options_pass_dnsmasqs_syntax_check(tmp_path):
    cmd = boot_bench.proxy_dhcp_command("10.93.0", tmp_path, "http://10.93.0.3:8080/boot.ipxe")
    assert cmd[0] == "dnsmasq" and "-k" in cmd
    r = subprocess.run([*cmd, "--test"], capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 0 and "syntax check OK" in r.stderr + r.stdout, r.stderr


@pytest.mark.skipif(not os.access(NGINX, os.X_OK), reason="needs nginx (nginx-light)")
def test_the_nginx_config_passes_nginx_t(tmp_path):
    canned = tmp_path / "canned"
    canned.mkdir()
    conf = tmp_path / "nginx.conf"
    conf.write_text(boot_bench.nginx_conf(tmp_path, "127.0.0.1:8080", canned))
    r = subprocess.run([NGINX, "-t", "-p", str(tmp_path), "-c", str(conf)], capture_output=True,
                       text=True, timeout=30, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr


def test_the_options_are_checked():
    assert boot_bench.parse_args([]).runs == 1
    with pytest.raises(SystemExit):
        boot_bench.parse_args(["--runs", "0"])
