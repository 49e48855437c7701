# firmware.net's hooks into MicroPython's asyncio: with a timer pending, a task woken by a
# datagram costs one poll, not two, and no task waits longer for its I/O; a socket waited on with
# net.readable stays in asyncio's I/O queue between waits. CPython's asyncio is not
# MicroPython's and gets no hook (net._io_queue is None there).
import asyncio
import gc
import socket
import time

from mpytest import micropython_only

from firmware import net

HOPS = 200


class _CountingPoller:
    # asyncio's own select.poll object, with its polls and registrations counted.
    def __init__(self, poller):
        self.poller = poller
        self.polls = self.registered = self.unregistered = 0

    def register(self, s, flags):
        self.registered += 1
        self.poller.register(s, flags)

    def modify(self, s, flags):
        self.poller.modify(s, flags)

    def unregister(self, s):
        self.unregistered += 1
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
        await _cancelled(tasks)

    _run_counted(main, counting, a, b)
    return counting.polls, n[0], n[1]


async def _cancelled(tasks):
    for t in tasks:
        t.cancel()
    await asyncio.sleep_ms(0)


def _run_counted(main, counting, *socks):
    """asyncio.run(main()) with asyncio's poller counted; the poller put back and socks closed
    however main ended."""
    try:
        asyncio.run(main())
    finally:
        net._io_queue.poller = counting.poller
        for s in socks:
            s.close()


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


# --- a socket waited on with net.readable stays in asyncio's I/O queue between waits ---------

def _connected_pair():
    # two non-blocking UDP sockets on loopback, each connected to the other
    port_a = 20000 + time.ticks_us() % 20000
    port_b = port_a + 1 if port_a < 39999 else port_a - 1
    a = _udp(port_a)
    b = _udp(port_b)
    a.connect(socket.getaddrinfo("127.0.0.1", port_b)[0][-1])
    b.connect(socket.getaddrinfo("127.0.0.1", port_a)[0][-1])
    return a, b


def _lock_step(hops, measure=None):
    """A transfer's receiver loop on both ends of a connected pair: await net.readable, readinto
    into a buffer, write it back; `hops` datagrams in all. Returns (registrations,
    unregistrations) seen by asyncio's poller, and calls measure(hop) at hop 20 and at 20
    hops before the end."""
    q = net._io_queue
    counting = _CountingPoller(q.poller)
    a, b = _connected_pair()
    n = [0]
    over = asyncio.Event()

    async def side(me, first):
        buf = bytearray(4)
        if first:
            me.write(b"ping", 4)
        try:
            while True:
                await net.readable(me)
                k = me.readinto(buf)
                if k is None:
                    continue
                n[0] += 1
                if measure is not None and (n[0] == 20 or n[0] == hops - 20):
                    measure(n[0])
                if n[0] >= hops:
                    over.set()
                    return
                me.write(buf, k)
        finally:
            net.forget(me)

    async def main():
        q.poller = counting
        tasks = [asyncio.create_task(side(b, False)), asyncio.create_task(side(a, True))]
        await over.wait()
        await _cancelled(tasks)

    gc.collect()
    _run_counted(main, counting, a, b)
    assert n[0] >= hops, n
    return counting.registered, counting.unregistered


def test_a_socket_waited_on_with_readable_is_registered_once_not_once_per_wait():
    micropython_only("CPython's asyncio is not MicroPython's: no I/O queue to keep")
    registered, unregistered = _lock_step(HOPS)
    # asyncio alone registers and unregisters each socket once per wait: HOPS of each
    assert registered <= 2, registered
    # forget() (each side's finally, the one that returned and the one cancelled) takes both out
    assert unregistered == 2, unregistered
    assert not net._io_queue.map, net._io_queue.map
    assert not net._waiting, net._waiting


