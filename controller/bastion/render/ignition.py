"""Ignition spec 3.3.0: its shape, its validation, and raw configs brought to it.

Edge Bastion serves Ignition spec 3.3.0: the newest that Debian's ignition 2.14
(`ignition-validate`) accepts and that Flatcar runs. Configs written for 3.0.0-3.4.0 are forward
compatible into 3.3.0 (fields are only ever added), except for what 3.4.0 added; a config using
any of that is refused with a message naming the field.

`SPEC` is the schema (field names, types, required fields) written from the published spec.
`validate(config)` checks a config against it plus the semantic rules Ignition itself enforces
(absolute clean paths, unique entries, unit names, modes, URL schemes, hashes) and returns a list
of `Problem`s, each with the JSON path it is about. `from_raw(text)` parses a raw Ignition file and
returns a 3.3.0 config or raises IgnitionError.
"""

from __future__ import annotations

import base64
import gzip
import json
import posixpath
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote_to_bytes, urlsplit

SPEC_VERSION = "3.3.0"
_ACCEPTED_VERSIONS = ("3.0.0", "3.1.0", "3.2.0", "3.3.0", "3.4.0")


class IgnitionError(ValueError):
    """A config that cannot be served: unparseable, wrong version, or failing validation."""


@dataclass(frozen=True)
class Problem:
    path: str  # JSON path such as `$.storage.files[0].mode`
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


# ---------------------------------------------------------------------------------------------
# The schema
# ---------------------------------------------------------------------------------------------

S, I, B = "string", "integer", "boolean"


class Obj:
    """An object type: field name -> type (S/I/B, an Obj, or [type] for an array)."""

    def __init__(
        self, name: str, fields: dict[str, Any], required: tuple[str, ...] = (), later: tuple[str, ...] = ()
    ):
        self.name = name
        self.fields = fields
        self.required = required
        # fields that exist only in spec 3.4.0 (known so the error can say so)
        self.later = later


