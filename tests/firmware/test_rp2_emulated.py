"""The W5500-EVB-Pico board file on an emulated RP2040: MicroPython's official rp2 image for the
board (built from source, tests/firmware/rp2/data/SOURCES.md) in rp2040js, the real mpremote and
`bastion flash` on its USB serial line, and what the firmware does to the chip's pins and
watchdog. A W5500 is modelled at its register interface (tests/firmware/rp2/emulator.mjs): the
driver brings the interface up, but no frame is ever received, so the network services are not
tested here (the sim board's tests do that). Not a real board: docs/boards.md says what has not
run on one."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from rp2kit import Rp2Board, missing

pytestmark = [pytest.mark.rp2, pytest.mark.skipif(missing() is not None, reason=missing() or "")]
BIN = Path(sys.executable).parent


def mpremote(link: Path, *args: str, timeout: float = 120) -> str:
    r = subprocess.run([str(BIN / "mpremote"), "connect", str(link), *args], check=False,
                       capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_the_official_image_boots_and_mpremote_drives_its_repl(tmp_path):
    with Rp2Board(tmp_path / "ttyACM0") as board:
        board.wait(lambda e: e.get("ev") == "usb", what="the USB serial line")
        out = mpremote(board.link, "exec", "import sys, os; print(sys.implementation._machine); "
                       "print(os.uname().release); print(sys.implementation._mpy)")  # fmt: skip
    machine, release, mpy = out.split("\n")[:3]
    assert machine == "W5500-EVB-Pico with RP2040", out
    # what boards/w5500-evb-pico.json says bastion flash will find (its .mpy format)
    assert int(mpy) == 4870, out
    assert release.startswith("1."), out


def test_files_put_by_mpremote_are_in_flash_after_a_watchdog_reset(tmp_path):
    payload = tmp_path / "kept.txt"
    payload.write_text("written through littlefs to the emulated flash\n" * 40)
    with Rp2Board(tmp_path / "ttyACM0") as board:
        board.wait(lambda e: e.get("ev") == "usb", what="the USB serial line")
        mpremote(board.link, "fs", "cp", str(payload), ":kept.txt")
        # machine.reset() triggers the RP2040's watchdog: the chip starts over from its bootrom
        mpremote(board.link, "exec", "--no-follow", "import machine; machine.reset()")
        board.wait(lambda e: e.get("ev") == "boot" and e.get("reason") == "watchdog", what="a reset")
        board.wait(lambda e: e.get("ev") == "usb" and len(board.boots()) == 2, what="USB after the reset")
        assert mpremote(board.link, "fs", "cat", ":kept.txt") == payload.read_text()


REPO = Path(__file__).resolve().parents[2]


def small_site(tmp_path: Path) -> tuple[Path, Path]:
    """The example site, kept to what the emulated line carries in a minute: no arm64 machine
    (no arm64 chainloader to copy), one boot file (BIOS, 74 KB), a static address."""
    site = tmp_path / "site"
    shutil.copytree(REPO / "examples" / "site", site)
    for sub in ("flatcar/amd64", "flatcar/arm64"):
        d = site / "assets" / sub
        d.mkdir(parents=True)
        for name in ("flatcar_production_pxe.vmlinuz", "flatcar_production_pxe_image.cpio.gz"):
            (d / name).write_bytes(b"not a kernel")
    y = site / "site.yaml"
    text = y.read_text()
    for line in ("    7: ipxe.efi          # EFI x86-64 (BC)\n", "    9: ipxe.efi          # EFI x86-64\n"):
        assert line in text
        text = text.replace(line, "")
    y.write_text(text.replace("  boot_files:", "  net: {ip: 10.77.0.2/24, gateway: 10.77.0.1}\n  boot_files:", 1))
    m = site / "machines.yaml"
    text = m.read_text()
    start = text.index("  - name: pi1\n")
    end = text.find("  - name:", start + 1)
    m.write_text(text[:start] + (text[end:] if end > 0 else ""))
    tftp = tmp_path / "tftp"
    tftp.mkdir()
    shutil.copy("/usr/lib/ipxe/undionly.kpxe", tftp)
    return site, tftp


def bastion(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "bastion"), *args], check=False, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def test_bastion_flash_puts_the_firmware_on_the_board_and_it_runs_the_relays_and_the_watchdog(tmp_path):
    site, tftp = small_site(tmp_path)
    relays = range(6, 14)  # boards/w5500-evb-pico.json: GP6..GP13, active low, NC contacts
    with Rp2Board(tmp_path / "ttyACM0", w5500=True) as board:
        board.wait(lambda e: e.get("ev") == "usb", what="the USB serial line")
        r = bastion("flash", "--port", str(board.link), "--site", str(site), "--board", "w5500-evb-pico",
                    "--tftp-dir", str(tftp), "--controller-url", "http://10.77.0.1:8080", timeout=600)  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        assert "boot: firmware" in r.stdout and "on board w5500-evb-pico, serving dhcp, tftp" in r.stdout, r.stdout
        # The site's default is off: each relay's coil on (IN low), its NC contact open.
        assert [board.level(pin) for pin in relays] == ["low"] * 8
        # The W5500's driver brought the interface up with the static address: lwIP's first
        # frames (IGMP, MLD, mDNS) go out through the chip's socket 0 in MACRAW mode.
        board.wait(lambda e: e.get("ev") == "eth", what="a frame sent through the W5500")
        status = json.loads(bastion("status", "--port", str(board.link), "--json").stdout)
        assert status["info"]["board"] == "w5500-evb-pico", status
        assert status["info"]["net"] == {"ip": "10.77.0.2", "how": "static", "link": "up"}, status
        assert [p["output"] for p in status["status"]["power"]] == ["off"] * 8, status
        r = bastion("power", "on", "0", "--port", str(board.link))
        assert r.returncode == 0, r.stdout + r.stderr
        board.wait(lambda e: e.get("ev") == "gpio" and e.get("pin") == 6 and e["value"] == "high",
                   what="relay 0's pin high (coil off, node on)")  # fmt: skip
        assert [board.level(pin) for pin in relays[1:]] == ["low"] * 7
        # The firmware enabled the RP2040's hardware watchdog (8 s, boards/w5500-evb-pico.json)
        # and feeds it: the chip's clock runs on three timeouts past that without a reset.
        enabled = board.wait(lambda e: e.get("ev") == "watchdog-enabled", what="the watchdog enabled")
        board.wait(lambda e: e.get("ev") == "clock" and e["ms"] > enabled["ms"] + 3 * 8388,
                   timeout=300, what="the chip's clock 25 s past the watchdog's start")  # fmt: skip
        assert [e["reason"] for e in board.boots()] == ["power-on"]
        assert not [e for e in board.events if e.get("ev") == "watchdog"]
        # What MicroPython's own rp2 port leaves the firmware (the heap a real board would show)
        heap = status["status"]["heap"]
        assert heap["code"] > 0 and heap["free"] > 0, heap
        print(f"rp2 (emulated) heap after boot: code {heap['code']} B, free {heap['free']} B")
