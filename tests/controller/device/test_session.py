"""bastion.device.session.Session, driven with bytes and a clock passed in: no thread, no port.

Each guarantee in the session's docstring is a test here. Device lines are fed whole, byte by
byte and with trailing bytes (a REPL prompt glued in front of the next line), h11's habit; the
scenarios at the end run against the firmware's own Console as the device, in-process."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bastion.device.session import (
    CATCHUP,
    HELLO,
    READY,
    STATUS,
    ConsoleData,
    DeviceError,
    DeviceEvent,
    DeviceTimeout,
    NotSent,
    Outcome,
    OutcomeUnknown,
    Resynced,
    Session,
)
from firmware import frame
from firmware.console import Console
from firmware.log import Log
from firmware.power import Power

TOKEN = "5f2c9a10"  # the session token of docs/serial-protocol.md's examples
PORT = "/dev/ttyTEST"
BANNER = b"MicroPython v1.28.0 on 2026-01-01; linux [GCC 14.2.1] version\r\n>>> "


def new(**kw) -> Session:
    return Session(TOKEN, name=PORT, timeout_s=5.0, retry_s=1.0, **kw)


def dev(obj: dict) -> bytes:
    """A line from the device."""
    return frame.encode(obj, frame.TO_HOST)


def to_device(obj: dict) -> bytes:
    return frame.encode(obj, frame.TO_DEVICE)


def sent(s: Session) -> list[dict]:
    """What the session has to send, decoded as the device does; always whole frames."""
    d = frame.Deframer(frame.TO_DEVICE, 65536)
    data = s.data_to_send()
    out = list(d.feed(data))
    assert d.counters() == {"frames": len(out), "noise": 0, "bad": 0, "echo": 0, "overlong": 0}
    assert data.endswith(b"\n") or not data
    return out


def whole(s: Session, data: bytes, now: float) -> list:
    return s.receive(data, now)


def byte_by_byte(s: Session, data: bytes, now: float) -> list:
    out = []
    for i in range(len(data)):
        out += s.receive(data[i : i + 1], now)
    return out


def trailing(s: Session, data: bytes, now: float) -> list:
    # the start of the next line arrives with this one: it must wait for its end of line
    return s.receive(data + b"\r\n>>> ", now)


@pytest.fixture(params=[whole, byte_by_byte, trailing])
def feed(request):
    return request.param


def reply(req: dict, **fields) -> bytes:
    return dev({"id": req["id"], "ok": True, **fields})


def refuse(req: dict, text: str, code: str) -> bytes:
    return dev({"id": req["id"], "ok": False, "error": text, "code": code})


def hello_fields(boot="b1", seq=0):
    return {"proto": 1, "boot": boot, "uptime_ms": 5, "seq": seq, "channels": 8}


def up(s: Session, now=0.0, boot="b1", seq=0, events=(), feed=whole) -> list:
    """connected(), then the resync answered: the session is READY."""
    return s.connected(now) + finish(s, now, boot, seq, events, feed)


def finish(s: Session, now=0.0, boot="b1", seq=0, events=(), feed=whole) -> list:
    """Answer the hello, one catch-up page (and the empty one after it) and the status."""
    (h,) = sent(s)
    assert h["op"] == "hello"
    out = feed(s, reply(h, **hello_fields(boot, seq)), now)
    (ev,) = sent(s)
    assert ev["op"] == "events"
    out += feed(s, reply(ev, boot=boot, events=list(events), first=0), now)
    if events:
        (ev,) = sent(s)
        out += feed(s, reply(ev, boot=boot, events=[], first=0), now)
    (st_,) = sent(s)
    assert st_["op"] == "status"
    out += feed(s, reply(st_, boot=boot, power=[]), now)
    assert s.state == READY
    return out


def outcomes(outs: list) -> list[Outcome]:
    return [o for o in outs if isinstance(o, Outcome)]


def events(outs: list) -> list[dict]:
    return [o.fields for o in outs if isinstance(o, DeviceEvent)]


def ev(boot: str, seq: int, kind="dhcp", **fields) -> dict:
    return {"boot": boot, "ev": kind, "seq": seq, "t": seq * 10, **fields}


# --- the resync after each connection -----------------------------------------------------
def test_connect_says_hello_catches_up_reads_status_then_is_ready(feed):
    s = new()
    assert s.connected(0.0) == []
    # byte for byte the hello of docs/serial-protocol.md
    assert s.data_to_send() == (
        b'#EB> bcc66aea {"id":1,"op":"hello","proto":1,"session":"5f2c9a10"}\n'
    )
    assert s.state == HELLO and not s.ready
    doc_hello = (b'#EB< f02ea103 {"id":1,"ok":true,"proto":1,"boot":"8e41d2f7","uptime_ms":5021,'
                 b'"seq":12,"channels":8,"fw":"0.1.0","board":"sim"}\n')
    assert feed(s, doc_hello, 0.1) == []
    # the first device we talk to: its events from the hello's seq on, not its whole ring
    assert sent(s) == [{"id": 2, "op": "events", "since": 12, "n": 16}]
    assert s.state == CATCHUP and s.info["fw"] == "0.1.0"
    assert feed(s, dev({"id": 2, "ok": True, "boot": "8e41d2f7", "events": [], "next": 12,
                        "first": 0}), 0.2) == []
    assert sent(s) == [{"id": 3, "op": "status"}]
    assert s.state == STATUS
    out = feed(s, dev({"id": 3, "ok": True, "boot": "8e41d2f7", "power": []}), 0.3)
    assert out == [Resynced(s.info, {"id": 3, "ok": True, "boot": "8e41d2f7", "power": []})]
    assert s.ready and s.last_error is None and s.boot == "8e41d2f7"
    assert s.cursor() == ("8e41d2f7", 12)
    assert s.counters()["connects"] == 1 and s.counters()["requests"] == 3


def test_requests_wait_unsent_until_the_resync_is_done(feed):
    s = new()
    rid = s.request("power", {"channel": 2, "state": "on"}, 0.0)
    assert s.data_to_send() == b"" and s.pending() == [rid]
    s.connected(0.0)
    assert s.data_to_send().count(b"\n") == 1  # the hello, not the request
    s.tick(0.5)
    assert s.data_to_send() == b""
    s.tick(1.0)
    assert [r["op"] for r in sent(s)] == ["hello"]  # the hello re-sent, still not the request
    s.connected(1.0)  # (a new connection: the hello is due at once)
    finish(s, 1.1, feed=feed)
    assert s.data_to_send() == to_device({"id": rid, "op": "power", "channel": 2, "state": "on"})


def test_a_status_that_fails_still_makes_the_link_ready():
    s = new()
    s.connected(0.0)
    (h,) = sent(s)
    s.receive(reply(h, **hello_fields()), 0.0)
    (e,) = sent(s)
    s.receive(reply(e, events=[], first=0), 0.0)
    assert [r["op"] for r in sent(s)] == ["status"]
    out = s.tick(5.0)  # status unanswered within timeout_s: usable, status unknown
    assert out == [Resynced(s.info, None)] and s.ready and s.status is None


# --- requests: exactly one outcome ----------------------------------------------------------
def test_a_request_gets_its_reply_once_and_later_copies_are_strays(feed):
    s = new()
    up(s, feed=feed)
    rid = s.request("power", {"channel": 3, "state": "on"}, 1.0)
    (req,) = sent(s)
    line = reply(req, channel={"ch": 3, "output": "on"})
    out = feed(s, line, 1.1)
    assert outcomes(out) == [Outcome(rid, "power", reply={"id": rid, "ok": True,
                                                          "channel": {"ch": 3, "output": "on"}})]
    assert outcomes(out)[0].result()["channel"]["output"] == "on"
    assert feed(s, line, 1.2) == [] and s.counters()["stray_replies"] == 1
    assert s.pending() == [] and s.data_to_send() == b""


def test_a_refusal_is_a_device_error_with_the_devices_words(feed):
    s = new()
    up(s, feed=feed)
    rid = s.request("power", {"channel": 3, "state": "cycle", "off_ms": 1000}, 1.0)
    (req,) = sent(s)
    text = "node2: off time 1000 ms is shorter than its minimum off time of 5000 ms"
    (o,) = outcomes(feed(s, refuse(req, text, "refused"), 1.1))
    assert o.id == rid and type(o.error) is DeviceError
    assert o.error.code == "refused" and str(o.error) == f"power: {text}"
    assert o.error.reply["error"] == text
    with pytest.raises(DeviceError, match="minimum off time"):
        o.result()


def test_an_unanswered_request_is_resent_with_the_same_bytes_until_its_deadline():
    s = new(keepalive_s=None)  # a silent device also gets keepalives: the test below has them
    up(s)
    rid = s.request("power", {"channel": 0, "state": "cycle"}, 10.0, timeout=3.5)
    first = s.data_to_send()
    assert s.next_deadline() == 11.0
    assert s.tick(10.9) == [] and s.data_to_send() == b""
    assert s.tick(11.0) == [] and s.data_to_send() == first
    assert s.tick(12.0) == [] and s.data_to_send() == first
    assert s.tick(13.0) == [] and s.data_to_send() == first
    assert s.counters()["retries"] == 3
    (o,) = s.tick(13.5)
    assert o.id == rid and isinstance(o.error, DeviceTimeout) and o.error.code == "timeout"
    assert str(o.error) == f"power: no reply from the device on {PORT} within 3.5 s (no answer)"
    assert s.counters()["timeouts"] == 1 and s.pending() == []
    assert s.next_deadline() is None  # nothing left to resend
    # the reply comes after all: nobody waits for it any more
    assert s.receive(dev({"id": rid, "ok": True}), 14.0) == []
    assert s.counters()["stray_replies"] == 1


def test_a_request_keeps_its_deadline_while_the_port_is_gone():
    s = new()
    up(s)
    rid = s.request("status", {}, 1.0)
    s.data_to_send()
    assert s.disconnected(2.0) == []
    assert s.tick(5.0) == [] and s.data_to_send() == b""  # nothing to write to
    (o,) = s.tick(6.0)
    assert o.id == rid and "(port not open)" in str(o.error)


def test_a_cancelled_request_is_neither_resent_nor_answered():
    s = new(keepalive_s=None)
    up(s)
    rid = s.request("heap", {}, 1.0)
    s.data_to_send()
    s.cancel(rid)
    assert s.tick(2.0) == [] and s.data_to_send() == b"" and s.tick(7.0) == []


def test_stray_replies_are_counted_and_change_nothing(feed):
    s = new()
    up(s, feed=feed)
    rid = s.request("heap", {}, 1.0)
    s.data_to_send()
    strays = [
        dev({"id": 999, "ok": True}),  # nobody asked
        dev({"id": None, "ok": False, "error": "request without an integer id",
             "code": "badreq"}),
        dev({"id": "1", "ok": True}),
        dev({"id": True, "ok": True}),
        dev({"ok": True}),  # neither a reply nor an event
    ]
    for line in strays:
        assert feed(s, line, 1.5) == []
    assert s.counters()["stray_replies"] == len(strays) and s.pending() == [rid]


def test_close_ends_every_request_and_refuses_new_ones():
    s = new()
    a = s.request("status", {}, 0.0)
    up(s)
    b = s.request("heap", {}, 1.0)
    out = s.close(1.0)
    assert sorted(o.id for o in out) == [a, b]
    assert all(o.error.code == "closed" and str(o.error) == "link closed" for o in out)
    with pytest.raises(DeviceError, match="link closed"):
        s.request("heap", {}, 1.0)
    assert s.receive(dev({"id": b, "ok": True}), 1.0) == [] and s.tick(9.0) == []
    assert s.connected(9.0) == [] and s.close(9.0) == [] and not s.ready


# --- the boundary: garbage is counted, never raised -------------------------------------------
def test_repl_noise_garbage_and_odd_frames_are_counted_and_the_link_goes_on(feed):
    s = new(max_line=200)
    up(s, feed=feed)
    rid = s.request("heap", {}, 1.0)
    (req,) = sent(s)
    garbage = [
        BANNER + b"\r\n",
        b"MPY: soft reboot\r\n",
        b"Traceback (most recent call last):\r\n",
        b"\x00\xff\xfe garbage\r\n",
        b"#EB< 0000 {cut\r\n",  # a cut frame
        dev({"id": rid, "ok": True})[:-3] + b"}\n",  # a checksum that does not match
        b"\xfe" * 300 + b"\n",  # over max_line
        to_device(req),  # our own request, echoed by a cooked tty
    ]
    for g in garbage:
        assert feed(s, g, 1.1) == []
    odd = [
        {"ev": 7, "seq": 1},  # an event without a kind
        {"ev": "dhcp", "boot": 5, "seq": 1},
        {"ev": "dhcp", "boot": "b1", "seq": "1"},
        {"ev": "dhcp", "boot": "b1", "seq": True},
        {"id": rid, "ok": "yes"},  # a reply without a boolean ok
        {"id": rid},
    ]
    for o in odd:
        assert feed(s, dev(o), 1.2) == []
    c = s.counters()
    assert c["bad_messages"] == len(odd)
    assert c["frame_noise"] >= 4 and c["frame_bad"] >= 2 and c["frame_overlong"] == 1
    assert c["frame_echo"] == 1
    assert s.pending() == [rid] and s.ready
    (o,) = outcomes(feed(s, reply(req, used=1), 1.3))
    assert o.reply["used"] == 1


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 40) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=8,
)
keys = st.sampled_from(["id", "ok", "ev", "boot", "seq", "code", "error", "events", "first",
                        "status", "cons", "at", "d", "x"])
messages = st.dictionaries(keys, json_values | st.sampled_from(["b1", "b2", "nosession"]),
                           max_size=6)


def _any_state_session(n: int) -> Session:
    s = new()
    if n == 0:
        return s  # DOWN
    s.connected(0.0)
    if n == 1:
        return s  # HELLO, hello id 1 in flight
    s = new()
    up(s)
    s.request("power", {"channel": 0, "state": "cycle"}, 1.0)
    s.request("status", {}, 1.0)
    if n == 3:
        s.receive(dev(ev("b2", 0, "boot")), 1.0)  # back in HELLO with requests pending
    if n == 4:
        s.receive(dev(ev("b1", 3)), 1.0)  # READY, fetching seqs 0..2 lost on the line
    return s


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 4), st.lists(st.binary(max_size=80), max_size=6))
def test_any_bytes_never_raise(state, chunks):
    s = _any_state_session(state)
    for c in chunks:
        s.receive(c, 1.0)
    s.tick(100.0)
    assert s.pending() == [] and s.counters()["frame_frames"] >= 0


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 4), st.lists(messages, max_size=6))
def test_any_well_framed_object_never_raises(state, objs):
    s = _any_state_session(state)
    frames = s.counters()["frame_frames"]
    for o in objs:
        s.receive(dev(o), 1.0)
        s.data_to_send()
    s.tick(100.0)
    assert s.counters()["frame_frames"] == frames + len(objs)


# --- hello failures ---------------------------------------------------------------------------
def test_an_unanswered_hello_is_resent_then_replaced_by_a_new_one():
    s = new()
    s.connected(0.0)
    first = s.data_to_send()
    s.tick(1.0)
    assert s.data_to_send() == first  # same id, every retry_s
    s.tick(2.0)
    assert s.data_to_send() == first
    s.tick(3.0)  # hello_timeout_s: counted, a new hello (new id) at once
    assert sent(s) == [{"id": 2, "op": "hello", "proto": 1, "session": TOKEN}]
    c = s.counters()
    assert c["hello_failures"] == 1 and c["timeouts"] == 1 and c["retries"] == 2
    assert s.last_error == f"hello: no reply from the device on {PORT} within 3 s (no answer)"
    s.receive(dev({"id": 1, "ok": True, **hello_fields()}), 3.1)  # the old one, late
    assert s.counters()["stray_replies"] == 1 and s.state == HELLO
    s.receive(dev({"id": 2, "ok": True, **hello_fields()}), 3.2)
    assert s.state == CATCHUP


def test_a_refused_hello_is_reported_and_not_hammered(feed):
    s = new()
    s.connected(0.0)
    (h,) = sent(s)
    text = "protocol 1 not supported (this device speaks 2)"
    assert feed(s, refuse(h, text, "refused"), 0.5) == []
    assert s.last_error == f"hello: {text}" and s.counters()["hello_failures"] == 1
    assert s.next_deadline() == 3.5
    s.tick(3.4)
    assert s.data_to_send() == b""
    s.tick(3.5)
    assert sent(s) == [{"id": 2, "op": "hello", "proto": 1, "session": TOKEN}]


def test_a_hello_reply_without_a_boot_id_is_malformed():
    s = new()
    s.connected(0.0)
    (h,) = sent(s)
    s.receive(reply(h, proto=1, boot=None, seq=0), 0.1)
    c = s.counters()
    assert c["bad_messages"] == 1 and c["hello_failures"] == 1 and s.state == HELLO
    assert s.boot is None and "no boot id" in s.last_error


def test_a_disconnect_during_the_hello_counts_and_the_next_connection_starts_over():
    s = new()
    s.connected(0.0)
    sent(s)
    s.disconnected(0.5)
    c = s.counters()
    assert c["hello_failures"] == 1 and c["disconnects"] == 1 and s.data_to_send() == b""
    s.tick(10.0)
    assert s.data_to_send() == b""  # no hello while the port is gone
    s.receive(dev({"id": 1, "ok": True, **hello_fields()}), 10.5)  # from the old connection
    assert s.state != CATCHUP
    up(s, 11.0)
    assert s.counters()["connects"] == 2


# --- device restarts --------------------------------------------------------------------------
def test_a_restart_fails_state_changing_requests_in_flight_and_resends_idempotent_ones(feed):
    s = new()
    up(s, boot="b1", seq=4, feed=feed)
    cyc = s.request("power", {"channel": 0, "state": "cycle"}, 1.0)
    on = s.request("power", {"channel": 5, "state": "on"}, 1.0)
    watch = s.request("watch", {"channel": 1, "timeout_ms": 9000, "boot_ms": 9000}, 1.0)
    on_line = to_device({"id": on, "op": "power", "channel": 5, "state": "on"})
    assert len(sent(s)) == 3
    # the device restarts (a watchdog reset): its boot event names a new boot
    boot_ev = ev("b2", 0, "boot", version="0.1.0")
    out = feed(s, dev(boot_ev), 1.5)
    assert out == [] and s.state == HELLO  # held until the catch-up, not delivered
    (h,) = sent(s)
    assert h["op"] == "hello"
    out = feed(s, reply(h, **hello_fields("b2", 1)), 2.1)
    (o,) = outcomes(out)
    assert o.id == cyc and isinstance(o.error, OutcomeUnknown)
    assert o.error.code == "restarted" and "may or may not have been carried out" in str(o.error)
    assert s.counters()["device_restarts"] == 1
    (page,) = sent(s)
    assert page == {"id": page["id"], "op": "events", "since": 0, "n": 16}  # a boot seen begin
    out = feed(s, reply(page, boot="b2", events=[{k: v for k, v in boot_ev.items()
                                                  if k != "boot"}], first=0), 2.2)
    assert events(out) == [boot_ev]  # the catch-up names the boot of the hello
    (page,) = sent(s)
    feed(s, reply(page, boot="b2", events=[], first=0), 2.3)
    (st_,) = sent(s)
    out = feed(s, reply(st_, boot="b2"), 2.4)
    assert isinstance(out[0], Resynced) and events(out) == []  # the held copy: a duplicate
    assert s.counters()["events_dup"] == 1
    # the idempotent ones go to the new boot again, same ids, same bytes
    assert s.data_to_send() == on_line + to_device(
        {"id": watch, "op": "watch", "channel": 1, "timeout_ms": 9000, "boot_ms": 9000})
    assert sorted(s.pending()) == [on, watch]


def test_a_nosession_answer_means_the_device_restarted():
    s = new()
    up(s, boot="b1")
    cyc = s.request("power", {"channel": 0, "state": "cycle"}, 1.0)
    (req,) = sent(s)
    s.receive(refuse(req, "no session: send hello first", "nosession"), 1.5)
    assert s.state == HELLO and s.pending() == [cyc]  # no outcome yet: the hello decides
    (h,) = sent(s)
    (o,) = outcomes(s.receive(reply(h, **hello_fields("b2", 3)), 1.6))
    assert isinstance(o.error, OutcomeUnknown)


def test_a_nosession_to_a_resync_step_starts_over_with_a_hello_at_once():
    s = new()
    s.connected(0.0)
    (h,) = sent(s)
    s.receive(reply(h, **hello_fields("b1", 0)), 0.1)
    (page,) = sent(s)
    s.receive(refuse(page, "no session: send hello first", "nosession"), 0.2)
    assert s.state == HELLO
    assert sent(s) == [{"id": 3, "op": "hello", "proto": 1, "session": TOKEN}]


def test_a_restart_signal_during_a_resync_runs_another_one():
    s = new()
    s.connected(0.0)
    (h,) = sent(s)
    s.receive(reply(h, **hello_fields("b1", 0)), 0.1)
    (page,) = sent(s)
    s.receive(dev(ev("b2", 0, "boot")), 0.2)  # the device restarted meanwhile
    s.receive(reply(page, boot="b1", events=[], first=0), 0.3)
    (st_,) = sent(s)
    assert s.receive(reply(st_, boot="b1"), 0.4) == [] and s.state == HELLO
    (h,) = sent(s)
    assert h["op"] == "hello"
    s.receive(reply(h, **hello_fields("b2", 1)), 0.5)
    assert s.boot == "b2" and s.counters()["device_restarts"] == 1


def test_a_reconnect_to_the_same_boot_resends_in_flight_requests_with_the_same_id(feed):
    s = new()
    up(s, boot="b1", feed=feed)
    cyc = s.request("power", {"channel": 4, "state": "cycle", "off_ms": 300}, 1.0)
    line = s.data_to_send()
    s.disconnected(1.5)  # the cable came out before the reply
    s.connected(2.0)
    (h,) = sent(s)
    assert h["op"] == "hello" and h["session"] == TOKEN  # the same session: the cache stays
    feed(s, reply(h, **hello_fields("b1", 0)), 2.1)
    (page,) = sent(s)
    feed(s, reply(page, events=[], first=0), 2.2)
    (st_,) = sent(s)
    feed(s, reply(st_), 2.3)
    assert s.data_to_send() == line  # at once after the resync, same bytes
    c = s.counters()
    assert c["device_restarts"] == 0 and c["retries"] == 1 and c["connects"] == 2
    (o,) = outcomes(feed(s, dev({"id": cyc, "ok": True, "channel": {"ch": 4}}), 2.4))
    assert o.reply["channel"] == {"ch": 4}


# --- events -----------------------------------------------------------------------------------
def test_live_events_are_delivered_once_in_order(feed):
    s = new()
    up(s, boot="b1", seq=12, feed=feed)
    out = []
    for seq in (12, 13, 13, 14, 12):
        out += feed(s, dev(ev("b1", seq)), 1.0)
    assert [e["seq"] for e in events(out)] == [12, 13, 14]
    c = s.counters()
    assert c["events"] == 3 and c["events_dup"] == 2 and s.cursor() == ("b1", 15)
    # an event without boot or seq is delivered as it is (nothing to deduplicate it by)
    assert events(feed(s, dev({"ev": "log", "text": "hi"}), 1.1)) == [{"ev": "log", "text": "hi"}]


def test_events_during_a_resync_wait_behind_the_catch_up(feed):
    s = new()
    up(s, boot="b1", seq=0)
    assert events(s.receive(dev(ev("b1", 0)), 0.5)) == [ev("b1", 0)]
    s.disconnected(1.0)  # seqs 1..19 are pushed into a pulled cable: only the ring has them
    s.connected(2.0)
    (h,) = sent(s)
    got = feed(s, dev(ev("b1", 20)), 2.0)  # live, before the hello's answer: held
    got += feed(s, reply(h, **hello_fields("b1", 21)), 2.1)
    (p1,) = sent(s)
    assert p1["since"] == 1 and p1["n"] == 16
    got += feed(s, reply(p1, boot="b1", events=[ev("b1", i) for i in range(1, 17)], first=0),
                2.2)
    got += feed(s, dev(ev("b1", 21)), 2.25)  # live again: held behind the catch-up
    (p2,) = sent(s)
    assert p2["since"] == 17
    got += feed(s, reply(p2, boot="b1", events=[ev("b1", i) for i in range(17, 22)], first=0),
                2.3)
    (p3,) = sent(s)
    got += feed(s, reply(p3, boot="b1", events=[], first=0), 2.4)
    (st_,) = sent(s)
    got += feed(s, reply(st_), 2.5)
    assert [e["seq"] for e in events(got)] == list(range(1, 22))
    assert [type(o).__name__ for o in got][-1] == "Resynced"  # the held two were duplicates
    c = s.counters()
    assert c["events_dup"] == 2 and c["events"] == 22 and s.cursor() == ("b1", 22)


def test_events_the_ring_no_longer_holds_are_counted_as_lost():
    s = new()
    up(s, boot="b1", seq=3)
    s.disconnected(1.0)
    s.connected(2.0)
    (h,) = sent(s)
    s.receive(reply(h, **hello_fields("b1", 60)), 2.1)
    (p,) = sent(s)
    assert p["since"] == 3
    out = s.receive(reply(p, boot="b1", events=[ev("b1", 50), ev("b1", 51)], first=50), 2.2)
    assert s.counters()["events_lost"] == 47 and [e["seq"] for e in events(out)] == [50, 51]


def test_the_cursor_resumes_after_a_controller_restart():
    s = new(cursor=("b1", 7))
    s.connected(0.0)
    (h,) = sent(s)
    s.receive(reply(h, **hello_fields("b1", 12)), 0.1)
    assert sent(s)[0]["since"] == 7  # from the cursor, not from the hello's seq
    other = new(cursor=("b0", 7))
    other.connected(0.0)
    (h,) = sent(other)
    other.receive(reply(h, **hello_fields("b1", 12)), 0.1)
    assert sent(other)[0]["since"] == 0  # a boot that began after the cursor: from its start


def test_held_events_beyond_the_bound_are_counted_not_kept():
    s = new()
    s.max_held = 3
    s.connected(0.0)
    for seq in range(5):
        s.receive(dev(ev("b1", seq)), 0.1)
    assert s.counters()["held_overflow"] == 2
    out = finish(s, 1.0)
    assert [e["seq"] for e in events(out)] == [0, 1, 2]


def test_held_events_survive_a_disconnect_until_a_catch_up_is_done():
    s = new()
    up(s, boot="b1", seq=0)
    s.disconnected(1.0)
    s.connected(2.0)
    (h,) = sent(s)
    s.receive(reply(h, **hello_fields("b1", 6)), 2.1)
    sent(s)
    assert s.receive(dev(ev("b1", 5)), 2.2) == []  # held: the catch-up from 0 is not done
    s.disconnected(2.3)  # ... and the cable goes again
    s.connected(3.0)
    (h,) = sent(s)
    s.receive(reply(h, **hello_fields("b1", 6)), 3.1)
    (p,) = sent(s)
    assert p["since"] == 0  # seq 5 was not delivered ahead of 0..4
    out = s.receive(reply(p, boot="b1", events=[ev("b1", i) for i in range(6)], first=0), 3.2)
    (p,) = sent(s)
    out += s.receive(reply(p, events=[], first=0), 3.3)
    (st_,) = sent(s)
    out += s.receive(reply(st_), 3.4)
    assert [e["seq"] for e in events(out)] == [0, 1, 2, 3, 4, 5]


def test_the_catch_up_is_bounded():
    s = new()
    s.max_catchup = 3
    s.connected(0.0)
    (h,) = sent(s)
    s.receive(reply(h, **hello_fields("b1", 0)), 0.1)
    for page in range(3):
        (p,) = sent(s)
        assert p["op"] == "events"
        evs = [ev("b1", page * 16 + i) for i in range(16)]
        s.receive(reply(p, boot="b1", events=evs, first=0), 0.2)
    assert [r["op"] for r in sent(s)] == ["status"]


def test_a_catch_up_page_that_fails_goes_on_to_status():
    s = new()
    s.connected(0.0)
    (h,) = sent(s)
    s.receive(reply(h, **hello_fields("b1", 0)), 0.1)
    (p,) = sent(s)
    s.receive(reply(p, boot="b1", events="nope", first=0), 0.2)  # not a list
    assert [r["op"] for r in sent(s)] == ["status"] and s.counters()["bad_messages"] == 1
    s2 = new()
    s2.connected(0.0)
    (h,) = sent(s2)
    s2.receive(reply(h, **hello_fields("b1", 0)), 0.1)
    sent(s2)
    s2.tick(5.1)  # the page never came
    assert [r["op"] for r in sent(s2)] == ["status"]


def test_an_event_lost_on_the_line_while_ready_is_fetched_from_the_devices_ring(feed):
    s = new()
    up(s, boot="b1", seq=5)
    got = feed(s, dev(ev("b1", 5)), 1.0)
    got += feed(s, dev(ev("b1", 7)), 1.1)  # 6 was lost on the line (a flipped bit, say)
    (fill,) = sent(s)
    assert fill == {"id": fill["id"], "op": "events", "since": 6, "n": 16}
    got += feed(s, dev(ev("b1", 8)), 1.15)  # live while the fill is out: waits behind it
    rid = s.request("heap", {}, 1.16)  # the caller's requests do not wait for it
    assert [m["op"] for m in sent(s)] == ["heap"]
    got += feed(s, reply(fill, boot="b1", events=[ev("b1", i) for i in (6, 7, 8)], first=0,
                         next=9), 1.2)  # fmt: skip
    assert [e["seq"] for e in events(got)] == [5, 6, 7, 8]
    c = s.counters()
    assert c["events"] == 4 and c["events_lost"] == 0 and s.cursor() == ("b1", 9)
    assert s.pending() == [rid] and s.ready


def test_an_event_lost_on_the_line_that_the_ring_no_longer_holds_is_counted_as_lost():
    s = new()
    up(s, boot="b1", seq=5)
    got = s.receive(dev(ev("b1", 9)), 1.0)  # 5..8 lost on the line
    (fill,) = sent(s)
    got += s.receive(reply(fill, boot="b1", events=[ev("b1", 7), ev("b1", 8), ev("b1", 9)],
                           first=7, next=10), 1.1)  # fmt: skip
    assert [e["seq"] for e in events(got)] == [7, 8, 9]
    assert s.counters()["events_lost"] == 2
    # a fill that gets no answer lets the held event through, and counts the gap as lost
    got = s.receive(dev(ev("b1", 12)), 2.0)
    (fill,) = sent(s)
    assert fill["since"] == 10 and events(got) == []
    got = s.tick(2.0 + s.timeout_s)
    assert [e["seq"] for e in events(got)] == [12] and s.counters()["events_lost"] == 4


def test_a_gap_left_when_the_cable_goes_mid_fill_is_caught_up_on_the_resync():
    s = new()
    up(s, boot="b1", seq=5)
    s.receive(dev(ev("b1", 7)), 1.0)
    sent(s)  # the fill, lost with the cable
    s.disconnected(1.1)
    s.connected(2.0)
    (h,) = sent(s)
    s.receive(reply(h, **hello_fields("b1", 8)), 2.1)
    (p,) = sent(s)
    assert p["since"] == 5  # the cursor never passed the gap


def test_console_frames_of_a_restarted_device_carry_its_new_boot(feed):
    s = new()
    up(s, boot="b1")
    cons = [o for o in feed(s, dev({"cons": 1, "at": 5000, "d": "b2xk"}), 1.0)
            if isinstance(o, ConsoleData)]  # fmt: skip
    assert [(c.boot, c.at, c.data) for c in cons] == [("b1", 5000, b"old")]
    # the device restarts in place (no disconnect): its boot event, then its console from 0
    out = feed(s, dev(ev("b2", 0, "boot")), 2.0)
    out += feed(s, dev({"cons": 1, "at": 0, "d": "bmV3"}), 2.1)
    assert [(c.boot, c.at, c.data) for c in out if isinstance(c, ConsoleData)] == [
        ("b2", 0, b"new")]


def test_console_frames_before_the_hello_wait_for_it_to_name_their_boot(feed):
    s = new()
    up(s, boot="b1")
    (first,) = [o for o in s.receive(dev({"cons": 1, "at": 0, "d": "b2xk"}), 1.0)
                if isinstance(o, ConsoleData)]  # fmt: skip
    s.disconnected(1.5)  # the cable out; the device may restart meanwhile
    s.connected(2.0)
    (h,) = sent(s)
    assert feed(s, dev({"cons": 1, "at": 0, "d": "bmV3"}), 2.1) == []  # whose boot? held
    out = feed(s, reply(h, **hello_fields("b2", 0)), 2.2)
    (c,) = [o for o in out if isinstance(o, ConsoleData)]
    assert (c.boot, c.at, c.data) == ("b2", 0, b"new")
    assert c.connection == 2 and first.connection == 1  # offsets run on only within one


def test_a_request_never_sent_ends_as_not_sent_not_as_unanswered():
    s = new()
    s.connected(0.0)
    (h,) = sent(s)
    s.receive(refuse(h, "protocol 1 is not spoken here (2)", "refused"), 0.1)
    s.request("power", {"channel": 2, "state": "on"}, 0.2)  # waits for a resync that fails
    (o,) = outcomes(s.tick(5.2))
    assert isinstance(o.error, NotSent) and o.error.code == "notsent"
    assert str(o.error) == (f"power: not sent: the link to the device on {PORT} was not ready "
                            "within 5 s (hello: protocol 1 is not spoken here (2)); nothing was "
                            "done")  # fmt: skip
    s = new()  # the port never opened
    s.request("power", {"channel": 2, "state": "on"}, 0.0)
    (o,) = outcomes(s.tick(5.0))
    assert isinstance(o.error, NotSent) and "(port not open)" in str(o.error)
    s = new()  # sent, and then nothing: that one may have been done
    up(s)
    s.request("power", {"channel": 2, "state": "cycle"}, 1.0)
    sent(s)
    s.disconnected(1.5)
    (o,) = outcomes(s.tick(6.0))
    assert isinstance(o.error, DeviceTimeout) and not isinstance(o.error, NotSent)


# --- against the firmware's own Console (the device's end), in-process ------------------------
class Outputs:
    def __init__(self):
        self.calls: list[tuple[int, bool]] = []

    def set(self, ch, on):
        self.calls.append((ch, on))


class MemStore:
    """The board's flash, for the relay states: survives a restart of the Board."""

    def __init__(self):
        self.text = None

    def load(self):
        return self.text

    def save(self, text):
        self.text = text


