"""`bastion install-service`: the unit passes systemd-analyze verify, the user is made by the real
systemd-sysusers, the token is kept, --dry-run changes nothing; all under a --root directory
(the host's /etc is never touched)."""

from __future__ import annotations

import shutil
import stat
import subprocess

import pytest
from bastion import service
from bastion.cli import main
from bastion_testkit import EXAMPLES, Server, write_assets
from click.testing import CliRunner
from simkit import free_udp_port

pytestmark = pytest.mark.skipif(not shutil.which("systemd-analyze"),
                                reason="needs systemd-analyze (Debian: systemd)")  # fmt: skip


@pytest.fixture
def site(tmp_path):
    d = tmp_path / "site"
    shutil.copytree(EXAMPLES / "site", d)
    write_assets(d, ("flatcar/amd64", "flatcar/arm64"))
    (d / "tftp").mkdir()
    return d


def install(root, site, *extra):
    return CliRunner().invoke(main, ["install-service", "--site", str(site), "--root", str(root),
                                     "--tftp", "0.0.0.0:69", "--device", "/dev/ttyACM0", *extra],
                              catch_exceptions=False)  # fmt: skip


def verify(unit) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                          timeout=60)  # fmt: skip


@pytest.mark.parametrize("device", ["/dev/ttyAMA0", "/dev/ttyS0", "/dev/serial/by-id/usb-Raspberry_Pi_Pico_E6614C-if00"])
def test_a_serial_line_that_is_not_usb_is_allowed_too(tmp_path, site, device):
    # DevicePolicy=closed with only the USB serial groups allowed would keep the controller
    # from a board on a UART (a Pi's ttyAMA0, a PC's ttyS0): --device gets a line of its own
    root = tmp_path / "root"
    r = install(root, site, "--device", device)
    assert r.exit_code == 0, r.output
    unit = root / "etc/systemd/system/edge-bastion.service"
    lines = unit.read_text().splitlines()
    assert f"DeviceAllow={device} rw" in lines and f"--device {device}" in unit.read_text()
    v = verify(unit)
    assert v.returncode == 0, v.stdout + v.stderr
    # the USB serial lines need none: their groups cover every number they come back as; nor
    # does a pyserial URL
    for other in ("/dev/ttyACM0", "socket://10.0.0.5:4000"):
        assert install(root, site, "--device", other).exit_code == 0
        assert not [x for x in unit.read_text().splitlines() if x.startswith("DeviceAllow=") and "char-" not in x]


def test_the_installed_unit_passes_systemd_analyze_verify(tmp_path, site):
    root = tmp_path / "root"
    r = install(root, site)
    assert r.exit_code == 0, r.output
    unit = root / "etc/systemd/system/edge-bastion.service"
    token = root / "etc/edge-bastion/token"
    for path in (unit, root / "etc/sysusers.d/edge-bastion.conf", token):
        assert f"wrote {path}" in r.output
    assert f"ran systemd-sysusers --root={root}" in r.output
    v = verify(unit)
    assert v.returncode == 0, v.stdout + v.stderr
    text = unit.read_text()
    lines = set(text.splitlines())
    for want in ("User=edge-bastion", "SupplementaryGroups=dialout", "ProtectSystem=strict",
                 "StateDirectory=edge-bastion", "AmbientCapabilities=CAP_NET_BIND_SERVICE",
                 "CapabilityBoundingSet=CAP_NET_BIND_SERVICE", "NoNewPrivileges=yes",
                 f"LimitNOFILE={service.LIMIT_NOFILE}", f"ReadWritePaths={site.resolve()}",
                 "Environment=XDG_STATE_HOME=%S"):  # fmt: skip
        assert want in lines, want
    exec_start = next(x for x in lines if x.startswith("ExecStart="))
    assert (
        f" serve --site {site.resolve()} --listen 0.0.0.0:8080 --token-file "
        "/etc/edge-bastion/token --tftp 0.0.0.0:69 --device /dev/ttyACM0" in exec_start
    )
    # systemd-sysusers made the user, in the dialout group, with its home the state directory
    passwd = (root / "etc/passwd").read_text()
    assert any(x.startswith("edge-bastion:") and ":/var/lib/edge-bastion:" in x
               for x in passwd.splitlines()), passwd  # fmt: skip
    dialout = next(
        x for x in (root / "etc/group").read_text().splitlines() if x.startswith("dialout:")
    )
    assert "edge-bastion" in dialout.split(":")[3].split(",")
    assert stat.S_IMODE(token.stat().st_mode) == 0o640 and len(token.read_text().strip()) >= 32


