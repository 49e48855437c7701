"""Hostile and honest LAN hosts for the reliability suite (test_device_reliability.py).

Each action runs inside the client's network namespace as a process of its own, so the
test process (which holds the device's serial line, like a controller) stays outside it:

    ip netns exec NS python hostile.py ACTION '{"server": "10.78.0.1", ...}'

and prints one JSON object with its counts. The actions:

  flood      datagrams of one kind at a steady rate: "long" (RRQs with 300-byte names),
             "dotdot" (RRQs for ../NNNNNNNx), "nonutf8" (an RRQ whose name is not UTF-8) or
             "garbage" (random bytes, 1..600 long, to every port given).
  discover   DISCOVERs at a rate, from random MACs or from one MAC, broadcast like a PXE ROM;
             counts the offers that come back for them (matched by xid).
  starve     one MAC floods DISCOVERs while another boots again and again as a PXE ROM
             does (retrying each DISCOVER): how many of each were answered.
  probe      what a booting node does: a DISCOVER (retried) and a TFTP fetch with tftp-hpa's
             client; did each get through.
  abandon    RRQs asking for timeout 255 that are never acknowledged (a client that went
             away); keeps the sockets open and reports what the server sent them.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time

CLIENT_PORT = 68


def rrq(name: bytes, *opts: bytes) -> bytes:
    return b"\0\x01" + name + b"\0octet\0" + b"".join(o + b"\0" for o in opts)


def discover(mac: bytes, xid: bytes, arch: int = 7) -> bytes:
    hdr = bytearray(240)
    hdr[0:3] = b"\x01\x01\x06"
    hdr[4:8] = xid
    hdr[10:12] = b"\x80\x00"  # broadcast flag: the answer comes to 255.255.255.255:68
    hdr[28:34] = mac
    hdr[236:240] = b"\x63\x82\x53\x63"
    vc = b"PXEClient:Arch:%05d:UNDI:003000" % arch
    opts = b"\x35\x01\x01" + b"\x5d\x02" + arch.to_bytes(2, "big") + bytes((60, len(vc))) + vc
    return bytes(hdr) + opts + b"\xff" + bytes(60)


def paced(rate: float, count: int, duration: float | None = None):
    """Yield 0, 1, 2, ... at `rate` a second (in small bursts, so a Python sender keeps up)
    until count are yielded or duration has passed."""
    start = time.monotonic()
    i = 0
    while i < count:
        now = time.monotonic()
        if duration is not None and now - start >= duration:
            return
        due = int((now - start) * rate) + 1
        while i < min(due, count):
            yield i
            i += 1
        time.sleep(0.005)


def _dhcp_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    s.bind(("0.0.0.0", CLIENT_PORT))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    return s


class Offers:
    """Collects the replies to our DISCOVERs on :68, by xid, in a thread."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.xids: set[bytes] = set()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                data, _ = self.sock.recvfrom(2048)
            except TimeoutError:
                continue
            if len(data) >= 240 and data[0] == 2:
                self.xids.add(bytes(data[4:8]))

    def stop(self) -> None:
        self._stop = True
        self._thread.join(2)


def flood(server: str, kind: str, rate: float, count: int, ports=(69,), seed: int = 1) -> dict:
    rng = random.Random(seed)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sent = errors = 0
    t0 = time.monotonic()
    for i in paced(rate, count):
        if kind == "long":
            pkt = rrq(b"x" * 292 + b"%08d" % i)
        elif kind == "dotdot":
            pkt = rrq(b"../%07dx" % i)
        elif kind == "nonutf8":
            pkt = rrq(b"\xff\xfe\x80name-%d" % i)
        else:
            pkt = rng.randbytes(rng.randrange(1, 600))
        try:
            s.sendto(pkt, (server, ports[i % len(ports)]))
            sent += 1
        except OSError:
            errors += 1
    return {"sent": sent, "errors": errors, "seconds": round(time.monotonic() - t0, 2)}


def discover_burst(server: str, count: int, rate: float, mac: str | None = None,
                   seed: int = 2) -> dict:
    rng = random.Random(seed)
    s = _dhcp_socket()
    offers = Offers(s)
    xids = []
    t0 = time.monotonic()
    for _ in paced(rate, count):
        m = bytes.fromhex(mac) if mac else b"\x52\x54" + rng.randbytes(4)
        xid = rng.randbytes(4)
        xids.append(xid)
        s.sendto(discover(m, xid), ("255.255.255.255", 67))
    spent = time.monotonic() - t0
    time.sleep(1.0)
    offers.stop()
    answered = sum(x in offers.xids for x in xids)
    return {"sent": len(xids), "answered": answered, "seconds": round(spent, 2),
            "answered_per_s": round(answered / spent, 1) if spent else None}


