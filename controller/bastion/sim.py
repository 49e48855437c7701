"""The sim board: the device firmware on the MicroPython unix port, as a normal process.

`bastion sim --flash DIR` lays the firmware into DIR the way flashing a board would (modules
compiled to .mpy with mpy-cross, the boot stub main.py, the board definition) and runs it with
DIR as the board's flash: the working directory, where device.json and tftp/ live.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import click

import firmware

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
            [mpy_cross, "-o", str(tmp), "-s", f"firmware/{src.name}", str(src)],
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


def firmware_command(
    flash: Path,
    listen: str | None = None,
    dhcp_port: int = 67,
    pxe_port: int = 4011,
    tftp_port: int = 69,
    heap: str = "128k",
) -> list[str]:
    cmd = [micropython_bin(), "-X", f"heapsize={parse_heap(heap)}", "main.py"]
    if listen:
        cmd += ["--listen", listen]
    cmd += ["--dhcp-port", str(dhcp_port), "--pxe-port", str(pxe_port)]
    cmd += ["--tftp-port", str(tftp_port)]
    return cmd


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
def sim_command(flash, listen, dhcp_port, pxe_port, tftp_port, heap, board):
    """Run the device firmware on the MicroPython unix port (the sim board), in the foreground.

    Events are printed to stdout as JSON lines. Ctrl-C stops it.
    """
    try:
        install_firmware(flash, board)
        check_flash(flash)
        cmd = firmware_command(flash, listen, dhcp_port, pxe_port, tftp_port, heap)
    except SimError as e:
        raise click.ClickException(str(e)) from None
    proc = subprocess.Popen(cmd, cwd=flash)
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
    sys.exit(rc)
