# firmware.log: the bounded event ring, under CPython and MicroPython.
from firmware.log import Log

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
