"""A client of NUT's upsd (Network UPS Tools), the daemon every home UPS setup already runs.

upsd speaks a line protocol on TCP 3493 (NUT's "network protocol" document): a request is one
line of words, a word with spaces or quotes in double quotes with backslash escapes; the answer
is one line (`OK`, `VAR <ups> <name> "<value>"`, `ERR <CODE>`), or for `LIST` a block between
`BEGIN LIST ...` and `END LIST ...`. This client asks only what the controller needs:

    USERNAME <user> / PASSWORD <pass>   optional; reading variables needs no login
    LIST VAR <ups>                      every variable: ups.status, battery.charge, ...
    LOGOUT

The codec (`words`, `quote`) is pure; `NutClient` is the socket shell around it. It keeps one
connection, opens it again on the next read after any failure, and raises `NutError` with upsd's
own error code (`UNKNOWN-UPS`, `DATA-STALE`: the driver lost the UPS, `ACCESS-DENIED`, ...) or
the socket's problem. Nothing else escapes a read.
"""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

PORT = 3493
_MAX_LINE = 4096  # upsd's own lines are far shorter; a longer one is not upsd
_MAX_VARS = 1000  # a LIST VAR longer than this is not a UPS


class NutError(Exception):
    """upsd said ERR (`code` holds its code), or could not be reached or understood."""

    def __init__(self, message: str, code: str | None = None):
        self.code = code
        super().__init__(message)


def words(line: str) -> list[str]:
    """A protocol line split into words, quotes and backslash escapes undone; NutError when a
    quote is not closed."""
    out: list[str] = []
    i, n = 0, len(line)
    while i < n:
        if line[i] == " ":
            i += 1
            continue
        if line[i] == '"':
            i += 1
            word = []
            while True:
                if i >= n:
                    raise NutError(f"unterminated quote in {line[:120]!r}")
                c = line[i]
                if c == "\\" and i + 1 < n:
                    word.append(line[i + 1])
                    i += 2
                    continue
                if c == '"':
                    i += 1
                    break
                word.append(c)
                i += 1
            out.append("".join(word))
        else:
            j = line.find(" ", i)
            j = n if j < 0 else j
            out.append(line[i:j])
            i = j
    return out


def quote(word: str) -> str:
    """A word as a request carries it: quoted (with escapes) when it holds a space, a quote or
    a backslash, or is empty. Line breaks cannot be sent at all."""
    if "\n" in word or "\r" in word:
        raise NutError("a word sent to upsd cannot hold a line break")
    if word and not any(c in word for c in ' "\\'):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class Reading:
    """What upsd said about one UPS: its status flags (`OL` on line, `OB` on battery, `LB` low
    battery, `CHRG`, ...), its battery charge in percent when it reports one, and every
    variable as text."""

    status: tuple[str, ...]
    charge: float | None
    variables: dict[str, str]

    @property
    def on_battery(self) -> bool:
        return "OB" in self.status

    @property
    def low_battery(self) -> bool:
        return "LB" in self.status

    @property
    def status_text(self) -> str:
        return " ".join(self.status)

    @classmethod
    def of(cls, variables: dict[str, str]) -> Reading:
        status = tuple(variables.get("ups.status", "").split())
        try:
            charge = float(variables["battery.charge"])
        except (KeyError, ValueError):
            charge = None
        if charge is not None and not math.isfinite(charge):  # "nan", "inf": not a reading
            charge = None
        return cls(status, charge, variables)


Connect = Callable[[tuple[str, int], float], socket.socket]


