"""The controller's secret store: join tokens, WireGuard keys and the like, generated here and kept
outside the site directory (which lives in git) and off every public endpoint.

One directory per site (default $XDG_STATE_HOME/edge-bastion/secrets/<site>, or
$BASTION_SECRETS_DIR; mode 0700), one file per secret (mode 0600), written atomically: a secret is
created once, the first time something asks for it, and read back the same ever after, by
every process (of two that race to make it, the first one stored wins). Names are paths of
plain components, e.g. `k3s/home/token` or `wireguard/node1.key`.

A k3s cluster's secrets (`machine_secrets`): `k3s/<cluster>/token` (the servers' join token),
`k3s/<cluster>/agent-token` (the agents'), `k3s/<cluster>/node-password/<machine>` (each node's
k3s node password, its identity across reboots), and `wireguard/<machine>.key` (each node's
private key; its public key is derived, never stored). Beside them, two records of what went out
with a node's config, which later plans keep to (bastion.state.ledger reads them):
`k3s/<cluster>/init-server` (the server given --cluster-init) and `wireguard/<machine>.address`
(the node's tunnel address).

The controller host's own tunnel (site.yaml cluster.wireguard.controller; bastion.cluster.tunnel):
`controller/wireguard.key`, its private key, which its wg-quick config names and never holds.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import secrets as _random
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bastion import atomic

if TYPE_CHECKING:
    from bastion.model import Machine, Site

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")

log = logging.getLogger(__name__)


class SecretError(ValueError):
    pass


class SecretMissing(SecretError):
    """Secrets that a command which only reads them found missing: `names` in the store at
    `root`. Such a command makes none: a key made in a store the service does not use is a key
    no node and no management side ever gets."""

    def __init__(self, root: Path, names: list[str]):
        self.root, self.names = root, names
        what = ("does not exist" if not root.is_dir()
                else "has no " + ", ".join(str(root.joinpath(n)) for n in names))  # fmt: skip
        super().__init__(f"the secret store {root} {what}")


def default_secrets_dir(site_name: str) -> Path:
    """$XDG_STATE_HOME/edge-bastion/secrets/<site> (~/.local/state/... when unset)."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "edge-bastion" / "secrets" / site_name


def secrets_dir(site_name: str, override: Path | str | None = None) -> Path:
    """The store's directory: `override`, else $BASTION_SECRETS_DIR, else the default."""
    if override:
        return Path(override)
    if os.environ.get("BASTION_SECRETS_DIR"):
        return Path(os.environ["BASTION_SECRETS_DIR"])
    return default_secrets_dir(site_name)


def random_token(nbytes: int = 32) -> str:
    """A URL-safe random token (k3s join tokens, one-time URL tokens)."""
    return _random.token_hex(nbytes)


def wireguard_private_key() -> str:
    """A new WireGuard private key, base64 as `wg genkey` prints it (a clamped X25519 scalar)."""
    key = bytearray(_random.token_bytes(32))
    key[0] &= 248
    key[31] = (key[31] & 127) | 64
    return base64.b64encode(bytes(key)).decode()


