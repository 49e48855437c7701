"""The sim board's supervisor: the device's serial line as a pseudo-terminal, and the board's
reset behaviour, around the MicroPython unix port.

A real board keeps its USB serial port while the firmware restarts; the unix port is a process
that exits. So the supervisor holds two PTYs: the *line* that clients open (the controller,
`mpremote`, a human with a terminal program), which stays open for the board's whole life, and
a fresh *inner* PTY for each firmware process, which is its stdin/stdout and controlling
terminal (so Ctrl-C raises KeyboardInterrupt in the firmware, as on a board). Bytes are relayed
both ways. When the firmware process ends the supervisor restarts it the way a board would:

- Ctrl-D at the normal REPL (the unix port exits): print the soft-reboot line and run main.py.
- Ctrl-D at the raw REPL (what plain `mpremote` commands send): print the soft-reboot line and
  come back at the raw REPL without running main.py, as a board does. Which REPL the firmware
  sits at is read from what it prints (the raw REPL's banner line, the friendly prompt), not
  from the bytes clients send: a Ctrl-A in line noise while the firmware runs is just a byte.
- The process died (kill -9, crash): start it again, like a reset.
- The emulated hardware watchdog: the firmware feeds it by writing to a pipe (fd 3); once fed,
  silence longer than the timeout kills and restarts the firmware. An "R" down the same pipe
  is the firmware's machine.reset(): the supervisor restarts it at once.

Dressed as a real board (`Dress`, `bastion sim --dress-as w5500-evb-pico`), the sim board
answers like that board where flashing looks: a stand-in `sys` (sys.implementation and
sys.platform of the board's MicroPython) in every REPL the supervisor starts for a client (the
raw REPL after a soft reboot, where mpremote runs its programs), the board's name and relay
channels, and its watchdog's timeout and behaviour: like an RP2040's, the watchdog survives a
soft reboot and only a reset (machine.reset(), its own expiry, a crash) stops it, which is
why flashing such a board goes through maintenance mode. Its hardware stays the sim's: relay
outputs in relays.state, the host's network, the supervisor's watchdog. The board.json flashed
onto it is kept and read back like any file, but the firmware runs with the dress's own board
definition (`--board`), since the unix port has no GPIO pins or Ethernet chip.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pty
import select
import signal
import subprocess
import sys
import termios
import time
import tty
from pathlib import Path

from bastion import atomic
from bastion.flash.mpy import MPY_ARCHES, mpy_for_release

SOFT_REBOOT = b"MPY: soft reboot\r\n"
RAW_PROMPT = b"raw REPL; CTRL-B to exit\r\n"
SOFT_REBOOTS = ("soft-reboot", "soft-reboot-raw")
FRIENDLY_PROMPT = b">>> "
WDT_FD = 3


def firmware_words(pairs: dict[str, object]) -> list[str]:
    """`pairs` as argv words for the firmware's main.py: `name value name value`, the names
    bare (the unix port interns every word of argv, and the firmware's table of interned names
    has little room, firmware/main.py, "Interned names": a bare name is one the firmware has
    interned already, where `--name` was one more). ValueError for a value it cannot carry."""
    words = []
    for name, value in pairs.items():
        if not str(value) or len(str(value).split()) != 1:
            raise ValueError(f"{name} {str(value)!r}: the sim board cannot be given an empty "
                             "value or one with white space")  # fmt: skip
        words += [name, str(value)]
    return words


def _firmware_tty_mode(fd: int) -> None:
    """No echo, no line editing, no output rewriting, but signals on: Ctrl-C -> SIGINT."""
    attrs = termios.tcgetattr(fd)
    attrs[0] &= ~(termios.ICRNL | termios.IXON | termios.INLCR | termios.IGNCR)
    attrs[1] &= ~termios.OPOST
    attrs[3] &= ~(termios.ECHO | termios.ICANON | termios.IEXTEN | termios.ECHONL)
    attrs[3] |= termios.ISIG
    termios.tcsetattr(fd, termios.TCSANOW, attrs)


# The stand-in `sys` of a dressed sim board's REPL, run with `micropython -i -c`: sys.modules
# takes it before the built-in module, so `import sys` in what a client runs gets it. Its
# implementation and platform are the dressed board's; everything else is the real sys. Its
# _machine is the stand-in's too: the board file's micropython.machine (standin_machine), not
# read from any chip, so a flash of the dressed board is checked as one of that board's builds.
_SYS_STANDIN = """\
import sys
class _DressImpl:
    name = 'micropython'
    version = {version!r}
    _machine = {machine!r}
    _mpy = {mpy!r}
    _build = {build!r}
    def __repr__(self):
        return '(name=%r, version=%r, _machine=%r, _mpy=%r, _build=%r)' % (
            self.name, self.version, self._machine, self._mpy, self._build)
