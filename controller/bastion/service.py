"""The controller as a systemd service: the unit, the system user, the API token, installed by
`bastion install-service`.

    unit_text(spec)          the unit file (pure: tested with systemd-analyze verify)
    cache_unit_text(spec)    the registry cache's unit, for a site that serves one
    Tunnel                   the controller host's WireGuard tunnel, for a site that gives it one:
                             its wg-quick config, run by wireguard-tools' wg-quick@ unit
    sysusers_text(spec)      the user, for systemd-sysusers (sysusers.d(5))
    plan(spec, root)         what installing means: the files and the commands, in order
    install(steps)           do them (atomic writes; commands as argv, never a shell)

The unit runs `bastion serve` as its own system user, with its state (the per-site event
history and the secret store) under StateDirectory=, /var/lib/edge-bastion, by pointing
XDG_STATE_HOME there; the nodes' console logs under CacheDirectory=, /var/cache/edge-bastion,
by BASTION_VAR_DIR (a checkout's own var/ is read-only to it); the API token in
/etc/edge-bastion/token; the filesystem read-only except the state and cache directories and
the site directory (the management API edits site files);
CAP_NET_BIND_SERVICE as its only capability, for `--tftp ADDR:69` (and HTTP below 1024); the
USB serial lines (ttyACM, ttyUSB), and --device when it is another, as its only devices, through
the dialout group; and
LimitNOFILE= as docs/controller.md "Limits" advises (2 x --max-connections + 64, + 131 with
--tftp: 4096 covers the defaults).
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from bastion import atomic

UNIT_NAME = "edge-bastion"
USER = "edge-bastion"
STATE_DIR = "/var/lib/edge-bastion"
CONFIG_DIR = "/etc/edge-bastion"
LIMIT_NOFILE = 4096
SERIAL_GROUP = "dialout"  # owns /dev/ttyACM* and /dev/ttyUSB* on Debian


class ServiceError(Exception):
    pass


def secrets_dir(site_name: str) -> str:
    """The secret store of the service for the site `site_name`, on the host: the unit's
    $XDG_STATE_HOME is STATE_DIR, and `bastion serve` without --secrets keeps it there."""
    return f"{STATE_DIR}/secrets/{site_name}"


@dataclass(frozen=True)
class Tunnel:
    """The controller host's tunnel to the management cluster (site.yaml
    cluster.wireguard.controller; bastion.cluster.tunnel renders `config`)."""

    interface: str
    config: str  # /etc/wireguard/<interface>.conf: its PostUp reads key_file
    key_file: str  # the private key in the service's secret store (absolute, on the host)
    new_key: str = field(repr=False)  # written to key_file only when there is none

    @property
    def unit(self) -> str:
        return f"wg-quick@{self.interface}.service"


@dataclass(frozen=True)
class ServiceSpec:
    site: Path  # absolute
    bastion: Path  # the bastion executable the unit runs (absolute)
    listen: str = "0.0.0.0:8080"
    management_listen: str | None = None  # HOST:PORT: the boot endpoints alone on `listen`
    management_interface: str | None = None  # the interface management_listen's address is on
    tftp: str | None = None  # ADDR:PORT
    device: str | None = None  # /dev/ttyACM0
    name: str = UNIT_NAME
    user: str = USER
    extra: tuple[str, ...] = field(default_factory=tuple)  # more `bastion serve` options
    registry_cache: bool = False  # site.yaml cluster.registry_cache.serve: its unit too
    tunnel: Tunnel | None = None  # site.yaml cluster.wireguard.controller

    @property
    def cache_name(self) -> str:
        return f"{self.name}-registry-cache"

    def cache_argv(self) -> list[str]:
        return [str(self.bastion), "registry-cache", "run", "--site", str(self.site)]

    @property
    def token_file(self) -> str:
        return f"{CONFIG_DIR}/token"

    def argv(self) -> list[str]:
        out = [str(self.bastion), "serve", "--site", str(self.site), "--listen", self.listen,
               "--token-file", self.token_file]  # fmt: skip
        if self.management_listen:
            out += ["--management-listen", self.management_listen]
        if self.management_interface:
            out += ["--management-interface", self.management_interface]
        if self.tftp:
            out += ["--tftp", self.tftp]
        if self.device:
            out += ["--device", self.device]
        return out + list(self.extra)


def _device_allow(device: str | None) -> str:
    """A DeviceAllow= line for --device when the two USB serial groups do not cover it: a
    board's UART (/dev/ttyAMA0, /dev/ttyS0) or a udev name for one (systemd resolves a symlink
    when the unit starts). Empty for /dev/ttyACMn and /dev/ttyUSBn, and for what is not a
    device node (a pyserial URL such as socket://HOST:PORT)."""
    if not device or not device.startswith("/dev/") or re.fullmatch(r"/dev/tty(ACM|USB)[0-9]+", device):
        return ""
    return f"DeviceAllow={device.replace('%', '%%')} rw\n"


def _exec_line(argv: list[str]) -> str:
    """ExecStart= words: systemd's quoting for spaces and quotes, % and $ doubled."""
    words = []
    for a in argv:
        a = a.replace("%", "%%").replace("$", "$$")
        if any(c.isspace() or c in "\"'\\;" for c in a):
            a = '"' + a.replace("\\", "\\\\").replace('"', '\\"') + '"'
        words.append(a)
    return " ".join(words)


# The confinement both units share, after their own file-system and device lines.
_CONFINED = """\
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service

[Install]
WantedBy=multi-user.target
"""


def _after(spec: ServiceSpec) -> str:
    if spec.tunnel is None:
        return "Wants=network-online.target\nAfter=network-online.target"
    # --listen may be the tunnel's address, which exists once wg-quick has run (docs/tunnel.md)
    return (f"# the tunnel to the management cluster first: --listen may be its address\n"
            f"Wants=network-online.target {spec.tunnel.unit}\n"
            f"After=network-online.target {spec.tunnel.unit}")  # fmt: skip


def unit_text(spec: ServiceSpec) -> str:
    return f"""\
# Written by `bastion install-service`: Edge Bastion's controller for the site in {spec.site}.
# Run `bastion install-service` again to change it (docs/controller.md, "As a service").
[Unit]
Description=Edge Bastion controller (site {spec.site.name})
{_after(spec)}

[Service]
Type=exec
User={spec.user}
Group={spec.user}
# the device's USB serial line
SupplementaryGroups={SERIAL_GROUP}
ExecStart={_exec_line(spec.argv())}
Restart=on-failure
RestartSec=5s
# the event history and the secret store: $XDG_STATE_HOME/edge-bastion/... = {STATE_DIR}/...
StateDirectory=edge-bastion
StateDirectoryMode=0700
Environment=XDG_STATE_HOME=%S
Environment=XDG_CACHE_HOME=%C
# the var dir (the nodes' console logs) here even for a bastion run from a checkout, whose own
# var/ is root's and read-only (ProtectSystem=strict)
Environment=BASTION_VAR_DIR=%C/edge-bastion
CacheDirectory=edge-bastion
ConfigurationDirectory=edge-bastion
# HTTP connections and TFTP transfers: 2 x --max-connections + 64 (+ 131 with --tftp)
LimitNOFILE={LIMIT_NOFILE}
# binding TFTP's port 69 (and HTTP below 1024), and nothing else
AmbientCapabilities=CAP_NET_BIND_SERVICE
CapabilityBoundingSet=CAP_NET_BIND_SERVICE
NoNewPrivileges=yes
UMask=0077
ProtectSystem=strict
ProtectHome=read-only
# the management API edits site files
ReadWritePaths={spec.site}
PrivateTmp=yes
DevicePolicy=closed
DeviceAllow=char-ttyACM rw
DeviceAllow=char-ttyUSB rw
{_device_allow(spec.device)}{_CONFINED}"""


def cache_unit_text(spec: ServiceSpec) -> str:
    """The registry cache's unit: `bastion registry-cache run`, beside the controller's, as the
    same user with the same state directory, so that it reads the upstream credentials from the
    controller's secret store and keeps the cached images under
    /var/lib/edge-bastion/registry-cache/<site> (docs/registry-cache.md)."""
    return f"""\
# Written by `bastion install-service`: the pull-through registry cache of the site in {spec.site}
# (site.yaml cluster.registry_cache.serve; docs/registry-cache.md).
[Unit]
Description=Edge Bastion registry cache (site {spec.site.name})
Wants=network-online.target
After=network-online.target

[Service]
Type=exec
User={spec.user}
Group={spec.user}
ExecStart={_exec_line(spec.cache_argv())}
Restart=on-failure
RestartSec=5s
# the cached images, and the secret store for upstream credentials
StateDirectory=edge-bastion
StateDirectoryMode=0700
Environment=XDG_STATE_HOME=%S
# the registries' ports, should the site choose them below 1024
AmbientCapabilities=CAP_NET_BIND_SERVICE
CapabilityBoundingSet=CAP_NET_BIND_SERVICE
NoNewPrivileges=yes
UMask=0077
ProtectSystem=strict
ProtectHome=read-only
PrivateTmp=yes
PrivateDevices=yes
{_CONFINED}"""


def sysusers_text(spec: ServiceSpec) -> str:
    return (
        "# Written by `bastion install-service`: the Edge Bastion controller's user (sysusers.d(5))\n"
        f'u {spec.user} - "Edge Bastion controller" {STATE_DIR} -\n'
        f"m {spec.user} {SERIAL_GROUP}\n"
    )


@dataclass(frozen=True)
class Step:
    what: str  # for the user: one line
    path: Path | None = None  # a file to write
    data: bytes = b""
    mode: int = 0o644
    keep: bool = False  # an existing file is kept (the API token)
    private_dirs: int = 0  # this many of its directories are made mode 0700 (a secret's)
    service_owned: bool = False  # on the host, it and those directories are the user's
    argv: tuple[str, ...] = ()  # a command to run instead


_UNIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9:_.-]{0,200}")


