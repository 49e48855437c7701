"""The nodes' consoles on the controller (bastion.device.consoles, bastion.api.consoles,
`bastion console NAME`): the kept logs (rotation, gap markers), the log endpoint and the
WebSocket with their token rules, and end to end against the real sim board through a real
`bastion serve`, with a test process as the node on the console's unix socket."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from bastion_testkit import TOKEN, Server, auth

from bastion.device.consoles import ConsoleLogs, gap_note, missed_note
from simkit import SimProcess, wait_for

BIN = Path(sys.executable).parent
POWER = {"stagger_ms": 200, "channels": [{"name": "node1"}, {"name": "node2"}, {"name": "pi1"}]}


# --- the kept logs ---------------------------------------------------------------------------
def test_logs_rotate_within_their_bound_and_keep_the_newest(tmp_path):
    logs = ConsoleLogs(tmp_path, max_bytes=1000, keep=2)
    at = 0
    sent = b""
    for i in range(50):
        chunk = b"line %03d of the boot\r\n" % i  # 22 bytes
        logs.feed("node1", 0, "b1", at, chunk)
        at += len(chunk)
        sent += chunk
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["node1.log", "node1.log.1"]
    assert all(p.stat().st_size <= 1000 + 22 for p in tmp_path.iterdir())
    kept = logs.read("node1")
    assert sent.endswith(kept) and len(kept) > 1000  # the newest, whole lines, in order
    assert logs.read("node1", tail=22) == b"line 049 of the boot\r\n"
    assert logs.counts["rotations"] == 1
    for _ in range(200):
        logs.feed("node1", 0, "b1", at, b"x" * 100)
        at += 100
    names = {p.name for p in tmp_path.iterdir()}  # .log, .log.1, .log.2: never more
    assert {"node1.log.1", "node1.log.2"} <= names <= {"node1.log", "node1.log.1", "node1.log.2"}
    assert len(logs.read("node1")) <= 3 * 1100
    logs.close()


def test_a_gap_in_the_device_offsets_is_written_as_what_was_dropped(tmp_path):
    logs = ConsoleLogs(tmp_path)
    logs.feed("node2", 1, "b1", 0, b"abc")
    logs.feed("node2", 1, "b1", 103, b"def")  # 100 bytes the device dropped
    logs.feed("node2", 1, "b2", 0, b"new boot")  # a new device boot: offsets start again
    assert logs.read("node2") == b"abc" + gap_note(100) + b"def" + b"new boot"
    assert logs.counts["dropped"] == 100 and logs.counts["gaps"] == 1
    with pytest.raises(ValueError):
        logs.path("../etc/passwd")


def test_a_gap_across_a_reconnect_is_said_as_bytes_the_line_missed_not_as_dropped(tmp_path):
    logs = ConsoleLogs(tmp_path)
    logs.feed("node2", 1, "b1", 0, b"abc", connection=1)
    logs.feed("node2", 1, "b1", 503, b"def", connection=2)  # 500 bytes sent into a pulled cable
    assert logs.read("node2") == b"abc" + missed_note(500) + b"def"
    assert b"dropped by the device" not in logs.read("node2")
    assert logs.counts["missed"] == 500 and logs.counts["dropped"] == 0


def test_offsets_that_go_back_are_a_device_restart_not_a_gap(tmp_path):
    # a frame the link could not tell was of a new boot (no event or hello between): its
    # offsets start again near 0, which is no gap of (0 - 5003) mod 2**30 bytes
    logs = ConsoleLogs(tmp_path)
    logs.feed("node2", 1, "b1", 5000, b"abc", connection=1)
    logs.feed("node2", 1, "b1", 0, b"new boot", connection=1)
    logs.feed("node2", 1, "b1", 8, b"!", connection=1)
    assert logs.read("node2") == b"abc" + b"new boot" + b"!"
    assert logs.counts["gaps"] == 0 and logs.counts["dropped"] == 0


def test_a_device_restart_writes_no_false_gap_into_the_log(tmp_path):
    from bastion.device.link import DeviceLink

    node_says = threading.Event()
    with SimProcess(tmp_path / "flash", tmp_path / "ttyACM0", {"power": POWER},
                    args=("--heap", "160k")) as board:  # fmt: skip
        logs = ConsoleLogs(tmp_path / "consoles")

        def node():  # node2 prints all along, across the device's restart
            path = board.link.parent / "flash" / "consoles" / "1.sock"
            i = 0
            while not node_says.is_set():
                try:
                    with socket.socket(socket.AF_UNIX) as sock:
                        sock.connect(str(path))
                        while not node_says.is_set():
                            sock.sendall(b"line %06d of the node's console\r\n" % i)
                            i += 1
                            node_says.wait(0.01)
                except OSError:
                    node_says.wait(0.05)

        try:
            with DeviceLink(str(board.link), timeout_s=10) as link:
                link.on_console(lambda c: logs.feed("node2", c.ch, c.boot, c.at, c.data,
                                                    connection=c.connection))  # fmt: skip
                assert link.wait_ready(15), link.last_error
                # The node starts once the link is up: what it printed before would be the
                # first of its console the controller ever saw only if the device's ring (1 KB,
                # some 30 lines) still held it when the link came up, which a busy machine
                # (the link up after more than 0.3 s) did not give.
                threading.Thread(target=node, daemon=True).start()
                wait_for(lambda: logs.counts["bytes"] > 1000, what="console bytes")
                before = link.boot
                link.request("reboot")
                wait_for(lambda: link.ready and link.boot != before, 30, "the new boot")
                seen = logs.counts["bytes"]
                wait_for(lambda: logs.counts["bytes"] > seen + 1000, what="the new boot's bytes")
        finally:
            node_says.set()
        logs.close()
    log = logs.read("node2")
    assert b"line 000000" in log and b"dropped by the device" not in log, log[-2000:]
    assert logs.counts["dropped"] == 0


def test_a_subscriber_gets_the_backlog_then_every_byte_once(tmp_path):
    logs = ConsoleLogs(tmp_path, backlog=10)

    async def main():
        logs.feed("pi1", 2, "b", 0, b"0123456789abcdef")
        sub, backlog = logs.subscribe("pi1", asyncio.get_running_loop())
        assert backlog == b"6789abcdef"
        threading.Thread(target=logs.feed, args=("pi1", 2, "b", 16, b"live")).start()
        assert await asyncio.wait_for(sub.get(), 5) == b"live"

    asyncio.run(main())


# --- the API with no device ------------------------------------------------------------------
@pytest.fixture
def api(site_dir, tmp_path):
    from fastapi.testclient import TestClient

    from bastion.api.main import create_app
    from bastion.settings import Settings

    app = create_app(Settings(site_dir=site_dir, db_path=tmp_path / "events.db", api_token=TOKEN,
                              poll_seconds=0, console_dir=tmp_path / "consoles"))
    with TestClient(app) as c:
        c.app.state.runtime.consoles.feed("node1", 0, "b", 0, b"kept before\r\n")
        yield c


def test_the_log_needs_the_token_and_names_unknown_machines(api):
    assert api.get("/api/v1/machines/node1/console").status_code == 401
    r = api.get("/api/v1/machines/node1/console", headers=auth("wrong"))
    assert r.status_code == 401 and r.json()["detail"] == "wrong token"
    r = api.get("/api/v1/machines/node1/console", headers=auth())
    assert r.status_code == 200 and r.content == b"kept before\r\n"
    r = api.get("/api/v1/machines/nobody/console", headers=auth())
    assert r.status_code == 404 and "no machine 'nobody'" in r.json()["detail"]
    assert api.get("/api/v1/machines/node2/console", headers=auth()).content == b""


@pytest.mark.parametrize(("first", "reason"), [
    ({"text": json.dumps({"token": "wrong"})}, "wrong token"),
    ({"text": json.dumps({})}, "a bearer token is required"),
    ({"text": "token please"}, 'the first message must be JSON {"token": "..."}'),
    ({"bytes": b"\x00"}, 'the first message must be a text frame {"token": "..."}'),
])
def test_the_stream_without_the_right_token_closes_with_the_reason(api, first, reason):
    from starlette.websockets import WebSocketDisconnect

    with api.websocket_connect("/api/v1/machines/node1/console/stream") as ws:
        ws.send(dict(type="websocket.receive", **first))
        with pytest.raises(WebSocketDisconnect) as e:
            ws.receive_bytes()
    assert e.value.code == 1008 and e.value.reason == reason


def test_the_stream_takes_the_token_with_spaces_around_it_as_the_api_does(api):
    # a token pasted with a space or line break: GET /api/v1/auth takes it (HTTP strips a
    # header's value), so the console page would keep it, and the stream must take it too
    assert api.get("/api/v1/auth", headers={"Authorization": f"Bearer {TOKEN} "}).status_code == 200
    with api.websocket_connect("/api/v1/machines/node1/console/stream") as ws:
        ws.send_text(json.dumps({"token": f" {TOKEN}\n"}))
        assert ws.receive_bytes() == b"kept before\r\n"


def test_the_stream_without_a_device_shows_the_log_and_says_why_it_ends(api):
    from starlette.websockets import WebSocketDisconnect

    with api.websocket_connect("/api/v1/machines/node1/console/stream") as ws:
        ws.send_text(json.dumps({"token": TOKEN}))
        assert ws.receive_bytes() == b"kept before\r\n"
        with pytest.raises(WebSocketDisconnect) as e:
            ws.receive_bytes()
    assert e.value.code == 1011 and "no device" in e.value.reason


def test_typing_takes_one_of_the_device_threads_as_the_device_api_does(api):
    # Each `cin` exchange blocks a worker thread for up to its timeout, as a power request
    # does: typing into a silent device must wait for one of the DEVICE_THREADS, not take the
    # threads a node's /ignition needs (test_device_api.py, a silent device).
    runtime = api.app.state.runtime
    seen: list[tuple[bytes, int | None]] = []

    class StandInHub:
        """STAND-IN for DeviceHub: a console wired to every machine, that takes every byte."""

        def console_channel(self, name: str) -> int:
            return 0

        def console_write(self, name: str, data: bytes) -> int:
            calls = runtime.device_calls
            seen.append((data, calls.limiter.borrowed_tokens if calls is not None else None))
            return len(data)

    runtime.device = StandInHub()
    try:
        with api.websocket_connect("/api/v1/machines/node1/console/stream") as ws:
            ws.send_text(json.dumps({"token": TOKEN}))
            assert ws.receive_bytes() == b"kept before\r\n"
            ws.send_bytes(b"uname -a\n")
            wait_for(lambda: seen, what="the bytes typed")
    finally:
        runtime.device = None
    assert seen == [(b"uname -a\n", 1)]


# --- end to end: the sim board, `bastion serve`, the WebSocket and the CLI -----------------------
@pytest.fixture
def board(tmp_path):
    # node consoles need 160k on the 64-bit port (firmware/main.py NODECONS_MIN_FREE)
    with SimProcess(tmp_path / "flash", tmp_path / "ttyACM0", {"power": POWER},
                    args=("--heap", "160k")) as s:
        yield s


class Node:
    """A test process as node2's serial console (relay channel 1): the other end of the sim
    board's console socket. Everything typed into it is kept in `typed`."""

    def __init__(self, board, answer: dict[bytes, bytes] | None = None):
        path = board.link.parent / "flash" / "consoles" / "1.sock"
        wait_for(path.exists, what=str(path))
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.typed = b""
        self.answer = answer or {}  # a line typed -> what the node then prints, as a shell
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                return
            if not data:
                return
            self.typed += data
            for line, out in self.answer.items():
                if self.typed.endswith(line):
                    self.say(out)

    def say(self, data: bytes):
        self.sock.sendall(data)


