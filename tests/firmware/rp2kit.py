"""An emulated W5500-EVB-Pico for the tests: MicroPython's official rp2 image for the board
(tests/firmware/rp2/data, built from source: its SOURCES.md) running in rp2040js
(tests/firmware/rp2/emulator.mjs) with our stand-in for the RP2040's bootrom (rom.mjs there),
its USB serial line a pseudo-terminal that mpremote and pyserial open as they would
/dev/ttyACM0, its GPIO levels, resets and USB line reported here.

RP2040_BOOTROM=PATH in the environment runs the same tests with a real RP2040 bootrom instead
(not in this repository: tools/rp2040-bootrom writes one from rp2040js's demo/bootrom.ts)."""

from __future__ import annotations

import json
import os
import pty
import shutil
import subprocess
import threading
import time
import tty
from pathlib import Path

HERE = Path(__file__).parent / "rp2"
REPO = HERE.parents[2]
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
                 flash_file: Path | None = None):  # fmt: skip
        """bootrom: a real RP2040 bootrom, None for the emulator's stand-in; w5500: a W5500 on
        SPI0 (the emulator's register model), as on the board; flash_file: the flash as a
        previous run left it (when the file exists), and where this run leaves it."""
        self.link = link
        self.w5500 = w5500
        self.flash_file = flash_file
        self.image = image
        self.bootrom = bootrom
        self.events: list[dict] = []
        self._cond = threading.Condition()
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Rp2Board:
        self._master, self._slave = pty.openpty()
        tty.setraw(self._slave)  # no echo of the chip's output back into it before a client opens
        if self.link.is_symlink() or self.link.exists():
            self.link.unlink()
        self.link.symlink_to(os.ttyname(self._slave))
        self.proc = subprocess.Popen(
            ["node", str(EMULATOR), *(["--bootrom", str(self.bootrom)] if self.bootrom else []), "--image", str(self.image),
             "--serial-fd", str(self._master), *(["--w5500"] if self.w5500 else []),
             *(["--flash-file", str(self.flash_file)] if self.flash_file else [])],
            pass_fds=(self._master,), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # the emulator writes its flash file, if it has one
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
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
