"""Network namespaces and the processes run in them: the one place that makes and removes
namespaces and starts and stops processes, for the lab (`bastion lab`), the benchmarks
(tools/bench) and the tests that build a network of their own.

The rules it keeps (the project's network safety rules):
- Nothing is made in the host's namespace. A `Namespace` starts with only `lo` (checked right
  after `ip netns add`, which refuses a name that exists: never someone else's namespace), every
  link is made inside namespaces, and programs enter one with `ip netns exec`, which execs them:
  the PID we hold is the program's own.
- A process is stopped by its PID, and only while that PID is still the process we started. A
  child we hold as a Popen is signalled only until it is reaped (`exited` looks with WNOWAIT, so
  the PID stays ours meanwhile); a PID known from an earlier run (a state file) must still have
  the kernel start time it had then.
- Stopping is a signal (SIGTERM unless told), a grace period, then SIGKILL; for a child that
  leads its own session (`Supervisor.start` makes each one), SIGKILL goes to its whole process
  group, so what it forked (tftp-hpa's per-transfer children, nginx's worker) goes too.
- A namespace is removed with every process still inside it, found by `ip netns pids` and
  stopped by PID, then deleted with its links; `teardown` does that for a lab even after a
  crash. `run_with_cleanup` makes SIGINT, SIGTERM and SIGHUP an interrupt and runs the cleanup
  with them ignored, so a second Ctrl-C cannot cut it short.

A lab `NAME` owns two namespaces: `NAME-lan` (the site LAN: a bridge with the device's and the
controller's addresses, and the nodes' taps) and `NAME-rt` (the home router, on a veth into the
bridge). Its processes are recorded by name, PID and start time in the lab's state file, so that
`bastion lab down` (or the next `up`) stops exactly them.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from bastion import atomic

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_POLL_S = 0.05
_KILL_WAIT_S = 5.0  # how long a SIGKILLed process may take to be gone (bounds every stop)


class LabError(Exception):
    """What keeps a lab, or any network of namespaces, from being set up or run."""


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(list(args), check=False, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise LabError(f"{' '.join(args)}: {r.stderr.strip() or r.stdout.strip()}")
    return r


def namespaces() -> set[str]:
    out = sh("ip", "netns", "list", check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def ns_pids(ns: str) -> list[int]:
    out = sh("ip", "netns", "pids", ns, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


# --- processes by PID --------------------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time) of a process from /proc/PID/stat, None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses: split after the last ")".
    rest = raw[raw.rfind(")") + 2 :].split()
    try:
        return rest[0], int(rest[19])
    except (IndexError, ValueError):
        return None


def start_time(pid: int) -> int | None:
    """The kernel's start time of a process (clock ticks since boot, /proc/PID/stat field 22):
    with its PID, what tells it from a later process that reuses the PID."""
    st = _stat(pid)
    return st[1] if st else None


def _is_ours(pid: int, cmd: list[str] | None, started: int | None = None) -> bool:
    """True if pid is still the live process we started (PIDs are reused).

    With a recorded start time that alone decides (it survives `ip netns exec`'s exec). Without
    one (a state file from an older lab), the program's name must match argv[0] or, for
    interpreted programs such as console scripts (`python3 .../bastion`), argv[1]."""
    st = _stat(pid)
    if st is None or st[0] in ("Z", "X"):
        return False  # gone, or a zombie
    if started is not None:
        return st[1] == started
    if not cmd:
        return True
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    argv = [os.path.basename(a.decode(errors="replace")) for a in raw.split(b"\0")[:2]]
    return os.path.basename(cmd[0]) in argv


def pid_running(pid: int, started: int | None = None) -> bool:
    """Whether pid is a live process (a zombie is not) and, given its start time, still the
    process that had it."""
    return _is_ours(pid, None, started)


def kill_pids(pids: dict[int, int | None], grace: float, sig: int = signal.SIGTERM) -> None:
    """Stop processes known only by PID (pid -> start time, None: take it now): `sig` to each,
    up to `grace` seconds for them all to end, then SIGKILL to those left. Each is signalled
    only while it has that start time. None is reaped here: a child of ours that some Popen
    holds stays that Popen's to reap (a zombie counts as ended)."""

    def gone(pid: int, started: int) -> bool:
        return not _is_ours(pid, None, started)

    started = {pid: s if s is not None else start_time(pid) for pid, s in pids.items()}
    left = {pid: s for pid, s in started.items() if s is not None and not gone(pid, s)}
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    for wait, final in ((grace, signal.SIGKILL), (_KILL_WAIT_S, None)):
        deadline = time.monotonic() + wait
        while True:
            left = {pid: s for pid, s in left.items() if not gone(pid, s)}
            if not left or time.monotonic() >= deadline:
                break
            time.sleep(_POLL_S)
        if final is not None:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, final)


