# What the firmware uses under CPython (the tests, and the controller's TFTP, which runs the
# firmware's engine) where MicroPython has its own. compat.py and net.py import it only when
# MicroPython's own is missing, so a board never loads it: every function a module defines
# is loaded into the heap with the module, run or not, and each name it uses is interned.
import asyncio
import socket
from time import monotonic_ns


def const(x):
    return x


def ticks_ms():
    return monotonic_ns() // 1_000_000


def ticks_diff(a, b):
    return a - b


def ticks_add(a, b):
    return a + b


def heap_used():
    return 0  # CPython has no heap of its own to report


async def sleep_ms(ms):
    await asyncio.sleep(ms / 1000)


# net.py's socket calls, on asyncio's event loop (firmware/net.py says what each does).


async def recvfrom(s, n):
    # As MicroPython's (firmware/net.py): a wait, then a read, None when the read finds no heap.
    while True:
        await readable(s)
        try:
            return s.recvfrom(n)
        except BlockingIOError:
            pass
        except MemoryError:
            return None


def _wake(fut):
    if not fut.done():
        fut.set_result(None)


async def readable(s):
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    loop.add_reader(s, _wake, fut)
    try:
        await fut
    finally:  # also when cancelled: before the caller closes s
        loop.remove_reader(s)


class Socket(socket.socket):
    """net.udp_socket's sockets: readinto(buf) and write(buf, n) as MicroPython's sockets
    have them (a stream's): None where the socket would block, any other error raised."""

    def readinto(self, buf):
        try:
            return self.recv_into(buf)
        except BlockingIOError:
            return None

    def write(self, buf, n):
        try:
            return self.send(memoryview(buf)[:n])
        except BlockingIOError:
            return None
