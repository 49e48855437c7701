"""Group commit of the boot endpoints' events (bastion.api.deps.GroupCommit): the requests of
one turn of the event loop share one transaction, a small batch soon after a commit of requests
that overlapped stays open for the turns that follow, and an answered request is in the history
even when the controller is killed (-9) in the middle of a storm."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sqlite3
import threading
import time

from bastion.api.deps import GroupCommit
from bastion.state.events import EventStore


def test_events_handed_over_in_one_turn_share_one_transaction(tmp_path):
    store = EventStore(tmp_path / "events.db")
    group = GroupCommit(store.record_many)

    async def storm() -> list[list[int]]:
        return await asyncio.gather(*(group.commit([("boot", {"mac": f"m{i}"}), ("x", {})])
                                      for i in range(50)))  # fmt: skip

    ids = asyncio.run(storm())
    assert (group.batches, group.events) == (1, 100)
    flat = [i for pair in ids for i in pair]
    assert flat == sorted(flat) and len(set(flat)) == 100
    by_id = {e.id: e for e in store.query(limit=1000)}
    assert [by_id[pair[0]].mac for pair in ids] == [f"m{i}" for i in range(50)]


def test_small_batches_within_the_interval_after_a_commit_wait_for_one_commit_together(tmp_path):
    store = EventStore(tmp_path / "events.db")
    interval = 1.0  # long enough that the turns below all fall within it, however slow
    group = GroupCommit(store.record_many, interval=interval, small=8)

    async def storm() -> tuple[list[int], list[list[int]], float]:
        loop = asyncio.get_running_loop()
        # two requests in one turn, nothing before: committed at once, and they overlapped
        first, _ = await asyncio.gather(group.commit([("boot", {"mac": "first"})]),
                                        group.commit([("boot", {"mac": "second"})]))  # fmt: skip
        committed = loop.time()
        later = []
        for i in range(5):  # five turns of the loop, each handing over one event
            later.append(asyncio.ensure_future(group.commit([("boot", {"mac": f"m{i}"})])))
            await asyncio.sleep(0)
        assert not any(t.done() for t in later)  # waiting for the interval to end
        ids = await asyncio.gather(*later)
        return first, ids, loop.time() - committed

    first, ids, waited = asyncio.run(storm())
    assert (group.batches, group.events) == (2, 7)
    assert waited >= interval * 0.99  # a lower bound: a slow machine only makes it longer
    flat = [i for one in ids for i in one]
    assert flat == list(range(first[0] + 2, first[0] + 7))


def test_requests_that_never_overlap_never_wait(tmp_path):
    # one client that asks again only once it has its answer (a machine's /boot.ipxe, then its
    # /ipxe; a test's HTTP client): each batch holds one request, and nothing could join it
    store = EventStore(tmp_path / "events.db")
    group = GroupCommit(store.record_many, interval=60.0, small=8)

    async def one_after_another() -> list[bool]:
        done = []
        for _ in range(5):
            one = asyncio.ensure_future(group.commit([("boot", {})]))
            for _ in range(3):  # its turn, the commit at that turn's end, the waiter's wake-up
                await asyncio.sleep(0)
            done.append(one.done())
        return done

    # with the interval's wait, each after the first would wait a minute
    assert asyncio.run(one_after_another()) == [True] * 5
    assert (group.batches, group.events) == (5, 5)


def test_an_event_after_a_quiet_interval_is_committed_in_its_own_turn(tmp_path):
    store = EventStore(tmp_path / "events.db")
    interval = 0.05
    group = GroupCommit(store.record_many, interval=interval, small=8)

    async def quiet_then_one() -> bool:
        await group.commit([("boot", {})])
        await asyncio.sleep(interval * 2)
        late = asyncio.ensure_future(group.commit([("boot", {})]))
        for _ in range(3):  # its turn, the commit at that turn's end, the waiter's wake-up
            await asyncio.sleep(0)
        return late.done()

    # without the rule, it would wait for a timer `interval` away; three turns take microseconds
    # (a machine so slow that they took 50 ms would let the timer fire: it cannot fail this)
    assert asyncio.run(quiet_then_one())
    assert (group.batches, group.events) == (2, 2)


def test_a_batch_that_is_not_small_is_committed_in_its_own_turn_even_after_a_commit(tmp_path):
    store = EventStore(tmp_path / "events.db")
    group = GroupCommit(store.record_many, interval=60.0, small=8)

    async def busy() -> tuple[bool, bool]:
        await asyncio.gather(group.commit([("boot", {})]), group.commit([("boot", {})]))
        seven = [asyncio.ensure_future(group.commit([("boot", {})])) for _ in range(7)]
        for _ in range(3):
            await asyncio.sleep(0)
        small_waits = not any(t.done() for t in seven)  # 7 < 8: open for up to a minute
        for t in seven:
            t.cancel()  # their events are still committed with the next batch
        await asyncio.sleep(0)
        eight = [asyncio.ensure_future(group.commit([("boot", {})])) for _ in range(8)]
        for _ in range(3):
            await asyncio.sleep(0)
        return small_waits, all(t.done() and not t.cancelled() for t in eight)

    small_waits, eight_done = asyncio.run(busy())
    assert small_waits and eight_done
    # the seven joined the open batch of the eight: one commit for all fifteen
    assert (group.batches, group.events, store.count()) == (2, 17, 17)


def test_a_failed_batch_stores_none_of_it_and_fails_every_waiter(tmp_path):
    store = EventStore(tmp_path / "events.db")
    group = GroupCommit(store.record_many)

    async def storm():
        good = group.commit([("boot", {})])
        bad = group.commit([(None, {})])  # kind is NOT NULL: the insert fails
        return await asyncio.gather(good, bad, return_exceptions=True)

    results = asyncio.run(storm())
    assert all(isinstance(r, sqlite3.IntegrityError) for r in results), results
    assert store.count() == 0
    assert store.record("boot") > 0  # the store still works afterwards
    assert store.count() == 1


# --- kill -9 during a storm -----------------------------------------------------------------------

CLIENTS = 16


def boot_requests(port: int, who: int, answered: set[str], stop: threading.Event) -> None:
    """GET /ipxe with a query no other request has, a new connection each; a serial whose whole
    answer (status line, headers, Content-Length bytes of body) arrived goes into `answered`."""
    n = 0
    while not stop.is_set():
        serial = f"crash-{who}-{n}"
        n += 1
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(f"GET /ipxe?mac=52:54:00:12:34:01&serial={serial} HTTP/1.1\r\n"
                          "Host: t\r\nConnection: close\r\n\r\n".encode())  # fmt: skip
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
        except OSError:
            continue  # refused or cut by the kill: not answered
        head, sep, body = data.partition(b"\r\n\r\n")
        length = re.search(rb"(?im)^content-length: *(\d+)", head)
        if sep and head.startswith(b"HTTP/1.1 ") and length and len(body) == int(length.group(1)):
            answered.add(serial)


def test_every_answered_boot_request_is_in_the_history_after_kill_9(serve, site_dir):
    server = serve(site_dir)
    answered: set[str] = set()
    stop = threading.Event()
    threads = [threading.Thread(target=boot_requests, args=(server.port, i, answered, stop))
               for i in range(CLIENTS)]  # fmt: skip
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 60
        while len(answered) < 300 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(server.proc.pid, signal.SIGKILL)  # in the middle of the storm, no warning
        server.proc.wait(timeout=10)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert len(answered) >= 300, "the storm did not get going"
    store = EventStore(server.db)  # opening recovers the WAL, as a restarted controller does
    recorded = set()
    for event in store.query(kind="boot", limit=10000):
        m = re.search(r"serial=(crash-\d+-\d+)", event.payload.get("query", ""))
        if m:
            recorded.add(m.group(1))
    store.close()
    assert answered - recorded == set()
    # requests cut short by the kill may be recorded without an answer: never the other way
    assert len(recorded) >= len(answered)

