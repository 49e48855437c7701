"""Loading a site directory: read every file, validate it, cross-check, and build one Site.

A site directory may hold Edge Bastion's own YAML, matchbox's layout, or both:

    site.yaml             site name, controller URL, default profile, roles, shared metadata
    machines.yaml         machines: name, mac/uuid, arch, role/profile, labels, metadata
    profiles/<id>.yaml    Edge Bastion profiles (kernel, initrd, args, per-arch boot, ignition)
    profiles/<id>.json    matchbox profiles
    groups/<id>.json      matchbox groups (selector, profile, metadata)
    ignition/             Butane templates (.yaml/.yml/.bu) and raw Ignition (.ign/.ignition/.json)
    generic/              generic templates
    files/                contents for Butane `local:` references
    assets/               served at /assets/ (kernels, initrds)

`load_site(root)` returns a Site or raises SiteError listing every problem, each naming the file,
the line when known, the field and what is wrong:

    machines.yaml:7: machines[2].mac: 'zz:00' is not a MAC address

A site with a k3s cluster is also checked against what its secret store says went out
(bastion.state.ledger: the server that started the cluster, the nodes' tunnel addresses):
`load_site(root, secrets=DIR)` reads the store at DIR, by default the one `bastion serve` uses
without --secrets (bastion.state.secrets.secrets_dir). A load only reads it: it never makes or
changes a store, and one that is missing or unreadable is none (machines.yaml alone decides).
"""

from __future__ import annotations

import base64
import dataclasses
import errno
import gzip
import ipaddress
import json
import posixpath
import stat
import urllib.parse
from pathlib import Path
from typing import Any

import pydantic
import yaml

from bastion import match, yamlfile

from bastion.cluster import plan as cluster
from bastion.regcache import plan as regcache
from bastion.render import butane, gotemplate, ignition
from bastion.render.config import (
    PLACEHOLDER_SECRETS,
    BootRequest,
    RenderError,
    compile_jinja,
    render_generic,
    render_ignition,
    takes_onetime_url,
    uses_secrets,
)
from bastion.site import schema
from bastion.state.ledger import Ledger
from bastion.state.secrets import secrets_dir
from bastion.ups import core as ups_core
from bastion.model import (
    Boot,
    Group,
    Machine,
    Profile,
    Site,
    SiteSettings,
    TemplateFile,
)

RAW_IGNITION_SUFFIXES = (".ign", ".ignition", ".json")
_TEMPLATE_MARKERS = ("{{", "{%", "{#")
_PLACEHOLDER_URL = "http://controller.invalid"


