"""The site files' formats, as pydantic models.

Edge Bastion's own YAML files are strict (an unknown key is an error: it is usually a typo).
matchbox's JSON files are read the way matchbox reads them (unknown keys ignored), but with
their types checked.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bastion.match import Malformed, parse_mac
from bastion.model import ARCH_ALIASES, ARCHES, arch_name, uuid_text
from bastion.regcache import plan as regcache_plan
from bastion.settings import HOST_NAME, SettingsError, parse_size

# used with fullmatch: `$` would also match before a final line break ("node1\n")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


NAME_MAX = 128  # a name is a file's name too (profiles/<id>.yaml, a queue's <name>.db)


def check_name(value: str, what: str = "name") -> str:
    if not _NAME.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a valid {what} (letters, digits, '.', '_', '-'; no leading symbol)"
        )
    if len(value) > NAME_MAX:
        raise ValueError(f"{value[:20]!r}... is not a valid {what}: {len(value)} characters, at most {NAME_MAX}")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)


def _int(lo: int, hi: int, doc: str):
    """An optional whole number in lo..hi; YAML's true/false and "5" are refused, not coerced."""
    return Field(default=None, strict=True, ge=lo, le=hi, description=doc)


def _ipv4(v: str | None) -> str | None:
    if v is None:
        return v
    try:
        address = ipaddress.IPv4Address(v)
    except ValueError:
        raise ValueError(f"{v!r} is not an IPv4 address") from None
    if address.is_unspecified or address.is_multicast or address == ipaddress.IPv4Address("255.255.255.255"):
        raise ValueError(f"{v!r} is not a host's address (unspecified, broadcast or multicast)")
    return str(address)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _one_line(v: Any) -> Any:
    """A string (or each of a list's, or of a mapping's keys and values) without a control
    character: such values are written into iPXE scripts, kernel command lines, Butane and
    KEY=value lines, where a line break starts a line of the writer's choosing."""
    values = v if isinstance(v, list) else [*v.keys(), *v.values()] if isinstance(v, dict) else [v]
    for x in values:
        if isinstance(x, str) and _CONTROL.search(x):
            raise ValueError(f"{x[:60]!r} has a control character (a line break, a tab): not allowed here")
    return v


def _mount_options(v: list[str] | None) -> list[str] | None:
    """Each item one mount option: joined with commas into the mount unit's Options= line, a
    line break in one started a line (a section) of the writer's choosing."""
    for opt in v or ():
        if not re.fullmatch(r"[A-Za-z0-9_=.:/@+-]+", opt):
            raise ValueError(f"{opt[:60]!r} is not a mount option (letters, digits and _=.:/@+-; "
                             "one option an item, no commas or spaces)")  # fmt: skip
    return v


def _on_off(v: Any) -> Any:
    return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v  # YAML 1.1: on/off


# What iPXE build each client architecture (DHCP option 93) gets when site.yaml says nothing.
DEFAULT_BOOT_FILES = {0: "undionly.kpxe", 6: "ipxe.efi", 7: "ipxe.efi", 9: "ipxe.efi"}

# The ranges below are the firmware's (firmware/config.py, firmware/power.py), checked here too
# so that a mistake is reported against site.yaml; the firmware's own checker has the last word.


class DeviceRpi(_Strict):
    boot: bool | None = Field(default=None, description="answer Raspberry Pi 4 bootloaders")
    menu: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="the PXE menu text a Pi bootloader looks for",
    )

    @field_validator("menu")
    @classmethod
    def _menu_bytes(cls, v: str | None) -> str | None:
        # option 43 holds bytes: the firmware's checker counts them too
        if v is not None and len(v.encode()) > 200:
            raise ValueError(f"{len(v.encode())} bytes of UTF-8: at most 200")
        return v
    next_server: str | None = Field(default=None, description="TFTP server for Pi boot files")

    check_ip = field_validator("next_server")(_ipv4)


class DeviceTftp(_Strict):
    max_transfers: int | None = _int(1, 16, "concurrent transfers")
    max_blksize: int | None = _int(512, 1468, "largest block size granted (RFC 2348)")
    timeout_ms: int | None = _int(50, 255000, "first retransmission timeout")
    retries: int | None = _int(1, 20, "retransmissions before a transfer is given up")
    max_window: int | None = _int(1, 16, "largest window granted (RFC 7440)")


class DeviceChannel(_Strict):
    """Interlocks and default state of a relay channel."""

    min_off_ms: int | None = _int(0, 3600000, "a channel that went off stays off this long")
    max_cycles: int | None = _int(1, 1000, "power-on edges allowed per window_ms")
    window_ms: int | None = _int(1000, 86400000, "the window of max_cycles")
    default: Literal["on", "off"] | None = Field(
        default=None, description="the state when the device has none persisted for the channel"
    )

    check_default = field_validator("default", mode="before")(_on_off)


class DevicePower(_Strict):
    stagger_ms: int | None = _int(0, 600000, "time between two staggered power-on edges")
    defaults: DeviceChannel = Field(
        default_factory=DeviceChannel, description="settings for every relay channel"
    )
    channels: dict[str | int, DeviceChannel] = Field(
        default_factory=dict,
        description="settings for one channel, by machine name (its relay:) or channel number",
    )


def _ipv4_with_prefix(v: str | None) -> str | None:
    """192.168.1.11/24: an address of its subnet, prefix 8..30 (the firmware's netconfig)."""
    if v is None:
        return v
    try:
        iface = ipaddress.IPv4Interface(v) if isinstance(v, str) and "/" in v else None
    except ValueError:
        iface = None
    if iface is None:
        raise ValueError(
            f"{v!r} must be an IPv4 address and its prefix length, e.g. 192.168.1.11/24"
        )
    if not 8 <= iface.network.prefixlen <= 30:
        raise ValueError(f"{v!r}: the prefix length must be 8..30")
    if iface.ip in (iface.network.network_address, iface.network.broadcast_address):
        raise ValueError(f"{v!r} is its subnet's network or broadcast address, not a host's")
    return str(iface)


class DeviceNet(_Strict):
    """A real board's own network: a static address, or a lease from the router's DHCP. The
    sim board ignores it (its network is the host's)."""

    dhcp: bool | None = Field(
        default=None, description="take a DHCP lease from the router (the default without ip)"
    )
    ip: str | None = Field(
        default=None, description="a static address with its prefix length, 192.168.1.11/24"
    )
    gateway: str | None = Field(default=None, description="the router (required with ip)")
    dns: str | None = Field(default=None, description="the DNS server (default: the gateway)")
    dhcp_wait_ms: int | None = _int(1000, 120000, "how long a boot waits for a DHCP lease")

    check_ip = field_validator("ip")(_ipv4_with_prefix)
    check_ips = field_validator("gateway", "dns")(_ipv4)

    @model_validator(mode="after")
    def _static_or_dhcp(self) -> DeviceNet:
        if self.ip is None:
            if self.dhcp is False:
                raise ValueError("dhcp: false needs ip (a static address) and gateway")
            for name in ("gateway", "dns"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} is for a static address: give ip too, or drop it")
            return self
        if self.dhcp:
            raise ValueError("give ip (a static address) or dhcp: true, not both")
        if self.gateway is None:
            raise ValueError("ip needs gateway (the router's address, in the same subnet)")
        if ipaddress.IPv4Address(self.gateway) not in ipaddress.IPv4Interface(self.ip).network:
            raise ValueError(f"gateway {self.gateway} is not in {self.ip}")
        return self


