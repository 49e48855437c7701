"""The console's WebSocket takes messages of a console's size only, checked on the frame's
header before its payload is read (bastion.api.consoles.MAX_MESSAGE_BYTES): against a real
`bastion serve` on 127.0.0.1, with a raw socket."""

from __future__ import annotations

import base64
import os
import socket
import struct

import pytest
from bastion.api.consoles import MAX_MESSAGE_BYTES

PATH = "/api/v1/machines/node1/console/stream"


@pytest.fixture
def server(serve, site_dir):
    return serve(site_dir)


def upgrade(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
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
