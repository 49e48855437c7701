"""Helpers for the controller tests (imported by conftest.py and the tests)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import select
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from bastion.lab.netns import stop_process

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
TOKEN = "test-token-0123456789abcdef"
IGNITION_VALIDATE = shutil.which("ignition-validate") or "/usr/bin/ignition-validate"


def write_assets(site: Path, subdirs: tuple[str, ...]) -> dict[str, bytes]:
    """Fake Flatcar kernel and initrd (random bytes) under assets/<subdir>/; returns path->data."""
    out = {}
    for i, sub in enumerate(subdirs):
        d = site / "assets" / sub
        d.mkdir(parents=True, exist_ok=True)
        for name, size in (("flatcar_production_pxe.vmlinuz", 300_000 + i), ("flatcar_production_pxe_image.cpio.gz", 1_200_000 + i)):
            data = os.urandom(size)
            (d / name).write_bytes(data)
            out[f"{sub}/{name}"] = data
    return out


def make_app(site: Path, db: Path, token: str | None = TOKEN, poll: float = 0):
    from bastion.api.main import create_app
    from bastion.settings import Settings

    return create_app(Settings(site_dir=site, db_path=db, api_token=token, poll_seconds=poll))


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def ignition_validate(config: dict | str, tmp_path: Path) -> subprocess.CompletedProcess:
    text = config if isinstance(config, str) else json.dumps(config)
    path = tmp_path / f"cfg-{abs(hash(text))}.ign"
    path.write_text(text)
    return subprocess.run([IGNITION_VALIDATE, str(path)], capture_output=True, text=True, timeout=30)


def assert_valid_ignition(config: dict | str, tmp_path: Path) -> None:
    result = ignition_validate(config, tmp_path)
    assert result.returncode == 0, f"ignition-validate refused it:\n{result.stdout}{result.stderr}\n{config}"


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`bastion serve` (real uvicorn) in a subprocess on 127.0.0.1. `nofile`: its RLIMIT_NOFILE
    (soft and hard), as a service unit's LimitNOFILE= would set it; `access_log`: uvicorn's
    access log on (in `log` with everything else); `port`: a stopped server's, to restart it
    where its clients knew it."""

    def __init__(self, site: Path, db: Path, token: str | None, poll: float = 0.2,
                 device: str | None = None, args: tuple[str, ...] = (), nofile: int | None = None,
                 access_log: bool = False, port: int | None = None):
        self.port = port or free_tcp_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db = db
        env = {**os.environ, "BASTION_API_TOKEN": token or "", "PYTHONUNBUFFERED": "1"}
        if not token:
            env.pop("BASTION_API_TOKEN")
        self.log = db.with_suffix(".log")
        self._log_file = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bastion.serve_cli", "serve", "--site", str(site),
             "--listen", f"127.0.0.1:{self.port}", "--db", str(db), "--poll", str(poll),
             "--access-log" if access_log else "--no-access-log",
             "--log-level", "info" if access_log else "warning",
             *(["--device", device] if device else []), *args],
            stdout=self._log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            preexec_fn=(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile)))
            if nofile else None,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bastion serve exited {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"bastion serve did not come up:\n{self.log.read_text()}")
            time.sleep(0.05)

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30, **kw)

    def stop(self) -> None:
        stop_process(self.proc, grace=10)
        self._log_file.close()


def curl(*args: str, timeout: int = 30) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", *args], capture_output=True, timeout=timeout)


# -- hostile clients (tests/controller/api: limits, connection bounds, reliability) -------


def request_head(method: str, path: str, port: int, *lines: str) -> bytes:
    """A request head as bytes, with Host and these header lines."""
    return (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n" + "".join(f"{x}\r\n" for x in lines)
            + "\r\n").encode()  # fmt: skip


def push_body(port: int, head: bytes, total: int, chunked: bool = False) -> tuple[int, int]:
    """Send the head, then up to `total` bytes of body as fast as the server takes them, reading
    as we go; returns (the answer's status, body bytes the server took before it answered and
    hung up)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(head)
    s.setblocking(False)
    piece = b"x" * 65536
    if chunked:
        piece = b"%x\r\n" % len(piece) + piece + b"\r\n"
    sent, answer, stopped = 0, b"", False
    deadline = time.monotonic() + 120  # a guard against a hang, not a measure
    try:
        while time.monotonic() < deadline:
            writing = [s] if sent < total and not stopped else []
            readable, writable, _ = select.select([s], writing, [], 1)
            if readable:
                try:
                    data = s.recv(65536)
                except ConnectionResetError:
                    break
                if not data:
                    break
                answer += data
            if writable:
                try:
                    sent += s.send(piece)
                except (BrokenPipeError, ConnectionResetError):
                    stopped = True  # the server hung up; read what is left
        else:
            raise AssertionError("no answer and no hang-up within the guard time")
    finally:
        s.close()
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    return int(answer.split()[1]), sent


def vm_peak_kb(pid: int) -> int:
    """The process's peak resident memory (VmHWM), in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@contextlib.contextmanager
def held(port: int, n: int, first_bytes: bytes = b""):
    """n connections to the server, each having sent `first_bytes` (nothing: idle), held open."""
    socks = []
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            if first_bytes:
                s.sendall(first_bytes)
            socks.append(s)
        yield socks
    finally:
        for s in socks:
            s.close()


# -- Prometheus text (our own reading of the 0.0.4 format, not the library that wrote it) --

_SAMPLE = re.compile(
    r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*",?)*\})? (\S+)$'
)
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\.)*)"')


def metric(c, name: str, **labels: str) -> float | None:
    """One sample of the app's /metrics, by name and labels."""
    return parse_prometheus(c.get("/metrics").text)[1].get((name, frozenset(labels.items())))


def parse_prometheus(text: str) -> tuple[dict[str, str], dict[tuple[str, frozenset], float]]:
    """The text exposition format 0.0.4: HELP/TYPE comments, then `name{labels} value` samples."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    samples: dict[tuple[str, frozenset], float] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            assert name not in types, f"TYPE given twice for {name}"
            types[name] = kind
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        name, labels, value = (
            m.group(1),
            frozenset(_LABEL.findall(m.group(2) or "")),
            float(m.group(3)),
        )
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        assert family in types, f"{name} has no TYPE line before it"
        assert (name, labels) not in samples, f"{line} given twice"
        samples[(name, labels)] = value
    return types, samples