class DeviceSection(_Strict):
    """site.yaml `device:` -- what `bastion flash` renders into the device's device.json."""

    ip: str = Field(description="the device's LAN address (DHCP server id, default next-server)")
    answer: Literal["site", "any"] = Field(
        default="site",
        description="site: answer only the MACs in machines.yaml; any: every PXE client",
    )
    boot_files: dict[int, str] = Field(
        default_factory=lambda: dict(DEFAULT_BOOT_FILES),
        description="boot file under the device's tftp/ by client architecture (DHCP option 93)",
    )
    next_server: str | None = Field(
        default=None, description="TFTP server the offers point to, when not the device"
    )
    rpi: DeviceRpi = Field(default_factory=DeviceRpi)
    tftp: DeviceTftp = Field(default_factory=DeviceTftp)
    power: DevicePower = Field(default_factory=DevicePower)
    net: DeviceNet | None = Field(
        default=None, description="a real board's own address: static, or DHCP (the default)"
    )

    check_ips = field_validator("ip", "next_server")(_ipv4)

    @model_validator(mode="after")
    def _net_is_the_device(self) -> DeviceSection:
        if self.net is not None and self.net.ip is not None:
            own = self.net.ip.split("/")[0]
            if own != self.ip:
                raise ValueError(
                    f"net.ip {self.net.ip} is not ip {self.ip}: the device serves from its own "
                    "address, so both must be the same"
                )
        return self

    @field_validator("boot_files", mode="before")
    @classmethod
    def _files(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v  # pydantic says what is wrong
        out = {}
        for key, name in v.items():
            arch = key if isinstance(key, int) and not isinstance(key, bool) else None
            if isinstance(key, str) and key.isascii() and key.isdigit():
                arch = int(key)
            if arch is None or not 0 <= arch <= 0xFFFF:
                raise ValueError(
                    f"{key!r} is not a client architecture number (DHCP option 93: 0..65535)"
                )
            if isinstance(name, str):
                parts = name.split("/")
                if len(name) > 127 or name.startswith("/") or ".." in parts or "" in parts:
                    raise ValueError(
                        f"{arch}: {name!r} must be a file name under tftp/ (1..127 characters, "
                        "relative, no '..')"
                    )
                if not all(32 <= ord(c) <= 126 and c != "\\" for c in name):
                    # what TFTP serves (firmware/tftp.py): the clients were told a file that
                    # every request for is refused as "bad file name"
                    raise ValueError(f"{arch}: {name!r}: a TFTP name is printable ASCII "
                                     "without a backslash")  # fmt: skip
            out[arch] = name
        return out


# --- cluster: (site.yaml) and a machine's cluster fields (machines.yaml) ------------------------

K3S_ARCHES = ("amd64", "arm64")
_K3S_VERSION = re.compile(r"^v\d+\.\d+\.\d+(-rc\d+)?\+k3s\d+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_HOSTPORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?):(\d{1,5})$")


def _no_space(values: list[str]) -> list[str]:
    for v in values:
        if not v or any(c.isspace() for c in v) or _CONTROL.search(v):
            raise ValueError(f"{v!r}: one argument per item, without spaces or control characters")
    return values


# Kubernetes' label syntax (its apimachinery validation): a key is an optional prefix, a
# lower-case DNS subdomain of at most 253 characters, and '/', then a name of at most 63
# characters; a value is empty or a name. The k3s unit's ExecStart= carries each label as
# --node-label key=value, where a line break would end the line (systemd then refuses the unit
# and k3s never starts), and the kubelet refuses a label that breaks these rules.
_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_LABEL_PREFIX = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def _node_labels(labels: dict[str, str]) -> dict[str, str]:
    for key, value in labels.items():
        prefix, slash, name = key.rpartition("/")
        if slash and not (len(prefix) <= 253 and _LABEL_PREFIX.fullmatch(prefix)):
            raise ValueError(f"{key[:80]!r}: a label key's prefix is a lower-case DNS name of at most "
                             "253 characters, before one '/'")  # fmt: skip
        if not (len(name) <= 63 and _LABEL_NAME.fullmatch(name)):
            raise ValueError(f"{key[:80]!r}: a label key's name is at most 63 letters, digits, '-', "
                             "'_', '.', beginning and ending with a letter or digit")  # fmt: skip
        if not isinstance(value, str) or not (value == "" or (len(value) <= 63 and _LABEL_NAME.fullmatch(value))):
            raise ValueError(f"{key}: {str(value)[:80]!r} is not a label value: empty, or at most 63 "
                             "letters, digits, '-', '_', '.', beginning and ending with a letter or "
                             "digit")  # fmt: skip
    return labels


def loki_url_refusal(url: str, auth: str | None) -> str | None:
    """Why a push URL cannot be used with `auth`, or None: credentials in the URL itself, or
    credentials over plain http to a host that is not loopback. The reason never repeats the
    URL (it may hold a password)."""
    parts = urlsplit(url)
    if "@" in parts.netloc:
        return (f"the url has credentials in it (user:password@{parts.hostname}): the site files are kept in "
                "git and a URL is shown in logs; use auth: basic (username, and the password in the secret "
                "store) or auth: bearer")  # fmt: skip
    if auth is not None and parts.scheme == "http" and not _is_loopback(parts.hostname or ""):
        what = "password" if auth == "basic" else "token"
        return (f"auth: {auth} over http:// would send the {what} in cleartext to {parts.hostname}: use an "
                "https url (plain http is allowed only to a loopback address, the controller's own host)")  # fmt: skip
    return None


def _is_loopback(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1: traffic that never leaves the controller's host."""
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):  # RFC 6761 section 6.3
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _http_url(v: str | None) -> str | None:
    if v is not None and not re.match(r"^https?://[^/\s]+(/[^\s]*)?$", v):
        raise ValueError(f"{v!r} is not an http(s) URL")
    return v.rstrip("/") if v else v


def _ip(v: str | None) -> str | None:
    if v is None:
        return v
    try:
        return str(ipaddress.ip_address(v))
    except ValueError:
        raise ValueError(f"{v!r} is not an IP address") from None


def wireguard_key_problem(v: str) -> str | None:
    import base64
    import binascii

    try:
        raw = base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    return None if len(raw) == 32 and len(v) == 44 else f"{v!r} is not a WireGuard key (44 characters of base64)"


class ClusterK3s(_Strict):
    """cluster.k3s: which k3s every node runs, and its arguments."""

    version: str = Field(description="the k3s release, e.g. v1.31.4+k3s1")
    sha256: dict[str, str] = Field(
        default_factory=dict,
        description="the SHA-256 of the k3s binary, by architecture (amd64, arm64); default: "
        "what `bastion assets fetch k3s` recorded from the release's sha256sum-<arch>.txt",
    )
    url: str | None = Field(
        default=None,
        description="where nodes download k3s; {version}, {arch} and {binary} are replaced "
        "(default: the controller's /assets/k3s/{version}/{arch}/k3s)",
    )
    args: list[str] = Field(default_factory=list, description="extra arguments for every node")
    server_args: list[str] = Field(default_factory=list, description="extra arguments for servers")
    agent_args: list[str] = Field(default_factory=list, description="extra arguments for agents")

    check_args = field_validator("args", "server_args", "agent_args")(_no_space)

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        if not _K3S_VERSION.match(v):
            raise ValueError(f"{v!r} is not a k3s release name (like v1.31.4+k3s1)")
        return v

    @field_validator("sha256")
    @classmethod
    def _sha(cls, v: dict[str, str]) -> dict[str, str]:
        for arch, digest in v.items():
            if arch not in K3S_ARCHES:
                raise ValueError(f"{arch!r} is not a k3s architecture ({', '.join(K3S_ARCHES)})")
            if not isinstance(digest, str) or not _SHA256.match(digest.lower()):
                raise ValueError(f"{arch}: {digest!r} is not a SHA-256 (64 hex digits)")
        return {a: d.lower() for a, d in v.items()}

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None:
            _http_url(v.replace("{", "").replace("}", ""))
        return v


class ClusterFlatcar(_Strict):
    """cluster.flatcar: which Flatcar release the nodes boot (from `bastion assets fetch`)."""

    channel: Literal["stable", "beta", "alpha"] = "stable"
    version: str = Field(default="current", description="a release such as 4081.2.0, or current")
    args: list[str] = Field(default_factory=list, description="extra kernel arguments")

    check_args = field_validator("args")(_no_space)

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        if v != "current" and not re.match(r"^\d+\.\d+\.\d+$", v):
            raise ValueError(f"{v!r} is not a Flatcar release (like 4081.2.0) or current")
        return v


class RegistryCacheServe(_Strict):
    """cluster.registry_cache.serve: the controller host runs the cache itself, one CNCF
    Distribution registry in proxy mode per mirrored registry (`bastion registry-cache`,
    docs/registry-cache.md). Each mirror listens on the port `mirrors` gives it, or, in the list
    form, mirror i on the port of `url` plus i."""

    upstreams: dict[str, str] = Field(
        default_factory=dict,
        description="a mirrored registry's own URL when it is not https://<name> "
        "(docker.io: https://registry-1.docker.io)",
    )
    max_size: str = Field(
        default="10GiB", description="each mirror's storage bound (garbage-collected, then emptied)"
    )

    @field_validator("upstreams")
    @classmethod
    def _upstreams(cls, v: dict[str, str]) -> dict[str, str]:
        return {name: _http_url(url) for name, url in v.items()}  # type: ignore[misc]

    @field_validator("max_size")
    @classmethod
    def _size(cls, v: str) -> str:
        try:
            if parse_size(v, "max_size") < 1 << 20:
                raise ValueError(f"{v!r} is less than 1MiB")
        except SettingsError:
            raise ValueError(f"{v!r} is not a size (10GiB, 500MiB, 2G)") from None
        return v


class RegistryCache(_Strict):
    """cluster.registry_cache: the site's pull-through registry cache (containerd mirror)."""

    url: str = Field(description="the cache's URL, e.g. http://10.77.0.5:5000")
    # A list, or a mapping registry -> port: with `serve:` the list puts mirror i on url's port
    # plus i, so that putting a registry first moves the others, and a node booted before the
    # edit pulls one registry's names through another's proxy; the mapping fixes each port.
    mirrors: list[str] | dict[str, int] = Field(
        default_factory=lambda: ["docker.io", "ghcr.io", "quay.io", "registry.k8s.io"],
        description="the registries it mirrors: a list, or registry: port (with serve:)",
    )
    insecure_skip_verify: bool = Field(
        default=False, description="for an https cache whose certificate the nodes cannot check"
    )

    check_url = field_validator("url")(_http_url)

    # plain: the two forms are told apart here, so that a problem is said once, in our words,
    # rather than once per form by pydantic's union
    @field_validator("mirrors", mode="plain")
    @classmethod
    def _mirrors(cls, v: Any) -> list[str] | dict[str, int]:
        # (ValueError, not TypeError: pydantic reports only the former as the field's problem)
        if not isinstance(v, (list, dict)):
            raise ValueError(f"must be a list of registries, or a mapping registry: port, not {v!r}")  # noqa: TRY004
        for name in v:
            if isinstance(v, list) and isinstance(name, dict):
                raise ValueError(f"{name!r}: give every mirror its port, as one mapping "  # noqa: TRY004
                                 "(mirrors: {docker.io: 5000, ghcr.io: 5001}), or none")  # fmt: skip
            host, _, port = name.partition(":") if isinstance(name, str) else ("", "", "")
            if name != "*" and (not HOST_NAME.fullmatch(host) or host.endswith(".")
                                or (port and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535))):  # fmt: skip
                # ('..' and '-' named a state directory and a secret beside the others')
                raise ValueError(f"{name!r} is not a registry host name[:port] (or *)")
        if isinstance(v, list):
            if len(set(v)) != len(v):
                raise ValueError("a registry is named twice")
            return list(v)
        on: dict[int, str] = {}
        for name, port in v.items():
            # YAML's true is not port 1, nor "5000" a port
            if type(port) is not int or not 1 <= port <= 65535:
                raise ValueError(f"{name}: {port!r} is not a TCP port (1 to 65535)")
            if port in on:
                raise ValueError(f"{on[port]} and {name} are both on port {port}: each mirror is "
                                 "its own registry, on a port of its own")  # fmt: skip
            on[port] = name
        return dict(v)

    serve: RegistryCacheServe | None = Field(
        default=None, description="run the cache on the controller host (bastion registry-cache)"
    )

    @model_validator(mode="after")
    def _served(self) -> RegistryCache:
        """What the controller host serves must be what the nodes are told (registries.yaml)."""
        pinned = isinstance(self.mirrors, dict)
        if self.serve is None:
            if pinned and self.mirrors:
                raise ValueError("mirrors: ports (registry: port) are for the cache the controller "
                                 "host serves (serve:); without it every mirror is the one url: "
                                 "list the registries")  # fmt: skip
            return self
        if "*" in self.mirrors:
            raise ValueError("mirrors: '*' cannot be served: a Distribution proxy mirrors one "
                             "registry; name each registry (serve: is set)")  # fmt: skip
        parts = urlsplit(self.url)
        try:
            port = parts.port  # urllib raises past 65535
        except ValueError:
            port = 0
        if port == 0:
            raise ValueError(f"url: {self.url!r}: its port is not a TCP port (1 to 65535)")
        if port is None and not pinned:
            raise ValueError(f"url: {self.url!r} needs a port: mirror i of `mirrors` is served "
                             "on that port plus i (or give each mirror its port: "
                             "mirrors: {docker.io: 5000, ...})")  # fmt: skip
        if parts.path not in ("", "/"):
            raise ValueError(f"url: {self.url!r}: a served cache is host:port, without a path")
        if parts.scheme != "http":
            raise ValueError(f"url: {self.url!r}: the served cache speaks http (no certificate)")
        if not pinned and port + len(self.mirrors) - 1 > 65535:
            raise ValueError(f"url: port {port} + {len(self.mirrors)} mirrors passes 65535")
        for name in self.serve.upstreams:
            if name not in self.mirrors:
                raise ValueError(f"serve.upstreams: {name!r} is not in mirrors {list(self.mirrors)}: "
                                 "the nodes would never be told to pull it through the cache")  # fmt: skip
        return self


