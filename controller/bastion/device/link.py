"""The controller's end of the serial link to the device (docs/serial-protocol.md).

`DeviceLink(port)` owns the serial port (pyserial; any `serial_for_url` URL or a device path
such as /dev/ttyACM0 or the sim board's PTY). It is the thin I/O shell around the protocol
session, `bastion.device.session.Session`, which holds all of the protocol's state (request
ids, deadlines, re-sends, resync, event dedupe) and whose docstring states the guarantees:
exactly one outcome per request, re-sends with the same id, OutcomeUnknown across a device
restart, events deduplicated by (boot, seq) and delivered in order, caught up after a
reconnect.

What the shell adds is the I/O and the threads:
- One reader thread opens the port (again after it disappears, every `reconnect_s`), feeds
  what it reads to the session and calls its tick() at least every 50 ms.
- One lock around the session: every call into it happens under the lock, and the bytes it
  hands out are written in its order by one writer at a time.
- `request()` runs in the caller's thread: it queues the request in the session and waits on
  a threading.Event that the thread that sees the outcome sets.
- Listeners (`on_event`, `on_resync`) are called outside the lock, one at a time and in the
  session's order, from the thread that drove the session (the reader, as a rule). They must
  not wait on the link: `request()` from the reader thread raises RuntimeError. (The hub hands
  such work to a thread of its own.)
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Self

import serial

from bastion.device.session import (
    IDEMPOTENT_OPS,
    PROTO,
    ConsoleData,
    DeviceError,
    DeviceEvent,
    DeviceTimeout,
    NotSent,
    Outcome,
    OutcomeUnknown,
    Output,
    Resynced,
    Session,
    is_idempotent,
)

__all__ = [
    "IDEMPOTENT_OPS",
    "PROTO",
    "DeviceError",
    "DeviceLink",
    "DeviceTimeout",
    "NotSent",
    "OutcomeUnknown",
    "is_idempotent",
]

_TICK_S = 0.05  # the reader's read timeout: how late a re-send or a deadline can be


class _Waiter:
    __slots__ = ("done", "outcome")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.outcome: Outcome | None = None


def _open_serial(port: str, baudrate: int) -> serial.SerialBase:
    return serial.serial_for_url(port, baudrate=baudrate, timeout=_TICK_S, write_timeout=2)


class DeviceLink:
    """See the module docstring. Start it (or use it as a context manager), then request()."""

    def __init__(
        self,
        port: str,
        *,
        baudrate: int = 115200,
        timeout_s: float = 5.0,
        retry_s: float = 1.0,
        reconnect_s: float = 0.5,
        max_line: int = 65536,
        cursor: tuple[str, int] | None = None,
        keepalive_s: float | None = 2.0,
        open_port: Callable[[str, int], serial.SerialBase] = _open_serial,
    ):
        self.port = port
        self.baudrate = baudrate
        self.timeout_s = timeout_s  # default per-request deadline
        self.retry_s = retry_s  # re-send an unanswered request after this long
        self.reconnect_s = reconnect_s  # pause between two attempts to open the port
        self._session = Session(
            os.urandom(4).hex(), name=port, timeout_s=timeout_s, retry_s=retry_s,
            max_line=max_line, cursor=cursor, keepalive_s=keepalive_s,
        )
        self._open_port = open_port
        self._lock = threading.Lock()  # the session, the waiters, the delivery queue
        self._write_lock = threading.RLock()  # one writer; also guards self._ser
        self._ser: serial.SerialBase | None = None
        self._waiters: dict[int, _Waiter] = {}
        # for the listeners, in order
        self._queue: deque[DeviceEvent | Resynced | ConsoleData] = deque()
        self._delivering = False  # a thread is handing the queue to the listeners
        self._ready = threading.Event()  # mirrors session.ready, for wait_ready()
        self._closed = threading.Event()
        self._event_listeners: list[Callable[[dict], None]] = []
        self._resync_listeners: list[Callable[[DeviceLink], None]] = []
        self._console_listeners: list[Callable[[ConsoleData], None]] = []
        self._thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------------
    @classmethod
    def connect(cls, port: str, wait_s: float = 5.0, **kw: Any) -> DeviceLink:
        """A started link whose first hello succeeded; raises DeviceTimeout otherwise."""
        link = cls(port, **kw).start()
        if not link.wait_ready(wait_s):
            why = link.last_error or "no answer"
            link.close()
            raise DeviceTimeout(f"no device on {port} within {wait_s:g} s ({why})", "timeout")
        return link

    def start(self) -> DeviceLink:
        self._thread = threading.Thread(target=self._run, name=f"device-link {self.port}")
        self._thread.daemon = True
        self._thread.start()
        return self

    def close(self) -> None:
        # give Ctrl-C back to the line: mpremote may be next (docs/serial-protocol.md)
        if self._session.holds_the_line and not self._closed.is_set():
            try:
                self.request("release", timeout=min(1.0, self.timeout_s))
            except (DeviceError, RuntimeError):  # no answer, or called from a listener
                pass
        self._closed.set()
        self._drop_port()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._drive(self._session.close)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- what callers read -----------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def session(self) -> str:
        """The random token that tells the device its reply cache is still ours."""
        return self._session.token

    @property
    def info(self) -> dict | None:
        """The last hello reply."""
        return self._session.info

    @property
    def status(self) -> dict | None:
        """The last status read on resync."""
        return self._session.status

    @property
    def last_error(self) -> str | None:
        """Why the link is not ready, for humans."""
        return self._session.last_error

    @property
    def boot(self) -> str | None:
        """The device's boot id as of the last hello."""
        return self._session.boot

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def on_event(self, fn: Callable[[dict], None]) -> None:
        """fn(event) for every device event, in order, once (see the module docstring)."""
        self._event_listeners.append(fn)

    def on_resync(self, fn: Callable[[DeviceLink], None]) -> None:
        """fn(link) after each successful resync (link.info and link.status are fresh)."""
        self._resync_listeners.append(fn)

    def on_console(self, fn: Callable[[ConsoleData], None]) -> None:
        """fn(data) for every frame of node console bytes (bastion.device.session.ConsoleData),
        in the order they came, on the reader thread like the other listeners."""
        self._console_listeners.append(fn)

    def counters(self) -> dict[str, int]:
        with self._lock:
            return self._session.counters()

    def cursor(self) -> tuple[str, int] | None:
        """(boot, next seq) of the event stream, to resume from after a controller restart."""
        with self._lock:
            return self._session.cursor()

    # --- requests -------------------------------------------------------------------------
    def request(self, op: str, timeout: float | None = None, **args: Any) -> dict:
        """Send one request and wait for its reply (a dict with ok true).

        Raises DeviceError with the device's text (and code) when it refuses, DeviceTimeout
        when nothing answered within timeout (NotSent, a DeviceTimeout, when the link was not
        ready all that time, so the device never saw it), OutcomeUnknown as the session's
        docstring says."""
        if threading.current_thread() is self._thread:
            raise RuntimeError(
                "DeviceLink.request() from the link's reader thread (a listener?) would wait "
                "for itself: call it from another thread"
            )
        timeout = self.timeout_s if timeout is None else timeout
        w = _Waiter()
        with self._lock:
            now = time.monotonic()
            rid = self._session.request(op, args, now, timeout)
            self._waiters[rid] = w
        deadline = now + timeout
        self._flush()
        try:
            # The reader ticks the session; past the deadline this thread ticks it too, so a
            # request ends on time even with no reader (not started, or stuck in a write).
            while not w.done.wait(max(0.0, deadline - time.monotonic()) + _TICK_S):
                self._drive(self._session.tick)
        finally:
            if w.outcome is None:  # interrupted (KeyboardInterrupt): nobody waits any more
                with self._lock:
                    self._waiters.pop(rid, None)
                    self._session.cancel(rid)
        return w.outcome.result()

    def enter_maintenance(self, wait_s: float = 60.0) -> dict:
        """Restart the device into a maintenance boot (docs/device.md, "Maintenance mode": no
        hardware watchdog, no network services, the relays held) and wait until the link is
        ready on it; returns that boot's hello. A device already in one is left as it is.

        The `maintenance` op resets the device once its reply is out, so the reply may be lost
        to the reset (OutcomeUnknown): what counts is the boot that follows. Raises
        DeviceTimeout when no new boot is ready within wait_s, DeviceError when the device
        refuses (a firmware without the op: code `unknown`) or comes back in a normal boot."""
        info = self.info or {}
        if info.get("maintenance"):
            return info
        before = self.boot
        try:
            reply = self.request("maintenance")
        except OutcomeUnknown:
            reply = {"rebooting": True}
        if not reply.get("rebooting"):  # it says it is in one already
            return self.info or {}
        deadline = time.monotonic() + wait_s
        while not (self.ready and self.boot not in (None, before)):
            if self._closed.is_set():
                raise DeviceError("link closed", "closed")
            if time.monotonic() > deadline:
                why = self.last_error or "no hello from a new boot"
                raise DeviceTimeout(
                    f"{self.port}: the device did not come back in maintenance mode within "
                    f"{wait_s:g} s ({why})",
                    "timeout",
                )
            time.sleep(0.05)
        info = self.info or {}
        if not info.get("maintenance"):
            raise DeviceError(
                f"{self.port}: the device restarted (boot {self.boot}) but not into maintenance "
                "mode",
                "refused",
            )
        return info

    # --- driving the session ---------------------------------------------------------------
    def _drive(self, call: Callable[..., list[Output]], *args: Any) -> None:
        """call(*args, now) on the session under the lock; then its bytes out, its outputs to
        the waiters and listeners."""
        with self._lock:
            outputs = call(*args, time.monotonic())
            for o in outputs:
                if isinstance(o, Outcome):
                    w = self._waiters.pop(o.id, None)
                    if w is not None:
                        w.outcome = o
                        w.done.set()
                else:
                    self._queue.append(o)
            if self._session.ready:
                self._ready.set()
            else:
                self._ready.clear()
        self._flush(wait=threading.current_thread() is not self._thread)
        self._deliver()

    def _flush(self, wait: bool = True) -> None:
        """Write what the session has to send. One writer at a time, in the session's order;
        the reader does not wait for another writer (that one writes the reader's bytes too,
        or the reader's next tick does)."""
        if not self._write_lock.acquire(blocking=wait):
            return
        try:
            while True:
                with self._lock:
                    data = self._session.data_to_send()
                ser = self._ser
                if not data or ser is None:
                    return  # nothing, or bytes for a port just lost: the session re-sends
                try:
                    ser.write(data)
                except serial.SerialTimeoutException:
                    with self._lock:
                        self._session.counts["write_timeouts"] += 1
                except (serial.SerialException, OSError, TypeError, AttributeError):
                    # pyserial raises TypeError/AttributeError when the port is closed under it
                    self._drop_port()
                    return
        finally:
            self._write_lock.release()

    def _deliver(self) -> None:
        """Hand queued events and resyncs to the listeners, one at a time, in order."""
        with self._lock:
            if self._delivering:
                return  # the thread that is delivering takes ours too, behind its own
            self._delivering = True
        try:
            while True:
                with self._lock:
                    if not self._queue:
                        self._delivering = False
                        return
                    item = self._queue.popleft()
                if isinstance(item, DeviceEvent):
                    calls = [(fn, item.fields) for fn in list(self._event_listeners)]
                elif isinstance(item, ConsoleData):
                    calls = [(fn, item) for fn in list(self._console_listeners)]
                else:
                    calls = [(fn, self) for fn in list(self._resync_listeners)]
                for fn, arg in calls:
                    try:
                        fn(arg)
                    except Exception:  # noqa: BLE001 - a listener's bug must not stop the link
                        with self._lock:
                            self._session.counts["callback_errors"] += 1
        except BaseException:
            with self._lock:
                self._delivering = False
            raise

    # --- the port ---------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                ser = self._open_port(self.port, self.baudrate)
            except (serial.SerialException, OSError, ValueError) as e:
                with self._lock:
                    self._session.counts["open_failures"] += 1
                    self._session.last_error = f"cannot open {self.port}: {e}"
                self._idle(self.reconnect_s)
                continue
            with self._write_lock:
                self._ser = ser
            self._drive(self._session.connected)
            self._read_until_gone(ser)
            self._drop_port()
            if not self._closed.is_set():
                self._drive(self._session.disconnected)
                with self._lock:
                    self._session.last_error = f"{self.port} disappeared"
                self._idle(self.reconnect_s)

    def _read_until_gone(self, ser: serial.SerialBase) -> None:
        while not self._closed.is_set() and self._ser is ser:
            try:
                data = ser.read(ser.in_waiting or 1)
            except (serial.SerialException, OSError, TypeError, AttributeError):
                return
            if data:
                self._drive(self._session.receive, data)
            else:
                self._drive(self._session.tick)

    def _idle(self, seconds: float) -> None:
        """Wait while the port is closed, ticking the session (deadlines run on)."""
        end = time.monotonic() + seconds
        while not self._closed.wait(min(_TICK_S, max(0.0, end - time.monotonic()))):
            self._drive(self._session.tick)
            if time.monotonic() >= end:
                return

    def _drop_port(self) -> None:
        with self._write_lock:
            ser, self._ser = self._ser, None
        self._ready.clear()
        if ser is not None:
            try:
                ser.close()
            except (serial.SerialException, OSError):
                pass
