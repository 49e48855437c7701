"""What a site's secret store says went out of a k3s cluster, read once for a plan
(bastion.cluster.plan): which server started the cluster, the nodes' tunnel addresses, and which
secrets exist (a node's config went out when its secrets were made).

    k3s/<cluster>/init-server     the server given --cluster-init (bastion.state.secrets)
    wireguard/<machine>.address   a node's tunnel address, beside its wireguard/<machine>.key

Both are written when a node's config is issued (machine_secrets), never here: a Ledger only
reads. A store that does not exist, or that this user may not read, is an empty Ledger, and the
plan then has machines.yaml alone.
"""

from __future__ import annotations

import os
from pathlib import Path

from bastion.state.secrets import (
    SecretError,
    SecretStore,
    init_server_name,
    node_password_name,
    token_name,
    tunnel_address_owner,
    wireguard_key_name,
)


class Ledger:
    """The store's facts for the cluster `cluster`. `root` None: no store to go by."""

    def __init__(self, cluster: str, root: Path | None = None, names: frozenset[str] = frozenset(),
                 init_server: str | None = None, addresses: dict[str, str] | None = None):  # fmt: skip
        self.cluster, self.root = cluster, root
        self._names = names
        self.init_server = init_server
        self._addresses = dict(addresses or {})

    @classmethod
    def read(cls, root: Path | str | None, cluster: str) -> Ledger:
        """The facts of the store at `root`, read now and only read: a missing store is not made."""
        if root is None:
            return cls(cluster)
        root = Path(root).absolute()
        if not root.is_dir() or not os.access(root, os.R_OK | os.X_OK):
            return cls(cluster)
        store = SecretStore(root)
        try:
            names = frozenset(store.names())
            init = store.get(init_server_name(cluster)) if init_server_name(cluster) in names else None
            addresses = {owner: store.get(n) for n in names if (owner := tunnel_address_owner(n)) is not None}
        except (OSError, SecretError, UnicodeDecodeError):
            # a store this user may not read in full (the service's, 0700) is no store to go by
            return cls(cluster)
        return cls(cluster, root, names, init or None, {m: a for m, a in addresses.items() if a})

    def where(self, name: str) -> str:
        """Where the secret `name` is, for a problem to name."""
        return str(self.root.joinpath(*name.split("/"))) if self.root is not None else name

    @property
    def started(self) -> bool:
        """Whether a node's config went out: the cluster's token exists."""
        return token_name(self.cluster) in self._names

    def issued(self, machine: str) -> bool:
        """Whether `machine` got its config as a node of this cluster (its node password)."""
        return node_password_name(self.cluster, machine) in self._names

    def other_clusters(self) -> list[str]:
        """The names of the other clusters whose token the store holds."""
        out = {n.split("/")[1] for n in self._names
               if n.startswith("k3s/") and n.endswith("/token") and n.count("/") == 2}  # fmt: skip
        return sorted(out - {self.cluster})

    def addresses(self) -> dict[str, str]:
        """Every recorded tunnel address, by machine (of machines no longer declared too)."""
        return dict(self._addresses)

    def handed_out(self, machine: str) -> bool:
        """Whether `machine`'s tunnel address went out: its WireGuard key exists."""
        return wireguard_key_name(machine) in self._names