class ControllerWireguard(_Strict):
    """cluster.wireguard.controller: the controller host's own tunnel toward the management
    cluster, so that the management side reaches its API (bastion.cluster.tunnel). The endpoint
    and the management side's public key are cluster.wireguard's."""

    interface: str = Field(default="wg-bastion", description="the interface name on the controller host")
    address: str | None = Field(
        default=None, description="its tunnel address (default: the pool's last host address)"
    )
    listen_port: int | None = Field(default=None, strict=True, ge=1, le=65535)
    allowed_ips: list[str] | None = Field(
        default=None,
        description="what the controller host routes into the tunnel (default: cluster.wireguard's)",
    )

    check_ip = field_validator("address")(_ip)

    @field_validator("interface")
    @classmethod
    def _iface(cls, v: str) -> str:
        return _interface_name(v)

    @field_validator("allowed_ips")
    @classmethod
    def _allowed(cls, v: list[str] | None) -> list[str] | None:
        return _networks(v)


def _interface_name(v: str) -> str:
    # also the instance of wg-quick@<interface>.service: systemd takes no '+' or '=' there (the
    # unit could not be loaded, and the node's tunnel never came up)
    if not re.match(r"^[A-Za-z0-9_.-]{1,15}$", v) or v in (".", ".."):
        raise ValueError(f"{v!r} is not an interface name (1..15 of A-Z a-z 0-9 _.-, the "
                         "instance of the wg-quick@ unit)")  # fmt: skip
    return v


