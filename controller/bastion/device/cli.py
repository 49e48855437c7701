"""`bastion power`, `bastion status`, `bastion console`, `bastion device info`.

Each command talks to the device either through a running controller (`--url`, which holds
the serial line when started with `serve --device`) or straight over the serial line
(`--port`), for a device with no controller attached. One program should own the line at a
time: with a controller running, use --url.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from bastion.client import ApiClient, ApiError, printable, segment
from bastion.clitypes import FiniteRange
from firmware.power import MAX_OFF_MS


def _where(f):
    f = click.option("--url", envvar="BASTION_URL", metavar="URL",
                     help="A running controller, e.g. http://127.0.0.1:8080 [$BASTION_URL].")(f)
    f = click.option("--port", envvar="BASTION_DEVICE", metavar="PORT",
                     help="The device's serial line instead (/dev/ttyACM0, the sim board's "
                          "PTY) [$BASTION_DEVICE].")(f)
    f = click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path),
                     help="The management API token (else $BASTION_API_TOKEN[_FILE]).")(f)
    return f


def _link(port: str):
    from bastion.device.link import DeviceLink, DeviceTimeout

    try:
        return DeviceLink.connect(port, wait_s=10)
    except DeviceTimeout as e:
        raise click.ClickException(str(e)) from None


def _need_one(url: str | None, port: str | None) -> str | None:
    """Checks that exactly one way to the device was given; returns the port to use. A port
    from $BASTION_DEVICE (which is also `serve --device`) gives way to an explicit --url."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    if url and port and ctx.get_parameter_source("port") == ParameterSource.ENVIRONMENT:
        port = None
    if bool(url) == bool(port):
        raise click.UsageError("give --url (a running controller) or --port (the serial line)")
    return port


@click.command("power")
@click.argument("state", type=click.Choice(["on", "off", "cycle"]))
@click.argument("target")
@click.option("--off-ms", type=click.IntRange(0, MAX_OFF_MS),
              help="Off time of a cycle in ms (at least the channel's minimum, at most an hour).")
@_where
def power(state, target, off_ms, url, port, token_file) -> None:
    """Switch TARGET's power: a machine name (its relay: in machines.yaml) or, with --port or
    as a number, a relay channel. The device refuses what its interlocks forbid (cycling
    faster than a channel's minimum off time, cycle storms) and says why. Through a
    controller, the machine is then held: its operator leaves it alone until
    `bastion machine release NAME`."""
    from bastion.device.hub import is_channel_number
    from bastion.device.link import DeviceError

    port = _need_one(url, port)
    if off_ms is not None and state != "cycle":
        raise click.UsageError(f"--off-ms is the off time of a cycle: not for {state}")
    body: dict[str, Any] = {"state": state}
    if off_ms is not None:
        body["off_ms"] = off_ms
    if url:
        api = ApiClient.connect(url, token_file)
        path = (f"/api/v1/device/power/{target}" if is_channel_number(target)
                else f"/api/v1/machines/{segment(target)}/power")
        r = api.call("POST", path, json=body)
        ch = r.get("channel") or {}
    else:
        if not is_channel_number(target):
            raise click.UsageError("with --port, TARGET is a relay channel number "
                                   "(machine names need the site: use --url)")
        link = _link(port)
        try:
            r = link.request("power", channel=int(target), state=state,
                             **({"off_ms": off_ms} if off_ms is not None else {}))
        except DeviceError as e:
            raise click.ClickException(str(e)) from None
        finally:
            link.close()
        ch = r.get("channel") or {}
    click.echo(f"{target}: channel {ch.get('ch')} ({ch.get('name')}) desired {ch.get('desired')}, "
               f"output {ch.get('output')}" + (" (waiting its turn)" if ch.get("queued") else "")
               + (" (cycling)" if ch.get("cycling") else ""))
    if url and r.get("held"):
        name = r.get("machine") or target
        click.echo(f"{name}: held: the operator leaves it alone until `bastion machine release "
                   f"{name}`")


def _device_view(url, port, token_file) -> dict[str, Any]:
    if url:
        return ApiClient.connect(url, token_file).call("GET", "/api/v1/device")
    link = _link(port)
    try:
        from bastion.device.hub import read_status
        from bastion.device.link import DeviceError

        view: dict[str, Any] = {"port": port, "connected": True, "info": link.info}
        try:
            view["status"] = read_status(link)
            view["counters"] = link.request("counters").get("counters")
        except DeviceError as e:
            view["last_error"] = str(e)
        view["link"] = link.counters()
        return view
    finally:
        link.close()


