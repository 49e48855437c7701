"""The sim board: the device firmware on the MicroPython unix port, as a normal process.

`bastion sim --flash DIR` lays the firmware into DIR the way flashing a board would (modules
compiled to .mpy with mpy-cross, the boot stub main.py, the board definition) and runs it with
DIR as the board's flash: the working directory, where device.json and tftp/ live.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import click

import firmware
from firmware import frame

FIRMWARE_SRC = Path(firmware.__file__).resolve().parent
REPO = FIRMWARE_SRC.parent
BOARDS = REPO / "boards"
BOOT_STUB = "from firmware import main\nmain.run()\n"


class SimError(Exception):
    pass


def _tool(name: str) -> str:
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise SimError(f"{name} not found: run tools/setup (it installs it into .venv)")
    return found


def micropython_bin() -> str:
    return _tool("micropython")


# Without line-number tables the firmware's code holds about 2 KB less of the device's heap
# (measured on the unix port: 92 KB -> 90 KB for all modules); a traceback still names the
# module and the function (docs/device.md, "Heap").
MPY_CROSS_ARGS = ("-X", "no-source-lines")


def compile_firmware(dest: Path) -> list[Path]:
    """Compile firmware/*.py into dest/*.mpy where the source is newer; drop stale .mpy files."""
    dest.mkdir(parents=True, exist_ok=True)
    mpy_cross = _tool("mpy-cross")
    wanted = set()
    out = []
    for src in sorted(FIRMWARE_SRC.glob("*.py")):
        target = dest / (src.stem + ".mpy")
        wanted.add(target.name)
        out.append(target)
        if target.exists() and target.stat().st_mtime >= src.stat().st_mtime:
            continue
        tmp = target.with_suffix(".mpy.tmp")
        r = subprocess.run(
            [mpy_cross, *MPY_CROSS_ARGS, "-o", str(tmp), "-s", f"firmware/{src.name}", str(src)],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise SimError(f"mpy-cross failed on {src}: {r.stderr.strip()}")
        os.replace(tmp, target)
    for old in dest.glob("*.mpy"):
        if old.name not in wanted:
            old.unlink()
    return out


def install_firmware(flash: Path, board: str = "sim") -> None:
    """Lay out the firmware in a sim flash directory, as flashing a board would."""
    flash.mkdir(parents=True, exist_ok=True)
    compile_firmware(flash / "firmware")
    board_file = BOARDS / f"{board}.json"
    if not board_file.exists():
        raise SimError(f"unknown board {board!r}: no {board_file}")
    _write_atomic(flash / "board.json", board_file.read_bytes())
    _write_atomic(flash / "main.py", BOOT_STUB.encode())


def _write_atomic(path: Path, data: bytes) -> None:
    if path.exists() and path.read_bytes() == data:
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def parse_heap(text: str) -> int:
    t = text.strip().lower()
    mult = 1
    if t.endswith("k"):
        mult, t = 1024, t[:-1]
    elif t.endswith("m"):
        mult, t = 1024 * 1024, t[:-1]
    try:
        n = int(t) * mult
    except ValueError:
        raise SimError(f"--heap {text!r}: expected a size such as 128k") from None
    if n < 16 * 1024:
        raise SimError(f"--heap {text!r}: at least 16k is needed")
    return n


def firmware_args(
    listen: str | None = None, dhcp_port: int = 67, pxe_port: int = 4011, tftp_port: int = 69
) -> list[str]:
    """The sim board's overrides, as main.py reads them from argv."""
    args = ["--listen", listen] if listen else []
    args += ["--dhcp-port", str(dhcp_port), "--pxe-port", str(pxe_port)]
    return args + ["--tftp-port", str(tftp_port)]


def firmware_command(
    flash: Path,
    listen: str | None = None,
    dhcp_port: int = 67,
    pxe_port: int = 4011,
    tftp_port: int = 69,
    heap: str = "128k",
) -> list[str]:
    cmd = [micropython_bin(), "-X", f"heapsize={parse_heap(heap)}", "main.py"]
    return cmd + firmware_args(listen, dhcp_port, pxe_port, tftp_port)


def check_flash(flash: Path) -> None:
    if not (flash / "device.json").exists():
        raise SimError(
            f"{flash}/device.json is missing: the device config "
            "(see docs/device.md for its fields, or `bastion flash --sim` to render one from a site)"
        )


@click.command("sim")
@click.option(
    "--flash",
    "flash",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory standing in for the board's flash (device.json, tftp/, firmware).",
)
@click.option("--listen", metavar="IP", help="The device's LAN address (server id, next-server).")
@click.option("--dhcp-port", default=67, show_default=True, help="proxyDHCP port.")
@click.option("--pxe-port", default=4011, show_default=True, help="PXE boot-server port.")
@click.option("--tftp-port", default=69, show_default=True, help="TFTP port.")
@click.option("--heap", default="128k", show_default=True, help="MicroPython heap size.")
@click.option("--board", default="sim", show_default=True, help="Board definition to lay out.")
@click.option(
    "--serial-link",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Make PATH a symlink to the board's serial line (like /dev/ttyACM0).",
)
@click.option(
    "--no-install",
    is_flag=True,
    help="Run what is in the flash directory as it is (after `bastion flash --sim`).",
)
def sim_command(flash, listen, dhcp_port, pxe_port, tftp_port, heap, board, serial_link,
                no_install):
    """Run the device firmware on the MicroPython unix port (the sim board), in the foreground.

    The board's serial line is a pseudo-terminal (its path is printed first) that the
    controller, mpremote and terminal programs open like /dev/ttyACM0. The board's events are
    printed to stdout as JSON lines. Ctrl-C (SIGINT) or SIGTERM stops the board.
    """
    from bastion.simboard import Supervisor, json_lines_out

    try:
        if not no_install:
            install_firmware(flash, board)
        check_flash(flash)
        heap_bytes = parse_heap(heap)
        mp = micropython_bin()
    except SimError as e:
        raise click.ClickException(str(e)) from None
    board_def = json.loads((flash / "board.json").read_text())
    wdt_ms = board_def.get("watchdog", {}).get("timeout_ms")
    emit = json_lines_out()
    lines = EventLines(emit)
    sup = Supervisor(
        flash.resolve(),
        mp,
        heap_bytes,
        firmware_args(listen, dhcp_port, pxe_port, tftp_port),
        serial_link=serial_link,
        wdt_timeout_ms=wdt_ms,
        on_output=lines.feed,
        on_event=emit,
    )
    emit({"ev": "sim", "serial": sup.path, "flash": str(flash)})
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sup.stop())
    sup.run()


class EventLines:
    """Picks the board's event lines out of its serial output and hands them on as dicts."""

    limit = 4096

    def __init__(self, emit):
        self.emit = emit
        self.buf = b""

    def feed(self, data: bytes) -> None:
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        if len(self.buf) > self.limit:
            self.buf = b""
        for line in lines:
            ev = decode_event_line(line)
            if ev is not None:
                self.emit(ev)


def decode_event_line(line: bytes) -> dict | None:
    """The event in one line of the board's serial output: a frame (`#EB< crc {...}`, what the
    firmware sends), or a bare JSON object; None for anything else (REPL text, replies)."""
    line = line.strip()
    i = line.find(frame.TO_HOST)
    if i >= 0:
        try:
            ev = frame.decode(line[i:])
        except frame.Malformed:
            return None
    elif line.startswith(b"{"):
        try:
            ev = json.loads(line)
        except ValueError:
            return None
    else:
        return None
    return ev if isinstance(ev, dict) and "ev" in ev else None