def _exit_seen(proc: subprocess.Popen) -> bool | None:
    """True when proc has exited (and is not reaped yet, or reaped by its Popen), False while it
    runs, None when something else reaped it: its PID may be another process's now."""
    if proc.returncode is not None:
        return True
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return None


def exited(proc: subprocess.Popen) -> bool:
    """Whether proc has exited, without reaping it (WNOWAIT), so its PID stays ours to signal."""
    return _exit_seen(proc) is not False


def stop_process(proc: subprocess.Popen, grace: float = 5.0, sig: int = signal.SIGTERM) -> None:
    """Stop a child we started: `sig`, up to `grace` seconds, then SIGKILL to it and to the
    process group it leads (if it leads one), then reap it. Only ever signals a PID we have not
    reaped: never a stranger's."""
    state = _exit_seen(proc)
    if state is None or proc.returncode is not None:
        return
    if not state:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        deadline = time.monotonic() + grace
        while (state := _exit_seen(proc)) is False and time.monotonic() < deadline:
            time.sleep(_POLL_S)
        if state is None:
            return
        if not state:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
    # Until it is reaped, its PID (and so the id of the group it leads) is still ours.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=_KILL_WAIT_S)


@dataclass
class Supervisor:
    """The processes one program started, each under a name: its PID, command and kernel start
    time. With a `state_file` these are saved (atomically) at every change, so that a later run
    stops exactly them (`bastion lab down` after `up`, or after a crash) and never a process that
    reuses one of their PIDs. `stop` and `stop_all` end them by PID as the module says."""

    state_file: Path | None = None
    pids: dict[str, int] = field(default_factory=dict)
    cmds: dict[str, list[str]] = field(default_factory=dict)
    starts: dict[str, int] = field(default_factory=dict)
    grace: float = 5.0
    # this run's own children, and the signal that asks each to stop
    _procs: dict[str, subprocess.Popen] = field(default_factory=dict, repr=False)
    _signals: dict[str, int] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, state_file: Path) -> Supervisor:
        p = cls(state_file)
        if state_file.exists():
            try:
                d = json.loads(state_file.read_text())
                p.pids = {k: int(v) for k, v in d.get("pids", {}).items()}
                p.cmds = d.get("cmds", {})
                p.starts = {k: int(v) for k, v in d.get("starts", {}).items()}
            except (ValueError, TypeError, AttributeError):
                pass
        return p

    def save(self) -> None:
        if self.state_file is not None:
            atomic.write_json(
                self.state_file, {"pids": self.pids, "cmds": self.cmds, "starts": self.starts}
            )

    def start(self, name: str, cmd: list[str], *, netns: str | None = None,
              log: Path | None = None, stop_signal: int = signal.SIGTERM,
              **popen: object) -> subprocess.Popen:
        """Start cmd (inside namespace `netns` when given) as `name`, stopping the process that
        had the name first. In a session of its own (Ctrl-C on a terminal reaches only this
        program, which stops it), stdin from /dev/null, output appended to `log` when given;
        other keywords go to Popen."""
        if name in self.pids:
            self.stop(name)
        argv = ["ip", "netns", "exec", netns, *cmd] if netns else list(cmd)
        popen.setdefault("stdin", subprocess.DEVNULL)
        popen.setdefault("start_new_session", True)
        if signal.getsignal(stop_signal) == signal.SIG_IGN and "preexec_fn" not in popen:
            # Started in the background by a shell without job control (as CI may run us), we
            # ignore SIGINT, and a child would inherit that through exec and never stop by it.
            popen["preexec_fn"] = lambda: signal.signal(stop_signal, signal.SIG_DFL)
        if log is None:
            proc = subprocess.Popen(argv, **popen)  # type: ignore[call-overload]
        else:
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("ab") as out:
                proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, **popen)  # type: ignore[call-overload]
        return self.adopt(name, proc, list(cmd), stop_signal)

    def adopt(self, name: str, proc: subprocess.Popen, cmd: list[str] | None = None,
              stop_signal: int = signal.SIGTERM) -> subprocess.Popen:
        """Supervise a child started elsewhere (a class that reads its output) as `name`."""
        if name in self.pids:
            self.stop(name)
        self.pids[name] = proc.pid
        self.cmds[name] = cmd if cmd is not None else list(map(str, proc.args))  # type: ignore[arg-type]
        started = start_time(proc.pid)
        if started is not None:
            self.starts[name] = started
        self._procs[name] = proc
        self._signals[name] = stop_signal
        self.save()
        return proc

    def alive(self, name: str) -> bool:
        proc = self._procs.get(name)
        if proc is not None:
            return not exited(proc)
        pid = self.pids.get(name)
        return pid is not None and _is_ours(pid, self.cmds.get(name), self.starts.get(name))

    def stop(self, name: str, grace: float | None = None) -> None:
        grace = self.grace if grace is None else grace
        pid = self.pids.pop(name, None)
        cmd = self.cmds.pop(name, None)
        started = self.starts.pop(name, None)
        proc = self._procs.pop(name, None)
        sig = self._signals.pop(name, signal.SIGTERM)
        if proc is not None:
            stop_process(proc, grace, sig)
        elif pid is not None and _is_ours(pid, cmd, started):
            kill_pids({pid: started}, grace, sig)
        self.save()

    def stop_all(self, grace: float | None = None) -> list[str]:
        """Stop every process, the newest first; returns those that were still running."""
        stopped = []
        for name in reversed(list(self.pids)):
            if self.alive(name):
                stopped.append(f"process {name} ({self.pids[name]})")
            self.stop(name, grace)
        return stopped


