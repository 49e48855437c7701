"""Network namespaces, links and processes of a lab, and how to remove every trace of them.

A lab `NAME` owns two namespaces: `NAME-lan` (the site LAN: a bridge with the device's and the
controller's addresses, and the nodes' taps) and `NAME-rt` (the home router, on a veth into the
bridge). Nothing is created in the host's namespace, so no lab traffic can reach a real
interface. Every process is started inside a namespace and recorded by PID in the lab's state
file; `teardown` kills the recorded PIDs and every process still inside the namespaces, then
deletes the namespaces (which removes their links).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from bastion import atomic


class LabError(Exception):
    pass


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(list(args), capture_output=True, text=True)
    if check and r.returncode != 0:
        raise LabError(f"{' '.join(args)}: {r.stderr.strip() or r.stdout.strip()}")
    return r


def namespaces() -> set[str]:
    out = sh("ip", "netns", "list", check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def ns_pids(ns: str) -> list[int]:
    out = sh("ip", "netns", "pids", ns, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


@dataclass
class LabNet:
    """Addresses and names of one lab. All addresses exist only inside its namespaces."""

    name: str = "eb"
    prefix: str = "10.77.0"  # the site LAN is prefix.0/24

    @property
    def lan(self) -> str:
        return f"{self.name}-lan"

    @property
    def router(self) -> str:
        return f"{self.name}-rt"

    router_ip = property(lambda self: f"{self.prefix}.1")
    device_ip = property(lambda self: f"{self.prefix}.2")
    controller_ip = property(lambda self: f"{self.prefix}.3")
    pool = property(lambda self: (f"{self.prefix}.100", f"{self.prefix}.199"))

    def create(self) -> None:
        lan, rt = self.lan, self.router
        sh("ip", "netns", "add", lan)
        sh("ip", "netns", "add", rt)
        for ns in (lan, rt):
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", lan, "link", "add", "br0", "type", "bridge")
        # Forward at once: a bridge port waits out STP's forward delay otherwise.
        sh("ip", "-n", lan, "link", "set", "br0", "type", "bridge", "forward_delay", "0", "stp_state", "0")
        sh("ip", "-n", lan, "addr", "add", f"{self.device_ip}/24", "dev", "br0")
        sh("ip", "-n", lan, "addr", "add", f"{self.controller_ip}/24", "dev", "br0")
        sh("ip", "-n", lan, "link", "set", "br0", "up")
        sh("ip", "-n", lan, "link", "add", "rt0", "type", "veth", "peer", "name", "br-rt")
        sh("ip", "-n", lan, "link", "set", "rt0", "netns", rt)
        sh("ip", "-n", lan, "link", "set", "br-rt", "master", "br0", "up")
        sh("ip", "-n", rt, "addr", "add", f"{self.router_ip}/24", "dev", "rt0")
        sh("ip", "-n", rt, "link", "set", "rt0", "up")
        # A socket can only send to 255.255.255.255 (proxyDHCP replies) with a route: the
        # router is the LAN's gateway, as at a real site.
        sh("ip", "-n", lan, "route", "add", "default", "via", self.router_ip)

    def add_tap(self, tap: str) -> None:
        sh("ip", "-n", self.lan, "tuntap", "add", tap, "mode", "tap")
        sh("ip", "-n", self.lan, "link", "set", tap, "master", "br0", "up")

    def exists(self) -> bool:
        have = namespaces()
        return self.lan in have or self.router in have


@dataclass
class Processes:
    """Processes a lab started, by name and PID, persisted in state.json (atomically)."""

    state_file: Path
    pids: dict[str, int] = field(default_factory=dict)
    cmds: dict[str, list[str]] = field(default_factory=dict)
    # Kernel start time (clock ticks since boot, /proc/PID/stat field 22) of each PID: tells a
    # process we started from a later one that reuses its PID, whatever program it runs.
    starts: dict[str, int] = field(default_factory=dict)

    @classmethod
    def load(cls, state_file: Path) -> "Processes":
        p = cls(state_file)
        if state_file.exists():
            try:
                d = json.loads(state_file.read_text())
                p.pids = {k: int(v) for k, v in d.get("pids", {}).items()}
                p.cmds = d.get("cmds", {})
                p.starts = {k: int(v) for k, v in d.get("starts", {}).items()}
            except (ValueError, TypeError):
                pass
        return p

    def save(self) -> None:
        atomic.write_json(
            self.state_file, {"pids": self.pids, "cmds": self.cmds, "starts": self.starts}
        )

    def start(self, key: str, ns: str, cmd: list[str], log: Path, cwd: Path | None = None,
              env: dict | None = None) -> subprocess.Popen:
        log.parent.mkdir(parents=True, exist_ok=True)
        out = open(log, "ab")
        # `ip netns exec` enters the namespace and execs, so the PID is the program's own.
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *cmd],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
        out.close()
        self.pids[key] = proc.pid
        self.cmds[key] = cmd
        started = _start_time(proc.pid)
        if started is not None:
            self.starts[key] = started
        self.save()
        return proc

    def alive(self, key: str) -> bool:
        pid = self.pids.get(key)
        return pid is not None and _is_ours(pid, self.cmds.get(key), self.starts.get(key))

    def stop(self, key: str, timeout: float = 5.0) -> None:
        pid = self.pids.pop(key, None)
        cmd = self.cmds.pop(key, None)
        started = self.starts.pop(key, None)
        if pid is not None and _is_ours(pid, cmd, started):
            _kill(pid, timeout)
        self.save()


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time) of a process from /proc/PID/stat, None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses: split after the last ")".
    rest = raw[raw.rfind(")") + 2:].split()
    try:
        return rest[0], int(rest[19])
    except (IndexError, ValueError):
        return None


def _start_time(pid: int) -> int | None:
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


def _kill(pid: int, timeout: float) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                return
        except ChildProcessError:
            if not Path(f"/proc/{pid}").exists():
                return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def teardown(net: LabNet, procs: Processes | None = None) -> list[str]:
    """Remove a lab (or what is left of a killed one). Returns what was removed."""
    removed = []
    if procs is not None:
        for key in list(procs.pids):
            if procs.alive(key):
                removed.append(f"process {key} ({procs.pids[key]})")
            procs.stop(key)
    have = namespaces()
    for ns in (net.lan, net.router):
        if ns not in have:
            continue
        for pid in ns_pids(ns):
            removed.append(f"process {pid} in {ns}")
            _kill(pid, 3.0)
        sh("ip", "netns", "del", ns, check=False)
        removed.append(f"namespace {ns}")
    return removed
