"""`bastion serve`, `bastion events`, `bastion site check` and `bastion install-service`: the boot
service's commands.

Runnable on its own too: `python -m bastion.serve_cli serve --site DIR`.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import click

from bastion.client import printable
from bastion.settings import (
    DB_SHOWN,
    Settings,
    SettingsError,
    default_db_path,
    proxy_problems,
    secrets_option,
    serve_options,
)


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

    from bastion.api import boot as boot_api
    from bastion.api import consoles, httpserver
    from bastion.api.main import create_app
    from bastion.settings import token_file_exposure
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
    # bound before anything starts (the site, the history, the device's line), so that an
    # address that cannot be had is one clear error naming the option; with two listeners, one
    # server: the application tells them apart (bastion.api.listeners)
    sockets: list = []
    try:
        sockets.append(httpserver.bind_listener(settings.listen, "--listen"))
        if settings.management_listen is not None:
            sockets.append(httpserver.bind_listener(settings.management_listen, "--management-listen",
                                                    settings.management_interface))  # fmt: skip
    except httpserver.ListenerError as e:
        for sock in sockets:
            sock.close()
        raise click.ClickException(str(e)) from None
    try:
        app = create_app(settings)
    except SiteError as e:
        click.echo("\n".join(e.report(site_dir)), err=True)
        sys.exit(2)
    site = app.state.runtime.holder.site
    # a trusted entry holding a machine's address failed the site's load (create_app's holder)
    _, proxy_warnings = proxy_problems(settings.trusted_proxies, site.machines)
    tftp_at = "{}:{}".format(*settings.tftp_listen) if settings.tftp_listen else "off"
    if settings.management_listen is None:
        http_at = f"HTTP {host}:{port} (boot and management)"
    else:
        http_at = "HTTP boot {}:{}, management {}:{}".format(*settings.listen, *settings.management_listen)
        if settings.management_interface:
            http_at += f" on {settings.management_interface} only"
    click.echo(
        f"site {site.name!r}: {len(site.machines)} machines, {len(site.profiles)} profiles, "
        f"{len(site.groups)} groups; events in {app.state.runtime.store.path}; "
        f"management API {'enabled' if settings.api_token else 'disabled (no token)'}; "
        f"device {settings.device_port or 'none'}; "
        f"{http_at}; "
        f"TFTP {tftp_at}; "
        f"HTTP connections at most {max_connections} (descriptor limit {nofile})",
        err=True,
    )
    for warning in [*site.warnings, *proxy_warnings]:
        click.echo(f"warning: {warning}", err=True)
    exposed = token_file_exposure(settings.api_token_file) if settings.api_token_file else None
    if exposed:
        click.echo(f"warning: {exposed}", err=True)
    if site.settings.networks is not None:
        nets = site.settings.networks
        unserved = nets.management_unserved(settings.management_listen)
        for problem in [*nets.listener_problems(settings.listen, settings.management_listen),
                        *([unserved] if unserved else [])]:  # fmt: skip
            click.echo(f"warning: {problem}", err=True)
    if settings.management_listen is not None and settings.management_interface is None:
        click.echo("warning: without --management-interface the management listener takes "
                   "connections to its address arriving on any interface: a machine on the PXE "
                   "LAN that routes the management subnet through this host reaches it "
                   "(docs/network.md)", err=True)  # fmt: skip
    if max_connections < settings.max_connections:
        click.echo(f"warning: --max-connections {settings.max_connections} lowered to "
                   f"{max_connections} to fit the descriptor limit {nofile}", err=True)  # fmt: skip
    metrics = app.state.runtime.metrics
    bounds = httpserver.ConnectionBounds(max_connections, settings.header_timeout, settings.body_timeout,
                                         settings.send_timeout)  # fmt: skip
    protocol = httpserver.bounded_protocol(
        bounds, lambda reason: metrics.connections_closed.labels(reason=reason).inc(),
        fast=boot_api.fast_app(app.state.runtime),
    )
    # httptools as uvicorn would pick, with GRUB's fixes (grubcompat) and the connection bounds
    # (httpserver); the access log without tokens
    options = {"log_level": log_level, "access_log": access_log, "http": protocol,
               "timeout_keep_alive": httpserver.KEEP_ALIVE_S, "log_config": httpserver.log_config(),
               # X-Forwarded-For names a request's address only from a proxy named so: uvicorn
               # believed any local process's (127.0.0.1), which could then pass a one-time
               # Ignition URL's address check as any machine
               "proxy_headers": settings.trusted_proxies is not None,
               "forwarded_allow_ips": settings.trusted_proxies or "",
               # the console's WebSocket: a token message and keystrokes, not uvicorn's 16 MiB
               # frames (bastion.api.consoles)
               "ws_max_size": consoles.MAX_MESSAGE_BYTES, "ws_max_queue": consoles.MAX_QUEUED_MESSAGES}  # fmt: skip
    # What start-up made (the application, the site, the modules: most of the heap) lives as
    # long as the process: out of the collector's way, so that its full collections scan only
    # what came since. Each took 35-50 ms with all of it (docs/benchmarks-http.md), stalling
    # every request in flight; a cycle among these objects, dropped later, is not reclaimed.
    gc.collect()
    gc.freeze()
    uvicorn.Server(uvicorn.Config(app, **options)).run(sockets=sockets)


def _format_event(e: dict) -> str:
    when = datetime.fromtimestamp(e["ts"]).strftime("%Y-%m-%d %H:%M:%S")
    who = e.get("machine") or e.get("mac") or "-"
    what = e.get("endpoint") or ""
    status = e.get("status")
    extra = {k: v for k, v in (e.get("payload") or {}).items() if k not in ("query",)}
    detail = " ".join(f"{k}={v}" for k, v in extra.items())
    prof = f"profile={e['profile']}" if e.get("profile") else ""
    return printable("  ".join(
        x for x in (f"{e['id']:>6}", when, f"{e['kind']:<8}", who, what, str(status or ""), prof, detail) if x
    ))  # fmt: skip


@click.command("events")
@click.option("--site", "site_dir", envvar="BASTION_SITE",
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Read this site's history, where `bastion serve --site` keeps it "
                   f"({DB_SHOWN}) [$BASTION_SITE].")  # fmt: skip
@click.option("--db", "db_path", envvar="BASTION_DB", type=click.Path(dir_okay=False, path_type=Path),
              help="Read this database instead [$BASTION_DB].")  # fmt: skip
@click.option("--url", envvar="BASTION_URL",
              help="Read from a running controller instead, e.g. http://127.0.0.1:8080 "
                   "[$BASTION_URL].")
@click.option("-n", "--limit", default=50, show_default=True, type=click.IntRange(0, 10000),
              help="How many (newest) events; with -f, 0 shows only new ones.")  # fmt: skip
@click.option("--kind", help="Only this kind: boot, callback, site, dhcp, tftp, power, ...")
@click.option("--mac", help="Only this machine's MAC.")
@click.option("--machine", help="Only this machine (name from machines.yaml).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new events.")
def events(site_dir, db_path, url, limit, kind, mac, machine, as_json, follow) -> None:
    """Show the event history: boot requests, callbacks, reloads, device events."""
    filters = {"kind": kind, "mac": mac, "machine": machine}
    from click.core import ParameterSource

    ctx = click.get_current_context()
    if url and ctx.get_parameter_source("url") == ParameterSource.ENVIRONMENT and any(
            ctx.get_parameter_source(p) == ParameterSource.COMMANDLINE for p in ("site_dir", "db_path")):  # fmt: skip
        url = None  # $BASTION_URL (exported for the device commands) gives way to --site or --db

    if url:
        from bastion.client import ApiClient

        api = ApiClient(url, timeout=10)  # the events are open reads: no token

        def fetch(after: int | None, n: int) -> list[dict]:
            params = {k: v for k, v in {**filters, "limit": n, "after": after}.items() if v is not None}
            got = api.call("GET", "/api/v1/events", params=params)
            # newest first, an answer holds at most ~4 MiB (large events: fewer than n); the
            # rest is asked for before the oldest one answered, until none is left
            while after is None and 0 < len(got) < n:
                more = api.call("GET", "/api/v1/events",
                                params={**params, "limit": n - len(got), "before": got[-1]["id"]})  # fmt: skip
                if not more:
                    break
                got += more
            return got
    else:
        from bastion import match
        from bastion.state.events import NotAHistory, open_readonly

        if db_path is None and site_dir is None:
            raise click.UsageError("which history? give --site DIR (or $BASTION_SITE), --db FILE "
                                   "or --url URL")  # fmt: skip
        if db_path is None:
            from bastion.site.load import site_name

            db_path = default_db_path(site_name(site_dir), site_dir)
        path = db_path
        try:
            store = open_readonly(path)
        except (FileNotFoundError, NotAHistory) as e:
            raise click.ClickException(str(e)) from None
        if mac:
            try:
                filters["mac"] = match.parse_mac(mac)
            except match.Malformed as e:
                raise click.BadParameter(str(e), param_hint="--mac") from None

        def fetch(after: int | None, n: int) -> list[dict]:
            return [e.as_dict() for e in store.query(limit=n, after=after, **filters)]

    def show(batch: list[dict]) -> None:
        for e in batch:
            click.echo(json.dumps(e) if as_json else _format_event(e))

    # newest first; at least one, to follow from the newest (-n 0 -f fetched none, then
    # followed from id 0 asking for 0 at a time: it never printed anything)
    first = fetch(None, max(limit, 1))
    last = first[0]["id"] if first else 0
    batch = first[:limit]
    batch.reverse()  # oldest first on screen
    show(batch)
    while follow:
        time.sleep(1)
        while True:  # everything new since, in batches
            batch = fetch(last, FOLLOW_BATCH)
            show(batch)
            if batch:
                last = batch[-1]["id"]
            if len(batch) < FOLLOW_BATCH:
                break


FOLLOW_BATCH = 1000  # events fetched at a time by `events -f`


@click.group("site")
def site_group() -> None:
    """Site directory tools."""


@site_group.command("check")
@click.argument("site_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@secrets_option
def site_check(site_dir: Path, secrets_dir: Path | None) -> None:
    """Load and validate SITE_DIR as `bastion serve` would; print every problem.

    A k3s cluster is checked against the secret store `bastion serve --secrets` reads (which
    server started it, the tunnel addresses that went out): give the service's with --secrets."""
    from bastion.site.load import SiteError, load_site

    try:
        site = load_site(site_dir, secrets=secrets_dir)
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