class Board:
    """A device: the firmware's Console, Power and Log, driven by hand (no thread, the clock
    in ms set by the test). `drop` loses the next n replies on the wire."""

    def __init__(self, boot_id="b0000001", outputs=None, store=None, ring=32):
        self.ms = 0
        self.out = bytearray()
        self.plugged = True  # False: what the device writes is lost
        self.drop = 0
        self.dropped: list[bytes] = []
        self.outputs = outputs or Outputs()
        self.log = Log(ring)
        chans = [{"name": f"node{i}", "min_off_ms": 300, "max_cycles": 100} for i in range(8)]
        self.store = store or MemStore()
        self.power = Power(self.outputs, chans, self.store, self.log, stagger_ms=0)
        self.power.restore(0)
        self.console = Console(self._write, self.log, self.power, boot_id=boot_id,
                               clock=lambda: self.ms)

    def _write(self, line) -> None:
        line = bytes(line)  # the console lends a view of its frame buffer
        if self.drop and b'"id":' in line:
            self.drop -= 1
            self.dropped.append(line)
            return
        if self.plugged:
            self.out += line

    def event(self, kind, **fields):
        self.log.event(kind, tuple(fields), tuple(fields.values()))


def run(s: Session, board: Board, now: float, feed=whole) -> list:
    """Carry bytes both ways until neither end has more to say."""
    out: list = []
    for _ in range(50):
        data = s.data_to_send()
        if data and board.plugged:
            board.console.feed(data)
            board.power.tick(board.ms)
        back, board.out = bytes(board.out), bytearray()
        if not data and not back:
            return out
        if back:
            out += feed(s, back, now)
    raise AssertionError("the two ends never went quiet")