def bastion(*args: str, stdin: bytes = b"", env: dict | None = None):
    return subprocess.run([str(BIN / "bastion"), *args], input=stdin, capture_output=True,
                          timeout=60, env={**os.environ, **(env or {})})  # fmt: skip


def controller_of(board, site_dir, tmp_path) -> Server:
    """A real `bastion serve` holding the board's line, its consoles kept in tmp_path, once the
    link is up (stopped by the caller)."""
    srv = Server(site_dir, tmp_path / "events.db", TOKEN, device=str(board.link),
                 args=("--console-dir", str(tmp_path / "consoles")))
    try:
        wait_for(lambda: srv.get("/api/v1/device").json().get("connected"), what="device link")
    except BaseException:
        srv.stop()
        raise
    return srv


def test_console_end_to_end_through_the_controller(board, site_dir, tmp_path):
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    node = Node(board)
    srv = controller_of(board, site_dir, tmp_path)
    try:
        node.say(b"Linux version 6.1.0 (debian-kernel@lists.debian.org)\r\n")
        log = "/api/v1/machines/node2/console"
        wait_for(lambda: b"Linux version" in srv.get(log, headers=auth()).content, what="kept")

        ws_url = srv.url.replace("http://", "ws://") + "/api/v1/machines/node2/console/stream"
        with connect(ws_url, open_timeout=10) as ws:
            ws.send(json.dumps({"token": TOKEN}))
            assert ws.recv(10) == b"Linux version 6.1.0 (debian-kernel@lists.debian.org)\r\n"
            ws.send(b"echo hi\n")
            wait_for(lambda: node.typed == b"echo hi\n", what="typed at the node")
            node.say(b"echo hi\r\nhi\r\n~ # ")
            got = b""
            while b"~ # " not in got:
                got += ws.recv(10)
            assert got == b"echo hi\r\nhi\r\n~ # "
            ws.send("text frames are typed too\n")
            wait_for(lambda: node.typed.endswith(b"text frames are typed too\n"), what="text")
        with connect(ws_url, open_timeout=10) as ws:
            ws.send(json.dumps({"token": "nope"}))
            with pytest.raises(ConnectionClosed) as e:
                ws.recv(10)
            assert e.value.rcvd.code == 1008 and e.value.rcvd.reason == "wrong token"

        # the log keeps what was shown after the stream closed
        kept = srv.get(log, headers=auth()).content
        assert kept == (b"Linux version 6.1.0 (debian-kernel@lists.debian.org)\r\n"
                        b"echo hi\r\nhi\r\n~ # ")

        env = {"BASTION_API_TOKEN": TOKEN}
        r = bastion("console", "node2", "--url", srv.url, "--log", env=env)
        assert r.returncode == 0, r.stderr
        assert r.stdout == kept
        # stdin not a terminal: typed in, the output shown for --after-eof seconds
        node.typed = b""
        node.answer = {b"uname\n": b"uname\r\nLinux\r\n"}
        r = bastion("console", "node2", "--url", srv.url, "--after-eof", "4", stdin=b"uname\n",
                    env=env)  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert node.typed == b"uname\n"
        assert r.stdout.startswith(kept) and r.stdout.endswith(b"uname\r\nLinux\r\n")
        r = bastion("console", "node2", "--url", srv.url, env={"BASTION_API_TOKEN": "nope"})
        assert r.returncode == 1 and b"console node2: wrong token (code 1008)" in r.stderr
        r = bastion("console", "nobody", "--url", srv.url, env=env)
        assert r.returncode == 1
        assert b"console nobody: no machine 'nobody' in the site (code 1008)" in r.stderr
    finally:
        srv.stop()
        node.sock.close()


