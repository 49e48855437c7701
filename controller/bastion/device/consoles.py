"""The nodes' serial consoles on the controller: kept in per-machine log files and streamed.

The device carries each node's console over the serial link (firmware/nodecons.py); the link
hands its frames to `ConsoleLogs.feed` (through DeviceHub, which knows which machine a relay
channel powers). Each machine gets:

- a log file, <dir>/<machine>.log, appended as bytes arrive and flushed at once, rotated to
  <machine>.log.1 .. .log.<keep> when it passes `max_bytes` (the oldest goes): at most
  (keep + 1) * max_bytes per machine. A rotation is renames only, so a reader or a crash never
  sees half a file; an append is one write of whole frames. docs/consoles.md.
- a gap marker in the log and the stream where the device dropped bytes (its ring was full:
  the frame's offset jumped), or where the serial line was down (the jump came across two
  connections of the link), so what is missing is said, not silently spliced. Offsets that go
  back are a device restart the frame could not name (no gap: the stream started again).
- subscribers (the WebSocket, `bastion console`): each a bounded queue fed from the link's
  reader thread that never waits for them; a subscriber that falls behind by more than
  `max_queue` chunks loses the oldest and is told so in its stream.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path

from bastion import private

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # a site's names: at most 128
_MASK = 0x3FFFFFFF  # the device's offsets wrap here (firmware/nodecons.py)


def gap_note(n: int) -> bytes:
    return b"\r\n[bastion: %d bytes of console output dropped by the device]\r\n" % n


def missed_note(n: int) -> bytes:
    return (b"\r\n[bastion: %d bytes of console output not received: the serial line to the "
            b"device was down]\r\n" % n)


class Subscriber:
    """One reader of a machine's live console, on an asyncio loop: `await get()` returns the
    next chunk of bytes. Fed from any thread with put(); never blocks the feeder."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_queue: int = 256):
        self.loop = loop
        self.max_queue = max_queue
        self._chunks: deque[bytes] = deque()
        self._event = asyncio.Event()
        self.lost = 0

    def put(self, data: bytes) -> None:  # any thread
        self.loop.call_soon_threadsafe(self._put, data)

    def _put(self, data: bytes) -> None:
        if len(self._chunks) >= self.max_queue:
            self.lost += len(self._chunks.popleft())
        self._chunks.append(data)
        self._event.set()

    async def get(self) -> bytes:
        while not self._chunks:
            self._event.clear()
            await self._event.wait()
        if self.lost:
            lost, self.lost = self.lost, 0
            return b"\r\n[bastion: %d bytes not shown: this viewer fell behind]\r\n" % lost
        return self._chunks.popleft()


