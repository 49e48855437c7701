# The UDP shell: the only firmware module that touches sockets.
#
# MicroPython's asyncio has no public UDP API and its sockets have no recv_into/recvfrom_into,
# so on MicroPython a wait for a datagram is a yield to asyncio's I/O queue followed by a
# non-blocking recvfrom/readinto. On CPython (tests) the event loop's sock_* calls do the same.
# A transfer's receiver, once per block, waits with `await readable(s)` and reads and sends
# with the socket's own readinto(buf) and write(buf, n): on MicroPython that costs no
# generator (168 bytes on the unix port, per datagram) and no call of ours at all.
# CPython's are in firmware/cpython.py, whose sockets have the same readinto and write.
# Addresses are opaque: a raw sockaddr (bytes) on the unix port, a tuple on CPython. Pass them
# back to sendto as they came, and read them with addr_ip4/addr_port.
import socket

try:
    import asyncio.core as _core  # MicroPython

    _io_queue = _core._io_queue
except ImportError:  # CPython
    _io_queue = None

from firmware.compat import const, ticks_diff

_EAGAIN = const(11)
_SO_BINDTODEVICE = const(25)  # Linux's (asm-generic/socket.h); the unix port does not name it


def addr(ip, port):
    """The socket address for a dotted-quad ip and a port, in this port's format."""
    return socket.getaddrinfo(ip, port)[0][-1]


def addr_ip4(a):
    """The 4 address bytes of a socket address."""
    if isinstance(a, tuple):
        return bytes(int(x) for x in a[0].split("."))
    return bytes(a[4:8])


def addr_port(a):
    if isinstance(a, tuple):
        return a[1]
    return (a[2] << 8) | a[3]


def ip_str(b):
    return "%d.%d.%d.%d" % (b[0], b[1], b[2], b[3])


def udp_socket(ip="0.0.0.0", port=0, broadcast=False):
    """A non-blocking UDP socket bound to (ip, port); port 0: a port of its own, which no
    other socket has (a TFTP transfer's). broadcast: True, or an interface's name (bytes;
    Linux, the sim board): it may send broadcasts, and with a name it takes datagrams that
    arrive on that interface only (SO_BINDTODEVICE: an OSError where that cannot be had,
    never a socket that hears more). (No parameter of its own: a new name costs the sim
    board an interned name, firmware/main.py.)"""
    s = _socket(socket.AF_INET, socket.SOCK_DGRAM)
    if port:  # a listener's port, bound again at once after a restart
        # Not for port 0: the kernel may give a socket that allows reuse a port another such
        # socket holds, and a transfer would then send from the listener's port (or share a
        # port with another transfer) when that port is in the ephemeral range (tests' are).
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if broadcast:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        if broadcast is not True:
            s.setsockopt(socket.SOL_SOCKET, _SO_BINDTODEVICE, broadcast)
    s.setblocking(False)
    s.bind(addr(ip, port))
    return s


errno = 0  # the errno of the last send that failed (ENETUNREACH, 101: no route; ...)

# MicroPython's sockets are streams: write(buf, n) sends buf[:n] on a connected socket
# without the two memoryview objects (64 bytes on the unix port) a sliced send costs per
# datagram, and returns None where send would raise EAGAIN; other errors raise OSError.
# udp_socket's sockets have it on CPython too (firmware/cpython.py).


def send(s, buf, n, to=None, log=None, name=None):
    """Send buf[:n]; returns False (never raises) when the stack refuses it. A failure is
    never silent: with the service's log and name, it counts <name>.send_failed and, under
    the log's Budget for them (log.net), records {"ev": "net", "svc": name, "errno": e,
    "to": ip}; `to` is None for a connected socket."""
    try:
        if to is not None:
            s.sendto(memoryview(buf)[:n], to)
            return True
        if s.write(buf, n) is not None:
            return True
        x = None  # the socket's send buffer is full
    except OSError as e:
        x = e
    return failed(x, to, log, name)