HEADER = Obj("httpHeader", {"name": S, "value": S}, required=("name",))
VERIFICATION = Obj("verification", {"hash": S})
RESOURCE = Obj(
    "resource",
    {"source": S, "compression": S, "httpHeaders": [HEADER], "verification": VERIFICATION},
)
IGNITION = Obj(
    "ignition",
    {
        "version": S,
        "config": Obj("ignition-config", {"merge": [RESOURCE], "replace": RESOURCE}),
        "timeouts": Obj("timeouts", {"httpResponseHeaders": I, "httpTotal": I}),
        "security": Obj(
            "security", {"tls": Obj("tls", {"certificateAuthorities": [RESOURCE]})}
        ),
        "proxy": Obj("proxy", {"httpProxy": S, "httpsProxy": S, "noProxy": [S]}),
    },
    required=("version",),
)
PARTITION = Obj(
    "partition",
    {
        "label": S,
        "number": I,
        "sizeMiB": I,
        "startMiB": I,
        "typeGuid": S,
        "guid": S,
        "wipePartitionEntry": B,
        "shouldExist": B,
        "resize": B,
    },
)
DISK = Obj("disk", {"device": S, "wipeTable": B, "partitions": [PARTITION]}, required=("device",))
RAID = Obj(
    "raid",
    {"name": S, "level": S, "devices": [S], "spares": I, "options": [S]},
    required=("name",),
)
TANG = Obj("tang", {"url": S, "thumbprint": S}, later=("advertisement",))
CLEVIS = Obj(
    "clevis",
    {
        "custom": Obj("clevisCustom", {"pin": S, "config": S, "needsNetwork": B}),
        "tpm2": B,
        "tang": [TANG],
        "threshold": I,
    },
)
LUKS = Obj(
    "luks",
    {
        "name": S,
        "label": S,
        "uuid": S,
        "device": S,
        "keyFile": RESOURCE,
        "wipeVolume": B,
        "clevis": CLEVIS,
        "options": [S],
    },
    required=("name",),
    later=("discard", "openOptions", "cex"),
)
FILESYSTEM = Obj(
    "filesystem",
    {
        "path": S,
        "device": S,
        "format": S,
        "options": [S],
        "mountOptions": [S],
        "wipeFilesystem": B,
        "label": S,
        "uuid": S,
    },
    required=("device",),
)
OWNER = Obj("owner", {"id": I, "name": S})
_NODE = {"path": S, "overwrite": B, "user": OWNER, "group": OWNER}
FILE = Obj(
    "file", {**_NODE, "mode": I, "contents": RESOURCE, "append": [RESOURCE]}, required=("path",)
)
DIRECTORY = Obj("directory", {**_NODE, "mode": I}, required=("path",))
LINK = Obj("link", {**_NODE, "target": S, "hard": B}, required=("path",))
STORAGE = Obj(
    "storage",
    {
        "disks": [DISK],
        "raid": [RAID],
        "luks": [LUKS],
        "filesystems": [FILESYSTEM],
        "files": [FILE],
        "directories": [DIRECTORY],
        "links": [LINK],
    },
)
DROPIN = Obj("dropin", {"name": S, "contents": S}, required=("name",))
UNIT = Obj(
    "unit",
    {"name": S, "enabled": B, "mask": B, "contents": S, "dropins": [DROPIN]},
    required=("name",),
)
SYSTEMD = Obj("systemd", {"units": [UNIT]})
USER = Obj(
    "user",
    {
        "name": S,
        "passwordHash": S,
        "sshAuthorizedKeys": [S],
        "uid": I,
        "gecos": S,
        "homeDir": S,
        "noCreateHome": B,
        "primaryGroup": S,
        "groups": [S],
        "noUserGroup": B,
        "system": B,
        "noLogInit": B,
        "shell": S,
        "shouldExist": B,
    },
    required=("name",),
)
GROUP = Obj(
    "group",
    {"name": S, "gid": I, "passwordHash": S, "system": B, "shouldExist": B},
    required=("name",),
)
PASSWD = Obj("passwd", {"users": [USER], "groups": [GROUP]})
KERNEL_ARGUMENTS = Obj("kernelArguments", {"shouldExist": [S], "shouldNotExist": [S]})
SPEC = Obj(
    "config",
    {
        "ignition": IGNITION,
        "storage": STORAGE,
        "systemd": SYSTEMD,
        "passwd": PASSWD,
        "kernelArguments": KERNEL_ARGUMENTS,
    },
    required=("ignition",),
)

# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

_TYPE_NAMES = {S: "a string", I: "an integer", B: "a boolean"}
_UNIT_SUFFIXES = (
    ".service",
    ".socket",
    ".device",
    ".mount",
    ".automount",
    ".swap",
    ".target",
    ".path",
    ".timer",
    ".snapshot",
    ".slice",
    ".scope",
)
_SCHEMES = ("http", "https", "tftp", "s3", "gs", "data")
_HASH_LENGTHS = {"sha512": 128, "sha256": 64}
_GUID = re.compile(r"^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$")
_FORMATS = ("ext4", "btrfs", "xfs", "vfat", "swap", "none", "")
_RAID_LEVELS = ("linear", "raid0", "0", "stripe", "raid1", "1", "mirror", "raid4", "4",
                "raid5", "5", "raid6", "6", "raid10", "10")  # fmt: skip


def type_problem(value: Any, kind: Any) -> str | None:
    """Why `value` is not of schema type `kind`, or None when it is."""
    if isinstance(kind, Obj):
        return None if isinstance(value, dict) else "must be an object"
    if isinstance(kind, list):
        return None if isinstance(value, list) else "must be a list"
    ok = {
        S: isinstance(value, str),
        I: isinstance(value, int) and not isinstance(value, bool),
        B: isinstance(value, bool),
    }[kind]
    return None if ok else f"must be {_TYPE_NAMES[kind]}"


