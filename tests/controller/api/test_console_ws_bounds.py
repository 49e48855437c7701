"""The console's WebSocket takes messages of a console's size only, checked on the frame's
header before its payload is read (bastion.api.consoles.MAX_MESSAGE_BYTES), and a socket that
has not shown the token gives its place under the connection cap to a boot request
(bastion.api.httpserver): against a real `bastion serve` on 127.0.0.1, with raw sockets."""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import threading
import time

import pytest
from bastion.api.consoles import MAX_MESSAGE_BYTES
from bastion_testkit import TOKEN, Server, parse_prometheus
from simkit import SimProcess, wait_for

PATH = "/api/v1/machines/node1/console/stream"


@pytest.fixture
def server(serve, site_dir):
    return serve(site_dir)


def upgrade(port: int, source: str = "127.0.0.1", path: str = PATH) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n").encode())  # fmt: skip
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        assert chunk, f"closed during the handshake: {head!r}"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return s


def text_frame_head(length: int) -> bytes:
    """A client's (masked) text frame header announcing `length` payload bytes; the mask is
    all zeros, so the payload goes as it is."""
    return bytes([0x81, 0x80 | 127]) + struct.pack("!Q", length) + b"\0\0\0\0"


def close_code(s: socket.socket) -> tuple[int, bytes]:
    """The code and reason of the server's close frame (the first frame it sends here)."""
    data = b""
    while len(data) < 2 or len(data) < 2 + (data[1] & 0x7F):
        chunk = s.recv(4096)
        assert chunk, f"closed without a close frame: {data!r}"
        data += chunk
    assert data[0] == 0x88, f"not a close frame: {data[:20]!r}"
    payload = data[2 : 2 + (data[1] & 0x7F)]
    return struct.unpack("!H", payload[:2])[0], payload[2:]


def test_an_oversized_first_message_is_refused_on_its_header(server):
    # a token message 16 times the bound, of which only 4 KiB is ever sent: the server must
    # answer on the header, not wait for the rest (it used to hold all of it until the
    # 10 s token timeout, then close with 1008)
    with upgrade(server.port) as s:
        s.sendall(text_frame_head(16 * MAX_MESSAGE_BYTES) + b'{"token": "' + b"A" * 4096)
        code, reason = close_code(s)
    assert code == 1009, (code, reason)


def test_a_message_within_the_bound_is_taken(server):
    # a token message just under the bound is read and judged: wrong token, 1008
    body = b'{"token": "' + b"A" * (MAX_MESSAGE_BYTES - 20) + b'"}'
    assert len(body) <= MAX_MESSAGE_BYTES
    with upgrade(server.port) as s:
        s.sendall(text_frame_head(len(body)) + body)
        code, reason = close_code(s)
    assert code == 1008 and b"token" in reason, (code, reason)


def closes(server) -> dict[str, float]:
    samples = parse_prometheus(server.get("/metrics").text)[1]
    return {dict(labels)["reason"]: value for (name, labels), value in samples.items()
            if name == "bastion_http_connections_closed_total"}  # fmt: skip


def boot_answer(port: int) -> bytes:
    """The first bytes of the answer to a machine's first boot request on a new connection
    (b"" when the server closes it unanswered)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"GET /boot.ipxe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        try:
            return s.recv(65536)
        except ConnectionResetError:
            return b""


def test_sockets_that_never_send_the_token_do_not_shut_out_boot_requests(serve, site_dir):
    # another host (127.0.0.2) fills every place under the cap with console sockets and sends
    # no token: they used to hold their places for the token's 10 s, and a node's boot request
    # was refused meanwhile
    server = serve(site_dir, args=("--max-connections", "4"))
    flood = [upgrade(server.port, source="127.0.0.2") for _ in range(4)]
    try:
        answer = boot_answer(server.port)
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        # the flood's own oldest socket made the room, and its handler ended without a word
        flood[0].settimeout(30)
        assert flood[0].recv(4096) == b""
        assert closes(server).get("evicted", 0) >= 1
        assert "Exception in ASGI application" not in server.log.read_text()
    finally:
        for s in flood:
            s.close()


# -- a socket with the token keeps its place: the sim board as the device, a test process as
#    node2's console (as tests/controller/api/test_console_api.py does) ----------------------

POWER = {"stagger_ms": 200, "channels": [{"name": "node1"}, {"name": "node2"}, {"name": "pi1"}]}


@pytest.fixture
def board(tmp_path):
    # node consoles need 160k on the 64-bit port (firmware/main.py NODECONS_MIN_FREE)
    flash, link = tmp_path / "flash", tmp_path / "ttyACM0"
    with SimProcess(flash, link, {"power": POWER}, args=("--heap", "160k")) as s:
        yield s


class Node2Console:
    """The node's end of node2's console (relay channel 1): what is typed into it is kept."""

    def __init__(self, board):
        path = board.link.parent / "flash" / "consoles" / "1.sock"
        wait_for(path.exists, what=str(path))
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.typed = b""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        while data := self.sock.recv(4096):
            self.typed += data


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """A client's frame (RFC 6455 5.2) of under 126 bytes, masked with zeros."""
    assert len(payload) < 126
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + b"\0\0\0\0" + payload


def test_a_socket_that_has_shown_the_token_is_never_evicted(board, site_dir, tmp_path):
    node = Node2Console(board)
    server = Server(site_dir, tmp_path / "events.db", TOKEN, device=str(board.link),
                    args=("--max-connections", "4"))  # fmt: skip
    idle = []
    try:
        wait_for(lambda: server.get("/api/v1/device").json().get("connected"), what="device link")
        node.sock.sendall(b"login: ")
        log = "/api/v1/machines/node2/console"
        wait_for(lambda: b"login: " in server.get(log, headers={"Authorization": f"Bearer {TOKEN}"}).content,
                 what="the console kept")  # fmt: skip
        ws = upgrade(server.port, path="/api/v1/machines/node2/console/stream")
        ws.sendall(masked_frame(0x1, json.dumps({"token": TOKEN}).encode()))
        backlog = ws.recv(4096)  # a binary frame of what the console kept: it has the token
        assert backlog[0] == 0x82 and backlog.endswith(b"login: "), backlog
        # the same host then opens silent connections, twice the cap: each new one takes the
        # place of the one that has waited longest, and the console is not among them
        for _ in range(8):
            idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=30))
            time.sleep(0.02)
        assert closes(server).get("evicted", 0) >= 4
        ws.sendall(masked_frame(0x2, b"root\n"))
        wait_for(lambda: node.typed == b"root\n", what="typed at the node")
    finally:
        for s in idle:
            s.close()
        server.stop()
        node.sock.close()
