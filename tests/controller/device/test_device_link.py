"""bastion.device.link.DeviceLink, the serial and thread shell around the protocol Session,
against real PTYs: the firmware's own console.py as the device (driven by a pump thread under
CPython), a device that sprinkles REPL noise and split writes, a silent one, a missing port,
unplug/replug of the cable, concurrent callers, listeners, and the whole device end under the
MicroPython unix port.

The protocol's guarantees (re-sends with the same id, OutcomeUnknown across a restart, the
reply cache after an unplug, event dedupe, order and catch-up) are tested without threads in
test_session.py, against the same Console in-process; test_device_sim.py runs the link against
the real sim board."""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import pytest

from bastion.device.link import DeviceError, DeviceLink, DeviceTimeout
from firmware.console import Console
from firmware.log import Log
from firmware.power import Power

pytestmark = pytest.mark.timeout(60)

BANNER = b"MicroPython v1.28.0 on 2026-01-01; linux [GCC 14.2.1] version\r\n>>> "
FAST = {"retry_s": 0.2, "reconnect_s": 0.05, "timeout_s": 5.0}


def wait_for(cond, timeout=10.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


class Outputs:
    def __init__(self):
        self.calls: list[tuple[int, bool]] = []

    def set(self, ch, on):
        self.calls.append((ch, on))


class FakeBoard:
    """A device: the firmware's Console, Power and Log, with knobs for the faults a real board
    produces only by accident. Everything touching the console holds self.lock."""

    def __init__(self, boot_id="b0000001", channels=8):
        self.lock = threading.RLock()
        self.cable: Cable | None = None
        self.noise = False  # REPL text, garbage and split writes around every line
        self.silent = False  # reads everything, answers nothing
        self.drop = 0  # drop the next n replies (they were lost on the wire)
        self.outputs = Outputs()
        self.log = Log(32)
        chans = [
            {"name": f"node{i}", "min_off_ms": 300, "max_cycles": 100} for i in range(channels)
        ]
        self.power = Power(self.outputs, chans, None, self.log, stagger_ms=0)
        self.power.restore(0)
        self.console = Console(self._write, self.log, self.power, boot_id=boot_id)
        self.rng = random.Random(7)

    def feed(self, data: bytes) -> None:
        with self.lock:
            if not self.silent:
                self.console.feed(data)
                self.power.tick(self.console.clock())

    def event(self, kind, **fields):
        with self.lock:
            self.log.event(kind, tuple(fields), tuple(fields.values()))

    def _write(self, line: bytes) -> None:
        line = bytes(line)  # the console lends a view of its frame buffer
        if self.drop and b'"id":' in line:
            self.drop -= 1
            return
        cable = self.cable
        if cable is None:
            return
        if not self.noise:
            cable.write(line)
            return
        r = self.rng
        junk = r.choice(
            [BANNER, b"\r\n>>> ", b"\x00\xff garbage", b"#EB< 0000 {cut", b"Traceback (most", b""]
        )
        cable.write(junk + (b"\r\n" if r.random() < 0.5 else b""))
        cut = r.randrange(1, len(line))
        cable.write(line[:cut])
        cable.write(line[cut:].replace(b"\n", b"\r\n"))


class Cable:
    """A USB cable: a PTY pair behind a stable symlink (like --serial-link); the board's end is
    the master. unplug() closes it (the link's reads fail), plug() makes a new one."""

    def __init__(self, path: Path, board: FakeBoard):
        self.path = path
        self.board = board
        self.master = -1
        self.slave = -1
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wlock = threading.Lock()
        self.plugs = 0

    def plug(self) -> None:
        self.master, self.slave = os.openpty()
        os.set_blocking(self.master, False)
        tmp = self.path.with_suffix(".new")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(os.ttyname(self.slave))
        tmp.replace(self.path)
        self.board.cable = self
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, args=(self.master, self._stop))
        self._thread.daemon = True
        self._thread.start()
        self.plugs += 1

    def unplug(self) -> None:
        if self.board.cable is self:
            self.board.cable = None
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        self.path.unlink(missing_ok=True)
        with self._wlock:
            for fd in (self.master, self.slave):
                if fd >= 0:
                    os.close(fd)
            self.master = self.slave = -1

    def write(self, data: bytes) -> None:
        with self._wlock:
            view = memoryview(data)
            while view and self.master >= 0:
                try:
                    n = os.write(self.master, view)
                except BlockingIOError:  # nobody reads: a USB device drops it too
                    return
                except OSError:
                    return
                view = view[n:]

    def _pump(self, fd: int, stop: threading.Event) -> None:
        import select

        while not stop.is_set():
            r, _, _ = select.select([fd], [], [], 0.02)
            if not r:
                continue
            try:
                data = os.read(fd, 4096)
            except (BlockingIOError, OSError):
                continue
            if data:
                self.board.feed(data)