def connect(s: Session, board: Board, now=0.0, feed=whole) -> list:
    out = s.connected(now)
    out += run(s, board, now, feed)
    assert s.ready, s.last_error
    return out


def ask(s: Session, board: Board, op: str, now: float, **args) -> Outcome:
    rid = s.request(op, args, now)
    (o,) = [o for o in outcomes(run(s, board, now)) if o.id == rid]
    return o


def test_against_the_console_power_requests_and_a_refusal(feed):
    s, board = new(), Board()
    out = connect(s, board, feed=feed)
    assert isinstance(out[0], Resynced) and s.info["boot"] == "b0000001"
    assert s.status["power"][3]["output"] == "off"
    rid = s.request("power", {"channel": 3, "state": "on"}, 1.0)
    (o,) = outcomes(run(s, board, 1.0, feed))
    assert o.id == rid and o.reply["channel"]["output"] == "on"
    assert (3, True) in board.outputs.calls
    assert ask(s, board, "power", 1.1, channel=3, state="off").reply["ok"]
    o = ask(s, board, "power", 1.2, channel=3, state="on")
    assert o.error.code == "refused" and "minimum off time" in str(o.error)
    power_events = [e for e in board.log.recent() if e["ev"] == "power"]
    assert s.cursor() == ("b0000001", power_events[-1]["seq"] + 1)