def failed(x, to=None, log=None, name=None):
    """A datagram the stack refused, as send reports it (for a send made elsewhere, with
    the socket's write): x is the OSError it raised, or None when the socket's write gave
    None (its send buffer is full: EAGAIN). Returns False."""
    global errno
    if x is None:
        e = _EAGAIN
    else:
        e = x.errno if isinstance(x.errno, int) else -1
    errno = e
    if log is not None:
        log.count(name + ".send_failed")
        if log.net.take():
            ip = None if to is None else ip_str(addr_ip4(to))
            log.net.event("net", ("svc", "errno", "to"), (name, e, ip))
    return False


# A function called once per packet keeps its frame on the C stack only while it is small
# (MicroPython: 11 words of locals and stack, and a try takes most of them; `except ... as`
# more). Beyond that every call allocates its frame on the heap and frees it on return: a
# search of the heap for a run of free blocks, per call. The socket's readinto and write are
# the hot path's calls without a Python frame at all.

if _io_queue is not None:

    def recvfrom(s, n):
        """Await one datagram of at most n bytes: (bytes, addr), or None when one waits and
        the heap cannot take it. A MemoryError raised is one before any wait: nothing is
        known to be waiting (waitless, below, tells the two apart)."""
        while True:
            yield _io_queue.queue_read(s)
            try:
                return s.recvfrom(n)
            except OSError as e:
                if e.errno != _EAGAIN:
                    raise
            except MemoryError:
                return None

    _ONCE = (None,)

    # A socket waited on with readable() stays in asyncio's I/O queue between waits. asyncio
    # takes a socket out of its queue after each wake-up and puts it back at the next wait: a
    # new entry (a list) and a new registration with the poller each time, 96 of the 128 bytes
    # a lock-step wait allocated (tests/firmware/mpy/test_net_loop.py), and the collector's time
    # to clear them up: with them gone, the firmware's lock-step on one CPU takes about 6% less
    # (docs/benchmarks.md). Here the entry stays, registered for POLLIN, with no waiter between
    # a wake-up and the next wait, which only names its task: nothing more on the way from an
    # ACK to its DATA than asyncio did. _waiting holds the ids of the sockets readable() is
    # waiting on: only their entries stay. An event for an entry nobody waits on (a datagram or
    # an error, ECONNREFUSED, that came before the task waited again) takes it out as asyncio
    # would, so that it cannot wake the loop again and again; the next wait puts it back. Such
    # a socket is only ever waited on with readable() (asyncio's own queue_read asserts on an
    # entry without a waiter in some releases), and forget() takes it out before it is closed.
    # Both layouts of asyncio's entries hold the read waiter first and the stream last
    # ([read, write, s] up to 1.29, [read, pri, write, s] after).
    _waiting = set()
    _dequeue = type(_io_queue)._dequeue  # asyncio's own, for the entries it may take out

    def readable(s):
        """An awaitable that returns once s has a datagram to read. s joins asyncio's I/O
        queue for the current task (or, kept from the last wait, has the task named in its
        entry), and awaiting a one-item tuple yields once to the loop: what
        `yield _io_queue.queue_read(s)` does inside asyncio's own streams, with a 32-byte tuple
        iterator in place of a generator per wait."""
        i = id(s)
        e = _io_queue.map.get(i)
        if e is None:
            _io_queue.queue_read(s)
        else:  # still registered for POLLIN
            t = e[0] = _core.cur_task
            t.data = _io_queue  # what asyncio's queue_read does: a cancel finds the task here
        _waiting.add(i)
        return _ONCE

    def forget(s):
        """Take s out of asyncio's I/O queue, where readable() keeps it between waits: before
        s is closed, when no task waits on it. asyncio calls this too, in place of its own
        IOQueue._dequeue, when a waiter was woken or cancelled, or an event came for an entry
        with none: a socket readable() was waiting on keeps its entry and its registration,
        with no waiter; any other goes as asyncio has it."""
        i = id(s)
        m = _io_queue.map
        if i in _waiting:
            _waiting.discard(i)
            m[i][0] = None
        elif i in m:
            _dequeue(_io_queue, s)

    _io_queue._dequeue = forget

    _socket = socket.socket

    # One poll per wake-up, not two. While any timer is pending (the firmware always has one:
    # the watchdog, the heap sampler, the TFTP clock), asyncio's loop polls until the timer,
    # and when a datagram wakes a task it loops and polls again with a timeout of 0 before
    # running that task: a second syscall, and a second 144-byte frame on the heap (the unix
    # port), per packet. The hook skips that second poll only: whatever came meanwhile is
    # found by the next one, after one task step. It shadows the method on asyncio's own I/O
    # queue, which its loop calls as _io_queue.wait_io_event(dt) (checked on MicroPython 1.29);
    # where that is not there, nothing is changed. Measured in docs/benchmarks.md.
    #
    # The poll itself is the hook's too. asyncio's wait_io_event has more locals and stack than
    # fit a frame on the C stack (above), so each of its calls, one per packet, allocated its
    # frame on the heap and freed it: with the heap mostly code, that search for a free run and
    # the two calls (it, then forget) were about a fifth of the firmware's instructions per lock-
    # step block that waits (callgrind, docs/benchmarks.md). Most wake-ups are one datagram for a
    # socket readable() waits on: the hook wakes that task itself, as asyncio would (its task
    # queue's push), and keeps the entry as forget() would. Anything else in the poll's answer (an
    # error or hang-up bit, a writer, a socket waited on by asyncio's own queue_read: the
    # listeners, the console) goes to asyncio's wait_io_event, which polls again at once and finds
    # it: poll is level-triggered. An entry the hook has already woken is then taken out by
    # asyncio as one with no waiter (forget, above), and put back at its next wait.
    _wait_io = getattr(_io_queue, "wait_io_event", None)
    _polled = False

    def _wait_io_event(dt):
        global _polled
        if dt == 0 and _polled:
            _polled = False
            return
        _polled = dt > 0
        # r: (socket, events), one tuple the poller reuses. 0x3E: POLLPRI, POLLOUT, POLLERR,
        # POLLHUP, POLLNVAL (the same bits on Linux and in MicroPython's own streams).
        for r in _io_queue.poller.ipoll(dt):
            if r[1] & 0x3E or not _woke(r[0]):
                _wait_io(0)
                return

    def _woke(s):
        # Wake the task that readable() has waiting on s; False when none is.
        i = id(s)
        if i not in _waiting:
            return False
        e = _io_queue.map[i]
        _core._task_queue.push(e[0])
        e[0] = None
        _waiting.discard(i)
        return True

    if _wait_io is not None and hasattr(_core._task_queue, "push"):
        _io_queue.wait_io_event = _wait_io_event

