"""`bastion flash --board w5500-evb-pico` on the sim board dressed as that board (as in
test_flash_board.py), against what a review found: a board with MicroPython alone whose relays
nothing reported, a relay wiring that changed under the same on/off states, Ctrl-C or a timeout
while waiting for the maintenance boot, another project's main.py on the wrong port, a port
with no MicroPython on it, and a flash that changes nothing but reset the board anyway."""

from __future__ import annotations

import json
import os
import pty
import threading
import tty
from pathlib import Path

import pytest
from bastion.device.link import DeviceLink, OutcomeUnknown
from bastion.flash import cli
from bastion.flash.sim import BOOT_STUB
from click.testing import CliRunner
from dresskit import (
    BOARD,
    bastion,
    channel_on,
    dressed,
    micropython_alone,
    normal_boot_after,
    resets,
)
from simkit import RelayWatch, SimProcess
from test_flash import SITE_YAML, make_site, small_tftp

SITE_ON = SITE_YAML.replace("      default: off", "      default: on")


@pytest.fixture(scope="module")
def restarted_board(tmp_path_factory):
    """(board, its flash directory): one dressed board running the firmware, shared by the
    tests whose flash fails and restarts the firmware it had, leaving the board as they found
    it (the same files, the same relay on). A board of their own each would cost a start."""
    root = tmp_path_factory.mktemp("restarted-board")
    with dressed(root / "flash", root / "ttyACM0") as board:
        yield board, root / "flash"


def flash_args(board: SimProcess, site: Path, tftp: Path, *more: str) -> list[str]:
    """`bastion flash`'s arguments for the board's line."""
    return ["--port", str(board.link), "--board", BOARD, "--site", str(site),
            "--tftp-dir", str(tftp), *more]  # fmt: skip


def test_a_board_with_micropython_alone_is_judged_by_its_relay_wiring(tmp_path):
    # nothing reported the relays: "now" was [] and every comparison passed, so the first
    # flash drove every NC-wired channel to the site's default (off) and cut its node's power,
    # saying "relays: as they were"
    flash = tmp_path / "pico"
    tftp = small_tftp(tmp_path / "tftp")
    board = micropython_alone(flash, tmp_path / "ttyACM0")
    try:
        r = bastion("flash", *flash_args(board, make_site(tmp_path / "site"), tftp))
        assert r.returncode == 1, r.stdout + r.stderr
        assert "relays undriven: no firmware drives them, so board w5500-evb-pico's wiring " \
               "decides: 0 node-a on, 1 ch1 on" in r.stdout, r.stdout
        assert "relay channel 0 (node-a) is on now and the new configuration would restore it " \
               "off" in r.stderr, r.stderr
        assert "no firmware drives the relays now" in r.stderr
        assert "no firmware of ours on its flash to restart" in r.stdout
        assert sorted(p.name for p in flash.iterdir()) == ["board.json"]  # nothing written

        # the site's safe default (docs/boards.md, first bring-up, step 5): flashed, and the
        # firmware's own word after the restart is that every channel is on, as it was
        r = bastion("flash", *flash_args(board, make_site(tmp_path / "site-on", SITE_ON), tftp))
        assert r.returncode == 0, r.stdout + r.stderr
        assert "relays: as they were (on: node-a, ch1, ch2, node-b, ch4, ch5, ch6, ch7)" in r.stdout
        assert (flash / "relays.state").read_text().strip() == "11111111"
    finally:
        board.stop()


def test_switch_relays_flashes_a_blank_nc_board_whose_site_says_off_and_checks_the_switch(tmp_path):
    # a board with nothing on its relays yet (docs/boards.md, first bring-up): the user says the
    # restart may switch them; each switch is named before the copy, and the firmware's word
    # after the restart is checked against what the files said, not against "now"
    flash = tmp_path / "pico"
    tftp = small_tftp(tmp_path / "tftp")
    board = micropython_alone(flash, tmp_path / "ttyACM0")
    try:
        r = bastion("flash", *flash_args(board, make_site(tmp_path / "site"), tftp, "--switch-relays"))
        assert r.returncode == 0, r.stdout + r.stderr
        switched = [line for line in r.stdout.splitlines() if "as asked (--switch-relays)" in line]
        assert len(switched) == 8, r.stdout
        assert "relay channel 0 (node-a) is on now and the new configuration would restore it off" \
            in switched[0], switched
        assert r.stdout.index("as asked (--switch-relays)") < r.stdout.index("installing:"), r.stdout
        assert "relays: as planned (on: none)" in r.stdout, r.stdout
        assert "relays: as they were" not in r.stdout
    finally:
        board.stop()