def wireguard_public_key(private: str) -> str:
    """The public key of a base64 WireGuard private key, as `wg pubkey` prints it."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    try:
        raw = base64.b64decode(private, validate=True)
    except ValueError:
        raise SecretError("a WireGuard private key is 32 bytes in base64") from None
    if len(raw) != 32:
        raise SecretError("a WireGuard private key is 32 bytes in base64")
    pub = X25519PrivateKey.from_private_bytes(raw).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(pub).decode()


class SecretStore:
    def __init__(self, root: Path | str):
        self.root = Path(root)
        self._lock = threading.Lock()
        self._warned: set[Path] = set()  # secrets every user may read, said once each

    def _path(self, name: str) -> Path:
        parts = name.split("/")
        if not parts or not all(_NAME.fullmatch(p) for p in parts):
            raise SecretError(f"bad secret name {name!r}: plain components [A-Za-z0-9_.-] joined by '/'")
        return self.root.joinpath(*parts)

    def path(self, name: str) -> Path:
        """Where the secret `name` is kept (for a program that reads it itself, as `wg set
        private-key FILE` does)."""
        return self._path(name).absolute()

    def get(self, name: str) -> str | None:
        try:
            return self._read(self._path(name))
        except FileNotFoundError:
            return None

    def _read(self, path: Path) -> str:
        """The secret in path; a warning, once, when every user of the host may read it: the
        store's own are 0600, but a credential put there by hand (a UPS password, a client key)
        has whatever mode its writer's umask gave it."""
        with open(path) as f:
            mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
            value = f.read().strip()
        if mode & 0o004 and path not in self._warned:
            self._warned.add(path)
            log.warning("the secret %s can be read by every user on this host (mode %04o): "
                        "chmod 600 %s", path, mode, path)  # fmt: skip
        return value

    def get_or_create(self, name: str, make: Callable[[], str] = random_token) -> str:
        """The secret `name`, made with `make()` and stored the first time it is asked for.
        Processes that ask at once (`bastion serve` and `bastion cluster peers`, each with its
        own store) all get the one that was stored first."""
        path = self._path(name)
        with self._lock:
            try:
                return self._read(path)
            except FileNotFoundError:
                pass
            value = make()
            if self._create(path, value):
                return value
            return self._read(path)

    def add_if_missing(self, name: str, make: Callable[[], str] = random_token) -> bool:
        """Store make() as `name` unless a secret is there already; whether this call stored
        it (a command that makes keys says which it made)."""
        path = self._path(name)
        with self._lock:
            if path.exists():
                return False
            return self._create(path, make())

    def put(self, name: str, value: str) -> None:
        path = self._path(name)
        with self._lock:
            self._make_dirs(path)
            atomic.write_text(path, value + "\n", mode=0o600, keep_mode=False)

    def _make_dirs(self, path: Path) -> None:
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        os.chmod(self.root, 0o700)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _create(self, path: Path, value: str) -> bool:
        """Store value in path unless another process stored one first; whether it was ours.

        A rename replaces what is there, so two processes making the same secret at once each
        kept its own value and handed it out (two WireGuard keys for one node). link(2) instead
        fails when path exists: the complete, fsynced temporary file becomes the secret only if
        nobody's is there, and no reader sees a part of it."""
        self._make_dirs(path)
        # a crash before the unlink below leaves it: in bastion.atomic's shape, so that a later
        # secret made in this directory sweeps it (names() skips dotfiles meanwhile)
        atomic.sweep(path.parent)
        tmp = atomic.temp_name(path)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(value + "\n")
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        atomic.fsync_dir(path.parent)
        return True

    def names(self) -> list[str]:
        """Every stored secret's name (never the values)."""
        if not self.root.is_dir():
            return []
        return sorted(
            str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file() and not p.name.startswith(".")
        )


# --- a k3s cluster's secrets ---------------------------------------------------------------------


def token_name(cluster: str) -> str:
    return f"k3s/{cluster}/token"


def agent_token_name(cluster: str) -> str:
    return f"k3s/{cluster}/agent-token"


def node_password_name(cluster: str, machine: str) -> str:
    return f"k3s/{cluster}/node-password/{machine}"


def wireguard_key_name(machine: str) -> str:
    return f"wireguard/{machine}.key"


def init_server_name(cluster: str) -> str:
    return f"k3s/{cluster}/init-server"


def tunnel_address_name(machine: str) -> str:
    return f"wireguard/{machine}.address"


def tunnel_address_owner(name: str) -> str | None:
    """The machine whose tunnel address record (tunnel_address_name) `name` is, or None."""
    parts = name.split("/")
    if len(parts) == 2 and parts[0] == "wireguard" and parts[1].endswith(".address"):
        return parts[1][: -len(".address")]
    return None


def is_record(name: str) -> bool:
    """Whether `name` is a record of what went out (init_server_name, tunnel_address_name): kept
    in the store for its lifetime and backup, but no secret (a machine's name, an address)."""
    parts = name.split("/")
    return (len(parts) == 3 and parts[0] == "k3s" and parts[2] == "init-server") or (
        tunnel_address_owner(name) is not None)


def _record(store: SecretStore, name: str, value: str) -> None:
    """Store `value` as `name` unless it is there already (no write, no new mtime, when it is)."""
    if store.get(name) != value:
        store.put(name, value)


