"""firmware.power under CPython: random operation sequences against the policy's invariants,
and the state file's atomic replacement. (tests/firmware/mpy/test_power_vectors.py has the
worked examples, run under MicroPython too.)"""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware.log import Log
from firmware.power import FileStore, Power, PowerError

N = 4
MIN_OFF = 3000
STAGGER = 700
MAX_CYCLES = 3
WINDOW = 20000


class Recorder:
    """Outputs that remember every edge with its time."""

    def __init__(self):
        self.now = 0
        self.level: dict[int, bool] = {}
        self.edges: list[tuple[int, int, bool]] = []  # (time, channel, on)

    def set(self, ch, on):
        if self.level.get(ch) != on:
            self.edges.append((self.now, ch, on))
        self.level[ch] = on


class MemStore:
    def __init__(self):
        self.text = None
        self.writes = 0

    def load(self):
        return self.text

    def save(self, text):
        self.text = text
        self.writes += 1


ops = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=4000),  # ms since the previous op
        st.sampled_from(["on", "off", "cycle", "tick"]),
        st.integers(min_value=0, max_value=N - 1),
        st.sampled_from([None, 1000, MIN_OFF, 5000]),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops, st.text(alphabet="01", min_size=N, max_size=N))
def test_invariants_hold_under_any_sequence(seq, stored):
    out = Recorder()
    store = MemStore()
    store.text = stored + "\n"
    chans = [
        {"min_off_ms": MIN_OFF, "max_cycles": MAX_CYCLES, "window_ms": WINDOW} for _ in range(N)
    ]
    p = Power(out, chans, store, Log(8), STAGGER)
    p.restore(0)
    assert out.level == {i: stored[i] == "1" for i in range(N)}
    restore_edges = len(out.edges)
    now = 0
    desired_changes = 0
    for dt, op, ch, off_ms in seq:
        now += dt
        out.now = now
        before = [c.desired for c in p.channels]
        try:
            if op == "on":
                p.on(ch, now)
            elif op == "off":
                p.off(ch, now)
            elif op == "cycle":
                p.cycle(ch, now, off_ms)
            else:
                p.tick(now)
        except PowerError as e:
            assert str(e)  # a refusal always says why
            assert [c.desired for c in p.channels] == before  # and changes nothing
        after = [c.desired for c in p.channels]
        desired_changes += sum(1 for a, b in zip(before, after) if a != b)
        # the persisted state is the desired state, written only when it changed
        assert store.text == "".join("1" if d else "0" for d in after) + "\n"
        assert store.writes == desired_changes
        for c in p.channels:
            assert out.level[c.index] == c.output
            if c.output:
                assert c.desired  # never on against the operator's will
            elif c.desired:
                assert c.queued or c.back_on_at is not None  # on its way back

    edges = out.edges[restore_edges:]
    ons = [(t, ch) for t, ch, on in edges if on]
    # staggered: two power-on edges (any channels) are at least STAGGER apart
    for (t1, _), (t2, _) in zip(ons, ons[1:]):
        assert t2 - t1 >= STAGGER
    for ch in range(N):
        mine = [(t, on) for t, c, on in edges if c == ch]
        # minimum off time between an off edge and the next on edge
        for (t1, on1), (t2, on2) in zip(mine, mine[1:]):
            if not on1 and on2:
                assert t2 - t1 >= MIN_OFF
        # no cycle storms: at most MAX_CYCLES on edges in any window
        times = [t for t, on in mine if on]
        for i, t in enumerate(times):
            assert len([u for u in times[i:] if u - t < WINDOW]) <= MAX_CYCLES


def test_file_store_keeps_the_old_state_when_the_rename_never_happens(tmp_path, monkeypatch):
    path = tmp_path / "relays.state"
    s = FileStore(str(path))
    s.save("1100\n")

    def crash(src, dst):
        raise OSError("power lost before the rename")

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(OSError):
        s.save("0000\n")
    monkeypatch.undo()
    assert FileStore(str(path)).load() == "1100\n"
    out = Recorder()
    p = Power(out, 4, FileStore(str(path)))
    p.restore(0)
    assert out.level == {0: True, 1: True, 2: False, 3: False}


def test_restore_reads_the_state_file_without_rewriting_it(tmp_path):
    path = tmp_path / "relays.state"
    path.write_text("01\n")
    store = FileStore(str(path))
    out = Recorder()
    Power(out, 2, store).restore(0)
    assert out.level == {0: False, 1: True}
    assert store.writes == 0


def test_a_stagger_slot_long_past_does_not_hold_a_power_on_on_a_board_whose_ticks_wrap(monkeypatch):
    # A board's ticks have a period of 2**30 ms (12.4 days; this unix port's and CPython's do
    # not wrap in a test's time). The stagger's slot was kept once passed: 6.2 days after the
    # last power-on it lay 6.2 days ahead, and the next on (or a cycle's back-on) waited for it.
    from firmware import power

    period = 1 << 30
    monkeypatch.setattr(power, "ticks_add", lambda a, b: (a + b) & (period - 1))
    monkeypatch.setattr(power, "ticks_diff", lambda a, b: ((a - b + period // 2) & (period - 1)) - period // 2)
    out = Recorder()
    p = Power(out, [{}, {"default": "off"}], MemStore(), Log(16), stagger_ms=2000)
    p.restore(0)
    p.on(0, 1000)
    assert p.tick(1000) is None and out.level[0] is True  # switched, its slot 2 s ahead
    for hour in range(1, 150):  # the power loop's ticks go on, nothing queued
        p.tick(1000 + hour * 3_600_000)
    later = (1000 + 2**29 + 100_000) & (period - 1)
    p.on(1, later)
    assert p.tick(later) is None and out.level[1] is True  # at once, not days later