def remove_namespace(name: str, grace: float = 3.0) -> list[str]:
    """Stop every process still inside namespace `name` by PID, then delete the namespace (its
    links go with it). Returns what it removed; nothing when there is no such namespace."""
    if name not in namespaces():
        return []
    pids = ns_pids(name)
    kill_pids({pid: None for pid in pids}, grace)
    sh("ip", "netns", "del", name, check=False)
    return [f"process {pid} in {name}" for pid in pids] + [f"namespace {name}"]


# --- a namespace ---------------------------------------------------------------------------------


class Namespace:
    """A network namespace this program makes, and the processes it starts inside it.

    `create` (or `with Namespace(name) as ns:`) makes it with only `lo`, up; `destroy` stops
    the processes it started, then removes the namespace with whatever still runs in it. Links
    come from `ip` (`ns.ip("addr", "add", ...)`) and `veth`."""

    def __init__(self, name: str, grace: float = 5.0):
        self.name = name
        self.created = False
        self.procs = Supervisor(grace=grace)
        self._names = itertools.count()

    def create(self) -> Self:
        sh("ip", "netns", "add", self.name)  # fails if it exists: never adopt someone else's
        self.created = True
        self.ip("link", "set", "lo", "up")
        # The safety argument rests on this: nothing but loopback until we add it.
        links = [ln.split(":")[1].strip() for ln in self.ip("-o", "link").splitlines()]
        if links != ["lo"]:
            raise LabError(f"namespace {self.name} has links {links}, expected only lo")
        return self

    def ip(self, *args: str) -> str:
        """`ip -n NAME args...`; its output. Raises LabError when it fails."""
        return sh("ip", "-n", self.name, *args).stdout

    def veth(self, ifname: str, peer: Namespace, peer_ifname: str) -> None:
        """A veth pair: `ifname` here, `peer_ifname` in `peer` (both down until set up)."""
        self.ip("link", "add", ifname, "type", "veth", "peer", "name", peer_ifname,
                "netns", peer.name)  # fmt: skip

    def argv(self, *cmd: str) -> list[str]:
        # `ip netns exec` execs cmd after joining the namespace: the child's PID is cmd's.
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(self, *cmd: str, **kw) -> subprocess.CompletedProcess:
        """cmd inside the namespace, to its end (subprocess.run's keywords)."""
        return subprocess.run(self.argv(*cmd), check=kw.pop("check", False), **kw)

    def start(self, cmd: list[str], name: str | None = None, **kw) -> subprocess.Popen:
        """cmd inside the namespace, supervised (Supervisor.start's keywords)."""
        name = name or f"{os.path.basename(cmd[0])}-{next(self._names)}"
        return self.procs.start(name, cmd, netns=self.name, **kw)

    def adopt(self, proc: subprocess.Popen, name: str | None = None) -> subprocess.Popen:
        """Supervise a child started elsewhere with `argv(...)`: it is stopped by `destroy`."""
        return self.procs.adopt(name or f"adopted-{next(self._names)}", proc)

    def udp_bound(self, port: int, host: str | None = None) -> bool:
        """Whether a UDP socket in here is bound to port (on host, when given)."""
        where = f"src {host}:{port}" if host else f"sport = :{port}"
        r = self.run("ss", "-H", "-n", "-l", "-u", where, capture_output=True, text=True)
        return r.returncode == 0 and bool(r.stdout.strip())

    def destroy(self, grace: float = 3.0) -> list[str]:
        """Stop what it started, then whatever else runs inside, and delete it. Returns what it
        removed. Safe to call more than once, and after a failed create."""
        removed = self.procs.stop_all()
        if self.created:
            removed += remove_namespace(self.name, grace)
            self.created = False
        return removed

    def __enter__(self) -> Self:
        try:
            return self.create()
        except BaseException:
            self.destroy()
            raise

    def __exit__(self, *exc: object) -> None:
        self.destroy()