def test_against_the_console_a_lost_reply_is_retried_and_never_run_twice():
    s, board = new(), Board()
    connect(s, board)
    ask(s, board, "power", 1.0, channel=0, state="on")
    calls = len(board.outputs.calls)
    board.drop = 2  # the device runs the cycle, but its first two replies are lost
    rid = s.request("power", {"channel": 0, "state": "cycle", "off_ms": 5000}, 2.0)
    assert outcomes(run(s, board, 2.0)) == []
    s.tick(3.0)
    assert outcomes(run(s, board, 3.0)) == []
    s.tick(4.0)
    (o,) = outcomes(run(s, board, 4.0))
    assert o.id == rid and o.reply["channel"]["cycling"] is True
    assert board.outputs.calls[calls:] == [(0, False)]  # off exactly once
    assert board.console.retries == 2 and s.counters()["retries"] == 2
    ids = {line.split(b'"id":')[1].split(b",")[0] for line in board.dropped}
    assert ids == {str(rid).encode()}  # both lost replies answered the one request id


def test_against_the_console_a_reply_lost_in_an_unplug_comes_from_its_cache():
    s, board = new(), Board()
    connect(s, board)
    ask(s, board, "power", 0.1, channel=4, state="on")
    before = len(board.outputs.calls)
    board.drop = 1  # the device runs the cycle, then the cable comes out before its reply
    rid = s.request("power", {"channel": 4, "state": "cycle", "off_ms": 300}, 1.0)
    assert outcomes(run(s, board, 1.0)) == [] and board.dropped
    s.disconnected(1.2)
    out = connect(s, board, 2.0)  # the same session token: the device kept its cache
    (o,) = outcomes(out)
    assert o.id == rid and o.reply["channel"]["cycling"] is True
    assert board.outputs.calls[before:] == [(4, False)]  # it ran once
    assert board.console.retries == 1 and s.counters()["device_restarts"] == 0


