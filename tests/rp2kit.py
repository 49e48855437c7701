"""An emulated W5500-EVB-Pico for the tests: MicroPython's official rp2 image for the board
(tests/firmware/rp2/data, built from source: its SOURCES.md) running in rp2040js
(tests/firmware/rp2/emulator.mjs) with our stand-in for the RP2040's bootrom (rom.mjs there),
its USB serial line a pseudo-terminal that mpremote and pyserial open as they would
/dev/ttyACM0, its GPIO levels, resets and USB line reported here.

RP2040_BOOTROM=PATH in the environment runs the same tests with a real RP2040 bootrom instead
(not in this repository: tools/rp2040-bootrom writes one from rp2040js's demo/bootrom.ts)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import shutil
import struct
import subprocess
import threading
import time
import tty
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).parent / "firmware" / "rp2"
EMULATOR = HERE / "emulator.mjs"
IMAGE = HERE / "data" / "micropython-w5500-evb-pico.uf2"
# A real bootrom, when asked for; not in this repository (its floating-point part is licensed for
# RP2040 devices only, or GPLv2 from its author).
BOOTROM = Path(os.environ["RP2040_BOOTROM"]) if os.environ.get("RP2040_BOOTROM") else None


def missing() -> str | None:
    """Why the emulated board cannot run here, or None."""
    if shutil.which("node") is None:
        return "no node (Debian package nodejs, which npm brings)"
    if not (HERE / "node_modules" / "rp2040js").is_dir():
        return "no rp2040js: tools/setup runs npm ci in tests/firmware/rp2"
    if not IMAGE.is_file():
        return f"{IMAGE} is missing"
    if BOOTROM is not None and not BOOTROM.is_file():
        return f"RP2040_BOOTROM={BOOTROM}: no such file (tools/rp2040-bootrom writes one)"
    return None


class Rp2Board:
    """The emulated board, running from power-on. `link`: the serial device's path (a symlink
    to the pseudo-terminal); `events`: what the emulator reported (dicts, in order)."""

    def __init__(self, link: Path, image: Path = IMAGE, bootrom: Path | None = BOOTROM, w5500: bool = False,
                 flash_file: Path | None = None, on_frame: Callable[[bytes], None] | None = None):  # fmt: skip
        """bootrom: a real RP2040 bootrom, None for the emulator's stand-in; w5500: a W5500 on
        SPI0 (the emulator's register model), as on the board; flash_file: the flash as a
        previous run left it (when the file exists), and where this run leaves it; on_frame:
        called with each frame the W5500 sends, as it is reported (TapWire.attach)."""
        self.on_frame = on_frame
        self.link = link
        self.w5500 = w5500
        self.flash_file = flash_file
        self.image = image
        self.bootrom = bootrom
        self.events: list[dict] = []
        self._cond = threading.Condition()
        self.proc: subprocess.Popen | None = None
        self.killed = False  # the stop took SIGKILL: the emulator did not end on SIGTERM

    def __enter__(self) -> Rp2Board:
        self._master, self._slave = pty.openpty()
        tty.setraw(self._slave)  # no echo of the chip's output back into it before a client opens
        if self.link.is_symlink() or self.link.exists():
            self.link.unlink()
        self.link.symlink_to(os.ttyname(self._slave))
        # The emulator gets SIGTERM when the thread that starts it ends, however it ends
        # (setpriv --pdeathsig: Linux's PR_SET_PDEATHSIG, kept across exec). It also ends when
        # nothing holds its serial line's other end any more (its read gets EIO), but a process
        # the test started may hold it (the lab's controller): a test process killed outright
        # (a CI timeout, kill -9) then left the emulator running, a core's worth of CPU.
        # SIGTERM lets it write its flash file, as on a normal stop.
        stop_with_us = ["setpriv", "--pdeathsig", "TERM"] if shutil.which("setpriv") else []
        self.proc = subprocess.Popen(
            [*stop_with_us, "node", str(EMULATOR), *(["--bootrom", str(self.bootrom)] if self.bootrom else []), "--image", str(self.image),
             "--serial-fd", str(self._master), *(["--w5500"] if self.w5500 else []),
             *(["--flash-file", str(self.flash_file)] if self.flash_file else [])],
            pass_fds=(self._master,), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        # The emulator stands in for a chip of its own, which no other process on the machine
        # slows down; a node's VM or a busy test machine would, and the nodes' PXE timers (wall
        # time) then expire before the chip has answered. Root may raise its priority.
        try:
            os.setpriority(os.PRIO_PROCESS, self.proc.pid, -10)
        except PermissionError:
            pass
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # the emulator writes its flash file, if it has one, and ends
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.killed = True
                self.proc.kill()
                self.proc.wait(timeout=10)
        os.close(self._master)
        os.close(self._slave)

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            with self._cond:
                self.events.append(ev)
                self._cond.notify_all()
            if self.on_frame is not None and ev.get("ev") == "eth":
                self.on_frame(bytes.fromhex(ev["frame"]))

    def wait(self, pred, timeout: float = 60.0, what: str = "an event") -> dict:
        """The first event (from the start) for which pred(event) holds, waiting for it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            seen = 0
            while True:
                for ev in self.events[seen:]:
                    if pred(ev):
                        return ev
                seen = len(self.events)
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc is not None and self.proc.poll() is not None):
                    err = self.proc.stderr.read().decode(errors="replace") if self.proc.poll() is not None else ""
                    raise TimeoutError(f"no {what} in {timeout} s; emulator: {err[-2000:]}")
                self._cond.wait(min(left, 0.5))

    def send_frame(self, frame: bytes) -> None:
        """An Ethernet frame for the W5500 (w5500=True) to receive; an `eth-in` event says
        whether the chip took it."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"frame": frame.hex()}).encode() + b"\n")
        self.proc.stdin.flush()

    def sent_frames(self) -> list[bytes]:
        """The frames the firmware sent through the W5500 so far, in order."""
        with self._cond:
            return [bytes.fromhex(e["frame"]) for e in self.events if e.get("ev") == "eth"]

    def level(self, pin: int) -> str | None:
        """The pin's latest level ("high", "low", "input"), None if it never changed."""
        with self._cond:
            for ev in reversed(self.events):
                if ev.get("ev") == "gpio" and ev.get("pin") == pin:
                    return ev["value"]
        return None

    def boots(self) -> list[dict]:
        with self._cond:
            return [ev for ev in self.events if ev.get("ev") == "boot"]


