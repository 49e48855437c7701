"""Helpers for tests that talk to real network peers: a LAN of two network namespaces on a veth
pair, a process whose output lines are read on a thread, the proxyDHCP differential (dnsmasq
and the firmware each on a LAN of its own, sent the same packets), and the command lines of the
real TFTP clients (tftp-hpa's tftp, atftp, curl, tftpy), and WireGuard interfaces in a namespace
(the kernel's when it has the module, else wireguard-go).

Namespaces and processes are bastion.lab.netns's: a namespace starts with only `lo`, and leaves
with every process inside it, stopped by PID, also when the test fails.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

import pytest
from bastion.flash.sim import compile_firmware, micropython_bin
from bastion.lab.netns import LabError, Namespace

HOST = "127.0.0.1"


def need_tool(tool: str) -> str:
    """The tool's path; the test is skipped when it is not installed."""
    path = shutil.which(tool)
    if not path:
        pytest.skip(f"{tool} is not installed (tools/setup installs it)")
    return path


def need_root(*tools: str) -> None:
    """Skip unless root (network namespaces) with iproute2 and `tools` installed."""
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    for tool in ("ip", *tools):
        need_tool(tool)


# --- a LAN of two namespaces ---------------------------------------------------------------------


class VethLan:
    """Two namespaces on a veth pair: the server's side `srv` (`server_ip`/24 on `if_srv`) and
    the client's side `cli` (`if_cli`, with `client_ip`/24 when given). Each side with an
    address routes by default out of its end: a socket can send to 255.255.255.255 only with a
    route. `with VethLan(...) as lan:` removes both namespaces and all in them, however it ends.
    """

    def __init__(self, tag: str, server_ip: str, client_ip: str | None = None):
        stem = f"{tag}{os.getpid() % 100000}"
        self.srv, self.cli = Namespace(f"eb{stem}s"), Namespace(f"eb{stem}c")
        self.if_srv, self.if_cli = f"{stem}s", f"{stem}c"
        self.server_ip, self.client_ip = server_ip, client_ip

    def up(self) -> None:
        srv, cli = self.srv.create(), self.cli.create()
        srv.veth(self.if_srv, cli, self.if_cli)
        srv.ip("addr", "add", f"{self.server_ip}/24", "dev", self.if_srv)
        srv.ip("link", "set", self.if_srv, "up")
        cli.ip("link", "set", self.if_cli, "up")
        srv.ip("route", "add", "default", "dev", self.if_srv)
        if self.client_ip:
            cli.ip("addr", "add", f"{self.client_ip}/24", "dev", self.if_cli)
            cli.ip("route", "add", "default", "dev", self.if_cli)

    def down(self) -> list[str]:
        return self.srv.destroy() + self.cli.destroy()

    def __enter__(self) -> Self:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()


# --- WireGuard in a namespace ---------------------------------------------------------------------


def need_wireguard_tools() -> None:
    """Skip unless wg and wg-quick (wireguard-tools) are installed."""
    if shutil.which("wg") is None or shutil.which("wg-quick") is None:
        pytest.skip("wg and wg-quick (wireguard-tools) are not installed; tools/setup installs them")


# wireguard-go's control sockets: one directory for every namespace, so its interface names
# must be unique on the machine, not only in their namespace
WG_SOCKETS = Path("/var/run/wireguard")


class WireguardNamespace:
    """A network namespace with WireGuard interfaces: the kernel's, else wireguard-go's.

    `add` makes a bare interface (wireguard-go started here, by PID); `quick_up` brings one up
    from a wg-quick config with the real `wg-quick up`, which makes it the same way (the
    kernel's when /sys/module/wireguard exists, else wireguard-go, which then runs as a daemon
    inside the namespace: `close` stops it by PID with whatever else runs in there)."""

    def __init__(self, name: str):
        self.ns = Namespace(name)
        self.sockets: list[Path] = []
        try:
            self.ns.create()
        except LabError as e:
            self.ns.destroy()
            pytest.skip(f"cannot make a network namespace (root and iproute2 needed): {e}")

    @staticmethod
    def kernel_has_wireguard() -> bool:
        return Path("/sys/module/wireguard").exists()

    def add(self, name: str) -> str:
        """Make interface `name`; returns how ("kernel" or "wireguard-go")."""
        try:
            self.ns.ip("link", "add", name, "type", "wireguard")
            return "kernel"
        except LabError as e:
            if shutil.which("wireguard-go") is None:
                pytest.skip(f"this kernel has no WireGuard ({e}) and wireguard-go is "
                            "not installed (tools/debian-packages.txt has it)")  # fmt: skip
        sock = WG_SOCKETS / f"{name}.sock"
        proc = self.ns.start(["wireguard-go", "-f", name], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)  # fmt: skip
        self.sockets.append(sock)
        deadline = time.monotonic() + 10
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"wireguard-go could not make {name} (exit {proc.poll()})")
            time.sleep(0.05)
        return "wireguard-go"

    def quick_up(self, conf: Path) -> str:
        """`wg-quick up CONF` in here (the interface is named after the file); its output."""
        if not self.kernel_has_wireguard() and shutil.which("wireguard-go") is None:
            pytest.skip("this kernel has no WireGuard module and wireguard-go is not installed "
                        "(tools/debian-packages.txt has it)")  # fmt: skip
        self.sockets.append(WG_SOCKETS / f"{conf.stem}.sock")
        # output to a file: a daemon that kept a pipe open would hold run() forever
        log = conf.with_suffix(".up.log")
        with log.open("wb") as out:
            r = self.ns.run("wg-quick", "up", str(conf), stdout=out, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, timeout=60)  # fmt: skip
        text = log.read_text()
        assert r.returncode == 0, f"wg-quick up {conf.name}: {text}"
        return text

    def wg(self, *args: str, input: str | None = None) -> str:
        run = self.ns.run("wg", *args, input=input, capture_output=True, text=True, timeout=30)
        assert run.returncode == 0, f"wg {' '.join(args)}: {run.stderr}"
        return run.stdout

    def latest_handshakes(self, iface: str) -> dict[str, int]:
        """Each peer's last handshake (seconds since the epoch; 0: never), by public key."""
        out = {}
        for line in self.wg("show", iface, "latest-handshakes").splitlines():
            key, _, when = line.partition("\t")
            out[key] = int(when)
        return out

    def close(self) -> None:
        self.ns.destroy()  # wireguard-go stopped by PID; the links go with the namespace
        for sock in self.sockets:
            sock.unlink(missing_ok=True)


