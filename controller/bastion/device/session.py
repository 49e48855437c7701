"""The controller's end of the serial protocol as a pure session (docs/serial-protocol.md).

Sans-I/O, in h11's shape: no port, no thread, no clock. The shell (`bastion.device.link`) says
what happened and when — `connected(now)`, `receive(data, now)`, `tick(now)`,
`disconnected(now)`, `close(now)` — and asks for requests with `request(op, args, now)`, which
returns the request's id. Every call returns what became of things, in order: an `Outcome`
per finished request (its reply, or the DeviceError it ends in), a `DeviceEvent` per event to
hand to listeners, `Resynced` when the link becomes ready. `data_to_send()` hands out the bytes
to write to the line, whole frames in the order they were made. `now` is the caller's
monotonic clock in seconds; `next_deadline()` says when `tick` next has work.

Theory of operation
-------------------
The line is also the MicroPython REPL, so the device may restart under us (watchdog, power,
reflash) and anything may appear between frames. After each connection the session resyncs:
`hello` (our session token; the device's boot id tells whether it restarted), then `events`
pages to catch up on what it pushed while we were away, then `status`; only then do the
caller's requests flow.

    state    entered by                           on the line                leaves for
    -------  -----------------------------------  -------------------------  -----------------
    DOWN     start; disconnected()                nothing                    HELLO: connected()
    HELLO    connected(); a restart signal in     hello, re-sent every       CATCHUP: hello ok
             READY; nosession to a resync step    retry_s; a new hello after
                                                  hello_timeout_s, or after
                                                  hello_backoff_s once the
                                                  device refused one
    CATCHUP  hello answered                       events since our cursor,   STATUS: a page that
                                                  16 a page                  is empty, fails or
                                                                             moves no cursor, or
                                                                             max_catchup pages
    STATUS   catch-up over                        status                     READY, or HELLO
                                                                             when a restart
                                                                             signal came since
                                                                             the hello
    READY    status answered (or failed: the      the caller's requests      HELLO: restart
             device is usable, status unknown)                               signal, nosession
    CLOSED   close()                              nothing                    -
    Every state but CLOSED goes to DOWN on disconnected().

A restart signal is an event that names another boot than the hello's, or a `boot` event of a
boot we are not on, or a `nosession` answer (the device forgot our hello).

Guarantees (each is a test in tests/controller/device/test_session.py):
- A request gets exactly one Outcome: its reply, a DeviceError with the device's text and code,
  a DeviceTimeout at its deadline (NotSent, code `notsent`, when it never went out: the link
  was not READY all that time, so nothing was done), an OutcomeUnknown, or
  DeviceError("link closed") on close(). The caller's requests wait unsent until READY; an
  unanswered one is re-sent with the SAME id every retry_s, and at once after each resync, so
  the device answers a state-changing one from its reply cache instead of running it again.
  Replies to ids nobody waits for (late duplicates, an abandoned resync step) are counted as
  `stray_replies`.
- When the hello shows a new boot id, a state-changing request sent to the old boot and not
  answered ends in OutcomeUnknown (code `restarted`): it may or may not have run, and it is not
  sent to the new boot. Idempotent requests (`is_idempotent`) are simply sent again.
- Events are deduplicated by (boot, seq) and delivered in order: live events wait ("held", at
  most max_held, beyond that counted as `held_overflow`) from the connection until a
  catch-up is done (a disconnect in between keeps them waiting), and are then delivered behind
  the caught-up ones. In READY, a live event whose seq jumps past the cursor (events lost on
  the line) is held, with those after it, while an `events` request (the "fill", beside the
  caller's requests) fetches the missing seqs from the device's ring. Seqs the device's ring
  no longer holds are counted as `events_lost`. `cursor()` is (boot, next seq), and
  `Session(cursor=...)` resumes from it.
- Node console frames carry no boot id: each gets the boot the device is on as the last hello
  or live event named it. From a connection, or a `nosession` answer, until the hello (the
  device may have restarted meanwhile) they are held (at most max_console_held bytes) and
  then carry the hello's boot; each also carries its connection number (`ConsoleData`).
- Holding the line: the device treats Ctrl-C on its serial line as a plain byte while a
  controller holds it (taken by `hello`, kept by any request; docs/serial-protocol.md). In
  READY, a link that has sent nothing, or heard nothing, for `keepalive_s` sends `hold` (its
  own request, counted as `keepalives`; a firmware that answers `unknown` has no such op and is
  not asked again), so stray bytes never interrupt the firmware while this link is open. The
  shell sends `release` when it closes (`holds_the_line`), so mpremote can have the REPL right
  after. A device that has let SILENT_KEEPALIVES keepalives in a row go unanswered, and sent
  nothing else since, is not `ready` (its line open, its firmware stopped or hung): `last_error`
  says so, and any frame from it makes the link ready again. Liveness is judged on what the
  device sends, never on what the link sends it: requests that go out all the time (the hub's
  beats, every 2 s, each re-sent every retry_s) do not put the keepalives off, so a hung device
  is found as soon as an idle link would find it.
- Parse or raise Malformed at the boundary: lines that are not frames are counted by the
  deframer (`frame_*`), frames that are not a message we understand as `bad_messages`; no
  input makes a driving call raise.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

from firmware import frame
from firmware.frame import Malformed

PROTO = 1
# unanswered keepalives in a row after which a device that sends nothing is not ready
SILENT_KEEPALIVES = 3
# Requests that may safely run twice (on both sides of a device restart).
IDEMPOTENT_OPS = frozenset(
    {"hello", "status", "counters", "heap", "events", "watch", "unwatch", "beat", "hold",
     "release"}
)
# The link's counters, in the order counters() lists them. open_failures, write_timeouts and
# callback_errors are the shell's (it counts them in Session.counts); the rest are the session's.
COUNTERS = (
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
    "console_frames",
    "console_bytes",
    "console_held_overflow",
)

DOWN = "DOWN"
HELLO = "HELLO"
CATCHUP = "CATCHUP"
STATUS = "STATUS"
READY = "READY"
CLOSED = "CLOSED"


class DeviceError(Exception):
    """The device refused a request (`code` is its error code), or the link failed."""

    def __init__(self, message: str, code: str = "error", reply: dict | None = None):
        super().__init__(message)
        self.code = code
        self.reply = reply


class DeviceTimeout(DeviceError):
    """No reply in time: the port is gone or the device does not answer."""


class NotSent(DeviceTimeout):
    """The request's deadline came before it could be sent (the port was not open, or the
    resync never finished): the device never saw it, so nothing was done."""


class OutcomeUnknown(DeviceError):
    """The device restarted while this state-changing request was in flight."""


def is_idempotent(op: str, args: dict) -> bool:
    if op == "power":
        return args.get("state") in ("on", "off")
    return op in IDEMPOTENT_OPS


@dataclass(frozen=True)
class Outcome:
    """How request `id` ended: `reply` (a dict with ok true) or `error`."""

    id: int
    op: str
    reply: dict | None = None
    error: DeviceError | None = None

    def result(self) -> dict:
        if self.error is not None:
            raise self.error
        return self.reply or {}


@dataclass(frozen=True)
class DeviceEvent:
    """One device event, to deliver: deduplicated, in order."""

    fields: dict


@dataclass(frozen=True)
class Resynced:
    """The link is ready: hello, catch-up and status are done."""

    info: dict
    status: dict | None


@dataclass(frozen=True)
class ConsoleData:
    """Bytes from a node's serial console (firmware/nodecons.py): `ch` the relay channel of
    the node, `at` the offset of the first byte in that channel's stream since the device's
    `boot` (mod 2**30), `data` the bytes, `connection` which connection of the link carried
    them (the `connects` count). Within one connection a gap in `at` is bytes the device
    dropped; across two, bytes sent while the line was down."""

    ch: int
    at: int
    data: bytes
    boot: str | None
    connection: int = 0


Output = Outcome | DeviceEvent | Resynced | ConsoleData


# --- the boundary: a frame's object becomes a message we understand, or Malformed ------------
def parse_event(obj: dict) -> dict:
    """An event as the device sends it (`ev` a string; `boot` a string and `seq` an integer
    when present), or raise Malformed."""
    if not isinstance(obj.get("ev"), str):
        raise Malformed("event without a kind")
    boot = obj.get("boot")
    if boot is not None and not isinstance(boot, str):
        raise Malformed("event boot id is not a string")
    seq = obj.get("seq")
    if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int)):
        raise Malformed("event seq is not an integer")
    return obj


def parse_console(obj: dict, boot: str | None, connection: int = 0) -> ConsoleData:
    """A node console frame {"cons": ch, "at": offset, "d": base64}, or raise Malformed."""
    ch, at, d = obj.get("cons"), obj.get("at"), obj.get("d")
    if not _is_int(ch) or not _is_int(at) or not isinstance(d, str):
        raise Malformed("console frame without cons, at and d")
    try:
        data = base64.b64decode(d, validate=True)
    except (ValueError, binascii.Error):
        raise Malformed("console frame whose d is not base64") from None
    return ConsoleData(ch, at, data, boot, connection)


def parse_reply(obj: dict) -> dict:
    """A reply with an integer id and a boolean ok, or raise Malformed."""
    if not isinstance(obj.get("ok"), bool):
        raise Malformed("reply without a boolean ok")
    return obj


def reply_error(op: str, reply: dict) -> DeviceError:
    """The DeviceError for a reply with ok false, in the device's words."""
    text = reply.get("error")
    code = reply.get("code")
    return DeviceError(
        f"{op}: {text if isinstance(text, str) else 'refused'}",
        code if isinstance(code, str) else "error",
        reply,
    )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _Request:
    __slots__ = ("deadline", "id", "idempotent", "line", "next_send", "op", "sends", "sent_boot",
                 "timeout")

    def __init__(self, rid: int, op: str, args: dict, now: float, timeout: float):
        self.id = rid
        self.op = op
        msg = {"id": rid, "op": op}
        msg.update(args)
        self.line = frame.encode(msg, frame.TO_DEVICE)  # the same bytes on every re-send
        self.idempotent = is_idempotent(op, args)
        self.timeout = timeout
        self.deadline = now + timeout
        self.next_send: float | None = None  # None: send as soon as it may go
        self.sends = 0
        self.sent_boot: str | None = None  # the device boot that first got it


