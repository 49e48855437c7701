# A read request that a client sends again before its transfer has sent the last block (an
# answer was late or lost) is the transfer already running for it, not a second one; the same
# request once the last block has gone out is a new transfer (the client asks for the file
# again). Under MicroPython (its sockets' addresses are bytes there) and CPython alike.
import asyncio
import socket

from tftpdkit import addr, loopback_server, recv, served_file, stop_when_idle

from firmware.compat import sleep_ms

RRQ = b"\x00\x01f\x00octet\x00"


async def _until(cond):
    for _ in range(1000):
        if cond():
            return
        await sleep_ms(1)
    raise AssertionError("never")


def test_asked_again_before_an_ack_is_one_transfer_and_after_one_a_new_one():
    with served_file("again", 1000) as root:  # two blocks of 512
        srv, log, port = loopback_server(root, 64)
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        c.bind(addr(0))
        c.setblocking(False)
        starts = []

        async def main():
            server = asyncio.create_task(srv.run())
            await sleep_ms(20)
            c.sendto(RRQ, addr(port))
            data, tid = await recv(c)
            assert data[:4] == b"\x00\x03\x00\x01", data
            c.sendto(RRQ, addr(port))  # asked again: DATA 1 was slow
            await _until(lambda: log.counters.get("tftp.dup_request", 0) == 1)
            starts.append(srv.slots.active())
            c.sendto(b"\x00\x04\x00\x01", tid)
            data, src = await recv(c)
            assert data[:4] == b"\x00\x03\x00\x02" and src == tid, (data[:4], src, tid)
            # DATA 2 (the last) came, its ACK "lost": the same request is the file again
            c.sendto(RRQ, addr(port))
            data, tid2 = await recv(c)
            assert data[:4] == b"\x00\x03\x00\x01" and tid2 != tid, (data[:4], tid2, tid)
            starts.append(srv.slots.active())
            c.sendto(b"\x00\x05\x00\x00stop\x00", tid)
            c.sendto(b"\x00\x05\x00\x00stop\x00", tid2)
            await stop_when_idle(srv, server)

        try:
            asyncio.run(main())
        finally:
            c.close()
    assert starts == [1, 2], starts
    assert log.counters.get("tftp.dup_request", 0) == 1
    assert log.counters.get("tftp.refused", 0) == 0