@pytest.fixture
def rig(tmp_path):
    made: list[tuple[Cable, DeviceLink | None]] = []

    def make(board: FakeBoard | None = None, start_link=True, **kw):
        board = board or FakeBoard()
        cable = Cable(tmp_path / f"ttyBASTION{len(made)}", board)
        cable.plug()
        link = DeviceLink(str(cable.path), **{**FAST, **kw}) if start_link else None
        made.append((cable, link))
        if link is not None:
            link.start()
        return board, cable, link

    yield make
    for cable, link in made:
        if link is not None:
            link.close()
        cable.unplug()


def test_hello_power_and_a_clear_refusal(rig):
    board, cable, link = rig()
    assert link.wait_ready(5)
    assert link.info["boot"] == "b0000001" and link.info["channels"] == 8
    assert link.status is not None or link.request("status")["power"]
    r = link.request("power", channel=3, state="on")
    assert r["channel"]["output"] == "on" and (3, True) in board.outputs.calls
    link.request("power", channel=3, state="off")
    with pytest.raises(DeviceError) as e:
        link.request("power", channel=3, state="on")
    assert e.value.code == "refused" and "minimum off time" in str(e.value)
    with pytest.raises(DeviceError) as e:
        link.request("power", channel=3, state="cycle")
    assert "is off" in str(e.value)


def test_requests_go_through_repl_noise_garbage_and_split_lines(rig):
    board = FakeBoard()
    board.noise = True
    board, cable, link = rig(board)
    cable.write(BANNER + b"\r\nMPY: soft reboot\r\n" + b"\xfe" * 700 + b"\r\n")
    assert link.wait_ready(5)
    for i in range(20):
        r = link.request("power", channel=i % 8, state="on" if i < 8 else "off")
        assert r["channel"]["ch"] == i % 8
    c = link.counters()
    assert c["frame_noise"] > 5 and c["frame_bad"] > 0
    assert c["frame_overlong"] == 0  # 700 bytes is under the controller's line limit


def test_a_silent_device_times_out_clearly(rig, tmp_path):
    board = FakeBoard()
    board.silent = True
    board, cable, _ = rig(board, start_link=False)
    with pytest.raises(DeviceTimeout) as e:
        DeviceLink.connect(str(cable.path), wait_s=1.0, **FAST)
    assert "no device on" in str(e.value) and "hello" in str(e.value)
    with pytest.raises(DeviceTimeout) as e:
        DeviceLink.connect(str(tmp_path / "nothing-here"), wait_s=0.5, **FAST)
    assert "cannot open" in str(e.value)


