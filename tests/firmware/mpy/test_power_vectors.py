# firmware.power: relay policy with a fake clock, under CPython and MicroPython.
import os

from mpytest import raises

from firmware.compat import ticks_add, ticks_diff
from firmware.log import Log
from firmware.power import FileStore, Power, PowerError

# Start just before the ticks counter wraps (2**30 on MicroPython) so every test crosses it.
T0 = ticks_add(0, -3000)


def at(ms):
    return ticks_add(T0, ms)


class Outputs:
    """The board layer's side: records every set() and the current level per channel."""

    def __init__(self, fail=()):
        self.calls = []
        self.level = {}
        self.fail = fail

    def set(self, ch, on):
        if ch in self.fail:
            raise OSError(5)
        self.calls.append((ch, on))
        self.level[ch] = on


class MemStore:
    def __init__(self, text=None):
        self.text = text
        self.writes = 0

    def load(self):
        return self.text

    def save(self, text):
        self.text = text
        self.writes += 1


def make(n=8, store=None, stagger_ms=1000, **chan):
    out = Outputs()
    chans = []
    for i in range(n):
        d = {"name": "node%d" % i, "min_off_ms": 5000, "max_cycles": 3, "window_ms": 60000}
        d.update(chan)
        chans.append(d)
    p = Power(out, chans, store or MemStore(), Log(64), stagger_ms)
    p.restore(at(0))
    out.calls = []
    return p, out


def test_restore_drives_every_output_to_the_stored_state_at_once():
    out = Outputs()
    p = Power(out, 4, MemStore("1010\n"), Log(16))
    p.restore(at(0))
    assert out.calls == [(0, True), (1, False), (2, True), (3, False)]
    assert out.level == {0: True, 1: False, 2: True, 3: False}
    assert [c["desired"] for c in p.status()] == ["on", "off", "on", "off"]
    # restored nodes count as running: no edge, no off time, no stagger wait for the next on
    p.on(1, at(1))
    assert out.level[1] is True


def test_restore_without_a_state_file_uses_each_channel_default():
    out = Outputs()
    p = Power(out, [{"default": "on"}, {}], MemStore(None))
    p.restore(at(0))
    assert out.level == {0: True, 1: False}


def test_unreadable_state_file_falls_back_to_defaults_and_is_counted():
    log = Log(8)
    out = Outputs()
    p = Power(out, [{"default": "on"}, {}], MemStore("garbage"), log)
    p.restore(at(0))
    assert out.level == {0: True, 1: False}
    assert log.counters["power.bad_state_file"] == 1


def _state_errors(log):
    return [e["error"] for e in log.recent() if e["ev"] == "power" and "error" in e]


def test_a_short_state_file_restores_what_it_has_and_says_the_rest_was_lost():
    # power.state for 2 of 4 channels (cut short, or written before the board had 4): channels
    # 2 and 3 took their defaults and nothing said so
    log = Log(16)
    out = Outputs()
    p = Power(out, [{}, {}, {"default": "on"}, {}], MemStore("10\n"), log)
    p.restore(at(0))
    assert out.level == {0: True, 1: False, 2: True, 3: False}
    assert _state_errors(log) == [
        "power.state: 2 states for 4 channels: channels 2..3 take their default"]
    assert log.counters["power.bad_state_file"] == 1


def test_a_damaged_or_empty_state_file_is_reported_with_the_file_and_what_was_there():
    for text, said in (
        ("1x10\n", "power.state: '1x10' is not one 0 or 1 per channel: every channel takes its default"),
        ("\n", "power.state: empty: every channel takes its default"),
    ):
        log = Log(16)
        out = Outputs()
        Power(out, [{"default": "on"}, {}], MemStore(text), log).restore(at(0))
        assert out.level == {0: True, 1: False}, text
        assert _state_errors(log) == [said], (text, _state_errors(log))
    # a whole file, or a longer one (the board had more channels), says nothing
    for text in ("10\n", "1011\n"):
        log = Log(16)
        Power(Outputs(), 2, MemStore(text), log).restore(at(0))
        assert _state_errors(log) == [] and "power.bad_state_file" not in log.counters, text


def test_a_state_file_that_is_not_text_is_reported_not_a_stop():
    # Read as text, bytes that are not UTF-8 raised UnicodeError out of restore(): the boot
    # stopped before a relay was driven.
    path = "/tmp/eb-power-bytes-%d" % ticks_diff(at(0), 0)
    with open(path, "wb") as f:
        f.write(b"1\xff\xfe0\n")
    try:
        log = Log(16)
        out = Outputs()
        Power(out, [{"default": "on"}, {}], FileStore(path), log).restore(at(0))
        assert out.level == {0: True, 1: False}
        said = _state_errors(log)
        assert len(said) == 1 and said[0].startswith(path + ": ") and "xff" in said[0], said
    finally:
        os.remove(path)


