"""The controller's device: the serial link (bastion.device.link.DeviceLink) as part of the app.

`bastion serve --device PORT` keeps one DeviceLink open for the life of the service. Every
event the device pushes (dhcp offers, TFTP transfers, power changes, watchdog actions, boots)
lands in the event history as kind = the device's event name, source "device", with the
machine named when the site knows its MAC (dhcp, tftp) or its relay channel (power,
watchdog). Power requests name a machine (its `relay:` in machines.yaml) or a channel.

The link reconnects by itself (cable pulled, device reset); while it is down, requests fail
with a clear error instead of hanging, and events pushed meanwhile are caught up on resync.
With an EventCursor (bastion.state.eventcursor: a row in the history's database) the same holds
across a restart of the controller: the link resumes from the cursor kept there, so events the
device pushed while `serve` was stopped are recorded once it is back, as far as the device's
ring still has them.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from typing import Any

from bastion import match
from bastion.device.consoles import ConsoleLogs, console_writer
from bastion.device.link import DeviceError, DeviceLink
from bastion.device.session import ConsoleData
from bastion.model import Site
from bastion.state.eventcursor import EventCursor

# Device events that name a machine by MAC, and by relay channel.
_BY_MAC = ("dhcp",)
_BY_CHANNEL = ("power", "watchdog")


def _unanswered(e: DeviceError) -> bool:
    """Whether a request may not have reached the device (no answer, the link down, a
    restart): worth trying again, unlike the device's own no (refused, badreq, unknown) or a
    bug of its (internal), which the same request would only meet again."""
    return e.code not in ("refused", "badreq", "unknown", "internal")


class PowerTargetError(ValueError):
    """A power request that names no machine or channel the site and device know."""


class PowerHeld(DeviceError):
    """A power-on refused because power is held (bastion.ups: a power cut)."""


def read_status(link: DeviceLink, **kw: Any) -> dict[str, Any]:
    """The device's whole `status`: the sections that did not fit its reply frame (named in
    `partial`: node watches, consoles) asked for one at a time (docs/serial-protocol.md)."""
    status = link.request("status", **kw)
    parts = status.pop("partial", None)
    for part in parts if isinstance(parts, list) else ():
        if isinstance(part, str):
            status[part] = link.request("status", only=part, **kw).get(part)
    return status


def is_channel_number(target: str) -> bool:
    """Whether a power target names a relay channel by number: ASCII digits only (str.isdigit
    also takes '²' and fullwidth digits, which int() refuses or reads as another channel)."""
    return target.isascii() and target.isdigit()


class DeviceHub:
    def __init__(
        self,
        port: str,
        site: Callable[[], Site],
        record: Callable[..., int],
        link: DeviceLink | None = None,
        consoles: ConsoleLogs | None = None,
        cursors: EventCursor | None = None,
    ):
        self.port = port
        self._site = site
        self._record = record
        self._cursors = cursors  # where the event cursor outlives this process
        self._kept_cursor = cursors.get() if cursors is not None else None
        self.link = link or DeviceLink(port, cursor=self._kept_cursor)
        self.link.on_event(self._on_event)
        self.link.on_resync(self._on_resync)
        self.consoles = consoles  # the nodes' console logs (bastion.device.consoles)
        self.link.on_console(self._on_console)
        self._lock = threading.Lock()
        self.resyncs = 0
        self._beats: set[int] = set()  # channels that sent a heartbeat since the last forward
        # The watches: what the device says it watches is the truth, not what this process
        # asked (it forgets at a restart, and an answer may be lost). One reconciliation at a
        # time, suspend_watch's included, so none re-watches what another just took off.
        self._watch_lock = threading.Lock()
        self._watching: set[int] = set()  # channels the device watched after the last one
        self._asked: dict[int, tuple[int, int]] = {}  # channel -> (timeout_ms, boot_ms) we set
        self._watch_again = False  # the last one had no answer somewhere: the beat pump retries
        self._unwatched: set[int] = set()  # channels kept out of the watchdog (bastion.ups)
        # While this says why (bastion.ups: a power cut), power-ons are refused.
        self.power_hold: Callable[[], str | None] | None = None
        self._stop = threading.Event()
        self._pump: threading.Thread | None = None
        self.beats_forwarded = 0

    def start(self) -> DeviceHub:
        self.link.start()
        self._pump = threading.Thread(target=self._forward_beats, name="device-beats",
                                      daemon=True)
        self._pump.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self.link.close()
        if self._pump is not None:
            self._pump.join(timeout=5)
        self._keep_cursor()

    def _keep_cursor(self) -> None:
        if self._cursors is None:
            return
        cursor = self.link.cursor()
        if cursor is None or cursor == self._kept_cursor:
            return
        try:
            self._cursors.put(cursor)
            self._kept_cursor = cursor
        except sqlite3.Error:  # a full disk, a locked file: the next pass tries again
            pass

    # --- the node watchdog: heartbeats go to the device in batches -----------------------
    BEAT_EVERY_S = 2.0  # also the controller's keepalive: the device judges nodes only
    #                     while the controller is in contact (firmware/watchdog.py)

    def heartbeat(self, mac: str | None, uuid: str | None = None) -> str | None:
        """A node's heartbeat: queued for the device. The machine is found as its boot requests
        found it: by its MAC, else, for a machine declared by its UUID alone (no mac:), by the
        UUID the beat carries. Returns the machine's name, or None when the site does not watch
        it (no such machine, no relay or no heartbeat: setting)."""
        site = self._site()
        m = site.machine_by_mac(mac)
        if m is None and uuid:
            uuid = uuid.lower()  # RFC 4122: UUIDs compare without case; machines.yaml's are lower
            m = next((x for x in site.machines if x.mac is None and x.uuid == uuid), None)
        if m is None or m.relay is None or m.heartbeat is None:
            return None
        with self._lock:
            self._beats.add(m.relay)
        return m.name

    def _watched(self) -> bool:
        return any(m.relay is not None and m.heartbeat is not None
                   for m in self._site().machines)

    def _forward_beats(self) -> None:
        while not self._stop.wait(self.BEAT_EVERY_S):
            self._keep_cursor()  # the pump's pace: see EventCursor
            with self._lock:
                beats, self._beats = sorted(self._beats), set()
                again = self._watch_again
            if again and self.link.ready:
                self._watch_all(self.link)
            if not beats and not self._watched():
                continue  # nothing watched: no keepalive chatter for the device to handle
            if not self.link.ready:
                continue  # the device forgets nothing that matters: beats resume on resync
            try:
                self.link.request("beat", channels=beats, timeout=5)
                self.beats_forwarded += len(beats)
            except DeviceError:
                pass

    def site_changed(self) -> None:
        """The site was reloaded: bring the device's watches in line with it (new, changed
        and removed heartbeat: settings), off the caller's thread."""
        if self.link.ready:
            threading.Thread(target=self._watch_all, args=(self.link,), daemon=True).start()

    def _watch_all(self, link: DeviceLink) -> None:
        """Bring the device's watches in line with the site, less the channels kept out
        (suspend_watch), against the list the device itself reports (`status` `nodes`): what a
        controller before a restart set up, or an unwatch whose answer was lost, is taken off
        too. A request that got no answer leaves the work for the beat pump to do again."""
        with self._watch_lock:
            done = self._reconcile(link)
        with self._lock:
            self._watch_again = not done

    def _reconcile(self, link: DeviceLink) -> bool:
        """One pass of _watch_all, under its lock; False when something is left to do."""
        try:
            nodes = link.request("status", only="nodes", timeout=5).get("nodes")
        except DeviceError as e:
            return not _unanswered(e)
        # {"2": {"timeout_ms": ...}}: firmware/watchdog.NodeWatch.status
        on_device = {int(ch): n.get("timeout_ms") for ch, n in nodes.items()
                     if isinstance(ch, str) and is_channel_number(ch) and isinstance(n, dict)
                     } if isinstance(nodes, dict) else {}  # fmt: skip
        done = True
        for ch in sorted(set(on_device) - self._wanted()):
            try:
                link.request("unwatch", channel=ch, timeout=5)
                del on_device[ch]
                self._asked.pop(ch, None)
            except DeviceError as e:
                done = done and not _unanswered(e)
        for m in self._site().machines:
            # looked up again for each: a suspend_watch that came meanwhile waits for this pass
            # and then takes off what it names, but what is not yet watched stays so
            if m.relay is None or m.heartbeat is None or m.relay not in self._wanted():
                continue
            timeout_ms, boot_ms = m.heartbeat[0] * 1000, m.heartbeat[1] * 1000
            # Watching again restarts the node's judgement (it counts as booted only from its
            # next beat): a node watched as we would watch it is left alone. The device does
            # not report boot_ms, so only a watch this process set counts as the same.
            same = (timeout_ms, boot_ms)
            if on_device.get(m.relay) == timeout_ms and self._asked.get(m.relay) == same:
                continue
            try:
                link.request("watch", channel=m.relay, timeout_ms=timeout_ms, boot_ms=boot_ms,
                             timeout=5)  # fmt: skip
                on_device[m.relay] = timeout_ms
                self._asked[m.relay] = (timeout_ms, boot_ms)
            except DeviceError as e:
                done = done and not _unanswered(e)
                if not (self._watch_again and _unanswered(e)):  # once, not at every retry
                    self._record("device", source="controller", machine=m.name,
                                 payload={"error": f"cannot watch {m.name}: {e}"})
        with self._lock:
            self._watching = set(on_device)
        return done

    def _wanted(self) -> set[int]:
        with self._lock:
            unwatched = set(self._unwatched)
        return {m.relay for m in self._site().machines
                if m.relay is not None and m.heartbeat is not None} - unwatched

    def suspend_watch(self, channels: set[int]) -> None:
        """Keep `channels` out of the device's node watchdog (nodes told to shut down stop
        beating; the watchdog must not power-cycle them back on) until `resume_watch`. Holds
        across resyncs, and when called before the link is up (a controller restarted in a
        power cut), the first resync takes off what the device still watches."""
        with self._lock:
            self._unwatched |= set(channels)
        if self.link.ready:
            self._watch_all(self.link)

    def resume_watch(self) -> None:
        with self._lock:
            self._unwatched = set()
        if self.link.ready:
            threading.Thread(target=self._watch_all, args=(self.link,), daemon=True).start()

    # --- what the device says ------------------------------------------------------------
    def _machine_for(self, ev: dict) -> tuple[str | None, str | None]:
        site = self._site()
        kind = ev.get("ev")
        mac = None
        if kind in _BY_MAC and isinstance(ev.get("mac"), str):
            try:
                mac = match.parse_mac(ev["mac"])
            except match.Malformed:
                mac = None
        if mac is not None:
            m = site.machine_by_mac(mac)
            return mac, m.name if m else None
        if kind in _BY_CHANNEL and isinstance(ev.get("ch"), int):
            for m in site.machines:
                if m.relay == ev["ch"]:
                    return m.mac, m.name
        return None, None

    def _on_event(self, ev: dict) -> None:
        kind = str(ev.get("ev") or "device")
        mac, machine = self._machine_for(ev)
        payload = {k: v for k, v in ev.items() if k != "ev"}
        self._record(kind, source="device", mac=mac, machine=machine, payload=payload)

    def _on_resync(self, link: DeviceLink) -> None:
        with self._lock:
            self.resyncs += 1
        # A (re)started device knows no watches, and one that did not restart may keep some
        # the site no longer has: bring them in line (off this, the reader's, thread).
        threading.Thread(target=self._watch_all, args=(link,), daemon=True).start()
        info = link.info or {}
        self._record(
            "device",
            source="device",
            payload={"state": "connected", "port": self.port, "boot": info.get("boot"),
                     "fw": info.get("fw"), "board": info.get("board")},
        )

    def _on_console(self, c: ConsoleData) -> None:
        if self.consoles is None:
            return
        name = self.machine_on(c.ch) or f"channel{c.ch}"
        self.consoles.feed(name, c.ch, c.boot, c.at, c.data, connection=c.connection)

    def machine_on(self, ch: int) -> str | None:
        """The machine the site powers from relay channel ch (so whose console that is)."""
        for m in self._site().machines:
            if m.relay == ch:
                return m.name
        return None

    def console_channel(self, machine: str) -> int:
        """The console channel of a machine: its relay channel, if the device has a console
        wired there (its hello's `consoles`). Raises PowerTargetError."""
        ch, _ = self.channel_for(machine)
        consoles = (self.link.info or {}).get("consoles")
        wired = [c.get("cons") for c in consoles if isinstance(c, dict)] if isinstance(consoles, list) else []
        if self.link.info is not None and ch not in wired:
            raise PowerTargetError(
                f"the device has no console wired to {machine!r} (relay channel {ch}); "
                f"its consoles: {wired or 'none'}"
            )
        return ch

    def console_write(self, machine: str, data: bytes) -> int:
        """Type data into a machine's console (blocking: cin requests, flow-controlled by the
        device). Raises PowerTargetError, DeviceError, TimeoutError."""
        return console_writer(self.link.request, self.console_channel(machine))(data)

    # --- what the controller asks -------------------------------------------------------
    def channel_for(self, target: str | int) -> tuple[int, str | None]:
        """(relay channel, machine name or None) for a machine name or a channel number."""
        if isinstance(target, int) or is_channel_number(target):
            ch = int(target)
            for m in self._site().machines:
                if m.relay == ch:
                    return ch, m.name
            return ch, None
        m = self._site().machine(target)
        if m is None:
            raise PowerTargetError(f"no machine {target!r} in the site")
        if m.relay is None:
            raise PowerTargetError(
                f"machine {target!r} has no relay channel (set relay: in machines.yaml)"
            )
        return m.relay, m.name

    def power(self, target: str | int, state: str, off_ms: int | None = None,
              source: str = "api") -> dict[str, Any]:  # fmt: skip
        """Switch a machine's relay; the device's reply (its channel status). Raises
        PowerTargetError, or DeviceError with the device's own words (interlocks). `source`:
        who asked (`api`: a person; `operator`: bastion.operator), in the power_request event."""
        if state not in ("on", "off", "cycle"):
            raise PowerTargetError(f"state {state!r}: expected on, off or cycle")
        ch, name = self.channel_for(target)
        held = self.power_hold() if self.power_hold is not None and state != "off" else None
        if held and source != "ups":
            self._record("power_request", source=source, machine=name,
                         payload={"channel": ch, "state": state, "result": None, "refused": held})
            raise PowerHeld(f"power {state} refused: {held}")
        args: dict[str, Any] = {"channel": ch, "state": state}
        if off_ms is not None:
            args["off_ms"] = off_ms
        reply = self.link.request("power", **args)
        self._record("power_request", source=source, machine=name,
                     payload={"channel": ch, "state": state, "result": reply.get("channel")})
        return {"machine": name, "channel": reply.get("channel")}

    def channels(self) -> list[dict] | None:
        """The device's relay channels as its `status` reports them (each a dict with an int
        `ch`), or None when the link is down or the device does not answer."""
        if not self.link.ready:
            return None
        try:
            st = self.link.request("status", timeout=5)
        except DeviceError:
            return None
        power = st.get("power")
        if not isinstance(power, list):  # a device that does not say (or says nonsense)
            return None
        return [c for c in power if isinstance(c, dict) and isinstance(c.get("ch"), int)]

    def describe(self) -> dict[str, Any]:
        """What `bastion status` and the dashboard show: link state, device info, live status."""
        link = self.link
        out: dict[str, Any] = {
            "port": self.port,
            "connected": link.ready,
            "last_error": link.last_error,
            "info": link.info,
            "link": link.counters(),
            "hub": {"resyncs": self.resyncs, "beats_forwarded": self.beats_forwarded},
        }
        if link.ready:
            try:
                out["status"] = read_status(link, timeout=5)
                out["counters"] = link.request("counters", timeout=5).get("counters")
            except DeviceError as e:
                out["last_error"] = str(e)
        return out
