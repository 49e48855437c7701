"""The model every layer shares: the loaded site (immutable once loaded; swapped whole) and
`BootRequest`, what a boot endpoint was asked. Imports nothing of the controller."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from bastion.match import GroupIndex

# iPXE's ${buildarch} names; machines.yaml also accepts the aliases in ARCH_ALIASES.
ARCHES = ("x86_64", "i386", "arm64", "arm32")
ARCH_ALIASES = {"amd64": "x86_64", "aarch64": "arm64", "x86-64": "x86_64", "armhf": "arm32"}
_UUID = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")


def arch_name(value: str) -> str | None:
    """An architecture as machines.yaml takes it (an alias read as its name), or None."""
    arch = ARCH_ALIASES.get(value, value)
    return arch if arch in ARCHES else None


def uuid_text(value: str) -> str | None:
    """A UUID as machines.yaml takes it (8-4-4-4-12 hex digits), in lower case, or None."""
    return value.lower() if _UUID.fullmatch(value) else None


@dataclass(frozen=True)
class Boot:
    """What a network boot program loads: kernel, initrds and kernel arguments."""

    kernel: str
    initrd: tuple[str, ...] = ()
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class Profile:
    id: str
    name: str
    source: str  # the site file it came from, relative to the site directory
    format: Literal["matchbox", "bastion"]
    boot: Boot | None
    boot_by_arch: dict[str, Boot] = field(default_factory=dict)
    # "flatcar" profiles get the Flatcar PXE kernel arguments added (bastion format only)
    os: Literal["flatcar", "custom"] = "custom"
    ignition: str | None = None  # file name under ignition/
    generic: str | None = None  # file name under generic/
    install: Literal["always", "once"] = "always"  # bastion.state.install (bastion format only)

    def boot_for(self, arch: str | None) -> Boot | None:
        if arch and arch in self.boot_by_arch:
            return self.boot_by_arch[arch]
        return self.boot

    @property
    def engine(self) -> Literal["go", "jinja"]:
        """How this profile's templates are written: Go-style for matchbox, Jinja2 for ours."""
        return "go" if self.format == "matchbox" else "jinja"


@dataclass(frozen=True)
class Machine:
    name: str
    mac: str | None
    uuid: str | None
    arch: str | None
    role: str | None
    profile: str
    hostname: str
    labels: dict[str, str]
    metadata: dict[str, Any]
    source: str
    line: int | None = None
    relay: int | None = None  # the device relay channel powering it
    heartbeat: tuple[int, int] | None = None  # (timeout_s, boot_s) for the node watchdog
    address: str | None = None  # its fixed LAN address, when declared
    # a k3s cluster node: what bastion.cluster.plan.plan made of it (the `cluster` template variable)
    node: dict[str, Any] | None = None
    # desired state (bastion.operator), its own or site.yaml `defaults:`: power "on" (powered and
    # running), "off", or None (the operator does not switch it); maintenance: leave it alone;
    # reprovision: a word whose change asks for one more installation
    power: str | None = None
    maintenance: bool = False
    reprovision: str | None = None

    def as_variables(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "mac": self.mac,
            "mac_hexhyp": self.mac.replace(":", "-") if self.mac else None,
            "uuid": self.uuid,
            "arch": self.arch,
            "role": self.role,
            "hostname": self.hostname,
            "labels": dict(self.labels),
            "profile": self.profile,
        }


@dataclass(frozen=True)
class Group:
    id: str
    name: str
    profile: str
    selector: dict[str, str]
    metadata: dict[str, Any]
    source: str
    format: Literal["matchbox", "bastion"]
    machine: Machine | None = None


@dataclass(frozen=True)
class TemplateFile:
    """A file under ignition/ or generic/, pre-parsed for the engines that will render it."""

    name: str
    relpath: str
    text: str
    raw_ignition: dict | None = None  # .ign/.ignition/.json files: the validated 3.3.0 config
    go: Any = None  # a gotemplate.Template when a matchbox profile uses the file
    jinja: Any = None  # a jinja2.Template when a bastion profile uses the file


@dataclass(frozen=True)
class SiteSettings:
    name: str
    controller_url: str | None
    default_profile: str | None
    roles: dict[str, str]
    metadata: dict[str, Any]
    device: Any = None  # site.yaml `device:`: a schema.DeviceSection or None (bastion.flash.image)
    cluster: Any = None  # site.yaml `cluster:`: a schema.ClusterSection or None (bastion.cluster.plan)
    operator: Any = None  # site.yaml `operator:`: a schema.OperatorSection (bastion.operator)
    defaults: Any = None  # site.yaml `defaults:`: a schema.MachineDefaults (desired state)
    logs: Any = None  # site.yaml `logs:`: a schema.LogsSection (bastion.logship)
    ups: Any = None  # site.yaml `ups:`: a schema.UpsSection or None (bastion.ups)
    networks: Any = None  # site.yaml `networks:`: a schema.NetworksSection or None (docs/network.md)


@dataclass(frozen=True)
class Site:
    root: Path
    settings: SiteSettings
    profiles: dict[str, Profile]
    groups: tuple[Group, ...]  # in matching order (most specific first)
    machines: tuple[Machine, ...]
    ignition: dict[str, TemplateFile]
    generic: dict[str, TemplateFile]
    warnings: tuple[str, ...] = ()
    fingerprint: tuple = ()
    # files/ as this site loaded it (bastion.render.butane.LocalFiles): what `local:` reads
    local_files: Any = None

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def assets_dir(self) -> Path:
        return self.root / "assets"

    # Lookups by key, made at the first use of a loaded site (a site is never changed: a
    # reload makes another): every boot request selects a group and looks its MAC up, and a
    # linear search of 1,000 machines' groups cost more than the rest of the request.
    def select_group(self, labels: dict[str, str]) -> Group | None:
        """The group that answers a request with these labels (bastion.match's rules)."""
        return self._group_index.select(labels)

    @cached_property
    def _group_index(self) -> GroupIndex[Group]:
        return GroupIndex(self.groups)

    @cached_property
    def _groups_by_id(self) -> dict[str, Group]:
        return _first_by(self.groups, lambda g: g.id)

    @cached_property
    def _machines_by_name(self) -> dict[str, Machine]:
        return _first_by(self.machines, lambda m: m.name)

    @cached_property
    def _machines_by_mac(self) -> dict[str, Machine]:
        return _first_by((m for m in self.machines if m.mac), lambda m: m.mac)

    def group(self, group_id: str) -> Group | None:
        return self._groups_by_id.get(group_id)

    def machine(self, name: str) -> Machine | None:
        return self._machines_by_name.get(name)

    @property
    def cluster_nodes(self) -> tuple[Machine, ...]:
        """The k3s cluster's machines, in machines.yaml order."""
        return tuple(m for m in self.machines if m.node is not None)

    def machine_by_mac(self, mac: str | None) -> Machine | None:
        return self._machines_by_mac.get(mac) if mac else None


def _first_by(items: Any, key: Any) -> dict:
    """items by key(item), the first of any with the same key (as a search in order finds)."""
    out: dict = {}
    for item in items:
        out.setdefault(key(item), item)
    return out


@dataclass(frozen=True)
class BootRequest:
    """A boot endpoint's request, whatever the transport: its labels (query parameters, matchbox
    style), the raw query, the URL to hand to machines and who asked."""

    labels: dict[str, str]
    raw_query: str
    base_url: str  # the controller URL to hand to machines, without a trailing slash
    client: str | None = None  # the requester's IP address (ties TFTP and HTTP steps together)
