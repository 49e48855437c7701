"""onboard.feed, the on-device watchdog feed of `bastion flash`'s comparison: machine.WDT when
the port has one and takes the board's timeout, else, whatever stopped it, the sim board's
supervisor pipe. Run here under CPython with a `machine` module of the test's own and a real
pipe; test_flash_safety.py runs it on the sim board under MicroPython, where there is no
machine.WDT."""

from __future__ import annotations

import os
import sys
import types

import pytest
from bastion.flash import onboard


class _Machine(types.ModuleType):
    """A `machine` module whose WDT records what it was given, or raises `fails`."""

    def __init__(self, fails: BaseException | None = None):
        super().__init__("machine")
        self.fed: list[int] = []
        machine = self

        class WDT:
            def __init__(self, timeout: int):
                if fails is not None:
                    raise fails
                self.timeout = timeout

            def feed(self) -> None:
                machine.fed.append(self.timeout)

        self.WDT = WDT


@pytest.fixture
def pipe(monkeypatch):
    """The sim board's watchdog pipe: its read end, the write end named as the sim names it."""
    r, w = os.pipe()
    os.set_blocking(r, False)
    monkeypatch.setenv("EDGE_BASTION_WDT_FD", str(w))
    yield r
    os.close(r)
    os.close(w)


def _drained(fd: int) -> bytes:
    try:
        return os.read(fd, 100)
    except BlockingIOError:
        return b""


def test_a_port_with_machine_wdt_is_fed_there_and_not_through_the_pipe(monkeypatch, pipe):
    machine = _Machine()
    monkeypatch.setitem(sys.modules, "machine", machine)
    onboard.feed(8000)
    assert machine.fed == [8000]
    assert _drained(pipe) == b""


@pytest.mark.parametrize("fails", [ValueError("timeout too long"), OSError(5), MemoryError()],
                         ids=["refused", "oserror", "no-memory"])  # fmt: skip
def test_whatever_stops_machine_wdt_the_pipe_is_fed(monkeypatch, pipe, fails):
    monkeypatch.setitem(sys.modules, "machine", _Machine(fails))
    onboard.feed(8000)
    assert _drained(pipe) == b"."


def test_no_machine_module_feeds_the_pipe_and_zero_feeds_nothing(monkeypatch, pipe):
    monkeypatch.setitem(sys.modules, "machine", None)  # `import machine` raises ImportError
    onboard.feed(8000)
    assert _drained(pipe) == b"."
    onboard.feed(0)
    assert _drained(pipe) == b""