def starve(server: str, rate: float, seconds: float, seed: int = 3) -> dict:
    """One MAC sends DISCOVERs at `rate` for `seconds`; meanwhile another boots again and
    again like a PXE ROM (a DISCOVER, resent with the same xid after 1 s, 4 tries)."""
    rng = random.Random(seed)
    s = _dhcp_socket()
    offers = Offers(s)
    flooder, victim = b"\x52\x54\x00\xff\x00\x01", b"\x52\x54\x00\x00\x00\x02"
    flood_xids: list[bytes] = []
    boots = {"boots": 0, "booted": 0, "victim_sent": 0}
    stop = threading.Event()

    def boot_again_and_again() -> None:
        while not stop.is_set():
            xid = rng.randbytes(4)
            boots["boots"] += 1
            for _ in range(4):
                s.sendto(discover(victim, xid), ("255.255.255.255", 67))
                boots["victim_sent"] += 1
                end = time.monotonic() + 1.0
                while time.monotonic() < end and xid not in offers.xids:
                    time.sleep(0.01)
                if xid in offers.xids:
                    boots["booted"] += 1
                    break
            time.sleep(0.2)

    t = threading.Thread(target=boot_again_and_again, daemon=True)
    t.start()
    for _ in paced(rate, 10**9, seconds):
        xid = rng.randbytes(4)
        flood_xids.append(xid)
        s.sendto(discover(flooder, xid), ("255.255.255.255", 67))
    stop.set()
    t.join(6)
    time.sleep(0.5)
    offers.stop()
    return {"flood_sent": len(flood_xids),
            "flood_answered": sum(x in offers.xids for x in flood_xids), **boots}


def probe(server: str, file: str, size: int) -> dict:
    """A node booting: DISCOVER (4 tries, 1 s apart), then tftp-hpa fetches `file`."""
    rng = random.Random()
    s = _dhcp_socket()
    offers = Offers(s)
    offer = False
    for _ in range(4):
        xid = rng.randbytes(4)
        s.sendto(discover(b"\x52\x54\x00\x00\x00\x07", xid), ("255.255.255.255", 67))
        end = time.monotonic() + 1.0
        while time.monotonic() < end and xid not in offers.xids:
            time.sleep(0.02)
        if xid in offers.xids:
            offer = True
            break
    offers.stop()
    s.close()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "got")
        # tftp-hpa as a PXE ROM would retry: a request every second, 20 s in all.
        r = subprocess.run(["tftp", "-m", "binary", server],
                           input=f"rexmt 1\ntimeout 20\nget {file} {out}\nquit\n",
                           capture_output=True, text=True, timeout=60, check=False)
        fetched = os.path.exists(out) and os.path.getsize(out) == size
    return {"offer": offer, "fetch": fetched, "tftp": (r.stdout + r.stderr).strip()[-200:]}


def abandon(server: str, n: int, file: str, hold: float) -> dict:
    """n RRQs for `file` with timeout 255, never acknowledged; what did the server send?"""
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", 0))
        s.settimeout(0.1)
        s.sendto(rrq(file.encode(), b"timeout", b"255", b"tsize", b"0"), (server, 69))
        socks.append(s)
    first: list[str | None] = [None] * n
    errors: list[str | None] = [None] * n
    end = time.monotonic() + hold
    while time.monotonic() < end:
        for i, s in enumerate(socks):
            try:
                pkt, _ = s.recvfrom(2048)
            except TimeoutError:
                continue
            op = pkt[1] if len(pkt) > 1 else 0
            if first[i] is None:
                first[i] = {3: "data", 5: "error", 6: "oack"}.get(op, str(op))
                if op == 6:
                    first[i] += ":" + pkt[2:].replace(b"\0", b" ").decode(errors="replace")
            if op == 5:
                errors[i] = pkt[4:-1].decode(errors="replace")
    return {"first": first, "errors": errors}


ACTIONS = {"flood": flood, "discover": discover_burst, "starve": starve, "probe": probe,
           "abandon": abandon}

if __name__ == "__main__":
    print(json.dumps(ACTIONS[sys.argv[1]](**json.loads(sys.argv[2]))))