else:  # CPython
    from firmware.cpython import Socket as _socket
    from firmware.cpython import readable, recvfrom  # noqa: F401

    def forget(s):
        """Nothing on CPython: its event loop keeps no registration between waits."""



# A listener's heap stalls, as the watchdog's feeding loop (firmware/main.py) judges them: a
# listener is stalled (its stalled_since, ticks) when a datagram has waited in its socket unread
# because the heap could not take it (recvfrom gave None), or when for _STALL_MS it could not
# even start a wait (recvfrom raised MemoryError). A single failed wait is neither: once the
# wait starts, a quiet port is not a stalled one (it was judged so, and the board reset 2 s
# after one MemoryError on a quiet port 69). No class: every name costs the sim board
# (firmware/main.py, "Interned names").
_STALL_MS = const(2000)  # main.py's, the feeding loop's verdict


def waitless(svc, first, now):
    """A wait of svc's listener could not start at `now`; first: the first such failure since
    its last wake-up, or None. Returns the new first. A run of failures with no wake-up
    between is unbroken (a wait ends only at a wake-up): after _STALL_MS of it, svc is stalled
    since the first."""
    if first is None:
        return now
    if svc.stalled_since is None and ticks_diff(now, first) > _STALL_MS:
        svc.stalled_since = first
    return first
