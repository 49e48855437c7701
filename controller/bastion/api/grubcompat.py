"""Response header names in their canonical case for GRUB.

GRUB's HTTP client (net/http.c, 2.06 as in Debian 12) matches `Content-Length: ` and
`Transfer-Encoding: chunked` case-sensitively. uvicorn writes every response header name in lower
case (HTTP says case does not matter), so GRUB never learns a body's length: it reads until the
server closes the idle connection and then still waits out its own receive retries, about 30 s per
request under emulation and minutes per boot on a slow board.

GrubHttpToolsProtocol is uvicorn's httptools protocol with one change: for a request whose
User-Agent is GRUB's, the response's head is written with canonical names (`Content-Length`).
Every other client's bytes are untouched. It hooks uvicorn where each request's response cycle is
given the connection's transport (on_headers_complete), which tests/controller/api/test_grubcompat.py
checks against the installed uvicorn with a real server.

And GRUB's connections are closed with a reset once GRUB is done with them. GRUB's TCP uses the
same source ports (21550, 21551, ...) after every reset of the machine, and it drops a connection
without ever acknowledging the server's FIN. A normal close leaves the server's side in LAST-ACK
or FIN-WAIT-2 for a minute or more, and a node that reboots within that time has its SYN from the
same port refused: "error: connection timeout" at `initrd`. A reset leaves no state behind. It is
only sent when nothing is left unacknowledged in the socket's send queue; otherwise the close is
the normal one.
"""

from __future__ import annotations

import fcntl
import re
import socket
import struct
import termios
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_HEADER_NAME = re.compile(rb"^([A-Za-z0-9-]+):", re.MULTILINE)


def canonical(name: bytes) -> bytes:
    """b"content-length" -> b"Content-Length"."""
    return b"-".join(part[:1].upper() + part[1:] for part in name.split(b"-"))


def canonical_head(data: bytes) -> bytes:
    """A response's bytes with the header names of its head (up to the blank line) canonical."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        end = len(data)
    head = _HEADER_NAME.sub(lambda m: canonical(m.group(1)) + b":", data[:end])
    return head + data[end:]


class _CanonicalHeadTransport:
    """The connection's transport for one GRUB request: its response head gets canonical names."""

    def __init__(self, transport: Any):
        self._transport = transport
        self._head_pending = True

    def write(self, data: bytes) -> None:
        if self._head_pending and data.startswith(b"HTTP/"):
            self._head_pending = False
            data = canonical_head(data)
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def reset_if_delivered(transport: Any) -> bool:
    """Set SO_LINGER 0 on the transport's socket when its send queue is empty (so that closing
    sends a reset); False when bytes are still unacknowledged or the socket is gone."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    try:
        unacked = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
        if unacked:
            return False
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        return False
    return True


class GrubHttpToolsProtocol(HttpToolsProtocol):
    _grub = False  # this connection carried a request from GRUB

    def eof_received(self) -> None:
        # GRUB closed its side: it has what it wanted and will never acknowledge our FIN
        if self._grub and reset_if_delivered(self.transport):
            self.transport.close()

    def timeout_keep_alive_handler(self) -> None:
        if self._grub and not self.transport.is_closing():
            reset_if_delivered(self.transport)
        super().timeout_keep_alive_handler()

    def on_headers_complete(self) -> None:
        grub = any(n == b"user-agent" and v.startswith(b"GRUB") for n, v in self.headers)
        if not grub:
            super().on_headers_complete()
            return
        self._grub = True
        transport = self.transport
        self.transport = _CanonicalHeadTransport(transport)  # type: ignore[assignment]
        try:
            super().on_headers_complete()
        finally:
            self.transport = transport