class _DressSys:
    implementation = _DressImpl()
    platform = {platform!r}
    def __getattr__(self, name):
        return getattr(_real_sys, name)
_real_sys = sys
sys.modules['sys'] = _DressSys()
del sys, _DressImpl, _DressSys
"""


class DressError(ValueError):
    pass


def standin_machine(board: dict) -> str:
    """The stand-in's sys.implementation._machine: what the board file's micropython.machine
    says the board's own MicroPython ends it with (a whole "<board> with <chip>" first), so
    that flashing takes the dressed sim board for that board's build and warns of none; the
    stand-in's own words for a board file that lists none. Where the file lists the chip
    alone, a real board's _machine says the board's name before it too."""
    entries = [e for e in (board.get("micropython") or {}).get("machine") or []
               if isinstance(e, str) and e.strip()]  # fmt: skip
    if not entries:
        return f"sim board dressed as {board.get('name')} (a stand-in)"
    whole = [e for e in entries if " with " in e]
    return (whole or entries)[0]


class Dress:
    """The sim board dressed as a real board (the module docstring): a stand-in for what
    flashing reads of that board, built from its definition (boards/NAME.json).

    version: the MicroPython release its sys.implementation says (default: the newest the
    board file lists); mpy: its sys.implementation._mpy (default: the board file's for the
    releases it lists, else mpy_for_release); machine: its sys.implementation._machine
    (default: standin_machine)."""

    def __init__(self, board: dict, version: str | None = None, mpy: int | None = None,
                 machine: str | None = None):  # fmt: skip
        mp = board.get("micropython")
        wd = board.get("watchdog") or {}
        if not mp or wd.get("kind") != "hardware":
            raise DressError(
                f"board {board.get('name')!r} is not a real board with a MicroPython port and a "
                "hardware watchdog to dress the sim board as"
            )
        self.board = board
        self.name = board["name"]
        self.version = version or mp["versions"][-1]
        parts = self.version.split(".")
        if not 2 <= len(parts) <= 3 or not all(x.isascii() and x.isdigit() for x in parts):
            raise DressError(f"MicroPython version {self.version!r}: expected e.g. 1.24.1")
        self.version_tuple = tuple(int(x) for x in parts) + (0,) * (3 - len(parts))
        listed = self.version in mp["versions"]
        if mpy is None:
            arch = MPY_ARCHES.index(mp["mpy"]["arch"])
            mpy = (
                mp["mpy"]["sys_implementation_mpy"]
                if listed
                else mpy_for_release(self.version_tuple, arch)
            )
            if mpy is None:
                raise DressError(
                    f"MicroPython {self.version}: give its sys.implementation._mpy (.mpy 5 and "
                    "older carry port-dependent feature flags)"
                )
        self.mpy = mpy
        self.machine = machine or standin_machine(board)
        self.platform = mp["port"]
        timeout = wd["timeout_ms"]
        if wd.get("max_timeout_ms"):
            timeout = min(timeout, wd["max_timeout_ms"])
        self.wdt_timeout_ms = timeout

    def sys_standin(self) -> str:
        """MicroPython source that puts the dressed board's sys in place (see _SYS_STANDIN)."""
        return _SYS_STANDIN.format(
            version=self.version_tuple + ("",),
            machine=self.machine,
            mpy=self.mpy,
            build=self.board["micropython"].get("board", ""),
            platform=self.platform,
        )

    def firmware_board(self) -> dict:
        """The board definition the firmware runs with: the sim's hardware under the dressed
        board's name, relay channels and watchdog timeout."""
        return {
            "name": self.name,
            "description": f"the sim board dressed as {self.name}: the sim's relays (relays."
                           "state), network (the host's) and watchdog (the supervisor's)",
            "dressed_as": self.name,
            "ethernet": {"kind": "host"},
            "relays": {"kind": "file"},
            "channels": self.board["channels"],
            "watchdog": {"kind": "supervisor", "timeout_ms": self.wdt_timeout_ms},
            "faults": True,
        }  # fmt: skip


