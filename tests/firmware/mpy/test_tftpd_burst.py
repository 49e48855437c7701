# firmware.tftpd's receiver reads a datagram that is already there without a turn of the loop,
# but never more than tftpd._BURST (BURST) in a row: then the loop's other tasks run. Under
# MicroPython (its asyncio and the kept socket of firmware/net.py) and CPython alike.
import asyncio
import socket

from tftpdkit import addr, loopback_server, recv, served_file, stop_when_idle

from firmware import tftpd
from firmware.compat import sleep_ms

# tftpd._BURST: MicroPython compiles a const() whose name starts with _ away, so the name cannot
# be imported there; the CPython run of this test checks that the two agree.
BURST = 8
JUNK = 30  # datagrams that are not ACKs, queued on the transfer's socket at once


def _burst(root):
    """Returns the receiver's bad-packet count as a task that yields at every turn saw it, and
    the count at the end."""
    srv, log, port = loopback_server(root, 64)
    seen = []
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.bind(addr(0))
    c.setblocking(False)

    async def watcher():
        while True:
            seen.append(log.counters.get("tftp.bad_packet", 0))
            await sleep_ms(0)

    async def main():
        server = asyncio.create_task(srv.run())
        watching = asyncio.create_task(watcher())
        await sleep_ms(20)
        c.sendto(b"\x00\x01f\x00octet\x00", addr(port))
        data, tid = await recv(c)
        assert data[:4] == b"\x00\x03\x00\x01", data
        for _ in range(JUNK):  # all queued before the server's tasks run again
            c.sendto(b"\x00\x09junk", tid)
        for _ in range(1000):
            if log.counters.get("tftp.bad_packet", 0) == JUNK:
                break
            await sleep_ms(0)
        await sleep_ms(0)
        watching.cancel()
        c.sendto(b"\x00\x04\x00\x01", tid)  # and the transfer goes on: DATA 2
        data, _ = await recv(c)
        assert data[:4] == b"\x00\x03\x00\x02", data
        c.sendto(b"\x00\x05\x00\x00stop\x00", tid)  # an ERROR ends it: its socket is let go
        await stop_when_idle(srv, server)

    try:
        asyncio.run(main())
    finally:
        c.close()
    return seen, log.counters.get("tftp.bad_packet", 0)


def test_datagrams_already_there_are_read_in_bursts_that_let_other_tasks_run():
    assert getattr(tftpd, "_BURST", BURST) == BURST
    with served_file("burst", 2000) as root:
        seen, total = _burst(root)
    assert total == JUNK, (total, seen)
    steps = [b - a for a, b in zip(seen, seen[1:])]
    # one wake-up's datagram and _BURST more at most between two turns of another task ...
    assert max(steps) <= 1 + BURST, seen
    # ... and more than one: those already there were read without a turn each
    assert max(steps) > 1, seen
    assert len([s for s in steps if s]) >= JUNK // (1 + BURST), seen