class SiteError(ValueError):
    """The site directory cannot be loaded; `problems` lists every reason, one line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))

    def report(self, site_dir: Path | str) -> list[str]:
        """The problems as the command lines print them: indented, under a line naming the site."""
        return [f"the site in {site_dir} does not load:", *(f"  {p}" for p in self.problems)]


class SiteFiles:
    """Reads a site directory, optionally through an overlay of pending edits (path -> bytes or
    None for a deletion), so that an edit can be validated before it is written."""

    def __init__(self, root: Path, overlay: dict[str, bytes | None] | None = None):
        self.root = root
        self._real_root = root.resolve()  # what every file read must stay inside
        self.overlay = dict(overlay or {})

    def read(self, rel: str) -> bytes | None:
        """The file's bytes; None when there is no such file. Unreadable when there is one
        that cannot be read (a directory in its place, no permission, a symlink loop)."""
        if rel in self.overlay:
            return self.overlay[rel]
        path = self.root / rel
        try:
            mode = path.stat().st_mode
            if not path.resolve().is_relative_to(self._real_root):
                # a symlink to /etc/passwd in generic/ was served at the public /generic, and
                # one to the secret store would have been
                raise Unreadable(rel, "is a symlink that leaves the site directory")
            if stat.S_ISDIR(mode):
                raise Unreadable(rel, "is a directory, not a file")
            if not stat.S_ISREG(mode):  # a FIFO would hang the reader, a device never end
                raise Unreadable(rel, "is not a regular file")
            return path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            if e.errno == errno.ENAMETOOLONG:  # a name no file can have (an edit's ignition_id)
                return None
            raise Unreadable(rel, f"cannot be read: {e.strerror or e}") from None

    def names(self, rel_dir: str) -> list[str]:
        """Regular files directly inside rel_dir (sorted), with the overlay applied."""
        names: set[str] = set()
        d = self.root / rel_dir
        if d.is_dir():
            names = {p.name for p in d.iterdir() if p.is_file() and not p.name.startswith(".")}
        for rel, data in self.overlay.items():
            parent, _, name = rel.rpartition("/")
            if parent == rel_dir:
                if data is None:
                    names.discard(name)
                else:
                    names.add(name)
        return sorted(names)

    def subdirs(self, rel_dir: str) -> list[str]:
        d = self.root / rel_dir
        return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []


def field_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _line_at(doc: Any, loc: tuple[Any, ...]) -> int | None:
    line = getattr(doc, "line", None) or None
    node = doc
    for part in loc:
        if isinstance(node, (yamlfile.LineDict, yamlfile.LineList)):
            try:
                line = node.line_of(part)
            except TypeError:
                break
            try:
                node = node[part]
            except (KeyError, IndexError, TypeError):
                break
        else:
            break
    return line


_TYPE_WORDS = {
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "dict_type": "must be a mapping",
    "list_type": "must be a list",
    "float_type": "must be a number",
    "model_type": "must be a mapping",
}


def _message(err: dict[str, Any], model: type[pydantic.BaseModel]) -> str:
    kind = err["type"]
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return "is not a known field"
    if kind == "value_error":
        return str(err["msg"]).removeprefix("Value error, ")
    if kind in _TYPE_WORDS:
        return f"{_TYPE_WORDS[kind]}, not {err.get('input')!r}"
    if kind == "literal_error":
        return f"{err['msg'].replace('Input should be', 'must be')}, not {err.get('input')!r}"
    return f"{err['msg']} (got {err.get('input')!r})"


class Unreadable(Exception):
    """A site file that is there and cannot be read: a problem of the site, named."""

    def __init__(self, rel: str, why: str):
        super().__init__(f"{rel}: {why}")
        self.rel, self.why = rel, why


class _Loader:
    def __init__(self, files: SiteFiles):
        self.files = files
        self.problems: list[str] = []
        self.warnings: list[str] = []
        # profiles whose file exists but does not load: references to them are not reported
        # again, so that one mistake gives one error
        self.broken_profiles: set[str] = set()
        # machines.yaml: each machine's index in `machines:`, for problems found after loading
        self.machine_index: dict[str, int] = {}

    def problem(self, where: str, line: int | None, field: str, msg: str) -> None:
        place = f"{where}:{line}" if line else where
        self.problems.append(f"{place}: {field}: {msg}" if field else f"{place}: {msg}")

    def validated(self, model: type[pydantic.BaseModel], doc: Any, where: str, prefix: tuple = ()):
        try:
            return model.model_validate(doc)
        except pydantic.ValidationError as e:
            for err in e.errors():
                loc = prefix + tuple(err["loc"])
                self.problem(where, _line_at(doc, tuple(err["loc"])), field_path(loc), _message(err, model))
            return None

    def read(self, rel: str) -> bytes | None | bool:
        """files.read, with a file that cannot be read reported as a problem (False)."""
        try:
            return self.files.read(rel)
        except Unreadable as e:
            self.problem(rel, None, "", e.why)
            return False

    def yaml_doc(self, rel: str) -> Any:
        raw = self.read(rel)
        if raw is False:
            return False
        if raw is None:
            return None
        try:
            doc = yamlfile.load(raw, rel)
        except yamlfile.YamlError as e:
            self.problem(rel, e.line, "", f"bad YAML: {e.problem}")
            return False
        if doc is None:
            return yamlfile.LineDict()
        if not isinstance(doc, dict):
            self.problem(rel, getattr(doc, "line", None), "", "must be a YAML mapping at the top")
            return False
        return doc

    def json_doc(self, rel: str) -> Any:
        raw = self.read(rel)
        if raw is False:
            return False
        raw = raw or b""
        try:
            doc = json.loads(raw)
        except json.JSONDecodeError as e:
            self.problem(rel, e.lineno, "", f"bad JSON: {e.msg}")
            return False
        except RecursionError:
            self.problem(rel, None, "", "bad JSON: nested too deeply to read")
            return False
        except UnicodeDecodeError:
            self.problem(rel, None, "", "is not UTF-8 text")
            return False
        if not isinstance(doc, dict):
            self.problem(rel, None, "", "must be a JSON object")
            return False
        return doc


def clean_relpath(value: str) -> str | None:
    """`value` as a path inside its directory, or None when it is absolute or leaves it."""
    if not value or value.startswith("/") or "\\" in value or "\x00" in value:
        return None
    norm = posixpath.normpath(value)
    if norm == ".." or norm.startswith("../") or norm == ".":
        return None
    return norm


def load_site(root: Path, overlay: dict[str, bytes | None] | None = None,
              secrets: Path | str | None = None) -> Site:  # fmt: skip
    """Load and validate the site directory `root` or raise SiteError. `secrets`: the secret
    store to read the cluster's records from (None: secrets_dir(<site name>)); never written."""
    root = Path(root)
    if not root.is_dir():
        raise SiteError([f"{root}: not a directory"])
    ld = _Loader(SiteFiles(root, overlay))

    settings = _load_settings(ld, root)
    profiles = _load_profiles(ld)
    builtin: dict[str, Path] = {}
    if settings is not None and settings.cluster is not None:
        if cluster.PROFILE_ID not in profiles and cluster.PROFILE_ID not in ld.broken_profiles:
            profiles[cluster.PROFILE_ID] = cluster.builtin_profile(settings.cluster)
        builtin[cluster.TEMPLATE] = cluster.TEMPLATES_DIR / cluster.TEMPLATE
    if settings is not None:
        _check_settings_refs(ld, settings, profiles)
    if settings is not None:
        machines = _load_machines(ld, settings, profiles, secrets=secrets)
    else:
        _load_machines(ld, SiteSettings(root.name, None, None, {}, {}), profiles, resolve=False)
        machines = []
    groups = _load_groups(ld, profiles)
    if settings is not None:
        groups += _machine_groups(settings, machines)
    _check_selectors(ld, groups)
    # read once: every render of this site takes `local:` contents from here (LocalFiles)
    local_files = butane.LocalFiles(root / "files" if (root / "files").is_dir() else None)
    ignition_files, generic_files = _load_templates(ld, local_files, profiles, builtin)
    if ld.problems or settings is None:
        raise SiteError(ld.problems)

    site = Site(
        root=root,
        settings=settings,
        profiles=profiles,
        groups=tuple(match.specificity_order(groups)),
        machines=tuple(machines),
        ignition=ignition_files,
        generic=generic_files,
        warnings=tuple(ld.warnings),
        local_files=local_files,
    )
    _check_secret_bindings(ld, site)
    _prerender(ld, site)
    if ld.problems:
        raise SiteError(ld.problems)
    return dataclasses.replace(site, warnings=tuple(ld.warnings))


def site_name(root: Path) -> str:
    """The site's name (site.yaml `site:`, else its directory's), read without the rest of the
    checks: what names its history and its secret store."""
    root = Path(root)
    ld = _Loader(SiteFiles(root))
    settings = _load_settings(ld, root)
    return settings.name if settings is not None else root.resolve().name