class Output:
    """A running process's output (text, stdout=PIPE), read line by line on a thread."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.lines: list[str] = []
        self._q: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            self._q.put(line)

    def wait_for(self, text: str, timeout: float = 20) -> None:
        if any(text in x for x in self.lines):
            return
        while True:
            try:
                line = self._q.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no {text!r}; output:\n" + "".join(self.lines)) from None
            if text in line:
                return


def event_counts(lines: list[str]) -> dict[str, int]:
    """The last total of each counter in JSON lines `{"count": name, "n": total}`."""
    counts = {}
    for line in lines:
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if isinstance(ev, dict) and "count" in ev:
            counts[ev["count"]] = ev["n"]
    return counts


# --- the proxyDHCP differential ------------------------------------------------------------------

# Sends every case, collects every reply by xid; prints {name: [[hex, src_ip, src_port]...]}.
DHCP_CLIENT = r"""
import json, socket, subprocess, sys, time
ifname, server, client_ip, wait = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
cases = json.load(sys.stdin)
out = {name: [] for name in cases}
xids = {bytes.fromhex(c["hex"])[4:8]: name for name, c in cases.items()}


def collect(sock):
    end = time.monotonic() + wait
    while True:
        left = end - time.monotonic()
        if left <= 0:
            return
        sock.settimeout(left)
        try:
            d, a = sock.recvfrom(4096)
        except socket.timeout:
            return
        if len(d) > 8 and d[0] == 2 and d[4:8] in xids:
            out[xids[d[4:8]]].append([d.hex(), a[0], a[1]])


b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
b.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
b.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
b.bind(("0.0.0.0", 68))
for name, c in cases.items():
    if c["via"] == "bcast":
        b.sendto(bytes.fromhex(c["hex"]), ("255.255.255.255", 67))
collect(b)
# Now the client has its address from "the router": ask the boot server directly.
subprocess.run(["ip", "addr", "add", client_ip + "/24", "dev", ifname], check=True)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind((client_ip, 4011))
for name, c in cases.items():
    if c["via"] == "4011":
        u.sendto(bytes.fromhex(c["hex"]), (server, 4011))