def machine_secrets(store: SecretStore, site: Site, machine: Machine) -> dict[str, Any]:
    """The `secrets` a machine's templates get on its one-time URL, made on first use.

    For a k3s node (site.yaml cluster:, role server or agent):
      k3s_token        the token it joins with: the servers' token on servers, the agents' on
                       agents (an agent's config never holds the servers' token)
      k3s_agent_token  servers only: the agents' token (k3s --agent-token-file)
      k3s_node_password  this node's own (/etc/rancher/node/password): k3s keeps a hash of it
                       per node name and refuses a node that comes back with another ("Node
                       password rejected"), which a PXE node booting a fresh root from RAM would
                       do at every boot if k3s made one there; the same one at every boot
      wireguard        {private_key, public_key}, when the node has a tunnel
    Other machines have none: {}.

    This is when a node's config goes out, so it also records what later plans must keep to
    (bastion.state.ledger): the server that starts the cluster (the plan's first_server: once
    recorded, a server inserted above it in machines.yaml does not start a second cluster) and
    this node's tunnel address (the management side knows the node by it). The start is
    recorded before the token is made, so that a token never exists without it.
    """
    node = machine.node
    if node is None:
        return {}
    cluster = node["name"]
    _record(store, init_server_name(cluster), node["first_server"])
    server_token = store.get_or_create(token_name(cluster), random_token)
    agent_token = store.get_or_create(agent_token_name(cluster), random_token)
    out: dict[str, Any] = {}
    if node["server"]:
        out["k3s_token"] = server_token
        out["k3s_agent_token"] = agent_token
    else:
        out["k3s_token"] = agent_token
    out["k3s_node_password"] = store.get_or_create(node_password_name(cluster, machine.name), random_token)
    if node["wireguard"] is not None:
        record_tunnel_address(store, machine)
        private = store.get_or_create(wireguard_key_name(machine.name), wireguard_private_key)
        out["wireguard"] = {"private_key": private, "public_key": wireguard_public_key(private)}
    return out


def record_tunnel_address(store: SecretStore, machine: Machine) -> None:
    """Record the k3s node `machine`'s tunnel address, as its plan has it, before its key is
    made (machine_secrets, `bastion tunnel make-keys`, `bastion cluster peers`): the address goes
    out with the key, and a key never exists without its address recorded."""
    wg = machine.node["wireguard"] if machine.node is not None else None
    if wg is None:
        return
    replaces = wg.get("replaces")
    if replaces is not None and store.get(tunnel_address_name(replaces)) == wg["ip"]:
        # the plan gave this node the address of a machine no longer declared (the pool had no
        # other left): that machine's record no longer holds it
        store.put(tunnel_address_name(replaces), "")
    _record(store, tunnel_address_name(machine.name), wg["ip"])


def wireguard_key_names(site: Site, controller: bool = True) -> list[str]:
    """The names of the site's tunnel keys: the controller host's (with `controller`, when it
    has a tunnel), then each tunnelled node's in machines.yaml order."""
    wg = site.settings.cluster.wireguard if site.settings.cluster else None
    out = []
    if controller and wg is not None and wg.controller is not None:
        out.append(CONTROLLER_WIREGUARD_KEY)
    return out + [wireguard_key_name(m.name) for m in _tunnelled_nodes(site)]


def _tunnelled_nodes(site: Site) -> list[Machine]:
    return [m for m in site.cluster_nodes if m.node["wireguard"] is not None]


def wireguard_public_keys(store: SecretStore, site: Site, make: bool = True) -> dict[str, str]:
    """Each tunnelled node's WireGuard public key. With `make`, the private keys that are
    missing are made (the nodes' first boot would make them); without, a missing one is
    SecretMissing, naming every one that is."""
    names = {m.name: wireguard_key_name(m.name) for m in _tunnelled_nodes(site)}
    if not make:
        missing = [n for n in names.values() if store.get(n) is None]
        if missing:
            raise SecretMissing(store.root, missing)
    return {machine: _stored_public_key(store, name, make) for machine, name in names.items()}


def _stored_public_key(store: SecretStore, name: str, make: bool = True) -> str:
    if make:
        private = store.get_or_create(name, wireguard_private_key)
    else:
        private = store.get(name)
        if private is None:
            raise SecretMissing(store.root, [name])
    try:
        return wireguard_public_key(private)
    except SecretError as e:
        raise SecretError(f"{store.path(name)}: {e}, and this is not one: restore it from a "
                          "backup, or remove it and make a new one (bastion tunnel make-keys; "
                          "the management side then needs the new public key: bastion tunnel "
                          "management-config)") from None


CONTROLLER_WIREGUARD_KEY = "controller/wireguard.key"


def controller_wireguard_public_key(store: SecretStore, make: bool = True) -> str:
    """The controller host's WireGuard public key; with `make`, its private key is made if
    missing (as `bastion install-service` does), else a missing one is SecretMissing."""
    return _stored_public_key(store, CONTROLLER_WIREGUARD_KEY, make)