def k3s_wanted(root: Path) -> tuple[str, list[str]]:
    """What `bastion assets fetch k3s` fetches for a site: site.yaml cluster.k3s.version and the
    architectures (amd64, arm64) of the machines with role server or agent. Read without the
    checks that need k3s fetched first; SiteError if site.yaml or machines.yaml is broken."""
    root = Path(root)
    ld = _Loader(SiteFiles(root))
    settings = _load_settings(ld, root)
    doc = ld.yaml_doc("machines.yaml")
    model = ld.validated(schema.MachinesFile, doc, "machines.yaml") if doc else None
    if ld.problems:
        raise SiteError(ld.problems)
    if settings is None or settings.cluster is None:
        raise SiteError(["site.yaml: cluster: the site has no k3s cluster"])
    entries = model.machines if model is not None else []
    arches = {cluster.K3S_ARCH[m.arch] for m in entries
              if m.role in cluster.ROLES and m.arch in cluster.K3S_ARCH}  # fmt: skip
    return settings.cluster.k3s.version, sorted(arches)


def _load_settings(ld: _Loader, root: Path) -> SiteSettings | None:
    doc = ld.yaml_doc("site.yaml")
    if doc is False:
        return None
    model = schema.SiteFile() if doc is None else ld.validated(schema.SiteFile, doc, "site.yaml")
    if model is None:
        return None
    for i, target in enumerate(model.logs.targets):
        for field in ("ca_file", "cert_file"):
            name = getattr(target.tls, field) if target.tls is not None else None
            if name is not None:
                path = root / name  # relative: to the site directory (an absolute name stays itself)
                if not path.is_file():
                    ld.problem("site.yaml", None, f"logs.targets[{i}].tls.{field}", f"{str(path)!r} is not a file")
    return SiteSettings(
        name=model.site or root.resolve().name,
        controller_url=model.controller_url,
        default_profile=model.default_profile,
        roles=dict(model.roles),
        metadata=json.loads(json.dumps(model.metadata)),
        device=model.device,
        cluster=model.cluster,
        operator=model.operator,
        defaults=model.defaults,
        logs=model.logs,
        ups=model.ups,
        networks=model.networks,
    )


def _unknown(ld: _Loader, pid: str, profiles: dict[str, Profile]) -> bool:
    """Whether `pid` names no profile (a profile whose file is broken was reported already)."""
    return pid not in profiles and pid not in ld.broken_profiles


def _check_settings_refs(ld: _Loader, settings: SiteSettings, profiles: dict[str, Profile]) -> None:
    if settings.default_profile and _unknown(ld, settings.default_profile, profiles):
        ld.problem("site.yaml", None, "default_profile", _no_profile(settings.default_profile))
    for role, pid in settings.roles.items():
        if _unknown(ld, pid, profiles):
            ld.problem("site.yaml", None, f"roles.{role}", _no_profile(pid))
    if settings.networks is not None:
        _check_pxe_side(ld, settings)


def _check_pxe_side(ld: _Loader, settings: SiteSettings) -> None:
    """With networks: declared, what the nodes and the device reach while booting is on the
    PXE LAN: the controller's boot URL, the device, the TFTP server its offers name."""
    pxe = settings.networks.pxe
    if pxe is None:
        ld.problem("site.yaml", None, "networks.pxe", "is required with networks: the LAN the "
                   "device answers on and the nodes boot from")  # fmt: skip
        return
    places = []
    host = urllib.parse.urlsplit(settings.controller_url).hostname if settings.controller_url else None
    if host is not None:
        places.append(("controller_url", host, "the nodes fetch their boot scripts there"))
    if settings.device is not None:
        places.append(("device.ip", settings.device.ip, "the device answers PXE there"))
        if settings.device.next_server is not None:
            places.append(("device.next_server", settings.device.next_server,
                           "the nodes fetch their boot files there"))  # fmt: skip
    for field, address, why in places:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            continue  # a host name: nothing to check here
        if ip not in pxe.network:
            ld.problem("site.yaml", None, field, f"{address} is not on networks.pxe ({pxe.subnet}): "
                       f"{why}")  # fmt: skip


def _check_machine_networks(ld: _Loader, settings: SiteSettings, entry: Any, where: str, at: Any,
                            taken: dict[str, str]) -> bool:  # fmt: skip
    """A machine's `address` on the PXE LAN and its `networks:` addresses on the networks
    site.yaml declares; `taken`: address -> who has it. False when something is wrong."""
    rel = "machines.yaml"
    nets = settings.networks
    ok = True
    if entry.networks and nets is None:
        ld.problem(rel, at("networks"), f"{where}.networks", "site.yaml declares no networks:")
        return False
    if nets is None:
        return True
    pxe = nets.pxe
    if entry.address is not None and pxe is not None and ipaddress.ip_address(entry.address) not in pxe.network:
        ld.problem(rel, at("address"), f"{where}.address",
                   f"{entry.address} is not on networks.pxe ({pxe.subnet}), the LAN the machine "
                   "boots from")  # fmt: skip
        ok = False
    for name, address in (entry.networks or {}).items():
        field = f"{where}.networks.{name}"
        net = getattr(nets, name, None) if name in schema.NODE_NETWORKS else None
        if name not in schema.NODE_NETWORKS:
            ld.problem(rel, at("networks"), field,
                       f"{name!r}: a node has addresses of its own on {' and '.join(schema.NODE_NETWORKS)} "
                       "(its PXE LAN address is `address`)")  # fmt: skip
            ok = False
        elif net is None:
            ld.problem(rel, at("networks"), field, f"site.yaml declares no networks.{name}")
            ok = False
        elif ipaddress.ip_address(address) not in net.network:
            ld.problem(rel, at("networks"), field, f"{address} is not on networks.{name} ({net.subnet})")
            ok = False
        elif address in taken:
            ld.problem(rel, at("networks"), field, f"{address} is also {taken[address]}")
            ok = False
        else:
            taken[address] = field
    return ok


def _no_profile(pid: str) -> str:
    return f"no profile {pid!r} (expected profiles/{pid}.yaml or profiles/{pid}.json)"