collect(u)
print(json.dumps(out))
"""


def proxydhcp_differential(
    tmp_path: Path,
    cases: dict[str, tuple[bytes, str]],
    *,
    dnsmasq_args: Callable[[str, Path], list[str]],
    device_config: dict,
    service: str,
    server_ip: str,
    client_ip: str,
    tags: tuple[str, str] = ("dxd", "dxo"),
    wait: float = 1.5,
) -> tuple[dict, dict, list[str]]:
    """dnsmasq (`dnsmasq_args(ifname, pidfile)`) on one LAN and the firmware's proxyDHCP
    (`service`, a script run by the MicroPython unix port from .mpy in a 128 KB heap, on the
    real ports 67/4011) on another, each at server_ip; the same cases, name -> (packet, "bcast"
    for 0.0.0.0:68 -> 255.255.255.255:67, or "4011" for client_ip:4011 -> server_ip:4011), sent
    to both by DHCP_CLIENT. Returns dnsmasq's replies, ours ({name: [[hex, ip, port]...]}) and
    the firmware's output lines."""
    need_root("dnsmasq")
    compile_firmware(tmp_path / "lib" / "firmware")
    (tmp_path / "svc.py").write_text(service)
    (tmp_path / "device.json").write_text(json.dumps(device_config))
    payload = json.dumps({n: {"hex": raw.hex(), "via": via} for n, (raw, via) in cases.items()})
    with VethLan(tags[0], server_ip) as theirs, VethLan(tags[1], server_ip) as ours:
        dnsmasq = Output(theirs.srv.start(dnsmasq_args(theirs.if_srv, tmp_path / "dnsmasq.pid"),
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True))  # fmt: skip
        firmware = Output(ours.srv.start(
            [micropython_bin(), "-X", "heapsize=128k", str(tmp_path / "svc.py"), "device.json",
             "0.0.0.0", "67", "4011", "68"],
            cwd=tmp_path, env=dict(os.environ, MICROPYPATH=f"{tmp_path / 'lib'}:.frozen"),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))  # fmt: skip
        dnsmasq.wait_for("DHCP, sockets bound exclusively")
        firmware.wait_for('"ready": true')
        clients = [lan.cli.start([sys.executable, "-c", DHCP_CLIENT, lan.if_cli, server_ip,
                                  client_ip, str(wait)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                   for lan in (theirs, ours)]  # fmt: skip
        for c in clients:  # both at once: each waits for replies twice
            c.stdin.write(payload)
            c.stdin.close()
        results = []
        for c in clients:
            out = c.stdout.read()
            assert c.wait(timeout=60) == 0, c.stderr.read()
            results.append(json.loads(out))
    return results[0], results[1], firmware.lines


# --- the real TFTP clients -----------------------------------------------------------------------


def tftp_hpa(port: int, *command: str, mode: str = "binary",
             timeout: float = 120) -> subprocess.CompletedProcess:  # fmt: skip
    """tftp-hpa's client running one command (it speaks plain RFC 1350: 512-byte blocks, no
    options); its verdict is in its output, not its exit status."""
    return subprocess.run([need_tool("tftp"), "-m", mode, HOST, str(port), "-c", *command],
                          check=False, capture_output=True, text=True, timeout=timeout)  # fmt: skip


def tftp_hpa_get(port: int, name: str, out: Path) -> subprocess.CompletedProcess:
    return tftp_hpa(port, "get", name, str(out))


def tftp_hpa_put(port: int, local: Path, name: str) -> subprocess.CompletedProcess:
    return tftp_hpa(port, "put", str(local), name, timeout=60)


def atftp_get(port: int, name: str, out: Path, blksize: int,
              window: int = 0) -> subprocess.CompletedProcess:  # fmt: skip
    """atftp with blksize and tsize, and windowsize (RFC 7440) when `window` is given: atftp 0.8
    is the one real client here that asks for it (curl, tftp-hpa's tftp and tftpy 0.8 cannot)."""
    options = [f"blksize {blksize}"] + ([f"windowsize {window}"] if window else []) + ["tsize 0"]
    return subprocess.run(
        [need_tool("atftp"), "--get", "-r", name, "-l", str(out),
         *(a for o in options for a in ("--option", o)), HOST, str(port)],
        check=False, capture_output=True, text=True, timeout=120)  # fmt: skip


def atftp_put(port: int, local: Path, name: str) -> subprocess.CompletedProcess:
    return subprocess.run([need_tool("atftp"), "--put", "-l", str(local), "-r", name, HOST,
                           str(port)], check=False, capture_output=True, text=True, timeout=60)


def curl_get(port: int, name: str, out: Path, blksize: int) -> subprocess.CompletedProcess:
    # curl asks for tsize on its own; --path-as-is keeps "../" for the escape tests.
    return subprocess.run([need_tool("curl"), "-sS", "--path-as-is", "--tftp-blksize",
                           str(blksize), "-o", str(out), f"tftp://{HOST}:{port}/{name}"],
                          check=False, capture_output=True, text=True, timeout=120)  # fmt: skip


def curl_put(port: int, local: Path, name: str) -> subprocess.CompletedProcess:
    return subprocess.run([need_tool("curl"), "-sS", "-T", str(local),
                           f"tftp://{HOST}:{port}/{name}"],
                          check=False, capture_output=True, text=True, timeout=60)  # fmt: skip


def tftpy_get(port: int, name: str, out: Path, blksize: int) -> None:
    import tftpy

    tftpy.TftpClient(HOST, port, options={"blksize": blksize, "tsize": 0}).download(
        name, str(out), timeout=5)


def fetch(client: str, port: int, name: str, out: Path, blksize: int) -> None:
    """`name` into `out` with one of the real clients ("tftp-hpa", which asks for no options,
    "atftp", "curl" or "tftpy", at `blksize`), which must say it succeeded."""
    if client == "tftp-hpa":
        r = tftp_hpa_get(port, name, out)
        assert r.returncode == 0 and not r.stdout.strip(), r.stdout + r.stderr
    elif client == "atftp":
        r = atftp_get(port, name, out, blksize)
        assert r.returncode == 0, r.stdout + r.stderr
    elif client == "curl":
        r = curl_get(port, name, out, blksize)
        assert r.returncode == 0, r.stderr
    else:
        tftpy_get(port, name, out, blksize)


def tftpy_put(port: int, local: Path, name: str) -> None:
    import tftpy

    tftpy.TftpClient(HOST, port).upload(name, str(local), timeout=5)