def test_against_the_console_a_restart_ends_the_cycle_in_outcome_unknown():
    s, board = new(), Board()
    connect(s, board)
    ask(s, board, "power", 0.1, channel=0, state="on")
    ask(s, board, "power", 0.2, channel=5, state="on")
    before = len(board.outputs.calls)
    board.drop = 1
    cyc = s.request("power", {"channel": 0, "state": "cycle"}, 1.0)
    assert outcomes(run(s, board, 1.0)) == [] and board.dropped  # it ran; its reply was lost
    # the device restarts: new boot, an empty reply cache, the same relays and flash
    board = Board("b0000002", outputs=board.outputs, store=board.store)
    board.event("boot", version="test")
    s.tick(2.0)  # the cycle is re-sent to the new boot, which says "nosession"
    out = run(s, board, 2.0)
    (o,) = outcomes(out)
    assert o.id == cyc and isinstance(o.error, OutcomeUnknown)
    assert s.ready and s.boot == "b0000002" and s.counters()["device_restarts"] == 1
    # the relay went off once; the restart restored it on, and the cycle never ran again
    assert board.outputs.calls[before:].count((0, False)) == 1
    assert board.power.status()[0]["output"] == "on"
    # the new boot's events from its start: the restore, then the boot event
    kinds = [e["ev"] for e in events(out) if e["boot"] == "b0000002"]
    assert kinds == ["power"] * 8 + ["boot"]
    assert ask(s, board, "power", 2.1, channel=5, state="off").reply["channel"]["desired"] == "off"