def _load_machines(
    ld: _Loader, settings: SiteSettings, profiles: dict[str, Profile], resolve: bool = True,
    secrets: Path | str | None = None,
) -> list[Machine]:
    """machines.yaml; with resolve=False (site.yaml is broken) only its own problems count."""
    rel = "machines.yaml"
    doc = ld.yaml_doc(rel)
    if doc is None or doc is False:
        return []
    defaults = settings.defaults or schema.MachineDefaults()
    model = ld.validated(schema.MachinesFile, doc, rel)
    if model is None:
        return []
    items = doc.get("machines") if isinstance(doc, dict) else None
    machines: list[Machine] = []
    by_name: dict[str, int] = {}
    by_mac: dict[str, int] = {}
    by_uuid: dict[str, int] = {}
    by_relay: dict[int, int] = {}
    by_address: dict[str, int] = {}
    taken_addresses: dict[str, str] = {}  # networks: addresses, which machine has each
    entries: list[cluster.Entry] = []
    lines_at: dict[int, Any] = {}
    for i, entry in enumerate(model.machines):
        line = items.line_of(i) if isinstance(items, yamlfile.LineList) else None
        item = items[i] if items is not None else None

        # (the defaults bind this machine's item and line: lines_at keeps `at` past the loop)
        def at(key: str, item: Any = item, line: int | None = line) -> int | None:
            return item.line_of(key) if isinstance(item, yamlfile.LineDict) else line

        where = f"machines[{i}]"
        entries.append(cluster.Entry(i, entry.name, entry.role or "", entry.arch, entry.address, entry))
        lines_at[i] = at
        if entry.name in by_name:
            ld.problem(rel, at("name"), f"{where}.name", f"{entry.name!r} is also machines[{by_name[entry.name]}]")
            continue
        by_name[entry.name] = i
        ld.machine_index[entry.name] = i
        if entry.mac is None and entry.uuid is None:
            ld.problem(rel, line, where, "needs a mac or a uuid to be recognised by")
            continue
        if entry.mac is not None:
            if entry.mac in by_mac:
                ld.problem(rel, at("mac"), f"{where}.mac",
                           f"{entry.mac} is also the MAC of machines[{by_mac[entry.mac]}]")  # fmt: skip
                continue
            by_mac[entry.mac] = i
        elif entry.uuid is not None:
            if entry.uuid in by_uuid:
                ld.problem(rel, at("uuid"), f"{where}.uuid", f"{entry.uuid} is also machines[{by_uuid[entry.uuid]}]")
                continue
            by_uuid[entry.uuid] = i
        if entry.heartbeat is not None and entry.relay is None:
            ld.problem(rel, at("heartbeat"), f"{where}.heartbeat",
                       "needs relay: the watchdog power-cycles a hung node through its relay")
            continue
        if entry.power is not None and entry.relay is None:
            ld.problem(rel, at("power"), f"{where}.power",
                       "needs relay: the operator switches a machine's power through its relay")
            continue
        if not _check_machine_networks(ld, settings, entry, where, at, taken_addresses):
            continue
        if entry.relay is not None:
            if entry.relay in by_relay:
                ld.problem(rel, at("relay"), f"{where}.relay",
                           f"channel {entry.relay} also powers machines[{by_relay[entry.relay]}]")  # fmt: skip
                continue
            by_relay[entry.relay] = i
        if entry.address is not None:
            # the address binds a machine's secrets and its boot script to it: two machines on one
            # address would each get what is meant for the other
            if entry.address in by_address:
                ld.problem(rel, at("address"), f"{where}.address",
                           f"{entry.address} is also the address of machines[{by_address[entry.address]}]")  # fmt: skip
                continue
            by_address[entry.address] = i
        if entry.profile is not None:
            pid = entry.profile
            if pid not in profiles:
                if _unknown(ld, pid, profiles):
                    ld.problem(rel, at("profile"), f"{where}.profile", _no_profile(pid))
                continue
        elif entry.role is not None and entry.role in settings.roles:
            pid = settings.roles[entry.role]
        elif settings.cluster is not None and entry.role in cluster.ROLES:
            pid = cluster.PROFILE_ID
        elif settings.default_profile:
            pid = settings.default_profile
            if entry.role is not None:  # most likely a typo: say so rather than boot it quietly
                ld.warnings.append(f"{rel}: {where}.role: {entry.role!r} is not in site.yaml "
                                   f"roles; it boots default_profile {pid!r}")
        elif not resolve:
            continue
        else:
            why = (
                f"role {entry.role!r} is not in site.yaml roles"
                if entry.role
                else "no profile: set profile, a role listed in site.yaml roles, or default_profile"
            )
            ld.problem(rel, at("role") if entry.role else line, f"{where}.role" if entry.role else where, why)
            continue
        metadata = {
            **json.loads(json.dumps(settings.metadata)),
            **json.loads(json.dumps(entry.metadata)),
            "name": entry.name,
            "hostname": entry.hostname or entry.name,
        }
        for key in ("role", "arch", "uuid"):
            if getattr(entry, key):
                metadata[key] = getattr(entry, key)
        if entry.labels:
            metadata["labels"] = dict(entry.labels)
        machines.append(
            Machine(
                name=entry.name,
                mac=entry.mac,
                uuid=entry.uuid,
                arch=entry.arch,
                role=entry.role,
                profile=pid,
                hostname=entry.hostname or entry.name,
                labels=dict(entry.labels),
                metadata=metadata,
                source=rel,
                line=line,
                relay=entry.relay,
                heartbeat=(entry.heartbeat.timeout_s, entry.heartbeat.boot_s)
                if entry.heartbeat else None,
                address=entry.address,
                power=entry.power if entry.power is not None
                else (defaults.power if entry.relay is not None else None),
                maintenance=entry.maintenance if entry.maintenance is not None
                else defaults.maintenance,
                reprovision=entry.reprovision,
            )
        )
    if resolve:
        machines = _cluster_nodes(ld, settings, profiles, machines, entries, lines_at, secrets)
    return machines


