#!/usr/bin/env python3
"""HTTP benchmark of the controller: a power-on storm of iPXE clients, and asset downloads
compared with nginx serving the same file.

One run, everything on 127.0.0.1, everything in one temporary directory:

1. writes a matchbox-layout site (one profile whose kernel and initrd are under /assets, a
   default group, a few groups that select one MAC each, and a large asset of random bytes),
   starts `bastion serve` on it (event DB in the temp dir, no access log) and nginx in the
   foreground with its own config (one worker, sendfile, logs and pid in the temp dir);
2. checks behaviour: the whole asset comes back byte for byte, a Range request gets 206 with
   the right bytes, an If-None-Match revalidation gets 304 (on nginx too, for reference);
3. boot storm: N concurrent clients each do what iPXE does after DHCP: GET /boot.ipxe, expand
   the iPXE settings in its `chain` line with that machine's MAC, UUID, ... and GET the /ipxe URL
   it names, on the same connection; every boot opens a new connection, as a rebooting machine
   does. Prints p50/p99/max latency per request kind, requests/s and errors;
4. the same storm against nginx answering canned copies of the same two scripts: the load
   generator's ceiling on this machine. If the controller's rate is well under it, and the
   controller's process is near one full core, the numbers measure the controller, not the client;
   with --rates, an open loop follows at each rate: boots begun on a schedule whether or not the
   earlier ones were answered (as machines powered on by a schedule are), each timed from when
   it was due, against both servers; prints the highest rate that kept the first request's p99
   under the goal's 100 ms;
5. downloads the asset with curl from both servers, interleaved, and prints the throughput ratio
   controller/nginx;
6. reads the controller's event DB back: one boot event per request, and every /ipxe request
   answered by the group its MAC should select.

Exit status: 0 when every request succeeded and every check passed, 1 otherwise, 2 when a server
did not start. Every process the bench starts is stopped by its PID when it ends, however it ends.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import ipaddress
import json
import math
import multiprocessing
import os
import re
import resource
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import httpx
from bastion.lab.netns import Supervisor, exited, run_with_cleanup

HOST = "127.0.0.1"  # the only address this bench talks to
PROFILE_KERNEL = "/assets/bench/vmlinuz"
PROFILE_INITRD = "/assets/bench/initrd.img"
ASSET_PATH = "/assets/bench/blob.bin"
MIB = 1024 * 1024


# --- iPXE's side of the conversation (pure functions) -------------------------------------------

_SETTING = re.compile(r"\$\{([A-Za-z0-9_./-]+)(?::([a-z]+))?\}")


def expand_settings(line: str, settings: dict[str, str]) -> str:
    """`line` with iPXE's `${name}` / `${name:type}` references replaced, as iPXE does before it
    splits a command line into words. Unset settings expand to the empty string."""

    def one(m: re.Match) -> str:
        value = settings.get(m.group(1), "")
        kind = m.group(2)
        if kind == "hexhyp":
            return value.replace(":", "-")
        if kind == "uristring":
            return quote(value, safe="-_.~")  # RFC 3986 unreserved characters stay as they are
        return value

    return _SETTING.sub(one, line)


def chain_target(script: str, settings: dict[str, str]) -> str:
    """The URL that the `chain` command of an iPXE script fetches, settings expanded.
    Raises ValueError when the text is not an iPXE script or has no chain command."""
    lines = script.splitlines()
    if not lines or not lines[0].startswith("#!ipxe"):
        raise ValueError("not an iPXE script")
    for line in lines[1:]:
        words = expand_settings(line, settings).split()
        if words and words[0] in ("chain", "chainload"):
            args = [w for w in words[1:] if not w.startswith("-")]
            if args:
                return args[0]
    raise ValueError("no chain command")


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in 0..1)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def is_loopback_url(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- the site ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Machine:
    """One simulated iPXE client: its settings, and the group the controller should pick."""

    mac: str
    uuid: str
    serial: str
    expected_group: str
    address: str = HOST  # the loopback address its connections come from: each its own

    def ipxe_settings(self) -> dict[str, str]:
        return {
            "mac": self.mac,
            "uuid": self.uuid,
            "serial": self.serial,
            "buildarch": "x86_64",
            "platform": "efi",
            # hostname and domain are unset before DHCP option 12/15: they expand to ""
        }


_MACHINE_GROUP = "machine:"  # the id of a declared machine's group: machine:NAME


def machines_for(count: int, mac_groups: int, declared: int = 0) -> list[Machine]:
    """`count` machines; the first `mac_groups` are the ones the site's MAC groups select, the
    `declared` after them are declared in machines.yaml (each its own group, `machine:NAME`)."""
    out = []
    for i in range(count):
        selected = i < mac_groups
        is_declared = not selected and i < mac_groups + declared
        # 52:54:00 is QEMU's prefix; the fourth octet keeps selected, declared and anonymous
        # MACs apart.
        kind = 0xBE if selected else 0xBD if is_declared else 0xA0
        mac = f"52:54:00:{kind:02x}:{i >> 8 & 0xFF:02x}:{i & 0xFF:02x}"
        group = (f"mac-{i:03d}" if selected else f"{_MACHINE_GROUP}node-{i:05d}" if is_declared
                 else "default")  # fmt: skip
        out.append(
            Machine(
                mac=mac,
                uuid=f"{i:08x}-0000-4000-8000-{i:012x}",
                serial=f"BENCH{i:05d}",
                expected_group=group,
                # as on a LAN, where each machine has an address of its own: the controller
                # learns whose address is whose from the requests that carry a MAC
                address=f"127.{1 + (i >> 16 & 0xFF)}.{i >> 8 & 0xFF}.{i & 0xFF}",
            )
        )
    return out


def write_random(path: Path, size: int) -> str:
    """Write `size` random bytes to `path`; returns their SHA-256."""
    digest = hashlib.sha256()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, MIB))
            digest.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def write_site(root: Path, machines: list[Machine], asset_bytes: int) -> str:
    """A matchbox data directory for `machines`; returns the big asset's SHA-256."""
    (root / "profiles").mkdir(parents=True)
    (root / "groups").mkdir()
    profile = {
        "id": "bench",
        "name": "Benchmark Linux",
        "boot": {
            "kernel": PROFILE_KERNEL,
            "initrd": [PROFILE_INITRD],
            "args": ["initrd=initrd.img", "console=ttyS0,115200n8", "quiet"],
        },
    }
    (root / "profiles" / "bench.json").write_text(json.dumps(profile, indent=2))
    default = {"id": "default", "name": "Everything else", "profile": "bench"}
    (root / "groups" / "default.json").write_text(json.dumps(default, indent=2))
    declared = [m for m in machines if m.expected_group.startswith(_MACHINE_GROUP)]
    if declared:  # Edge Bastion's own layout beside matchbox's: site.yaml and machines.yaml
        (root / "site.yaml").write_text("site: bench\n")
        lines = ["machines:"]
        for m in declared:
            name = m.expected_group.removeprefix(_MACHINE_GROUP)
            lines += [f"  - name: {name}", f"    mac: {m.mac}", "    arch: x86_64",
                      "    profile: bench"]  # fmt: skip
        (root / "machines.yaml").write_text("\n".join(lines) + "\n")
    for m in machines:
        if m.expected_group == "default" or m.expected_group.startswith(_MACHINE_GROUP):
            continue
        group = {
            "id": m.expected_group,
            "profile": "bench",
            "selector": {"mac": m.mac},
            "metadata": {"hostname": f"node-{m.serial.lower()}"},
        }
        (root / "groups" / f"{m.expected_group}.json").write_text(json.dumps(group, indent=2))
    write_random(root / PROFILE_KERNEL.lstrip("/"), 256 * 1024)
    write_random(root / PROFILE_INITRD.lstrip("/"), 256 * 1024)
    return write_random(root / ASSET_PATH.lstrip("/"), asset_bytes)


