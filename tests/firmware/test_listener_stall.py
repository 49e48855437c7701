"""A network listener's heap stalls, as the watchdog's feeding loop judges them
(firmware/net.py, waitless): the real TftpServer and ProxyDhcp listeners and main's feeding
loop, under CPython on loopback, with a MemoryError where a full heap raises one (the wait, or
the read of a datagram that came) and a clock the test moves on.

A listener is stalled when a datagram has waited unread for 2 s, or when its waits have failed
for 2 s on end; one failed wait followed by a quiet port is not a stall (the board was reset
for it)."""

from __future__ import annotations

import asyncio
import socket

import pytest

import firmware.cpython
import firmware.main
import firmware.proxydhcp
import firmware.tftpd
from firmware.config import Config
from firmware.log import Log
from firmware.net import waitless
from firmware.proxydhcp import ProxyDhcp
from firmware.tftpd import TftpServer
from firmware.watchdog import TaskWatch

CONFIG = {"server_ip": "127.0.0.1", "script_url": "http://127.0.0.1/boot.ipxe"}
RRQ = b"\x00\x01ipxe.efi\x00octet\x00"
STALL_MS = 2000  # firmware/main.py's and net.py's _STALL_MS (a const, no name to import)
SKIP = STALL_MS + 1500  # past a stall, and past the feeding loop's 3 s deadline for a check-in


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Heap:
    """Where the test makes the heap fail: a listener's next wait, or its reads."""

    def __init__(self, monkeypatch):
        self.waits_to_fail = 0  # -1: every one
        self.reads_fail = False
        real_readable = firmware.cpython.readable
        real_recvfrom = socket.socket.recvfrom

        def readable(s):  # only the listeners' recvfrom calls it by this name
            if self.waits_to_fail:
                self.waits_to_fail -= self.waits_to_fail > 0
                raise MemoryError
            return real_readable(s)

        def recvfrom(s, n):
            if self.reads_fail:
                raise MemoryError
            return real_recvfrom(s, n)

        monkeypatch.setattr(firmware.cpython, "readable", readable)
        monkeypatch.setattr(firmware.cpython.Socket, "recvfrom", recvfrom, raising=False)


class Clock:
    """ticks_ms for the listeners and the feeding loop, which the test moves on."""

    def __init__(self, monkeypatch):
        self.ahead = 0
        real = firmware.cpython.ticks_ms
        for mod in (firmware.tftpd, firmware.proxydhcp, firmware.main):
            monkeypatch.setattr(mod, "ticks_ms", lambda: real() + self.ahead)
        self.now = lambda: real() + self.ahead


class Dog:
    def __init__(self):
        self.fed = 0

    def feed(self):
        self.fed += 1


async def until(cond, timeout=5.0):
    for _ in range(int(timeout / 0.005)):
        if cond():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("timed out")


def make(kind, log):
    if kind == "tftp":
        port = free_port()
        return TftpServer(Config(CONFIG), log, "127.0.0.1", port), port, port
    dport, pport = free_port(), free_port()
    svc = ProxyDhcp(Config(CONFIG), log, "127.0.0.1", dport, pport, free_port())
    return svc, dport, pport


async def watched(kind, clock, scenario):
    """Run the listener and the feeding loop over it; scenario(svc, log, ports) runs, and
    the loop's verdict comes back: the task it found late, or None while it still feeds."""
    log = Log(capacity=64)
    svc, port, other = make(kind, log)
    task = asyncio.create_task(svc.run())
    await asyncio.sleep(0.05)
    tasks = TaskWatch({kind: 3000}, clock.now(), log)
    dog = Dog()
    feeder = asyncio.create_task(
        firmware.main._watchdog_loop(dog, tasks, {kind: (task, svc)}, firmware.main.Faults())
    )
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        await until(lambda: dog.fed > 0)
        await scenario(svc, log, tx, port, other)
        fed = dog.fed
        await until(lambda: dog.fed > fed or tasks.tripped is not None)
        assert not task.done()
        return tasks.tripped
    finally:
        tx.close()
        feeder.cancel()
        task.cancel()
        await asyncio.gather(feeder, task, return_exceptions=True)