def test_a_long_machine_name_has_its_console_and_a_lost_controller_is_said(board, site_dir, tmp_path):
    # A name of 64-128 characters (the site allows 128) got no log at all and a bare 500; and
    # `bastion console` exited 0, saying nothing, when the controller went away mid-session.
    long = "n" + "0123456789" * 7
    m = site_dir / "machines.yaml"
    m.write_text(m.read_text().replace("  - name: node2\n", f"  - name: {long}\n", 1))
    node = Node(board)
    srv = controller_of(board, site_dir, tmp_path)
    try:
        node.say(b"login: ")
        log = f"/api/v1/machines/{long}/console"
        wait_for(lambda: srv.get(log, headers=auth()).content == b"login: ", what="kept")
        session = subprocess.Popen([str(BIN / "bastion"), "console", long, "--url", srv.url],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   env={**os.environ, "BASTION_API_TOKEN": TOKEN})  # fmt: skip
        wait_for(lambda: node.typed == b"" and session.poll() is None, what="session open")
        session.stdin.write(b"root\n")
        session.stdin.flush()
        wait_for(lambda: node.typed == b"root\n", what="typed at the node")
        srv.proc.kill()  # the controller dies: no close frame
        out, err = session.communicate(timeout=30)
        assert session.returncode == 1, (out, err)
        assert b"the connection to the controller was lost" in err
        assert out == b"login: "
    finally:
        srv.stop()
        node.sock.close()