def test_a_wait_with_readable_leaves_little_garbage():
    micropython_only("measures MicroPython's heap")
    seen = {}

    def measure(hop):
        seen[hop] = gc.mem_alloc()

    gc.disable()
    try:
        _lock_step(HOPS, measure)
    finally:
        gc.enable()
    per_hop = (seen[HOPS - 20] - seen[20]) / (HOPS - 40)
    # Measured on the 64-bit unix port: 32 B a hop, the one-item tuple's iterator; asyncio's
    # new entry and registration per wait made it 128 B. A hop also takes id() of the socket
    # twice (net.readable, and the hook's wake-up; three times when asyncio's own wait_io_event
    # and net.forget woke it). id() is the object's address,
    # which on the 32-bit unix port (heap above 1 GB) does not fit a small int: there each is a
    # 32-byte int, 112 B a hop in all. A board's RAM lies below 1 GB (RP2040 at 0x20000000,
    # ESP32 at 0x3FF...), where id() allocates nothing, as on the 64-bit port.
    assert per_hop <= 48 + 3 * _id_bytes(), per_hop


def test_a_lock_step_wake_up_is_not_handed_to_asyncios_own_wait():
    # asyncio's wait_io_event allocates its frame on the heap at every call (more locals and
    # stack than a frame on the C stack holds): a datagram for a socket net.readable waits on is
    # woken by the hook itself, and only anything else goes to asyncio's wait.
    micropython_only("CPython's asyncio is not MicroPython's: no hook")
    own = net._wait_io
    calls = [0]

    def counted(dt):
        calls[0] += 1
        own(dt)

    net._wait_io = counted
    try:
        _lock_step(HOPS)
    finally:
        net._wait_io = own
    assert calls[0] <= 10, calls  # the start and the end: a task's first wait is asyncio's


def test_one_poll_that_wakes_a_readable_socket_and_a_listener_wakes_both():
    # The hook wakes a readable() socket's task itself and hands the rest of the poll's answer
    # to asyncio (a listener waits with asyncio's own queue_read, via net.recvfrom), whichever
    # comes first in it.
    micropython_only("CPython's asyncio is not MicroPython's: no hook")
    got = []
    port = 20000 + time.ticks_us() % 20000
    listening = _udp(port)
    sender = _udp(0)
    to = socket.getaddrinfo("127.0.0.1", port)[0][-1]

    async def main(q, a, b):
        async def kept():
            buf = bytearray(4)
            for _ in range(3):
                await net.readable(a)
                got.append(("kept", a.readinto(buf)))

        async def listener():
            for _ in range(3):
                data, _src = await net.recvfrom(listening, 16)
                got.append(("listener", data))

        tasks = [asyncio.create_task(kept()), asyncio.create_task(listener())]
        for i in range(3):
            await asyncio.sleep_ms(5)  # both wait
            # both datagrams go out before the loop polls again: one poll sees both sockets
            b.write(b"ping", 4)
            sender.sendto(b"to-listener-%d" % i, to)
        await asyncio.sleep_ms(20)
        for t in tasks:
            t.cancel()
        await asyncio.sleep_ms(0)

    try:
        _on_a_pair(main)
    finally:
        listening.close()
        sender.close()
    assert [x for x in got if x[0] == "kept"] == [("kept", 4)] * 3, got
    assert [x[1] for x in got if x[0] == "listener"] == [
        b"to-listener-0", b"to-listener-1", b"to-listener-2"], got


def _id_bytes():
    # What one id() of a socket allocates on this build (0 unless addresses exceed small ints)
    s = _udp(0)
    try:
        gc.collect()
        gc.disable()
        before = gc.mem_alloc()
        for _ in range(100):
            id(s)
        return (gc.mem_alloc() - before) // 100
    finally:
        gc.enable()
        s.close()


def _on_a_pair(main):
    """asyncio.run(main(q, a, b)) with q asyncio's I/O queue and a, b a connected pair; then a
    is forgotten and both are closed, however main ended. Returns what main returned."""
    a, b = _connected_pair()
    try:
        return asyncio.run(main(net._io_queue, a, b))
    finally:
        net.forget(a)
        a.close()
        b.close()