def _networks(v: list[str] | None) -> list[str] | None:
    if v is None:
        return v
    out = []
    for net in v:
        try:
            out.append(str(ipaddress.ip_network(net, strict=True)))
        except ValueError as e:
            raise ValueError(f"{net!r} is not a network ({e})") from None
    return out


class ClusterWireguard(_Strict):
    """cluster.wireguard: every node's tunnel toward the management cluster."""

    interface: str = Field(default="wg0", description="the interface name on the nodes")
    address_pool: str = Field(description="the tunnel network, e.g. 10.200.0.0/24")
    endpoint: str = Field(description="the management side's host:port")
    public_key: str = Field(description="the management side's WireGuard public key")
    allowed_ips: list[str] | None = Field(
        default=None, description="what the nodes route into the tunnel (default: the pool)"
    )
    persistent_keepalive: int = Field(default=25, strict=True, ge=0, le=65535)
    listen_port: int | None = Field(default=None, strict=True, ge=1, le=65535)
    controller: ControllerWireguard | None = Field(
        default=None, description="the controller host's own tunnel (`controller: {}`: the defaults)"
    )

    @field_validator("interface")
    @classmethod
    def _iface(cls, v: str) -> str:
        return _interface_name(v)

    @field_validator("address_pool")
    @classmethod
    def _pool(cls, v: str) -> str:
        try:
            net = ipaddress.ip_network(v, strict=True)
        except ValueError as e:
            raise ValueError(f"{v!r} is not a network ({e})") from None
        if net.num_addresses < 4:
            raise ValueError(f"{v!r} is too small for the management side and a node")
        return str(net)

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        m = _HOSTPORT.match(v)
        if not m or not 1 <= int(m.group(3)) <= 65535:
            raise ValueError(f"{v!r} is not host:port")
        return v

    @field_validator("public_key")
    @classmethod
    def _key(cls, v: str) -> str:
        why = wireguard_key_problem(v)
        if why:
            raise ValueError(why)
        return v

    @field_validator("allowed_ips")
    @classmethod
    def _allowed(cls, v: list[str] | None) -> list[str] | None:
        return _networks(v)

    @model_validator(mode="after")
    def _reaches_management(self) -> ClusterWireguard:
        """WireGuard takes a packet from a peer only from an address in that peer's AllowedIPs:
        without the management side's address (the pool's first), its handshake completes and
        every packet it sends is dropped (kubectl, the API, the operator's calls)."""
        pool = ipaddress.ip_network(self.address_pool)
        management = next(pool.hosts())
        for where, nets in (("allowed_ips", self.allowed_ips),
                            ("controller.allowed_ips", self.controller.allowed_ips if self.controller else None)):  # fmt: skip
            if nets and not any(management in ipaddress.ip_network(n) for n in nets):
                raise ValueError(f"{where}: {', '.join(nets)} leaves out the management side's "
                                 f"address {management} (the first of address_pool {pool}): "
                                 "its packets would be dropped; add the pool or "
                                 f"{management}/{pool.max_prefixlen}")  # fmt: skip
        return self


class DiskDefaults(_Strict):
    """cluster.disk: how a node's disk (machines.yaml `disk:`) is formatted and mounted."""

    format: Literal["ext4", "xfs", "btrfs"] = "ext4"
    label: str | None = Field(
        default="k3s-data", max_length=12,
        description="filesystem label; an existing filesystem must carry it to be kept",
    )  # fmt: skip
    mount_options: list[str] = Field(default_factory=lambda: ["noatime"])
    check_mount_options = field_validator("mount_options")(_mount_options)
    wipe: bool = Field(
        default=False, description="make a new filesystem at every boot (loses the datastore)"
    )


# Graceful node shutdown (bastion.cluster.plan, docs/site-files.md): the kubelet's
# shutdownGracePeriod. 45 s with a third of it for critical pods leaves the other pods 30 s,
# the terminationGracePeriodSeconds a pod gets by default. At most 10 minutes: a node on a UPS
# battery spends it before its relay may open (docs/ups.md).
SHUTDOWN_GRACE_DEFAULT_S = 45
SHUTDOWN_GRACE_MAX_S = 600