def test_systemd_analyze_verify_does_refuse_a_broken_unit(tmp_path, site):
    """So that its word on the real unit means something."""
    root = tmp_path / "root"
    assert install(root, site).exit_code == 0
    unit = root / "etc/systemd/system/edge-bastion.service"
    unit.write_text(unit.read_text().replace("ExecStart=/", "ExecStart=relative/"))
    assert verify(unit).returncode != 0


def test_a_second_install_keeps_the_token_and_dry_run_changes_nothing(tmp_path, site):
    root = tmp_path / "root"
    assert install(root, site).exit_code == 0
    token = (root / "etc/edge-bastion/token").read_text()
    again = install(root, site)
    assert (
        again.exit_code == 0
        and f"kept {root / 'etc/edge-bastion/token'} (it exists)" in again.output
    )
    assert (root / "etc/edge-bastion/token").read_text() == token
    other = tmp_path / "other"
    dry = install(other, site, "--dry-run")
    assert dry.exit_code == 0
    assert "would write" in dry.output and "[Service]" in dry.output
    assert not other.exists()


def test_a_site_that_does_not_load_is_not_installed(tmp_path, site):
    (site / "machines.yaml").write_text("machines: [\n")
    r = install(tmp_path / "root", site)
    assert r.exit_code == 1 and "does not load, so the service could not start" in r.output
    assert not (tmp_path / "root").exists()


def test_the_units_descriptor_limit_gives_serve_its_full_connection_cap(tmp_path, site):
    server = Server(
        site,
        tmp_path / "events.db",
        None,
        nofile=service.LIMIT_NOFILE,
        args=("--tftp", f"127.0.0.1:{free_udp_port()}"),
    )
    try:
        log = server.log.read_text()
    finally:
        server.stop()
    assert "HTTP connections at most 1000" in log and "lowered" not in log


def test_the_unit_serves_the_management_listener_apart(tmp_path, site):
    root = tmp_path / "root"
    r = install(root, site, "--listen", "10.88.0.1:8080", "--management-listen", "10.89.0.1:8443",
                "--management-interface", "mgmt0")
    assert r.exit_code == 0, r.output
    unit = root / "etc/systemd/system/edge-bastion.service"
    v = verify(unit)
    assert v.returncode == 0, v.stdout + v.stderr
    exec_start = next(x for x in unit.read_text().splitlines() if x.startswith("ExecStart="))
    assert " --listen 10.88.0.1:8080 --token-file /etc/edge-bastion/token --management-listen " \
           "10.89.0.1:8443 --management-interface mgmt0 --tftp" in exec_start
    # the command the unit runs takes the option as written
    argv = exec_start.removeprefix("ExecStart=").split()
    r = CliRunner().invoke(main, [*argv[1:], "--help"])
    assert r.exit_code == 0 and "--management-listen" in r.output and "--management-interface" in r.output