_CLUSTER_FIELDS = ("disk", "k3s", "wireguard")


def _cluster_nodes(ld: _Loader, settings: SiteSettings, profiles: dict[str, Profile],
                   machines: list[Machine], entries: list[cluster.Entry],
                   lines_at: dict, secrets: Path | str | None = None) -> list[Machine]:  # fmt: skip
    """Attach each k3s node's plan (bastion.cluster.plan) to its Machine; report what prevents one.
    `secrets`: the store whose records of what went out the plan keeps to (load_site's)."""
    rel = "machines.yaml"
    section = settings.cluster
    nodes = []
    for e in entries:
        is_node = section is not None and e.role in cluster.ROLES
        if is_node:
            nodes.append(e)
            continue
        for key in _CLUSTER_FIELDS:
            if getattr(e.fields, key) is not None:
                why = ("only k3s nodes have it (role server or agent)" if section is not None
                       else "needs a site.yaml cluster: section (and role server or agent)")  # fmt: skip
                ld.problem(rel, lines_at[e.index](key), f"machines[{e.index}].{key}", why)
    if section is None or not nodes:
        if section is not None:
            ld.problem("site.yaml", None, "cluster", "no machine in machines.yaml has role: server")
        return machines
    sums = _k3s_sums(ld, section)
    ledger = Ledger.read(secrets if secrets is not None else secrets_dir(settings.name),
                         cluster.cluster_name(section, settings.name))  # fmt: skip
    plans, problems = cluster.plan(section, settings.name, nodes, sums, networks=settings.networks,
                                   ups=settings.ups, ledger=ledger)  # fmt: skip
    for p in problems:
        if p.index is None:
            ld.problem(p.file, None, p.field, p.message)
        else:
            key = p.field.split(".")[0]
            ld.problem(rel, lines_at[p.index](key), f"machines[{p.index}].{p.field}", p.message)
    if problems:
        return machines
    arches = sorted({n["arch"] for n in plans.values()})
    for arch in arches:
        _check_k3s_binary(ld, section, arch, sums)
    builtin = cluster.builtin_profile(section)
    if profiles.get(cluster.PROFILE_ID) == builtin:
        for arch, boot in builtin.boot_by_arch.items():
            if cluster.K3S_ARCH[arch] in arches:
                _check_asset_ref(ld, "site.yaml", f"cluster.flatcar ({cluster.K3S_ARCH[arch]} kernel)", boot.kernel)
                for initrd in boot.initrd:
                    _check_asset_ref(ld, "site.yaml", f"cluster.flatcar ({cluster.K3S_ARCH[arch]} initrd)", initrd)
    if settings.ups is not None:
        _check_ups_timing(ld, settings.ups, plans)
    return [dataclasses.replace(m, node=plans[m.name]) if m.name in plans else m for m in machines]


def _check_ups_timing(ld: _Loader, section: Any, plans: dict[str, dict]) -> None:
    """The UPS policy opens a node's relay once its beats have stopped for ups.quiet_s, or when
    ups.shutdown_wait_s has run out: neither may cut a node that is still shutting down cleanly
    (bastion.ups.core.shutdown_takes_s). Reported once, for the node that takes longest."""
    worst = None
    for name, node in plans.items():
        every = node["heartbeat"]["every_s"]
        if section.quiet_s < 2 * every:
            ld.problem("site.yaml", None, "ups.quiet_s",
                       f"{section.quiet_s} s is less than two of machine {name}'s heartbeats (every "
                       f"{every} s): a node still running would be taken for down and its relay "
                       f"opened; make it at least {2 * every}")  # fmt: skip
            return
        delay = node["shutdown"]["inhibit_delay_s"] if node["shutdown"] else 0
        takes = ups_core.shutdown_takes_s(every, delay, section.quiet_s, section.poll_s)
        if worst is None or takes > worst[0]:
            worst = (takes, name, every, delay)
    if worst is None or worst[0] <= section.shutdown_wait_s:
        return
    takes, name, every, delay = worst
    grace = (f"{delay} s of graceful node shutdown (cluster.shutdown_grace_s and "
             f"{cluster.INHIBIT_MARGIN_S} s for the kubelet to finish), " if delay else "")  # fmt: skip
    ld.problem("site.yaml", None, "ups.shutdown_wait_s",
               f"{section.shutdown_wait_s} s is shorter than machine {name} may take to shut down "
               f"cleanly, {takes:g} s: up to {every} s until its heartbeat carries the request, "
               f"{grace}quiet_s ({section.quiet_s} s) of silence and a poll (poll_s, "
               f"{section.poll_s} s); its relay would open while it still stops. Make it at least "
               f"{takes:g}" + (", or shorten cluster.shutdown_grace_s" if delay else ""))  # fmt: skip


def _k3s_sums(ld: _Loader, section: Any) -> dict[str, str]:
    """The k3s binary's SHA-256 by arch: site.yaml's cluster.k3s.sha256 where it gives one, else
    what `bastion assets fetch k3s` recorded; the two must agree where both exist."""
    recorded = cluster.recorded_sha256(ld.files.root / "assets", section.k3s.version)
    for arch, digest in section.k3s.sha256.items():
        if arch in recorded and recorded[arch] != digest:
            ld.problem("site.yaml", None, f"cluster.k3s.sha256.{arch}",
                       f"{digest} is not the SHA-256 that k3s {section.k3s.version}'s own "
                       f"sha256sum-{arch}.txt gives, {recorded[arch]} (recorded by `bastion "
                       f"assets fetch k3s` in assets/{cluster.manifest_path(section.k3s.version)})"
                       "; remove it to use the release's")  # fmt: skip
    return {**recorded, **section.k3s.sha256}


