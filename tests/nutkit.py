"""NUT's real upsd with its dummy-ups driver (Debian's nut-server), in a network namespace with
only loopback, for the UPS tests. The driver follows a state file (`ups.status: OB`, ...); the
test rewrites it to play a power cut. Everything runs under bastion.lab.netns, so both
processes are stopped by PID and the namespace removed however the test ends.

The controller stays in the test's own namespace; `connect_in(ns)` is how its NUT client
reaches upsd: the socket is made by a thread that joins the namespace (setns) for that moment.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading
import time
from pathlib import Path
from typing import Self

import pytest
from bastion.lab.netns import Namespace
from netkit import need_root

NUT = Path("/lib/nut")
_CLONE_NEWNET = 0x40000000
USER, PASSWORD = "monitor", 'a pass "with" spaces'


def need_nut() -> None:
    need_root()
    if not (NUT / "upsd").is_file() or not (NUT / "dummy-ups").is_file():
        pytest.skip("nut-server is not installed (tools/setup installs it)")


def connect_in(ns: str):
    """A connect function (bastion.ups.nut.Connect) whose sockets live in namespace `ns`."""
    libc = ctypes.CDLL(None, use_errno=True)

    def connect(addr: tuple[str, int], timeout: float) -> socket.socket:
        out: dict = {}

        def inside() -> None:
            here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
            there = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if libc.setns(there, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
                try:
                    out["sock"] = socket.create_connection(addr, timeout)
                finally:
                    libc.setns(here, _CLONE_NEWNET)  # this thread goes back before it ends
            except OSError as e:
                out["error"] = e
            finally:
                os.close(here)
                os.close(there)

        t = threading.Thread(target=inside)
        t.start()
        t.join()
        if "error" in out:
            raise out["error"]
        return out["sock"]

    return connect


class NutServer:
    """upsd on 127.0.0.1:3493 of a namespace of its own, serving UPS `ups` from dummy-ups; or of
    `ns`, a namespace someone else made (a lab's LAN, whose controller then reaches upsd on its
    own loopback): only the two processes are stopped then, the namespace stays."""

    def __init__(self, root: Path, ups: str = "eaton", port: int = 3493,
                 ns: Namespace | None = None):  # fmt: skip
        self.root, self.ups, self.port = root, ups, port
        self._own = ns is None
        self.ns = ns or Namespace(f"ebups{os.getpid() % 100000}")
        self.state = root / f"{ups}.dev"
        self._mtime = time.time()
        self.upsd = None

    def write(self, status: str, charge: float) -> None:
        """The UPS's state as the driver reads it. Its mtime moves on a whole second each
        time: dummy-ups re-reads the file when its modification time changes."""
        tmp = self.state.with_suffix(".tmp")
        tmp.write_text(f"ups.status: {status}\nbattery.charge: {charge:g}\nups.mfr: Edge Bastion tests\n")
        self._mtime += 2
        os.utime(tmp, (self._mtime, self._mtime))
        tmp.replace(self.state)

    def start(self) -> Self:
        need_nut()
        r = self.root
        r.mkdir(parents=True, exist_ok=True)
        (r / "nut.conf").write_text("MODE=netserver\n")
        (r / "ups.conf").write_text(f"[{self.ups}]\n  driver = dummy-ups\n  port = {self.state.name}\n"
                                    '  desc = "played by a test"\n')  # fmt: skip
        (r / "upsd.conf").write_text(f"LISTEN 127.0.0.1 {self.port}\n")
        users = r / "upsd.users"
        users.write_text(f'[{USER}]\n  password = "{PASSWORD.replace(chr(34), chr(92) + chr(34))}"\n'
                         "  upsmon primary\n")  # fmt: skip
        users.chmod(0o600)
        self.write("OL", 100)
        self.env = {**os.environ, "NUT_CONFPATH": str(r), "NUT_STATEPATH": str(r),
                    "NUT_ALTPIDPATH": str(r)}  # fmt: skip
        if self._own:
            self.ns.create()
        try:
            self.ns.start([str(NUT / "dummy-ups"), "-a", self.ups, "-u", "root", "-F"],
                          name="dummy-ups", env=self.env, log=r / "dummy-ups.log")  # fmt: skip
            self.start_upsd()
        except BaseException:
            self.ns.destroy()
            raise
        return self

    def start_upsd(self) -> None:
        self.upsd = self.ns.start([str(NUT / "upsd"), "-u", "root", "-F"], name="upsd",
                                  env=self.env, log=self.root / "upsd.log")  # fmt: skip
        self.wait_answering()

    def stop_upsd(self) -> None:
        self.ns.procs.stop("upsd")

    def wait_answering(self, timeout: float = 20.0) -> None:
        connect = connect_in(self.ns.name)
        deadline = time.monotonic() + timeout
        while True:
            try:
                s = connect(("127.0.0.1", self.port), 2)
                s.sendall(f"GET VAR {self.ups} ups.status\n".encode())
                line = s.recv(200)
                s.close()
                if line.startswith(b"VAR ") and b"WAIT" not in line:  # WAIT: no driver data yet
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                log = (self.root / "upsd.log").read_text(errors="replace")[-2000:]
                raise AssertionError(f"upsd did not serve {self.ups} within {timeout} s:\n{log}")
            time.sleep(0.2)

    def stop(self) -> list[str]:
        return self.ns.destroy()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
