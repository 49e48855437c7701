"""`bastion serve`, `bastion events` and `bastion site check`: the boot service's commands.

Runnable on its own too: `python -m bastion.serve_cli serve --site DIR`.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from pathlib import Path

import click

from bastion.settings import Settings, SettingsError, default_db_path, serve_options


@click.command("serve")
@serve_options
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))  # fmt: skip
@click.option("--access-log/--no-access-log", default=True, show_default=True)
def serve(log_level, access_log, **given) -> None:
    """Serve iPXE, GRUB, Ignition and assets for the site, and the management API.

    Every option but the last two can also come from its environment variable (shown with
    it); the command line wins."""
    import uvicorn

    from bastion.api import httpserver
    from bastion.api.main import create_app
    from bastion.site.load import SiteError
    from bastion.tftpd import MAX_TRANSFERS

    try:
        settings = Settings.build(**given)
    except SettingsError as e:
        raise click.UsageError(str(e)) from None
    host, port = settings.listen
    site_dir = settings.site_dir
    nofile = httpserver.raise_descriptor_limit()
    try:
        max_connections = httpserver.connection_cap(
            settings.max_connections, nofile, MAX_TRANSFERS if settings.tftp_listen else 0
        )
    except httpserver.DescriptorLimitError as e:
        raise click.ClickException(str(e)) from None
    try:
        app = create_app(settings)
    except SiteError as e:
        click.echo("\n".join(e.report(site_dir)), err=True)
        sys.exit(2)
    site = app.state.runtime.holder.site
    tftp_at = "{}:{}".format(*settings.tftp_listen) if settings.tftp_listen else "off"
    click.echo(
        f"site {site.name!r}: {len(site.machines)} machines, {len(site.profiles)} profiles, "
        f"{len(site.groups)} groups; events in {settings.db_path}; "
        f"management API {'enabled' if settings.api_token else 'disabled (no token)'}; "
        f"device {settings.device_port or 'none'}; "
        f"TFTP {tftp_at}; "
        f"HTTP connections at most {max_connections} (descriptor limit {nofile})",
        err=True,
    )
    for warning in site.warnings:
        click.echo(f"warning: {warning}", err=True)
    if max_connections < settings.max_connections:
        click.echo(f"warning: --max-connections {settings.max_connections} lowered to "
                   f"{max_connections} to fit the descriptor limit {nofile}", err=True)  # fmt: skip
    metrics = app.state.runtime.metrics
    bounds = httpserver.ConnectionBounds(max_connections, settings.header_timeout, settings.body_timeout)
    protocol = httpserver.bounded_protocol(
        bounds, lambda reason: metrics.connections_closed.labels(reason=reason).inc()
    )
    # httptools as uvicorn would pick, with GRUB's fixes (grubcompat) and the connection bounds
    # (httpserver); the access log without tokens
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=access_log,
                http=protocol, timeout_keep_alive=httpserver.KEEP_ALIVE_S,
                log_config=httpserver.log_config())  # fmt: skip


def _format_event(e: dict) -> str:
    when = datetime.fromtimestamp(e["ts"]).strftime("%Y-%m-%d %H:%M:%S")
    who = e.get("machine") or e.get("mac") or "-"
    what = e.get("endpoint") or ""
    status = e.get("status")
    extra = {k: v for k, v in (e.get("payload") or {}).items() if k not in ("query",)}
    detail = " ".join(f"{k}={v}" for k, v in extra.items())
    prof = f"profile={e['profile']}" if e.get("profile") else ""
    return "  ".join(
        x for x in (f"{e['id']:>6}", when, f"{e['kind']:<8}", who, what, str(status or ""), prof, detail) if x
    )


@click.command("events")
@click.option("--db", "db_path", envvar="BASTION_DB", type=click.Path(dir_okay=False, path_type=Path),
              help=f"Read this database [default: {default_db_path()}].")  # fmt: skip
@click.option("--url", envvar="BASTION_URL",
              help="Read from a running controller instead, e.g. http://127.0.0.1:8080 "
                   "[$BASTION_URL].")
@click.option("-n", "--limit", default=50, show_default=True, help="How many (newest) events.")
@click.option("--kind", help="Only this kind: boot, callback, site, dhcp, tftp, power, ...")
@click.option("--mac", help="Only this machine's MAC.")
@click.option("--machine", help="Only this machine (name from machines.yaml).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new events.")
def events(db_path, url, limit, kind, mac, machine, as_json, follow) -> None:
    """Show the event history: boot requests, callbacks, reloads, device events."""
    filters = {"kind": kind, "mac": mac, "machine": machine}

    if url:
        import httpx

        def fetch(after: int | None) -> list[dict]:
            params = {k: v for k, v in {**filters, "limit": limit, "after": after}.items() if v is not None}
            r = httpx.get(url.rstrip("/") + "/api/v1/events", params=params, timeout=10)
            if r.status_code != 200:
                raise click.ClickException(f"{url}: HTTP {r.status_code}: {r.text.strip()}")
            return r.json()
    else:
        from bastion import match
        from bastion.state.events import open_readonly

        path = db_path or default_db_path()
        try:
            store = open_readonly(path)
        except FileNotFoundError as e:
            raise click.ClickException(str(e)) from None
        if mac:
            try:
                filters["mac"] = match.parse_mac(mac)
            except match.Malformed as e:
                raise click.BadParameter(str(e), param_hint="--mac") from None

        def fetch(after: int | None) -> list[dict]:
            return [e.as_dict() for e in store.query(limit=limit, after=after, **filters)]

    def show(batch: list[dict]) -> None:
        for e in batch:
            click.echo(json.dumps(e) if as_json else _format_event(e))

    batch = fetch(None)
    batch.reverse()  # oldest first on screen
    show(batch)
    last = batch[-1]["id"] if batch else 0
    while follow:
        time.sleep(1)
        batch = fetch(last)
        show(batch)
        if batch:
            last = batch[-1]["id"]


@click.group("site")
def site_group() -> None:
    """Site directory tools."""


@site_group.command("check")
@click.argument("site_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
def site_check(site_dir: Path) -> None:
    """Load and validate SITE_DIR as `bastion serve` would; print every problem."""
    from bastion.site.load import SiteError, load_site

    try:
        site = load_site(site_dir)
    except SiteError as e:
        for problem in e.problems:
            click.echo(problem, err=True)
        sys.exit(1)
    for warning in site.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(
        f"site {site.name!r} OK: {len(site.machines)} machines, {len(site.profiles)} profiles, "
        f"{len(site.groups)} groups"
    )


COMMANDS = (serve, events, site_group)


@click.group()
def _standalone() -> None:
    """The boot service's commands (also available as `bastion ...`)."""


for _command in COMMANDS:
    _standalone.add_command(_command)

if __name__ == "__main__":
    _standalone()