def _check_shape(value: Any, kind: Any, path: str, out: list[Problem]) -> None:
    if isinstance(kind, list):
        if not isinstance(value, list):
            out.append(Problem(path, "must be a list"))
            return
        for i, item in enumerate(value):
            if item is None and not isinstance(kind[0], Obj):
                continue
            _check_shape(item, kind[0], f"{path}[{i}]", out)
        return
    if isinstance(kind, Obj):
        if not isinstance(value, dict):
            out.append(Problem(path, "must be an object"))
            return
        for name in kind.required:
            if value.get(name) is None:
                out.append(Problem(f"{path}.{name}", "is required"))
        for name, item in value.items():
            sub = f"{path}.{name}"
            if name in kind.later:
                out.append(Problem(sub, f"needs Ignition spec 3.4.0; Edge Bastion serves {SPEC_VERSION}"))
            elif name not in kind.fields:
                out.append(Problem(sub, f"is not a field of {kind.name}"))
            elif item is not None:
                _check_shape(item, kind.fields[name], sub, out)
        return
    why = type_problem(value, kind)
    if why:
        out.append(Problem(path, why))


def validate(config: Any) -> list[Problem]:
    """Every problem with `config` as an Ignition 3.3.0 config; empty when it is valid."""
    out: list[Problem] = []
    _check_shape(config, SPEC, "$", out)
    if out:
        return out
    version = config["ignition"].get("version")
    if version != SPEC_VERSION:
        out.append(Problem("$.ignition.version", f"must be {SPEC_VERSION!r}, not {version!r}"))
    _check_ignition(config["ignition"], out)
    _check_storage(config.get("storage") or {}, out)
    _check_systemd(config.get("systemd") or {}, out)
    _check_passwd(config.get("passwd") or {}, out)
    return out


def _items(section: dict, name: str) -> list[tuple[int, dict]]:
    return [(i, x) for i, x in enumerate(section.get(name) or []) if isinstance(x, dict)]


def _unique(entries: list[tuple[int, dict]], key: str, path: str, out: list[Problem]) -> None:
    seen: set[Any] = set()
    for i, entry in entries:
        value = entry.get(key)
        if value is None:
            continue
        if value in seen:
            out.append(Problem(f"{path}[{i}].{key}", f"duplicate entry {value!r}"))
        seen.add(value)


def _check_resource(res: dict | None, path: str, out: list[Problem], need_source: bool = False) -> None:
    if not res:
        if need_source:
            out.append(Problem(path, "source is required"))
        return
    source = res.get("source")
    if source is None:
        if need_source:
            out.append(Problem(f"{path}.source", "is required"))
        if (res.get("verification") or {}).get("hash") is not None:
            out.append(Problem(f"{path}.verification", "needs a source to verify"))
    else:
        why = url_problem(source)
        if why:
            out.append(Problem(f"{path}.source", why))
    compression = res.get("compression")
    if compression not in (None, "", "gzip"):
        out.append(Problem(f"{path}.compression", f"must be gzip or empty, not {compression!r}"))
    digest = (res.get("verification") or {}).get("hash")
    if digest is not None:
        kind, _, hexpart = digest.partition("-")
        if kind not in _HASH_LENGTHS:
            out.append(Problem(f"{path}.verification.hash", "must be sha512-<hex> or sha256-<hex>"))
        elif len(hexpart) != _HASH_LENGTHS[kind] or not re.fullmatch(r"[0-9a-fA-F]*", hexpart):
            out.append(Problem(f"{path}.verification.hash", f"wrong length or digits for {kind}"))
    headers = res.get("httpHeaders") or []
    if headers:
        if source is not None and urlsplit(source).scheme not in ("http", "https"):
            out.append(Problem(f"{path}.httpHeaders", "are only for http(s) sources"))
        names: set[str] = set()
        for i, h in enumerate(headers):
            name = h.get("name") or ""
            if not name:
                out.append(Problem(f"{path}.httpHeaders[{i}].name", "must not be empty"))
            if name.lower() in names:
                out.append(Problem(f"{path}.httpHeaders[{i}].name", f"duplicate header {name!r}"))
            names.add(name.lower())


