"""Shared fixtures: the sim board (the real firmware on the MicroPython unix port)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "firmware" / "mpy"))  # mpytest helpers
sys.path.insert(0, str(REPO / "tests"))  # simkit and other shared test helpers

from bastion.flash import sim as sim_mod  # noqa: E402
from simkit import SUMMARY, SimBoard, free_udp_port  # noqa: E402


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """What tests asked to show whatever pytest captures (simkit.SUMMARY)."""
    for line in config.stash.get(SUMMARY, []):
        terminalreporter.write_line(line)


@pytest.fixture(autouse=True, scope="session")
def _private_state_home(tmp_path_factory):
    """Tests never write the user's state (event history, secret store) under ~/.local/state:
    XDG_STATE_HOME, which both default to, points into the session's temporary directory."""
    old = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("state-home"))
    yield
    if old is None:
        os.environ.pop("XDG_STATE_HOME", None)
    else:
        os.environ["XDG_STATE_HOME"] = old


@pytest.fixture
def sim_board(tmp_path):
    """Factory: start_sim(config, files={name: bytes}, heap='128k', listen='127.0.0.1').

    Lays out a flash directory the way `bastion sim` does, on free loopback ports, and returns a
    SimBoard with .ports = {"dhcp", "pxe", "tftp"}. Every board started is stopped at teardown.
    """
    boards: list[SimBoard] = []

    def start(
        config: dict,
        files: dict[str, bytes] | None = None,
        heap: str = "128k",
        listen: str = "127.0.0.1",
        wait_boot: bool = True,
    ) -> SimBoard:
        flash = tmp_path / f"flash{len(boards)}"
        sim_mod.install_firmware(flash)
        (flash / "device.json").write_text(json.dumps({"server_ip": listen, **config}))
        tftp_root = flash / "tftp"
        tftp_root.mkdir(exist_ok=True)
        for name, data in (files or {}).items():
            p = tftp_root / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        ports = {"dhcp": free_udp_port(), "pxe": free_udp_port(), "tftp": free_udp_port(listen)}
        cmd = sim_mod.firmware_command(
            flash, listen, ports["dhcp"], ports["pxe"], ports["tftp"], heap
        )
        board = SimBoard(flash, cmd)
        board.ports = ports
        boards.append(board)
        if wait_boot:
            board.wait_event(lambda e: e.get("ev") == "boot")
        return board

    yield start
    for b in boards:
        b.stop()
