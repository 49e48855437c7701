# The sim board's node consoles: each a unix socket in the flash directory that a node connects
# to (QEMU's `-chardev socket,path=...,reconnect=1`, or a test), the stand-in for a UART wired
# to a node's serial console. Only firmware/board.py imports this module, on the sim board.
#
# One node per channel: a new connection replaces the old one (a node that restarted). With no
# node connected, typed bytes go nowhere, as they would on a UART with nothing on its TX pin.
# Reading drains what the node wrote, as a UART's RX must be drained: a node writing faster
# than the device sends shows up as bytes dropped from the channel's ring, not as a writer
# held back (firmware/nodecons.py).
import os
import socket

from firmware.compat import const

_EAGAIN = const(11)


def _unix_addr(path):
    # CPython takes the path; the unix port takes a raw struct sockaddr_un (AF_UNIX = 1, the
    # path, NUL)
    return path if _cpython() else _raw(path)


def _cpython():
    return hasattr(socket.socket, "recv_into")


def _raw(path):
    return b"\x01\x00" + path.encode() + b"\x00"


class UnixConsole:
    def __init__(self, path):
        try:
            os.remove(path)
        except OSError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(_unix_addr(path))
        s.listen(1)
        s.setblocking(False)
        self.path = path
        self._srv = s
        self._conn = None
        self._cpy = _cpython()
        self.connects = 0

    def _accept(self):
        try:
            conn, _ = self._srv.accept()
        except OSError:  # EAGAIN: nobody waiting
            return
        conn.setblocking(False)
        if self._conn is not None:
            self._conn.close()
        self._conn = conn
        self.connects += 1

    def connected(self):
        return self._conn is not None

    def readinto(self, buf):
        self._accept()
        c = self._conn
        if c is None:
            return None
        try:
            n = c.recv_into(buf) if self._cpy else c.readinto(buf)
        except OSError as e:
            if e.args and e.args[0] == _EAGAIN:
                return None
            n = 0
        if n is None:
            return None
        if n == 0:  # the node went (QEMU stopped): wait for the next one
            c.close()
            self._conn = None
            return None
        return n

    def write(self, mv):
        c = self._conn
        if c is None:
            return len(mv)  # nothing on the wire: the bytes go nowhere
        try:
            return c.send(mv) or 0
        except OSError as e:
            if e.args and e.args[0] == _EAGAIN:
                return 0
            c.close()
            self._conn = None
            return len(mv)

    def close(self):
        for s in (self._conn, self._srv):
            if s is not None:
                s.close()
        self._conn = None