class ClusterSection(_Strict):
    """site.yaml `cluster:` -- a k3s cluster of the machines whose role is server or agent."""

    name: str | None = Field(default=None, description="the cluster's name (default: the site's)")
    k3s: ClusterK3s
    server_url: str | None = Field(
        default=None,
        description="the URL joining nodes use (default: https://<first server's address>:6443)",
    )
    flatcar: ClusterFlatcar = Field(default_factory=ClusterFlatcar)
    registry_cache: RegistryCache | None = None
    wireguard: ClusterWireguard | None = None
    disk: DiskDefaults = Field(default_factory=DiskDefaults)
    shutdown_grace_s: int = Field(
        default=SHUTDOWN_GRACE_DEFAULT_S, strict=True, ge=0, le=SHUTDOWN_GRACE_MAX_S,
        description="a node that is shut down (the UPS policy, systemctl poweroff) first gives its "
        "pods this long to stop: the kubelet's shutdownGracePeriod; 0: no graceful node shutdown",
    )  # fmt: skip
    shutdown_critical_s: int | None = Field(
        default=None, strict=True, ge=0, le=SHUTDOWN_GRACE_MAX_S,
        description="the last part of shutdown_grace_s, kept for critical pods (priority class "
        "system-cluster-critical or system-node-critical): shutdownGracePeriodCriticalPods "
        "(default: a third of shutdown_grace_s)",
    )  # fmt: skip

    def shutdown_critical(self) -> int:
        """The critical pods' part of the grace period: as declared, else a third of it."""
        if self.shutdown_critical_s is not None:
            return self.shutdown_critical_s
        return self.shutdown_grace_s // 3

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not _DNS_LABEL.match(v):
            raise ValueError(f"{v!r} is not a cluster name (lower-case letters, digits, '-')")
        return v

    @model_validator(mode="after")
    def _shutdown(self) -> ClusterSection:
        grace, critical = self.shutdown_grace_s, self.shutdown_critical()
        if grace == 0:
            if critical:
                raise ValueError(f"shutdown_critical_s ({critical}) without shutdown_grace_s: "
                                 "graceful node shutdown is off (shutdown_grace_s: 0)")  # fmt: skip
            return self
        # Kubernetes: both periods non-zero to turn it on, the critical one the smaller
        if not 1 <= critical < grace:
            said = "" if self.shutdown_critical_s is not None else ", by default a third of shutdown_grace_s"
            raise ValueError(f"shutdown_critical_s ({critical}{said}) must be at least 1 and less "
                             f"than shutdown_grace_s ({grace}): the other pods get the difference")  # fmt: skip
        return self

    @field_validator("server_url")
    @classmethod
    def _server(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https://[^/\s]+$", v.rstrip("/")):
            raise ValueError(f"{v!r} is not https://host[:port]")
        return v.rstrip("/") if v else v


class MachineDisk(_Strict):
    device: str = Field(description="the disk by a stable name, /dev/disk/by-id/usb-...")
    format: Literal["ext4", "xfs", "btrfs"] | None = None
    label: str | None = Field(default=None, max_length=12)
    mount_options: list[str] | None = None
    wipe: bool | None = None

    check_mount_options = field_validator("mount_options")(_mount_options)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.match(r"^/dev/disk/by-(id|path|uuid|label|partuuid|partlabel)/[^/\s]+$", v):
            raise ValueError(
                f"{v!r} is not a stable device name: use /dev/disk/by-id/... "
                "(/dev/sdX can change from one boot to the next)"
            )
        return v


class MachineK3s(_Strict):
    init: bool | None = Field(default=None, description="this server runs --cluster-init")
    args: list[str] = Field(default_factory=list, description="extra k3s arguments")
    node_labels: dict[str, str] = Field(default_factory=dict)
    node_taints: list[str] = Field(default_factory=list)

    check_args = field_validator("args", "node_taints")(_no_space)
    check_labels = field_validator("node_labels")(_node_labels)


class MachineWireguard(_Strict):
    enabled: bool = True
    address: str | None = Field(default=None, description="its tunnel address (default: the next free one)")

    check_ip = field_validator("address")(_ip)


# --- desired state and the operator (bastion.operator) --------------------------------------

# A boot's steps, in the order a network boot reaches them (bastion.operator.core.STEPS is the
# authority; repeated here so that site.yaml's operator.step_timeouts can be checked).
BOOT_STEPS = ("power-on", "pxe", "tftp", "ipxe", "script", "kernel", "ignition")


def _token(v: Any) -> Any:
    """reprovision: any short word or number, kept as text (changing it is what counts)."""
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, (int, float)):
        return str(v)
    if hasattr(v, "isoformat"):  # YAML reads a bare 2026-12-05 as a date
        return v.isoformat()
    return v


class MachineDefaults(_Strict):
    """site.yaml `defaults:` -- the desired state of every machine whose machines.yaml entry
    does not say otherwise. `power` applies to the machines with a `relay:` only."""

    power: Literal["on", "off"] | None = Field(
        default=None,
        description="on: powered and running (the operator boots it and watches the boot); "
        "off: powered off; unset: the operator does not switch its power",
    )
    maintenance: bool = Field(
        default=False, description="leave the machines alone: the operator takes no action"
    )

    check_power = field_validator("power", mode="before")(_on_off)


class OperatorSection(_Strict):
    """site.yaml `operator:` -- how the operator (bastion.operator) converges the site on its
    declaration."""

    sync: Literal["auto", "manual"] = Field(
        default="auto",
        description="auto: a reloaded declaration is acted on at once; manual: only after "
        "`bastion apply` (the served boot files still reload at once)",
    )
    interval_s: int = Field(
        default=10, strict=True, ge=1, le=3600,
        description="reconcile at least this often (and on every reload and boot event)",
    )  # fmt: skip
    cycles: int = Field(
        default=3, strict=True, ge=0, le=20,
        description="power-cycles of a stuck boot before the machine is Failed",
    )  # fmt: skip
    backoff_s: int = Field(
        default=30, strict=True, ge=0, le=86400,
        description="wait before the first power-cycle of a stuck boot; doubles each time",
    )  # fmt: skip
    backoff_max_s: int = Field(
        default=900, strict=True, ge=0, le=86400, description="the longest wait between cycles"
    )  # fmt: skip
    ready_s: int = Field(
        default=120, strict=True, ge=1, le=86400,
        description="a heartbeat this recent makes a machine Ready (its heartbeat.timeout_s "
        "when it has one)",
    )  # fmt: skip
    step_timeouts: dict[str, Annotated[int, Field(strict=True, ge=1, le=86400)]] = Field(
        default_factory=dict,
        description="seconds a boot may stay at a step before it is stuck, by step: "
        + ", ".join(BOOT_STEPS),
    )

    @field_validator("step_timeouts")
    @classmethod
    def _steps(cls, v: dict[str, int]) -> dict[str, int]:
        for step in v:
            if step not in BOOT_STEPS:
                raise ValueError(f"{step!r} is not a boot step ({', '.join(BOOT_STEPS)})")
        return v


# --- logs off-site (bastion.logship) -----------------------------------------------------------

# RFC 5424 section 6.2.1: the facilities a syslog message may name, by keyword.
SYSLOG_FACILITIES = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6, "news": 7,
    "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11, "ntp": 12, "audit": 13, "alert": 14,
    "clock": 15, "local0": 16, "local1": 17, "local2": 18, "local3": 19, "local4": 20,
    "local5": 21, "local6": 22, "local7": 23,
}  # fmt: skip


class LogsTls(_Strict):
    """TLS to a collector (a syslog target, or a loki target's https URL): the collector's
    certificate is checked against `ca_file` (default: the system's CAs) and its name; with
    `cert_file` the controller presents its own certificate to a collector that asks for one
    (mutual TLS), its key being the secret store's `logs/<target>/client.key`."""

    ca_file: str | None = Field(
        default=None,
        description="PEM file of the CA(s) that signed the collector's certificate (default: the "
        "system's CAs)",
    )
    server_name: str | None = Field(
        default=None,
        description="syslog: the name the certificate must carry (default: the target's host)",
    )
    cert_file: str | None = Field(
        default=None,
        description="PEM file of the controller's client certificate (mutual TLS); its key is the "
        "secret store's logs/<target>/client.key",
    )


# A Loki tenant (X-Scope-OrgID): Loki's own rule for tenant IDs, and at most 150 bytes.
_LOKI_TENANT = re.compile(r"[A-Za-z0-9!_.*'()-]{1,150}")
# Loki validates labels as Prometheus does: a name outside this, or one starting with `__`
# (reserved), makes every push a 400 ("invalid_labels"), which is never retried
_LOKI_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_LOKI_OWN_LABELS = ("site", "source", "kind")  # bastion.logship.loki.push_body sets them


