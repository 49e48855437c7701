"""Helpers shared by tests in several folders."""

from __future__ import annotations

import json
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from bastion.flash import sim
from bastion.lab.netns import stop_process

BIN = Path(sys.executable).parent
# Lines a test wants printed in pytest's terminal summary (the reliability suite's counts):
# `request.config.stash.setdefault(SUMMARY, []).extend(lines)`; tests/conftest.py prints them.
SUMMARY = pytest.StashKey[list]()


def free_udp_port(host: str = "127.0.0.1") -> int:
    """A UDP port that was free on host a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class SimProcess:
    """`bastion sim` as a user runs it, with its stdout events collected. On loopback (free
    ports), or with `netns`, inside that network namespace on `listen` and the real ports."""

    def __init__(self, flash: Path, link: Path, config: dict | None = None, args: tuple = (),
                 netns: str | None = None, listen: str = "127.0.0.1", blank: bool = False):
        """args: more `bastion sim` options (--dress-as BOARD, ...); netns: run it in that
        network namespace (its default ports, on `listen`); blank: a board as it comes, with
        no device config (`config` is then not used)."""
        if not blank:
            (flash / "tftp").mkdir(parents=True, exist_ok=True)
            (flash / "device.json").write_text(json.dumps({
                "server_ip": listen,
                "script_url": f"http://{listen}:8080/boot.ipxe",
                "boot_files": {"7": "ipxe.efi"},
                **(config or {}),
            }))
        self.link = link
        self.events: queue.Queue = queue.Queue()
        self.seen: list[dict] = []
        self.seen_at: list[float] = []  # time.monotonic() when each of `seen` arrived
        self.said: list[str] = []  # its last lines that are not events (a traceback), for failures
        self.tftp_port = 69 if netns else free_udp_port()  # where a node fetches its boot file
        self.dhcp_port = 67 if netns else free_udp_port()
        self.pxe_port = 4011 if netns else free_udp_port()
        ports = [] if netns else [
            "--dhcp-port", str(self.dhcp_port), "--pxe-port", str(self.pxe_port),
            "--tftp-port", str(self.tftp_port)]
        self.proc = subprocess.Popen(
            (["ip", "netns", "exec", netns] if netns else [])
            + [str(BIN / "bastion"), "sim", "--flash", str(flash), "--listen", listen, *ports,
               "--serial-link", str(link), *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                self.said = [*self.said[-39:], line.decode(errors="replace").rstrip()]
                continue
            self.seen_at.append(time.monotonic())
            self.seen.append(ev)
            self.events.put(ev)

    def wait(self, pred, timeout=30.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ev = self.events.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None:
                    self._reader.join(timeout=2)  # its last words, read to the end
                    raise AssertionError(f"bastion sim exited ({self.proc.returncode}): "
                                         f"{self.seen}\n" + "\n".join(self.said))  # fmt: skip
                continue
            if pred(ev):
                return ev
        raise AssertionError(f"no such event in {timeout}s; saw {self.seen}")

    def stop(self):
        stop_process(self.proc, grace=10)

    def __enter__(self) -> SimProcess:
        """The board once its firmware has booted; stopped on leaving, whatever happened."""
        try:
            self.wait(lambda e: e.get("ev") == "boot")
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def firmware_pid(self) -> int:
        """The PID of the firmware process (micropython) this board's supervisor runs now."""
        pids = subprocess.run(["pgrep", "-f", "heapsize=.*-i main.py"], capture_output=True,
                              text=True, check=False).stdout.split()
        mine = [int(p) for p in pids if parent_of(int(p)) == self.proc.pid]
        assert len(mine) == 1, (pids, self.proc.pid)
        return mine[0]


def parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


class RelayWatch:
    """Reads a sim board's relay outputs (relays.state in its flash) every few ms in a thread
    and keeps each distinct state it saw, so a test can tell whether an output ever changed."""

    def __init__(self, flash: Path, every_s: float = 0.002):
        self.path = flash / "relays.state"
        self.every_s = every_s
        self.seen: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                text = self.path.read_text().strip()
            except OSError:
                text = "<missing>"
            if not self.seen or self.seen[-1] != text:
                self.seen.append(text)
            time.sleep(self.every_s)

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join(5)
        return self.seen


def bastion(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`bastion ARGS...` as a user runs it, its output captured (the caller checks the code)."""
    return subprocess.run([str(BIN / "bastion"), *args], capture_output=True, text=True,
                          timeout=timeout, check=False)  # fmt: skip


def mpremote(link: Path, *args: str, timeout: float = 60) -> str:
    """The real mpremote on the serial line `link`: its stdout; fails the test unless it
    succeeded."""
    r = subprocess.run([str(BIN / "mpremote"), "connect", str(link), *args],
                       capture_output=True, text=True, timeout=timeout, check=False)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def wait_for(pred, timeout: float = 20.0, what: str = "condition"):
    """Poll pred() until it returns something true (returned), or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")


class SimBoard:
    """A running sim board: the firmware as .mpy under the unix port, events read from stdout."""

    def __init__(self, flash: Path, cmd: list[str], env: dict | None = None):
        self.flash = flash
        self.cmd = cmd
        self.events: list[dict] = []
        self.lines: list[str] = []
        self._q: queue.Queue = queue.Queue()
        self.proc = subprocess.Popen(
            cmd,
            cwd=flash,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            ev = sim.decode_event_line(raw)
            if ev is not None:
                self.events.append(ev)
                self._q.put(ev)

    def wait_event(self, pred, timeout: float = 20.0) -> dict:
        """The first event (already seen or coming) for which pred(ev) is true."""
        for ev in list(self.events):
            if pred(ev):
                return ev
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                ev = self._q.get(timeout=min(left, 0.5))
            except queue.Empty:
                if self.proc.poll() is not None and self._q.empty():
                    break
                continue
            if pred(ev):
                return ev
        raise AssertionError(
            f"no matching event within {timeout}s; firmware exit={self.proc.poll()}; "
            f"last output:\n" + "\n".join(self.lines[-30:])
        )

    def stop(self) -> None:
        stop_process(self.proc, grace=5)
        self._reader.join(timeout=5)