def test_state_is_persisted_only_when_it_changes():
    store = MemStore()
    p, out = make(2, store)
    p.on(0, at(0))
    assert store.text == "10\n" and store.writes == 1
    p.on(0, at(10))
    p.on("node0", at(20))
    assert store.writes == 1
    p.cycle(0, at(100))
    p.tick(at(6000))
    assert store.writes == 1  # a cycle leaves the desired state on
    p.off(0, at(7000))
    p.off(0, at(7001))
    assert store.text == "00\n" and store.writes == 2


def test_a_reset_mid_cycle_restores_power():
    store = MemStore()
    p, out = make(2, store)
    p.on(0, at(0))
    p.cycle(0, at(100))
    assert out.level[0] is False
    out2 = Outputs()
    p2 = Power(out2, 2, store)
    p2.restore(at(200))
    assert out2.level[0] is True


def test_on_after_off_within_the_minimum_off_time_is_refused():
    p, out = make(1)
    p.on(0, at(0))
    p.off(0, at(1000))
    with raises(PowerError):
        p.on(0, at(3000))
    try:
        p.on(0, at(3000))
    except PowerError as e:
        assert "minimum off time is 5000 ms" in str(e) and "try again in 3000 ms" in str(e)
    assert out.level[0] is False
    p.on(0, at(6000))
    assert out.level[0] is True


def test_cycle_faster_than_the_minimum_off_time_is_refused():
    p, out = make(1)
    p.on(0, at(0))
    with raises(PowerError):
        p.cycle(0, at(10), 1000)
    try:
        p.cycle(0, at(10), 1000)
    except PowerError as e:
        assert "shorter than its minimum off time of 5000 ms" in str(e)
    assert out.level[0] is True


def test_a_cycle_longer_than_an_hour_is_refused_before_the_relay_moves():
    # A huge off time once switched the relay off and then failed (ticks_add overflowed), with
    # no cycle scheduled: the channel stayed off for good while it read as on.
    p, out = make(1)
    p.on(0, at(0))
    out.calls = []
    for off_ms in (3600001, 2**31, 2**63 - 1, 10**30):
        try:
            p.cycle(0, at(10000), off_ms)
            assert False, off_ms
        except PowerError as e:
            assert "longer than a cycle may be (3600000 ms): switch it off, and on later" in str(e)
    assert out.calls == [] and out.level[0] is True
    st = p.status()[0]
    assert st["desired"] == st["output"] == "on" and not st["cycling"]
    p.cycle(0, at(10000), 3600000)  # the longest comes back on
    p.tick(at(10000 + 3599999))
    assert out.level[0] is False
    p.tick(at(10000 + 3600000))
    assert out.calls == [(0, False), (0, True)]


def test_cycle_goes_off_then_back_on_after_the_off_time():
    p, out = make(1)
    p.on(0, at(0))
    out.calls = []
    p.cycle(0, at(100), 8000)
    assert out.calls == [(0, False)]
    with raises(PowerError):  # already cycling
        p.cycle(0, at(200))
    assert p.tick(at(5000)) == 3100
    assert out.level[0] is False
    p.tick(at(8100))
    assert out.calls == [(0, False), (0, True)]


def test_cycling_an_off_channel_is_refused():
    p, out = make(1)
    with raises(PowerError):
        p.cycle(0, at(0))
    assert out.calls == []


def test_off_cancels_a_cycle():
    p, out = make(1)
    p.on(0, at(0))
    p.cycle(0, at(10))
    p.off(0, at(20))
    p.tick(at(60000))
    assert out.level[0] is False


def test_eight_power_ons_are_staggered():
    p, out = make(8, stagger_ms=1000)
    for ch in range(8):
        p.on(ch, at(0))
    assert out.calls == [(0, True)]
    t = 0
    edges = {0: 0}
    while len(edges) < 8 and t < 20000:
        wait = p.tick(at(t))
        for ch, on in out.calls:
            if on and ch not in edges:
                edges[ch] = t
        t += 100 if wait is None else max(1, min(wait, 100))
    assert sorted(edges) == list(range(8))  # all on, in request order
    times = [edges[ch] for ch in range(8)]
    assert times == sorted(times)
    for a, b in zip(times, times[1:]):
        assert b - a >= 1000
    assert [c["queued"] for c in p.status()] == [False] * 8


def test_off_while_queued_leaves_the_node_off():
    p, out = make(3, stagger_ms=1000)
    for ch in range(3):
        p.on(ch, at(0))
    p.off(1, at(10))
    p.tick(at(1000))
    p.tick(at(2000))
    p.tick(at(3000))
    assert out.level == {0: True, 1: False, 2: True}
    assert (1, True) not in out.calls
    assert [c["desired"] for c in p.status()] == ["on", "off", "on"]