def test_status_shows_what_the_consoles_carried_and_dropped(board):
    # the device's console counters (what it dropped, above all) were only in --json
    node = Node(board)
    try:
        node.say(b"x" * 100)
        r = bastion("status", "--port", str(board.link))
        assert r.returncode == 0, r.stderr
        text = " ".join(r.stdout.decode().split())  # (rich wraps at 80 columns off a terminal)
        assert "node consoles: ch 0 rx 0 sent 0 dropped 0, ch 1 rx 100 sent 100 dropped 0" in text, text
        assert "live peak" in text and "allocated now (garbage included)" in text
    finally:
        node.sock.close()


def test_console_straight_over_the_serial_line(board):
    node = Node(board, answer={b"root\n": b"root\r\nPassword: "})
    r = bastion("console", "1", "--port", str(board.link), "--after-eof", "4", stdin=b"root\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"root\r\nPassword: "
    assert node.typed == b"root\n"
    r = bastion("console", "7", "--port", str(board.link), stdin=b"")
    assert r.returncode == 1 and b"no console on channel 7" in r.stderr


def test_console_over_the_serial_line_says_in_one_line_that_the_device_went(board):
    node = Node(board)
    p = subprocess.Popen([str(BIN / "bastion"), "console", "1", "--port", str(board.link),
                          "--after-eof", "1"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)  # fmt: skip
    try:
        p.stdin.write(b"id\n")
        p.stdin.flush()
        wait_for(lambda: node.typed == b"id\n", what="the console up")
        board.stop()  # the device goes (a pulled cable, a dead board) ...
        p.stdin.write(b"uname -a\n")  # ... before what is typed reaches it
        p.stdin.close()
        assert p.wait(60) == 1
        err = p.stderr.read().decode()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("Error: console 1: ") and "not sent" in err, err


def test_a_cin_reply_without_a_byte_count_is_a_device_error():
    from bastion.device.consoles import console_writer
    from bastion.device.link import DeviceError

    for reply in ({"ok": True, "cons": 1}, {"ok": True, "n": "3"}, {"ok": True, "n": 9}):
        write = console_writer(lambda op, r=reply, **kw: dict(r), 1)
        with pytest.raises(DeviceError, match="cin: the device's reply"):
            write(b"abc")


def test_on_a_terminal_keys_go_raw_to_the_node_and_ctrl_close_bracket_leaves(board):
    import pty
    import select as select_mod
    import time

    node = Node(board)
    pid, fd = pty.fork()
    if pid == 0:  # the child: bastion console on the pty, as a person's terminal
        os.execv(str(BIN / "bastion"), [str(BIN / "bastion"), "console", "1", "--port",
                                        str(board.link)])  # fmt: skip
    out = b""

    def read_until(pred, timeout=30):
        nonlocal out
        deadline = time.monotonic() + timeout
        while not pred() and time.monotonic() < deadline:
            if select_mod.select([fd], [], [], 0.2)[0]:
                try:
                    out += os.read(fd, 4096)
                except OSError:
                    return
    try:
        read_until(lambda: b"Ctrl-] leaves" in out)
        assert b"[bastion: 1's console; Ctrl-] leaves]" in out
        # the banner comes once the link is ready and the terminal is raw
        os.write(fd, b"ls\x03\r")  # Ctrl-C is a key for the node, not for bastion: raw mode
        wait_for(lambda: node.typed.endswith(b"ls\x03\r"), what="raw keys at the node")
        node.say(b"bin  etc  proc\r\n")
        read_until(lambda: b"bin  etc  proc" in out)
        assert b"bin  etc  proc" in out
        os.write(fd, b"\x1d")  # Ctrl-]
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.waitstatus_to_exitcode(status) == 0
        assert b"\x1d" not in node.typed
    finally:
        if pid:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)


def test_a_console_log_is_the_controllers_alone_whatever_the_umask(tmp_path, umask_022):
    """Consoles show secrets (the API wants the token for them): under umask 022 the log and its
    directory would be readable by every local user."""
    d = tmp_path / "consoles" / "site-1234"
    logs = ConsoleLogs(d, max_bytes=100, keep=1)
    logs.feed("node1", 0, "b1", 0, b"k3s token K10... " * 10)  # past max_bytes: rotated
    logs.feed("node1", 0, "b1", 170, b"login:")
    logs.close()
    assert {p.name for p in d.iterdir()} == {"node1.log", "node1.log.1"}
    for p in (tmp_path / "consoles", d):
        assert oct(p.stat().st_mode & 0o777) == oct(0o700), p
    for p in d.iterdir():
        assert oct(p.stat().st_mode & 0o777) == oct(0o600), p