class LogsTarget(_Strict):
    """One collector under site.yaml `logs.targets`."""

    name: str = Field(description="the target's name: its queue file and its metrics' label")
    type: Literal["syslog", "loki"] = Field(
        description="syslog: RFC 5424 over TCP, octet-counted (RFC 6587); loki: the Loki push API"
    )
    host: str | None = Field(default=None, description="syslog: the collector's host name or address")
    port: int | None = _int(1, 65535, "syslog: the collector's TCP port (default 514, 6514 with TLS)")
    tls: LogsTls | None = Field(default=None, description="syslog: TLS to the collector")
    facility: str = Field(default="local0", description="syslog: the facility of every message")
    max_message: int = Field(
        default=8096, strict=True, ge=480, le=1048576,
        description="syslog: the longest message sent; a longer event's payload is cut to fit "
        "(rsyslog's default limit is 8096 bytes)",
    )  # fmt: skip
    url: str | None = Field(
        default=None, description="loki: the push URL, e.g. http://loki:3100/loki/api/v1/push"
    )
    labels: dict[str, str] = Field(
        default_factory=dict, description="loki: labels of every stream, besides site, source and kind"
    )
    tenant: str | None = Field(
        default=None, description="loki: the tenant of a multi-tenant Loki (its X-Scope-OrgID header)"
    )
    auth: Literal["basic", "bearer"] | None = Field(
        default=None,
        description="loki: HTTP authentication. basic: `username` and the secret store's "
        "logs/<target>/password; bearer: the secret store's logs/<target>/token",
    )
    username: str | None = Field(default=None, description="loki: the user name of basic authentication")
    queue_max: int = Field(
        default=100000, strict=True, ge=10, le=10_000_000,
        description="events kept on disk for this target while it cannot take them; past it the "
        "oldest are dropped and counted",
    )  # fmt: skip

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "target name")

    @field_validator("facility")
    @classmethod
    def _facility(cls, v: str) -> str:
        if v not in SYSLOG_FACILITIES:
            raise ValueError(f"{v!r} is not a syslog facility ({', '.join(SYSLOG_FACILITIES)})")
        return v

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^/\s]+(/[^\s]*)?$", v):
            raise ValueError(f"{v!r} is not an http(s) URL")
        return v

    @field_validator("tenant")
    @classmethod
    def _tenant(cls, v: str | None) -> str | None:
        if v is not None and not _LOKI_TENANT.fullmatch(v):
            raise ValueError(f"{v!r} is not a Loki tenant ID (1 to 150 of A-Z a-z 0-9 ! - _ . * ' ( ))")
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if not _LOKI_LABEL.fullmatch(name) or name.startswith("__"):
                raise ValueError(f"{name!r} is not a Loki label name ([a-zA-Z_][a-zA-Z0-9_]*, not "
                                 "starting with __): Loki would refuse every push")  # fmt: skip
            if name in _LOKI_OWN_LABELS:
                raise ValueError(f"{name!r} is set by the controller ({', '.join(_LOKI_OWN_LABELS)} are)")
        return v

    @field_validator("username")
    @classmethod
    def _username(cls, v: str | None) -> str | None:
        if v is not None and (not v or ":" in v or not v.isprintable()):
            raise ValueError(f"{v!r} is not a basic-auth user name (printable, no ':')")
        return v

    @model_validator(mode="after")
    def _fits_type(self) -> LogsTarget:
        if self.type == "syslog":
            if not self.host:
                raise ValueError("a syslog target needs host")
            loki_only = [f for f in ("url", "labels", "tenant", "auth", "username") if getattr(self, f)]
            if loki_only:
                raise ValueError(f"{', '.join(loki_only)}: for loki targets, not syslog")
        else:
            if not self.url:
                raise ValueError("a loki target needs url")
            if self.host is not None or self.port is not None:
                raise ValueError("host and port are for syslog targets, not loki (the url has them)")
            if self.tls is not None:
                if not self.url.startswith("https://"):
                    raise ValueError("tls is for an https url")
                if self.tls.server_name is not None:
                    raise ValueError("tls.server_name is for syslog targets: loki checks the url's host")
            if (self.auth == "basic") != (self.username is not None):
                raise ValueError("auth: basic needs username, and username is only for auth: basic")
            refused = loki_url_refusal(self.url, self.auth)  # the shipper applies it again
            if refused is not None:
                raise ValueError(refused)
        return self

    @property
    def tcp_port(self) -> int:
        return self.port or (6514 if self.tls else 514)


class LogsSection(_Strict):
    """site.yaml `logs:` -- where the controller's events and the nodes' journals are shipped
    (docs/logs.md)."""

    targets: list[LogsTarget] = Field(default_factory=list, description="the collectors")
    hostname: str | None = Field(
        default=None, description="syslog HOSTNAME of the messages (default: the controller host's name)"
    )
    journal: bool = Field(
        default=False,
        description="the nodes send their journals to the controller (POST /journal/upload), which "
        "ships them to the targets too; the built-in Flatcar config runs systemd-journal-upload",
    )

    @field_validator("targets")
    @classmethod
    def _unique(cls, v: list[LogsTarget]) -> list[LogsTarget]:
        seen: set[str] = set()
        for t in v:
            if t.name in seen:
                raise ValueError(f"two targets are named {t.name!r}")
            seen.add(t.name)
        return v

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, v: str | None) -> str | None:
        # RFC 5424 section 6.2.4: HOSTNAME is 1..255 printable US-ASCII characters
        if v is not None and not re.fullmatch(r"[!-~]{1,255}", v):
            raise ValueError(f"{v!r} is not a syslog host name (1..255 printable ASCII, no spaces)")
        return v


# --- the UPS (bastion.ups) -------------------------------------------------------------------
_UPS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_HOST_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


class UpsSection(_Strict):
    """site.yaml `ups:` -- the site's UPS as NUT's upsd serves it, and what the controller does
    on a power cut (bastion.ups). The password is never here: it is the secret store's
    `ups/<name>/password` (docs/ups.md)."""

    name: str = Field(description="the UPS's name in upsd (its section in ups.conf)")
    host: str = Field(default="127.0.0.1", min_length=1, description="where upsd listens")
    port: int = Field(default=3493, strict=True, ge=1, le=65535, description="upsd's TCP port")
    username: str | None = Field(
        default=None, description="an upsd.users user to log in as (optional: reading a UPS's "
        "variables needs no login); its password is the secret store's ups/<name>/password",
    )  # fmt: skip
    poll_s: int = Field(default=5, strict=True, ge=1, le=300, description="how often to ask upsd")
    timeout_s: int = Field(
        default=5, strict=True, ge=1, le=60, description="how long upsd may take to answer"
    )  # fmt: skip
    on_battery_s: int = Field(
        default=60, strict=True, ge=0, le=86400,
        description="on battery this long: no more power-ons, nodes asked to shut down",
    )  # fmt: skip
    low_charge: int = Field(
        default=20, strict=True, ge=0, le=100,
        description="on battery at or below this charge (%), or the UPS says low battery (LB): "
        "no more waiting for the nodes, the relays open at once",
    )  # fmt: skip
    shutdown_wait_s: int = Field(
        default=120, strict=True, ge=1, le=3600,
        description="how long each group of nodes (agents, then servers) is given to shut down",
    )  # fmt: skip
    quiet_s: int = Field(
        default=15, strict=True, ge=1, le=3600,
        description="a node asked to shut down whose heartbeats stopped this long ago is down",
    )  # fmt: skip
    resume_charge: int = Field(
        default=50, strict=True, ge=0, le=100,
        description="mains back and the battery at least this charged (%): power back on",
    )  # fmt: skip

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _UPS_NAME.fullmatch(v):
            raise ValueError(f"{v!r} is not a UPS name as upsd knows it ([A-Za-z0-9_.-], "
                             "at most 64)")  # fmt: skip
        return v

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        try:
            ipaddress.ip_address(v)
            return v
        except ValueError:
            pass
        if len(v) > 253 or not all(_HOST_LABEL.fullmatch(x) for x in v.removesuffix(".").split(".")):
            raise ValueError(f"{v[:70]!r} is not a host name or address (labels of letters, digits "
                             "and '-', each 1..63 characters)")  # fmt: skip
        return v

    @field_validator("username")
    @classmethod
    def _user(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9_.@-]{1,64}", v):
            raise ValueError(f"{v!r} is not an upsd user name ([A-Za-z0-9_.@-], at most 64)")
        return v

    @model_validator(mode="after")
    def _charges(self) -> UpsSection:
        if self.resume_charge <= self.low_charge:
            raise ValueError(f"resume_charge ({self.resume_charge}) must be above low_charge "
                             f"({self.low_charge}): else nodes come back on a nearly empty battery")  # fmt: skip
        return self