class Supervisor:
    """Runs the firmware and owns the serial line. `run()` blocks until stop() or a signal."""

    def __init__(
        self,
        flash: Path,
        micropython: str,
        heap_bytes: int,
        firmware_args: list[str],
        serial_link: Path | None = None,
        wdt_timeout_ms: int | None = 8000,
        on_output=None,
        on_event=None,
        dress: Dress | None = None,
    ):
        self.flash = flash
        self.micropython = micropython
        self.heap_bytes = heap_bytes
        self.firmware_args = list(firmware_args)
        self.serial_link = serial_link
        self.dress = dress
        self._dress_dir: str | None = None
        if dress is not None:
            import tempfile

            self._dress_dir = tempfile.mkdtemp(prefix="bastion-dress-")
            board_file = Path(self._dress_dir) / "board.json"
            atomic.write_json(board_file, dress.firmware_board())
            self.firmware_args += firmware_words({"board": board_file})
            wdt_timeout_ms = dress.wdt_timeout_ms
        self.wdt_timeout = None if wdt_timeout_ms is None else wdt_timeout_ms / 1000
        # A real board's watchdog (RP2040, ESP32) survives a soft reboot; the plain sim board's
        # restarts with the firmware process.
        self.wdt_survives_soft_reboot = dress is not None
        self.on_output = on_output  # callable(bytes) for every byte the board writes
        self.on_event = on_event or (lambda ev: None)  # supervisor events (resets)
        self.line_master, self.line_slave = pty.openpty()
        tty.setraw(self.line_slave)
        for fd in (self.line_master,):
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        self.path = os.ttyname(self.line_slave)
        if serial_link is not None:
            atomic.symlink(self.path, serial_link)
        self.proc: subprocess.Popen | None = None
        self.inner = -1
        self.wdt_r = -1
        self.raw_repl = False  # the firmware said it is at the raw REPL (until a ">>> ")
        self._said = b""  # the tail of its output, for a marker cut between two reads
        self.resets = 0
        self._stopping = False
        self._last_feed: float | None = None
        self._pending_raw_entry = False
        self._discard_until: bytes | None = None
        self._buf = b""
        # What the line sent that the firmware's tty has not taken yet. While any is left the
        # line is not read: the sender waits, as a host does on a board's USB CDC (the
        # device's endpoint NAKs until its firmware reads), where no byte is ever lost.
        self._to_inner = b""

    # -- firmware process -------------------------------------------------------------------
    def _start(self, run_main: bool, keep_watchdog: bool = False) -> None:
        master, slave = pty.openpty()
        _firmware_tty_mode(slave)
        wdt_r, wdt_w = os.pipe()
        cmd = [self.micropython, "-X", f"heapsize={self.heap_bytes}"]
        if run_main:
            cmd += ["-i", "main.py", *self.firmware_args]
        elif self.dress is not None:
            cmd += ["-i", "-c", self.dress.sys_standin()]
        env = dict(os.environ, EDGE_BASTION_WDT_FD=str(WDT_FD))
        self.proc = subprocess.Popen(
            cmd,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=self.flash,
            preexec_fn=_set_ctty_and_wdt(slave, wdt_w),
            pass_fds=(wdt_w, WDT_FD),
            env=env,
            close_fds=True,
        )
        os.close(slave)
        os.close(wdt_w)
        fcntl.fcntl(master, fcntl.F_SETFL, fcntl.fcntl(master, fcntl.F_GETFL) | os.O_NONBLOCK)
        self.inner = master
        self.wdt_r = wdt_r
        if not keep_watchdog:
            self._last_feed = None
        if not run_main:
            # Come back at the raw REPL: skip the unix port's banner, then ask for raw mode.
            self._discard_until = FRIENDLY_PROMPT
            self._pending_raw_entry = True

    def _reap(self) -> None:
        self._to_inner = b""
        for fd in (self.inner, self.wdt_r):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.inner = self.wdt_r = -1
        if self.proc is not None:
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill_firmware(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    # -- relaying ---------------------------------------------------------------------------
    def _to_line(self, data: bytes) -> None:
        if self.on_output is not None:
            self.on_output(data)
        try:
            os.write(self.line_master, data)
        except OSError as e:  # nobody reading and the PTY buffer full: a USB CDC drops too
            if e.errno not in (errno.EAGAIN, errno.EIO):
                raise

    def _from_inner(self, data: bytes) -> None:
        said = self._said + data
        raw, friendly = said.rfind(b"\n" + RAW_PROMPT), said.rfind(b"\n" + FRIENDLY_PROMPT)
        if raw != friendly:  # the later of the two, each at the start of a line
            self.raw_repl = raw > friendly
        self._said = said[-64:]
        if self._discard_until is not None:
            self._buf += data
            i = self._buf.find(self._discard_until)
            if i < 0:
                self._buf = self._buf[-64:]
                return
            data = self._buf[i + len(self._discard_until) :]
            self._buf = b""
            self._discard_until = None
            if self._pending_raw_entry:
                self._pending_raw_entry = False
                os.write(self.inner, b"\x01")
        if data:
            self._to_line(data)

    def _from_line(self, data: bytes) -> None:
        self._to_inner += data
        self._write_inner()

    def _write_inner(self) -> None:
        if self.inner < 0:
            self._to_inner = b""  # the firmware has gone: a board's reset loses its buffer too
            return
        try:
            n = os.write(self.inner, self._to_inner)
        except OSError as e:
            if e.errno == errno.EAGAIN:
                return
            n = len(self._to_inner)  # EIO: the process is going; run() restarts it
        self._to_inner = self._to_inner[n:]

    def _restart(self, reason: str) -> None:
        rc = self.proc.returncode if self.proc else None
        self._reap()
        self.resets += 1
        if reason in ("soft-reboot-raw", "soft-reboot"):
            self._to_line(SOFT_REBOOT)
        self.on_event({"ev": "reset", "reason": reason, "rc": rc, "resets": self.resets})
        keep = self.wdt_survives_soft_reboot and reason in SOFT_REBOOTS
        if reason == "soft-reboot-raw":
            self._start(run_main=False, keep_watchdog=keep)
        else:
            self.raw_repl = False
            self._start(run_main=True, keep_watchdog=keep)

    def stop(self) -> None:
        self._stopping = True

    def run(self) -> None:
        self._start(run_main=True)
        try:
            while not self._stopping:
                fds = [] if self._to_inner else [self.line_master]
                if self.inner >= 0:
                    fds.append(self.inner)
                if self.wdt_r >= 0:
                    fds.append(self.wdt_r)
                wfds = [self.inner] if self._to_inner and self.inner >= 0 else []
                try:
                    ready, writable, _ = select.select(fds, wfds, [], 0.1)
                except InterruptedError:
                    continue
                if writable:
                    self._write_inner()
                for fd in ready:
                    try:
                        data = os.read(fd, 4096)
                    except OSError as e:
                        if e.errno == errno.EAGAIN:
                            continue
                        data = b""
                    if fd == self.line_master:
                        if data:
                            self._from_line(data)
                    elif fd == self.inner:
                        if data:
                            self._from_inner(data)
                        else:
                            self.inner_closed()
                    elif fd == self.wdt_r:
                        if b"R" in data:  # the firmware asked for a reset (machine.reset())
                            self.kill_firmware()
                            self.proc.wait()
                            self._drain_inner()
                            self._restart("reset")
                            break
                        if data:
                            self._last_feed = time.monotonic()
                        else:
                            os.close(self.wdt_r)
                            self.wdt_r = -1
                if self.proc is not None and self.proc.poll() is not None:
                    self._drain_inner()
                    if self._stopping:
                        break
                    rc = self.proc.returncode
                    if rc == 0:
                        self._restart("soft-reboot-raw" if self.raw_repl else "soft-reboot")
                    else:
                        time.sleep(0.2)  # a crash loop must not spin
                        self._restart("crash" if rc > 0 else "killed")
                elif (
                    self.wdt_timeout is not None
                    and self._last_feed is not None
                    and time.monotonic() - self._last_feed > self.wdt_timeout
                ):
                    self.kill_firmware()
                    self.proc.wait()
                    self._drain_inner()
                    self._restart("watchdog")
        finally:
            self.kill_firmware(signal.SIGTERM)
            self._reap()
            if self._dress_dir is not None:
                import shutil

                shutil.rmtree(self._dress_dir, ignore_errors=True)
            if self.serial_link is not None:
                try:
                    if os.readlink(self.serial_link) == self.path:
                        self.serial_link.unlink()
                except OSError:
                    pass

    def inner_closed(self) -> None:
        pass  # EIO on the inner master: the process has gone; poll() above restarts it

    def _drain_inner(self) -> None:
        if self.inner < 0:
            return
        while True:
            try:
                data = os.read(self.inner, 4096)
            except OSError:
                break
            if not data:
                break
            self._from_inner(data)


def _set_ctty_and_wdt(slave: int, wdt_w: int):
    def pre() -> None:
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
        if wdt_w != WDT_FD:
            os.dup2(wdt_w, WDT_FD)

    return pre


def json_lines_out(stream=None):
    """An on_event sink that prints supervisor events as JSON lines."""
    stream = stream or sys.stdout

    def emit(ev: dict) -> None:
        stream.write(json.dumps(ev) + "\n")
        stream.flush()

    return emit