def test_a_device_whose_relay_wiring_differs_is_refused_unless_the_rewiring_is_said(tmp_path):
    # the relay check compared on/off only: a board file with the other contact flipped every
    # relay while the flash said "as they were"
    flash = tmp_path / "flash"
    site = make_site(tmp_path / "site")
    tftp = small_tftp(tmp_path / "tftp")
    with dressed(flash, tmp_path / "ttyACM0") as board:
        on_device = json.loads((flash / "board.json").read_text())
        on_device["relays"]["contact"] = "no"  # flashed from a board file for an NO module
        on_device["relays"]["channels"][2]["pin"] = 20
        (flash / "board.json").write_text(json.dumps(on_device))
        before = (flash / "device.json").read_bytes()
        r = bastion("flash", *flash_args(board, site, tftp))
        assert r.returncode == 1, r.stdout + r.stderr
        assert "relay channel 0 (node-a): contact no -> nc (its pin level for on and off is " \
               "inverted)" in r.stderr, r.stderr
        assert "relay channel 2 (ch2): pin 20 -> 8, contact no -> nc" in r.stderr
        assert "refusing to flash: board w5500-evb-pico's relay wiring differs from the " \
               "board.json on the device (w5500-evb-pico)" in r.stderr
        assert "--relay-wiring-changed" in r.stderr
        assert (flash / "device.json").read_bytes() == before
        assert "restarting the firmware after the failure" in r.stdout

        r = bastion("flash", *flash_args(board, site, tftp, "--relay-wiring-changed"))
        assert r.returncode == 0, r.stdout + r.stderr
        assert "flashed as asked (--relay-wiring-changed)" in r.stderr
        assert json.loads((flash / "board.json").read_text())["relays"]["contact"] == "nc"


def _maintenance_interrupted(port: str, wait_s: float = 60.0) -> dict:
    """enter_maintenance as it goes when the user presses Ctrl-C while flash waits for the
    maintenance boot: the request is out, the board resets into maintenance, and flash gets
    KeyboardInterrupt."""
    with DeviceLink(port, timeout_s=10) as link:
        assert link.wait_ready(10), link.last_error
        try:
            link.request("maintenance")
        except OutcomeUnknown:
            pass
    raise KeyboardInterrupt


@pytest.mark.parametrize("how", ["ctrl-c", "timeout"])
def test_a_failure_while_waiting_for_the_maintenance_boot_restarts_the_firmware(
    tmp_path, monkeypatch, restarted_board, how
):
    # enter_maintenance ran before the try/finally that restarts the firmware: the board was
    # left in maintenance mode (no PXE, no watchdog) for good
    real = cli.enter_maintenance
    if how == "ctrl-c":
        monkeypatch.setattr(cli, "enter_maintenance", _maintenance_interrupted)
    else:  # DeviceTimeout: the maintenance boot did not answer in time
        monkeypatch.setattr(cli, "enter_maintenance", lambda port: real(port, wait_s=0.01))
    board, flash = restarted_board
    mark = len(board.seen)  # this test's events: the board may have run others' before
    state = channel_on(board, flash, 3)
    watch = RelayWatch(flash)
    try:
        r = CliRunner().invoke(cli.flash, flash_args(
            board, make_site(tmp_path / "site"), small_tftp(tmp_path / "tftp")))  # fmt: skip
        assert r.exit_code == 1, r.output
        maint = next(i for i, e in enumerate(board.seen[mark:], mark)
                     if e.get("ev") == "boot" and e.get("maintenance"))  # fmt: skip
        back = normal_boot_after(board, maint)
    finally:
        seen = watch.stop()
    assert "restarting the firmware after the failure" in r.output, r.output
    assert "dhcp" in back["services"], back
    with DeviceLink(str(board.link), timeout_s=10) as link:
        assert link.wait_ready(15), link.last_error
        assert link.info["maintenance"] is False
    assert "watchdog" not in resets(board, since=mark)
    assert seen == [state], seen