def test_cycle_storms_are_refused_until_the_window_passes():
    p, out = make(1, max_cycles=3, window_ms=60000, min_off_ms=1000)
    p.on(0, at(0))  # edge 1
    p.cycle(0, at(1000))
    p.tick(at(2000))  # edge 2
    p.cycle(0, at(3000))
    p.tick(at(4000))  # edge 3
    try:
        p.cycle(0, at(5000))
    except PowerError as e:
        assert "cycle storm" in str(e) and "limit 3" in str(e)
    else:
        raise AssertionError("a fourth power-on inside the window was allowed")
    assert out.level[0] is True
    p.tick(at(60001))  # the first edge leaves the window
    p.cycle(0, at(60001))
    assert out.level[0] is False


def test_channels_by_index_or_name_and_clear_errors():
    p, out = make(2)
    assert p.channel(1).name == "node1" and p.channel("node0").index == 0
    for bad in (2, -1, "nope", True, None):
        with raises(PowerError):
            p.channel(bad)


def test_channel_definitions_are_checked_by_field():
    for bad, field in (
        ([{"active": "low"}], ("power.channels[0].active: a relay's pin and polarity are set "
                               "in the board definition (board.json relays), not here")),
        ([{}, {"pin": 5}], ("power.channels[1].pin: a relay's pin and polarity are set in the "
                            "board definition (board.json relays), not here")),
        ([{}, {"min_off_ms": -1}], "power.channels[1].min_off_ms"),
        ([{"max_cycles": 0}], "power.channels[0].max_cycles"),
        ([{"default": "maybe"}], "power.channels[0].default"),
        ([{"name": "a"}, {"name": "a"}], "power.channels[1].name"),
        ([{}, {"defualt": "on"}], "power.channels[1].defualt: unknown key (did you mean default?)"),
        ("eight", "power.channels"),
    ):
        try:
            Power(Outputs(), bad)
        except ValueError as e:
            assert str(e).startswith(field), (str(e), field)
        else:
            raise AssertionError("accepted %r" % (bad,))
    p = Power(Outputs(), [{"name": "n1", "min_off_ms": 0, "max_cycles": 9, "window_ms": 1000,
                           "default": "on"}])  # fmt: skip
    c = p.channels[0]
    assert (c.name, c.min_off_ms, c.max_cycles, c.window_ms, c.default_on) == ("n1", 0, 9, 1000, True)


def test_an_output_that_fails_is_counted_and_the_policy_goes_on():
    log = Log(16)
    out = Outputs(fail=(1,))
    p = Power(out, 2, MemStore(), log)
    p.restore(at(0))
    p.on(1, at(10))
    assert log.counters["power.output_error"] == 2
    assert p.status()[1]["desired"] == "on"


def test_power_events_are_logged():
    p, out = make(1)
    p.on(0, at(0))
    ev = p.log.recent(1)[0]
    assert (ev["ev"], ev["ch"], ev["state"], ev["why"]) == ("power", 0, "on", "on")


def test_file_store_replaces_the_file_atomically():
    path = "/tmp/eb-power-test-%d" % ticks_diff(at(0), 0)
    s = FileStore(path)
    try:
        assert s.load() is None
        s.save("10\n")
        s.save("01\n")
        assert s.load() == "01\n" and s.writes == 2
        try:
            os.stat(path + ".tmp")
        except OSError:
            pass
        else:
            raise AssertionError("the temp file was left behind")
    finally:
        for f in (path, path + ".tmp"):
            try:
                os.remove(f)
            except OSError:
                pass


class FullStore(MemStore):
    """A flash with no room left: every save fails as littlefs does (ENOSPC)."""

    def save(self, text):
        raise OSError(28)


def test_a_power_on_that_cannot_be_saved_is_refused_and_changes_nothing():
    # It left the channel desired on, never queued: a later "on" then did nothing.
    p, out = make(2, store=FullStore("00\n"))
    try:
        p.on(0, at(10000))
        assert False, "accepted"
    except OSError as e:  # the console answers it as an internal error, in its words
        assert e.args[0] == 28
    st = p.status()[0]
    assert st["desired"] == st["output"] == "off" and not st["queued"]
    p.tick(at(20000))
    assert out.calls == []


def test_an_off_that_cannot_be_saved_still_switches_off():
    # It flipped the desired state and left the relay on.
    p, out = make(2, store=MemStore("10\n"))
    p.store = FullStore()
    try:
        p.off(0, at(10000))
        assert False, "the failed save was not reported"
    except OSError:
        pass
    assert out.calls == [(0, False)] and p.status()[0]["desired"] == p.status()[0]["output"] == "off"


def test_an_output_that_raises_anything_is_counted_and_the_others_are_driven():
    class Picky(Outputs):
        def set(self, ch, on):
            if ch == 1:
                raise ValueError("invalid pin")  # as a port's Pin() refuses a pin it lacks
            Outputs.set(self, ch, on)

    out = Picky()
    p = Power(out, 3, MemStore("111\n"), Log(16))
    p.restore(at(0))
    assert out.level == {0: True, 2: True}
    assert p.log.counters["power.output_error"] == 1