# --- interrupts and cleanup ----------------------------------------------------------------------


def _as_interrupt(signum, frame) -> None:
    # Stop as on Ctrl-C, through whichever SIGINT handler is current: asyncio's while
    # asyncio.run() runs (it cancels the main task cleanly), Python's KeyboardInterrupt elsewhere.
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)


def run_with_cleanup(main: Callable[[], int], cleanup: Callable[[], None],
                     errors: tuple[type[Exception], ...] = ()) -> int:  # fmt: skip
    """main()'s exit status, with cleanup() run however main ends.

    While main runs, SIGINT raises KeyboardInterrupt even in a program started in the background
    (where shells ignore it), and SIGTERM and SIGHUP stop it as Ctrl-C does. An interrupt prints
    "interrupted" and gives status 130; one of `errors` (what says the program cannot run here:
    not root, a tool missing, a server that did not start) prints "error: ..." and gives 2.
    cleanup() runs with the three signals ignored, so that a second Ctrl-C cannot cut it short;
    the handlers from before come back afterwards."""
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _as_interrupt)
    try:
        return main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        try:
            cleanup()
        finally:
            for sig, handler in previous.items():
                if handler is not None:
                    signal.signal(sig, handler)


# --- the lab's network ---------------------------------------------------------------------------


@dataclass
class LabNet:
    """Addresses and names of one lab. All addresses exist only inside its namespaces.

    With `management_prefix`, the controller host (the LAN namespace) has a second bridge, the
    management network (docs/network.md): br1 with the controller's management address, an
    operator's namespace (`mgmt`) on it, and a namespace for any other machine on the PXE LAN
    (`pxe_host`, on br0), from which the management side must be out of reach."""

    name: str = "eb"
    prefix: str = "10.77.0"  # the site LAN is prefix.0/24
    management_prefix: str | None = None  # the management network is management_prefix.0/24

    @property
    def lan(self) -> str:
        return f"{self.name}-lan"

    @property
    def router(self) -> str:
        return f"{self.name}-rt"

    @property
    def mgmt(self) -> str:
        return f"{self.name}-mg"

    @property
    def pxe_host(self) -> str:
        return f"{self.name}-px"

    router_ip = property(lambda self: f"{self.prefix}.1")
    device_ip = property(lambda self: f"{self.prefix}.2")
    controller_ip = property(lambda self: f"{self.prefix}.3")
    pxe_host_ip = property(lambda self: f"{self.prefix}.50")  # outside the router's pool
    pool = property(lambda self: (f"{self.prefix}.100", f"{self.prefix}.199"))
    controller_mgmt_ip = property(lambda self: f"{self.management_prefix}.3")
    operator_ip = property(lambda self: f"{self.management_prefix}.10")

    @property
    def namespaces(self) -> tuple[str, ...]:
        extra = (self.mgmt, self.pxe_host) if self.management_prefix else ()
        return (self.lan, self.router, *extra)

    @property
    def ula_prefix(self) -> str:
        """The LAN's IPv6 /64, a unique local one (RFC 4193, fd00::/8) made from the IPv4
        prefix (10.93.0 -> fd0a:5d00::), so that two labs never share it. The router
        advertises it, as a home router does: iPXE waits for a router advertisement (about
        16 s) before it goes on without one."""
        a, b, c = (int(x) for x in self.prefix.split("."))
        return f"fd{a:02x}:{b:02x}{c:02x}::"

    router_ip6 = property(lambda self: f"{self.ula_prefix}1")

    def create(self) -> None:
        lan, rt = Namespace(self.lan).create(), Namespace(self.router).create()
        lan.ip("link", "add", "br0", "type", "bridge")
        # Forward at once: a bridge port waits out STP's forward delay otherwise.
        lan.ip("link", "set", "br0", "type", "bridge", "forward_delay", "0", "stp_state", "0")
        lan.ip("addr", "add", f"{self.device_ip}/24", "dev", "br0")
        lan.ip("addr", "add", f"{self.controller_ip}/24", "dev", "br0")
        lan.ip("link", "set", "br0", "up")
        lan.veth("br-rt", rt, "rt0")
        lan.ip("link", "set", "br-rt", "master", "br0", "up")
        rt.ip("addr", "add", f"{self.router_ip}/24", "dev", "rt0")
        # the /64 the router advertises (dnsmasq --enable-ra needs an address in it); nodad:
        # nothing else on the LAN has it, and DAD would hold the address back for a second
        rt.ip("-6", "addr", "add", f"{self.router_ip6}/64", "dev", "rt0", "nodad")
        rt.ip("link", "set", "rt0", "up")
        # A socket can only send to 255.255.255.255 (proxyDHCP replies) with a route: the
        # router is the LAN's gateway, as at a real site.
        lan.ip("route", "add", "default", "via", self.router_ip)
        if self.management_prefix:
            self._create_management(lan)

    def _create_management(self, lan: Namespace) -> None:
        lan.ip("link", "add", "br1", "type", "bridge")
        lan.ip("link", "set", "br1", "type", "bridge", "forward_delay", "0", "stp_state", "0")
        lan.ip("addr", "add", f"{self.controller_mgmt_ip}/24", "dev", "br1")
        lan.ip("link", "set", "br1", "up")
        for ns_name, port, bridge, ip in ((self.mgmt, "br-mg", "br1", self.operator_ip),
                                          (self.pxe_host, "br-px", "br0", self.pxe_host_ip)):  # fmt: skip
            other = Namespace(ns_name).create()
            lan.veth(port, other, "eth0")
            lan.ip("link", "set", port, "master", bridge, "up")
            other.ip("addr", "add", f"{ip}/24", "dev", "eth0")
            other.ip("link", "set", "eth0", "up")
            other.ip("link", "set", "lo", "up")

    def add_tap(self, tap: str) -> None:
        lan = Namespace(self.lan)
        lan.ip("tuntap", "add", tap, "mode", "tap")
        lan.ip("link", "set", tap, "master", "br0", "up")

    def exists(self) -> bool:
        have = namespaces()
        return any(ns in have for ns in self.namespaces)


def teardown(net: LabNet, procs: Supervisor | None = None) -> list[str]:
    """Remove a lab (or what is left of a killed one). Returns what was removed."""
    removed = procs.stop_all() if procs is not None else []
    # the management bridge's namespaces too: what a killed two-bridge lab of this name left
    for ns in dict.fromkeys((*net.namespaces, net.mgmt, net.pxe_host)):
        removed += remove_namespace(ns)
    return removed