def test_the_unit_passes_the_names_and_proxies_it_was_given_checked(tmp_path, site):
    root = tmp_path / "root"
    r = install(root, site, "--allowed-hosts", "Bastion.LAN,pxe", "--trusted-proxies", "127.0.0.1")
    assert r.exit_code == 0, r.output
    unit = root / "etc/systemd/system/edge-bastion.service"
    exec_start = next(x for x in unit.read_text().splitlines() if x.startswith("ExecStart="))
    assert exec_start.endswith(" --allowed-hosts bastion.lan,pxe --trusted-proxies 127.0.0.1")
    v = verify(unit)
    assert v.returncode == 0, v.stdout + v.stderr
    for bad, says in ((("--allowed-hosts", "http://bastion.lan"), "--allowed-hosts 'http://bastion.lan': not a host name"),
                      (("--trusted-proxies", "proxy.lan"), "--trusted-proxies 'proxy.lan': not an IP address")):  # fmt: skip
        r = CliRunner().invoke(main, ["install-service", "--site", str(site), "--root",
                                      str(tmp_path / "root2"), *bad])  # fmt: skip
        assert r.exit_code == 2 and says in r.output, r.output
    assert not (tmp_path / "root2").exists()


def test_a_management_listener_on_the_boot_listeners_address_is_not_installed(tmp_path, site):
    r = CliRunner().invoke(main, ["install-service", "--site", str(site), "--root",
                                  str(tmp_path / "root"), "--listen", "0.0.0.0:8080",
                                  "--management-listen", "10.89.0.1:8080"])  # fmt: skip
    assert r.exit_code == 2 and "the management listener needs its own" in r.output
    assert not (tmp_path / "root").exists()


def test_the_listeners_must_be_on_the_sites_networks(tmp_path, site):
    with open(site / "site.yaml", "a") as f:
        f.write("networks:\n  pxe: {subnet: 10.77.0.0/24}\n  management: {subnet: 10.79.0.0/24, vlan: 10}\n")

    def install_with(*listeners):
        return CliRunner().invoke(main, ["install-service", "--site", str(site), "--root",
                                         str(tmp_path / "root"), *listeners])  # fmt: skip

    r = install_with("--listen", "10.77.0.3:8080", "--dry-run")
    assert r.exit_code == 0 and "note: site.yaml declares networks.management (10.79.0.0/24): serve " \
        "the management API there with --management-listen" in r.output
    r = install_with("--listen", "10.79.0.3:8080", "--management-listen", "10.77.0.3:9090")
    assert r.exit_code == 2
    assert "--listen 10.79.0.3:8080 is not on site.yaml networks.pxe (10.77.0.0/24)" in r.output
    assert "--management-listen 10.77.0.3:9090 is not on site.yaml networks.management" in r.output
    assert not (tmp_path / "root").exists()
    r = install_with("--listen", "10.77.0.3:8080", "--management-listen", "10.79.0.3:8080")
    assert r.exit_code == 0, r.output


def test_the_units_environment_puts_the_console_logs_where_the_service_may_write(tmp_path, site):
    """docs/tutorial.md installs from a checkout (/opt/edge-bastion/.venv): there `bastion serve`
    kept console logs in <checkout>/var, root's and read-only under ProtectSystem=strict, so the
    service lost every console. Under the unit's Environment= (%S and %C as systemd sets them
    for a system unit, here directories of the test's), the var dir is the CacheDirectory=."""
    import os
    import sys

    root = tmp_path / "root"
    assert install(root, site).exit_code == 0
    text = (root / "etc/systemd/system/edge-bastion.service").read_text()
    assert "CacheDirectory=edge-bastion" in text.splitlines()
    specifiers = {"%S": str(tmp_path / "var/lib"), "%C": str(tmp_path / "var/cache")}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BASTION_", "XDG_"))}
    for line in text.splitlines():
        if line.startswith("Environment="):
            name, _, value = line.removeprefix("Environment=").partition("=")
            env[name] = specifiers.get(value, value).replace("%C", specifiers["%C"])
    probe = ("from bastion import paths; print(paths.checkout() is not None); "
             "print(paths.var_dir())")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env,
                       timeout=60, check=True)  # fmt: skip
    from_checkout, var_dir = r.stdout.split("\n")[:2]
    assert from_checkout == "True"  # as the tutorial's install: the case that went wrong
    assert var_dir == str(tmp_path / "var/cache/edge-bastion")
