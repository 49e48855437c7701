"""`bastion console NAME`: a node's serial console in this terminal, like `virsh console`.

Through a running controller (--url): its WebSocket /api/v1/machines/NAME/console/stream
(the token first, then bytes both ways; docs/consoles.md). Straight over the serial line
(--port): the device link's console frames and `cin` requests, no controller.

Keys: on a terminal, stdin is put in raw mode (every key goes to the node, Ctrl-C included)
and ESCAPE (Ctrl-], 0x1d, as virsh and telnet use) leaves. When stdin is not a terminal (a
pipe, a file, a script), its bytes are typed into the node as they come, and at its end the
output is still shown for `after_eof` seconds, then the command leaves.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import sys
import threading
import time
from collections.abc import Callable

ESCAPE = 0x1D  # Ctrl-]
ESCAPE_NAME = "Ctrl-]"


class Closed(Exception):
    """The other end closed the console; the text says why."""


@contextlib.contextmanager
def _raw_tty(fd: int):
    import termios
    import tty

    old = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, old)


def run(send: Callable[[bytes], None], stop: threading.Event, after_eof: float = 3.0,
        stdin_fd: int | None = None, banner: str | None = None) -> None:  # fmt: skip
    """Type stdin into send() until Ctrl-] (a terminal), the end of stdin plus after_eof
    seconds (not a terminal), or stop is set (the other end went). On a terminal, `banner`
    goes to stderr once keys go to the node (raw mode is on)."""
    fd = sys.stdin.fileno() if stdin_fd is None else stdin_fd
    is_tty = os.isatty(fd)
    with _raw_tty(fd) if is_tty else contextlib.nullcontext():
        if is_tty and banner:
            sys.stderr.write(banner + "\r\n")
            sys.stderr.flush()
        eof_at = None
        while not stop.is_set():
            if eof_at is not None:
                if time.monotonic() - eof_at >= after_eof:
                    return
                stop.wait(0.1)
                continue
            ready, _, _ = select.select([fd], [], [], 0.2)
            if not ready:
                continue
            data = os.read(fd, 1024)
            if not data:
                eof_at = time.monotonic()
                continue
            if is_tty and ESCAPE in data:
                data = data[: data.index(ESCAPE)]
                if data:
                    send(data)
                return
            send(data)


def _out(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def banner(name: str) -> str:
    return f"[bastion: {name}'s console; {ESCAPE_NAME} leaves]"


def via_controller(url: str, token: str | None, name: str, after_eof: float = 3.0) -> None:
    """The console through the controller's WebSocket. Raises Closed with the server's
    reason when it refuses (a wrong token) or ends the stream."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    ws_url = url.rstrip("/").replace("http://", "ws://", 1).replace("https://", "wss://", 1)
    ws_url += f"/api/v1/machines/{name}/console/stream"
    try:
        ws = connect(ws_url, open_timeout=10, max_size=None)
    except (OSError, TimeoutError) as e:
        raise Closed(f"{ws_url}: {e}") from None
    stop = threading.Event()
    why: list[str] = []

    def reader() -> None:
        try:
            while True:
                msg = ws.recv()
                _out(msg if isinstance(msg, bytes) else msg.encode())
        except ConnectionClosed as e:
            rcvd = e.rcvd
            if rcvd is not None and rcvd.code != 1000:
                why.append(f"{rcvd.reason or 'closed'} (code {rcvd.code})")
            elif rcvd is None and e.sent is None:  # neither side closed: it went (exit 0 before)
                why.append("the connection to the controller was lost (no close from it)")
        stop.set()

    with ws:
        ws.send(json.dumps({"token": token or ""}))
        t = threading.Thread(target=reader, daemon=True)
        t.start()

        def send(data: bytes) -> None:
            with contextlib.suppress(ConnectionClosed):
                ws.send(data)

        run(send, stop, after_eof, banner=banner(name))
    t.join(5)
    if why:
        raise Closed(why[0])


def via_link(port: str, name_or_channel: str, after_eof: float = 3.0) -> None:
    """The console straight over the device's serial line (no controller): the channel is
    a relay channel number (the link does not know the site's machine names)."""
    from bastion.device.consoles import console_writer
    from bastion.device.hub import is_channel_number
    from bastion.device.link import DeviceError, DeviceLink

    if not is_channel_number(name_or_channel):
        raise Closed("with --port, name the console by its relay channel number (the site's "
                     "machine names are the controller's: use --url for them)")  # fmt: skip
    ch = int(name_or_channel)
    link = DeviceLink(port)
    link.on_console(lambda c: _out(c.data) if c.ch == ch else None)  # from the first frame on
    link.start()
    try:
        if not link.wait_ready(10):
            raise Closed(f"no device on {port} within 10 s ({link.last_error or 'no answer'})")
        wired = [c.get("cons") for c in (link.info or {}).get("consoles") or []]
        if ch not in wired:
            raise Closed(f"the device has no console on channel {ch} (its consoles: "
                         f"{wired or 'none'})")  # fmt: skip
        write = console_writer(link.request, ch)

        def send(data: bytes) -> None:
            try:
                write(data)
            except (DeviceError, TimeoutError) as e:  # the device went, or the node takes nothing
                raise Closed(str(e)) from None

        run(send, threading.Event(), after_eof, banner=banner(name_or_channel))
    finally:
        link.close()