def no_memory(log):
    return sum(v for k, v in log.counters.items() if k.endswith(".no_memory"))


@pytest.mark.parametrize("kind", ["tftp", "dhcp"])
def test_one_failed_wait_then_a_quiet_port_is_not_a_stall(kind, monkeypatch):
    heap, clock = Heap(monkeypatch), Clock(monkeypatch)

    async def scenario(svc, log, tx, port, other):
        heap.waits_to_fail = 1
        tx.sendto(RRQ if kind == "tftp" else b"\x01", ("127.0.0.1", port))  # wakes it to wait again
        await until(lambda: no_memory(log) == 1)
        await asyncio.sleep(0.05)  # waiting again, and nothing comes
        clock.ahead += SKIP

    assert asyncio.run(watched(kind, clock, scenario)) is None


@pytest.mark.parametrize("kind,which", [("tftp", 0), ("dhcp", 0), ("dhcp", 1)])
def test_a_datagram_the_heap_cannot_take_for_2_s_is_a_stall(kind, which, monkeypatch):
    heap, clock = Heap(monkeypatch), Clock(monkeypatch)

    async def scenario(svc, log, tx, port, other):
        heap.reads_fail = True
        tx.sendto(RRQ, ("127.0.0.1", (port, other)[which]))
        await until(lambda: no_memory(log) >= 3)  # woken, read, failed, again and again
        assert svc.stalled_since is not None
        clock.ahead += SKIP

    assert asyncio.run(watched(kind, clock, scenario)) == kind


@pytest.mark.parametrize("kind", ["tftp", "dhcp"])
def test_waits_that_keep_failing_for_2_s_are_a_stall(kind, monkeypatch):
    heap, clock = Heap(monkeypatch), Clock(monkeypatch)

    async def scenario(svc, log, tx, port, other):
        heap.waits_to_fail = -1
        tx.sendto(RRQ, ("127.0.0.1", port))
        await until(lambda: no_memory(log) >= 3)
        clock.ahead += SKIP
        await until(lambda: svc.stalled_since is not None)  # at a failure after 2 s of them
        # The feeding loop may have checked the listener in between the jump and that failure;
        # past its deadline again, a stalled listener cannot have checked in since.
        clock.ahead += SKIP

    assert asyncio.run(watched(kind, clock, scenario)) == kind


def test_a_datagram_read_at_last_ends_the_stall(monkeypatch):
    heap, clock = Heap(monkeypatch), Clock(monkeypatch)

    async def scenario(svc, log, tx, port, other):
        heap.reads_fail = True
        tx.sendto(RRQ, ("127.0.0.1", port))
        await until(lambda: no_memory(log) >= 3)
        clock.ahead += STALL_MS - 500
        heap.reads_fail = False
        await until(lambda: log.counters.get("tftp.request", 0) == 1)
        assert svc.stalled_since is None
        clock.ahead += SKIP

    assert asyncio.run(watched("tftp", clock, scenario)) is None


def test_waitless_on_a_fake_clock():
    class Svc:
        stalled_since = None

    svc = Svc()
    first = waitless(svc, None, 0)
    assert first == 0 and svc.stalled_since is None  # one failed wait: not a stall
    first = waitless(svc, first, STALL_MS)
    assert first == 0 and svc.stalled_since is None  # not yet over
    first = waitless(svc, first, STALL_MS + 1)  # failed waits, no wake-up between, for too long
    assert first == 0 and svc.stalled_since == 0
    svc.stalled_since = 5  # stalled already (a datagram it could not read): kept as it is
    assert waitless(svc, 1, STALL_MS + 10) == 1 and svc.stalled_since == 5