def test_against_the_console_events_missed_are_caught_up_and_the_lost_counted():
    s, board = new(), Board(ring=16)
    connect(s, board)
    got = []
    for i in range(3):
        board.event("dhcp", n=i)
    got += events(run(s, board, 1.0))
    s.disconnected(1.5)
    board.plugged = False
    for i in range(3, 30):
        board.event("dhcp", n=i)  # pushed into a pulled cable; the ring keeps the last 16
    board.plugged = True
    got += events(connect(s, board, 2.0))
    dhcp = [e["n"] for e in got if e["ev"] == "dhcp"]
    assert dhcp == [0, 1, 2] + list(range(14, 30))
    assert s.counters()["events_lost"] == 11
    seqs = [e["seq"] for e in got]
    assert seqs == sorted(seqs) and len(seqs) == len(set(seqs))
    assert s.cursor() == ("b0000001", seqs[-1] + 1)


def test_a_device_that_stops_answering_is_not_ready_until_it_speaks_again():
    # A stopped or hung firmware keeps its line open: the link read as connected for ever,
    # and every status read waited out its timeout.
    s = new()
    up(s)
    for n in range(4):  # a keepalive every keepalive_s, each unanswered by the next
        t = s.next_deadline()
        s.tick(t)
        (h,) = sent(s)
        assert h["op"] == "hold"
        assert s.ready == (n < 3), n
    assert not s.ready and "answered none of the last 3 keepalives" in s.last_error
    assert s.state == READY  # no resync: the same boot may simply go on
    # any frame ends the silence
    s.receive(dev(ev("b1", 0)), t + 1)
    assert s.ready and s.last_error is None