@click.command("install-service")
@click.option("--site", "site_dir", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The site directory the service serves.")  # fmt: skip
@click.option("--listen", default="0.0.0.0:8080", show_default=True, metavar="HOST:PORT",
              help="Where the service serves HTTP: the boot endpoints only, with "
                   "--management-listen.")  # fmt: skip
@click.option("--management-listen", metavar="HOST:PORT",
              help="Serve the management API, dashboard, metrics and docs here, an address on "
                   "the management network, e.g. 10.89.0.1:8443 (docs/network.md).")  # fmt: skip
@click.option("--management-interface", metavar="IFACE",
              help="The interface the management address is on: the management listener "
                   "takes connections arriving there only.")  # fmt: skip
@click.option("--tftp", metavar="ADDR:PORT",
              help="Also serve the site's tftp/ over TFTP, e.g. 192.168.1.10:69.")  # fmt: skip
@click.option("--device", metavar="PORT", help="The device's serial line, e.g. /dev/ttyACM0.")
@click.option("--allowed-hosts", metavar="NAMES",
              help="Host names by which browsers open the dashboard, e.g. bastion.lan "
                   "(serve's --allowed-hosts).")  # fmt: skip
@click.option("--trusted-proxies", metavar="ADDRS",
              help="Reverse proxies whose X-Forwarded-For is believed (serve's --trusted-proxies).")
@click.option("--name", default="edge-bastion", show_default=True, help="The unit's name.")
@click.option("--root", "--prefix", "root", default="/", show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Install under this directory instead of / (a package build, a test): "
                   "the files, and `systemd-sysusers --root` for the service's user; no other "
                   "command runs.")  # fmt: skip
@click.option("--no-systemctl", is_flag=True, help="Do not run `systemctl daemon-reload`.")
@click.option("--dry-run", is_flag=True, help="Print what it would do; change nothing.")
def install_service(site_dir, listen, management_listen, management_interface, tftp, device,
                    allowed_hosts, trusted_proxies, name, root, no_systemctl, dry_run) -> None:  # fmt: skip
    """Install `bastion serve` for SITE as a systemd service.

    Writes the unit (its own system user, state in /var/lib/edge-bastion, ProtectSystem=strict,
    CAP_NET_BIND_SERVICE for TFTP's port 69, the serial line through the dialout group), the
    user for systemd-sysusers, and an API token in /etc/edge-bastion/token unless one exists;
    then creates the user and reloads systemd. A site whose site.yaml has
    cluster.registry_cache.serve also gets NAME-registry-cache.service, which runs
    `bastion registry-cache run` as the same user. A site whose site.yaml has
    cluster.wireguard.controller also gets the controller host's tunnel: its private key in the
    service's secret store (made once), /etc/wireguard/<interface>.conf for wireguard-tools'
    wg-quick@<interface> unit, which the controller's unit then starts after. Prints each step
    (and the tunnel's public key, never a private one). Start it with
    `systemctl enable --now edge-bastion`.

    The site is checked first as the service will load it: its cluster against the service's
    secret store (/var/lib/edge-bastion/secrets/<site>, under --root), and --trusted-proxies
    against the machines' addresses as serve checks them.
    """
    import shutil

    from bastion import service
    from bastion.settings import parse_listen, same_listener
    from bastion.site.load import SiteError, load_site, site_name

    try:
        boot_at = parse_listen(listen, "--listen")
        if management_listen and same_listener(
            parse_listen(management_listen, "--management-listen"), boot_at
        ):
            raise SettingsError(f"--management-listen {management_listen}: the boot listener "
                                "(--listen) has that address; the management listener needs its own")  # fmt: skip
        if management_interface and not management_listen:
            raise SettingsError(f"--management-interface {management_interface}: give "
                                "--management-listen too (the address on that interface)")  # fmt: skip
        if tftp:
            parse_listen(tftp, "--tftp")
        if device and "://" not in device and not os.path.isabs(device):
            # written into the unit as given, it named a file in the service's working directory
            raise SettingsError(f"--device {device}: the service needs the serial line's absolute "
                                "path, such as /dev/ttyACM0 or /dev/serial/by-id/...")  # fmt: skip
        extra: list[str] = []
        proxies = None  # the service's --trusted-proxies, as its unit is given them
        if allowed_hosts or trusted_proxies:  # checked, and written, as serve has them
            from bastion.settings import Settings

            checked = Settings.build(site_dir=site_dir, allowed_hosts=allowed_hosts,
                                     trusted_proxies=trusted_proxies)  # fmt: skip
            if checked.allowed_hosts and allowed_hosts:
                extra += ["--allowed-hosts", checked.allowed_hosts]
            if checked.trusted_proxies and trusted_proxies:
                proxies = checked.trusted_proxies
                extra += ["--trusted-proxies", proxies]
    except SettingsError as e:
        raise click.UsageError(str(e)) from None
    site_dir = site_dir.resolve()
    root = root.absolute()
    # checked as the service will load it: its cluster against the service's secret store (the
    # installing user's own default store says nothing of what the service handed out)
    store = root / service.secrets_dir(site_name(site_dir)).lstrip("/")
    try:
        site = load_site(site_dir, secrets=store)
    except SiteError as e:
        click.echo(f"the site in {site_dir} does not load, so the service could not start:", err=True)
        for problem in e.problems:
            click.echo(f"  {problem}", err=True)
        sys.exit(1)
    # serve refuses these at start (and warns of the rest): refused here, the unit is not
    # installed to fail at every start
    proxy_errors, proxy_warnings = proxy_problems(proxies, site.machines)
    if proxy_errors:
        raise click.UsageError("; ".join(proxy_errors))
    for warning in proxy_warnings:
        click.echo(f"warning: {warning}", err=True)
    if tftp and not (site_dir / "tftp").is_dir():
        raise click.UsageError(f"--tftp {tftp}: the site has no tftp/ directory to serve")
    if site.settings.networks is not None:
        management_at = parse_listen(management_listen) if management_listen else None
        problems = site.settings.networks.listener_problems(parse_listen(listen), management_at)
        if problems:
            raise click.UsageError("; ".join(problems))
        unserved = site.settings.networks.management_unserved(management_at)
        if unserved:
            click.echo(f"note: {unserved}", err=True)
    exe = Path(sys.executable).parent / "bastion"
    if not exe.is_file():
        found = shutil.which("bastion")
        if found is None:
            raise click.ClickException("cannot find the bastion executable to run")
        exe = Path(found)
    cluster = site.settings.cluster
    cache = cluster.registry_cache if cluster is not None else None
    spec = service.ServiceSpec(site=site_dir, bastion=exe.absolute(), listen=listen,
                               management_listen=management_listen,
                               management_interface=management_interface, tftp=tftp,
                               device=device, name=name, extra=tuple(extra),
                               registry_cache=cache is not None and cache.serve is not None,
                               tunnel=_tunnel(site))  # fmt: skip
    host = root == Path("/")
    if host and not dry_run and os.geteuid() != 0:
        raise click.ClickException("installing a service needs root (or --root DIR, --dry-run)")
    try:
        steps = service.plan(spec, root, systemctl=not no_systemctl)
    except service.ServiceError as e:
        raise click.ClickException(str(e)) from None
    if dry_run:
        for step in steps:
            click.echo(f"would {step.what}" + (f": {' '.join(step.argv)}" if step.argv else ""))
        click.echo(f"\n{root / f'etc/systemd/system/{name}.service'} would be:\n")
        click.echo(service.unit_text(spec), nl=False)
        if spec.registry_cache:
            click.echo(f"\n{root / f'etc/systemd/system/{spec.cache_name}.service'} would be:\n")
            click.echo(service.cache_unit_text(spec), nl=False)
        if spec.tunnel:
            click.echo(f"\n{root / f'etc/wireguard/{spec.tunnel.interface}.conf'} would be:\n")
            click.echo(spec.tunnel.config, nl=False)
        return
    try:
        service.install(steps, spec, click.echo, host)
    except service.ServiceError as e:
        raise click.ClickException(str(e)) from None
    for part in (exe, site_dir):
        if str(part).startswith(("/home/", "/root/")):
            click.echo(f"note: {part} is under a home directory; the user {spec.user} must be "
                       "able to read it (or install the package and the site elsewhere)", err=True)  # fmt: skip
    click.echo(f"note: {spec.user} reads the site, and writes it for the management API's edits: "
               f"chown -R {spec.user}: {site_dir}", err=True)  # fmt: skip
    if host:
        click.echo(f"start it: systemctl enable --now {name}; its log: journalctl -u {name}")
        if spec.registry_cache:
            click.echo(f"the registry cache: systemctl enable --now {spec.cache_name}; its log: "
                       f"journalctl -u {spec.cache_name}")  # fmt: skip
    if spec.tunnel:
        from bastion.state.secrets import SecretError, wireguard_public_key

        key_file = root / spec.tunnel.key_file.lstrip("/")
        try:
            public = wireguard_public_key(key_file.read_text().strip())
        except SecretError as e:
            raise click.ClickException(f"{key_file}: {e}, and this is not one") from None
        click.echo(f"the tunnel: {spec.tunnel.interface}, public key {public} "
                   "(the management side's config: bastion tunnel management-config)")  # fmt: skip
        if host:
            click.echo(f"start it before the controller: systemctl enable --now {spec.tunnel.unit}")


def _tunnel(site):
    """The controller host's tunnel for the service (site.yaml cluster.wireguard.controller), its
    key in the service's secret store; None without one."""
    from bastion import service
    from bastion.cluster import tunnel
    from bastion.state.secrets import CONTROLLER_WIREGUARD_KEY, wireguard_private_key

    cluster = site.settings.cluster
    wg = cluster.wireguard if cluster is not None else None
    if wg is None or wg.controller is None:
        return None
    key_file = f"{service.secrets_dir(site.name)}/{CONTROLLER_WIREGUARD_KEY}"
    return service.Tunnel(wg.controller.interface, tunnel.controller_config(wg, site.name, key_file),
                          key_file, wireguard_private_key())  # fmt: skip


COMMANDS = (serve, events, site_group, install_service)


@click.group()
def _standalone() -> None:
    """The boot service's commands (also available as `bastion ...`)."""


for _command in COMMANDS:
    _standalone.add_command(_command)

if __name__ == "__main__":
    _standalone()