def plan(spec: ServiceSpec, root: Path = Path("/"), systemctl: bool = True) -> list[Step]:
    """The steps that install the service under `root` (/ for the host; a directory for a
    package build or a test, where no command runs)."""
    if not spec.site.is_absolute() or not spec.bastion.is_absolute():
        raise ServiceError("the site and the bastion executable need absolute paths")
    if not _UNIT_NAME.fullmatch(spec.name):
        raise ServiceError(f"--name {spec.name!r}: a unit name is letters, digits, ':', '_', '.' "
                           "and '-', not starting with a symbol")  # fmt: skip
    for arg in (*spec.argv(), *spec.cache_argv(), spec.user):
        if not arg.isprintable():  # a newline would start another line of the unit file
            raise ServiceError(f"{arg!r}: a control character cannot go into a unit file")
    host = root == Path("/")
    unit = root / f"etc/systemd/system/{spec.name}.service"
    sysusers = root / f"etc/sysusers.d/{spec.name}.conf"
    token = root / spec.token_file.lstrip("/")
    steps = [
        Step(f"write {unit}", unit, unit_text(spec).encode()),
        Step(f"write {sysusers}", sysusers, sysusers_text(spec).encode()),
        Step("create the user " + spec.user + " (systemd-sysusers)",
             argv=("systemd-sysusers", *(() if host else (f"--root={root}",)), str(sysusers))),
        Step(f"write {token} (a new API token, mode 0640, group {spec.user}) unless it exists",
             token, (secrets.token_urlsafe(32) + "\n").encode(), 0o640, keep=True),
    ]  # fmt: skip
    if spec.registry_cache:
        cache = root / f"etc/systemd/system/{spec.cache_name}.service"
        steps.insert(1, Step(f"write {cache}", cache, cache_unit_text(spec).encode()))
    if spec.tunnel is not None:
        t = spec.tunnel
        key = root / t.key_file.lstrip("/")
        conf = root / f"etc/wireguard/{t.interface}.conf"
        # STATE_DIR itself too: systemd keeps an existing StateDirectory='s mode (it only warns
        # that it is not StateDirectoryMode=), so made here it must be made 0700
        steps += [
            Step(f"make the controller host's WireGuard private key {key} (mode 0600) unless it "
                 "exists", key, (t.new_key + "\n").encode(), 0o600, keep=True, service_owned=True,
                 private_dirs=len(Path(t.key_file).relative_to(STATE_DIR).parts)),
            Step(f"write {conf} (its tunnel, for {t.unit}; no secret in it)", conf,
                 t.config.encode(), 0o600, private_dirs=1),
        ]  # fmt: skip
    if host and systemctl:
        steps.append(Step("reload systemd's units", argv=("systemctl", "daemon-reload")))
    return steps