def _check_k3s_binary(ld: _Loader, section: Any, arch: str, sums: dict[str, str]) -> None:
    """The k3s binary the controller serves must be there, and the one its SHA-256 names."""
    if cluster.binary_url(section, arch) is not None:
        return  # downloaded from elsewhere: Ignition checks it on the node
    rel = cluster.asset_path(section, arch)
    path = ld.files.root / "assets" / rel
    if not path.is_file():
        ld.problem("site.yaml", None, "cluster.k3s",
                   f"assets/{rel} does not exist: the nodes download k3s from there; run "
                   "`bastion assets fetch k3s --site <this site>`")  # fmt: skip
        return
    digest = cluster.file_sha256(path)
    if digest != sums[arch]:
        ld.problem("site.yaml", None, f"cluster.k3s.sha256.{arch}",
                   f"assets/{rel} has SHA-256 {digest}, not {sums[arch]}: it is not the "
                   "release's own k3s binary; run `bastion assets fetch k3s --site <this site>` "
                   "again")  # fmt: skip


def _check_asset_ref(ld: _Loader, rel: str, field: str, url: str) -> None:
    """A kernel/initrd that points into /assets/ must stay inside assets/."""
    words = url.split()
    target = words[-1] if words else url
    if not target.startswith("/assets/"):
        return
    inner = target[len("/assets/") :].split("?", 1)[0]
    clean = clean_relpath(inner)
    if clean is None:
        ld.problem(rel, None, field, f"{target!r} leaves the assets/ directory")
    elif not (ld.files.root / "assets" / clean).is_file():
        ld.warnings.append(f"{rel}: {field}: assets/{clean} does not exist (yet)")


def _load_profiles(ld: _Loader) -> dict[str, Profile]:
    profiles: dict[str, Profile] = {}
    sources: dict[str, str] = {}
    for sub in ld.files.subdirs("profiles"):
        ld.warnings.append(f"profiles/{sub}/: subdirectories are not read")
    for name in ld.files.names("profiles"):
        rel = f"profiles/{name}"
        stem, dot, ext = name.rpartition(".")
        if not dot or ext not in ("json", "yaml", "yml"):
            ld.warnings.append(f"{rel}: ignored (profiles are .json or .yaml files)")
            continue
        if stem in sources:
            ld.problem(rel, None, "", f"profile {stem!r} is also defined by {sources[stem]}")
            continue
        sources[stem] = rel
        profile = _matchbox_profile(ld, rel, stem) if ext == "json" else _bastion_profile(ld, rel, stem)
        if profile is not None:
            profiles[stem] = profile
        else:
            ld.broken_profiles.add(stem)
    return profiles


def _file_ref(ld: _Loader, rel: str, line: int | None, field: str, value: str | None, folder: str) -> str | None:
    if not value:
        return None
    clean = clean_relpath(value)
    if clean is None:
        ld.problem(rel, line, field, f"{value!r} leaves the {folder}/ directory")
        return None
    return clean


def _matchbox_profile(ld: _Loader, rel: str, stem: str) -> Profile | None:
    doc = ld.json_doc(rel)
    if doc is False:
        return None
    model = ld.validated(schema.MatchboxProfile, doc, rel)
    if model is None:
        return None
    if model.id != stem:
        ld.warnings.append(
            f"{rel}: id {model.id!r} differs from the file name; groups refer to it as {stem!r}"
        )
    boot = None
    if model.boot is not None and model.boot.kernel:
        boot = Boot(model.boot.kernel, tuple(model.boot.initrd or ()), tuple(model.boot.args or ()))
        _check_asset_ref(ld, rel, "boot.kernel", boot.kernel)
        for i, initrd in enumerate(boot.initrd):
            _check_asset_ref(ld, rel, f"boot.initrd[{i}]", initrd)
    return Profile(
        id=stem,
        name=model.name or stem,
        source=rel,
        format="matchbox",
        boot=boot,
        ignition=_file_ref(ld, rel, None, "ignition_id", model.ignition_id, "ignition"),
        generic=_file_ref(ld, rel, None, "generic_id", model.generic_id, "generic"),
    )


def _bastion_profile(ld: _Loader, rel: str, stem: str) -> Profile | None:
    doc = ld.yaml_doc(rel)
    if doc is None or doc is False:
        return None
    model = ld.validated(schema.ProfileFile, doc, rel)
    if model is None:
        return None
    if model.id is not None and model.id != stem:
        ld.problem(rel, doc.line_of("id"), "id", f"{model.id!r} must match the file name ({stem!r})")
        return None
    boot = Boot(model.kernel, tuple(model.initrd), tuple(model.args))
    by_arch = {a: Boot(s.kernel, tuple(s.initrd), tuple(s.args)) for a, s in model.arch.items()}
    for field, b in [("", boot)] + [(f"arch.{a}.", b) for a, b in by_arch.items()]:
        _check_asset_ref(ld, rel, f"{field}kernel", b.kernel)
        for i, initrd in enumerate(b.initrd):
            _check_asset_ref(ld, rel, f"{field}initrd[{i}]", initrd)
    return Profile(
        id=stem,
        name=model.name or stem,
        source=rel,
        format="bastion",
        boot=boot,
        boot_by_arch=by_arch,
        os=model.os,
        ignition=_file_ref(ld, rel, doc.line_of("ignition"), "ignition", model.ignition, "ignition"),
        generic=_file_ref(ld, rel, doc.line_of("generic"), "generic", model.generic, "generic"),
        install=model.install,
    )


