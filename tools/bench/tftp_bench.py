#!/usr/bin/env python3
"""TFTP benchmark: the firmware on the sim board against tftp-hpa and dnsmasq (and, with
`--servers ...,controller`, the controller's own TFTP: `bastion serve --tftp`, the firmware's
engine in a CPython shell), same file, same clients, lock-step and in windows (RFC 7440), and the
firmware's heap while it serves concurrent transfers.

One run, inside a network namespace of its own (`eb-bench-<pid>`, loopback only, so port 69 is
free there and no packet can reach a real interface), everything on 127.0.0.1:

1. starts three read-only TFTP servers on one copy each of the same file (by default iPXE's
   ipxe.efi, about 1 MB): the firmware on the MicroPython unix port (`-X heapsize=...`, the
   flash laid out by bastion.flash.sim as `bastion sim` does), tftp-hpa's in.tftpd in the foreground,
   and dnsmasq's built-in TFTP (on port 69: dnsmasq has no option to move it); the controller
   only when asked for (`--servers`), as a user runs it, with a site whose tftp/ holds the file;
   `--size 2M` serves a file of random bytes made by the bench instead (a Pi's RPI_EFI.fd);
2. fetches the file from each with curl (`tftp://`, one process per transfer), once per server
   to warm up, then --reps times per block size, interleaved: every repetition visits each
   server, in an order that rotates, so machine noise falls on all of them alike. In the same
   repetitions, atftp fetches it from each asking for windowsize --windowsize (RFC 7440) at the
   first block size: curl has no windowsize; servers without it answer lock-step. Every download
   is checked against the source's SHA-256; a failed or corrupt one is printed and counted;
3. restarts the firmware (so its heap peak belongs to this phase alone) and runs --concurrent
   curl clients at once against each server, each fetching back to back for
   --concurrent-seconds (at least 3 of the firmware's 1 s heap samples), then one transfer
   alone, to see that the server still serves after the burst;
4. prints per block size median/min/p90 seconds per transfer (curl's time_total), throughput,
   the ratios firmware/tftp-hpa and firmware/dnsmasq (controller/tftp-hpa and
   controller/dnsmasq too), the same for the windowed fetches (atftp's wall time, its start-up
   included) with the largest window the firmware and the controller granted (from their own
   start events), the concurrent phase's aggregate throughput and its ratios (all bytes over
   the phase's wall time), and the firmware's heap: `code` (what it holds after boot) and the data
   high-water mark (peak - code) as its own `heap` events report them, next to the design's
   goals for the MicroPython it ran on;
5. with --min-heap, restarts the firmware at one heap size after another, by bisection between
   16k and --heap, to find the smallest -X heapsize at which it boots all its services and
   serves rounds of --concurrent transfers started together for --concurrent-seconds (each
   round once the firmware has reported the last one's transfers over), then one alone; every
   size tried is printed with what happened there (its failures are not the run's).

The firmware runs on the unix port installed with bastion (64-bit), or on the MicroPython given:
`--micropython PATH` loads it as .mpy from the flash as `bastion sim` lays it out (the bench
first checks that this MicroPython's .mpy ABI, sys.implementation._mpy, loads what mpy-cross
wrote); `--micropython-frozen PATH` runs a MicroPython with the firmware frozen into it, and the
flash holds only device.json, board.json, tftp/ and the boot stub main.py. The heap goals
printed are those for its word size and the way it holds the firmware (HEAP_GOALS).

`--pin SERVER_CPU,CLIENT_CPU` runs every server on one CPU and every client on another, so that
each lock-step round trip crosses between the same two cores for every server, run after run
(unpinned, whether the scheduler puts curl on the server's core moves a ratio by up to 2x).
The same CPU twice (`--pin 1,1`) puts servers and clients on one core: a block's time is then
the server's CPU and the client's one after the other, the measure of a server's own work per
block. `--pin 1,0 --one-cpu` gives both views in one run: in each repetition every lock-step
fetch is made twice, with curl on CPU 0 and with curl on the servers' CPU 1, and the second set
gets tables and ratios of its own ("on one CPU").

Exit status: 0 when every transfer succeeded with the right bytes, 1 when any failed or came
back corrupt (or the firmware did not boot), 2 when the bench could not set up (not root, a tool
missing). The bench stops by itself; every process it starts is stopped by its PID, and the
namespace deleted, however the run ends (also on Ctrl-C, SIGTERM or an error).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bastion.flash import mpy, sim
from bastion.lab.netns import LabError, Namespace, exited, run_with_cleanup, stop_process

from firmware import frame

HOST = "127.0.0.1"  # the only address used, and only inside the bench's namespace
# The reference servers (tools/bench/tftp_reference.py on the same MicroPython and heap as the
# firmware): lock-step only, one transfer at a time, so they take part in the sequential phase
# alone. Each adds one layer of the firmware to the one before (that file's header).
REFERENCES = ("mp-blocking", "mp-asyncio", "mp-engine", "mp-shell")
REFERENCE_SCRIPT = Path(__file__).resolve().parent / "tftp_reference.py"
SERVERS = ("firmware", "tftp-hpa", "dnsmasq", "controller", *REFERENCES)
DEFAULT_SERVERS = ("firmware", "tftp-hpa", "dnsmasq")
# Ports inside the namespace. dnsmasq's TFTP port is fixed at 69.
PORTS = {
    "firmware": 2069, "tftp-hpa": 1069, "dnsmasq": 69, "controller": 3069,
    **{name: 2170 + i for i, name in enumerate(REFERENCES)},
}  # fmt: skip
CONTROLLER_HTTP = 3080  # `bastion serve` also serves HTTP; nobody asks it anything here
FIRMWARE_DHCP_PORT = 2067  # the firmware's other listeners, out of everyone's way
FIRMWARE_PXE_PORT = 2011
DEFAULT_FILE = Path("/usr/lib/ipxe/ipxe.efi")
KB = 1024
DATA_GOAL = 24 * KB  # docs/design.md: data <= 24 KB of the heap
HEAP_GOAL = 128 * KB  # everything inside a 128 KB heap on the unix port ...
HEAP_AIM = 96 * KB  # ... aiming at 96 KB
# The heap goals by the MicroPython that runs the firmware: (its word size in bits, the firmware
# frozen into it) -> (goal, aim or None, what the goal is about). On a 32-bit MicroPython, as on
# a board: all services and 4 transfers within a 64 KB heap with the code as .mpy, 40 KB with it
# frozen into the image (design.md, issue 14).
HEAP_GOALS = {
    (64, False): (HEAP_GOAL, HEAP_AIM, "the 64-bit unix port, code as .mpy"),
    (32, False): (64 * KB, None, "a 32-bit MicroPython, code as .mpy"),
    (32, True): (40 * KB, None, "a 32-bit MicroPython, firmware frozen in"),
}
MIN_HEAP = 16 * KB  # the smallest heap bastion.flash.sim accepts: where --min-heap starts
MAX_FETCHES_PER_CLIENT = 1000  # bounds the concurrent phase whatever the clock says
_OVER = ("end", "refused")  # the firmware's tftp events that say a request is done with
_TIME_MARK = "EB-BENCH-TIME"  # how our curl --write-out line is told from curl's own messages
_DECODER = json.JSONDecoder()
# Set once the bench is stopping (done, interrupted or failed): client threads still running
# then quit, and what their cut-off transfers return is neither recorded nor printed.
STOPPING = threading.Event()


# --- pure helpers ---------------------------------------------------------------------------


def parse_event(line: str) -> dict | None:
    """The firmware event on one line of its output, or None.

    Events are JSON objects, bare (`{"ev": ...}`) or in a serial frame
    (`#EB< 1c291ca3 {"ev": ...}`): the object starts at the first `{`. The frame's CRC is not
    checked here; a pipe does not corrupt bytes, and the bench must not depend on the framing.
    """
    obj = _json_object(line)
    return obj if obj is not None and "ev" in obj else None


def parse_reply(line: str) -> dict | None:
    """The firmware console's reply on one line of its output (an object with an integer "id"
    and "ok"; docs/serial-protocol.md), or None; read as parse_event reads events."""
    obj = _json_object(line)
    return obj if obj is not None and isinstance(obj.get("id"), int) and "ok" in obj else None


def _json_object(line: str) -> dict | None:
    i = line.find("{")
    if i < 0:
        return None
    try:
        obj, _ = _DECODER.raw_decode(line, i)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1): always one of the measured values."""
    s = sorted(values)
    if not s:
        return math.nan
    return s[min(len(s), max(1, math.ceil(q * len(s)))) - 1]