def install(steps: list[Step], spec: ServiceSpec, echo, host: bool) -> None:
    """Carry the steps out, saying each as it is done."""
    for step in steps:
        if step.argv:
            try:
                r = subprocess.run(
                    list(step.argv), capture_output=True, text=True, timeout=120, check=False
                )
            except FileNotFoundError:
                raise ServiceError(f"{step.argv[0]} is not installed (Debian: systemd)") from None
            if r.returncode != 0:
                raise ServiceError(f"{shlex.join(step.argv)} failed: {r.stderr.strip()}")
            echo(f"ran {shlex.join(step.argv)}")
            continue
        assert step.path is not None
        if step.keep and step.path.exists():
            echo(f"kept {step.path} (it exists)")
            continue
        for d in reversed(step.path.parents[: step.private_dirs]):
            d.parent.mkdir(parents=True, exist_ok=True)
            d.mkdir(mode=0o700, exist_ok=True)
        atomic.write_bytes(step.path, step.data, mode=step.mode, keep_mode=False)
        os.chmod(step.path, step.mode)
        if step.keep and host and step.mode & 0o070:  # the token: readable by the user's group
            _chgrp(step.path, spec.user)
        if step.service_owned and host:
            # the secret store is the controller's: a directory of root's inside it would keep
            # it from its own store (wg-quick, as root, reads the key all the same)
            for path in (step.path, *step.path.parents[: step.private_dirs]):
                _chown(path, spec.user)
        echo(f"wrote {step.path}")


def _chown(path: Path, user: str) -> None:
    import pwd

    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ServiceError(f"no user {user} after systemd-sysusers: {path} stays root's") from None
    os.chown(path, entry.pw_uid, entry.pw_gid)


def _chgrp(path: Path, group: str) -> None:
    import grp

    try:
        os.chown(path, -1, grp.getgrnam(group).gr_gid)
    except KeyError:
        raise ServiceError(
            f"no group {group} after systemd-sysusers: {path} stays root's"
        ) from None