def _load_groups(ld: _Loader, profiles: dict[str, Profile]) -> list[Group]:
    groups: list[Group] = []
    ids: dict[str, str] = {}
    for sub in ld.files.subdirs("groups"):
        ld.warnings.append(f"groups/{sub}/: subdirectories are not read (as in matchbox)")
    for name in ld.files.names("groups"):
        rel = f"groups/{name}"
        stem, dot, ext = name.rpartition(".")
        if ext != "json" or not dot:
            ld.warnings.append(f"{rel}: ignored (groups are matchbox .json files)")
            continue
        doc = ld.json_doc(rel)
        if doc is False:
            continue
        model = ld.validated(schema.MatchboxGroup, doc, rel)
        if model is None:
            continue
        gid = model.id or stem
        if gid in ids:
            ld.problem(rel, None, "id", f"group id {gid!r} is also used by {ids[gid]}")
            continue
        ids[gid] = rel
        selector: dict[str, str] = {}
        ok = True
        for key, value in (model.selector or {}).items():
            if key.lower() == "mac":
                try:
                    value = match.parse_mac(value)
                except match.Malformed:
                    ld.problem(rel, None, f"selector.{key}", f"{value!r} is not a MAC address")
                    ok = False
            elif key.lower() == "uuid" and isinstance(value, str):
                value = value.lower()  # RFC 4122: case does not matter; requests are lowered
            selector[key] = value
        if model.profile not in profiles:
            if _unknown(ld, model.profile, profiles):
                ld.problem(rel, None, "profile", _no_profile(model.profile))
            ok = False
        if ok:
            groups.append(
                Group(
                    id=gid,
                    name=model.name or gid,
                    profile=model.profile,
                    selector=selector,
                    metadata=json.loads(json.dumps(model.metadata or {})),
                    source=rel,
                    format="matchbox",
                )
            )
    return groups


def _machine_groups(settings: SiteSettings, machines: list[Machine]) -> list[Group]:
    groups = []
    for m in machines:
        selector = {"mac": m.mac} if m.mac else {"uuid": m.uuid or ""}
        groups.append(
            Group(
                id=f"machine:{m.name}",
                name=m.name,
                profile=m.profile,
                selector=selector,
                metadata=m.metadata,
                source=f"{m.source} ({m.name})",
                format="bastion",
                machine=m,
            )
        )
    if settings.default_profile:
        groups.append(
            Group(
                id="site-default",
                name="default",
                profile=settings.default_profile,
                selector={},
                metadata=json.loads(json.dumps(settings.metadata)),
                source="site.yaml (default_profile)",
                format="bastion",
            )
        )
    return groups


def _check_selectors(ld: _Loader, groups: list[Group]) -> None:
    seen: dict[str, Group] = {}
    for g in groups:
        key = match.selector_string(g.selector)
        if key in seen:
            what = f"selector {{{key}}}" if key else "no selector (both are default groups)"
            ld.problems.append(
                f"{g.source}: selects the same machines as {seen[key].source}: {what}; "
                "which one answers would be arbitrary"
            )
        else:
            seen[key] = g


def _load_templates(ld: _Loader, local_files: butane.LocalFiles, profiles: dict[str, Profile],
                    builtin: dict[str, Path] | None = None) -> tuple[dict, dict]:  # fmt: skip
    """The templates the profiles name; an Ignition template of `builtin` (name -> file shipped
    with the controller) is read from there when the site has no file of that name."""
    needs: dict[tuple[str, str], dict[str, list[Profile]]] = {}
    for p in profiles.values():
        for folder, name in (("ignition", p.ignition), ("generic", p.generic)):
            if name:
                needs.setdefault((folder, name), {}).setdefault(p.engine, []).append(p)
    out: dict[str, dict[str, TemplateFile]] = {"ignition": {}, "generic": {}}
    for (folder, name), engines in sorted(needs.items()):
        rel = f"{folder}/{name}"
        users = [p for ps in engines.values() for p in ps]
        raw = ld.read(rel)
        if raw is False:
            continue
        if raw is None and folder == "ignition" and name in (builtin or {}) and "go" not in engines:
            raw = builtin[name].read_bytes()
            rel = f"bastion/{builtin[name].parent.name}/{name}"  # the package's own file
        if raw is None:
            for p in users:
                field = ("ignition_id" if p.format == "matchbox" else "ignition") if folder == "ignition" else (
                    "generic_id" if p.format == "matchbox" else "generic")  # fmt: skip
                ld.problem(p.source, None, field, f"{rel} does not exist")
            continue
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            ld.problem(rel, None, "", "is not UTF-8 text")
            continue
        if folder == "ignition" and name.endswith(RAW_IGNITION_SUFFIXES):
            try:
                config = ignition.from_raw(text, rel)
            except ignition.IgnitionError as e:
                ld.problems.append(str(e))
                continue
            out[folder][name] = TemplateFile(name, rel, text, raw_ignition=config)
            continue
        go = jinja = None
        if "go" in engines:
            try:
                go = gotemplate.parse(text)
            except gotemplate.TemplateError as e:
                ld.problem(rel, e.line, "", f"template: {e.message}")
                continue
        if "jinja" in engines:
            try:
                jinja = compile_jinja(text, rel)
            except RenderError as e:
                ld.problems.append(str(e))
                continue
        if folder == "ignition" and not any(m in text for m in _TEMPLATE_MARKERS):
            try:
                butane.translate(text, rel, local_files)
            except butane.ButaneError as e:
                ld.problems.append(str(e))
                continue
        out[folder][name] = TemplateFile(name, rel, text, go=go, jinja=jinja)
    return out["ignition"], out["generic"]