def url_problem(url: str) -> str | None:
    """Why Ignition 3.3 would refuse `url` as a source, or None."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "is not a valid URL"
    scheme = parts.scheme.lower()
    if scheme == "arn":
        return f"arn: sources need Ignition spec 3.4.0; Edge Bastion serves {SPEC_VERSION}"
    if scheme not in _SCHEMES:
        return f"unsupported URL scheme {parts.scheme!r}" if scheme else "is not a URL (no scheme)"
    if scheme == "data":
        try:
            decode_data_url(url)
        except ValueError as e:
            return f"bad data URL: {e}"
    return None


def _check_ignition(ign: dict, out: list[Problem]) -> None:
    config = ign.get("config") or {}
    for i, res in enumerate(config.get("merge") or []):
        _check_resource(res, f"$.ignition.config.merge[{i}]", out, need_source=True)
    if config.get("replace"):
        _check_resource(config["replace"], "$.ignition.config.replace", out, need_source=True)
    cas = ((ign.get("security") or {}).get("tls") or {}).get("certificateAuthorities") or []
    for i, res in enumerate(cas):
        _check_resource(res, f"$.ignition.security.tls.certificateAuthorities[{i}]", out, True)
    proxy = ign.get("proxy") or {}
    for key in ("httpProxy", "httpsProxy"):
        if proxy.get(key) and urlsplit(proxy[key]).scheme not in ("http", "https"):
            out.append(Problem(f"$.ignition.proxy.{key}", "proxies must be http(s)"))


def _clean_path(path: str) -> str | None:
    if not path:
        return "path not specified"
    if not path.startswith("/"):
        return "path not absolute"
    if posixpath.normpath(path) != path or path.startswith("//"):
        return "path is not fully simplified"
    return None


def _check_mode(mode: Any, path: str, out: list[Problem]) -> None:
    if mode is None:
        return
    if not 0 <= mode <= 0o7777:
        out.append(Problem(path, f"illegal file mode {mode}"))
    elif mode & 0o7000:
        out.append(
            Problem(path, f"setuid/setgid/sticky bits need Ignition spec 3.4.0 (mode {mode:#o})")
        )


def _check_storage(storage: dict, out: list[Problem]) -> None:
    paths: dict[str, str] = {}
    for section in ("files", "directories", "links"):
        for i, node in _items(storage, section):
            where = f"$.storage.{section}[{i}]"
            p = node.get("path") or ""
            why = _clean_path(p)
            if why:
                out.append(Problem(f"{where}.path", why))
            elif p in paths:
                out.append(Problem(f"{where}.path", f"duplicate entry (also {paths[p]})"))
            else:
                paths[p] = where
            for owner in ("user", "group"):
                o = node.get(owner) or {}
                if o.get("id") is not None and o.get("name") is not None:
                    out.append(Problem(f"{where}.{owner}", "cannot set both id and name"))
            if section != "links":
                _check_mode(node.get("mode"), f"{where}.mode", out)
    for i, f in _items(storage, "files"):
        where = f"$.storage.files[{i}]"
        _check_resource(f.get("contents"), f"{where}.contents", out)
        if f.get("overwrite") and not (f.get("contents") or {}).get("source"):
            out.append(Problem(f"{where}.overwrite", "must be false if contents.source is unset"))
        for j, res in enumerate(f.get("append") or []):
            _check_resource(res, f"{where}.append[{j}]", out)
    for i, link in _items(storage, "links"):
        if not link.get("target"):
            out.append(Problem(f"$.storage.links[{i}].target", "link target is required"))
    disks = _items(storage, "disks")
    _unique(disks, "device", "$.storage.disks", out)
    for i, disk in disks:
        where = f"$.storage.disks[{i}]"
        why = _clean_path(disk.get("device") or "")
        if why:
            out.append(Problem(f"{where}.device", why.replace("path", "device")))
        parts = _items(disk, "partitions")
        numbers = [(j, p) for j, p in parts if p.get("number")]
        _unique(numbers, "number", f"{where}.partitions", out)
        _unique(parts, "label", f"{where}.partitions", out)
        for j, part in parts:
            pw = f"{where}.partitions[{j}]"
            label = part.get("label")
            if label is not None and len(label) > 36:
                out.append(Problem(f"{pw}.label", "partition labels may not exceed 36 characters"))
            for key in ("guid", "typeGuid"):
                value = part.get(key)
                if value and not _GUID.match(value):
                    out.append(Problem(f"{pw}.{key}", "is not a GUID"))
            if (part.get("number") or 0) < 0:
                out.append(Problem(f"{pw}.number", "must not be negative"))
            if not part.get("number") and not label:
                out.append(Problem(pw, "a partition number >= 1 or a label must be specified"))
    _unique(_items(storage, "raid"), "name", "$.storage.raid", out)
    for i, raid in _items(storage, "raid"):
        where = f"$.storage.raid[{i}]"
        if not raid.get("level"):
            out.append(Problem(f"{where}.level", "raid level is required"))
        elif raid["level"] not in _RAID_LEVELS:
            out.append(Problem(f"{where}.level", f"unrecognized raid level {raid['level']!r}"))
        if not raid.get("devices"):
            out.append(Problem(f"{where}.devices", "raid devices required"))
    luks = _items(storage, "luks")
    _unique(luks, "name", "$.storage.luks", out)
    for i, dev in luks:
        where = f"$.storage.luks[{i}]"
        if "/" in (dev.get("name") or ""):
            out.append(Problem(f"{where}.name", "device names cannot contain slashes"))
        if not dev.get("device"):
            out.append(Problem(f"{where}.device", "device not specified"))
        _check_resource(dev.get("keyFile"), f"{where}.keyFile", out)
        for j, tang in enumerate((dev.get("clevis") or {}).get("tang") or []):
            if not tang.get("thumbprint"):
                out.append(Problem(f"{where}.clevis.tang[{j}].thumbprint", "is required"))
    filesystems = _items(storage, "filesystems")
    _unique(filesystems, "device", "$.storage.filesystems", out)
    for i, fs in filesystems:
        where = f"$.storage.filesystems[{i}]"
        why = _clean_path(fs.get("device") or "")
        if why:
            out.append(Problem(f"{where}.device", why.replace("path", "device")))
        fmt = fs.get("format")
        if fmt not in (None, *_FORMATS):
            out.append(Problem(f"{where}.format", f"invalid filesystem format {fmt!r}"))
        if not fmt and any(
            fs.get(k) for k in ("path", "label", "uuid", "wipeFilesystem", "options", "mountOptions")
        ):
            out.append(Problem(f"{where}.format", "is required when other filesystem fields are set"))
        if fs.get("path") is not None:
            why = _clean_path(fs["path"])
            if why:
                out.append(Problem(f"{where}.path", why))


_UNIT_LINE = re.compile(r"^[A-Za-z0-9_\-.@%]+\s*=")


def unit_contents_problem(contents: str) -> str | None:
    """Why systemd (and Ignition) would not parse `contents` as a unit file, or None."""
    section = None
    continued = False
    for n, raw in enumerate(contents.split("\n"), 1):
        line = raw.strip()
        if continued:
            continued = line.endswith("\\")
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            if not line.endswith("]") or len(line) < 3:
                return f"line {n}: bad section header {raw!r}"
            section = line
            continue
        if section is None:
            return f"line {n}: assignment outside of a section"
        if not _UNIT_LINE.match(line):
            return f"line {n}: expected key=value, got {raw!r}"
        continued = line.endswith("\\")
    return None


def _check_systemd(systemd: dict, out: list[Problem]) -> None:
    units = _items(systemd, "units")
    _unique(units, "name", "$.systemd.units", out)
    for i, unit in units:
        where = f"$.systemd.units[{i}]"
        name = unit.get("name") or ""
        if not name.endswith(_UNIT_SUFFIXES):
            out.append(Problem(f"{where}.name", f"invalid systemd unit extension in {name!r}"))
        if unit.get("contents") is not None:
            why = unit_contents_problem(unit["contents"])
            if why:
                out.append(Problem(f"{where}.contents", why))
        dropins = _items(unit, "dropins")
        _unique(dropins, "name", f"{where}.dropins", out)
        for j, d in dropins:
            if not (d.get("name") or "").endswith(".conf"):
                out.append(Problem(f"{where}.dropins[{j}].name", "must end in .conf"))
            if d.get("contents") is not None:
                why = unit_contents_problem(d["contents"])
                if why:
                    out.append(Problem(f"{where}.dropins[{j}].contents", why))


def _check_passwd(passwd: dict, out: list[Problem]) -> None:
    users = _items(passwd, "users")
    _unique(users, "name", "$.passwd.users", out)
    _unique(_items(passwd, "groups"), "name", "$.passwd.groups", out)
    for i, user in users:
        keys = user.get("sshAuthorizedKeys") or []
        seen: set[str] = set()
        for j, key in enumerate(keys):
            if key in seen:
                out.append(Problem(f"$.passwd.users[{i}].sshAuthorizedKeys[{j}]", "duplicate key"))
            seen.add(key)


# ---------------------------------------------------------------------------------------------
# Raw Ignition files and data URLs
# ---------------------------------------------------------------------------------------------


def from_raw(text: str | bytes, name: str = "config") -> dict:
    """A raw Ignition file (spec 3.0.0-3.4.0) as a valid 3.3.0 config, or raise IgnitionError."""
    try:
        config = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise IgnitionError(f"{name}: not JSON: {e}") from None
    if not isinstance(config, dict):
        raise IgnitionError(f"{name}: an Ignition config must be a JSON object")
    version = (config.get("ignition") or {}).get("version") if isinstance(config.get("ignition"), dict) else None
    if not isinstance(version, str):
        raise IgnitionError(f"{name}: $.ignition.version is required")
    if version.startswith(("1.", "2.")) or version == "1":
        raise IgnitionError(
            f"{name}: Ignition spec {version} is not supported; convert it to 3.x "
            "(ign-converter) first"
        )
    if version not in _ACCEPTED_VERSIONS:
        raise IgnitionError(
            f"{name}: unsupported Ignition spec version {version!r} "
            f"(accepted: {', '.join(_ACCEPTED_VERSIONS)})"
        )
    config = json.loads(json.dumps(config))  # a private copy
    config["ignition"]["version"] = SPEC_VERSION
    problems = validate(config)
    if problems:
        raise IgnitionError(f"{name}: " + "; ".join(str(p) for p in problems))
    return config


# Left unescaped in data: URLs: RFC 3986 unreserved and sub-delims plus ':', '/', '@'.
_DATA_SAFE = "-._~!$&'()*+,;=:/@"


def data_url(data: bytes, compress_over: int = 4096) -> tuple[str, str | None]:
    """`data` as an RFC 2397 URL and the compression to declare (None or "gzip").

    Small or incompressible contents are percent-encoded as they are, so that the served config
    stays readable; large compressible ones are gzipped (deterministically, mtime 0) and base64'd.
    """
    if len(data) > compress_over:
        packed = gzip.compress(data, mtime=0)
        if len(packed) * 4 / 3 < len(data) * 0.9:
            return "data:;base64," + base64.b64encode(packed).decode(), "gzip"
    return "data:," + quote(data, safe=_DATA_SAFE), None


def decode_data_url(url: str) -> bytes:
    """The bytes of an RFC 2397 `data:` URL, or raise ValueError."""
    if not url.startswith("data:"):
        raise ValueError("not a data URL")
    head, sep, body = url[5:].partition(",")
    if not sep:
        raise ValueError("no ',' after the media type")
    if head.endswith(";base64"):
        try:
            return base64.b64decode(unquote_to_bytes(body), validate=True)
        except ValueError as e:
            raise ValueError(f"bad base64: {e}") from None
    return unquote_to_bytes(body)


def dumps(config: dict) -> str:
    """The served form of a config: compact, deterministic JSON."""
    return json.dumps(config, separators=(",", ":"), ensure_ascii=False)