def test_a_cancelled_wait_empties_the_kept_entry_and_forget_takes_it_out():
    micropython_only("CPython's asyncio is not MicroPython's: no I/O queue to keep")
    waits = [0]

    async def main(q, a, b):
        async def waiter():
            try:
                while True:
                    await net.readable(a)
                    a.readinto(bytearray(4))
                    waits[0] += 1
            except asyncio.CancelledError:
                return "cancelled"

        t = asyncio.create_task(waiter())
        for _ in range(3):  # three datagrams: the entry is kept between the waits
            b.write(b"ping", 4)
            await asyncio.sleep_ms(5)
        entry = q.map.get(id(a))
        assert entry is not None and entry[0] is t, entry  # waiting again, in the kept entry
        t.cancel()  # asyncio's remove(): empties the entry (it loops while any names the task)
        result = await t
        assert q.map[id(a)][0] is None, q.map[id(a)]
        net.forget(a)
        assert id(a) not in q.map
        return result

    assert _on_a_pair(main) == "cancelled"
    assert waits[0] == 3, waits


def test_an_error_on_a_kept_socket_nobody_waits_on_takes_it_out_and_the_loop_goes_on():
    micropython_only("CPython's asyncio is not MicroPython's: no I/O queue to keep")
    turns = [0]

    async def main(q, a, b):
        b.write(b"ping", 4)
        await net.readable(a)
        a.readinto(bytearray(4))
        # a is now kept in the queue with no waiter; its peer goes away, and a datagram to
        # the closed port comes back as an ICMP error: POLLERR on a, with nobody waiting
        b.close()
        a.write(b"ping", 4)
        for _ in range(50):  # turns of the loop with a poll each: the error is seen and the
            turns[0] += 1  # entry goes, so the loop does not keep waking for it
            await asyncio.sleep_ms(1)
        assert id(a) not in q.map, q.map.get(id(a))
        # the next wait puts it back, and the socket's pending error reaches the reader
        try:
            await net.readable(a)
            a.readinto(bytearray(4))
        except OSError as e:
            return e.errno
        return None

    errno = _on_a_pair(main)
    assert turns[0] == 50
    assert errno == 111, errno  # ECONNREFUSED (Linux never rate-limits ICMP on loopback)


def test_a_datagram_that_comes_while_nobody_waits_is_read_at_the_next_wait():
    micropython_only("CPython's asyncio is not MicroPython's: no I/O queue to keep")
    buf = bytearray(4)

    async def main(q, a, b):
        b.write(b"one!", 4)
        await net.readable(a)
        assert a.readinto(buf) == 4 and bytes(buf) == b"one!"
        # a's entry is kept, registered for POLLIN, with no waiter; a datagram comes now
        b.write(b"two!", 4)
        for _ in range(20):  # turns with polls that see it: the entry goes, once
            await asyncio.sleep_ms(1)
        assert id(a) not in q.map, q.map.get(id(a))
        await net.readable(a)  # back in the queue, and the datagram is still there
        assert a.readinto(buf) == 4 and bytes(buf) == b"two!"
        return id(a)

    assert _on_a_pair(main) not in net._io_queue.map


# --- net.recvfrom: a datagram the heap cannot take ----------------------------------------------

def test_recvfrom_gives_none_for_a_datagram_the_heap_cannot_take_and_leaves_it_there():
    # The listeners tell "a datagram waits and the heap cannot take it" (None, after the wake)
    # from a wait that could not start (a MemoryError raised): only the first can stall them
    # (firmware/net.py, Stall). A read bigger than any heap stands in for a heap too full
    # (MicroPython's int for a size is a machine word; CPython's allocation must fail too).
    import sys

    big = 1 << 28 if sys.implementation.name == "micropython" else 1 << 40
    a, port = _bound()
    b = net.udp_socket("127.0.0.1", 0)
    got = []

    async def main():
        b.sendto(b"ping", net.addr("127.0.0.1", port))
        got.append(await net.recvfrom(a, big))
        got.append(await net.recvfrom(a, 16))

    try:
        asyncio.run(main())
    finally:
        net.forget(a)
        a.close()
        b.close()
    assert got[0] is None, got
    assert got[1][0] == b"ping", got


def _bound():
    # a socket on a loopback port of its own, and the port (the unix port's sockets have no
    # getsockname): the first free one from a start that differs from run to run
    port = 20000 + id(object()) % 20000
    while True:
        try:
            return net.udp_socket("127.0.0.1", port), port
        except OSError:
            port = 20000 + (port + 1) % 20000
