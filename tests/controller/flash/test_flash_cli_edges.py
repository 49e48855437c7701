"""`bastion sim` and `bastion flash` with values an audit found they mishandled: one-line
errors, nothing destroyed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bastion.flash.cli import _port_path

BIN = Path(sys.executable).parent


def bastion(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "bastion"), *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd)  # fmt: skip


def test_sim_never_replaces_what_is_at_its_serial_link(tmp_path):
    # the file was replaced by a link to the PTY and the link removed at the end: gone
    precious = tmp_path / "precious.txt"
    precious.write_text("data\n")
    r = bastion("sim", "--flash", str(tmp_path / "flash"), "--listen", "127.0.0.1",
                "--serial-link", str(precious))  # fmt: skip
    assert r.returncode == 1 and "something is there already" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and precious.read_text() == "data\n"
    # a link a dead sim left (to a /dev/pts terminal) is taken over, as before
    stale = tmp_path / "stale"
    stale.symlink_to("/dev/pts/999")
    from bastion.flash.sim import check_serial_link

    check_serial_link(stale)


def test_sim_refuses_heaps_and_ports_it_cannot_run_with(tmp_path):
    r = bastion("sim", "--flash", str(tmp_path / "f"), "--heap", "100000m")
    assert r.returncode == 1 and "at most 256m" in r.stderr and "Traceback" not in r.stderr
    for option in ("--dhcp-port", "--pxe-port", "--tftp-port"):
        for value in ("70000", "-1", "0"):
            r = bastion("sim", "--flash", str(tmp_path / "f"), option, value)
            assert r.returncode == 2 and "is not in the range 1<=x<=65535" in r.stderr, (option, value, r.stderr)


def test_flash_says_what_is_wrong_with_an_mpy_cross_command(tmp_path):
    from test_flash import make_site

    site = make_site(tmp_path / "site")
    for spec, says in (("'x", "--mpy-cross \"'x\": No closing quotation"),
                       ("/bin/false", "mpy-cross")):  # fmt: skip
        r = bastion("flash", "--sim", str(tmp_path / "f"), "--site", str(site), "--mpy-cross", spec, "--dry-run")
        assert r.returncode == 1 and "Traceback" not in r.stderr and says in r.stderr, (spec, r.stderr)


def test_a_port_without_a_slash_is_a_path_the_firmware_is_asked_on(tmp_path, monkeypatch):
    # "b1.tty" skipped asking the running firmware for its relays: a relay mid-cycle came back
    # on at the restart
    monkeypatch.chdir(tmp_path)
    (tmp_path / "b1.tty").touch()
    assert _port_path("b1.tty") == str(tmp_path / "b1.tty")
    assert _port_path("a0") == "/dev/ttyACM0" and _port_path("u1") == "/dev/ttyUSB1"
    assert _port_path("rfc2217://10.0.0.5:4000") == "rfc2217://10.0.0.5:4000"
    assert os.sep in _port_path("nope.tty")  # a missing one is then "no such port"


def test_a_mirror_that_is_not_a_url_is_one_line(tmp_path):
    # 'http://[::1' and an IDNA-less host name were httpx tracebacks
    import shutil

    from bastion_testkit import EXAMPLES

    site = tmp_path / "site"
    shutil.copytree(EXAMPLES / "site", site)
    for mirror in ("http://[::1", "http://\N{COLLISION SYMBOL}/x"):
        r = bastion("assets", "fetch", "k3s", "--site", str(site), "--version", "v1.31.4+k3s1",
                    "--arch", "amd64", "--mirror", mirror)  # fmt: skip
        assert r.returncode != 0 and "not a URL" in r.stderr and "Traceback" not in r.stderr, r.stderr