def test_another_projects_main_py_is_not_overwritten_unless_asked(tmp_path):
    # a MicroPython board without firmware/ on the wrong /dev/ttyACMn: its main.py was
    # replaced without a word
    flash = tmp_path / "other"
    theirs = b"import time\nprint('weather station')\n"
    board = micropython_alone(flash, tmp_path / "ttyACM1",
                              files={"main.py": theirs, "boot.py": b"# their boot\n"})  # fmt: skip
    tftp = small_tftp(tmp_path / "tftp")
    site = make_site(tmp_path / "site", SITE_ON)
    try:
        r = bastion("flash", *flash_args(board, site, tftp))
        assert r.returncode == 1, r.stdout + r.stderr
        assert f"has a main.py ({len(theirs)} B) that is not Edge Bastion's boot stub, and no " \
               "firmware/ beside it: is this another project's board" in r.stderr, r.stderr
        assert "it has a boot.py at its root too (13 B)" in r.stderr
        assert "flash again with --overwrite-main-py" in r.stderr
        assert (flash / "main.py").read_bytes() == theirs
        assert not (flash / "firmware").exists() and not (flash / "device.json").exists()

        r = bastion("flash", *flash_args(board, site, tftp, "--overwrite-main-py"))
        assert r.returncode == 0, r.stdout + r.stderr
        assert "replacing the device's main.py" in r.stderr
        assert (flash / "main.py").read_text() == BOOT_STUB
        assert (flash / "boot.py").read_bytes() == b"# their boot\n"  # left as it is
    finally:
        board.stop()


def test_a_port_with_no_micropython_on_it_gets_no_restart(tmp_path):
    # `stopped` was set before the probe answered: the restart's Ctrl-C/Ctrl-B went to
    # whatever was on the line, and flash said "restarting the firmware after the failure"
    # and "reset the board by hand"
    master, slave = pty.openpty()
    tty.setraw(slave)
    heard = bytearray()

    def listen():  # a device that takes every byte and answers none
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            if not data:
                return
            heard.extend(data)

    threading.Thread(target=listen, daemon=True).start()
    link = tmp_path / "ttyACM2"
    link.symlink_to(os.ttyname(slave))
    try:
        r = bastion("flash", "--port", str(link), "--board", BOARD, "--site",
                    str(make_site(tmp_path / "site")), "--tftp-dir",
                    str(small_tftp(tmp_path / "tftp")))  # fmt: skip
    finally:
        os.close(slave)
        os.close(master)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "could not enter raw repl" in r.stderr, r.stderr
    assert "restarting the firmware after the failure" not in r.stdout, r.stdout
    assert "reset the board by hand" not in r.stderr
    assert heard  # the line was tried (the serial protocol's hello, mpremote's Ctrl-C)


def test_a_flash_that_changes_nothing_skips_the_maintenance_reset(tmp_path, monkeypatch):
    # entering maintenance is a hard reset (machine.reset()), which on an RP2040 releases the
    # relay pins for a moment: a flash of what the device has already did it all the same
    waits = []
    real = cli.restart_firmware

    def restart(port, timeout=30.0, wait_boot=True):
        waits.append(timeout)
        return real(port, timeout) if wait_boot else real(port, timeout, wait_boot)

    monkeypatch.setattr(cli, "restart_firmware", restart)
    flash = tmp_path / "flash"
    # the board's boot may wait 120 s for a DHCP lease: the restart waits that long and more
    net = "  net: {dhcp: true, dhcp_wait_ms: 120000}\n"
    site = make_site(tmp_path / "site", SITE_YAML.replace("  ip: 10.77.0.2\n",
                                                          f"  ip: 10.77.0.2\n{net}"))
    with dressed(flash, tmp_path / "ttyACM0") as board:
        args = flash_args(board, site, small_tftp(tmp_path / "tftp"))
        first = CliRunner().invoke(cli.flash, args)
        assert first.exit_code == 0, first.output
        assert "restarting it into maintenance mode" in first.output
        state = channel_on(board, flash, 3)
        mark = len(board.seen)
        waits.clear()
        watch = RelayWatch(flash)
        try:
            again = CliRunner().invoke(cli.flash, args)
        finally:
            seen = watch.stop()
        assert again.exit_code == 0, again.output
        assert "  the device has every file already: no maintenance boot" in again.output
        assert "restarting it into maintenance mode" not in again.output
        assert "relays: as they were (on: node-b)" in again.output
        reasons = [e["reason"] for e in board.seen[mark:] if e.get("ev") == "reset"]
        assert reasons and set(reasons) <= {"soft-reboot", "soft-reboot-raw"}, reasons
        assert not [e for e in board.seen[mark:] if e.get("ev") == "boot" and e.get("maintenance")]
        assert waits == [150.0], waits
        assert "dhcp" in normal_boot_after(board, mark)["services"]
    assert seen == [state], seen