# --- the servers ---------------------------------------------------------------------------------


def free_tcp_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    base: str
    log: Path


def start_server(
    procs: Supervisor,
    name: str,
    cmd: list[str],
    base: str,
    log: Path,
    env: dict | None = None,
    stop_signal: int = signal.SIGTERM,
) -> Server:
    """cmd as `name`, supervised by procs: stopped by its PID (and its process group, as it
    leads its own session: nginx's worker too) when the bench ends, however it ends."""
    proc = procs.start(name, cmd, log=log, env=env, stop_signal=stop_signal)
    return Server(name, proc, base, log)


class ServerDidNotStart(RuntimeError):
    pass


def wait_ready(server: Server, path: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    with httpx.Client(trust_env=False, timeout=2.0) as client:
        while time.monotonic() < deadline:
            if exited(server.proc):
                break
            try:
                r = client.get(server.base + path)
                if r.status_code == 200:
                    return
                last = f"HTTP {r.status_code}"
            except httpx.HTTPError as e:
                last = type(e).__name__
            time.sleep(0.1)
    tail = server.log.read_text(errors="replace")[-2000:]
    raise ServerDidNotStart(
        f"{server.name} did not answer {path} ({last}; {'exited' if exited(server.proc) else 'running'}); "
        f"its log ({server.log}):\n{tail}"
    )


# The controller's history bounds in the bench. The check of what it recorded counts every boot
# event of the run, and at the default bounds (100,000 events, 128 MiB) a fast machine's wrk
# phase alone (about 200,000 requests in 10 s) has the oldest pruned before the count. Every
# event is still written; what this leaves out is the pruning, one DELETE per tenth of a bound.
HISTORY_EVENTS = 10_000_000
HISTORY_SIZE = "64GiB"

# nginx's listen backlog, as uvicorn's default (2048) that the controller listens with: at
# nginx's own 511, 1,000 clients connecting at once overflow its accept queue, and each dropped
# handshake costs that client a 1 s retransmission, which the ceiling's p99 then shows.
NGINX_BACKLOG = 2048


def controller_command(site: Path, port: int, db: Path, profile_to: Path | None) -> list[str]:
    args = [
        "serve",
        "--site",
        str(site),
        "--listen",
        f"{HOST}:{port}",
        "--db",
        str(db),
        "--history-events",
        str(HISTORY_EVENTS),
        "--history-size",
        HISTORY_SIZE,
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    if profile_to is not None:
        return [
            sys.executable,
            "-m",
            "cProfile",
            "-o",
            str(profile_to),
            "-m",
            "bastion.serve_cli",
            *args,
        ]
    script = Path(sys.executable).with_name("bastion")
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-m", "bastion.serve_cli", *args]


def nginx_config(tmp: Path, port: int, site: Path, canned: Path) -> str:
    run = tmp / "nginx"
    user = ""
    if os.geteuid() == 0:
        # Started as root, nginx's workers switch to another user (nobody), which then answers
        # 403 wherever it cannot read the bench directory: with a umask such as 077, or a
        # temporary directory that only root may enter. The workers stay root instead, like
        # the controller they are compared with; they only serve loopback.
        user = "user root root;"
    return f"""\
# Written by tools/bench/http_bench.py: nginx as the reference static file server.
{user}
worker_processes 1;
pid {run}/nginx.pid;
error_log {run}/error.log warn;
events {{
    worker_connections 8192;
}}
http {{
    access_log {run}/access.log;
    client_body_temp_path {run}/body;
    proxy_temp_path {run}/proxy;
    fastcgi_temp_path {run}/fastcgi;
    uwsgi_temp_path {run}/uwsgi;
    scgi_temp_path {run}/scgi;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 10000;
    server {{
        listen {HOST}:{port} backlog={NGINX_BACKLOG};
        root {site};
        location /assets/ {{ }}
        location = /boot.ipxe {{ default_type text/plain; alias {canned}/boot.ipxe; }}
        location = /ipxe {{ default_type text/plain; alias {canned}/ipxe; }}
    }}
}}
"""


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process group that `pid` leads (every thread of every
    process in it: the controller alone, or nginx's master and its worker), from /proc."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[2]) == pid:  # field 5 of proc(5): the process group
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, stolen) CPU seconds of the whole machine so far, all cores, from /proc/stat."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (ticks + [0] * 8)[:8]
    hz = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / hz, steal / hz


# --- the boot storm ------------------------------------------------------------------------------


@dataclass
class StormResult:
    latencies: dict[str, list[float]] = field(default_factory=lambda: {"boot.ipxe": [], "ipxe": []})
    errors: Counter = field(default_factory=Counter)
    requests: int = 0
    wall: float = 0.0
    server_cpu: float = 0.0
    client_cpu: float = 0.0
    machine_cpu: float = 0.0  # every process on the machine, ours included
    stolen_cpu: float = 0.0  # time the hypervisor gave our virtual CPUs to someone else
    # the controller's group commit meanwhile (transactions, events), from its /metrics
    commits: tuple[float, float] | None = None
    # open loop only: how late the client began each boot against its schedule (seconds)
    launch_lag: list[float] = field(default_factory=list)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def rate(self) -> float:
        return self.requests / self.wall if self.wall else 0.0

    def merge(self, other: StormResult) -> None:
        for kind, values in other.latencies.items():
            self.latencies.setdefault(kind, []).extend(values)
        self.errors.update(other.errors)
        self.requests += other.requests
        self.client_cpu += other.client_cpu
        self.launch_lag.extend(other.launch_lag)


class HttpError(Exception):
    """The server's answer was not HTTP/1.1 as the bench client reads it."""


class _Answers(asyncio.Protocol):
    """One client connection, read as iPXE reads its answers: each one an HTTP/1.1 status line,
    headers with Content-Length (both servers send it for these small scripts, so the connection
    stays usable for the next request) and that many bytes of body. A protocol, not asyncio's
    streams: with a stream reader and writer per connection the client took about a quarter
    more CPU per request (58 us against 47 here), and it shares the machine with the server."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future | None = None
        self.failed: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.waiter is not None and not self.waiter.done():
            self._answer()

    def eof_received(self) -> bool:
        self._fail(asyncio.IncompleteReadError(bytes(self.buf), None))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or asyncio.IncompleteReadError(bytes(self.buf), None))

    def _fail(self, exc: BaseException) -> None:
        if self.failed is None:
            self.failed = exc
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def _answer(self) -> None:
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return
        try:
            status, length = _status_and_length(bytes(buf[:end]))
        except HttpError as e:
            self.waiter.set_exception(e)  # type: ignore[union-attr]
            return
        total = end + 4 + length
        if len(buf) < total:
            return
        body = bytes(buf[end + 4 : total])
        del buf[:total]
        self.waiter.set_result((status, body))  # type: ignore[union-attr]

    async def get(self, request: bytes) -> tuple[int, bytes]:
        """Send one request (whole, as bytes) and await its answer: (status, body)."""
        if self.failed is not None:
            raise self.failed
        self.waiter = self.loop.create_future()
        self.transport.write(request)  # type: ignore[union-attr]
        if self.buf:  # (an answer cannot come before its request; checked all the same)
            self._answer()
        return await self.waiter


def _status_and_length(head: bytes) -> tuple[int, int]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise HttpError(f"bad status line {lines[0][:40]!r}")
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            try:
                return int(parts[1]), int(value.strip())
            except ValueError:
                raise HttpError(f"bad Content-Length {value.strip()[:20]!r}") from None
    raise HttpError("no Content-Length")


def get_request(host: str, target: str) -> bytes:
    """A GET as iPXE sends it (the target exactly as the script spelled it)."""
    return f"GET {target} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: iPXE/1.21.1\r\n\r\n".encode()


class StormClient:
    """What one client process needs to boot its machines against one server: the server's
    address and the first request, made once, and each machine's second request, worked out
    from the boot.ipxe body as iPXE would (chain_target) the first time that machine gets that
    body, and kept for when it gets the same body again."""

    def __init__(self, base: str) -> None:
        parts = urlsplit(base)
        self.base = base
        self.host, self.port, self.netloc = parts.hostname, parts.port, parts.netloc
        self.first = get_request(self.netloc, "/boot.ipxe")
        self._chain: dict[tuple[str, bytes], bytes | str] = {}

    def second(self, machine: Machine, body: bytes) -> bytes | str:
        """The request the boot.ipxe `body` chains to for `machine`, or why there is none."""
        key = (machine.mac, body)
        found = self._chain.get(key)
        if found is None:
            found = self._chain[key] = self._chain_request(machine, body)
        return found

    def _chain_request(self, machine: Machine, body: bytes) -> bytes | str:
        try:
            url = urljoin(
                self.base + "/boot.ipxe", chain_target(body.decode(), machine.ipxe_settings())
            )
        except ValueError as e:
            return str(e)
        parts = urlsplit(url)
        if parts.netloc != self.netloc or not is_loopback_url(url):
            return f"chain leaves the server under test ({url})"
        return get_request(self.netloc, parts.path + ("?" + parts.query if parts.query else ""))


async def boot_once(client: StormClient, machine: Machine, result: StormResult,
                    timeout: float, due: float | None = None) -> None:  # fmt: skip
    """One machine's boot: a new connection, /boot.ipxe, then the /ipxe URL its chain line
    names on the same connection, then close. The boot.ipxe latency includes the connect, and
    with `due` (a time.perf_counter() value: when an open-loop schedule wanted the boot to
    begin) it is counted from then, so that a client that fell behind adds its lateness."""
    kind = "boot.ipxe"
    conn = None
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            t0 = time.perf_counter() if due is None else due
            _, conn = await loop.create_connection(lambda: _Answers(loop), client.host, client.port,
                                                   local_addr=(machine.address, 0))  # fmt: skip
            status, body = await conn.get(client.first)
            t1 = time.perf_counter()
            result.requests += 1
            if status != 200:
                result.errors[f"{kind}: HTTP {status}"] += 1
                return
            result.latencies[kind].append(t1 - t0)
            request = client.second(machine, body)
            if isinstance(request, str):
                result.errors[f"{kind}: {request}"] += 1
                return
            kind = "ipxe"
            t0 = time.perf_counter()
            status, body = await conn.get(request)
            t1 = time.perf_counter()
            result.requests += 1
            if status != 200:
                result.errors[f"{kind}: HTTP {status}"] += 1
                return
            if not body.startswith(b"#!ipxe") or _KERNEL_LINE not in body:
                result.errors[f"{kind}: not the bench profile's boot script"] += 1
                return
            result.latencies[kind].append(t1 - t0)
    except (TimeoutError, OSError, HttpError, asyncio.IncompleteReadError, ValueError) as e:
        result.requests += 1
        result.errors[f"{kind}: {type(e).__name__}"] += 1
    finally:
        if conn is not None and conn.transport is not None:
            conn.transport.close()


_KERNEL_LINE = f"kernel {PROFILE_KERNEL}".encode()


async def client_boots(
    client: StormClient, machine: Machine, boots: int, result: StormResult, timeout: float
) -> None:
    for _ in range(boots):
        await boot_once(client, machine, result, timeout)


async def _storm_share(base: str, machines: list[Machine], boots: int, timeout: float,
                       deadline: float) -> StormResult:  # fmt: skip
    result = StormResult()
    client = StormClient(base)
    tasks = [
        asyncio.ensure_future(client_boots(client, m, boots, result, timeout)) for m in machines
    ]
    done, pending = await asyncio.wait(tasks, timeout=deadline)
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.wait(pending)
        result.errors[f"unfinished at the {deadline:.0f} s deadline (clients)"] += len(pending)
    for t in done:
        if t.exception() is not None:
            result.errors[f"client crashed: {t.exception()!r}"] += 1
    return result


async def _open_share(base: str, machines: list[Machine], boots: range, rate: float,
                      timeout: float, cap: int) -> StormResult:  # fmt: skip
    """An open loop: boot i begins i / rate seconds after the start, on machines[i % n],
    whether or not the boots before it have been answered, as machines powered on by a
    schedule would. `boots` is this process's share (every procs-th i). At most `cap` boots in
    flight: one more is not begun and counts as an error (the server fell that far behind)."""
    result = StormResult()
    client = StormClient(base)
    start_at = time.perf_counter()  # the processes are woken together (storm's start event)
    running: set[asyncio.Task] = set()
    n = len(machines)
    for i in boots:
        due = start_at + i / rate
        late = time.perf_counter() - due
        if late < 0:
            await asyncio.sleep(-late)
            late = max(0.0, time.perf_counter() - due)
        result.launch_lag.append(late)
        if len(running) >= cap:
            result.errors[f"not begun: {cap} boots of this client process in flight"] += 1
            continue
        task = asyncio.ensure_future(boot_once(client, machines[i % n], result, timeout, due))
        running.add(task)
        task.add_done_callback(running.discard)
    if running:
        await asyncio.wait(set(running))
    return result


_start: Any = None  # in a client process: the event the parent sets to start the storm


def _client_process(start: Any) -> None:
    global _start
    _start = start
    # the parent stops the pool whatever happens; a Ctrl-C prints no tracebacks from here
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def _client_run(share: Any) -> StormResult:
    """In a client process: wait for the parent's start, then run the coroutine `share()`
    makes (on uvloop when installed) and count this process's CPU."""
    _start.wait()
    cpu0 = time.process_time()
    runner = asyncio.run
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        pass
    result = runner(share())
    result.client_cpu = time.process_time() - cpu0
    return result


def storm_worker(base: str, machines: list[Machine], boots: int, timeout: float,
                 deadline: float) -> StormResult:  # fmt: skip
    """One client process's share of the storm: its machines, all at once."""
    return _client_run(lambda: _storm_share(base, machines, boots, timeout, deadline))


def open_worker(base: str, machines: list[Machine], boots: range, rate: float, timeout: float,
                cap: int) -> StormResult:  # fmt: skip
    """One client process's share of an open-loop storm (_open_share)."""
    return _client_run(lambda: _open_share(base, machines, boots, rate, timeout, cap))


# The controller's group commit (docs/controller.md, its metrics): its transactions, and the
# events they held; their ratio is how well a load's events were batched.
COMMIT_METRICS = ("bastion_history_commits_total", "bastion_history_committed_events_total")


def commit_counts(server: Server) -> tuple[float, float] | None:
    """The controller's group-commit counters from its /metrics (None from nginx, or when they
    cannot be read)."""
    if server.name != "controller":
        return None
    try:
        text = httpx.get(server.base + "/metrics", timeout=10.0, trust_env=False).text
    except httpx.HTTPError:
        return None
    found = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in COMMIT_METRICS:
            found[name] = float(value)
    return (found[COMMIT_METRICS[0]], found[COMMIT_METRICS[1]]) if len(found) == 2 else None


def commits_since(server: Server, before: tuple[float, float] | None) -> tuple[float, float] | None:
    after = commit_counts(server)
    if before is None or after is None:
        return None
    return after[0] - before[0], after[1] - before[1]


def commits_line(commits: tuple[float, float] | None) -> str | None:
    if not commits or not commits[0]:
        return None
    transactions, events = commits
    return (f"  history: {events:.0f} events in {transactions:.0f} transactions of the group commit, "
            f"{events / transactions:.1f} a transaction")  # fmt: skip


def storm(server: Server, machines: list[Machine], boots: int, timeout: float, deadline: float,
          procs: int) -> StormResult:  # fmt: skip
    """Every machine boots `boots` times, all at once, spread over `procs` client processes
    (one Python process tops out at a few thousand requests/s: docs/benchmarks-http.md)."""
    shares = [machines[i::procs] for i in range(procs) if machines[i::procs]]
    jobs = [(storm_worker, (server.base, share, boots, timeout, deadline)) for share in shares]
    return in_client_processes(server, jobs, deadline + timeout + 30)


def open_storm(server: Server, machines: list[Machine], rate: float, seconds: float,
               timeout: float, procs: int) -> StormResult:  # fmt: skip
    """An open loop: `rate` boots a second for `seconds`, begun on schedule whatever the server's
    answers (_open_share), the machines taken in turn, over `procs` client processes. Each
    process keeps at most its share of the machines' count in flight."""
    total = max(1, round(rate * seconds))
    procs = min(procs, total)
    cap = max(1, len(machines) // procs)
    jobs = [(open_worker, (server.base, machines, range(p, total, procs), rate, timeout, cap))
            for p in range(procs)]  # fmt: skip
    return in_client_processes(server, jobs, seconds + timeout + 30)


def in_client_processes(server: Server, jobs: list[tuple[Any, tuple]], wait_s: float) -> StormResult:
    """Run each (worker, args) in a client process of its own, all started together once forked,
    and merge their results, with the server's, the machine's and the stolen CPU meanwhile and
    the controller's group commit."""
    result = StormResult()
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    with ctx.Pool(len(jobs), initializer=_client_process, initargs=(start,)) as pool:
        pending = [pool.apply_async(worker, args) for worker, args in jobs]
        time.sleep(0.2)  # the workers are forked and waiting
        commits0 = commit_counts(server)
        cpu0 = process_cpu_seconds(server.proc.pid)
        busy0, steal0 = machine_cpu_seconds()
        t0 = time.perf_counter()
        start.set()
        for p in pending:
            result.merge(p.get(wait_s))
        result.wall = time.perf_counter() - t0
    result.server_cpu = process_cpu_seconds(server.proc.pid) - cpu0
    busy1, steal1 = machine_cpu_seconds()
    result.machine_cpu, result.stolen_cpu = busy1 - busy0, steal1 - steal0
    result.commits = commits_since(server, commits0)
    return result


def raise_fd_limit(need: int) -> None:
    """Raise this process's open-file limit to `need` (the servers inherit it), or say why not:
    with too few descriptors a server refuses connections and the bench counts errors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < need:
            print(f"warning: open files limited to {target}, {need} wanted (ulimit -Hn)")


# --- asset downloads and HTTP behaviour ----------------------------------------------------------


def curl_download(curl: str, url: str, timeout: float) -> tuple[int, int, float]:
    """(HTTP status, bytes, bytes/s) of one download of `url` by curl, body discarded."""
    out = subprocess.run(
        [
            curl,
            "--silent",
            "--show-error",
            "--noproxy",
            "*",
            "--max-time",
            str(int(timeout)),
            "--output",
            "/dev/null",
            "--write-out",
            "%{http_code} %{size_download} %{speed_download}",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=timeout + 10,
        check=False,
    )
    try:
        code, size, speed = out.stdout.split()
        return int(code), int(size), float(speed)
    except ValueError:
        return 0, 0, 0.0


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def behaviour_checks(base: str, size: int, sha256: str, asset_file: Path) -> list[Check]:
    """Whole download, Range and If-None-Match on ASSET_PATH of the server at `base`."""
    checks = []
    url = base + ASSET_PATH
    with httpx.Client(trust_env=False, timeout=60.0) as client:
        digest, got = hashlib.sha256(), 0
        with client.stream("GET", url) as r:
            for chunk in r.iter_bytes():
                digest.update(chunk)
                got += len(chunk)
        ok = r.status_code == 200 and got == size and digest.hexdigest() == sha256
        checks.append(
            Check(
                "full GET",
                ok,
                f"{r.status_code}, {got} bytes, sha256 {'matches' if ok else 'DIFFERS'}",
            )
        )

        start, end = size // 3, size // 3 + 999
        with asset_file.open("rb") as f:
            f.seek(start)
            want = f.read(end - start + 1)
        r = client.get(url, headers={"Range": f"bytes={start}-{end}"})
        content_range = r.headers.get("content-range", "")
        ok = (
            r.status_code == 206
            and content_range == f"bytes {start}-{end}/{size}"
            and r.content == want
        )
        checks.append(
            Check(
                "Range",
                ok,
                f"{r.status_code}, Content-Range {content_range or '(none)'}, "
                f"{len(r.content)} bytes{'' if r.content == want else ' (WRONG BYTES)'}",
            )
        )

        head = client.head(url)
        etag = head.headers.get("etag")
        if not etag:
            checks.append(Check("If-None-Match", False, f"HEAD {head.status_code} gave no ETag"))
        else:
            r = client.get(url, headers={"If-None-Match": etag})
            ok = r.status_code == 304 and not r.content
            checks.append(
                Check(
                    "If-None-Match",
                    ok,
                    f"{r.status_code} for ETag {etag}, {len(r.content)} body bytes",
                )
            )
    return checks


def event_checks(db: Path, machines: list[Machine], expected_requests: int,
                 wrk_requests: int = 0, in_flight: int = 0) -> list[Check]:  # fmt: skip
    """What the controller recorded: one boot event per request, the right group per MAC.
    wrk counts the answers it read; up to `in_flight` more (one per wrk connection) may have
    been answered and recorded as it stopped."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        counts = dict(
            con.execute("SELECT endpoint, COUNT(*) FROM events WHERE kind='boot' GROUP BY endpoint")
        )
        rows = con.execute(
            "SELECT mac, grp, COUNT(*) FROM events WHERE kind='boot' AND endpoint='/ipxe' GROUP BY mac, grp"
        )
        wrong = []
        expected = {m.mac: m.expected_group for m in machines}
        for mac, group, n in rows:
            if expected.get(mac) != group:
                wrong.append(f"{mac} -> {group} ({n}x)")
    finally:
        con.close()
    total = sum(counts.values())
    expected_requests += wrk_requests
    return [
        Check(
            "boot events recorded",
            expected_requests <= total <= expected_requests + in_flight,
            f"{total} for {expected_requests} requests ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))})",
        ),
        Check(
            "group per MAC",
            not wrong,
            "every /ipxe request got its MAC's group"
            if not wrong
            else f"{len(wrong)} MACs got another group: {', '.join(wrong[:5])}",
        ),
    ]


# --- the run -------------------------------------------------------------------------------------


def print_storm(label: str, r: StormResult, what: str) -> None:
    print(
        f"\n{label}: {what}, {r.requests} requests in {r.wall:.2f} s "
        f"= {r.rate:.0f} requests/s, {r.error_count} errors"
    )
    for kind, values in r.latencies.items():
        v = sorted(values)
        print(
            f"  {kind:<10} n={len(v):<6} p50 {percentile(v, 0.5) * 1000:8.1f} ms   "
            f"p99 {percentile(v, 0.99) * 1000:8.1f} ms   max {max(v, default=float('nan')) * 1000:8.1f} ms"
        )
    other = max(0.0, r.machine_cpu - r.server_cpu - r.client_cpu)
    if r.server_cpu:
        print(f"  server: {r.requests / r.server_cpu:.0f} requests per CPU-second")
    print(
        f"  CPU, in cores: server {r.server_cpu / r.wall:.2f}, bench client {r.client_cpu / r.wall:.2f}, "
        f"other processes {other / r.wall:.2f}, stolen {r.stolen_cpu / r.wall:.2f} "
        f"(of {os.cpu_count()})"
    )
    if line := commits_line(r.commits):
        print(line)
    if other / r.wall > 0.25:
        print("  note: other work on the machine competed for the CPU; expect lower numbers")
    for reason, n in r.errors.most_common(8):
        print(f"  error: {reason}: {n}")


# Issue 17's goals for the controller, printed next to what the run measured, never asserted
# (a shared machine's figures are for reading: docs/benchmarks-http.md)
IPXE_RATE_GOAL = 8000  # /ipxe requests/s under wrk, the history on (one process: one core)
STORM_CLIENTS_GOAL = 1000  # the storm the next goal is for
STORM_P99_GOAL_S = 0.100  # its first request (boot.ipxe, the connect included), with 0 errors


def storm_goal(r: StormResult) -> tuple[float, bool]:
    """The storm's first-request p99 (seconds) and whether it meets the goal with 0 errors."""
    p99 = percentile(sorted(r.latencies.get("boot.ipxe", [])), 0.99)
    return p99, r.error_count == 0 and p99 < STORM_P99_GOAL_S


def storm_goal_line(rc: StormResult, rn: StormResult, clients: int) -> str:
    parts = []
    for name, r in (("controller", rc), ("nginx, the same client", rn)):
        p99, met = storm_goal(r)
        parts.append(f"{name} {p99 * 1000:.0f} ms, {r.error_count} errors: "
                     f"{'met' if met else 'MISSED'}")  # fmt: skip
    line = (f"  goal: the first request's p99 under {STORM_P99_GOAL_S * 1000:.0f} ms with 0 "
            f"errors in a {STORM_CLIENTS_GOAL}-client storm: " + "; ".join(parts))  # fmt: skip
    if clients != STORM_CLIENTS_GOAL:
        line += f" (this storm had {clients} clients: not the goal's)"
    return line


def storm_verdict(rc: StormResult, rn: StormResult) -> str:
    """Who limited the controller's storm: the controller (its process near a full core, the
    client with room to spare), the client, or neither (the machine was busy with other work)."""
    server, client = rc.server_cpu / rc.wall, rc.client_cpu / rc.wall
    if server >= 0.8 and client < 0.8 and rc.rate < 0.8 * rn.rate:
        return "the controller is the bottleneck (a full core), not the load generator"
    if client >= 0.8 or rc.rate >= 0.8 * rn.rate:
        return "WARNING: the load generator may be the bottleneck; read the rate as a lower bound"
    return "WARNING: neither process used a full core: other load on the machine; run again"


def load_average() -> str:
    """The machine's load average as uptime prints it (the machine is shared: say how busy)."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def wrk_summary(r: WrkResult) -> dict:
    return {"requests": r.requests, "requests_per_s": round(r.rate, 1), "p50_ms": round(r.p50_ms, 3),
            "requests_per_server_cpu_s": round(r.requests / r.server_cpu, 1) if r.server_cpu else None,
            "p99_ms": round(r.p99_ms, 3), "errors": r.errors,
            "server_cpu_share": round(r.server_cpu / r.wall, 3) if r.wall else None,
            "client_cpu_share": round(r.client_cpu / r.wall, 3) if r.wall else None,
            "history_commits": _commits_summary(r.commits)}  # fmt: skip


def _commits_summary(commits: tuple[float, float] | None) -> dict | None:
    if not commits:
        return None
    return {"transactions": int(commits[0]), "events": int(commits[1])}


def storm_summary(r: StormResult) -> dict:
    out = {
        "requests": r.requests,
        "seconds": round(r.wall, 3),
        "requests_per_s": round(r.rate, 1),
        "errors": dict(r.errors),
        "server_cpu_share": round(r.server_cpu / r.wall, 3),
        "requests_per_server_cpu_s": round(r.requests / r.server_cpu, 1) if r.server_cpu else None,
        "client_cpu_share": round(r.client_cpu / r.wall, 3),
        "other_cpu_share": round(max(0.0, r.machine_cpu - r.server_cpu - r.client_cpu) / r.wall, 3),
        "stolen_cpu_share": round(r.stolen_cpu / r.wall, 3),
        "history_commits": _commits_summary(r.commits),
    }
    if r.launch_lag:
        out["client_late_p99_ms"] = round(percentile(sorted(r.launch_lag), 0.99) * 1000, 2)
    for kind, values in r.latencies.items():
        v = sorted(values)
        out[kind] = {
            "n": len(v),
            "p50_ms": round(percentile(v, 0.5) * 1000, 2),
            "p99_ms": round(percentile(v, 0.99) * 1000, 2),
            "max_ms": round(max(v, default=float("nan")) * 1000, 2),
        }
    return out


@dataclass
class Bench:
    """What the phases of one run share."""

    args: argparse.Namespace
    tmp: Path
    machines: list[Machine]
    asset_bytes: int
    asset_sha256: str
    controller: Server
    nginx: Server
    warmup_requests: int = 0
    failed: bool = False

    @property
    def asset_file(self) -> Path:
        return self.tmp / "site" / ASSET_PATH.lstrip("/")


def start_servers(args: argparse.Namespace, tmp: Path, procs: Supervisor) -> Bench:
    mac_groups = min(args.mac_groups, args.clients)
    machines = machines_for(args.clients, mac_groups, min(args.machines, args.clients - mac_groups))
    site = tmp / "site"
    asset_bytes = int(args.asset_mb * MIB)
    print(f"bench dir {tmp}: writing the site and a {asset_bytes / MIB:.0f} MiB asset")
    sha256 = write_site(site, machines, asset_bytes)
    canned = tmp / "canned"
    canned.mkdir()
    (tmp / "nginx").mkdir()

    # Each server and the client hold one descriptor per client connection, and then some.
    raise_fd_limit(args.clients * 2 + 256)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    c_port, n_port = free_tcp_port(), free_tcp_port()
    controller = start_server(
        procs,
        "controller",
        controller_command(site, c_port, tmp / "events.db", args.profile_controller),
        f"http://{HOST}:{c_port}",
        tmp / "controller.log",
        env=env,
        stop_signal=signal.SIGINT,  # uvicorn's graceful stop; lets cProfile write its file
    )
    (tmp / "nginx.conf").write_text(nginx_config(tmp, n_port, site, canned))
    nginx = start_server(
        procs,
        "nginx",
        [args.nginx, "-p", str(tmp), "-c", str(tmp / "nginx.conf"), "-g", "daemon off;"],
        f"http://{HOST}:{n_port}",
        tmp / "nginx" / "stdout.log",
    )
    wait_ready(controller, "/healthz")
    wait_ready(nginx, ASSET_PATH)
    print(
        f"controller (pid {controller.proc.pid}) on {controller.base}, "
        f"nginx (pid {nginx.proc.pid}) on {nginx.base}"
    )

    # nginx answers the boot endpoints with what the controller answers an anonymous machine.
    with httpx.Client(trust_env=False, timeout=10.0) as client:
        first = controller.base + "/boot.ipxe"
        boot_script = client.get(first).text
        chained = urljoin(first, chain_target(boot_script, machines[-1].ipxe_settings()))
        (canned / "boot.ipxe").write_text(boot_script)
        (canned / "ipxe").write_text(client.get(chained).text)
    for f in canned.iterdir():
        f.chmod(0o644)
    bench = Bench(args, tmp, machines, asset_bytes, sha256, controller, nginx)
    bench.warmup_requests = 2
    return bench


def check_assets(b: Bench) -> None:
    print("\nbehaviour of the asset endpoint:")
    for server in (b.controller, b.nginx):
        for c in behaviour_checks(server.base, b.asset_bytes, b.asset_sha256, b.asset_file):
            print(f"  {server.name:<10} {c.name:<14} {'ok  ' if c.ok else 'FAIL'} {c.detail}")
            b.failed |= not c.ok and server is b.controller


def boot_storms(b: Bench) -> tuple[StormResult, StormResult]:
    args = b.args
    warm_machines = b.machines[:20]

    async def warm_up() -> StormResult:
        # The first requests fill caches on both sides; not counted.
        warm = StormResult()
        for server in (b.controller, b.nginx):
            client = StormClient(server.base)
            for m in warm_machines:
                await boot_once(client, m, warm, args.timeout)
        return warm

    warm = asyncio.run(warm_up())
    if warm.error_count:
        print(f"warm-up errors: {dict(warm.errors)}")
    b.warmup_requests += warm.requests // 2
    rc = storm(b.controller, b.machines, args.boots, args.timeout, args.deadline, args.client_procs)
    rn = storm(b.nginx, b.machines, args.boots, args.timeout, args.deadline, args.client_procs)
    what = f"{args.clients} clients x {args.boots} boots, {args.client_procs} client processes"
    print_storm("boot storm, controller", rc, what)
    print_storm("boot storm, nginx with canned scripts (the load generator's ceiling)", rn, what)
    b.failed |= rc.error_count > 0
    share = rc.rate / rn.rate if rn.rate else float("nan")
    print(f"  controller rate / load generator's ceiling: {share:.2f}; {storm_verdict(rc, rn)}")
    print(storm_goal_line(rc, rn, args.clients))
    return rc, rn


# --- an open loop: boots begun on a schedule, at rates given --------------------------------------

#: A client process that begins its boots this much later than their schedule (p99) is
#: itself behind: the latencies then hold its lateness too.
LAUNCH_LAG_WARN_S = 0.010


def open_loop(b: Bench) -> list[tuple[float, StormResult, StormResult]]:
    """Each --rates rate, offered to the controller, then to nginx with the same client."""
    args = b.args
    steps = []
    print(f"\nopen loop: boots begun on schedule, {args.rate_seconds:g} s a rate, the "
          f"{len(b.machines)} clients in turn, {args.client_procs} client processes; each "
          "boot's first request timed from when it was due")  # fmt: skip
    print(f"  {'offered':>13}  {'server':<10} {'requests/s':>10} {'boot.ipxe p50':>13} "
          f"{'p99':>9} {'ipxe p99':>9} {'errors':>6} {'server CPU':>10} {'client late p99':>15}")
    for rate in args.rates:
        rc = open_storm(b.controller, b.machines, rate, args.rate_seconds, args.timeout,
                        args.client_procs)  # fmt: skip
        rn = open_storm(b.nginx, b.machines, rate, args.rate_seconds, args.timeout,
                        args.client_procs)  # fmt: skip
        for r, server in ((rc, b.controller), (rn, b.nginx)):
            first = sorted(r.latencies["boot.ipxe"])
            late = percentile(sorted(r.launch_lag), 0.99)
            print(f"  {rate:>7g} boot/s  {server.name:<10} {r.rate:>10.0f} "
                  f"{percentile(first, 0.5) * 1000:>10.1f} ms {percentile(first, 0.99) * 1000:>6.1f} ms "
                  f"{percentile(sorted(r.latencies['ipxe']), 0.99) * 1000:>6.1f} ms {r.error_count:>6} "
                  f"{r.server_cpu / r.wall:>10.2f} {late * 1000:>12.1f} ms"
                  + ("  (client behind)" if late > LAUNCH_LAG_WARN_S else ""))  # fmt: skip
            for reason, n in r.errors.most_common(3):
                print(f"      error: {reason}: {n}")
        b.failed |= wrong_answers(rc) > 0
        steps.append((rate, rc, rn))
    print(open_loop_line(steps))
    return steps


def wrong_answers(r: StormResult) -> int:
    """Errors that are not a server falling behind a rate it cannot keep (a timeout, a boot not
    begun): at a rate over its capacity those are the measurement, anything else is a fault."""
    return sum(n for reason, n in r.errors.items()
               if not reason.startswith("not begun") and not reason.endswith("TimeoutError"))  # fmt: skip


def open_loop_line(steps: list[tuple[float, StormResult, StormResult]]) -> str:
    """The highest offered rate at which each server met the storm goal's p99 with 0 errors."""
    parts = []
    for name, i in (("controller", 1), ("nginx, the same client", 2)):
        met = [step[0] for step in steps if storm_goal(step[i])[1]]
        parts.append(f"{name} {max(met):g} boots/s" if met else f"{name} none of them")
    return (f"  capacity: the highest offered rate whose first request's p99 stayed under "
            f"{STORM_P99_GOAL_S * 1000:.0f} ms with 0 errors: " + "; ".join(parts)
            + f" (of {', '.join(f'{step[0]:g}' for step in steps)})")  # fmt: skip


# --- wrk: the steady rate of /ipxe on kept-alive connections ------------------------------------


@dataclass
class WrkResult:
    requests: int = 0
    rate: float = 0.0
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    errors: int = 0
    server_cpu: float = 0.0
    client_cpu: float = 0.0
    wall: float = 0.0
    commits: tuple[float, float] | None = None  # as StormResult's


_WRK_UNIT = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def parse_wrk(out: str) -> WrkResult:
    """wrk's --latency report: requests, Requests/sec, the 50% and 99% lines, and the error
    lines (socket errors, Non-2xx); raises ValueError on text that is not one."""
    r = WrkResult()
    m = re.search(r"^\s*(\d+) requests in", out, re.MULTILINE)
    rate = re.search(r"^Requests/sec:\s*([\d.]+)", out, re.MULTILINE)
    if not m or not rate:
        raise ValueError(f"not a wrk report: {out[-300:]!r}")
    r.requests, r.rate = int(m.group(1)), float(rate.group(1))
    for q, attr in (("50", "p50_ms"), ("99", "p99_ms")):
        line = re.search(rf"^\s*{q}(?:\.000)?%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.MULTILINE)
        if line:
            setattr(r, attr, float(line.group(1)) * _WRK_UNIT[line.group(2)])
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sock:
        r.errors += sum(int(x) for x in sock.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        r.errors += int(non2xx.group(1))
    return r


def run_wrk(b: Bench, server: Server, target: str) -> WrkResult:
    args = b.args
    cmd = [args.wrk, "-t", str(args.wrk_threads), "-c", str(args.wrk_connections),
           "-d", f"{args.wrk_seconds}s", "--latency", server.base + target]  # fmt: skip
    commits0 = commit_counts(server)
    cpu0 = process_cpu_seconds(server.proc.pid)
    kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=args.wrk_seconds + 60, check=False
    )
    wall = time.perf_counter() - t0
    kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = parse_wrk(out.stdout)
    r.wall = wall
    r.server_cpu = process_cpu_seconds(server.proc.pid) - cpu0
    r.client_cpu = kids1.ru_utime + kids1.ru_stime - kids0.ru_utime - kids0.ru_stime
    r.commits = commits_since(server, commits0)
    return r


def wrk_rates(b: Bench) -> tuple[WrkResult, WrkResult] | None:
    """/ipxe for one machine, the same URL over and over on kept-alive connections, against the
    controller and against nginx's canned copy: the controller's steady rate and wrk's ceiling."""
    if b.args.wrk in ("", "none"):
        print("\nwrk: " + ("skipped (--wrk none)" if b.args.wrk else
                          "not installed (tools/debian-packages.txt lists it); skipped"))
        return None
    m = b.machines[0]
    target = "/" + chain_target((b.tmp / "canned" / "boot.ipxe").read_text(), m.ipxe_settings())
    a = b.args
    print(f"\nwrk, {a.wrk_connections} connections, {a.wrk_threads} thread(s), {a.wrk_seconds} s each, "
          f"GET {target[:60]}...:")  # fmt: skip
    rc = run_wrk(b, b.controller, target)
    rn = run_wrk(b, b.nginx, target)
    for name, r in (("controller", rc), ("nginx", rn)):
        print(f"  {name:<10} {r.rate:9.0f} requests/s  p50 {r.p50_ms:7.2f} ms  p99 {r.p99_ms:7.2f} ms  "
              f"{r.errors} errors  CPU, in cores: server {r.server_cpu / r.wall:.2f}, "
              f"wrk {r.client_cpu / r.wall:.2f}")  # fmt: skip
    b.failed |= rc.errors > 0
    print(
        f"  controller rate / nginx (wrk's ceiling): {rc.rate / rn.rate if rn.rate else float('nan'):.3f}"
    )
    # on a shared machine the controller gets a part of a core: its cost per request is the
    # figure that the other work moves least (one process: at most one core)
    per_cpu = rc.requests / rc.server_cpu if rc.server_cpu else float("nan")
    print(f"  controller: {per_cpu:.0f} requests per CPU-second ({1e6 / per_cpu:.0f} us each)")
    if line := commits_line(rc.commits):
        print(line)
    print(f"  goal: /ipxe at {IPXE_RATE_GOAL} requests/s or more on one core, the history on: "
          f"controller {rc.rate:.0f} at {rc.server_cpu / rc.wall:.2f} core: "
          f"{'met' if rc.rate >= IPXE_RATE_GOAL and rc.errors == 0 else 'MISSED'}")  # fmt: skip
    return rc, rn


def downloads(b: Bench) -> tuple[float, dict[str, list[float]]]:
    """Interleaved curl downloads of the asset; returns (median ratio, bytes/s per server)."""
    reps = b.args.reps
    print(
        f"\nasset download, {b.asset_bytes / MIB:.0f} MiB with curl, {reps} reps each, interleaved:"
    )
    names = ("controller", "nginx")
    speeds: dict[str, list[float]] = {n: [] for n in names}
    server_cpu: dict[str, list[float]] = {n: [] for n in names}
    curl_cpu: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        order = (b.controller, b.nginx) if rep % 2 == 0 else (b.nginx, b.controller)
        for server in order:
            cpu0 = process_cpu_seconds(server.proc.pid)
            kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            code, size, speed = curl_download(b.args.curl, server.base + ASSET_PATH, b.args.timeout)
            kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            server_cpu[server.name].append(process_cpu_seconds(server.proc.pid) - cpu0)
            curl_cpu[server.name].append(
                kids1.ru_utime + kids1.ru_stime - kids0.ru_utime - kids0.ru_stime
            )
            ok = code == 200 and size == b.asset_bytes
            print(
                f"  rep {rep + 1} {server.name:<10} {speed / MIB:8.1f} MiB/s  ({code}, {size} bytes)"
                + ("" if ok else "  FAIL")
            )
            if ok:
                speeds[server.name].append(speed)
            b.failed |= not ok
    med = {k: statistics.median(v) if v else float("nan") for k, v in speeds.items()}
    for name, v in speeds.items():
        print(
            f"  {name:<10} median {med[name] / MIB:7.1f} MiB/s "
            f"(min {min(v, default=0) / MIB:.1f}, max {max(v, default=0) / MIB:.1f}); "
            f"CPU per download: server {statistics.median(server_cpu[name]):.3f} s, "
            f"curl {statistics.median(curl_cpu[name]):.3f} s"
        )
    ratio = med["controller"] / med["nginx"] if med["nginx"] else float("nan")
    print(f"asset throughput ratio controller/nginx: {ratio:.3f}")
    return ratio, speeds


def check_events(b: Bench, storm_requests: int, wrk_requests: int) -> None:
    print("\nwhat the controller recorded:")
    for c in event_checks(
        b.tmp / "events.db",
        b.machines,
        storm_requests + b.warmup_requests,
        wrk_requests,
        b.args.wrk_connections if wrk_requests else 0,
    ):
        print(f"  {c.name:<22} {'ok  ' if c.ok else 'FAIL'} {c.detail}")
        b.failed |= not c.ok


def run(args: argparse.Namespace, tmp: Path, procs: Supervisor) -> int:
    b = start_servers(args, tmp, procs)
    check_assets(b)
    print(f"load: {load_average()}")
    wrk = wrk_rates(b)
    rc, rn = boot_storms(b)
    steps = open_loop(b) if args.rates else []
    ratio, speeds = downloads(b)
    check_events(b, rc.requests + sum(step[1].requests for step in steps),
                 wrk[0].requests if wrk else 0)  # fmt: skip
    print(f"load: {load_average()}")
    if args.json:
        summary = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "cpus": os.cpu_count(),
            "clients": args.clients,
            "boots": args.boots,
            "asset_mib": b.asset_bytes / MIB,
            "storm": {"controller": storm_summary(rc), "nginx": storm_summary(rn)},
            "open_loop": [{"offered_boots_per_s": rate, "seconds": args.rate_seconds,
                           "controller": storm_summary(c), "nginx": storm_summary(n)}
                          for rate, c, n in steps],
            "wrk": {"controller": wrk_summary(wrk[0]), "nginx": wrk_summary(wrk[1])}
            if wrk
            else None,
            "download_mib_per_s": {k: [round(s / MIB, 1) for s in v] for k, v in speeds.items()},
            "asset_ratio_controller_over_nginx": round(ratio, 4),
            "failed": b.failed,
        }
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nresult: {'FAIL' if b.failed else 'ok'}")
    return 1 if b.failed else 0


def rates_list(text: str) -> list[float]:
    """--rates: positive numbers, comma-separated, in the order given."""
    try:
        rates = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not all(0 < r < math.inf for r in rates):
        raise argparse.ArgumentTypeError(f"{text!r}: every rate must be a positive number of boots a second")
    return rates


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark the controller's boot endpoints (a storm of iPXE clients) and its "
        "asset downloads against nginx. Loopback only; stops by itself.",
    )
    p.add_argument(
        "--clients", type=int, default=1000, help="concurrent iPXE clients (default 1000)"
    )
    p.add_argument(
        "--boots",
        type=int,
        default=5,
        help="boots per client, each on a new connection (default 5)",
    )
    p.add_argument(
        "--mac-groups", type=int, default=8, help="groups that select one client's MAC (default 8)"
    )
    p.add_argument(
        "--machines",
        type=int,
        default=0,
        help="clients declared in machines.yaml, after the --mac-groups ones: a site of that many "
        "machines, each its own group, whose boots the operator follows (default 0)",
    )
    p.add_argument(
        "--asset-mb",
        type=float,
        default=64,
        help="size of the downloaded asset in MiB (default 64)",
    )
    p.add_argument("--reps", type=int, default=5, help="downloads per server (default 5)")
    p.add_argument(
        "--timeout",
        type=float,
        default=60,
        help="seconds one request or download may take (default 60)",
    )
    p.add_argument(
        "--deadline", type=float, default=300, help="seconds one boot storm may take (default 300)"
    )
    p.add_argument(
        "--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx", help="the nginx binary"
    )
    p.add_argument(
        "--curl", default=shutil.which("curl") or "/usr/bin/curl", help="the curl binary"
    )
    p.add_argument(
        "--client-procs",
        type=int,
        default=2,
        help="client processes that share the boot storm's clients (default 2)",
    )
    p.add_argument(
        "--wrk",
        default=shutil.which("wrk") or "",
        help="the wrk binary (default: wrk on PATH); 'none', or no wrk on PATH: the wrk phase "
        "is skipped",
    )
    p.add_argument("--wrk-seconds", type=int, default=10, help="seconds per wrk run (default 10)")
    p.add_argument("--wrk-connections", type=int, default=50, help="wrk's connections (default 50)")
    p.add_argument("--wrk-threads", type=int, default=1, help="wrk's threads (default 1)")
    p.add_argument(
        "--rates",
        type=rates_list,
        default=[],
        metavar="R[,R...]",
        help="after the storms, an open loop at each rate: R boots a second begun on schedule "
        "whether or not the earlier ones were answered, each timed from when it was due, "
        "against the controller and then nginx; prints the highest rate that kept the first "
        "request's p99 under 100 ms (default: none)",
    )
    p.add_argument(
        "--rate-seconds",
        type=float,
        default=5,
        help="seconds each --rates rate is offered for (default 5)",
    )
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument(
        "--keep", action="store_true", help="keep the temporary directory (logs, site, DB)"
    )
    p.add_argument(
        "--profile-controller",
        metavar="FILE",
        type=lambda s: Path(s).resolve(),
        help="run the controller under cProfile and write its profile to FILE",
    )
    args = p.parse_args(argv)
    for name in (
        "clients",
        "boots",
        "reps",
        "client_procs",
        "wrk_seconds",
        "wrk_connections",
        "wrk_threads",
    ):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.mac_groups < 0:
        p.error("--mac-groups must not be negative")
    if args.machines < 0:
        p.error("--machines must not be negative")
    if args.asset_mb <= 0:
        p.error("--asset-mb must be positive")
    if args.rate_seconds <= 0:
        p.error("--rate-seconds must be positive")
    for tool in (args.nginx, args.curl):
        if not (shutil.which(tool) or os.access(tool, os.X_OK)):
            p.error(f"{tool} not found (tools/setup installs nginx-light and curl)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress shows up at once through a pipe too
    tmp = Path(tempfile.mkdtemp(prefix="bastion-http-bench-"))
    procs = Supervisor(grace=10.0)

    def cleanup() -> None:
        procs.stop_all()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    return run_with_cleanup(lambda: run(args, tmp, procs), cleanup, errors=(ServerDidNotStart,))


if __name__ == "__main__":
    sys.exit(main())
