"""The controller's end of the serial link to the device (docs/serial-protocol.md).

`DeviceLink(port)` owns the serial port (pyserial; any `serial_for_url` URL or a device path
such as /dev/ttyACM0 or the sim board's PTY). A background thread reads frames, hands replies
to the callers waiting on them and events to the listeners, and reopens the port when it
disappears. After each (re)connection it resyncs: `hello` (same session token as before),
compare the device's boot id, catch up on events missed meanwhile, read `status`.

Delivery guarantees:
- A request gets exactly one outcome: its reply, a DeviceError with the device's text, or a
  DeviceTimeout / OutcomeUnknown. Unanswered requests are re-sent with the SAME id every
  `retry_s`; the device answers a re-sent state-changing request from its reply cache instead
  of running it again, and late duplicate replies are dropped (counted as `stray_replies`).
- If the device restarted while a state-changing request was in flight (its boot id changed,
  so its reply cache is gone), that request fails with OutcomeUnknown instead of being sent
  to the new boot: it may or may not have run. Idempotent requests (status, power on/off, ...)
  are simply sent again.
- Events are deduplicated by (boot, seq) and delivered in order; events the device pushed
  while the link was down are fetched with the `events` op on resync, as far as the device's
  ring still holds them (what it no longer holds is counted as `events_lost`).

Holding the line: the device treats Ctrl-C on its serial line as a plain byte while a
controller holds it (taken by `hello`, kept by any request; docs/serial-protocol.md). An idle
link sends `hold` every `keepalive_s`, so stray bytes never interrupt the firmware while this
link is open, and close() sends `release`, so mpremote can have the REPL right after.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any, Self

import serial

from firmware import frame

PROTO = 1
# Requests that may safely run twice (on both sides of a device restart).
IDEMPOTENT_OPS = frozenset(
    {"hello", "status", "counters", "heap", "events", "watch", "unwatch", "beat", "hold",
     "release"}
)
_LINK_COUNTERS = (
    "connects",
    "disconnects",
    "open_failures",
    "requests",
    "retries",
    "timeouts",
    "stray_replies",
    "device_restarts",
    "hello_failures",
    "write_timeouts",
    "events",
    "events_dup",
    "events_lost",
    "held_overflow",
    "callback_errors",
    "bad_messages",
    "keepalives",
)


class DeviceError(Exception):
    """The device refused a request (`code` is its error code), or the link failed."""

    def __init__(self, message: str, code: str = "error", reply: dict | None = None):
        super().__init__(message)
        self.code = code
        self.reply = reply


class DeviceTimeout(DeviceError):
    """No reply in time: the port is gone or the device does not answer."""


class OutcomeUnknown(DeviceError):
    """The device restarted while this state-changing request was in flight."""


def is_idempotent(op: str, args: dict) -> bool:
    if op == "power":
        return args.get("state") in ("on", "off")
    return op in IDEMPOTENT_OPS


class _Pending:
    __slots__ = ("done", "error", "id", "idempotent", "internal", "line", "op", "reply",
                 "sent_boot")

    def __init__(self, rid: int, op: str, line: bytes, idempotent: bool):
        self.id = rid
        self.op = op
        self.line = line
        self.idempotent = idempotent
        self.done = threading.Event()
        self.reply: dict | None = None
        self.error: DeviceError | None = None
        self.sent_boot: str | None = None  # the device boot that first got it
        self.internal = False  # the link's own (resync) request


def _open_serial(port: str, baudrate: int) -> serial.SerialBase:
    return serial.serial_for_url(port, baudrate=baudrate, timeout=0.05, write_timeout=2)


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
        keepalive_s: float | None = 2.0,
        max_line: int = 65536,
        cursor: tuple[str, int] | None = None,
        open_port: Callable[[str, int], serial.SerialBase] = _open_serial,
    ):
        self.port = port
        self.baudrate = baudrate
        self.timeout_s = timeout_s  # default per-request deadline
        self.retry_s = retry_s  # re-send an unanswered request after this long
        self.reconnect_s = reconnect_s  # pause between two attempts to open the port
        # an idle link sends "hold" this often, well inside the device's Console.contact_ms
        self.keepalive_s = keepalive_s
        self._last_write = 0.0
        self._holds = True  # False once the device said it has no "hold" (older firmware)
        self.session = os.urandom(4).hex()  # tells the device its reply cache is still ours
        self.info: dict | None = None  # the last hello reply
        self.status: dict | None = None  # the last status read on resync
        self.last_error: str | None = None  # why the link is not ready, for humans
        self._open_port = open_port
        self._deframer = frame.Deframer(frame.TO_HOST, max_line)
        self._counts = dict.fromkeys(_LINK_COUNTERS, 0)
        self._lock = threading.Lock()  # pending table, counters, event cursors
        # one writer at a time; a ready check and its write are atomic against a resync
        self._send_lock = threading.RLock()
        self._ev_lock = threading.Lock()  # event delivery in order, one at a time
        self._pending: dict[int, _Pending] = {}
        self._next_id = 1
        self._ser: serial.SerialBase | None = None
        self._gen = 0  # connection generation: bumps on each (re)open
        self._ready = threading.Event()  # connected and hello done
        self._closed = threading.Event()
        self._resyncing = False  # a resync thread is running
        self._resync_due = False  # ... and should (re)run for the current connection
        self._holding = False  # live events wait while a catch-up runs
        self._held: list[dict] = []
        self._boot: str | None = None
        self._cursors: dict[str, int] = {}  # boot id -> next event seq to deliver
        if cursor is not None:
            self._cursors[cursor[0]] = cursor[1]
        self._event_listeners: list[Callable[[dict], None]] = []
        self._resync_listeners: list[Callable[[DeviceLink], None]] = []
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
        if self.keepalive_s:
            threading.Thread(target=self._keepalive, name=f"device-hold {self.port}",
                             daemon=True).start()
        return self

    def close(self) -> None:
        if self._holds and self._ready.is_set() and not self._closed.is_set():
            try:  # give Ctrl-C back to the line: mpremote may be next
                self.request("release", timeout=min(1.0, self.timeout_s))
            except DeviceError:
                pass
        self._closed.set()
        self._ready.clear()
        self._drop_port()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        with self._lock:
            pending = list(self._pending.values())
        for p in pending:
            p.error = DeviceError("link closed", "closed")
            p.done.set()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def boot(self) -> str | None:
        """The device's boot id as of the last hello."""
        return self._boot

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def on_event(self, fn: Callable[[dict], None]) -> None:
        """fn(event) for every device event, in order, from the link's threads."""
        self._event_listeners.append(fn)

    def on_resync(self, fn: Callable[[DeviceLink], None]) -> None:
        """fn(link) after each successful resync (link.info and link.status are fresh)."""
        self._resync_listeners.append(fn)

    def counters(self) -> dict[str, int]:
        with self._lock:
            out = dict(self._counts)
        for k, v in self._deframer.counters().items():
            out["frame_" + k] = v
        return out

    def cursor(self) -> tuple[str, int] | None:
        """(boot, next seq) of the event stream, to resume from after a controller restart."""
        with self._lock:
            if self._boot is None:
                return None
            return self._boot, self._cursors.get(self._boot, 0)

    # --- requests -------------------------------------------------------------------------
    def request(self, op: str, timeout: float | None = None, **args: Any) -> dict:
        """Send one request and wait for its reply (a dict with ok true).

        Raises DeviceError with the device's text (and code) when it refuses, DeviceTimeout
        when nothing answered within timeout, OutcomeUnknown as the module docstring says."""
        return self._exchange(op, args, self.timeout_s if timeout is None else timeout, False)

    def _exchange(self, op: str, args: dict, timeout: float, internal: bool) -> dict:
        deadline = time.monotonic() + timeout
        with self._lock:
            rid = self._next_id
            self._next_id += 1
            self._counts["requests"] += 1
            msg = {"id": rid, "op": op}
            msg.update(args)
            p = _Pending(rid, op, frame.encode(msg, frame.TO_DEVICE), is_idempotent(op, args))
            p.internal = internal
            self._pending[rid] = p
        gen = self._gen
        sends = 0
        try:
            while True:
                left = deadline - time.monotonic()
                if p.done.is_set():
                    break
                if left <= 0:
                    with self._lock:
                        self._counts["timeouts"] += 1
                    state = "no answer" if self._ser is not None else "port not open"
                    raise DeviceTimeout(
                        f"{op}: no reply from the device on {self.port} within {timeout:g} s"
                        f" ({state})",
                        "timeout",
                    )
                if internal and (gen != self._gen or self._closed.is_set()):
                    raise DeviceTimeout(f"{op}: connection lost", "timeout")
                if not internal and not self._ready.wait(min(left, 0.2)):
                    if self._closed.is_set():
                        raise DeviceError("link closed", "closed")
                    continue
                if self._send(p, internal):
                    sends += 1
                    if sends > 1:
                        with self._lock:
                            self._counts["retries"] += 1
                    p.done.wait(min(self.retry_s, max(0.0, deadline - time.monotonic())))
                else:
                    time.sleep(min(0.05, max(0.0, left)))
        finally:
            with self._lock:
                self._pending.pop(rid, None)
        if p.error is not None:
            raise p.error
        reply = p.reply or {}
        if not reply.get("ok"):
            raise DeviceError(
                f"{op}: {reply.get('error', 'refused')}", str(reply.get("code", "error")), reply
            )
        return reply

    def _send(self, p: _Pending, internal: bool) -> bool:
        with self._send_lock:
            ser = self._ser
            if ser is None or (not internal and not self._ready.is_set()):
                return False
            if p.sent_boot is None:
                p.sent_boot = self._boot
            try:
                ser.write(p.line)
                self._last_write = time.monotonic()
            except serial.SerialTimeoutException:
                with self._lock:
                    self._counts["write_timeouts"] += 1
                return False
            except (serial.SerialException, OSError, TypeError, AttributeError):
                # pyserial raises TypeError/AttributeError when the port is closed under it
                self._drop_port()
                return False
        return True

    def _keepalive(self) -> None:
        assert self.keepalive_s
        while not self._closed.wait(self.keepalive_s / 4):
            if not self._ready.is_set() or time.monotonic() - self._last_write < self.keepalive_s:
                continue
            try:
                self.request("hold", timeout=self.keepalive_s)
                with self._lock:
                    self._counts["keepalives"] += 1
            except DeviceError as e:
                if e.code == "unknown":  # a firmware from before "hold": it cannot be held
                    self._holds = False
                    return

    # --- the connection ------------------------------------------------------------------
    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                ser = self._open_port(self.port, self.baudrate)
            except (serial.SerialException, OSError, ValueError) as e:
                with self._lock:
                    self._counts["open_failures"] += 1
                self.last_error = f"cannot open {self.port}: {e}"
                self._closed.wait(self.reconnect_s)
                continue
            with self._send_lock:
                self._ser = ser
                self._gen += 1
            with self._lock:
                self._counts["connects"] += 1
            self._deframer.reset()
            self._start_resync()
            self._read_until_gone(ser)
            self._drop_port()
            if not self._closed.is_set():
                with self._lock:
                    self._counts["disconnects"] += 1
                self.last_error = f"{self.port} disappeared"
                self._closed.wait(self.reconnect_s)

    def _read_until_gone(self, ser: serial.SerialBase) -> None:
        while not self._closed.is_set() and self._ser is ser:
            try:
                data = ser.read(ser.in_waiting or 1)
            except (serial.SerialException, OSError, TypeError, AttributeError):
                return
            if data:
                for obj in self._deframer.feed(data):
                    try:
                        self._dispatch(obj)
                    except Exception:  # noqa: BLE001 - a well-framed but odd message
                        with self._lock:
                            self._counts["bad_messages"] += 1

    def _drop_port(self) -> None:
        with self._send_lock:
            ser, self._ser = self._ser, None
            self._ready.clear()
        if ser is not None:
            try:
                ser.close()
            except (serial.SerialException, OSError):
                pass

    def _dispatch(self, obj: dict) -> None:
        if "id" in obj:
            self._on_reply(obj)
        elif "ev" in obj:
            self._on_event(obj)
        else:
            with self._lock:
                self._counts["stray_replies"] += 1

    def _on_reply(self, obj: dict) -> None:
        rid = obj.get("id")
        with self._lock:
            p = self._pending.get(rid) if isinstance(rid, int) else None
            if p is None or p.done.is_set():
                self._counts["stray_replies"] += 1
                return
            if obj.get("code") == "nosession" and p.op != "hello":
                if p.internal:
                    # A resync step that reached a newer boot (the device restarted again in
                    # the middle): fail it now, so the resync starts over with hello at once
                    # instead of waiting out this step's timeout.
                    p.error = DeviceError(f"{p.op}: the device restarted", "nosession")
                    p.done.set()
                p = None  # the device restarted; resync decides what becomes of the request
            else:
                p.reply = obj
                p.done.set()
        if p is None:
            self._start_resync()

    # --- resync ---------------------------------------------------------------------------
    def _start_resync(self) -> None:
        with self._send_lock:
            self._ready.clear()
            self._resync_due = True
            if self._resyncing or self._ser is None:
                return
            self._resyncing = True
        threading.Thread(target=self._resync_loop, daemon=True).start()

    def _resync_loop(self) -> None:
        try:
            while True:
                with self._send_lock:
                    if not self._resync_due or self._ser is None or self._closed.is_set():
                        return
                    self._resync_due = False
                    gen = self._gen
                self._resync(gen)
        finally:
            with self._send_lock:
                self._resyncing = False

    def _resync(self, gen: int) -> None:
        try:
            with self._lock:
                self._holding = True
            hello = None
            while hello is None and gen == self._gen and not self._closed.is_set():
                try:
                    hello = self._exchange(
                        "hello", {"proto": PROTO, "session": self.session}, self.retry_s * 3, True
                    )
                except DeviceError as e:
                    with self._lock:
                        self._counts["hello_failures"] += 1
                    self.last_error = str(e)
                    if not isinstance(e, DeviceTimeout):  # refused (protocol): do not hammer
                        self._closed.wait(self.retry_s * 3)
            if hello is None:
                return
            boot = str(hello.get("boot"))
            failed = []
            with self._lock:
                if self._boot is not None and boot != self._boot:
                    self._counts["device_restarts"] += 1
                    for p in self._pending.values():
                        if not p.idempotent and p.sent_boot not in (None, boot):
                            failed.append(p)
                if boot not in self._cursors:
                    # a boot we have not seen: from its start if it is a restart we witnessed,
                    # from now if this is the first device we talk to
                    first = self._boot is None and not self._cursors
                    seq = hello.get("seq")
                    self._cursors[boot] = seq if first and isinstance(seq, int) else 0
                self._boot = boot
            for p in failed:
                p.error = OutcomeUnknown(
                    f"{p.op}: the device restarted while this request was in flight; "
                    "it may or may not have been carried out",
                    "restarted",
                )
                p.done.set()
            self.info = hello
            self._catch_up(gen, boot)
            try:
                self.status = self._exchange("status", {}, self.timeout_s, True)
            except DeviceError:  # it answers hello but not status: still usable, status unknown
                self.status = None
            with self._send_lock:
                if gen != self._gen or self._resync_due:
                    return  # a newer connection or a newer reason to resync: that one decides
                self.last_error = None
                self._ready.set()
            for fn in list(self._resync_listeners):
                try:
                    fn(self)
                except Exception:  # noqa: BLE001 - a listener's bug must not stop the link
                    with self._lock:
                        self._counts["callback_errors"] += 1
        finally:
            self._release_held()

    def _catch_up(self, gen: int, boot: str) -> None:
        for _ in range(64):  # a device ring holds a few dozen events; never loop forever
            with self._lock:
                since = self._cursors.get(boot, 0)
            try:
                r = self._exchange("events", {"since": since, "n": 16}, self.timeout_s, True)
            except DeviceError:
                return
            first = r.get("first")
            if isinstance(first, int) and first > since:
                with self._lock:
                    self._counts["events_lost"] += first - since
                    self._cursors[boot] = first
            evs = r.get("events")
            if not isinstance(evs, list):
                return
            for e in evs:
                if isinstance(e, dict):
                    e.setdefault("boot", boot)
                    self._deliver(e)
            if not evs or gen != self._gen:
                return

    def _release_held(self) -> None:
        while True:
            with self._lock:
                held, self._held = self._held, []
                if not held:
                    self._holding = False
                    return
            for e in held:
                self._deliver(e)

    # --- events ---------------------------------------------------------------------------
    def _on_event(self, e: dict) -> None:
        boot = e.get("boot")
        with self._lock:
            if self._boot is not None and boot is not None and boot != self._boot:
                restart = True
            else:
                restart = e.get("ev") == "boot" and boot != self._boot
            if self._holding or restart:
                if len(self._held) < 10000:
                    self._held.append(e)
                else:
                    self._counts["held_overflow"] += 1
                held = True
            else:
                held = False
        if restart:
            self._start_resync()
        if not held:
            self._deliver(e)

    def _deliver(self, e: dict) -> None:
        with self._ev_lock:
            boot = e.get("boot")
            seq = e.get("seq")
            with self._lock:
                if isinstance(boot, str) and isinstance(seq, int):
                    if seq < self._cursors.get(boot, 0):
                        self._counts["events_dup"] += 1
                        return
                    self._cursors[boot] = seq + 1
                    while len(self._cursors) > 8:
                        self._cursors.pop(next(iter(self._cursors)))
                self._counts["events"] += 1
            for fn in list(self._event_listeners):
                try:
                    fn(e)
                except Exception:  # noqa: BLE001 - a listener's bug must not stop the link
                    with self._lock:
                        self._counts["callback_errors"] += 1