def test_unplug_and_replug_reconnects_resyncs_and_loses_no_request(rig):
    board, cable, link = rig()
    assert link.wait_ready(5)
    resyncs = []
    link.on_resync(lambda lk: resyncs.append(lk.info["boot"]))
    link.request("power", channel=1, state="on")
    cable.unplug()
    wait_for(lambda: not link.ready, what="the link to notice the unplug")
    result = {}

    def ask():
        try:
            result["r"] = link.request("power", channel=2, state="on", timeout=15)
        except DeviceError as e:
            result["e"] = e

    t = threading.Thread(target=ask)
    t.start()
    time.sleep(0.3)  # the request waits for the device while the cable is out
    assert "r" not in result and "e" not in result
    cable.plug()
    t.join(15)
    assert result.get("r", {}).get("ok"), result
    assert board.outputs.calls.count((2, True)) == 1
    c = link.counters()
    assert c["connects"] == 2 and c["disconnects"] >= 1 and c["device_restarts"] == 0
    wait_for(lambda: resyncs == ["b0000001"], what="the resync callback")
    assert link.status["power"][1]["output"] == "on"


def test_concurrent_requests_each_get_their_own_single_reply(rig):
    board = FakeBoard(channels=8)
    board.noise = True
    board, cable, link = rig(board)
    assert link.wait_ready(5)
    errors = []
    replies: dict[int, list] = {ch: [] for ch in range(8)}

    def worker(ch):
        try:
            for i in range(6):
                r = link.request("power", channel=ch, state="on" if i % 2 == 0 else "off")
                replies[ch].append(r)
                if i == 1:
                    time.sleep(0.35)  # past the minimum off time
        except DeviceError as e:
            errors.append(e)

    def drop_some():
        for _ in range(6):
            time.sleep(0.1)
            with board.lock:
                board.drop += 1

    threads = [threading.Thread(target=worker, args=(ch,)) for ch in range(8)]
    threads.append(threading.Thread(target=drop_some))
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    refusals = [e for e in errors if e.code == "refused"]
    assert len(errors) == len(refusals)  # only interlock refusals, never a link failure
    for ch, rs in replies.items():
        assert all(r["channel"]["ch"] == ch for r in rs)
        ids = [r["id"] for r in rs]
        assert len(ids) == len(set(ids))
    assert link.counters()["timeouts"] == 0


def test_listeners_run_in_order_and_may_not_wait_on_the_link(rig):
    board, cable, link = rig()
    got, misuse = [], []

    def asks(e):  # waiting on the link from its own reader thread would deadlock
        if e.get("n") == 1:
            try:
                link.request("status")
            except RuntimeError as err:
                misuse.append(str(err))

    def broken(e):
        raise ValueError("a listener's bug")

    link.on_event(got.append)
    link.on_event(asks)
    link.on_event(broken)
    assert link.wait_ready(5)
    for i in range(5):
        board.event("dhcp", n=i)
    wait_for(lambda: len([e for e in got if e["ev"] == "dhcp"]) == 5, what="the events")
    assert [e["n"] for e in got if e["ev"] == "dhcp"] == [0, 1, 2, 3, 4]
    assert misuse and "reader thread" in misuse[0]
    assert link.counters()["callback_errors"] >= 5  # the broken listener, once per event
    assert link.request("status")["boot"] == "b0000001"  # the link goes on


def test_a_link_never_started_times_out_and_a_closed_one_says_so(rig):
    link = DeviceLink("/nonexistent/ttyNOPE", **FAST)
    with pytest.raises(DeviceTimeout) as e:
        link.request("status", timeout=0.3)
    assert "(port not open)" in str(e.value)
    link.close()
    with pytest.raises(DeviceError) as e:
        link.request("status")
    assert e.value.code == "closed"
    board = FakeBoard()
    board.silent = True  # the link never gets ready: the request waits...
    board, cable, link = rig(board)
    result = {}

    def ask():
        try:
            link.request("status", timeout=30)
        except DeviceError as err:
            result["e"] = err

    t = threading.Thread(target=ask)
    t.start()
    wait_for(lambda: link.counters()["requests"] >= 2, what="the request to be queued")
    link.close()  # ...until the link is closed under it
    t.join(10)
    assert result["e"].code == "closed" and str(result["e"]) == "link closed"