class ConsoleLogs:
    def __init__(self, directory: Path, max_bytes: int = 1 << 20, keep: int = 3,
                 backlog: int = 16384):  # fmt: skip
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.keep = keep
        self.backlog = backlog  # bytes of the log a new subscriber gets first
        self._lock = threading.Lock()
        self._files: dict[str, object] = {}
        # (boot, channel) -> (next offset, the link connection that carried the last frame)
        self._expect: dict[tuple[str | None, int], tuple[int, int | None]] = {}
        self._subs: dict[str, set[Subscriber]] = {}
        self.counts = {"bytes": 0, "gaps": 0, "dropped": 0, "missed": 0, "restarts": 0,
                       "rotations": 0, "write_errors": 0}  # fmt: skip

    # --- names and files -------------------------------------------------------------------
    def path(self, machine: str) -> Path:
        if not _NAME.match(machine):
            raise ValueError(f"{machine!r} is not a machine name a console log can have")
        return self.dir / f"{machine}.log"

    def _append(self, machine: str, data: bytes) -> None:
        path = self.path(machine)
        f = self._files.get(machine)
        if f is None:
            private.mkdir(self.dir)  # consoles show secrets: 0700 and 0600 whatever the umask
            f = private.open_append(path)  # kept open between frames, closed on rotation
            self._files[machine] = f
        f.write(data)
        f.flush()
        if f.tell() >= self.max_bytes:
            self._rotate(machine, path)

    def _rotate(self, machine: str, path: Path) -> None:
        f = self._files.pop(machine)
        os.fsync(f.fileno())
        f.close()
        for i in range(self.keep, 0, -1):
            older = path.with_name(f"{path.name}.{i}")
            newer = path if i == 1 else path.with_name(f"{path.name}.{i - 1}")
            if newer.exists():
                os.replace(newer, older)
        self.counts["rotations"] += 1

    def read(self, machine: str, tail: int | None = None) -> bytes:
        """What the log keeps, oldest first (rotated files, then the current one); the last
        `tail` bytes only when given."""
        with self._lock:
            return self._read(machine, tail)

    def _read(self, machine: str, tail: int | None) -> bytes:
        path = self.path(machine)
        parts = []
        for i in range(self.keep, 0, -1):
            try:
                parts.append(path.with_name(f"{path.name}.{i}").read_bytes())
            except FileNotFoundError:
                pass
        try:
            parts.append(path.read_bytes())
        except FileNotFoundError:
            pass
        data = b"".join(parts)
        return data[-tail:] if tail else data

    # --- from the device --------------------------------------------------------------------
    def feed(self, machine: str, ch: int, boot: str | None, at: int, data: bytes,
             connection: int | None = None) -> None:  # fmt: skip
        """Bytes from the device for `machine` (its relay channel `ch`), at offset `at` of
        that channel's stream on device boot `boot`, carried by the link's connection number
        `connection` (bastion.device.session.ConsoleData; None: not known)."""
        key = (boot, ch)
        out = data
        with self._lock:
            want, was = self._expect.get(key, (None, None))
            if want is not None and at != want:
                gap = (at - want) & _MASK
                if was is not None and connection is not None and was != connection:
                    self.counts["gaps"] += 1
                    self.counts["missed"] += gap
                    out = missed_note(gap) + data
                elif gap > _MASK // 2:
                    # Back, not 512 MiB on (a UART would need 13 hours of output between two
                    # frames): the device restarted and its new stream was named by the old boot
                    self.counts["restarts"] += 1
                else:
                    self.counts["gaps"] += 1
                    self.counts["dropped"] += gap
                    out = gap_note(gap) + data
            self._expect.pop(key, None)  # re-inserted last: the oldest key is the stalest
            self._expect[key] = ((at + len(data)) & _MASK, connection)
            while len(self._expect) > 64:  # channels x device boots seen: only recent ones matter
                self._expect.pop(next(iter(self._expect)))
            self.counts["bytes"] += len(data)
            try:
                self._append(machine, out)
            except OSError:
                self.counts["write_errors"] += 1
            subs = list(self._subs.get(machine, ()))
        for s in subs:
            s.put(out)

    # --- readers -----------------------------------------------------------------------------
    def subscribe(self, machine: str, loop: asyncio.AbstractEventLoop) -> tuple[Subscriber, bytes]:
        """A live subscriber and the backlog to show before what it gets (no byte between the
        two is lost or repeated: both are taken under the lock)."""
        self.path(machine)
        s = Subscriber(loop)
        with self._lock:
            self._subs.setdefault(machine, set()).add(s)
            return s, self._read(machine, self.backlog)

    def unsubscribe(self, machine: str, s: Subscriber) -> None:
        with self._lock:
            self._subs.get(machine, set()).discard(s)

    def close(self) -> None:
        with self._lock:
            for f in self._files.values():
                try:
                    os.fsync(f.fileno())
                    f.close()
                except OSError:
                    pass
            self._files.clear()


def console_writer(request: Callable[..., dict], ch: int, chunk: int = 96,
                   wait_s: float = 0.05, timeout_s: float = 10.0) -> Callable[[bytes], int]:  # fmt: skip
    """write(data) for a node's console: `cin` requests of at most `chunk` bytes, the part the
    device did not take sent again after wait_s (its tx buffer is the flow control); raises
    TimeoutError when the node takes nothing for timeout_s, DeviceError when the device fails
    the request or answers without a byte count it could have taken."""
    import base64
    import time

    from bastion.device.session import DeviceError

    def write(data: bytes) -> int:
        view = memoryview(data)
        stalled_since = None
        while view:
            part = bytes(view[:chunk])
            n = request("cin", cons=ch, d=base64.b64encode(part).decode()).get("n")
            if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= len(part):
                raise DeviceError(f"cin: the device's reply has no byte count of 0 to "
                                  f"{len(part)} (n: {n!r})", "badreply")  # fmt: skip
            view = view[n:]
            if n:
                stalled_since = None
            else:
                now = time.monotonic()
                stalled_since = stalled_since or now
                if now - stalled_since > timeout_s:
                    raise TimeoutError(f"the console of channel {ch} took nothing for "
                                       f"{timeout_s:g} s")  # fmt: skip
                time.sleep(wait_s)
        return len(data)

    return write
