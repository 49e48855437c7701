"""A lossy UDP relay for TFTP on loopback: drops, duplicates and reorders datagrams.

The kernel here has no netem, so tests put this between a TFTP client and server instead.
Clients send requests to `relay.port`. The relay follows TFTP transfer IDs: each client
address gets its own server-facing socket (so the server sees one TID per client), and each
port the server answers from gets its own client-facing socket for that client (so the client
sees one TID per server TID, as it would talking to the server directly).

Every datagram, in both directions and the requests included, is dropped with probability
`drop`, sent twice with probability `dup`, and held back by up to `max_delay` seconds with
probability `reorder`, which lets later datagrams overtake it.

    python -m tests.firmware.lossy --server 127.0.0.1:6969 --port 7070   # by hand
"""

from __future__ import annotations

import argparse
import heapq
import random
import selectors
import socket
import threading
import time

_MAX_DATAGRAM = 65535


class LossyRelay:
    def __init__(
        self,
        server: tuple[str, int],
        drop: float = 0.2,
        dup: float = 0.05,
        reorder: float = 0.2,
        max_delay: float = 0.03,
        seed: int | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ):
        self.server = server
        self.drop, self.dup, self.reorder, self.max_delay = drop, dup, reorder, max_delay
        self.host = host
        self.rng = random.Random(seed)
        self.stats = {"in": 0, "dropped": 0, "duplicated": 0, "delayed": 0, "sent": 0}
        self._sel = selectors.DefaultSelector()
        self._front = self._socket(port)  # where clients send requests
        self.port = self._front.getsockname()[1]
        self._sel.register(self._front, selectors.EVENT_READ, ("request", None))
        self._back: dict[tuple, socket.socket] = {}  # client addr -> server-facing socket
        self._fronts: dict[tuple, socket.socket] = {}  # (client addr, server port) -> socket
        self._due: list = []  # heap of (time, seq, socket, datagram, destination)
        self._seq = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _socket(self, port: int = 0) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((self.host, port))
        s.setblocking(False)
        return s

    def _impair(self, sock: socket.socket, data: bytes, dest: tuple) -> None:
        self.stats["in"] += 1
        r = self.rng
        if r.random() < self.drop:
            self.stats["dropped"] += 1
            return
        copies = 1
        if r.random() < self.dup:
            self.stats["duplicated"] += 1
            copies = 2
        now = time.monotonic()
        for _ in range(copies):
            delay = 0.0
            if r.random() < self.reorder:
                self.stats["delayed"] += 1
                delay = r.uniform(0, self.max_delay)
            self._seq += 1
            heapq.heappush(self._due, (now + delay, self._seq, sock, data, dest))

    def _back_for(self, client: tuple) -> socket.socket:
        s = self._back.get(client)
        if s is None:
            s = self._back[client] = self._socket()
            self._sel.register(s, selectors.EVENT_READ, ("reply", client))
        return s

    def _front_for(self, client: tuple, server_port: int) -> socket.socket:
        key = (client, server_port)
        s = self._fronts.get(key)
        if s is None:
            s = self._fronts[key] = self._socket()
            self._sel.register(s, selectors.EVENT_READ, ("client", key))
        return s

    def _on_readable(self, sock: socket.socket, role: str, key) -> None:
        try:
            data, src = sock.recvfrom(_MAX_DATAGRAM)
        except (BlockingIOError, ConnectionRefusedError):
            return
        if role == "request":  # client -> server's listening port
            self._impair(self._back_for(src), data, self.server)
        elif role == "reply":  # server (any TID) -> client, via that TID's client-facing socket
            self._impair(self._front_for(key, src[1]), data, key)
        else:  # client -> the server TID this socket stands for
            client, server_port = key
            self._impair(self._back_for(client), data, (self.server[0], server_port))

    def run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            while self._due and self._due[0][0] <= now:
                _, _, sock, data, dest = heapq.heappop(self._due)
                try:
                    sock.sendto(data, dest)
                    self.stats["sent"] += 1
                except OSError:
                    pass
            timeout = 0.05
            if self._due:
                timeout = max(0.0, min(timeout, self._due[0][0] - now))
            for key, _ in self._sel.select(timeout):
                role, k = key.data
                self._on_readable(key.fileobj, role, k)

    def start(self) -> "LossyRelay":
        self._thread = threading.Thread(target=self.run, name="lossy-relay", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for key in list(self._sel.get_map().values()):
            key.fileobj.close()
        self._sel.close()

    def __enter__(self) -> "LossyRelay":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class FetchError(Exception):
    pass


def _u16(b: bytes, i: int) -> int:
    return (b[i] << 8) | b[i + 1]


def tolerant_fetch(
    server: tuple[str, int],
    name: str,
    blksize: int = 512,
    window: int = 1,
    wait: float = 0.1,
    give_up: float = 20.0,
    dally: float = 0.15,
) -> bytes:
    """Read `name` over TFTP, tolerating what a lossy link does (a small test client).

    Unlike atftp and tftpy it accepts a repeated OACK, answers packets from a second server
    TID (a duplicated request starts a second transfer) with ERROR 5 instead of aborting,
    retries a request refused as busy, acks the last in-order block at the end of each window,
    after a gap and on a repeated block (RFC 7440), resends its last ACK when the server is
    silent for `wait` seconds, and after the last block dallies to re-ack a resent one.
    Raises FetchError on an ERROR from the server or after `give_up` seconds.
    """
    opts = b""
    if blksize != 512:
        opts += b"blksize\0%d\0" % blksize
    if window != 1:
        opts += b"windowsize\0%d\0" % window
    rrq = b"\0\x01" + name.encode() + b"\0octet\0" + opts
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((server[0], 0))
    s.settimeout(wait)
    tid = None  # the server's transfer ID (address) once it has answered
    nxt, in_window, got, done = 1, 0, bytearray(), False
    last_ack = None
    deadline = time.monotonic() + give_up
    try:
        s.sendto(rrq, server)
        while True:
            if time.monotonic() > deadline:
                raise FetchError(f"{name}: no progress for {give_up}s ({len(got)} bytes)")
            try:
                pkt, src = s.recvfrom(_MAX_DATAGRAM)
            except TimeoutError:
                if done:
                    return bytes(got)
                if tid is None:
                    s.sendto(rrq, server)
                elif last_ack is not None:
                    s.sendto(last_ack, tid)
                continue
            if len(pkt) < 4:
                continue
            op = _u16(pkt, 0)
            if tid is None:
                if op == 5:
                    msg = pkt[4:].split(b"\0")[0].decode(errors="replace")
                    if msg.startswith("busy"):
                        time.sleep(wait)
                        s.sendto(rrq, server)
                        continue
                    raise FetchError(f"{name}: ERROR {_u16(pkt, 2)} {msg}")
                tid = src
            elif src != tid:
                s.sendto(b"\0\x05\0\x05unknown transfer ID\0", src)
                continue
            if op == 5:
                msg = pkt[4:].split(b"\0")[0].decode(errors="replace")
                raise FetchError(f"{name}: ERROR {_u16(pkt, 2)} {msg}")
            if op == 6:  # OACK, perhaps repeated: ack it while block 1 has not come
                if nxt == 1:
                    fields = pkt[2:].split(b"\0")
                    acked = dict(zip(fields[0::2], fields[1::2]))
                    blksize = int(acked.get(b"blksize", 512))
                    window = int(acked.get(b"windowsize", 1))
                    last_ack = b"\0\x04\0\0"
                    s.sendto(last_ack, tid)
                continue
            if op != 3:
                continue
            if not done and _u16(pkt, 2) == nxt & 0xFFFF:
                got += pkt[4:]
                nxt += 1
                in_window += 1
                if len(pkt) - 4 < blksize:
                    done = True
                    s.settimeout(dally)
                if not done and in_window < window:
                    continue
            in_window = 0
            n = (nxt - 1) & 0xFFFF
            last_ack = bytes((0, 4, n >> 8, n & 0xFF))
            s.sendto(last_ack, tid)
    finally:
        s.close()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server", required=True, help="HOST:PORT of the TFTP server")
    p.add_argument("--port", type=int, default=0, help="port clients send requests to")
    p.add_argument("--drop", type=float, default=0.2)
    p.add_argument("--dup", type=float, default=0.05)
    p.add_argument("--reorder", type=float, default=0.2)
    p.add_argument("--seed", type=int)
    a = p.parse_args(argv)
    host, port = a.server.rsplit(":", 1)
    relay = LossyRelay((host, int(port)), a.drop, a.dup, a.reorder, seed=a.seed, port=a.port)
    print(f"relaying 127.0.0.1:{relay.port} -> {a.server}", flush=True)
    try:
        relay.run()
    except KeyboardInterrupt:
        print(relay.stats)


if __name__ == "__main__":
    main()