MPY_DEVICE = """
import asyncio
from firmware.console import Console, serve, stdout_writer
from firmware.log import Log
from firmware.power import Power

class Outputs:
    def set(self, ch, on):
        pass

log = Log(16)
power = Power(Outputs(), 4, None, log, 0)
power.restore(0)
asyncio.run(serve(Console(stdout_writer(), log, power, boot_id="00c0ffee")))
"""


def _relay(a: int, b: int, stop: threading.Event) -> None:
    """Copy bytes both ways between two PTY masters (what the sim board's supervisor does)."""
    import select

    while not stop.is_set():
        r, _, _ = select.select([a, b], [], [], 0.05)
        for fd in r:
            try:
                data = os.read(fd, 4096)
            except OSError:
                continue
            os.write(b if fd == a else a, data)


def test_against_the_firmware_console_under_micropython(tmp_path):
    """The whole device end on the real MicroPython unix port, reached through a PTY relay."""
    import subprocess

    from bastion.flash.sim import micropython_bin

    repo = Path(__file__).resolve().parents[3]
    script = tmp_path / "device.py"
    script.write_text(MPY_DEVICE)
    dev_master, dev_slave = os.openpty()  # the firmware's tty
    cli_master, cli_slave = os.openpty()  # the one clients open
    stop = threading.Event()
    relay = threading.Thread(target=_relay, args=(dev_master, cli_master, stop), daemon=True)
    relay.start()
    proc = subprocess.Popen(
        [micropython_bin(), "-X", "heapsize=128k", str(script)],
        stdin=dev_slave,
        stdout=dev_slave,
        env={"MICROPYPATH": f"{repo}:.frozen"},
    )
    got = []
    link = DeviceLink(os.ttyname(cli_slave), **FAST)
    link.on_event(got.append)
    try:
        link.start()
        assert link.wait_ready(20), link.last_error
        assert link.info["boot"] == "00c0ffee" and link.info["channels"] == 4
        r = link.request("power", channel="ch2", state="on")
        assert r["channel"]["output"] == "on"
        with pytest.raises(DeviceError) as e:
            link.request("power", channel=2, state="cycle", off_ms=10)
        assert e.value.code == "refused" and "minimum off time" in str(e.value)
        wait_for(lambda: any(ev.get("why") == "on" for ev in got), what="the power event")
        assert link.request("heap")["used"] > 0
        # the firmware's tty is cooked: it echoes each request, and the link skips the echoes
        assert link.counters()["frame_echo"] >= 4
    finally:
        link.close()
        proc.kill()
        proc.wait(10)
        stop.set()
        relay.join(5)
        for fd in (dev_master, dev_slave, cli_master, cli_slave):
            os.close(fd)


def test_an_open_link_holds_the_line_and_gives_it_back(rig):
    """While the link is open, the device treats Ctrl-C as a plain byte: the link's hello
    takes the hold and, idle, it sends "hold" well within the device's contact_ms. Closing the
    link releases the line at once (mpremote may be next); a controller that just vanishes
    (its cable pulled) loses the hold after contact_ms."""
    board = FakeBoard()
    switched: list[bool] = []
    board.console.interrupts = switched.append
    board.console.contact_ms = 600
    _, cable, link = rig(board, keepalive_s=0.15)
    assert link.wait_ready(5)
    for _ in range(10):  # 1.5 s with nothing to say: the keepalives keep the hold
        time.sleep(0.15)
        with board.lock:
            board.console.tick()
    assert board.console.held and switched == [False]
    assert link.counters()["keepalives"] >= 3
    link.close()
    assert not board.console.held and switched == [False, True]

    link = DeviceLink(str(cable.path), **{**FAST, "keepalive_s": 0.15}).start()
    try:
        assert link.wait_ready(5)
        assert board.console.held and switched == [False, True, False]
        cable.unplug()
        time.sleep(0.8)
        with board.lock:
            board.console.tick()
        assert not board.console.held and switched == [False, True, False, True]
        why = [e.get("why") for e in board.log.recent() if e["ev"] == "console"]
        assert why == ["hello", "release", "hello", "timeout"]
    finally:
        link.close()