# --- the site's networks (docs/network.md) ---------------------------------------------------

# pxe: the LAN the device answers on and the nodes boot from (the controller's --listen);
# management: the operators' (the controller's --management-listen); cluster: k3s's own traffic
# between nodes (node-ip, flannel); ingress: where the cluster's services are reached.
NETWORK_NAMES = ("pxe", "management", "cluster", "ingress")
# the networks a node has an address of its own on, besides the PXE LAN (machines.yaml networks:)
NODE_NETWORKS = ("cluster", "ingress")
_IFNAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}$")  # Linux: at most 15 characters


class Network(_Strict):
    subnet: str = Field(description="the network's IPv4 subnet, e.g. 10.88.0.0/24")
    vlan: int | None = _int(1, 4094, "its 802.1Q VLAN id (unset: untagged)")
    interface: str | None = Field(
        default=None,
        description="the nodes' interface on it: a NIC of its own (eth1) or, with vlan, the VLAN "
        "interface's name (default vlan<id>, on the interface the node boots from)",
    )

    @field_validator("subnet")
    @classmethod
    def _subnet(cls, v: str) -> str:
        try:
            net = ipaddress.IPv4Network(v, strict=False)
        except ValueError:
            net = None
        if net is None or "/" not in v:
            raise ValueError(f"{v!r} is not an IPv4 subnet (ADDRESS/PREFIX, e.g. 10.88.0.0/24)")
        if net.network_address != ipaddress.IPv4Address(v.split("/")[0]):
            raise ValueError(f"{v!r} has host bits set: the subnet is {net}")
        return str(net)

    @field_validator("interface")
    @classmethod
    def _ifname(cls, v: str | None) -> str | None:
        if v is not None and not _IFNAME.match(v):
            raise ValueError(f"{v!r} is not an interface name (at most 15 letters, digits, '.', '-', '_')")
        return v

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.subnet)


class NetworksSection(_Strict):
    """site.yaml `networks:` -- the site's networks by what they carry (NETWORK_NAMES)."""

    pxe: Network | None = None
    management: Network | None = None
    cluster: Network | None = None
    ingress: Network | None = None

    @model_validator(mode="before")
    @classmethod
    def _known(cls, v: Any) -> Any:
        if isinstance(v, dict):
            unknown = [str(k) for k in v if k not in NETWORK_NAMES]
            if unknown:
                raise ValueError(f"{', '.join(map(repr, unknown))}: not a network this site knows "
                                 f"({', '.join(NETWORK_NAMES)})")  # fmt: skip
        return v

    @model_validator(mode="after")
    def _apart(self) -> NetworksSection:
        seen: list[tuple[str, Network]] = []
        for name, net in self.declared():
            for other, before in seen:
                if net.network.overlaps(before.network):
                    raise ValueError(f"{name} ({net.subnet}) overlaps {other} ({before.subnet}): "
                                     "the networks must not share addresses")  # fmt: skip
                if net.vlan is not None and net.vlan == before.vlan:
                    raise ValueError(f"{name} and {other} are both VLAN {net.vlan}")
            if name in NODE_NETWORKS and net.vlan is None and net.interface is None:
                raise ValueError(f"{name}: give its vlan (tagged on the interface the nodes boot "
                                 "from) or its interface (a NIC of its own on the nodes)")  # fmt: skip
            seen.append((name, net))
        return self

    def declared(self) -> list[tuple[str, Network]]:
        return [(name, getattr(self, name)) for name in NETWORK_NAMES if getattr(self, name) is not None]

    def listener_problems(self, boot: tuple[str, int], management: tuple[str, int] | None) -> list[str]:
        """What is wrong with the controller's listeners on these networks: an address off its
        network."""
        out = []
        for option, where, name in (("--listen", boot, "pxe"), ("--management-listen", management, "management")):
            net = getattr(self, name)
            if where is None or net is None:
                continue
            try:
                ip = ipaddress.ip_address(where[0])
            except ValueError:
                continue  # a host name
            if not ip.is_unspecified and ip not in net.network:
                out.append(f"{option} {where[0]}:{where[1]} is not on site.yaml networks.{name} ({net.subnet})")
        return out

    def management_unserved(self, management: tuple[str, int] | None) -> str | None:
        """What to say when the site has a management network and no management listener."""
        if management is None and self.management is not None:
            return (f"site.yaml declares networks.management ({self.management.subnet}): serve "
                    "the management API there with --management-listen, not on the PXE LAN")
        return None

    def of(self, address: str) -> str | None:
        """The name of the declared network `address` is in, else None."""
        ip = ipaddress.ip_address(address)
        return next((name for name, net in self.declared() if ip in net.network), None)


