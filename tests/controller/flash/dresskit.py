"""The sim board dressed as a real board (`bastion sim --dress-as w5500-evb-pico`,
bastion.flash.simboard.Dress) for the flash tests that use one: started running the firmware
or with MicroPython alone on its flash, and what those tests read off it. What a dressed board
is and is not: the simboard module docstring."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bastion.device.link import DeviceLink
from simkit import SimProcess, wait_for

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[3]
BOARD = "w5500-evb-pico"


def bastion(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "bastion"), *args], capture_output=True, text=True,
                          timeout=timeout, check=False)  # fmt: skip


def dressed(flash: Path, link: Path, *dress: str, blank: bool = False) -> SimProcess:
    return SimProcess(flash, link, None, ("--dress-as", BOARD, *dress), blank=blank)


def micropython_alone(flash: Path, link: Path, *dress: str, board_json: str = BOARD,
                      files: dict[str, bytes] | None = None) -> SimProcess:  # fmt: skip
    """A sim board dressed as BOARD (`dress`: more --dress-* options) whose flash holds no
    firmware: MicroPython alone, so no hello answers. The sim needs a board.json in its flash
    directory to start: boards/<board_json>.json, as an earlier flash left it; `files` go
    beside it (another project's main.py, ...)."""
    flash.mkdir(parents=True)
    (flash / "board.json").write_bytes((REPO / "boards" / f"{board_json}.json").read_bytes())
    for name, data in (files or {}).items():
        (flash / name).write_bytes(data)
    board = SimProcess(flash, link, None, ("--dress-as", BOARD, "--no-install", *dress),
                       blank=True)  # fmt: skip
    board.wait(lambda e: e.get("ev") == "sim")
    return board


def resets(board: SimProcess, since: int = 0) -> list[str]:
    """The reasons of the board's resets, from its event board.seen[since] on."""
    return [e["reason"] for e in board.seen[since:] if e.get("ev") == "reset"]


def channel_on(board: SimProcess, flash: Path, ch: int) -> str:
    with DeviceLink(str(board.link), timeout_s=10) as link:
        assert link.wait_ready(15), link.last_error
        assert link.info["board"] == BOARD
        link.request("power", channel=ch, state="on")
        state = "".join("1" if i == ch else "0" for i in range(8))
        wait_for(lambda: (flash / "relays.state").read_text().strip() == state,
                 what=f"relay {ch} on")
    return state


def normal_boot_after(board: SimProcess, i: int) -> dict:
    """The first boot event with services after board.seen[i]."""
    return wait_for(lambda: next((e for e in board.seen[i:]
                                  if e.get("ev") == "boot" and "services" in e), None),
                    timeout=30, what="a normal boot")  # fmt: skip