class Session:
    """The protocol state of one controller's link to one device. See the module docstring.

    Bounds:
      max_line     bytes of one received line (longer ones are dropped, `frame_overlong`)
      max_held     live events held during a resync; more are dropped (`held_overflow`) and
                   fetched again by the next catch-up if the device's ring still has them
      max_catchup  `events` pages per resync (a device ring holds a few dozen events)
      max_boots    boots whose event cursor is kept (the oldest is forgotten)
      max_console_held  console bytes held until a hello names their boot; beyond, the oldest
                   frames are dropped (`console_held_overflow`, in bytes)
    """

    max_held = 10000
    max_console_held = 65536
    max_catchup = 64
    max_boots = 8
    catchup_page = 16  # the device's limit for one `events` reply

    def __init__(
        self,
        token: str,
        *,
        name: str = "the device",
        timeout_s: float = 5.0,
        retry_s: float = 1.0,
        max_line: int = 65536,
        cursor: tuple[str, int] | None = None,
        keepalive_s: float | None = 2.0,
    ):
        self.token = token  # tells the device its reply cache is still ours
        self.name = name  # the port, for error texts
        self.timeout_s = timeout_s  # default deadline of a request and of a resync step
        self.retry_s = retry_s  # re-send an unanswered request after this long
        self.hello_timeout_s = retry_s * 3  # a new hello (new id) after this long
        self.hello_backoff_s = retry_s * 3  # after a refused hello: do not hammer
        self.state = DOWN
        self.info: dict | None = None  # the last hello reply
        self.status: dict | None = None  # the last status read on resync
        self.last_error: str | None = None  # why the link is not ready, for humans
        self.counts = dict.fromkeys(COUNTERS, 0)
        self._deframer = frame.Deframer(frame.TO_HOST, max_line)
        self._out: list[bytes] = []
        self._next_id = 1
        self._pending: dict[int, _Request] = {}  # the caller's requests, by id
        self._step: _Request | None = None  # the resync's request in flight
        self._hello_at: float | None = None  # HELLO with no hello in flight: send one then
        self._pages = 0  # catch-up pages asked this resync
        self._resync_due = False  # a restart signal came during this resync
        self._held: list[dict] = []
        self._boot: str | None = None
        self._cursors: dict[str, int] = {}  # boot id -> next event seq to deliver
        # READY, an `events` request for seqs that a live event showed were lost on the line
        self._fill: _Request | None = None
        self._fill_pages = 0
        # Console frames carry no boot id: the boot the device is on now, as the last hello or
        # a live event said; None from a (re)connection or a `nosession` until the hello.
        self._cons_boot: str | None = None
        self._cons_held: list[ConsoleData] = []  # frames that came while it was None
        self._cons_held_bytes = 0
        # an idle READY link sends "hold" this often, well inside the device's
        # Console.contact_ms; None: never
        self.keepalive_s = keepalive_s
        self._holds = True  # False once the device said it has no "hold" (older firmware)
        self._hold: _Request | None = None  # the keepalive in flight
        self._silent = 0  # keepalives in a row that went unanswered, with nothing else heard
        self._last_sent: float | None = None
        self._last_heard: float | None = None  # when the last frame from the device came
        if cursor is not None:
            self._cursors[cursor[0]] = cursor[1]

    # --- reading the state ---------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.state == READY and self._silent < SILENT_KEEPALIVES

    @property
    def is_connected(self) -> bool:
        return self.state not in (DOWN, CLOSED)

    @property
    def boot(self) -> str | None:
        """The device's boot id as of the last hello."""
        return self._boot

    def cursor(self) -> tuple[str, int] | None:
        """(boot, next seq) of the event stream, to resume from after a controller restart."""
        if self._boot is None:
            return None
        return self._boot, self._cursors.get(self._boot, 0)

    def counters(self) -> dict[str, int]:
        out = dict(self.counts)
        for k, v in self._deframer.counters().items():
            out["frame_" + k] = v
        return out

    @property
    def holds_the_line(self) -> bool:
        """Whether the device keeps Ctrl-C as a plain byte for us (hello took the hold, and
        its firmware knows `hold`): then the shell sends `release` before it lets go."""
        return self.state == READY and self._holds

    def pending(self) -> list[int]:
        """Ids of the caller's requests that have no outcome yet."""
        return list(self._pending)

    def data_to_send(self) -> bytes:
        """The bytes to write to the line now (whole frames), and forget them."""
        data, self._out = b"".join(self._out), []
        return data

    def next_deadline(self) -> float | None:
        """When tick() next has something to do (a deadline, a re-send, a hello)."""
        times = [p.deadline for p in self._pending.values()]
        if self.is_connected:
            may_send = self.state == READY
            times += [p.next_send for p in self._pending.values()
                      if may_send and p.next_send is not None]
            if self._step is not None:
                times += [self._step.deadline, self._step.next_send or self._step.deadline]
            if self._fill is not None:
                times += [self._fill.deadline, self._fill.next_send or self._fill.deadline]
            if self._hello_at is not None:
                times.append(self._hello_at)
            due = self._hold_due()
            if due is not None:
                times.append(due)
            if self._hold is not None:
                times.append(self._hold.deadline)
        return min(times) if times else None

    # --- driving calls --------------------------------------------------------------------
    def connected(self, now: float) -> list[Output]:
        """The port is open (again): resync."""
        out: list[Output] = []
        if self.state == CLOSED:
            return out
        if self.is_connected:
            self._down()
        self.counts["connects"] += 1
        self._deframer.reset()  # half a line from before is not the start of the next one
        self._cons_boot = None  # it may have restarted while the port was gone: the hello says
        self._start_resync(now, out)
        return out

    def disconnected(self, now: float) -> list[Output]:
        """The port is gone. Requests keep their deadlines and wait for the next connection."""
        if not self.is_connected:
            return []
        self.counts["disconnects"] += 1
        self._down()
        return self._expire(now)

    def close(self, now: float) -> list[Output]:
        """The link is closed for good: every request ends in DeviceError("link closed")."""
        if self.state == CLOSED:
            return []
        self._down()
        self.state = CLOSED
        out: list[Output] = [
            Outcome(p.id, p.op, error=DeviceError("link closed", "closed"))
            for p in self._pending.values()
        ]
        self._pending.clear()
        self._held.clear()
        self._cons_held.clear()
        return out

    def request(self, op: str, args: dict, now: float, timeout: float | None = None) -> int:
        """Queue one request; returns its id, which its Outcome will carry. Raises DeviceError
        (code `closed`) after close()."""
        self._check_open()
        p = self._new(op, args, now, self.timeout_s if timeout is None else timeout)
        self._pending[p.id] = p
        self._pump(now)
        return p.id

    def cancel(self, rid: int) -> None:
        """Forget request rid (its caller stopped waiting): no re-send, no outcome."""
        self._pending.pop(rid, None)

    def receive(self, data: bytes, now: float) -> list[Output]:
        """Bytes from the line, in any chunking."""
        out: list[Output] = []
        if self.state == CLOSED:
            return out
        for obj in self._deframer.feed(data):
            self._last_heard = now
            if self._silent:  # it speaks: a silence is over
                if self._silent >= SILENT_KEEPALIVES:
                    self.last_error = None
                self._silent = 0
            try:
                self._dispatch(obj, now, out)
            except Malformed:
                self.counts["bad_messages"] += 1
        out += self._expire(now)
        self._pump(now)
        return out

    def tick(self, now: float) -> list[Output]:
        """Time passed: deadlines, re-sends, the next hello."""
        if self.state == CLOSED:
            return []
        out = self._expire(now)
        self._pump(now)
        return out

    # --- requests -------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.state == CLOSED:
            raise DeviceError("link closed", "closed")

    def _new(self, op: str, args: dict, now: float, timeout: float) -> _Request:
        p = _Request(self._next_id, op, args, now, timeout)
        self._next_id += 1
        self.counts["requests"] += 1
        return p

    def _send(self, p: _Request, now: float) -> None:
        if p.sent_boot is None:
            p.sent_boot = self._boot
        p.sends += 1
        if p.sends > 1:
            self.counts["retries"] += 1
        p.next_send = now + self.retry_s
        self._out.append(p.line)
        self._last_sent = now

    def _pump(self, now: float) -> None:
        """Send what is due: the resync step, and in READY the caller's requests."""
        if not self.is_connected:
            return
        at = self._hello_at
        if self.state == HELLO and self._step is None and at is not None and now >= at:
            self._hello_at = None
            self._ask("hello", {"proto": PROTO, "session": self.token}, now, self.hello_timeout_s)
        s = self._step
        if s is not None and (s.next_send is None or now >= s.next_send):
            self._send(s, now)
        if self.state == READY:
            for p in self._pending.values():
                if p.next_send is None or now >= p.next_send:
                    self._send(p, now)
            f = self._fill
            if f is not None and f.next_send is not None and now >= f.next_send:
                self._send(f, now)
            due = self._hold_due()
            if due is not None and now >= due:
                self._hold = self._new("hold", {}, now, self.keepalive_s or self.timeout_s)
                self._send(self._hold, now)

    def _hold_due(self) -> float | None:
        """When the next keepalive `hold` is due, None when none will be: keepalive_s after
        the last frame sent (the device's contact) or the last frame heard (its liveness),
        whichever is older. Our own requests, answered or not, say nothing of the device."""
        if (self.state != READY or not self.keepalive_s or not self._holds
                or self._hold is not None):  # fmt: skip
            return None
        return min(self._last_sent or 0.0, self._last_heard or 0.0) + self.keepalive_s

    def _expire(self, now: float) -> list[Output]:
        out: list[Output] = []
        for p in [p for p in self._pending.values() if now >= p.deadline]:
            del self._pending[p.id]
            self.counts["timeouts"] += 1
            if p.sends == 0:  # it waited for a port or a resync all along: the device never saw it
                why = self.last_error or ("port not open" if not self.is_connected
                                          else "the resync is not done")  # fmt: skip
                out.append(Outcome(p.id, p.op, error=NotSent(
                    f"{p.op}: not sent: the link to the device on {self.name} was not ready "
                    f"within {p.timeout:g} s ({why}); nothing was done",
                    "notsent",
                )))
                continue
            state = "no answer" if self.is_connected else "port not open"
            out.append(Outcome(p.id, p.op, error=DeviceTimeout(
                f"{p.op}: no reply from the device on {self.name} within {p.timeout:g} s"
                f" ({state})",
                "timeout",
            )))
        if self._hold is not None and now >= self._hold.deadline:
            self._hold = None  # unanswered: the next one tries again (a resync may be coming)
            self._silent += 1
            if self._silent == SILENT_KEEPALIVES:
                self.last_error = (f"the device on {self.name} has answered none of the last "
                                   f"{SILENT_KEEPALIVES} keepalives (stopped or hung?)")  # fmt: skip
        if self._fill is not None and now >= self._fill.deadline:
            self.counts["timeouts"] += 1
            self._fill = None
            self._release_held(out)  # what it was to fetch is counted as lost
        s = self._step
        if s is not None and now >= s.deadline:
            self.counts["timeouts"] += 1
            self._step = None
            self._step_failed(s, DeviceTimeout(
                f"{s.op}: no reply from the device on {self.name} within {s.timeout:g} s"
                " (no answer)",
                "timeout",
            ), now, out)
        return out

    # --- what the device says ---------------------------------------------------------------
    def _dispatch(self, obj: dict, now: float, out: list[Output]) -> None:
        if "id" in obj:
            rid = obj["id"]
            s = self._step
            if s is not None and _is_int(rid) and rid == s.id:
                self._step_replied(s, parse_reply(obj), now, out)
            elif self._hold is not None and _is_int(rid) and rid == self._hold.id:
                self._hold_replied(parse_reply(obj), now, out)
            elif self._fill is not None and _is_int(rid) and rid == self._fill.id:
                self._fill_replied(parse_reply(obj), now, out)
            elif _is_int(rid) and rid in self._pending:
                self._replied(self._pending[rid], parse_reply(obj), now, out)
            else:  # a late copy, an abandoned resync step, a `badreq` with id null
                self.counts["stray_replies"] += 1
        elif "ev" in obj:
            self._live_event(parse_event(obj), now, out)
        elif "cons" in obj:  # not an event: no seq, not caught up; a gap in `at` says a loss
            c = parse_console(obj, self._cons_boot, self.counts["connects"])
            self.counts["console_frames"] += 1
            self.counts["console_bytes"] += len(c.data)
            if self._cons_boot is not None:
                out.append(c)
            else:
                self._hold_console(c)
        else:
            self.counts["stray_replies"] += 1

    def _hold_replied(self, reply: dict, now: float, out: list[Output]) -> None:
        self._hold = None
        if reply["ok"]:
            self.counts["keepalives"] += 1
        elif reply.get("code") == "nosession":
            self._forgot_us(now, out)
        elif reply.get("code") == "unknown":  # a firmware from before "hold": cannot be held
            self._holds = False

    def _replied(self, p: _Request, reply: dict, now: float, out: list[Output]) -> None:
        if reply.get("code") == "nosession":
            # The device restarted and forgot our hello: the request stays pending, and the
            # resync's hello decides whether it is sent again or ends in OutcomeUnknown.
            self._forgot_us(now, out)
            return
        del self._pending[p.id]
        if reply["ok"]:
            out.append(Outcome(p.id, p.op, reply=reply))
        else:
            out.append(Outcome(p.id, p.op, error=reply_error(p.op, reply)))

    def _live_event(self, e: dict, now: float, out: list[Output]) -> None:
        boot = e.get("boot")
        if self._boot is not None and boot is not None and boot != self._boot:
            restart = True
        else:
            restart = e.get("ev") == "boot" and boot != self._boot
        if isinstance(boot, str) and self._cons_boot is not None:
            self._cons_boot = boot  # the device pushes live events from the boot it is on
        if self.state == READY and not restart:
            if self._fill is None and not self._gap_before(e):
                self._deliver(e, out)
                return
            if self._fill is None:  # seqs lost on the line: the device's ring may have them
                self._fill_pages = 0
                self._ask_fill(now)
        if len(self._held) < self.max_held:
            self._held.append(e)
        else:
            self.counts["held_overflow"] += 1
        if restart:
            self._restart_signal(now, out)

    def _gap_before(self, e: dict) -> bool:
        """Whether event e of this boot comes after seqs not yet delivered."""
        boot, seq = e.get("boot"), e.get("seq")
        return boot == self._boot and _is_int(seq) and seq > self._cursors.get(boot, seq)

    def _ask_fill(self, now: float) -> None:
        self._fill_pages += 1
        since = self._cursors.get(self._boot, 0)
        self._fill = self._new("events", {"since": since, "n": self.catchup_page}, now,
                               self.timeout_s)  # fmt: skip
        self._send(self._fill, now)

    def _fill_replied(self, reply: dict, now: float, out: list[Output]) -> None:
        self._fill = None
        if not reply["ok"]:
            if reply.get("code") == "nosession":
                self._forgot_us(now, out)  # the held events wait for the resync's catch-up
            else:
                self._release_held(out)
            return
        moved = self._take_page(reply, out)
        held = next((e for e in self._held if _is_int(e.get("seq"))), None)
        if (moved and held is not None and self._gap_before(held)
                and self._fill_pages < self.max_catchup):  # fmt: skip
            self._ask_fill(now)
        else:
            self._release_held(out)

    def _release_held(self, out: list[Output]) -> None:
        held, self._held = self._held, []
        for e in held:
            self._deliver(e, out)

    def _hold_console(self, c: ConsoleData) -> None:
        self._cons_held.append(c)
        self._cons_held_bytes += len(c.data)
        while self._cons_held_bytes > self.max_console_held:
            gone = self._cons_held.pop(0)
            self._cons_held_bytes -= len(gone.data)
            self.counts["console_held_overflow"] += len(gone.data)

    def _deliver(self, e: dict, out: list[Output]) -> None:
        boot = e.get("boot")
        seq = e.get("seq")
        if isinstance(boot, str) and _is_int(seq):
            want = self._cursors.get(boot)
            if want is not None and seq < want:
                self.counts["events_dup"] += 1
                return
            if want is not None and seq > want:
                # neither the line nor the device's ring brought these (or a catch-up stopped
                # short of them): they will not come
                self.counts["events_lost"] += seq - want
            self._cursors[boot] = seq + 1
            while len(self._cursors) > self.max_boots:
                self._cursors.pop(next(iter(self._cursors)))
        self.counts["events"] += 1
        out.append(DeviceEvent(e))

    # --- resync -----------------------------------------------------------------------------
    def _down(self) -> None:
        if self.state == HELLO and self._step is not None:
            self.counts["hello_failures"] += 1  # the connection went before the hello came
        self.state = DOWN
        self._step = None  # its late reply, on a later connection, is a stray
        self._hello_at = None
        self._hold = None
        self._fill = None  # the held events wait for the next catch-up, from the cursor
        for p in self._pending.values():
            p.next_send = None  # sent again as soon as the link is ready again

    def _forgot_us(self, now: float, out: list[Output]) -> None:
        """A `nosession` answer: the device restarted, and which boot it is on now only the
        next hello says."""
        self._cons_boot = None
        self._restart_signal(now, out)

    def _restart_signal(self, now: float, out: list[Output]) -> None:
        if self.state == READY:
            self._start_resync(now, out)
        elif self.is_connected:
            self._resync_due = True  # this resync finishes, then the next one runs

    def _start_resync(self, now: float, out: list[Output]) -> None:
        self.state = HELLO
        self._resync_due = False
        self._step = None
        self._fill = None  # the catch-up fetches from the cursor what it was to fetch
        self._hello_at = now
        for p in self._pending.values():
            p.next_send = None  # "sent again after the new hello"
        self._pump(now)

    def _ask(self, op: str, args: dict, now: float, timeout: float) -> None:
        self._step = self._new(op, args, now, timeout)
        self._send(self._step, now)

    def _step_replied(self, s: _Request, reply: dict, now: float, out: list[Output]) -> None:
        self._step = None
        if not reply["ok"]:
            if reply.get("code") == "nosession" and s.op != "hello":
                # the device restarted again in the middle: start over with a hello at once
                self._cons_boot = None
                self._start_resync(now, out)
                return
            self._step_failed(s, reply_error(s.op, reply), now, out)
            return
        if s.op == "hello":
            self._hello_ok(reply, now, out)
        elif s.op == "events":
            self._page(reply, now, out)
        else:
            self._status_done(reply, now, out)

    def _step_failed(self, s: _Request, err: DeviceError, now: float, out: list[Output]) -> None:
        if s.op == "hello":
            self._hello_failed(err, now)
        elif s.op == "events":
            self._ask_status(now)  # no catch-up; the next resync tries again from the cursor
        else:
            self._status_done(None, now, out)

    def _hello_failed(self, err: DeviceError, now: float) -> None:
        self.counts["hello_failures"] += 1
        self.last_error = str(err)
        # no answer: a new hello at once; an answer that says no: not before the backoff
        self._hello_at = now + (0.0 if isinstance(err, DeviceTimeout) else self.hello_backoff_s)
        self._pump(now)

    def _hello_ok(self, hello: dict, now: float, out: list[Output]) -> None:
        boot = hello.get("boot")
        if not isinstance(boot, str):
            self.counts["bad_messages"] += 1
            self._hello_failed(DeviceError("hello: the reply has no boot id", "badreply"), now)
            return
        if self._boot is not None and boot != self._boot:
            self.counts["device_restarts"] += 1
            for p in list(self._pending.values()):
                if not p.idempotent and p.sent_boot not in (None, boot):
                    del self._pending[p.id]
                    out.append(Outcome(p.id, p.op, error=OutcomeUnknown(
                        f"{p.op}: the device restarted while this request was in flight; "
                        "it may or may not have been carried out",
                        "restarted",
                    )))
        if boot not in self._cursors:
            # a boot we have not seen: from its start if it is a restart we witnessed, from
            # now if this is the first device we talk to
            first = self._boot is None and not self._cursors
            seq = hello.get("seq")
            self._cursors[boot] = seq if first and _is_int(seq) else 0
        self._boot = boot
        self._cons_boot = boot
        held, self._cons_held, self._cons_held_bytes = self._cons_held, [], 0
        for c in held:  # the frames that came before this answer: this boot's, as a rule
            out.append(ConsoleData(c.ch, c.at, c.data, boot, c.connection))
        self.info = hello
        self.state = CATCHUP
        self._pages = 0
        self._ask_page(now)

    def _ask_page(self, now: float) -> None:
        self._pages += 1
        since = self._cursors.get(self._boot, 0)
        self._ask("events", {"since": since, "n": self.catchup_page}, now, self.timeout_s)

    def _page(self, r: dict, now: float, out: list[Output]) -> None:
        moved = self._take_page(r, out)
        if moved and self._pages < self.max_catchup:
            self._ask_page(now)
        else:
            self._ask_status(now)

    def _take_page(self, r: dict, out: list[Output]) -> bool:
        """Deliver one `events` reply asked from the cursor; whether it moved the cursor on."""
        boot = self._boot
        since = self._cursors.get(boot, 0)
        first = r.get("first")
        if _is_int(first) and first > since:
            self.counts["events_lost"] += first - since
            self._cursors[boot] = first
        evs = r.get("events")
        if not isinstance(evs, list):
            self.counts["bad_messages"] += 1
            return False
        before = self._cursors.get(boot, 0)
        for e in evs:
            if not isinstance(e, dict):
                self.counts["bad_messages"] += 1
                continue
            e.setdefault("boot", boot)
            try:
                self._deliver(parse_event(e), out)
            except Malformed:
                self.counts["bad_messages"] += 1
        return bool(evs) and self._cursors.get(boot, 0) != before

    def _ask_status(self, now: float) -> None:
        self.state = STATUS
        self._ask("status", {}, now, self.timeout_s)

    def _status_done(self, status: dict | None, now: float, out: list[Output]) -> None:
        self.status = status  # None: it answers hello but not status; usable, status unknown
        if self._resync_due:
            self._start_resync(now, out)  # a newer reason to resync: that one decides
            return
        self.state = READY
        self.last_error = None
        out.append(Resynced(self.info or {}, status))
        self._release_held(out)
        self._pump(now)