class SiteFile(_Strict):
    """site.yaml"""

    site: str | None = Field(default=None, description="the site's name")
    controller_url: str | None = Field(
        default=None,
        description="how nodes reach the controller, e.g. http://10.77.0.1:8080 "
        "(default: the URL the request came to)",
    )
    default_profile: str | None = Field(
        default=None, description="profile for machines that match nothing else"
    )
    roles: dict[str, str] = Field(default_factory=dict, description="role -> profile id")
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="variables for every machine's templates"
    )
    device: DeviceSection | None = Field(
        default=None, description="the network-boot device's configuration (`bastion flash`)"
    )
    cluster: ClusterSection | None = Field(
        default=None, description="a k3s cluster of the machines with role server or agent"
    )
    defaults: MachineDefaults = Field(
        default_factory=MachineDefaults,
        description="every machine's desired state unless machines.yaml says otherwise",
    )
    operator: OperatorSection = Field(
        default_factory=OperatorSection, description="how the operator converges the site"
    )
    logs: LogsSection = Field(
        default_factory=LogsSection, description="where events and journals are shipped off-site"
    )
    ups: UpsSection | None = Field(
        default=None, description="the site's UPS (NUT's upsd) and the power-cut policy"
    )
    networks: NetworksSection | None = Field(
        default=None, description="the site's networks: PXE LAN, management, cluster, ingress "
        "(docs/network.md)",
    )

    @field_validator("controller_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not re.match(r"^https?://[^/\s]+(/[^\s]*)?$", v):
            raise ValueError(f"{v!r} is not an http(s) URL")
        if re.search(r"[\"'`;$\\{}<>|\x00-\x1f\x7f]", v):  # written into iPXE and GRUB scripts
            raise ValueError(f"{v[:80]!r}: a quote, ';', '$', '\\', braces or a control character "
                             "cannot go into the boot scripts the URL is written into")  # fmt: skip
        return v.rstrip("/")

    @model_validator(mode="after")
    def _cache_beside_controller(self) -> SiteFile:
        """A mirror served on the controller's own host and port (controller_url) could not
        start, or took the port."""
        cache = self.cluster.registry_cache if self.cluster is not None else None
        if cache is None or cache.serve is None or self.controller_url is None:
            return self
        ours, theirs = urlsplit(self.controller_url), urlsplit(cache.url)
        port = ours.port or (443 if ours.scheme == "https" else 80)
        if ours.hostname != theirs.hostname:
            return self
        for mirror, on in regcache_plan.ports(cache).items():
            if on != port:
                continue
            pinned = isinstance(cache.mirrors, dict)
            field = "cluster.registry_cache.mirrors" if pinned else "cluster.registry_cache"
            fix = "give it another" if pinned else f"give url a port with {len(cache.mirrors)} free ones from it"
            raise ValueError(f"{field}: {mirror} would be served on {theirs.hostname}:{port}, "
                             f"controller_url's own port: {fix}")  # fmt: skip
        return self


class Heartbeat(_Strict):
    """The device's node watchdog for this machine: once the node has sent a heartbeat
    (POST /heartbeat), silence longer than timeout_s power-cycles it; if it does not beat
    again within boot_s, it is cycled again with boot_s doubling, up to the device's cap."""

    timeout_s: int = Field(ge=1, le=86400, description="silence that counts as hung")
    boot_s: int = Field(default=600, ge=1, le=86400, description="time a boot may take")


class MachineEntry(_Strict):
    """One entry of machines.yaml"""

    name: str
    mac: str | None = None
    uuid: str | None = None
    arch: str | None = None
    role: str | None = None
    profile: str | None = None
    hostname: str | None = None
    relay: int | None = Field(
        default=None, ge=0, le=63, strict=True,  # (YAML's true was taken as channel 1)
        description="the device's relay channel (0-based) that switches this machine's power",
    )
    heartbeat: Heartbeat | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)
    # k3s cluster nodes (site.yaml cluster:, role server or agent)
    address: str | None = Field(
        default=None,
        description="its fixed LAN address (a DHCP reservation); required when its Ignition reads "
        "secrets: its boot script goes to that address only",
    )
    disk: MachineDisk | None = None
    k3s: MachineK3s | None = None
    wireguard: MachineWireguard | None = None
    networks: dict[str, str] | None = Field(
        default=None,
        description="its address on each of site.yaml's node networks (cluster, ingress), "
        "e.g. {cluster: 10.90.0.21}",
    )
    # desired state (bastion.operator); site.yaml `defaults:` for what is not set here
    power: Literal["on", "off"] | None = Field(
        default=None,
        description="on: powered and running (the operator boots it through its relay and "
        "watches the boot); off: powered off. Needs relay",
    )
    maintenance: bool | None = Field(
        default=None, description="true: the operator leaves this machine alone"
    )
    reprovision: str | None = Field(
        default=None, min_length=1, max_length=64,
        description="change it (a date, a counter) to have the machine installed again: its "
        "install-once mark is cleared and, when it is on, it is power-cycled into a network boot",
    )  # fmt: skip

    check_power = field_validator("power", mode="before")(_on_off)
    check_reprovision = field_validator("reprovision", mode="before")(_token)
    check_labels = field_validator("labels")(_one_line)

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, v: str | None) -> str | None:
        if v is not None and not HOST_NAME.fullmatch(v):
            raise ValueError(f"{v[:60]!r} is not a host name (RFC 1123: labels of letters, digits "
                             "and '-', 1..63 characters each, separated by dots)")  # fmt: skip
        return v

    check_address = field_validator("address")(_ip)

    @field_validator("networks")
    @classmethod
    def _networks(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        return {k: _ipv4(str(a)) for k, a in v.items()} if v is not None else v

    @field_validator("disk", mode="before")
    @classmethod
    def _disk(cls, v: Any) -> Any:
        return {"device": v} if isinstance(v, str) else v

    @field_validator("wireguard", mode="before")
    @classmethod
    def _wireguard(cls, v: Any) -> Any:
        return {"enabled": v} if isinstance(v, bool) else v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "machine name")

    @field_validator("mac")
    @classmethod
    def _mac(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            return parse_mac(v)
        except Malformed:
            raise ValueError(f"{v!r} is not a MAC address") from None

    @field_validator("uuid")
    @classmethod
    def _uuid(cls, v: str | None) -> str | None:
        if v is None:
            return v
        text = uuid_text(v)
        if text is None:
            raise ValueError(f"{v!r} is not a UUID")
        return text

    @field_validator("arch")
    @classmethod
    def _arch(cls, v: str | None) -> str | None:
        if v is None:
            return v
        arch = arch_name(v)
        if arch is None:
            raise ValueError(f"{v!r} is not an architecture ({', '.join(ARCHES)})")
        return arch


class MachinesFile(_Strict):
    """machines.yaml"""

    machines: list[MachineEntry] = Field(default_factory=list)


class BootSpec(_Strict):
    kernel: str
    initrd: list[str] = Field(default_factory=list)
    args: list[str] = Field(default_factory=list)

    check_lines = field_validator("kernel", "initrd", "args")(_one_line)


class ProfileFile(_Strict):
    """profiles/<id>.yaml (Edge Bastion's own profile format)"""

    id: str | None = None
    name: str | None = None
    os: Literal["flatcar", "custom"] = "flatcar"
    kernel: str
    initrd: list[str] = Field(default_factory=list)
    args: list[str] = Field(default_factory=list)
    arch: dict[str, BootSpec] = Field(default_factory=dict)
    ignition: str | None = None
    generic: str | None = None
    # `once`: network-boot until the machine reports its first boot, then its local disk
    # (bastion.state.install); `always`: network-boot every time
    install: Literal["always", "once"] = "always"

    check_lines = field_validator("kernel", "initrd", "args")(_one_line)

    @field_validator("arch")
    @classmethod
    def _arches(cls, v: dict[str, BootSpec]) -> dict[str, BootSpec]:
        out = {}
        for key, spec in v.items():
            arch = ARCH_ALIASES.get(key, key)
            if arch not in ARCHES:
                raise ValueError(f"{key!r} is not an architecture ({', '.join(ARCHES)})")
            out[arch] = spec
        return out


# --- matchbox -----------------------------------------------------------------------------------


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class MatchboxBoot(_Lenient):
    kernel: str = ""
    initrd: list[str] | None = None
    args: list[str] | None = None

    check_lines = field_validator("kernel", "initrd", "args")(_one_line)


class MatchboxProfile(_Lenient):
    """profiles/<id>.json (matchbox)"""

    id: str
    name: str = ""
    boot: MatchboxBoot | None = None
    ignition_id: str = ""
    generic_id: str = ""
    cloud_id: str = ""

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not v:
            raise ValueError("is required (matchbox refuses a profile without an id)")
        return v


class MatchboxGroup(_Lenient):
    """groups/<id>.json (matchbox)"""

    id: str = ""
    name: str = ""
    profile: str
    selector: dict[str, str] | None = None
    metadata: dict[str, Any] | None = None

    @field_validator("profile")
    @classmethod
    def _profile(cls, v: str) -> str:
        if not v:
            raise ValueError("is required (a group needs a profile)")
        return v