def _check_secret_bindings(ld: _Loader, site: Site) -> None:
    """A machine whose boot script carries a one-time Ignition URL (its profile's Ignition reads
    `secrets`) needs `address:`: the script, and with it the URL to the machine's secrets, is then
    served to that address only. Without one, any host on the LAN that asks for the script with
    the machine's MAC before the node does gets its secrets (bastion.state.onetime).

    And only an `os: flatcar` profile's boot script can carry that URL: the controller writes it
    as the ignition.config.url of the arguments it adds (bastion.boot.boot_for). An `os: custom`
    profile's arguments are used as written, so a secret-reading config of one could never be
    served: refused here rather than at every boot."""
    for profile in site.profiles.values():
        tf = site.ignition.get(profile.ignition) if profile.ignition else None
        if profile.format != "bastion" or profile.os == "flatcar" or tf is None \
                or not uses_secrets(tf):
            continue
        ld.problem(
            profile.source, None, "os",
            f"is custom, but its Ignition ({tf.relpath}) reads secrets, which a node gets only on "
            "the one-time URL the controller writes into an os: flatcar profile's kernel "
            "arguments (ignition.config.url); a custom profile's arguments are used as written, "
            "and its /ignition?mac= URL is refused (403). Use os: flatcar, or keep secrets out "
            "of the template",
        )  # fmt: skip
    for m in site.machines:
        profile = site.profiles.get(m.profile)
        if m.address or profile is None or not takes_onetime_url(site, profile):
            continue
        template = site.ignition[profile.ignition].relpath
        ld.problem(
            m.source, m.line, f"machines[{ld.machine_index.get(m.name, '?')}].address",
            f"is required: {m.name} boots profile {profile.id!r}, whose Ignition ({template}) "
            "reads secrets, sent on a one-time URL in its boot script; without an address, any "
            "host on the LAN that asks for the script first gets them. Set address: to the fixed "
            "IP its DHCP reservation gives it; only that address then gets the script",
        )  # fmt: skip


def _prerender(ld: _Loader, site: Site) -> None:
    """Render every declared machine's configs now, so a broken template is a load error.

    Groups from matchbox files are tried with their selectors as the request; as their templates
    may use query parameters only real requests carry, a failure there is only a warning. The
    same failure for several machines is one problem naming them all.
    """
    base = site.settings.controller_url or _PLACEHOLDER_URL
    failures: dict[tuple[str, str], list[str]] = {}
    warnings: dict[tuple[str, str], list[str]] = {}
    for g in site.groups:
        profile = site.profiles[g.profile]
        labels = dict(g.selector)
        raw_query = "&".join(
            f"{k}={match.mac_hexhyp(v) if k.lower() == 'mac' else v}" for k, v in labels.items()
        )
        req = BootRequest(labels=labels, raw_query=raw_query, base_url=base)
        for what, fn, name in (("Ignition", render_ignition, profile.ignition), ("generic", render_generic, profile.generic)):  # fmt: skip
            if not name:
                continue
            try:
                # secrets are not known here (the store is the controller's): stand-ins check
                # that a template reading them renders
                rendered = fn(site, g, profile, req, PLACEHOLDER_SECRETS)
                if what == "Ignition" and g.machine is not None and g.machine.node is not None:
                    _check_registries(ld, site, g.machine.name, site.ignition[name].relpath, rendered)
            except RenderError as e:
                if g.machine is not None:
                    failures.setdefault((str(e), what), []).append(g.machine.name)
                else:
                    warnings.setdefault((str(e), what), []).append(g.id)
    for (error, what), names in failures.items():
        who = f"machine {names[0]}" if len(names) == 1 else f"machines {', '.join(names)}"
        ld.problems.append(f"{error} (rendering {what} for {who})")
    for (error, what), ids in warnings.items():
        ld.warnings.append(f"{error} (rendering {what} for group {', '.join(ids)} with its selectors)")


REGISTRIES_YAML = "/etc/rancher/k3s/registries.yaml"


def _file_text(entry: dict) -> str | None:
    """An Ignition file entry's inline contents (a data URL, maybe gzip), or None."""
    source = (entry.get("contents") or {}).get("source") or ""
    if not source.startswith("data:"):
        return None
    head, _, body = source[5:].partition(",")
    data = base64.b64decode(body) if head.endswith(";base64") else urllib.parse.unquote_to_bytes(body)
    if (entry.get("contents") or {}).get("compression") == "gzip":
        data = gzip.decompress(data)
    return data.decode(errors="replace")


def _check_registries(ld: _Loader, site: Site, machine: str, template: str, config: Any) -> None:
    """A k3s node's registries.yaml (what its containerd is told) must pull each registry of
    site.yaml cluster.registry_cache through that cache, and nothing else through it: a site's
    own k3s.bu (or profile) that writes another one, or none, is refused."""
    section = site.settings.cluster
    cache = section.registry_cache if section is not None else None
    if cache is None:
        return
    where = f"site.yaml: cluster.registry_cache: machine {machine}'s Ignition ({template})"
    want = regcache.endpoints(cache)
    files = {f.get("path"): f for f in (config.get("storage") or {}).get("files") or []}
    if REGISTRIES_YAML not in files:
        ld.problems.append(f"{where} writes no {REGISTRIES_YAML}: its containerd would not use the cache")
        return
    text = _file_text(files[REGISTRIES_YAML])
    try:
        doc = yaml.safe_load(text) if text is not None else None
    except yaml.YAMLError:
        doc = None
    mirrors = doc.get("mirrors") if isinstance(doc, dict) else None
    if not isinstance(mirrors, dict):
        ld.problems.append(f"{where}: {REGISTRIES_YAML} has no mirrors: map")
        return
    told = {name: list((m or {}).get("endpoint") or []) if isinstance(m, dict) else []
            for name, m in mirrors.items()}  # fmt: skip
    for name, url in want.items():
        if name not in told:
            ld.problems.append(f"{where}: {REGISTRIES_YAML} mirrors.{name} is missing: the cache "
                               f"serves {name} on {url}")  # fmt: skip
        elif told[name] != [url]:
            ld.problems.append(f"{where}: {REGISTRIES_YAML} mirrors.{name}.endpoint is {told[name]}, "
                               f"but the cache serves {name} on {url} (cluster.registry_cache.url)")  # fmt: skip
    for name in told:
        if name not in want:
            ld.problems.append(f"{where}: {REGISTRIES_YAML} mirrors.{name}: the cache does not "
                               "serve it (cluster.registry_cache.mirrors)")  # fmt: skip