def test_a_keepalive_goes_out_when_nothing_was_sent_or_nothing_heard_for_keepalive_s():
    s = new()
    up(s)  # sent and heard at 0.0
    # the device pushes events all along: the line is held by what we send, so a hold is due
    # keepalive_s after our last send, whatever we hear
    for t in (0.5, 1.0, 1.5):
        s.receive(dev(ev("b1", int(t * 2) - 1)), t)
    assert s.next_deadline() == 2.0
    s.tick(2.0)
    (h,) = sent(s)
    assert h["op"] == "hold"
    s.receive(reply(h), 2.25)
    # we send all along and hear nothing: a hold is due keepalive_s after the last frame heard
    for t in (2.5, 3.5):
        s.request("beat", {"channels": []}, t)
        assert "hold" not in [r["op"] for r in sent(s)]
    assert s.next_deadline() == 2.25 + s.keepalive_s
    s.tick(4.25)
    assert "hold" in [r["op"] for r in sent(s)]


def test_a_hung_device_is_not_ready_as_soon_while_beats_are_forwarded_to_it():
    # The hub forwards node heartbeats with a `beat` every 2 s, each re-sent every retry_s until
    # its 5 s deadline. Those sends put the keepalives off, and a hung device was taken for
    # ready for about 24 s instead of the 3 keepalives (8 s) an idle link takes.
    s = new()
    up(s)  # at 0.0 the device answers the status, its last frame before it hangs
    quiet = new()
    up(quiet)  # an idle link to a device that hangs at the same moment: the yardstick
    t, next_beat, beat = 0.0, 2.0, None
    beats, holds, not_ready, idle_not_ready = 0, 0, None, None
    while not_ready is None and t < 60:  # the clock in steps of 50 ms, as the link ticks
        t = round(t + 0.05, 2)
        if beat is None and t >= next_beat:  # DeviceHub._forward_beats' pace
            beat = s.request("beat", {"channels": [2]}, t, 5.0)
        outs = s.tick(t)
        if beat is not None and any(o.id == beat for o in outcomes(outs)):
            beat, next_beat = None, t + 2.0
        for req in sent(s):
            beats += req["op"] == "beat"
            holds += req["op"] == "hold"
        quiet.tick(t)
        sent(quiet)
        if idle_not_ready is None and not quiet.ready:
            idle_not_ready = t
        if not s.ready:
            not_ready = t
    assert "answered none of the last 3 keepalives" in s.last_error
    assert beats >= 3 and holds >= 3  # beats went out all along, and the keepalives too
    assert not_ready == idle_not_ready == (3 + 1) * s.keepalive_s  # the documented 8 s
    s.receive(dev({"id": beat, "ok": True, "watched": [2]}), t)  # it speaks again
    assert s.ready and s.last_error is None
