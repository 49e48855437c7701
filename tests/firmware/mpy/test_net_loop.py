# firmware.net's hook into MicroPython's asyncio: with a timer pending, a task woken by a
# datagram costs one poll, not two, and no task waits longer for its I/O. CPython's asyncio
# is not MicroPython's and gets no hook (net._io_queue is None there).
import asyncio
import socket
import time

from mpytest import micropython_only

from firmware import net

HOPS = 200


class _CountingPoller:
    # asyncio's own select.poll object, with its polls counted.
    def __init__(self, poller):
        self.poller = poller
        self.polls = 0

    def register(self, s, flags):
        self.poller.register(s, flags)

    def modify(self, s, flags):
        self.poller.modify(s, flags)

    def unregister(self, s):
        self.poller.unregister(s)

    def ipoll(self, dt):
        self.polls += 1
        return self.poller.ipoll(dt)


def _udp(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(socket.getaddrinfo("127.0.0.1", port)[0][-1])
    s.setblocking(False)
    return s


def _ping_pong(spin):
    """HOPS datagrams passed back and forth between two tasks over loopback while another task
    sleeps (a timer pending all along) and, when spin, one more yields over and over.
    Returns (polls, hops, spins)."""
    q = net._io_queue
    counting = _CountingPoller(q.poller)
    port = 20000 + time.ticks_us() % 20000
    a = _udp(0)
    b = _udp(port)
    n = [0, 0]  # hops, spins
    over = asyncio.Event()

    async def side(me, to):
        if to is not None:
            me.sendto(b"ping", to)
        while True:
            await net.readable(me)
            data, src = me.recvfrom(4)
            n[0] += 1
            if n[0] == HOPS:
                over.set()
                return
            me.sendto(data, src)

    async def sleeper():
        await asyncio.sleep(60)

    async def spinner():
        while not over.is_set() and n[1] < 100000:
            n[1] += 1
            await asyncio.sleep_ms(0)

    async def main():
        tasks = [asyncio.create_task(sleeper()), asyncio.create_task(side(b, None))]
        if spin:
            tasks.append(asyncio.create_task(spinner()))
        await asyncio.sleep_ms(0)
        q.poller = counting
        tasks.append(asyncio.create_task(side(a, socket.getaddrinfo("127.0.0.1", port)[0][-1])))
        await over.wait()
        q.poller = counting.poller
        for t in tasks:
            t.cancel()
        await asyncio.sleep_ms(0)

    try:
        asyncio.run(main())
    finally:
        q.poller = counting.poller
        a.close()
        b.close()
    return counting.polls, n[0], n[1]


def test_a_wake_up_by_a_datagram_with_a_timer_pending_costs_one_poll():
    micropython_only("CPython's asyncio is not MicroPython's: no hook")
    polls, hops, _ = _ping_pong(False)
    assert hops == HOPS
    # One poll per hop and a few for the start and the end. asyncio alone polls twice per
    # hop: once until the timer, then again with 0 for the task that poll just woke.
    assert polls <= HOPS + 10, polls


def test_a_task_that_keeps_yielding_does_not_keep_datagrams_waiting():
    micropython_only("CPython's asyncio is not MicroPython's: no hook")
    polls, hops, spins = _ping_pong(True)
    assert hops == HOPS and spins < 100000, (hops, spins)
    # With a task always ready, the loop never blocks: every turn polls with 0 for I/O first.
    assert polls >= hops, (polls, hops)
