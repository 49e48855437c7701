# firmware.log: the bounded event ring, under CPython and MicroPython.
from mpytest import micropython_only

from firmware.log import Budget, Log

_K = ("a", "b")


def test_events_come_out_in_order_as_dicts():
    log = Log(capacity=4)
    log.event("x", _K, (1, 2))
    log.event("y", _K, (3, 4))
    a = log.take()
    b = log.take()
    assert (a["ev"], a["a"], a["b"], a["seq"]) == ("x", 1, 2, 0)
    assert (b["ev"], b["seq"]) == ("y", 1)
    assert log.take() is None


def test_full_ring_overwrites_oldest_and_counts_dropped():
    log = Log(capacity=3)
    for i in range(5):
        log.event("e", ("i",), (i,))
    assert log.dropped == 2
    assert [log.take()["i"] for _ in range(3)] == [2, 3, 4]
    assert log.take() is None
    assert [e["i"] for e in log.recent()] == [2, 3, 4]
    assert [e["i"] for e in log.recent(2)] == [3, 4]


def test_sink_gets_json_lines_and_counters_add_up():
    got = []
    log = Log(capacity=2)
    log.sink = got.append
    log.event("tftp", ("file",), ("ipxe.efi",))
    log.count("x")
    log.count("x", 2)
    assert log.counters["x"] == 3
    assert len(got) == 1 and '"file": "ipxe.efi"' in got[0].replace('":"', '": "')
    assert log.pending() == 0


def test_bytes_from_a_request_become_safe_ascii_text_when_read():
    import json

    log = Log(capacity=4)
    log.event("tftp", ("file", "n"), (b"\xff\xfe\x80name\\q", 7))
    e = log.take()
    assert e["file"] == "\\xff\\xfe\\x80name\\\\q" and e["n"] == 7
    text = json.dumps(e)
    assert all(ord(c) < 128 for c in text)  # whatever the bytes were, the JSON is ASCII


def test_a_budget_lets_a_burst_through_then_one_per_interval_and_counts_the_rest():
    log = Log(capacity=64)
    b = Budget(log, "tftp", 100, 3)
    got = [b.take(0) for _ in range(5)]
    assert got == [True, True, True, False, False]
    assert log.counters["tftp.events_suppressed"] == 2
    assert b.take(50) is False  # half an interval: no credit yet
    assert b.take(150) is True  # one interval since the last take: one more
    b.event("tftp", ("stage",), ("refused",))
    e = log.take()
    assert e["stage"] == "refused" and e["suppressed"] == 3  # reported once, with the next one
    b.event("tftp", ("stage",), ("refused",))
    assert "suppressed" not in log.take()
    assert b.take(100000) and b.take(100000) and b.take(100000)  # credit is capped
    assert not b.take(100000)


def test_shed_forgets_delivered_events_but_the_newest_and_asks_the_others():
    log = Log(capacity=8)
    asked = []

    def give_back():
        asked.append(1)
        raise MemoryError  # a helper that fails must not break a MemoryError handler

    log.pressure.append(give_back)
    for i in range(5):
        log.event("e", ("i",), (i,))
    for _ in range(3):
        log.take()  # 0, 1, 2 handed out; 3 and 4 still pending
    log.shed()
    assert [e["i"] for e in log.recent()] == [3, 4]
    assert log.counters["log.events_shed"] == 3 and asked == [1]
    assert log.take()["i"] == 3 and log.take()["i"] == 4  # pending events are never shed
    log.shed()
    assert [e["i"] for e in log.recent()] == [4]  # the newest stays: it gives the next seq


def test_counters_table_is_sized_at_boot():
    import gc

    micropython_only("CPython has no heap of its own to measure")
    names = [f"c.{i}" for i in range(40)]
    log = Log(capacity=4)
    gc.collect()
    before = gc.mem_alloc()
    for name in names:
        log.count(name)
    gc.collect()
    assert gc.mem_alloc() == before  # no new table: a MemoryError handler can always count