class NutClient:
    def __init__(self, ups: str, host: str = "127.0.0.1", port: int = PORT, timeout: float = 5.0,
                 username: str | None = None, password: str | None = None,
                 connect: Connect = socket.create_connection):  # fmt: skip
        self.ups, self.host, self.port, self.timeout = ups, host, port, timeout
        self.username, self.password = username, password
        self.connect = connect  # how the TCP connection is made (a test's namespace)
        self._sock: socket.socket | None = None
        self._buf = b""
        self._deadline: float | None = None  # monotonic: the answer being read is due by then

    def __repr__(self) -> str:
        return f"NutClient({self.ups}@{self.host}:{self.port})"

    # --- the connection ------------------------------------------------------------------------
    def _open(self) -> None:
        try:
            self._sock = self.connect((self.host, self.port), self.timeout)
            self._sock.settimeout(self.timeout)
        except (OSError, ValueError) as e:  # ValueError: a name the resolver cannot encode
            raise NutError(f"cannot reach upsd at {self.host}:{self.port}: "
                           f"{getattr(e, 'strerror', None) or e}") from None  # fmt: skip
        self._buf = b""
        if self.username:
            self._expect_ok("USERNAME", self.username)
            self._expect_ok("PASSWORD", self.password or "")

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.sendall(b"LOGOUT\n")
            except OSError:
                pass
            sock.close()

    def _send(self, *request: str) -> None:
        assert self._sock is not None
        line = " ".join(quote(w) for w in request) + "\n"
        try:
            self._sock.sendall(line.encode())
        except OSError as e:
            raise NutError(f"upsd at {self.host}:{self.port}: {e.strerror or e}") from None

    def _line(self) -> list[str]:
        assert self._sock is not None
        while b"\n" not in self._buf:
            if len(self._buf) > _MAX_LINE:
                raise NutError(f"upsd at {self.host}:{self.port} sent a line of over {_MAX_LINE} bytes")
            if self._deadline is not None:
                # the whole answer within the timeout: a upsd that trickles a byte a second
                # held the watch in one pass for over an hour, reading as answering
                left = self._deadline - time.monotonic()
                if left <= 0:
                    raise NutError(f"upsd at {self.host}:{self.port} did not finish its answer "
                                   f"within {self.timeout:g} s")  # fmt: skip
                self._sock.settimeout(min(left, self.timeout))
            try:
                chunk = self._sock.recv(4096)
            except TimeoutError:
                raise NutError(f"upsd at {self.host}:{self.port} did not answer within "
                               f"{self.timeout:g} s") from None  # fmt: skip
            except OSError as e:
                raise NutError(f"upsd at {self.host}:{self.port}: {e.strerror or e}") from None
            if not chunk:
                raise NutError(f"upsd at {self.host}:{self.port} closed the connection")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\n", 1)
        got = words(raw.decode("utf-8", errors="replace").rstrip("\r"))
        if got and got[0] == "ERR":
            code = got[1] if len(got) > 1 else "UNKNOWN"
            raise NutError(f"upsd: {' '.join(got[1:]) or 'ERR'}", code=code)
        return got

    def _expect_ok(self, *request: str) -> None:
        self._send(*request)
        got = self._line()
        if not got or got[0] != "OK":
            raise NutError(f"upsd answered {request[0]} with {' '.join(got)[:120]!r}")

    # --- what the controller asks ------------------------------------------------------------
    def variables(self) -> dict[str, str]:
        """Every variable of the UPS (LIST VAR), within the timeout. Raises NutError; the next
        call reconnects."""
        try:
            if self._sock is None:
                self._open()
            self._deadline = time.monotonic() + self.timeout
            self._send("LIST", "VAR", self.ups)
            head = self._line()
            if head != ["BEGIN", "LIST", "VAR", self.ups]:
                raise NutError(f"upsd answered LIST VAR with {' '.join(head)[:120]!r}")
            out: dict[str, str] = {}
            while True:
                got = self._line()
                if got == ["END", "LIST", "VAR", self.ups]:
                    return out
                if len(got) != 4 or got[0] != "VAR" or got[1] != self.ups:
                    raise NutError(f"upsd sent {' '.join(got)[:120]!r} inside LIST VAR")
                if len(out) >= _MAX_VARS:
                    raise NutError(f"upsd listed over {_MAX_VARS} variables")
                out[got[2]] = got[3]
        except NutError:
            self.close()
            raise
        finally:
            self._deadline = None

    def get(self, name: str) -> str:
        """One variable (GET VAR)."""
        try:
            if self._sock is None:
                self._open()
            self._send("GET", "VAR", self.ups, name)
            got = self._line()
            if len(got) != 4 or got[:3] != ["VAR", self.ups, name]:
                raise NutError(f"upsd answered GET VAR with {' '.join(got)[:120]!r}")
            return got[3]
        except NutError:
            self.close()
            raise

    def read(self) -> Reading:
        return Reading.of(self.variables())