def rotated(items: tuple[str, ...], n: int) -> list[str]:
    k = n % len(items) if items else 0
    return list(items[k:] + items[:k])


def kb(n: float) -> str:
    return f"{n / KB:.1f} KB"


def parse_list(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


# --- setup -----------------------------------------------------------------------------------


class SetupError(RuntimeError):
    """The bench cannot run here (exit status 2)."""


# --- the MicroPython that runs the firmware --------------------------------------------------

# Run with -c from an empty directory: its .mpy ABI, word size and version, and where `import
# firmware` finds the firmware there ("-": nowhere). A frozen module's __file__ is relative
# ("firmware/__init__.py"); one found on a path of sys.path is absolute.
_DESCRIBE = """import sys
print(getattr(sys.implementation, "_mpy", 0), 64 if sys.maxsize >> 32 else 32)
print(sys.version)
try:
    import firmware
    print(getattr(firmware, "__file__", "firmware/__init__.py"))
except ImportError:
    print("-")
"""


@dataclass(frozen=True)
class MicroPython:
    """The MicroPython binary that runs the firmware, as it describes itself."""

    path: str
    frozen: bool  # run with the firmware frozen into it (--micropython-frozen)
    mpy: int  # sys.implementation._mpy: the .mpy files it loads
    bits: int  # its word size, from sys.maxsize
    version: str  # sys.version
    has_frozen_firmware: bool  # `import firmware` works from an empty directory

    @property
    def abi(self) -> mpy.MpyAbi:
        return mpy.MpyAbi.from_sys(self.mpy)

    def describe(self) -> str:
        where = "frozen into it" if self.frozen else "as .mpy from the flash"
        return (
            f"{self.path}: {self.bits}-bit, loads .mpy {self.abi} ({self.version}); "
            f"firmware {where}"
        )

    def goals(self) -> tuple[int, int | None, str] | None:
        """The heap goal (and aim) for the firmware on this MicroPython; None when there is none."""
        return HEAP_GOALS.get((self.bits, self.frozen))


def describe_micropython(path: str, frozen: bool) -> MicroPython:
    """Runs path to ask it what it is; SetupError when it is not a MicroPython that runs here, or
    when frozen and it has no firmware frozen into it. path: a path, relative to the working
    directory (the firmware runs in its flash directory: the MicroPython keeps it absolute), or
    a name looked up on PATH."""
    path = (shutil.which(path) or path) if os.sep not in path else os.path.abspath(path)
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise SetupError(f"{path}: not a program that can be run")
    with tempfile.TemporaryDirectory(prefix="eb-mp-") as empty:
        try:
            r = subprocess.run([path, "-c", _DESCRIBE], cwd=empty, check=False,
                               capture_output=True, text=True, timeout=30)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as e:
            raise SetupError(f"{path}: does not run here: {e}") from None
    lines = r.stdout.splitlines()
    try:
        mpy_n, bits = (int(w) for w in lines[0].split())
        version, found = lines[1], lines[2]
    except (IndexError, ValueError):
        said = (r.stderr or r.stdout).strip().splitlines()
        raise SetupError(
            f"{path}: not a MicroPython that runs here (exit {r.returncode}: "
            f"{said[-1] if said else 'no output'})"
        ) from None
    mp = MicroPython(path, frozen, mpy_n, bits, version, found != "-" and not found.startswith("/"))
    if frozen and not mp.has_frozen_firmware:
        raise SetupError(
            f"--micropython-frozen {path}: no firmware frozen into it (`import firmware` finds "
            f"nothing from an empty directory); a binary that loads it from the flash goes "
            f"with --micropython"
        )
    return mp


def mpy_problem(mp: MicroPython, compiled: Path) -> str | None:
    """Why mp cannot load the firmware as compiled into `compiled` (an .mpy file), or None."""
    f = mpy.MpyAbi.from_header(compiled.read_bytes()[:4])
    if f is None:
        return f"{compiled} is not an .mpy file"
    why = mpy.why_not_loaded(mp.abi, f, 2 ** (mp.bits - 1) - 1)
    if why is None:
        return None
    return f"{mp.path} cannot load the firmware as mpy-cross compiled it ({compiled.name}): {why}"


# --- the three servers ----------------------------------------------------------------------


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen | None = None
    log: Path | None = None
    problem: str | None = None  # why it is not serving now, once known
    problems: list[str] = field(default_factory=list)  # every such problem in the run
    quiet: bool = False  # problems are recorded, not printed (the --min-heap probes)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def running(self) -> bool:
        """Whether it is serving; the first time it is found dead, says so (once, also when
        several client threads ask at once)."""
        with self._lock:
            if self.problem is not None or STOPPING.is_set():
                return False
            if self.proc is None or exited(self.proc):
                self.fail(f"exited during the run: {self.last_words()}")
                return False
            return True

    def fail(self, problem: str) -> None:
        self.problem = problem
        self.problems.append(problem)
        if not self.quiet:
            print(f"FAILED  {self.name}: {problem}", flush=True)

    def last_words(self) -> str:
        """The line of its output that best says why it stopped."""
        lines = []
        if self.log is not None and self.log.exists():
            lines = self.log.read_text(errors="replace").strip().splitlines()
        errors = [ln for ln in lines if "Error" in ln or "error" in ln]
        return (errors or lines or ["no output"])[-1].strip()


class Firmware(Server):
    """The firmware on the sim board. Its stdout (events, and tracebacks on stderr) is read by a
    thread: every line goes to the log file, events are parsed into `events`."""

    def __init__(
        self, port: int, flash: Path, heap: str, log: Path, micropython: str | None = None
    ):
        super().__init__("firmware", port, log=log)
        self.flash = flash
        self.heap = heap
        self.micropython = micropython  # None: the unix port installed with bastion
        self.events: list[dict] = []
        self.replies: dict[int, dict] = {}  # the console's replies, by request id
        self._next_id = 1
        self._reader: threading.Thread | None = None

    def start(self, ns: Namespace) -> None:
        self.events = []
        self.problem = None
        cmd = sim.firmware_command(
            self.flash, HOST, FIRMWARE_DHCP_PORT, FIRMWARE_PXE_PORT, self.port, self.heap,
            self.micropython,
        )  # fmt: skip
        self.replies = {}
        # stdin is its console (the sim board's serial line): counters() asks it.
        self.proc = ns.start(cmd, name=self.name, cwd=self.flash, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self._reader.start()

    def _read(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None and self.log is not None
        with self.log.open("a") as out:
            for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                out.write(line + "\n")
                out.flush()  # last_words() reads the file
                ev = parse_event(line)
                if ev is not None:
                    self.events.append(ev)
                elif (reply := parse_reply(line)) is not None:
                    self.replies[reply["id"]] = reply

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        if self._reader is not None:
            self._reader.join(timeout=5)

    def boot_event(self) -> dict | None:
        return next((e for e in self.events if e.get("ev") == "boot"), None)

    def transfers_over(self) -> int:
        """How many transfers it has reported as ended or refused (its `tftp` events)."""
        return sum(
            1 for e in list(self.events) if e.get("ev") == "tftp" and e.get("stage") in _OVER
        )

    def ask(self, request: dict, timeout: float = 5.0) -> dict | None:
        """One request to its console (docs/serial-protocol.md): the reply, or None when none
        came within timeout."""
        if self.proc is None or self.proc.stdin is None or exited(self.proc):
            return None
        rid = self._next_id
        self._next_id += 1
        try:
            self.proc.stdin.write(frame.encode({"id": rid, **request}, frame.TO_DEVICE))
            self.proc.stdin.flush()
        except OSError:
            return None
        deadline = time.monotonic() + timeout
        while rid not in self.replies and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.replies.get(rid)

    def counters(self) -> dict[str, int] | None:
        """Its counters since it booted (a session first, as the console asks), or None."""
        hello = self.ask({"op": "hello", "proto": 1, "session": "tftp-bench"})
        if not hello or not hello.get("ok"):
            return None
        reply = self.ask({"op": "counters"})
        return reply.get("counters") if reply and reply.get("ok") else None

    def heap_figures(self) -> dict:
        """code and peak (bytes) as the firmware reported them; peak is None when no heap
        event came (the live heap never rose by the firmware's reporting step over code)."""
        boot = self.boot_event() or {}
        heaps = [e for e in self.events if e.get("ev") == "heap"]
        code = heaps[-1].get("code") if heaps else boot.get("heap_code")
        peak = max((e.get("peak", 0) for e in heaps), default=None)
        return {"code": code, "peak": peak, "heap_events": len(heaps)}


@dataclass
class Reference(Server):
    """A reference lock-step server (tftp_reference.py) on the MicroPython unix port; None: the
    one installed with bastion (also when the firmware's binary has it frozen in)."""

    heap: str = "128k"
    micropython: str | None = None


def firmware_config() -> dict:
    # The firmware's own TFTP defaults are what is measured (docs/device.md: 4 transfers at
    # once, blksize up to 1468, window up to 4); script_url is required, and unused here.
    return {"server_ip": HOST, "script_url": f"http://{HOST}/boot.ipxe"}


def tftp_hpa_command(root: Path, port: int) -> list[str]:
    # -L: standalone in the foreground; -s: chroot into root (it then drops to nobody).
    # "-a :PORT" binds the wildcard address, which in the bench's namespace is loopback only:
    # given any address, in.tftpd 5.2 exits (status 66) in a namespace with no address but
    # 127.0.0.1, as its address lookup then finds nothing.
    return ["in.tftpd", "-L", "-4", "-s", "-a", f":{port}", str(root)]


def dnsmasq_command(root: Path, work: Path) -> list[str]:
    return [
        "dnsmasq",
        "-k",  # foreground
        "--conf-file=/dev/null",  # nothing from /etc/dnsmasq.conf or /etc/dnsmasq.d
        # Its built-in user, dnsmasq, exists only where a package made it: name one that
        # always does (base-passwd's), as tftp-hpa drops to.
        "--user=nobody",
        "--port=0",  # no DNS
        f"--listen-address={HOST}",
        "--bind-interfaces",
        "--enable-tftp",
        f"--tftp-root={root}",
        f"--pid-file={work / 'dnsmasq.pid'}",
        "--log-facility=-",  # stderr, which goes to its log file
    ]


def controller_command(site: Path, work: Path, port: int) -> list[str]:
    # The controller as a user runs it: every transfer also lands in its event history.
    return [
        str(Path(sys.executable).parent / "bastion"), "serve", "--site", str(site),
        "--listen", f"{HOST}:{CONTROLLER_HTTP}", "--tftp", f"{HOST}:{port}",
        "--db", str(work / "controller-events.db"), "--poll", "0", "--no-access-log",
        "--log-level", "warning",
    ]  # fmt: skip


def wait_serving(ns: Namespace, server: Server, timeout: float = 20.0) -> None:
    """Until server has bound its UDP port (and, for the firmware, sent its boot event); fails
    the server when it exits or times out instead."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc is None or exited(server.proc):
            break
        booted = not isinstance(server, Firmware) or server.boot_event() is not None
        if booted and ns.udp_bound(server.port):
            return
        time.sleep(0.05)
    state = "exited" if server.proc is None or exited(server.proc) else "still not serving"
    time.sleep(0.2)  # the firmware's reader thread: its traceback
    server.fail(f"did not start ({state}): {server.last_words()}")


# --- transfers ------------------------------------------------------------------------------


@dataclass
class Fetch:
    server: str
    phase: str  # "warm-up", "sequential", ONE_CPU, "windowed", "concurrent" or "after-burst"
    blksize: int
    rep: int  # the repetition; in the concurrent phase, the client's own count
    client: int = 0  # which of the concurrent clients
    seconds: float | None = None  # curl's time_total
    size: int = 0
    error: str | None = None  # the transfer failed
    corrupt: str | None = None  # it succeeded, with the wrong bytes
    window: int = 0  # windowsize asked (atftp); 0: curl, which asks for none

    @property
    def ok(self) -> bool:
        return self.error is None and self.corrupt is None

    def describe(self) -> str:
        what = f"{self.server} {self.phase} blksize {self.blksize} #{self.rep}"
        if self.window:
            what += f" windowsize {self.window}"
        if self.phase == "concurrent":
            what += f" of client {self.client}"
        if self.error:
            return f"FAILED  {what}: {self.error}"
        return f"CORRUPT {what}: {self.corrupt}"


@dataclass
class Source:
    path: Path
    name: str
    size: int
    sha256: str


class Client:
    """curl in the namespace, one process per transfer, the body piped back and hashed; or, when
    a window is asked for, atftp, which writes the file into the work directory."""

    def __init__(self, ns: Namespace, source: Source, timeout: float, work: Path):
        self.ns = ns
        self.source = source
        self.timeout = timeout
        self.work = work

    def fetch(
        self, server: Server, phase: str, blksize: int, rep: int, client: int = 0, window: int = 0
    ) -> Fetch:
        f = Fetch(server.name, phase, blksize, rep, client, window=window)
        if window:
            return self._atftp(server, f)
        cmd = self.ns.argv(
            *_client_pin(phase),
            "curl",
            "--silent",
            "--show-error",
            "--max-time",
            f"{self.timeout:g}",
            "--tftp-blksize",
            str(blksize),
            "--output",
            "-",
            "--write-out",
            "%{stderr}" + _TIME_MARK + " %{time_total}\\n",
            f"tftp://{HOST}:{server.port}/{self.source.name}",
        )
        try:
            r = subprocess.run(cmd, check=False, capture_output=True, timeout=self.timeout + 10)
        except subprocess.TimeoutExpired:
            f.error = f"curl did not end within {self.timeout + 10:g} s"
            return f
        messages = []
        for line in r.stderr.decode(errors="replace").splitlines():
            if line.startswith(_TIME_MARK):
                with contextlib.suppress(ValueError, IndexError):
                    f.seconds = float(line.split()[1])
            elif line.strip():
                messages.append(line.strip())
        f.size = len(r.stdout)
        digest = hashlib.sha256(r.stdout).hexdigest()
        if r.returncode != 0:
            f.error = f"curl exit {r.returncode}: {'; '.join(messages) or 'no message'}"
        elif f.size != self.source.size or digest != self.source.sha256:
            f.corrupt = (
                f"{f.size} bytes, sha256 {digest[:16]}..., "
                f"want {self.source.size} bytes, sha256 {self.source.sha256[:16]}..."
            )
        elif f.seconds is None:
            f.error = "curl reported no time"
        return f

    def _atftp(self, server: Server, f: Fetch) -> Fetch:
        # atftp 0.8 asks for windowsize (RFC 7440); it reports no time of its own, so the time
        # is the process's wall time, `ip netns exec` and its start-up included.
        out = self.work / f"atftp-{server.name}.out"
        out.unlink(missing_ok=True)
        cmd = self.ns.argv(
            *_client_pin(f.phase), "atftp", "--get", "-r", self.source.name, "-l", str(out),
            "--option", f"blksize {f.blksize}", "--option", f"windowsize {f.window}",
            "--option", "tsize 0", HOST, str(server.port),
        )  # fmt: skip
        start = time.perf_counter()
        try:
            r = subprocess.run(cmd, check=False, capture_output=True, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            f.error = f"atftp did not end within {self.timeout:g} s"
            return f
        f.seconds = time.perf_counter() - start
        body = out.read_bytes() if out.exists() else b""
        out.unlink(missing_ok=True)
        f.size = len(body)
        digest = hashlib.sha256(body).hexdigest()
        if r.returncode != 0:
            said = (r.stdout + r.stderr).decode(errors="replace").strip().splitlines()
            f.error = f"atftp exit {r.returncode}: {'; '.join(said[-2:]) or 'no message'}"
        elif f.size != self.source.size or digest != self.source.sha256:
            f.corrupt = (
                f"{f.size} bytes, sha256 {digest[:16]}..., "
                f"want {self.source.size} bytes, sha256 {self.source.sha256[:16]}..."
            )
        return f


class Results:
    """Every transfer, with failures printed as they happen. Thread-safe (concurrent phase).
    `skipped` counts transfers not tried because their server was not serving (its problem is
    printed once instead)."""

    def __init__(self, quiet: bool = False) -> None:
        self.fetches: list[Fetch] = []
        self.skipped: dict[str, int] = {}
        self.quiet = quiet  # failures are recorded, not printed (the --min-heap probes)
        self._lock = threading.Lock()

    def fetch(
        self,
        client: Client,
        server: Server,
        phase: str,
        blksize: int,
        rep: int,
        who: int = 0,
        window: int = 0,
    ) -> Fetch | None:
        """One transfer by client from server, recorded; None (and counted as skipped) when
        the server is not serving."""
        if not server.running():
            with self._lock:
                self.skipped[server.name] = self.skipped.get(server.name, 0) + 1
            return None
        return self.add(client.fetch(server, phase, blksize, rep, who, window))

    def add(self, f: Fetch) -> Fetch:
        with self._lock:
            if STOPPING.is_set():
                return f
            self.fetches.append(f)
            if not f.ok and not self.quiet:
                print(f.describe(), flush=True)
        return f

    def select(self, server: str, phase: str, blksize: int | None = None) -> list[Fetch]:
        return [
            f
            for f in self.fetches
            if f.server == server and f.phase == phase and blksize in (None, f.blksize)
        ]

    @property
    def failed(self) -> int:
        return sum(1 for f in self.fetches if f.error)

    @property
    def corrupt(self) -> int:
        return sum(1 for f in self.fetches if f.corrupt)


def run_concurrent(
    client: Client, results: Results, server: Server, clients: int, seconds: float, blksize: int
) -> float:
    """clients threads, each fetching back to back until `seconds` have passed (at least one
    fetch each, at most MAX_FETCHES_PER_CLIENT); returns the wall time."""
    start = time.monotonic()
    deadline = start + seconds

    def worker(i: int) -> None:
        for n in range(MAX_FETCHES_PER_CLIENT):
            f = results.fetch(client, server, "concurrent", blksize, n, i)
            if f is None or time.monotonic() >= deadline or STOPPING.is_set():
                return
            if f.error:  # e.g. the firmware's "busy": do not spin on refusals
                time.sleep(0.05)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.monotonic() - start


def run_rounds(
    client: Client, results: Results, fw: Firmware, clients: int, seconds: float, blksize: int
) -> str | None:
    """Rounds of `clients` transfers started together, until `seconds` have passed (at least
    one round) or a round fails. A round begins once the firmware has reported every transfer
    of the one before as over: all its slots are free, so a refusal means it could not carry
    `clients` transfers, never that a client asked again before the firmware had taken its
    previous transfer's last ACK (the race run_concurrent's back-to-back clients can hit).
    Returns what went wrong, or None."""
    deadline = time.monotonic() + seconds
    for rnd in range(MAX_FETCHES_PER_CLIENT):
        over = fw.transfers_over()
        threads = [
            threading.Thread(
                target=results.fetch,
                args=(client, fw, "concurrent", blksize, rnd, i),
                daemon=True,
            )
            for i in range(clients)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        mine = [f for f in results.select(fw.name, "concurrent") if f.rep == rnd]
        if len(mine) < clients or not all(f.ok for f in mine) or STOPPING.is_set():
            return None  # the failed transfers say what went wrong
        wait_until = time.monotonic() + client.timeout
        while fw.transfers_over() < over + clients and time.monotonic() < wait_until:
            if not fw.running():
                return None
            time.sleep(0.01)
        if fw.transfers_over() < over + clients:
            return f"round {rnd}: the firmware did not report its {clients} transfers over"
        if time.monotonic() >= deadline:
            return None
    return None


# --- the report -----------------------------------------------------------------------------


def timing_row(
    name: str, fetches: list[Fetch], size: int, problem: str | None = None
) -> tuple[str, dict]:
    """One table row: how many transfers succeeded and failed, and the successful ones' median,
    minimum and p90 seconds, and throughput at the median."""
    times = [f.seconds for f in fetches if f.ok and f.seconds is not None]
    bad = sum(1 for f in fetches if not f.ok)
    if not times:
        why = f"not serving: {problem}" if problem and not fetches else "no successful transfer"
        return f"  {name:<11} {0:>4} {bad:>4}   ({why})", {"ok": 0, "bad": bad}
    med = statistics.median(times)
    d = {
        "ok": len(times),
        "bad": bad,
        "median_s": med,
        "min_s": min(times),
        "p90_s": percentile(times, 0.9),
        "mb_per_s": size / med / 1e6 if med > 0 else math.inf,
    }
    line = (
        f"  {name:<11} {d['ok']:>4} {bad:>4} {med:>9.4f} {d['min_s']:>9.4f} "
        f"{d['p90_s']:>9.4f} {d['mb_per_s']:>8.2f}"
    )
    return line, d


TABLE_HEAD = (
    f"  {'server':<11} {'ok':>4} {'bad':>4} {'median_s':>9} {'min_s':>9} {'p90_s':>9} {'MB/s':>8}"
)


RATIO_PAIRS = (
    ("firmware", "tftp-hpa"),
    ("firmware", "dnsmasq"),
    ("firmware", "controller"),
    ("controller", "tftp-hpa"),
    ("controller", "dnsmasq"),
    *((name, "dnsmasq") for name in REFERENCES),
)


# Issue 17's goals for the firmware, printed after the ratios they are about and never asserted
# (a shared machine's figures are for reading): one transfer at a time, its median time at most
# this many times dnsmasq's, by block size; with CONCURRENT_GOAL[0] clients at once, its
# aggregate throughput at least CONCURRENT_GOAL[1] of tftp-hpa's.
LOCK_STEP_GOALS = {1468: 1.2, 512: 1.5}
CONCURRENT_GOAL = (4, 0.8)


def ratio_lines(
    stats: dict[str, dict],
    servers: list[str],
    key: str = "median_s",
    goal: tuple[str, float] | None = None,
) -> tuple[list[str], dict]:
    """Ratios of median seconds per transfer (key "median_s"), or of aggregate throughput
    (key "aggregate_mb_per_s", the concurrent phase's): the firmware over each peer in the
    run, and the controller over tftp-hpa and dnsmasq. Keys: the peer for the firmware's
    ratios, "a/b" for the others. goal: (peer, bound): the firmware's ratio to that peer is
    followed by whether it is within the bound (at most it for times, at least for
    throughput)."""
    out, ratios = [], {}
    if key == "median_s":
        label, what, worse = "ratio", "median time", "> 1"
    else:
        label, what, worse = "aggregate", "all bytes / wall time", "< 1"
    for a, b in RATIO_PAIRS:
        if a not in servers or b not in servers:
            continue
        mine = stats.get(a, {}).get(key) or None  # an aggregate of 0: nothing came through
        other = stats.get(b, {}).get(key) or None
        if mine is None or other is None:
            who = a if mine is None else b
            who = "the firmware" if who == "firmware" else who
            out.append(f"  {label} {a}/{b}: n/a ({who} had no successful transfer)")
            continue
        ratios[b if a == "firmware" else f"{a}/{b}"] = mine / other
        who = "the firmware" if a == "firmware" else f"the {a}"
        line = f"  {label} {a}/{b}: {mine / other:.2f} ({what}; {worse}: {who} is slower)"
        if goal is not None and a == "firmware" and b == goal[0]:
            bound = goal[1]
            r = round(mine / other, 2)  # as printed
            if key == "median_s":
                sign, met = "<=", r <= bound
            else:
                sign, met = ">=", r >= bound
            line += f"; goal {sign} {bound}: {'met' if met else 'MISSED'}"
        out.append(line)
    return out, ratios


def heap_report(
    heap: str,
    phases: list[tuple[str, str, dict]],
    goals: tuple[int, int | None, str] | None = HEAP_GOALS[(64, False)],
) -> tuple[list[str], dict]:
    """The firmware's heap figures per phase, (label, key, Firmware.heap_figures()), against
    the design's goals for the MicroPython it ran on (HEAP_GOALS; None: it has none). Only what
    the firmware's own events say; nothing is estimated."""
    size = sim.parse_heap(heap)
    lines = [f"firmware heap (-X heapsize={heap} = {size} B; 1 KB = 1024 B)"]
    out: dict = {"heap_bytes": size}
    tops = []
    for label, key, fig in phases:
        code, peak = fig.get("code"), fig.get("peak")
        if code is None:
            lines.append(f"  {label}: the firmware did not boot, nothing measured")
            out[key] = {"booted": False}
            continue
        tops.append(peak if peak is not None else code)
        if peak is None:
            lines.append(
                f"  {label}: code {code} B = {kb(code)}; no heap event: the live heap never "
                f"rose by the firmware's reporting step above code when the 1 s sampler looked"
            )
            out[key] = {"booted": True, "code": code, "peak": None, "data": None}
            continue
        data = peak - code
        lines.append(
            f"  {label}: code {code} B = {kb(code)}, peak {peak} B, data high-water "
            f"(peak - code) {data} B = {kb(data)}, goal <= {kb(DATA_GOAL)}: "
            f"{'met' if data <= DATA_GOAL else 'MISSED'}"
        )
        out[key] = {"booted": True, "code": code, "peak": peak, "data": data}
    if tops:
        top = max(tops)
        remark = (
            "live objects after a collection; the heap also needs room for garbage between "
            "collections"
        )
        if goals is None:
            verdict = f"no goal for this MicroPython ({remark})"
        else:
            goal, aim, about = goals
            verdict = f"goal {kb(goal)} {'met' if top <= goal else 'MISSED'}"
            if aim is not None:
                verdict += f", aim {kb(aim)} {'met' if top <= aim else 'missed'}"
            if (goal, aim) != (HEAP_GOAL, HEAP_AIM):
                remark = f"{about}; {remark}"
            verdict += f" ({remark})"
        lines.append(f"  peak live heap {top} B = {kb(top)}: {verdict}")
        out["peak_live"] = top
    return lines, out


def heap_size(n: int) -> str:
    """A heap size as -X heapsize takes it: 48k, or bytes when not whole kilobytes."""
    return f"{n // KB}k" if n % KB == 0 else str(n)


def smallest_working(lo: int, hi: int, step: int, works: Callable[[int], bool]) -> int | None:
    """The smallest heap size for which works() holds, by bisection among the multiples of step
    from lo up to hi, and hi itself, which is tried first; None when hi does not work. Assumes
    that what works at one size works at every larger one: each size tried is printed, so a run
    that contradicts it shows."""
    sizes = list(range(-(-lo // step) * step, hi, step)) + [hi]
    if not works(sizes[-1]):
        return None
    failing, working = -1, len(sizes) - 1  # -1: below lo, taken as failing without a try
    while working - failing > 1:
        mid = (failing + working) // 2
        if works(sizes[mid]):
            working = mid
        else:
            failing = mid
    return sizes[working]


# --- the run --------------------------------------------------------------------------------


def check_tools(args: argparse.Namespace) -> None:
    if os.geteuid() != 0:
        raise SetupError("needs root: the bench creates a network namespace")
    tools = ("ip", "ss", "curl", "in.tftpd", "dnsmasq") + (("atftp",) if args.windowsize else ())
    for tool in tools:
        if not shutil.which(tool):
            raise SetupError(f"{tool} not found (tools/setup installs it)")
    if not (Path(sys.executable).parent / "bastion").is_file():
        raise SetupError(f"no bastion next to {sys.executable} (tools/setup installs it)")


def micropython_of(args: argparse.Namespace) -> MicroPython:
    """The MicroPython that runs the firmware: --micropython-frozen, --micropython or the unix
    port installed with bastion."""
    if args.micropython_frozen:
        return describe_micropython(args.micropython_frozen, frozen=True)
    path = args.micropython
    if path is None:
        try:
            path = sim.micropython_bin()
        except sim.SimError as e:
            raise SetupError(str(e)) from None
    return describe_micropython(path, frozen=False)


def source_of(path: Path) -> Source:
    data = path.read_bytes()
    return Source(path, path.name, len(data), hashlib.sha256(data).hexdigest())


def random_file(work: Path, size: int) -> Path:
    """A file of `size` random bytes (the same ones every run: a fixed seed)."""
    import random

    path = work / f"random-{size}.bin"
    path.write_bytes(random.Random(size).randbytes(size))
    return path


def parse_size(text: str) -> int:
    t = text.strip().upper()
    mult = {"K": 1024, "M": 1024 * 1024}.get(t[-1:], 1)
    digits = t[:-1] if t[-1:] in ("K", "M") else t
    if not digits.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size such as 2M, 512K or 4096")
    return int(digits) * mult


def parse_cpu_pair(text: str) -> tuple[int, int]:
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: expected two CPU numbers, such as 1,0")
    return int(parts[0]), int(parts[1])


def lay_out(work: Path, source: Source, heap: str, mp: MicroPython) -> dict[str, Server]:
    """Each server's own copy of the file. The directories are world-readable: tftp-hpa and
    dnsmasq read it after dropping root. The firmware's flash as `bastion sim` lays it out: the
    firmware as .mpy, board.json, main.py, device.json, tftp/; with the firmware frozen into mp,
    all of that but the firmware."""
    work.chmod(0o755)
    servers: dict[str, Server] = {}
    flash = work / "flash"
    sim.install_firmware(flash, frozen=mp.frozen)
    if not mp.frozen:
        problem = mpy_problem(mp, flash / "firmware" / "main.mpy")
        if problem:
            raise SetupError(problem)
    (flash / "device.json").write_text(json.dumps(firmware_config()))
    site = work / "controller-site"
    site.mkdir()
    (site / "site.yaml").write_text("site: bench\n")
    roots = {
        "firmware": flash / "tftp",
        "tftp-hpa": work / "tftp-hpa",
        "dnsmasq": work / "dnsmasq",
        "controller": site / "tftp",
        "reference": work / "reference",
    }
    for root in roots.values():
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o755)
        dest = root / source.name
        shutil.copyfile(source.path, dest)
        dest.chmod(0o644)
    servers["firmware"] = Firmware(PORTS["firmware"], flash, heap, work / "firmware.log", mp.path)
    for name in ("tftp-hpa", "dnsmasq", "controller"):
        servers[name] = Server(name, PORTS[name], log=work / f"{name}.log")
    for name in REFERENCES:  # on the firmware's MicroPython, at its heap
        servers[name] = Reference(name, PORTS[name], log=work / f"{name}.log", heap=heap,
                                  micropython=None if mp.frozen else mp.path)  # fmt: skip
    return servers


def reference_command(server: Reference, root: Path) -> list[str]:
    mode = server.name.removeprefix("mp-")
    repo = sim.FIRMWARE_SRC.parent  # whose firmware/ the engine and shell modes import
    heap = f"heapsize={sim.parse_heap(server.heap)}"
    mp = server.micropython or sim.micropython_bin()
    return [mp, "-X", heap, str(REFERENCE_SCRIPT), mode, str(root), str(server.port), str(repo)]


# --pin: (the servers' CPU, the clients' CPU), or None to leave placement to the scheduler.
PIN: tuple[int, int] | None = None
# --one-cpu: the lock-step fetches made again with the client on the servers' CPU
ONE_CPU = "one-cpu"


def _client_pin(phase: str) -> tuple[str, ...]:
    if PIN is None:
        return ()
    return ("taskset", "-c", str(PIN[0] if phase == ONE_CPU else PIN[1]))


def start_server(ns: Namespace, server: Server, work: Path) -> None:
    if isinstance(server, Firmware):
        server.start(ns)
    else:
        assert server.log is not None
        root = work / server.name
        if server.name == "tftp-hpa":
            cmd = tftp_hpa_command(root, server.port)
        elif server.name == "controller":
            cmd = controller_command(work / "controller-site", work, server.port)
        elif isinstance(server, Reference):
            cmd = reference_command(server, work / "reference")
        else:
            cmd = dnsmasq_command(root, work)
        server.proc = ns.start(cmd, name=server.name, log=server.log)
    assert server.proc is not None
    where = ""
    if PIN is not None:  # before it serves: the children tftp-hpa forks inherit it
        os.sched_setaffinity(server.proc.pid, {PIN[0]})
        where = f", CPU {','.join(map(str, sorted(os.sched_getaffinity(server.proc.pid))))}"
    print(f"  {server.name}: pid {server.proc.pid}, {HOST}:{server.port}{where}", flush=True)
    wait_serving(ns, server)


def curl_version() -> str:
    r = subprocess.run(["curl", "--version"], check=False, capture_output=True, text=True)
    return r.stdout.split("\n", 1)[0].split(" (")[0] if r.returncode == 0 else "curl"


def firmware_revision() -> str:
    """The git commit the firmware came from, and whether firmware/ differs from it."""
    repo = sim.FIRMWARE_SRC.parent
    head = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
        check=False,
        capture_output=True,
        text=True,
    )
    if head.returncode != 0:
        return "not a git checkout"
    dirty = subprocess.run(
        ["git", "-C", str(repo), "status", "--porcelain", "--", "firmware"],
        check=False,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return f"git {head.stdout.strip()}" + (" + uncommitted changes in firmware/" if dirty else "")


@dataclass
class Bench:
    """One run: what it serves, who serves it, and what it measured."""

    args: argparse.Namespace
    ns: Namespace
    work: Path
    source: Source
    servers: dict[str, Server]
    client: Client
    micropython: MicroPython
    results: Results = field(default_factory=Results)
    walls: dict[str, float] = field(default_factory=dict)  # concurrent phase, per server
    granted: dict[str, int | None] = field(default_factory=dict)  # largest window, per server
    single_heap: dict = field(default_factory=dict)
    conc_heap: dict | None = None
    # The firmware's counters at the end of each phase (it boots afresh for the concurrent one)
    fw_counters: dict[str, dict[str, int] | None] = field(default_factory=dict)
    probes: list[Probe] = field(default_factory=list)  # --min-heap, in the order tried
    min_heap: int | None = None  # the smallest heap that worked, once --min-heap has run

    @property
    def names(self) -> list[str]:
        return self.args.servers

    @property
    def peers(self) -> list[str]:
        """The servers but the lock-step references: those of the windowed and concurrent
        phases."""
        return [name for name in self.args.servers if name not in REFERENCES]

    @property
    def firmware(self) -> Firmware:
        fw = self.servers["firmware"]
        assert isinstance(fw, Firmware)
        return fw


def set_up(args: argparse.Namespace, ns: Namespace, work: Path) -> Bench:
    mp = micropython_of(args)
    source = source_of(random_file(work, args.size) if args.size else args.file)
    servers = lay_out(work, source, args.heap, mp)
    ns.create()
    print(f"bench: namespace {ns.name} (loopback only), work directory {work}", flush=True)
    for name in args.servers:
        start_server(ns, servers[name], work)
    return Bench(args, ns, work, source, servers, Client(ns, source, args.timeout, work), mp)


def sequential_phase(b: Bench) -> None:
    args, r = b.args, b.results
    for name in b.names:  # warm-up (page cache, first-use paths): checked, not timed
        r.fetch(b.client, b.servers[name], "warm-up", args.blksize[0], 0)
    for rep in range(args.reps):
        for blksize in args.blksize:
            for name in rotated(tuple(b.names), rep):
                r.fetch(b.client, b.servers[name], "sequential", blksize, rep)
            if args.one_cpu:
                for name in rotated(tuple(b.names), rep):
                    r.fetch(b.client, b.servers[name], ONE_CPU, blksize, rep)
        if args.windowsize:
            for name in rotated(tuple(b.peers), rep):
                r.fetch(b.client, b.servers[name], "windowed", args.blksize[0], rep,
                        window=args.windowsize)  # fmt: skip
        print(f"  rep {rep + 1}/{args.reps} done", flush=True)
    if "firmware" in b.names:
        b.single_heap = b.firmware.heap_figures()
        b.fw_counters["sequential"] = b.firmware.counters()
    if args.windowsize:
        b.granted = granted_windows(b)


def granted_windows(b: Bench) -> dict[str, int | None]:
    """The largest window each server granted, from its own `tftp` start events (the firmware's
    on its stdout, the controller's in its event history); None for tftp-hpa and dnsmasq,
    which have no windowsize and tell nothing."""
    out: dict[str, int | None] = {}
    for name in b.peers:
        windows: list[int] = []
        if name == "firmware":
            windows = [
                e.get("window", 1) for e in b.firmware.events
                if e.get("ev") == "tftp" and e.get("stage") == "start"
            ]  # fmt: skip
        elif name == "controller":
            db = b.work / "controller-events.db"
            with (
                contextlib.suppress(sqlite3.Error),
                contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con,
            ):
                rows = con.execute("SELECT payload FROM events WHERE kind = 'tftp'").fetchall()
                starts = [json.loads(p) for (p,) in rows]
                windows = [e.get("window", 1) for e in starts if e.get("stage") == "start"]
        out[name] = max(windows) if windows else None
    return out


def concurrent_phase(b: Bench) -> None:
    args = b.args
    blk = args.blksize[0]
    print(
        f"  {args.concurrent} concurrent clients, blksize {blk}, "
        f"{args.concurrent_seconds:g} s per server ...",
        flush=True,
    )
    for name in b.peers:
        if name == "firmware":  # a fresh boot, so the heap peak belongs to this phase alone
            b.firmware.stop()
            start_server(b.ns, b.firmware, b.work)
        b.walls[name] = run_concurrent(
            b.client, b.results, b.servers[name], args.concurrent, args.concurrent_seconds, blk
        )
        if name == "firmware":
            time.sleep(0.2)  # the reader thread: the last heap event
            b.conc_heap = b.firmware.heap_figures()
            b.fw_counters["concurrent"] = b.firmware.counters()
        # A server can come out of a burst alive but no longer serving (short of memory, a
        # slot lost): one more transfer, alone, says whether it still does.
        b.results.fetch(b.client, b.servers[name], "after-burst", blk, 0)


@dataclass
class Probe:
    """The firmware at one heap size in --min-heap: booted with all its services, then the
    concurrent clients for --concurrent-seconds, then one transfer alone."""

    heap: int
    booted: bool = False
    problem: str | None = None  # why it did not boot or stopped serving
    ok: int = 0  # concurrent transfers that came back whole
    tried: int = 0
    after_ok: bool = False  # the transfer alone, after them
    code: int | None = None
    peak: int | None = None
    refused: list[str] = field(default_factory=list)  # the firmware's reasons, as it said them

    @property
    def works(self) -> bool:
        return self.booted and self.problem is None and 0 < self.tried == self.ok and self.after_ok

    def describe(self) -> str:
        head = f"{heap_size(self.heap):>5} ({self.heap} B): "
        if not self.booted:
            return head + f"does not boot: {self.problem}"
        figures = f"code {kb(self.code or 0)}" + (f", peak {kb(self.peak)}" if self.peak else "")
        if self.works:
            return head + f"works: {self.ok} of {self.tried} ok, then one alone; {figures}"
        why = f"; {self.problem}" if self.problem else ""
        if self.refused:
            reasons = ", ".join(sorted(set(self.refused)))
            why += f"; the firmware refused {len(self.refused)} ({reasons})"
        alone = "ok" if self.after_ok else "FAILED"
        return (
            head
            + f"FAILS: {self.ok} of {self.tried} ok, one alone after them {alone}{why}; {figures}"
        )


def probe_heap(b: Bench, size: int) -> Probe:
    """The firmware restarted at heap `size`: does it boot every service and serve
    --concurrent transfers at once, then one alone? Its failures are the probe's, not the
    run's: recorded here, neither printed as FAILED nor counted in the result."""
    args, fw = b.args, b.firmware
    blk = args.blksize[0]
    probe = Probe(size)
    fw.stop()
    fw.heap, fw.quiet = str(size), True
    kept = list(fw.problems)
    results = Results(quiet=True)
    try:
        start_server(b.ns, fw, b.work)
        boot = fw.boot_event() or {}
        services = boot.get("services") or []
        if fw.problem is None and not {"dhcp", "tftp"} <= set(services):
            fw.fail(f"boot event without dhcp and tftp among its services: {boot}")
        probe.booted = fw.problem is None
        lost = None
        if probe.booted:
            lost = run_rounds(b.client, results, fw, args.concurrent, args.concurrent_seconds, blk)
            results.fetch(b.client, fw, "after-burst", blk, 0)
            time.sleep(0.2)  # the reader thread: the last heap event
        conc = results.select("firmware", "concurrent")
        after = results.select("firmware", "after-burst")
        probe.tried, probe.ok = len(conc), sum(1 for f in conc if f.ok)
        probe.after_ok = bool(after) and all(f.ok for f in after)
        if fw.problem is not None:
            probe.problem = fw.problem
        elif lost is not None:
            probe.problem = lost
        else:
            bad = next((f for f in conc + after if not f.ok), None)
            if bad is not None:
                what = "round" if bad.phase == "concurrent" else "alone"
                probe.problem = f"{what} #{bad.rep}: {bad.error or bad.corrupt}"
        figures = fw.heap_figures()
        probe.code, probe.peak = figures["code"], figures["peak"]
        probe.refused = [
            str(e.get("reason")) for e in list(fw.events)
            if e.get("ev") == "tftp" and e.get("stage") in ("refused", "dropped")
        ]  # fmt: skip
    finally:
        fw.problems[:] = kept
        fw.problem, fw.quiet, fw.heap = None, False, args.heap
    return probe


def min_heap_phase(b: Bench) -> None:
    """The smallest -X heapsize at which the firmware boots all its services and serves
    --concurrent transfers at once, by bisection between MIN_HEAP and --heap."""
    args = b.args
    top = sim.parse_heap(args.heap)
    print(
        f"  smallest heap: bisection from {heap_size(MIN_HEAP)} to {args.heap} in steps of "
        f"{heap_size(args.min_heap_step)}, {args.concurrent} concurrent clients for "
        f"{args.concurrent_seconds:g} s at each ...",
        flush=True,
    )

    def works(size: int) -> bool:
        probe = probe_heap(b, size)
        b.probes.append(probe)
        print(f"    {probe.describe()}", flush=True)
        return probe.works

    b.min_heap = smallest_working(MIN_HEAP, top, args.min_heap_step, works)


def min_heap_report(b: Bench) -> tuple[list[str], dict]:
    args, mp = b.args, b.micropython
    goals = mp.goals()
    found = b.min_heap
    what = (f"smallest -X heapsize at which the firmware boots all its services and "
            f"{args.concurrent} concurrent transfers complete (then one alone)")  # fmt: skip
    if found is None:
        line = f"  {what}: none up to {args.heap}"
    else:
        line = f"  {what}: {heap_size(found)} ({found} B, to {heap_size(args.min_heap_step)})"
    if goals is not None:
        goal, _, about = goals
        met = found is not None and found <= goal
        line += f"; goal {heap_size(goal)} ({about}): {'met' if met else 'MISSED'}"
    else:
        line += "; no goal for this MicroPython"
    out = {
        "found": found,
        "step": args.min_heap_step,
        "goal": goals[0] if goals else None,
        "probes": [asdict(p) | {"works": p.works} for p in b.probes],
    }
    return [line], out


def report(b: Bench) -> dict:
    """Prints the tables and verdicts; returns the same as a dict (for --json)."""
    args, results, size = b.args, b.results, b.source.size
    summary: dict = {"sequential": {}, "windowed": {}, "concurrent": {}}
    print()
    lock_step = [("sequential", "")]
    if args.one_cpu:
        assert PIN is not None
        lock_step.append((ONE_CPU, f" on one CPU (curl on the servers' CPU {PIN[0]})"))
        summary[ONE_CPU] = {}
    for phase, where in lock_step:
        for blksize in args.blksize:
            print(f"blksize {blksize}{where}: seconds per transfer (curl time_total), "
                  f"{args.reps} reps")  # fmt: skip
            print(TABLE_HEAD)
            stats = {}
            for name in b.names:
                fetches = results.select(name, phase, blksize)
                line, stats[name] = timing_row(name, fetches, size, b.servers[name].problem)
                print(line)
            goal = ("dnsmasq", LOCK_STEP_GOALS[blksize]) if blksize in LOCK_STEP_GOALS else None
            lines, ratios = ratio_lines(stats, b.names, goal=goal)
            for line in lines:
                print(line)
            summary[phase][str(blksize)] = {"servers": stats, "ratios": ratios}
    if args.windowsize:
        blk = args.blksize[0]
        print(
            f"windowsize {args.windowsize} asked, blksize {blk}: seconds per transfer (atftp, "
            f"wall time with its start-up), {args.reps} reps"
        )
        print(TABLE_HEAD)
        stats = {}
        for name in b.peers:
            fetches = results.select(name, "windowed", blk)
            line, stats[name] = timing_row(name, fetches, size, b.servers[name].problem)
            print(line)
        lines, ratios = ratio_lines(stats, b.peers)
        for line in lines:
            print(line)
        print("  " + granted_line(b.granted))
        summary["windowed"] = {
            "window": args.windowsize,
            "blksize": blk,
            "servers": stats,
            "ratios": ratios,
            "granted": b.granted,
        }
    if args.concurrent:
        print(
            f"{args.concurrent} concurrent clients, blksize {args.blksize[0]}: seconds per "
            f"transfer, {args.concurrent_seconds:g} s per server; aggr = all bytes / wall time"
        )
        print(TABLE_HEAD + f" {'aggr MB/s':>10}")
        stats = {}
        for name in b.peers:
            fetches = results.select(name, "concurrent")
            line, stats[name] = timing_row(name, fetches, size, b.servers[name].problem)
            wall = b.walls.get(name, 0.0)
            good = sum(f.size for f in fetches if f.ok)
            stats[name]["aggregate_mb_per_s"] = good / wall / 1e6 if wall else 0.0
            print(line + f" {stats[name]['aggregate_mb_per_s']:>10.2f}")
        lines, ratios = ratio_lines(stats, b.peers)
        clients, bound = CONCURRENT_GOAL
        goal = ("tftp-hpa", bound) if args.concurrent == clients else None
        agg_lines, agg_ratios = ratio_lines(stats, b.peers, "aggregate_mb_per_s", goal)
        for line in lines + agg_lines:
            print(line)
        summary["concurrent"] = {
            "clients": args.concurrent,
            "blksize": args.blksize[0],
            "seconds": args.concurrent_seconds,
            "servers": stats,
            "ratios": ratios,
            "aggregate_ratios": agg_ratios,
        }
    if "firmware" in b.names:
        phases = [("sequential phase (1 transfer at a time)", "sequential", b.single_heap)]
        if args.concurrent:
            label = f"concurrent phase ({args.concurrent} transfers at once)"
            phases.append((label, "concurrent", b.conc_heap or {}))
        goals = b.micropython.goals()
        lines, summary["firmware_heap"] = heap_report(args.heap, phases, goals)
        print("\n".join(lines))
        if args.concurrent:
            conc = results.select("firmware", "concurrent")
            after = results.select("firmware", "after-burst")
            good = sum(1 for f in conc if f.ok)
            works = bool(conc) and good == len(conc) and b.firmware.problem is None
            why = f"; {b.firmware.problem}" if b.firmware.problem else ""
            serving = bool(after) and all(f.ok for f in after)
            print(
                f"  {args.concurrent} concurrent transfers at heap {args.heap}: "
                f"{'work' if works else 'FAIL'} ({good} of {len(conc)} ok{why}); "
                f"a transfer after them: {'ok' if serving else 'FAILED'}"
            )
            summary["firmware_heap"]["concurrent_work"] = works
            summary["firmware_heap"]["serving_after_burst"] = serving
        for phase, counters in b.fw_counters.items():
            print(f"  TFTP counters, {phase} phase: {tftp_counters_line(counters)}")
        summary["firmware_counters"] = b.fw_counters
        if args.min_heap:
            lines, summary["firmware_heap"]["min_heap"] = min_heap_report(b)
            print("\n".join(lines))
    problems = {s.name: s.problems for s in b.servers.values() if s.name in b.names and s.problems}
    skipped = sum(results.skipped.values())
    summary.update(
        transfers=len(results.fetches),
        failed=results.failed,
        corrupt=results.corrupt,
        skipped=dict(results.skipped),
        server_problems=problems,
        fetches=[asdict(f) for f in results.fetches],
    )
    print(
        f"\nresult: {len(results.fetches)} transfers, {results.failed} failed, "
        f"{results.corrupt} corrupt"
        + (f"; {skipped} not tried (server not serving)" if skipped else "")
    )
    return summary


# The firmware's TFTP counters the bench prints: transfers, and what became of requests that
# found no slot or no heap (docs/device.md, "No slot: it waits"). A request that is neither
# started nor waiting costs its client a retransmission timeout, seconds.
TFTP_COUNTERS = ("ok", "failed", "queued", "busy", "low_memory", "no_memory", "evicted", "resend")


def tftp_counters_line(counters: dict[str, int] | None) -> str:
    if counters is None:
        return "not read (its console did not answer)"
    return ", ".join(f"{name} {counters.get('tftp.' + name, 0)}" for name in TFTP_COUNTERS)


def granted_line(granted: dict[str, int | None]) -> str:
    parts = []
    for name, w in granted.items():
        if name in ("tftp-hpa", "dnsmasq"):
            parts.append(f"{name} none (no windowsize: lock-step)")
        else:
            parts.append(f"{name} {w if w is not None else 'unknown (no start event)'}")
    return "largest window granted (the servers' own start events): " + ", ".join(parts)


def run(args: argparse.Namespace, ns: Namespace, work: Path) -> int:
    b = set_up(args, ns, work)
    load = os.getloadavg()
    boot = (b.firmware.boot_event() or {}) if "firmware" in args.servers else {}
    mp = b.micropython
    revision = firmware_revision()
    if mp.frozen:  # which commit was frozen into the binary, it does not say
        revision = f"frozen into the binary; this tree: {revision}"
    header = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "file": str(b.source.path),
        "size": b.source.size,
        "sha256": b.source.sha256,
        "client": curl_version(),
        "firmware": f"{boot.get('version', '?')} ({revision})"
        if "firmware" in args.servers
        else "not in this run",
        "micropython": {
            "path": mp.path,
            "bits": mp.bits,
            "mpy": mp.mpy,
            "abi": str(mp.abi),
            "version": mp.version,
            "frozen": mp.frozen,
        },
        "heap": args.heap,
        "reps": args.reps,
        "cpus": os.cpu_count(),
        "pin": None if PIN is None else {
            "servers": PIN[0],
            "clients": PIN[1],
            "one_cpu": args.one_cpu,
        },
        "load_at_start": round(load[0], 2),
    }
    if PIN is None:
        placement = "not pinned"
    elif PIN[0] == PIN[1]:
        placement = f"servers and clients (curl, atftp) all pinned to CPU {PIN[0]}"
    else:
        placement = f"servers pinned to CPU {PIN[0]}, clients (curl, atftp) to CPU {PIN[1]}"
        if args.one_cpu:
            placement += f"; each lock-step fetch also with curl on CPU {PIN[0]}"
    print(
        f"TFTP bench {header['date']}: {b.source.name} ({b.source.size} bytes, sha256 "
        f"{b.source.sha256[:16]}...), {header['client']}\n"
        f"  firmware {header['firmware']}, heap {args.heap}; {args.reps} reps per block size, "
        f"interleaved; {header['cpus']} CPUs ({placement}), load average {load[0]:.2f}\n"
        f"  micropython {mp.describe()}",
        flush=True,
    )
    sequential_phase(b)
    if args.concurrent:
        concurrent_phase(b)
    if args.min_heap:
        min_heap_phase(b)
    summary = {**header, **report(b), "load_at_end": round(os.getloadavg()[0], 2)}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    clean = not (summary["failed"] or summary["corrupt"] or summary["server_problems"])
    if args.min_heap and b.min_heap is None:
        clean = False  # not even --heap held the firmware and its transfers
    return 0 if clean else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark the firmware's TFTP server (MicroPython unix port) against "
        "tftp-hpa and dnsmasq, and report its heap. Needs root: everything runs on loopback "
        "in a network namespace the bench creates and deletes. Stops by itself.",
    )
    p.add_argument(
        "--reps",
        type=int,
        default=10,
        help="timed transfers per server and block size (default 10)",
    )
    p.add_argument("--heap", default="128k", help="the firmware's MicroPython heap (default 128k)")
    p.add_argument(
        "--blksize",
        type=lambda s: [int(x) for x in parse_list(s)],
        default=[1468, 512],
        help="block sizes curl asks for, comma-separated; the first is also used for the "
        "concurrent phase (default 1468,512)",
    )
    p.add_argument(
        "--windowsize",
        type=int,
        default=64,
        help="windowsize (RFC 7440) atftp asks for in the windowed fetches, at the first "
        "--blksize; 0 skips them (default 64, the controller's max_window)",
    )
    p.add_argument(
        "--concurrent",
        type=int,
        default=4,
        help="clients at once in the concurrent phase; 0 skips it (default 4, the firmware's "
        "tftp.max_transfers)",
    )
    p.add_argument(
        "--concurrent-seconds",
        type=float,
        default=5.0,
        help="how long each server gets the concurrent clients (default 5; the firmware samples "
        "its heap once a second)",
    )
    p.add_argument(
        "--servers",
        type=parse_list,
        default=list(DEFAULT_SERVERS),
        help=f"which servers, comma-separated, of {','.join(SERVERS)} (default "
        f"{','.join(DEFAULT_SERVERS)}; controller: `bastion serve --tftp`; mp-*: lock-step "
        "reference servers on the firmware's MicroPython and heap, each one more layer of the "
        "firmware than the one before (tools/bench/tftp_reference.py), timed in the lock-step "
        "phase only)",
    )
    p.add_argument(
        "--file", type=Path, default=DEFAULT_FILE, help=f"the file served (default {DEFAULT_FILE})"
    )
    p.add_argument(
        "--size",
        type=parse_size,
        help="serve a file of this many random bytes made by the bench instead of --file "
        "(e.g. 2M: a Raspberry Pi's RPI_EFI.fd)",
    )
    p.add_argument(
        "--timeout", type=float, default=30.0, help="seconds one transfer may take (default 30)"
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--micropython",
        metavar="PATH",
        help="run the firmware under this MicroPython binary (e.g. a 32-bit build of the unix "
        "port), loading it as .mpy from the flash as `bastion sim` lays it out; its .mpy ABI "
        "must load what mpy-cross writes (default: the unix port installed with bastion)",
    )
    which.add_argument(
        "--micropython-frozen",
        metavar="PATH",
        help="run the firmware frozen into this MicroPython binary: the flash holds only "
        "device.json, board.json, tftp/ and the boot stub main.py",
    )
    p.add_argument(
        "--min-heap",
        action="store_true",
        help="after the other phases, find the smallest -X heapsize (from 16k up to --heap) at "
        "which the firmware boots all its services and rounds of --concurrent transfers at once "
        "complete for --concurrent-seconds, by bisection, restarting it at each size tried",
    )
    p.add_argument(
        "--min-heap-step",
        type=parse_size,
        default=2 * KB,
        metavar="SIZE",
        help="the resolution of --min-heap (default 2k)",
    )
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--keep", action="store_true", help="keep the work directory (server logs)")
    p.add_argument(
        "--pin",
        metavar="SERVER_CPU,CLIENT_CPU",
        type=parse_cpu_pair,
        help="run every server on one CPU and every client (curl, atftp) on another, e.g. 1,0: "
        "each lock-step round trip then crosses between the same two cores for every server, "
        "as between two machines, instead of where the scheduler puts them from run to run; "
        "the same CPU twice, e.g. 1,1, runs servers and clients on that one core, one after "
        "the other: what each server spends per block (default: not pinned)",
    )
    p.add_argument(
        "--one-cpu",
        action="store_true",
        help="with --pin on two CPUs: make each lock-step fetch also with curl on the servers' "
        "CPU, and print those tables and ratios too (\"on one CPU\"): both views in one run",
    )
    args = p.parse_args(argv)
    if args.pin is not None:
        cpus = os.sched_getaffinity(0)
        if not set(args.pin) <= cpus:
            p.error(f"--pin: CPUs of this process's {sorted(cpus)}")
    if args.one_cpu and (args.pin is None or args.pin[0] == args.pin[1]):
        p.error("--one-cpu needs --pin SERVER_CPU,CLIENT_CPU on two CPUs (with one, the whole "
                "run is on one CPU)")  # fmt: skip
    if not 1 <= args.reps <= 1000:
        p.error("--reps must be 1..1000")
    if not args.blksize or any(not 8 <= b <= 65464 for b in args.blksize):
        p.error("--blksize: each must be 8..65464 (RFC 2348)")
    if not 0 <= args.windowsize <= 65535:
        p.error("--windowsize must be 0..65535 (RFC 7440; 0 skips the windowed fetches)")
    if not 0 <= args.concurrent <= 16:
        p.error("--concurrent must be 0..16")
    if not 0.5 <= args.concurrent_seconds <= 600:
        p.error("--concurrent-seconds must be 0.5..600")
    if not 1 <= args.timeout <= 600:
        p.error("--timeout must be 1..600")
    unknown = [s for s in args.servers if s not in SERVERS]
    if unknown or not args.servers or len(set(args.servers)) != len(args.servers):
        p.error(f"--servers: pick from {','.join(SERVERS)}, each once")
    try:
        sim.parse_heap(args.heap)
    except sim.SimError as e:
        p.error(str(e))
    if args.min_heap and "firmware" not in args.servers:
        p.error("--min-heap measures the firmware: --servers must include firmware")
    if args.min_heap and not args.concurrent:
        p.error("--min-heap needs --concurrent transfers to serve (at least 1)")
    if not KB <= args.min_heap_step <= 64 * KB:
        p.error("--min-heap-step must be 1k..64k")
    if args.size is not None and not 1 <= args.size <= 64 * 1024 * 1024:
        p.error("--size must be 1 byte to 64M")
    if args.size is None and not args.file.is_file():
        p.error(f"--file {args.file}: no such file")
    return args


def main(argv: list[str] | None = None) -> int:
    global PIN
    args = parse_args(argv)
    PIN = args.pin
    sys.stdout.reconfigure(line_buffering=True)
    ns = Namespace(f"eb-bench-{os.getpid()}")
    work = Path(tempfile.mkdtemp(prefix="eb-tftp-bench-"))

    def bench() -> int:
        check_tools(args)
        return run(args, ns, work)

    def cleanup() -> None:
        STOPPING.set()
        ns.destroy()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    return run_with_cleanup(bench, cleanup, errors=(SetupError, LabError))


if __name__ == "__main__":
    sys.exit(main())