@click.command("status")
@_where
@click.option("--json", "as_json", is_flag=True, help="The whole view as JSON.")
def status(url, port, token_file, as_json) -> None:
    """The device: link, firmware, relay channels, tasks, heap and counters."""
    from rich.console import Console
    from rich.table import Table

    port = _need_one(url, port)
    view = _device_view(url, port, token_file)
    if as_json:
        click.echo(json.dumps(view, indent=2))
        return
    out = Console()
    info = view.get("info") or {}
    state = "connected" if view.get("connected") else f"NOT connected ({view.get('last_error')})"
    out.print(f"device on {view.get('port')}: {state}")
    if info:
        out.print(f"firmware {info.get('fw')} on board {info.get('board')}, boot {info.get('boot')}, "
                  f"protocol {info.get('proto')}")
    st = view.get("status") or {}
    if st:
        t = Table("ch", "name", "desired", "output", "note", title="relays")
        power = st.get("power")
        for c in power if isinstance(power, list) else []:
            if not isinstance(c, dict):  # (a device that says nonsense: not a traceback)
                continue
            note = "queued" if c.get("queued") else ("cycling" if c.get("cycling") else "")
            t.add_row(*(str(c.get(k)) for k in ("ch", "name", "desired", "output")), note)
        out.print(t)
        tasks = dict(st.get("tasks") or {}) if isinstance(st.get("tasks"), dict) else {}
        tripped = tasks.pop("tripped", None)
        out.print("tasks (ms since check-in): " + ", ".join(f"{k} {v}" for k, v in tasks.items())
                  + (f"  WATCHDOG TRIPPED by {tripped}" if tripped else ""))
        heap = st.get("heap") if isinstance(st.get("heap"), dict) else {}
        # `used` is read without a collection (garbage included), `peak` after one (live data):
        # shown as they are, "peak 85216, used 120608" read as a contradiction
        names = {"used": "allocated now (garbage included)", "peak": "live peak"}
        out.print("heap: " + ", ".join(f"{names.get(k, k)} {v}" for k, v in heap.items()))
        nodes = st.get("nodes") or {}
        if nodes:
            out.print("node watchdog: " + json.dumps(nodes))
        consoles = [c for c in st.get("consoles") or () if isinstance(c, dict)]
        if consoles:  # what the device dropped was only in --json
            out.print("node consoles: " + ", ".join(
                f"ch {c.get('cons')} rx {c.get('rx')} sent {c.get('sent')} dropped {c.get('dropped')}"
                for c in consoles))  # fmt: skip
    counters = view.get("counters") or {}
    if counters:
        out.print("counters: " + ", ".join(f"{k}={v}" for k, v in sorted(counters.items()) if v))


@click.group("device")
def device_group() -> None:
    """The device itself."""


@device_group.command("info")
@_where
def device_info(url, port, token_file) -> None:
    """What the device says about itself in its hello: firmware, board, boot id, channels."""
    port = _need_one(url, port)
    view = _device_view(url, port, token_file)
    info = view.get("info")
    if not info:
        raise click.ClickException(f"no answer from the device ({view.get('last_error')})")
    for k in ("fw", "board", "boot", "proto", "channels", "uptime_ms"):
        if k in info:
            click.echo(f"{k}: {info[k]}")


@click.command("console")
@click.argument("name", required=False)
@_where
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line (events).")
@click.option("--log", "show_log", is_flag=True,
              help="Print NAME's kept console log (from the controller) and leave.")
@click.option("--tail", type=click.IntRange(min=1), metavar="BYTES",
              help="With --log: only its last BYTES bytes.")
@click.option("--after-eof", type=FiniteRange(0, 86400), default=3.0, show_default=True, metavar="SECONDS",
              help="When stdin is not a terminal: how long to keep showing the output after "
                   "its end (0 to 86400).")  # fmt: skip
def console(name, url, port, token_file, as_json, show_log, tail, after_eof) -> None:
    """NAME's serial console through the device, or without NAME the device's live events.

    With NAME (a machine; with --port its relay channel number): the node's console in this
    terminal, like `virsh console`: raw keys to the node, Ctrl-] to leave. When stdin is not a
    terminal its bytes are typed in, and the output is shown until --after-eof seconds after
    its end. --log prints the log the controller keeps instead (docs/consoles.md).

    Without NAME: live device events (dhcp, tftp, power, watchdog, boot, heap) until Ctrl-C."""
    port = _need_one(url, port)
    if name is not None:
        from bastion.device import termcons
        from bastion.device.session import DeviceError  # (link's, without importing pyserial)

        try:
            if show_log:
                if port:
                    raise click.UsageError("--log reads the controller's log: give --url")
                api = ApiClient.connect(url, token_file)
                params = {"tail": tail} if tail else {}
                data = api.call_bytes("GET", f"/api/v1/machines/{segment(name)}/console", params=params)
                sys.stdout.buffer.write(data)
                sys.stdout.buffer.flush()
                return
            if port:
                termcons.via_link(port, name, after_eof)
            else:
                token = ApiClient.connect(url, token_file).token
                termcons.via_controller(url, token, name, after_eof)
        except (termcons.Closed, DeviceError) as e:
            raise click.ClickException(f"console {name}: {e}") from None
        except ApiError as e:
            raise click.ClickException(str(e)) from None
        if sys.stdin.isatty():
            click.echo("\r\n[bastion: left the console]", err=True)
        return

    def show(ev: dict) -> None:
        if as_json:
            click.echo(json.dumps(ev))
            return
        kind = ev.get("ev") or ev.get("kind")
        rest = {k: v for k, v in (ev.get("payload") or ev).items()
                if k not in ("ev", "boot", "seq", "t")}
        click.echo(printable(f"{time.strftime('%H:%M:%S')} {kind:<8} " +
                             " ".join(f"{k}={v}" for k, v in rest.items())))  # fmt: skip
        sys.stdout.flush()

    try:
        if port:
            link = _link(port)
            link.on_event(show)
            try:
                while True:
                    time.sleep(1)
            finally:
                link.close()
        api = ApiClient.connect(url, token_file)
        last = None
        first = api.call("GET", "/api/v1/events", params={"limit": 1})
        last = first[0]["id"] if first else 0
        while True:
            batch = api.call("GET", "/api/v1/events", params={"after": last, "limit": 200})
            for e in batch:
                last = max(last, e["id"])
                if e.get("source") == "device":
                    show(e)
            time.sleep(1)
    except KeyboardInterrupt:
        pass


COMMANDS = (power, status, console, device_group)