class TapWire:
    """A tap device in a network namespace as the wire on the W5500's other end: what the
    namespace sends on it goes to the chip (send_frame), what the chip sends comes out of it.
    Made in this namespace and moved into `ns` (a bastion.lab.netns.Namespace), whose removal
    takes it along."""

    TUNSETIFF = 0x400454CA
    IFF_TAP, IFF_NO_PI = 0x0002, 0x1000

    def __init__(self, ns, ifname: str, address: str | None = None, bridge: str | None = None):
        """address: the namespace's own address on the wire (a client's); bridge: a bridge in
        the namespace the tap joins as a port instead (a LAN the board is one host of)."""
        self.fd = os.open("/dev/net/tun", os.O_RDWR)
        try:
            fcntl.ioctl(self.fd, self.TUNSETIFF, struct.pack("16sH", ifname.encode(), self.IFF_TAP | self.IFF_NO_PI))
            subprocess.run(["ip", "link", "set", ifname, "netns", ns.name], check=True)
        except BaseException:
            os.close(self.fd)
            raise
        # no IPv6 on the wire: the kernel's router solicitations and MLD reports are not the test's
        ns.run("sysctl", "-qw", f"net.ipv6.conf.{ifname}.disable_ipv6=1", check=True)
        if address is not None:
            ns.ip("addr", "add", address, "dev", ifname)
        if bridge is not None:
            ns.ip("link", "set", ifname, "master", bridge)
        ns.ip("link", "set", ifname, "up")
        self.board: Rp2Board | None = None
        self._wake_r, self._wake_w = os.pipe()
        self._thread: threading.Thread | None = None

    def attach(self, board: Rp2Board) -> None:
        """From now on, frames sent on the tap reach `board`'s W5500 (board.on_frame: write)."""
        self.board = board
        self._thread = threading.Thread(target=self._to_chip, daemon=True)
        self._thread.start()

    def write(self, frame: bytes) -> None:
        os.write(self.fd, frame)

    def _to_chip(self) -> None:
        while True:
            ready, _, _ = select.select([self.fd, self._wake_r], [], [])
            if self._wake_r in ready:
                return
            frame = os.read(self.fd, 2048)
            assert self.board is not None
            try:
                self.board.send_frame(frame)
            except (BrokenPipeError, ValueError):  # the emulator has stopped
                return

    def close(self) -> None:
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=10)
        for fd in (self.fd, self._wake_r, self._wake_w):
            os.close(fd)
